"""Recording the Pi0-style policy (FlowRecorder): the registry finds it, drift against the no-reuse shadow pass,
a crash leaves no file, and the robot state per frame."""

import numpy as np
import pytest

from dcvla.io import read_dataset
from dcvla.pi0 import FlowRecorder, ReuseConfig
from dcvla.pi0.config import SPANS
from dcvla.recording import record_episode, recorder_for


@pytest.fixture(scope="module")
def reference(pi0, pi0_clip):
    """The no-reuse run over the clip: its step records."""
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode="none"))
    for frame, state in zip(frames, states):
        pol.step(frame, instruction, state)
    return list(pol.records)


def test_the_registry_finds_the_pi0_recorder(pi0, make_policy):
    assert type(recorder_for(pi0.with_config(ReuseConfig(mode="full")))) is FlowRecorder
    with pytest.raises(TypeError, match="FlowRecorder needs a dcvla.flow_policy.FlowPolicy"):
        FlowRecorder(make_policy())


def test_record_episode_with_drift(pi0, pi0_clip, reference, tmp_path):
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode="vision_only", threshold=-1.0))
    path = record_episode(pol, np.stack(frames), instruction, tmp_path / "ep.nc", states=np.stack(states), drift=True)
    assert pol.observer is None and pol.keep_records
    ds = read_dataset(path)
    n = len(frames)
    assert ds.sizes["frame"] == n and ds.frame.values.tolist() == list(range(n))
    assert ds.attrs["method"] == "vision_only" and ds.attrs["family"] == "pi0"
    assert ds.gate.values.tolist() == [False] + [True] * (n - 1)
    drift = ds.action_drift.values
    assert drift[0] == 0 and (drift[1:] > 0).all(), drift
    # the shadow pass recomputes everything from the same noise: the no-reuse run's chunks
    ref = np.stack([r.chunk for r in reference]).astype(np.float32)
    assert np.array_equal(ds.action_ref.values, ref)
    assert np.array_equal(ds.action.values[0], ref[0]) and not np.array_equal(ds.action.values[1:], ref[1:])
    assert np.allclose(drift, np.linalg.norm(ds.action.values - ref, axis=-1).mean(-1), atol=1e-6)
    k_drift = ds.k_drift.values  # [frame, span, layer, metric]
    assert (k_drift[0] == 0).all()
    assert (k_drift[1:, SPANS.index("vision")] > 0).all()  # stale vision K/V at every layer
    text = SPANS.index("text")
    assert (k_drift[1:, text, 0] == 0).all()  # layer 0's text K/V see no other token: fresh == shadow
    assert (k_drift[1:, text, 1:] > 0).all()  # above, the recomputed text attended to the stale vision K/V
    assert ds.span_reuse.values[1:, SPANS.index("vision")].all() and not ds.span_reuse.values[:, text].any()


def test_record_episode_crash_leaves_no_file(pi0, pi0_clip, tmp_path, monkeypatch):
    frames, states, instruction = pi0_clip
    pol = pi0.with_config(ReuseConfig(mode="vision_only", threshold=-1.0))
    real_step, calls = pol.step, []

    def crashing_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real_step(*args)

    monkeypatch.setattr(pol, "step", crashing_step)
    path = tmp_path / "ep.nc"
    with pytest.raises(RuntimeError, match="simulated crash"):
        record_episode(pol, np.stack(frames), instruction, path, states=np.stack(states), drift=True)
    assert len(calls) == 3
    assert not path.exists() and list(tmp_path.iterdir()) == []  # no partial file, no temporary left behind
    assert pol.observer is None


def test_record_episode_needs_states(pi0, pi0_clip, tmp_path):
    frames, states, instruction = pi0_clip
    with pytest.raises(ValueError, match="one robot state per frame"):
        record_episode(pi0.with_config(ReuseConfig()), np.stack(frames), instruction, tmp_path / "x.nc")
    assert not (tmp_path / "x.nc").exists()
