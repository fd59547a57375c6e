"""Action tokens <-> actions, as OpenVLA maps them."""

import numpy as np
import pytest

from dcvla.openvla.actions import ActionTokenizer, unnormalize_action

STATS = {"action": {"q01": [-2.0] * 7, "q99": [2.0] * 7, "mask": [True] * 6 + [False]}}


def test_token_to_bin_centre_matches_openvla():
    tok = ActionTokenizer(32000, 256)
    assert tok.bin_centers.shape == (255,)
    # id 31999 -> d = 1 -> index 0 (the lowest centre); id 31745 -> d = 255 -> index 254 (the highest)
    assert tok.decode(np.array([31999]))[0] == pytest.approx(tok.bin_centers[0])
    assert tok.decode(np.array([31745]))[0] == pytest.approx(tok.bin_centers[254])
    # ids outside the action range clip, as upstream's np.clip does
    assert tok.decode(np.array([5, 32050])).tolist() == [tok.bin_centers[254], tok.bin_centers[0]]


def test_encode_decode_round_trip_within_half_a_bin():
    tok = ActionTokenizer()
    actions = np.linspace(-0.999, 0.999, 1001)
    assert np.abs(tok.decode(tok.encode(actions)) - actions).max() <= (2 / 255) / 2 + 1e-9


def test_unnormalize_respects_mask():
    normalized = np.array([-1.0, 0.0, 1.0, 0.5, -0.5, 0.25, 0.7])
    out = unnormalize_action(normalized, STATS["action"])
    assert out[:6].tolist() == [-2.0, 0.0, 2.0, 1.0, -1.0, 0.5]
    assert out[6] == 0.7  # the gripper is not un-normalised


def test_stats_of_the_wrong_size():
    with pytest.raises(ValueError, match="statistics have 6 action dims, the model predicts 7"):
        unnormalize_action(np.zeros(7), {"q01": [0.0] * 6, "q99": [1.0] * 6})
