"""The recording engine every family shares: the registry that finds a policy's recorder, the attach/detach
lifecycle (also after an exception), in-memory and streamed (atomic) output, resuming, and the drift distances.

Most of it runs on a made-up family (`Toy`), so the engine is held to its contract without any real model;
the crash test runs on OpenVLA's recorder as well."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from dcvla import recording
from dcvla.io import CorruptFileError, StreamWriter, open_recording, read_dataset
from dcvla.openvla import CachedPolicy, OpenVLARecorder
from dcvla.recording import Recorder, Schema, distances, record_episode, recorder_for, register_recorder


@dataclass
class ToyConfig:
    method: str = "toy"
    gain: float = 2.0


class Toy:
    """A streaming policy of a made-up family: a step's value is its input times the gain."""

    def __init__(self) -> None:
        self.name, self.config = "toy", ToyConfig()
        self.model = type("Model", (), {"config": type("Cfg", (), {"name": "toy-preset"})()})()
        self.observer, self.keep_records = None, True
        self.reset()

    def reset(self) -> None:
        self.frame, self.records = 0, []

    def step(self, image, instruction: str) -> float:
        record = {"frame": self.frame, "value": float(np.mean(image)) * self.config.gain}
        if self.keep_records:
            self.records.append(record)
        if self.observer is not None:
            self.observer.on_step(record)
        self.frame += 1
        return record["value"]


class ToyRecorder(Recorder):
    schema = Schema({"value": ("slot",), "value_ref": ("slot",)}, {"values": ("value",), "other": ()})
    default_what = ("values",)

    def frame_arrays(self, record) -> dict[str, np.ndarray]:
        return {"frame": np.array(record["frame"]), "time": np.array(record["frame"] / self.control_hz),
                "value": np.full(3, record["value"], np.float32)}

    def drift_arrays(self, record) -> dict[str, np.ndarray]:
        return {"value_ref": np.full(3, record["value"] / self.policy.config.gain, np.float32)}

    def sizes(self) -> dict[str, int]:
        return {"slot": 3}

    def coords(self) -> dict[str, np.ndarray]:
        return {"slot": np.array(["a", "b", "c"])}


@pytest.fixture
def toy(monkeypatch):
    """A Toy policy whose family registered ToyRecorder (in a copy of the registry, restored afterwards)."""
    monkeypatch.setattr(recording, "_RECORDERS", dict(recording._RECORDERS))
    register_recorder(Toy)(ToyRecorder)
    return Toy()


FRAMES = [np.full((16, 16, 3), v, np.uint8) for v in (1, 2, 3, 4)]


# ------------------------------------------------------------------------------------------------ registry
def test_recorder_for_finds_the_family_recorder(toy, make_policy):
    assert type(recorder_for(toy)) is ToyRecorder
    assert type(recorder_for(make_policy(method="dual_cache"))) is OpenVLARecorder

    class Tuned(CachedPolicy):  # a subclass finds its family's recorder through the MRO
        pass

    tuned = Tuned(make_policy().model, make_policy().processor)
    assert type(recorder_for(tuned, drift=True)) is OpenVLARecorder


def test_an_unknown_policy_type_raises_naming_it(toy):
    class Stranger:
        pass

    with pytest.raises(TypeError, match=r"no recorder is registered for Stranger; registered policy types: .*CachedPolicy.*Toy"):
        recorder_for(Stranger())


# --------------------------------------------------------------------------------------------- lifecycle
def test_in_memory_recording_attaches_only_inside_the_block(toy):
    toy.reset()
    with recorder_for(toy, drift=True, labels={"suite": "toy_suite", "episode": 3}, control_hz=4.0) as rec:
        assert toy.observer is rec and toy.keep_records
        for frame in FRAMES:
            toy.step(frame, "go")
    assert toy.observer is None
    ds = rec.to_dataset()
    assert ds.value.dims == ("frame", "slot") and ds.value_ref.dims == ("frame", "slot")
    assert ds.frame.values.tolist() == [0, 1, 2, 3] and ds.time.values.tolist() == [0, 0.25, 0.5, 0.75]
    assert ds.value[:, 0].values.tolist() == [2, 4, 6, 8] and ds.value_ref[:, 0].values.tolist() == [1, 2, 3, 4]
    assert ds.slot.values.tolist() == ["a", "b", "c"] and ds.suite.item() == "toy_suite" and ds.episode.item() == 3
    assert ds.attrs["method"] == "toy" and ds.attrs["preset"] == "toy-preset" and ds.attrs["drift_recorded"] == 1
    assert '"gain": 2.0' in ds.attrs["config"]
    assert "value_ref" not in record_once(toy, drift=False).data_vars  # drift variables only when asked


def record_once(policy, **kwargs):
    policy.reset()
    with recorder_for(policy, **kwargs) as rec:
        policy.step(FRAMES[0], "go")
    return rec.to_dataset()


def test_the_observer_is_detached_after_an_exception(toy):
    with pytest.raises(ZeroDivisionError):
        with recorder_for(toy):
            toy.step(FRAMES[0], "go")
            1 / 0
    assert toy.observer is None
    record_once(toy)  # a new recording can attach


@pytest.mark.parametrize("kept", [True, False])
def test_a_streamed_recording_keeps_nothing_and_restores_keep_records(toy, tmp_path, kept):
    toy.keep_records = kept
    path = record_episode(toy, FRAMES, "go", tmp_path / "toy.nc", drift=True)
    assert toy.records == [] and toy.keep_records is kept and toy.observer is None
    ds = open_recording(path)
    assert ds.value[:, 1].values.tolist() == [2, 4, 6, 8] and ds.value_ref.dims == ("frame", "slot")
    assert ds.slot.values.tolist() == ["a", "b", "c"]
    with recorder_for(toy, path=tmp_path / "again.nc") as rec:  # keep_records is off only inside the block
        assert toy.keep_records is False
        toy.step(FRAMES[0], "go")
        with pytest.raises(RuntimeError, match="frames were streamed to"):
            rec.to_dataset()
    assert toy.keep_records is kept


def test_a_crash_leaves_no_file_and_a_rerun_resumes(make_policy, object_episode, tmp_path):
    frames, instruction = object_episode
    path = tmp_path / "object_episode.nc"
    pol = make_policy(method="dual_cache")

    class Crash(Exception):
        pass

    with pytest.raises(Crash):
        with recorder_for(pol, path=path):
            pol.step(frames[0], instruction)
            raise Crash
    assert list(tmp_path.iterdir()) == []  # neither the result nor its temporary file
    assert pol.observer is None and pol.keep_records
    record_episode(pol, frames[:2], instruction, path)
    stamp = path.stat().st_mtime_ns
    assert record_episode(pol, frames[:2], instruction, path) == path
    assert path.stat().st_mtime_ns == stamp  # complete: skipped, not rewritten


def test_bad_requests_raise(toy):
    with pytest.raises(ValueError, match=r"unknown recording variable\(s\) \['attention'\]; known: values, other"):
        recorder_for(toy, what=["values", "attention"])
    with recorder_for(toy):
        with pytest.raises(RuntimeError, match="already has a recorder"):
            recorder_for(toy).__enter__()
    with pytest.raises(ValueError, match="nothing was recorded"):
        with recorder_for(toy) as rec:
            pass
        rec.to_dataset()


def test_recorder_arguments_of_the_wrong_kind_are_named(toy, tmp_path):
    with pytest.raises(ValueError, match=r"what must be a list of variable groups, got the str 'values'; e\.g\. what=\['values'\]"):
        recorder_for(toy, what="values")  # not its letters
    with pytest.raises(ValueError, match=r"labels must be a dict .* got \['libero_10'\]"):
        recorder_for(toy, labels=["libero_10"])
    with pytest.raises(ValueError, match="control_hz must be a positive number of steps per second, got 0"):
        recorder_for(toy, control_hz=0)
    with pytest.raises(ValueError, match=f"path {tmp_path} is a directory; give the recording's file name"):
        record_episode(toy, FRAMES, "go", tmp_path)  # before any step, not after the whole episode


def test_a_stream_that_cannot_be_renamed_into_place_leaves_no_temporary(tmp_path):
    writer = StreamWriter(tmp_path / "run.nc", {}, {}, {}, lambda name: ())
    writer.append({"frame": np.array(0), "value": np.array(1.0)})
    (tmp_path / "run.nc").mkdir()  # something took the name meanwhile
    with pytest.raises(IsADirectoryError):
        writer.close(commit=True)
    assert [p.name for p in tmp_path.iterdir()] == ["run.nc"]


# ------------------------------------------------------------------------------------ empty and damaged files
def test_zero_frames_raise_naming_the_path_and_write_nothing(toy, tmp_path):
    path = tmp_path / "toy.nc"
    with pytest.raises(ValueError, match=f"no frames to record, so {path} would not be written"):
        record_episode(toy, [], "go", path)
    with pytest.raises(ValueError, match=f"no frame was recorded, so {path} was not written"):
        with recorder_for(toy, path=path):  # streamed, and the policy never stepped
            pass
    assert list(tmp_path.iterdir()) == [] and toy.observer is None and toy.keep_records


def test_a_truncated_or_short_recording_is_recorded_again_with_a_warning(toy, tmp_path):
    path = record_episode(toy, FRAMES, "go", tmp_path / "toy.nc")
    assert open_recording(path).attrs["frames_expected"] == 4
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy cut short
    with pytest.warns(RuntimeWarning, match=rf"{path} is not a complete recording \(it cannot be read .*truncated"):
        record_episode(toy, FRAMES, "go", path)
    assert open_recording(path).value[:, 0].values.tolist() == [2, 4, 6, 8]
    path = record_episode(toy, FRAMES[:2], "go", tmp_path / "short.nc")
    with pytest.warns(RuntimeWarning, match=rf"{path} is not a complete recording \(it holds 2 frames, not the 4 asked for"):
        record_episode(toy, FRAMES, "go", path)
    assert open_recording(path).sizes["frame"] == 4


def test_an_unreadable_dataset_raises_naming_the_file(tmp_path):
    (tmp_path / "table.nc").write_text("not netCDF")
    with pytest.raises(CorruptFileError, match=f"{tmp_path / 'table.nc'} is not a readable netCDF dataset") as err:
        read_dataset(tmp_path / "table.nc")
    assert isinstance(err.value.__cause__, OSError)
    with pytest.raises(FileNotFoundError, match=f"no dataset file {tmp_path / 'missing.nc'}"):
        read_dataset(tmp_path / "missing.nc")


# ---------------------------------------------------------------------------------------------- distances
def test_distances_hand_values():
    a = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [1.0, 1.0]]])  # [head, token, head_dim]
    b = torch.tensor([[[0.0, 1.0], [3.0, 4.0], [2.0, 2.0]]])
    d = distances(a, b)  # [token, (cosine, rel_l2)]
    assert d.shape == (3, 2)
    np.testing.assert_allclose(d[0], [1.0, np.sqrt(2)], atol=1e-6)  # orthogonal, |a - b| = sqrt 2, |b| = 1
    assert (d[1] == 0).all()  # identical: exactly 0, not rounding noise
    np.testing.assert_allclose(d[2], [0.0, 0.5], atol=1e-6)  # same direction, half the length
