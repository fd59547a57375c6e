"""The study notebooks run end to end through `dcvla run` at tiny size and write their datasets and figures."""

import pandas as pd
import pytest

from dcvla.cli import main as cli, parse_value
from dcvla.io import read_dataset
from dcvla.studies import StudyConfig, find_cliff

TINY = ["-p", "preset", "tiny", "-p", "suites", '["libero_goal"]', "-p", "episodes_per_suite", "1"]


def run_study(name: str, tmp_path, *params: str) -> None:
    args = ["run", name, *TINY, "-p", "runs_dir", str(tmp_path / "runs"), "-p", "figures_dir", str(tmp_path / "figures"), *params]
    assert cli(args) == 0
    assert (tmp_path / "studies" / f"{name}.ipynb").exists()  # the executed notebook, next to the outputs


def test_mechanism_equivalence_verdicts(tmp_path):
    run_study("mechanism_equivalence", tmp_path, "-p", "frames", "4")
    table = read_dataset(tmp_path / "mechanism_equivalence.nc").to_dataframe()
    h0 = table[table.hypothesis.str.startswith("H0")]
    assert len(h0) == 7 and (h0.verdict == "holds").all(), h0[["compared", "max |logit diff|"]]
    h1 = table[table.hypothesis.str.startswith("H1")]
    assert h1.verdict.str.startswith("holds").all() and (h1["max |logit diff|"] <= 1e-4).all()
    assert table[table.hypothesis.str.startswith("H4")].verdict.str.contains("consistency beats freshness").all()
    assert (tmp_path / "figures" / "mechanism_equivalence.png").stat().st_size > 10_000


def test_cache_behaviour_writes_table_and_figures(tmp_path):
    run_study("cache_behaviour", tmp_path, "-p", "frames", "3", "-p", "methods", '["vanilla", "dual_cache"]')
    table = read_dataset(tmp_path / "cache_behaviour.nc").to_dataframe().set_index("method")
    assert table.loc["vanilla", "FLOPs ratio"] == 1.0 and table.loc["dual_cache", "FLOPs ratio"] > 1.0
    assert 0 < table.loc["dual_cache", "LLM reuse rate"] < 1
    # one mask for every tower and every LLM layer: the LLM's reuse is the mask's (padded layers excluded)
    assert table.loc["dual_cache", "LLM reuse rate"] == pytest.approx(table.loc["dual_cache", "reuse rate"])
    names = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert {"cache_behaviour_reuse_by_suite.png", "cache_behaviour_mask.png", "cache_behaviour_savings.png"} <= names


def test_long_horizon_sweeps_and_cliff(tmp_path):
    run_study("long_horizon_stability", tmp_path, "-p", "suites", '["libero_10"]', "-p", "frames", "6",
              "-p", "sweep_frames", "4", "-p", "keyframe_intervals", "[1, 3]", "-p", "pixel_thresholds", "[0.03, 1.0]",
              "-p", "attention_top_ks", "[70, 256]")
    sweeps = read_dataset(tmp_path / "long_horizon_stability.nc").to_dataframe()
    assert set(sweeps.parameter) == {"keyframe_interval", "pixel_threshold", "attention_top_k"}
    every_frame_fresh = sweeps[(sweeps.parameter == "keyframe_interval") & (sweeps.value == 1)]
    assert (every_frame_fresh["action KL"] == 0).all() and (every_frame_fresh["reuse rate"] == 0).all()


def test_libero_benchmark_smoke(tmp_path):
    run_study("libero_benchmark", tmp_path, "-p", "suites", '["libero_spatial"]', "-p", "methods", '["dual_cache"]',
              "-p", "max_steps", "2")
    table = read_dataset(tmp_path / "libero_benchmark.nc").to_dataframe()
    assert list(table.method) == ["dual_cache"] and table["success rate"].between(0, 1).all()


def test_find_cliff_locates_the_largest_jump():
    table = pd.DataFrame({"parameter": "pixel_threshold", "method": "dual_cache",
                          "value": [0.0, 0.01, 0.03, 0.1], "action KL": [0.001, 0.002, 0.003, 0.5]})
    cliff = find_cliff(table).iloc[0]
    assert (cliff["from"], cliff["to"]) == (0.03, 0.1) and cliff["jump / median step"] > 100


def test_study_config_and_parameters_are_checked():
    with pytest.raises(ValueError, match="StudyConfig.methods: unknown \\['turbo'\\]"):
        StudyConfig(methods=["turbo"])
    with pytest.raises(ValueError, match="shipped suites"):
        StudyConfig(suites=["libero_100"])
    assert parse_value("[1, 3]") == [1, 3] and parse_value("0.03") == 0.03 and parse_value("small") == "small"
    assert cli(["run", "no_such_study"]) == 2


def test_stability_cliff_smoke(tmp_path):
    run_study("stability_cliff", tmp_path, "-p", "steps", "3", "-p", "thresholds", "[-1.0, 0.95, 1.01]",
              "-p", "modes", '["full", "vision_only", "synchronized"]')
    table = read_dataset(tmp_path / "stability_cliff.nc").to_dataframe().set_index(["mode", "threshold"])
    never = table.xs(1.01, level="threshold")  # a cosine similarity never exceeds 1: nothing reused, no drift
    assert (never["reuse rate"] == 0).all() and (never["action drift"] == 0).all() and (never["FLOPs ratio"] == 1).all()
    always = table.xs(-1.0, level="threshold")  # every inference after the first reuses
    assert (always["reuse rate"] == 2 / 3).all() and (always["action drift"] > 0).all()
    assert always.loc["full", "FLOPs ratio"] > always.loc["vision_only", "FLOPs ratio"] > 1
    names = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert {"stability_cliff.png", "stability_cliff_staleness.png", "stability_cliff_similarity.png"} <= names


def test_cliff_config_is_checked():
    from dcvla.studies import CliffConfig

    assert CliffConfig(preset="small").pi0_preset() == "pi0-small" and CliffConfig(preset="pi0").pi0_preset() == "pi0"
    with pytest.raises(ValueError, match="no Pi0 preset for 'huge'"):
        CliffConfig(preset="huge")
    with pytest.raises(ValueError, match="CliffConfig.modes: unknown \\['none'\\]"):
        CliffConfig(modes=["none"])
    with pytest.raises(ValueError, match="steps must be >= 2"):
        CliffConfig(steps=1)
