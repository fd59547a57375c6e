"""The stability cliff study (pi0, pi0.5 and SmolVLA prefix K/V reuse gated by frame similarity): its notebook run end
to end at tiny size, its configuration checked, its closed-loop success and the hypotheses decided from trials."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from dcvla.io import read_dataset
from dcvla.studies.speed import HZ, SPEEDUP
from dcvla.studies.stability_cliff import CliffConfig
from study_helpers import run_study


def test_stability_cliff_smoke(tmp_path):
    run_study("stability_cliff", tmp_path, "-p", "steps", "3", "-p", "thresholds", "[-1.0, 0.95, 1.01]",
              "-p", "modes", '["full", "vision_only", "synchronized"]', "-p", "max_ages", "[1, 2]",
              "-p", "pixel_thresholds", "[0.0, 1.0]", "-p", "success_trials", "1", "-p", "max_steps", "3",
              "-p", "success_runs", '["vision_only-cosine-0.95"]')
    table = read_dataset(tmp_path / "stability_cliff.nc").to_dataframe().set_index(["mode", "gate", "value"])
    played = table.dropna(subset=["success rate"])  # the run asked for (and the reference, apart), 3 steps: failures
    assert list(played.index) == [("vision_only", "cosine", 0.95)], played
    assert (played["trials"] == 1).all() and (played["success rate"] == 0).all()
    own = table.xs("cosine", level="gate")
    never = own.xs(1.01, level="value")  # a cosine similarity never exceeds 1: nothing reused, no drift
    assert (never["reuse rate"] == 0).all() and (never["action drift"] == 0).all() and (never["FLOPs ratio"] == 1).all()
    always = own.xs(-1.0, level="value")  # every inference after the first reuses
    assert (always["reuse rate"] == 2 / 3).all() and (always["action drift"] > 0).all()
    assert always.loc["full", "FLOPs ratio"] > always.loc["vision_only", "FLOPs ratio"] > 1
    assert table.loc[("synchronized", "synchronized", -1.0), "reuse rate"] == 2 / 3  # the mode's own gate
    ages = table.xs(("full", "max_age"), level=("mode", "gate"))["reuse rate"]
    assert ages.loc[1] == 0 and ages.loc[2] == 1 / 3  # interval 2 over 3 inferences: compute, reuse, compute
    pixels = table.xs(("full", "pixel_mae"), level=("mode", "gate"))["reuse rate"]
    assert pixels.loc[0.0] == 0 and pixels.loc[1.0] == 2 / 3  # any change refreshes / nothing does
    assert {"phase_aware"} <= set(table.index.get_level_values("gate"))
    assert "speedup" not in table and (table[SPEEDUP] > 0).all() and (table[HZ] > 0).all()  # from the timing unit
    names = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert {"stability_cliff.png", "stability_cliff_gates.png", "stability_cliff_staleness.png",
            "stability_cliff_similarity.png", "stability_cliff_success.png"} <= names


def test_stability_cliff_runs_pi05_and_a_lerobot_checkpoint(tmp_path):
    """pi0.5 by preset, and a lerobot checkpoint by directory (the tiny parity fixture with dcvla's tokenizer)."""
    from dcvla.pi0 import get_preset
    from dcvla.studies.stability_cliff import pi0_base

    run_study("stability_cliff", tmp_path, "-p", "preset", "pi05-tiny", "-p", "steps", "2", "-p", "thresholds", "[-1.0]",
              "-p", "modes", '["full"]', "-p", "gates", "[]")
    table = read_dataset(tmp_path / "stability_cliff.nc").to_dataframe()
    assert table["reuse rate"].tolist() == [0.5] and (table["gate"] == "cosine").all()
    runs = tmp_path / "runs" / "stability_cliff" / "pi05-tiny" / "full"
    assert read_dataset(next(runs.glob("*.nc"))).attrs["variant"] == "pi05"
    fixture = Path(__file__).parent / "fixtures" / "pi0_tiny"
    with pytest.raises(FileNotFoundError, match="no PaliGemma tokenizer in .*pi0_tiny"):
        pi0_base(CliffConfig(checkpoint=str(fixture)))
    tokenizer = Path(__file__).parents[1] / "dcvla" / "assets"
    assert get_preset("pi0-tiny").vocab_size > 320  # the fixture's vocabulary is the parity test's 320: give the preset
    with pytest.raises(Exception, match="does not fit"):
        pi0_base(CliffConfig(checkpoint=str(fixture), tokenizer=str(tokenizer)))


def test_stability_cliff_runs_smolvla_and_its_checkpoint(tmp_path):
    """SmolVLA by preset (the study's no-reuse reference is its within-call prefix cache), and a lerobot SmolVLA
    checkpoint by directory: the family is the one its config.json names."""
    from dcvla.smolvla import SmolVLAPolicy
    from dcvla.studies.stability_cliff import checkpoint_policy, pi0_base

    run_study("stability_cliff", tmp_path, "-p", "preset", "smolvla-tiny", "-p", "steps", "2", "-p", "thresholds",
              "[-1.0]", "-p", "modes", '["full", "state_only"]', "-p", "gates", "[]")
    table = read_dataset(tmp_path / "stability_cliff.nc").to_dataframe().set_index("mode")
    assert table.loc["full", "reuse rate"] == 0.5 and table.loc["full", "KV reuse"] == pytest.approx(0.5)
    assert 0 < table.loc["state_only", "KV reuse"] < 0.05  # one token of the prefix, at every layer
    runs = tmp_path / "runs" / "stability_cliff" / "smolvla-tiny" / "full"
    assert read_dataset(next(runs.glob("*.nc"))).attrs["family"] == "smolvla"
    fixture = Path(__file__).parent / "fixtures" / "smolvla_tiny"
    assert checkpoint_policy(str(fixture)) is SmolVLAPolicy
    with pytest.raises(FileNotFoundError, match="SmolVLA needs SmolVLM2's tokenizer"):
        pi0_base(CliffConfig(checkpoint=str(fixture)))
    tokenizer = Path(__file__).parents[1] / "dcvla" / "assets"
    with pytest.raises(Exception, match="names the VLM 'tiny-smolvlm2'; dcvla knows HuggingFaceTB/SmolVLM2-500M"):
        pi0_base(CliffConfig(checkpoint=str(fixture), tokenizer=str(tokenizer)))  # no preset for its VLM


def test_cliff_config_is_checked():
    assert CliffConfig(preset="small").pi0_preset() == "pi0-small" and CliffConfig(preset="pi05-small").pi0_preset() == "pi05-small"
    with pytest.raises(ValueError, match="no flow-matching preset or shipped micro policy for 'huge'; known: pi0, .*smolvla-micro-goal"):
        CliffConfig(preset="huge")
    with pytest.raises(ValueError, match="CliffConfig.modes: unknown \\['none'\\]"):
        CliffConfig(modes=["none"])
    with pytest.raises(ValueError, match="CliffConfig.gates: unknown \\['lucky'\\]"):
        CliffConfig(gates=["lucky"])
    with pytest.raises(ValueError, match="max_ages must be >= 1"):
        CliffConfig(max_ages=[0])
    with pytest.raises(ValueError, match="steps must be >= 2"):
        CliffConfig(steps=1)
    grid = CliffConfig(modes=["full"], thresholds=[0.9], gates=["max_age"], max_ages=[2, 3]).grid()
    assert grid == [("full", "cosine", 0.9), ("full", "max_age", 2), ("full", "max_age", 3)]


def test_stability_cliff_measures_closed_loop_success(tmp_path):
    """`success_trials`: every (mode, gate, value) and the reference run LIBERO trials with both cameras and the
    state; the table has one success rate per run, the reference's included (random weights: chance)."""
    from dcvla.studies.cliff_success import success_table, success_trials
    from dcvla.studies.stability_cliff import CliffConfig, pi0_base, run_label

    config = CliffConfig(preset="tiny", modes=["full"], thresholds=[0.9], gates=["max_age"], max_ages=[2],
                         suites=["libero_spatial"], success_trials=1, max_steps=10, runs_dir=str(tmp_path / "runs"))
    table = success_table(config, success_trials(config, pi0_base(config)))
    assert table[["mode", "gate"]].values.tolist() == [["none", ""], ["full", "cosine"], ["full", "max_age"]]
    assert table["success rate"].between(0, 1).all() and (table["trials"] == 1).all()
    assert (table["95% CI low"] <= table["success rate"]).all() and table["McNemar p"].iloc[0] == 1.0
    reuse = table.set_index("label")["closed-loop reuse"]  # recorded per inference in the trials' files
    assert reuse["none"] == 0 and reuse.between(0, 1).all() and reuse["full-cosine-0.9"] < 1  # the first computes
    files = sorted(p.parent.name for p in (tmp_path / "runs" / "stability_cliff_success" / "pi0-tiny").glob("*/*.nc"))
    assert files == sorted(run_label(*key) for key in [("none", "", None), ("full", "cosine", 0.9), ("full", "max_age", 2)])
    trials = success_trials(config)  # every unit complete: read back, nothing run
    assert list(trials.method.values) == list(table["label"]) and trials.sizes["trial"] == 1
    assert np.array_equal(trials.mean(["suite", "task", "seed", "trial"]).values, table["success rate"].values)


def test_closed_loop_trials_default_to_a_few_with_trained_weights_and_the_runs_asked_for():
    """success_trials -1: AUTO_TRIALS per run with a trained policy (a shipped micro policy by name), none with random
    weights; success_runs picks the runs that play them (the reference always does), and names a run not in the grid."""
    from dcvla.studies.stability_cliff import AUTO_TRIALS, success_units

    grid = dict(modes=["full", "vision_only"], thresholds=[0.98, 0.985], gates=[], suites=["libero_goal"])
    trained = CliffConfig(preset="smolvla-micro-goal", success_trials=-1, success_runs=["vision_only-cosine-0.985"], **grid)
    assert trained.trained() == "smolvla-micro-goal" and trained.model_name() == "smolvla-micro-goal"
    assert trained.trials() == AUTO_TRIALS >= 1
    units = success_units(trained)
    assert [(u.get("mode"), u.get("value"), u.trials) for u in units] == [("none", None, AUTO_TRIALS),
                                                                         ("vision_only", 0.985, AUTO_TRIALS)]
    assert units[0].get("task") == 8  # the policy's trained task, libero_goal's first listed
    assert CliffConfig(preset="tiny", success_trials=-1, **grid).trials() == 0  # random weights: chance, not played
    assert CliffConfig(preset="tiny", success_trials=2, **grid).trials() == 2  # unless asked for
    assert len(success_units(CliffConfig(preset="smolvla-micro-goal", success_trials=1, **grid))) == 5  # []: all
    with pytest.raises(ValueError, match=r"success_runs: \['full-cosine-0.99'\] are no runs of the grid; its runs: "
                                         r"full-cosine-0.98, full-cosine-0.985, vision_only"):
        CliffConfig(preset="smolvla-micro-goal", success_trials=-1, success_runs=["full-cosine-0.99"], **grid)
    with pytest.raises(ValueError, match="success_trials must be >= -1"):
        CliffConfig(success_trials=-2)


def test_gates_are_compared_with_cosine_at_equal_reuse():
    from dcvla.studies.stability_cliff import gates_at_equal_reuse

    rows = [("cosine", 0.98, 0.2, 0.02), ("cosine", 0.97, 0.6, 0.10), ("max_age", 2, 0.5, 0.12),
            ("pixel_mae", 0.01, 0.0, 0.0), ("pixel_mae", 0.04, 0.4, 0.03), ("max_age", 4, 0.9, 0.5)]
    table = pd.DataFrame([{"mode": "full", "gate": g, "value": v, "reuse rate": r, "action drift": d} for g, v, r, d in rows])
    out = gates_at_equal_reuse(table).set_index(["gate", "value"])
    assert list(out.index) == [("max_age", 2), ("pixel_mae", 0.04)]  # nothing reused, or past cosine's sweep: left out
    assert out.loc[("max_age", 2), "cosine drift at equal reuse"] == pytest.approx(0.08)  # between (0.2, .02), (0.6, .10)
    assert out.loc[("max_age", 2), "drift ratio"] == pytest.approx(1.5)
    assert out.loc[("pixel_mae", 0.04), "drift ratio"] == pytest.approx(0.5)


def test_the_cliff_hypotheses_are_decided_trial_by_trial():
    """Synthetic trials with known answers: full falls from 0.9 to 0 between 0.99 and 0.985 (9 trials won by 0.99
    alone: p = 2 / 2**9), vision_only's largest fall (3 trials) is not significant, synchronized never falls; at
    0.985 vision_only beats full on 6 trials (p = 2 / 2**6); a trial one run did not play is left out of its pairs."""
    from dcvla.studies.cliff_success import mode_against_mode, success_cliff
    from dcvla.success import paired
    from dcvla.studies.stability_cliff import run_label

    wins = {("none", "", None): 10, ("full", "cosine", 0.995): 10, ("full", "cosine", 0.99): 9,
            ("full", "cosine", 0.985): 0, ("vision_only", "cosine", 0.99): 9, ("vision_only", "cosine", 0.985): 6,
            ("synchronized", "synchronized", 0.99): 10, ("synchronized", "synchronized", 0.985): 10}
    labels = [run_label(*key) for key in wins]
    values = np.array([[1.0] * n + [0.0] * (10 - n) for n in wins.values()])
    values[labels.index("vision_only-cosine-0.99"), 9] = np.nan  # not played
    success = xr.DataArray(values[:, None, None, None, :], dims=("method", "suite", "task", "seed", "trial"),
                           coords={"method": labels, "suite": ["libero_goal"], "task": [8], "seed": [0]})
    runs = pd.DataFrame([{"mode": m, "gate": g, "value": v, "label": lab} for (m, g, v), lab in zip(wins, labels)][1:])
    cliff = success_cliff(success, runs).set_index("mode")
    assert cliff.loc["full", "verdict"] == "cliff between 0.99 and 0.985: success 0.90 -> 0.00"
    assert cliff.loc["full", "McNemar p"] == pytest.approx(2 / 2**9) and cliff.loc["full", "success at 0.995"] == 1
    assert cliff.loc["vision_only", "verdict"].endswith("is not significant")
    assert (cliff.loc["vision_only", "from"], cliff.loc["vision_only", "to"]) == ("0.99", 0.985)
    assert cliff.loc["synchronized", "verdict"] == "no fall in success over the sweep"
    h4 = mode_against_mode(success, runs, "full", "vision_only").set_index("threshold")
    assert list(h4.index) == [0.99, 0.985] and h4.loc[0.99, "paired trials"] == 9
    assert h4.loc[0.985, "verdict"] == f"vision_only-cosine-0.985 succeeds more (p = {2 / 2**6:.3g})"
    assert h4.loc[0.99, "verdict"].startswith("no significant difference")
    with pytest.raises(ValueError, match=r"no trials of \['turbo'\]"):
        paired(success, "none", "turbo")


def test_a_sweep_on_too_few_paired_trials_is_undecided_not_flat():
    """A grid stopped early: vision_only has played one trial per run. No outcome of one paired trial can reach
    p < 0.05 (six are needed: p = 2 / 2**6), so its verdict says undecided, not "no fall"; full's cliff (10 trials
    won by 0.99 alone) stands although its last run has played only 2 trials."""
    from dcvla.studies.cliff_success import success_cliff
    from dcvla.studies.stability_cliff import run_label

    played = {("none", "", None): [1] * 10, ("full", "cosine", 0.99): [1] * 10, ("full", "cosine", 0.985): [0] * 10,
              ("full", "cosine", 0.98): [0, 0], ("vision_only", "cosine", 0.99): [1], ("vision_only", "cosine", 0.985): [1]}
    labels = [run_label(*key) for key in played]
    values = np.array([trials + [np.nan] * (10 - len(trials)) for trials in played.values()])
    success = xr.DataArray(values[:, None, None, None, :], dims=("method", "suite", "task", "seed", "trial"),
                           coords={"method": labels, "suite": ["libero_goal"], "task": [8], "seed": [0]})
    runs = pd.DataFrame([{"mode": m, "gate": g, "value": v, "label": lab} for (m, g, v), lab in zip(played, labels)][1:])
    cliff = success_cliff(success, runs).set_index("mode")
    assert cliff.loc["full", "verdict"] == "cliff between 0.99 and 0.985: success 1.00 -> 0.00"
    assert cliff.loc["vision_only", "verdict"] == ("undecided: 1 paired trials between no reuse and 0.99 "
                                                   "(p < 0.05 needs at least 6)")
