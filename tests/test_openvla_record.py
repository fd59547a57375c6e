"""Recording a `CachedPolicy` (OpenVLARecorder): the schema, what is recorded against what the policy did,
netCDF round trips, streaming, the policy hooks, drift and the action KL."""

import json

import numpy as np
import pytest
import xarray as xr

from dcvla.io import open_recording, write_dataset
from dcvla.openvla.record import SCHEMA, OpenVLARecorder, action_kl
from dcvla.recording import record_episode, recorder_for


def test_dataset_has_the_schema_and_records_what_the_policy_did(record, make_policy, object_episode):
    pol = make_policy(method="dual_cache")
    ds = record(pol, *object_episode, drift=True, attention_layers=[15], labels={"suite": "libero_object", "task": 0})
    for name in ("reuse", "staleness", "reuse_by_layer", "text_to_vision", "q_drift", "action_ref", "logit_kl"):
        assert ds[name].dims == ("frame", *SCHEMA.dims_of(name)), name
    assert ds.sizes["frame"] == 5 and ds.sizes["patch"] == 256 and list(ds.tower.values) == ["dino", "siglip", "llm"]
    assert ds.attention_l15.dims == ("frame", "head", "text", "seq")
    assert ds.suite.item() == "libero_object" and float(ds.time[1]) == pytest.approx(0.05)
    assert json.loads(ds.attrs["config"])["method"] == "dual_cache"
    assert ds.keyframe.values.tolist() == [True, False, False, True, False]
    # the masks are the policy's own, frame by frame: the selector's, and the K/V each tower took from a store
    for k, step in enumerate(pol.records):
        sel = step.selection
        for name in ("reuse", "pixel_dynamic", "attn_relevant"):
            assert np.array_equal(ds[name].values[k], getattr(sel, name).numpy()), (name, k)
        for tower in ("dino", "siglip"):  # dual_cache's towers reuse the selector's mask at every block
            assert np.array_equal(ds.reuse_by_layer.sel(tower=tower).values[k, :3], np.tile(sel.reuse.numpy(), (3, 1)))
        assert np.array_equal(ds.reuse_by_layer.sel(tower="llm").values[k], step.llm_reuse.numpy())
        assert np.array_equal(ds.staleness.values[k], step.staleness.numpy())
        assert np.array_equal(ds.action_tokens.values[k], step.prediction.token_ids.numpy())
    # non-keyframes reused patches, keyframes none
    assert not ds.reuse[ds.keyframe].any() and ds.reuse[~ds.keyframe].any(dim="patch").all()


def test_netcdf_round_trip_preserves_values_and_attrs(record, make_policy, object_episode, tmp_path):
    ds = record(make_policy(method="vla_cache"), *object_episode, drift=True, labels={"suite": "libero_object"})
    loaded = open_recording(write_dataset(ds, tmp_path / "run.nc"))
    xr.testing.assert_identical(loaded.drop_attrs(), ds.drop_attrs())
    assert loaded.attrs["config"] == ds.attrs["config"] and loaded.attrs["tower_depths"].tolist() == [3, 3, 16]
    assert loaded.reuse.dtype == bool and loaded.text_to_vision.dtype == np.float16


def test_streamed_file_equals_in_memory(record, make_policy, object_episode, tmp_path):
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
        with recorder_for(pol, drift=True, attention_layers=[3]):
            pol.step(object_episode[0][0], object_episode[1])
            pol.step(object_episode[0][1], "")
    assert pol.observer is None and pol.observed_prob_layers == frozenset() and pol.keep_records


def test_drift_is_zero_for_vanilla_and_positive_with_stale_kv(record, make_policy, object_episode):
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
        recorder_for(pol, what=["masks", "attention"])
    with pytest.raises(ValueError, match=r"attention_layers \[16\] out of range: the LLM has layers 0..15"):
        recorder_for(pol, attention_layers=[16])
    with pytest.raises(TypeError, match="OpenVLARecorder needs a dcvla.openvla.CachedPolicy, got object"):
        OpenVLARecorder(object())
