"""Success statistics (dcvla.success): Wilson intervals and exact McNemar tests against published values, and the
per-method table the studies print."""

import numpy as np
import pytest
import xarray as xr
from scipy.stats import binomtest

from dcvla.success import fewest_decisive, mcnemar_exact, paired, success_summary, wilson_interval


@pytest.mark.parametrize("successes, trials, low, high", [  # Wilson (1927) score intervals, z = 1.96
    (0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (20, 20, 0.8389, 1.0), (12, 20, 0.3866, 0.7812)])
def test_wilson_interval(successes, trials, low, high):
    np.testing.assert_allclose(wilson_interval(successes, trials), (low, high), atol=1e-4)


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 <= successes <= trials"):
        wilson_interval(3, 2)


def test_mcnemar_exact_is_the_binomial_test_of_the_discordant_trials():
    a = np.array([1] * 8 + [0] * 2 + [1] * 5 + [0] * 5, bool)
    b = np.array([0] * 8 + [1] * 2 + [1] * 5 + [0] * 5, bool)
    only_a, only_b, p = mcnemar_exact(a, b)
    assert (only_a, only_b) == (8, 2)
    assert p == pytest.approx(binomtest(2, 10, 0.5).pvalue) == pytest.approx(112 / 1024)
    assert mcnemar_exact(a, a)[2] == 1.0


def test_fewer_paired_trials_than_can_reach_significance_decide_nothing():
    """Six trials all won by one side give p = 2 / 2**6 < 0.05, five give 0.0625: below six nothing can be decided,
    and `paired` says so instead of "no significant difference"."""
    assert fewest_decisive() == 6 and fewest_decisive(0.01) == 8
    assert mcnemar_exact(np.ones(6, bool), np.zeros(6, bool))[2] < 0.05 <= mcnemar_exact(np.ones(5, bool), np.zeros(5, bool))[2]
    for n, verdict in [(5, "too few paired trials to decide (5; p < 0.05 needs at least 6)"), (6, "a succeeds more (p = 0.0312)")]:
        success = xr.DataArray(np.array([[1.0] * n, [0.0] * n]), dims=("method", "trial"), coords={"method": ["a", "b"]})
        assert paired(success, "a", "b")["verdict"] == verdict


def test_success_summary_pairs_methods_on_the_same_trials():
    ref = [1, 1, 0, 0, 1, 0, 1, 1, 0, 1]
    run = [1, 0, 0, 0, 1, 0, 0, 1, 0, np.nan]  # the last trial not run: left out of the pair
    success = xr.DataArray(np.array([[ref], [run]], float)[:, :, None, :], dims=("method", "suite", "task", "trial"),
                           coords={"method": ["vanilla", "dual_cache"], "suite": ["libero_spatial"], "task": [0]})
    table = success_summary(success, "vanilla").set_index("method")
    row = table.loc["dual_cache"]
    assert (row["trials"], row["successes"], row["paired trials"]) == (9, 3, 9)
    assert row["success rate"] == pytest.approx(3 / 9)
    assert row["difference to vanilla"] == pytest.approx(3 / 9 - 5 / 9)
    assert (row["only this succeeded"], row["only vanilla succeeded"]) == (0, 2)
    assert row["McNemar p"] == pytest.approx(0.5)
    np.testing.assert_allclose([row["95% CI low"], row["95% CI high"]], wilson_interval(3, 9))
    assert table.loc["vanilla", "McNemar p"] == 1.0 and table.loc["vanilla", "trials"] == 10
    per_task = success_summary(success, "vanilla", by=("suite", "task"))
    assert per_task[["suite", "task"]].values.tolist() == [["libero_spatial", 0]] * 2
    with pytest.raises(ValueError, match="no 'none' trials"):
        success_summary(success, "none")


def test_the_dual_cache_is_held_against_vanilla_and_each_rival_the_run_played():
    from dcvla.studies.libero_benchmark import dual_cache_verdicts

    trials = {"vanilla":    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
              "vla_cache":  [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
              "ttf":        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1],
              "dual_cache": [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, np.nan]}  # its last trial not played
    results = xr.Dataset({"success": xr.DataArray(np.array(list(trials.values()), float)[:, None, None, :],
                                                  dims=("method", "suite", "task", "trial"),
                                                  coords={"method": list(trials), "suite": ["libero_goal"], "task": [8]})})
    table = dual_cache_verdicts(results).set_index("b")
    assert list(table.index) == ["vanilla", "vla_cache", "ttf"]  # ttf_vla_cache was not played
    assert (table["paired trials"] == 11).all()
    assert table.loc["vanilla", "verdict"].startswith("no significant difference")
    assert table.loc["vanilla", "kept"] == 1.0  # all 11 of vanilla's successes
    assert (table.loc["ttf", "only a"], table.loc["ttf", "only b"], table.loc["ttf", "both"]) == (10, 0, 1)
    assert table.loc["ttf", "McNemar p"] == pytest.approx(2 / 2**10)
    assert table.loc["ttf", "verdict"] == "dual_cache succeeds more (p = 0.00195)"
    assert table.loc["ttf", "kept"] == 1.0 and table.loc["vla_cache", "kept"] == 1.0
    ttf_first = results.assign(success=results.success.copy())
    ttf_first.success.loc[{"method": "dual_cache"}] = [0] * 10 + [1, 0]
    assert dual_cache_verdicts(ttf_first).set_index("b").loc["ttf", "kept"] == 0.5  # one of ttf's two successes
    assert dual_cache_verdicts(results.sel({"method": ["vanilla", "ttf"]})).empty  # no dual_cache


def _seeded(trials: dict[str, list[list[float]]], trajectories: dict[str, list[list[str]]]) -> xr.DataArray:
    """Success [method, seed, trial] with each trial's trajectory digest as a coordinate."""
    dims = ("method", "seed", "trial")
    return xr.DataArray(np.array(list(trials.values()), float), dims=dims,
                        coords={"method": list(trials), "seed": [0, 1, 2],
                                "trajectory": (dims, np.array(list(trajectories.values()), dtype=object))})


def test_a_trial_replayed_under_another_seed_counts_once():
    """A deterministic policy in a scene its init state fixes replays its trial under every seed: the replays add
    no trial to the interval and no discordant pair to McNemar's test; a seed that played otherwise does."""
    from dcvla.success import paired, replays

    success = _seeded({"vanilla": [[1, 1], [1, 1], [1, 1]], "dual_cache": [[1, 0], [1, 0], [1, 1]]},
                      {"vanilla": [["v0", "v1"], ["v0", "v1"], ["v0", "v1"]],
                       "dual_cache": [["d0", "d1"], ["d0", "d1"], ["d0", "x1"]]})  # seed 2, init state 1: new
    assert replays(success, "dual_cache").transpose("seed", "trial").values.tolist() == [
        [False, False], [True, True], [True, False]]
    assert replays(success, "vanilla").values.sum() == 4
    assert replays(success, "vanilla", "dual_cache").transpose("seed", "trial").values.tolist() == [
        [False, False], [True, True], [True, False]]
    table = success_summary(success, "vanilla").set_index("method")
    row = table.loc["dual_cache"]
    assert (row["trials"], row["successes"], row["replays left out"], row["paired trials"]) == (3, 2, 3, 3)
    assert (row["only this succeeded"], row["only vanilla succeeded"], row["McNemar p"]) == (0, 1, 1.0)
    assert (table.loc["vanilla", "trials"], table.loc["vanilla", "replays left out"]) == (2, 4)
    pair = paired(success, "dual_cache", "vanilla")
    assert (pair["paired trials"], pair["replays left out"], pair["only b"]) == (3, 3, 1)
    counted_twice = paired(success.drop_vars("trajectory"), "dual_cache", "vanilla")  # without the digests
    assert (counted_twice["paired trials"], counted_twice["only b"], counted_twice["replays left out"]) == (6, 2, 0)


def test_unrecorded_or_differing_trajectories_replay_nothing():
    from dcvla.success import replays

    success = _seeded({"a": [[1, 0]] * 3, "b": [[0, 1]] * 3},
                      {"a": [["", "p"], ["", "p"], ["", "p"]], "b": [["q", "r"], ["q", "s"], ["q", "r"]]})
    assert not replays(success, "a").sel(trial=0).any()  # "": not recorded
    assert replays(success, "a").sel(trial=1).values.tolist() == [False, True, True]
    assert replays(success, "a", "b").sel(trial=1).values.tolist() == [False, False, True]  # b's seed 1 is new
    assert not replays(success.drop_vars("trajectory"), "a").any()
    from dcvla.studies.cliff_success import rate

    assert rate(success, "a") == pytest.approx(3 / 4)  # trial 0 three times (unrecorded), trial 1's failure once
    assert rate(success.drop_vars("trajectory"), "a") == pytest.approx(3 / 6)
