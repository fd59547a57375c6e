"""The `ds.dcvla` accessor's summaries of recorded runs."""

import numpy as np
import pytest
import xarray as xr


def test_accessor_summaries(record, make_policy, object_episode):
    ds = record(make_policy(method="vla_cache"), *object_episode)
    by_layer = ds.dcvla.reuse_rate_by_layer()
    assert by_layer.sel(tower="dino", layer=5).isnull()  # past the tiny DINOv2's 3 blocks
    assert float(by_layer.sel(tower="llm", layer=0)) == 0  # VLA-Cache never reuses before layer 2
    assert ds.dcvla.reuse_rate().dims == ("frame",)
    with pytest.raises(KeyError, match="no k_drift"):
        ds.dcvla.drift_vs_staleness()


def test_llm_reuse_rate_ignores_padded_layers():
    """The layer dim is padded to the deepest component; rates over the LLM must stop at its own depth."""
    reuse = np.zeros((2, 3, 20, 256), bool)  # [frame, tower, layer, patch]: a SigLIP of 20 blocks, an LLM of 16
    reuse[:, 2, :16] = True
    ds = xr.Dataset({"reuse_by_layer": (("frame", "tower", "layer", "patch"), reuse)},
                    coords={"tower": ["dino", "siglip", "llm"], "layer": np.arange(20)},
                    attrs={"tower_depths": [4, 20, 16]})
    assert ds.dcvla.llm_reuse_rate() == 1.0  # a plain mean over the padded dim would say 0.8
    assert ds.dcvla.reuse_rate_by_layer().sel(tower="llm", layer=17).isnull()
