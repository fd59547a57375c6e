"""Which dataset's statistics un-normalise actions: the unnorm_key resolution every family shares."""

import pytest

from dcvla.stats import resolve_unnorm_key

STATS = {
    "libero_spatial_no_noops": {"action": {"q01": [-2.0] * 7, "q99": [2.0] * 7, "mask": [True] * 6 + [False]}},
    "bridge_orig": {"action": {"q01": [0.0] * 7, "q99": [1.0] * 7}},
}


def test_unnorm_key_resolution():
    assert resolve_unnorm_key(STATS, "libero_spatial") == "libero_spatial_no_noops"
    assert resolve_unnorm_key(STATS, "bridge_orig") == "bridge_orig"
    assert resolve_unnorm_key({"only": {}}, None) == "only"
    with pytest.raises(KeyError, match="unnorm_key 'libero_goal' not found; available: bridge_orig, libero_spatial_no_noops"):
        resolve_unnorm_key(STATS, "libero_goal")
    with pytest.raises(KeyError, match="pass unnorm_key, one of: bridge_orig, libero_spatial_no_noops"):
        resolve_unnorm_key(STATS, None)
    with pytest.raises(KeyError, match="no dataset statistics"):
        resolve_unnorm_key({}, None)
