"""Paired latency (`dcvla.timing`): every policy steps each frame before any steps the next, in an order that
rotates frame by frame, after a warm-up; each step's time is its own. Fake policies on a fake clock make the order
and the times exact."""

from types import SimpleNamespace

import numpy as np
import pytest

from dcvla import timing


class Clock:
    """Stands in for the `time` module inside dcvla.timing: `perf_counter` reads a clock the fake steps advance."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Fake:
    """A policy whose step takes `ms[frame]` on the fake clock and logs (name, frame) to a shared log."""

    def __init__(self, name: str, ms: list[float], log: list, clock: Clock) -> None:
        self.name, self.ms, self.log, self.clock = name, ms, log, clock

    def reset(self) -> None:
        self.log.append((self.name, "reset"))
        self.records = []

    def step(self, frame: int, instruction: str) -> None:
        self.log.append((self.name, frame))
        self.clock.now += self.ms[frame] / 1e3
        self.records.append(SimpleNamespace(latency_ms={"model": self.ms[frame] / 2}))


@pytest.fixture
def fakes(monkeypatch):
    clock, log = Clock(), []
    monkeypatch.setattr(timing, "time", clock)
    policies = {name: Fake(name, ms, log, clock) for name, ms in
                (("a", [10.0, 10.0, 10.0, 10.0]), ("b", [5.0, 4.0, 5.0, 20.0]), ("c", [1.0, 2.0, 3.0, 4.0]))}
    return policies, log


def test_rotation_starts_each_turn_one_further():
    assert [timing.rotation("abc", turn) for turn in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_every_policy_steps_a_frame_before_any_steps_the_next_in_a_rotating_order(fakes):
    policies, log = fakes
    steps = [(frame, "task") for frame in range(4)]
    ds = timing.paired_latency(policies, steps, "cpu")
    warm = [entry for name in "abc" for entry in ((name, "reset"), (name, 0), (name, 1), (name, "reset"))]
    assert log[:12] == warm  # each policy: the first two frames untimed, then reset
    timed = [entry for entry in log[12:] if entry[1] != "reset"]
    assert timed == [(name, frame) for frame in range(4) for name in timing.rotation("abc", frame)]
    assert ds.order.sel(run="b").values.tolist() == [1, 0, 2, 1]  # its position in each frame's order


def test_each_step_gets_its_own_time_and_stage_clock(fakes):
    policies, _ = fakes
    ds = timing.paired_latency(policies, [(frame, "task") for frame in range(4)], "cpu", warmup=0)
    assert ds.latency_ms.sel(run="b").values == pytest.approx([5.0, 4.0, 5.0, 20.0])
    assert ds.stage_ms.sel(run="c", stage="model").values == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert ds.attrs["device"] == "cpu" and ds.attrs["warmup_frames"] == 0
    np.testing.assert_array_equal(ds.run.values, ["a", "b", "c"])


def test_interleave_continues_the_rotation_from_a_given_turn(fakes):
    policies, log = fakes
    order = [name for _, name, _, _ in timing.interleave(policies, [(0, "task"), (1, "task")], "cpu", first_turn=2)]
    assert order == timing.rotation("abc", 2) + timing.rotation("abc", 3)


def test_no_policy_or_no_frame_is_refused(fakes):
    policies, _ = fakes
    with pytest.raises(ValueError, match="needs policies and frames, got 3 policies and 0 frames"):
        timing.paired_latency(policies, [], "cpu")
