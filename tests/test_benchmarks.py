"""The benchmark scripts run with `--device` / `--dtype`: each one's `main(argv)` at a tiny preset in bfloat16 on the
CPU, with the fewest frames and repeats (no timing is checked: machines here are shared)."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def script(name: str):
    return importlib.import_module(name)


def test_place_model_moves_to_the_dtype():
    from dcvla.openvla import random_model
    from dcvla.openvla.config import get_preset

    model = script("_setup").place_model(random_model(get_preset("tiny")), "cpu", torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"


def test_host_syncs_in_bfloat16():
    results = script("host_syncs").main(["--preset", "tiny", "--dtype", "bfloat16", "--methods", "dual_cache"])
    assert results["dual_cache"]["total"] <= script("host_syncs").LIMIT


def test_cache_speedup_in_bfloat16(capsys):
    rows = script("cache_speedup").main(["--preset", "tiny", "--dtype", "bfloat16", "--frames", "2", "--episodes", "1",
                                         "--methods", "vanilla", "dual_cache"])
    assert [r["method"] for r in rows] == ["vanilla", "dual_cache"]
    assert "bfloat16" in capsys.readouterr().out


def test_host_syncs_and_cache_speedup_on_openvla_oft(capsys):
    """`--preset oft-tiny`: OFTCachedPolicy on both recorded views (said in the output), its LLM the one bidirectional
    pass and its last stage the head."""
    results = script("host_syncs").main(["--preset", "oft-tiny", "--methods", "dual_cache"])
    assert results["dual_cache"]["total"] <= script("host_syncs").LIMIT and results["dual_cache"]["reused_patches"] > 0
    rows = script("cache_speedup").main(["--preset", "oft-tiny", "--frames", "2", "--episodes", "1",
                                         "--methods", "vanilla", "dual_cache"])
    assert [r["method"] for r in rows] == ["vanilla", "dual_cache"]
    assert list(rows[1]["groups"]) == ["vision", "llm_prefill", "head", "llm"]
    assert rows[1]["flops_ratio"] > 1 and rows[1]["llm_reuse"] > 0
    out = capsys.readouterr().out
    assert "its wrist image the episode's wrist camera" in out and "wrist view recorded" in out


def test_step_latency_in_bfloat16():
    runs = script("step_latency").main(["--preset", "tiny", "--dtype", "bfloat16", "--repeats", "1", "--warmup", "0",
                                        "--methods", "dual_cache"])["tiny"]
    assert set(runs) == {"reference (HF forward)", "dual_cache"}
    assert all(len(r) == 1 and r[0]["llm_prefill"] > 0 for r in runs.values())


@pytest.mark.parametrize("preset", ["pi0-tiny", "smolvla-tiny"])
def test_pi0_reuse_speedup_in_bfloat16(preset):
    stats = script("pi0_reuse_speedup").main(["--preset", preset, "--dtype", "bfloat16", "--steps", "2",
                                              "--episodes", "1", "--modes", "full", "--threshold", "-1"])
    assert set(stats) == {"none", "full"} and len(stats["full"]["ms"]) == 2
    assert stats["full"]["reused"] == [False, True] and stats["full"]["flops"][1] < stats["none"]["flops"][1]


@pytest.mark.filterwarnings("ignore")
def test_recording_overhead_in_bfloat16():
    ms = script("recording_overhead").main(["--preset", "tiny", "--dtype", "bfloat16", "--frames", "2"])
    assert set(ms) == {"plain", "detached", "recording"} and all(len(v) == 2 for v in ms.values())


def test_ray_scaling_at_the_smallest_size():
    out = script("ray_scaling").main(["--preset", "tiny", "--tasks", "1", "--max-steps", "2", "--methods", "vanilla",
                                      "--workers", "--split-steps", "2"])  # Ray's own runs: tests/test_units.py
    assert [n for _, n, _ in out["rows"].values()] == [1] and set(out["split"]) >= {"physics only", "policy step"}


@pytest.mark.filterwarnings("ignore")
def test_trial_rendering_plays_the_same_trial_both_ways_with_fewer_renders(capsys):
    rows = script("trial_rendering").main(["smolvla-micro", "--suite", "libero_goal", "--max-steps", "12",
                                           "--repeats", "1"])
    assert rows["every_frame"] == [True, False] and len(set(rows["trajectory"])) == 1 and rows["steps"] == [12, 12]
    assert rows["renders"][1] < rows["renders"][0] and "speedup A/B" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore")
def test_shard_threads_runs_shards_with_and_without_threads(capsys):
    rows = script("shard_threads").main(["--shards", "1", "--max-steps", "2", "--repeats", "1"])
    (wall_a, _, used_a), (wall_b, _, used_b) = rows["A"][0], rows["B"][0]
    assert used_a == [1] and used_b[0] >= 1 and wall_a > 0 and wall_b > 0  # B: torch's default, the cores
    assert "speedup B/A" in capsys.readouterr().out
