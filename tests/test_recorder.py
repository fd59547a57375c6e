"""Recording: labelled datasets, netCDF round trips, hooks that never outlive a run, atomic streamed files."""

import json

import numpy as np
import pytest
import xarray as xr

from dcvla.io import write_dataset
from dcvla.recorder import Recorder, action_kl, open_recording, record_episode
from dcvla.schema import SCHEMA


def record(pol, frames, instruction, **kw) -> xr.Dataset:
    pol.reset()
    with Recorder(pol, **kw) as rec:
        for frame in frames:
            pol.step(frame, instruction)
    return rec.to_dataset()


def test_dataset_has_the_schema(make_policy, object_episode):
    ds = record(make_policy(method="dual_cache"), *object_episode, drift=True, attention_layers=[15],
                labels={"suite": "libero_object", "task": 0})
    for name in ("reuse", "staleness", "reuse_by_layer", "text_to_vision", "q_drift", "action_ref", "logit_kl"):
        assert ds[name].dims == ("frame", *SCHEMA[name]), name
    assert ds.sizes["frame"] == 5 and ds.sizes["patch"] == 256 and list(ds.tower.values) == ["dino", "siglip", "llm"]
    assert ds.attention_l15.dims == ("frame", "head", "text", "seq")
    assert ds.suite.item() == "libero_object" and float(ds.time[1]) == pytest.approx(0.05)
    assert json.loads(ds.attrs["config"])["method"] == "dual_cache"
    assert ds.keyframe.values.tolist() == [True, False, False, True, False]
    # the mask is the selector's: a reused patch was neither pixel-dynamic nor attention-relevant
    assert not (ds.reuse & (ds.pixel_dynamic | ds.attn_relevant)).any()


def test_netcdf_round_trip_preserves_values_and_attrs(make_policy, object_episode, tmp_path):
    ds = record(make_policy(method="vla_cache"), *object_episode, drift=True, labels={"suite": "libero_object"})
    loaded = open_recording(write_dataset(ds, tmp_path / "run.nc"))
    xr.testing.assert_identical(loaded.drop_attrs(), ds.drop_attrs())
    assert loaded.attrs["config"] == ds.attrs["config"] and loaded.attrs["tower_depths"].tolist() == [3, 3, 16]
    assert loaded.reuse.dtype == bool and loaded.text_to_vision.dtype == np.float16


def test_streamed_file_equals_in_memory(make_policy, object_episode, tmp_path):
    frames, instruction = object_episode
    in_memory = record(make_policy(method="dual_cache"), frames, instruction, drift=True)
    pol = make_policy(method="dual_cache")
    path = record_episode(pol, frames, instruction, tmp_path / "stream.nc", drift=True)
    streamed = open_recording(path)
    assert pol.records == []  # streaming keeps nothing in memory
    for name in in_memory.data_vars:
        if name != "latency_ms":
            np.testing.assert_array_equal(streamed[name].values, in_memory[name].values, err_msg=name)


def test_hooks_are_removed_even_after_an_exception(make_policy, object_episode):
    pol = make_policy(method="dual_cache")
    with pytest.raises(ValueError, match="instruction is empty"):
        with Recorder(pol, drift=True, attention_layers=[3]):
            pol.step(object_episode[0][0], object_episode[1])
            pol.step(object_episode[0][1], "")
    assert pol.observer is None and pol.observed_prob_layers == frozenset() and pol.keep_records


def test_a_crash_leaves_no_file_and_a_rerun_resumes(make_policy, object_episode, tmp_path):
    frames, instruction = object_episode
    path = tmp_path / "object_episode.nc"
    pol = make_policy(method="dual_cache")

    class Crash(Exception):
        pass

    with pytest.raises(Crash):
        with Recorder(pol, path=path):
            pol.step(frames[0], instruction)
            raise Crash
    assert list(tmp_path.iterdir()) == []  # neither the result nor its temporary file
    record_episode(pol, frames[:2], instruction, path)
    stamp = path.stat().st_mtime_ns
    assert record_episode(pol, frames[:2], instruction, path) == path
    assert path.stat().st_mtime_ns == stamp  # complete: skipped, not rewritten


def test_drift_is_zero_for_vanilla_and_positive_with_stale_kv(make_policy, object_episode):
    vanilla = record(make_policy(method="vanilla"), *object_episode, drift=True)
    for name in ("q_drift", "k_drift", "v_drift"):
        assert float(np.nanmax(np.abs(vanilla[name].values))) == 0.0, name
    assert (vanilla.logit_kl == 0).all() and (vanilla.action == vanilla.action_ref).all()
    # llm_kqv_only: the towers are recomputed, so at LLM layer 0 a fresh token's K equals a full recompute's
    # exactly, while a reused token's is its stale cached one. (Deeper, fresh tokens drift too: they attended
    # to stale K/V below. In dual_cache even layer 0 drifts, through the towers' own stale K/V.)
    cached = record(make_policy(method="llm_kqv_only"), *object_episode, drift=True)
    stale = cached.dcvla.non_keyframes()
    k_llm = stale.k_drift.sel(tower="llm", metric="rel_l2", layer=0)  # [frame, patch]
    assert float(k_llm.where(stale.reuse).min()) > 0
    assert float(k_llm.where(~stale.reuse).max()) == 0
    assert float(stale.k_drift.sel(tower="llm", metric="rel_l2", layer=15).where(~stale.reuse).max()) > 0
    assert float(cached.dcvla.drift_vs_staleness().sel(staleness=0)) < float(cached.dcvla.drift_vs_staleness().sel(staleness=1))
    # the action-token distributions, against the vanilla run on the same frames
    kl = action_kl(cached, vanilla)
    assert (action_kl(vanilla, vanilla) == 0).all()
    assert (kl.sel(frame=cached.frame[cached.keyframe]) == 0).all() and float(kl.max()) > 0


def test_bad_requests_raise(make_policy, base):
    pol = make_policy(method="dual_cache")
    with pytest.raises(ValueError, match="unknown recording variable.*'attention'.*known: masks"):
        Recorder(pol, what=["masks", "attention"])
    with pytest.raises(ValueError, match=r"attention_layers \[16\] out of range: the LLM has layers 0..15"):
        Recorder(pol, attention_layers=[16])
    with pytest.raises(TypeError, match="needs a dcvla.methods.CachedPolicy"):
        Recorder(base)
    with Recorder(pol):
        with pytest.raises(RuntimeError, match="already has a recorder"):
            Recorder(pol).__enter__()
    with pytest.raises(ValueError, match="nothing was recorded"):
        with Recorder(pol) as rec:
            pass
        rec.to_dataset()


def test_accessor_summaries(make_policy, object_episode):
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
