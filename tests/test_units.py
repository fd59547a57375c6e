"""Units of work and their three runners (`dcvla.units`): in process, shards merged afterwards, and a local Ray cluster
(started and stopped here, two CPUs); the same parameters give the same results under all three, a worker killed
mid-unit leaves no partial file and the unit is run again, a unit's own error is reported by name."""

import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import torch

from dcvla import units as U
from dcvla.io import open_recording
from dcvla.studies import stability_cliff as SC
from dcvla.studies.speed import COLUMNS, load_timings

SLOW = Path(__file__).parent / "ray_helpers.py"


def cliff_config(runs: Path) -> SC.CliffConfig:
    return SC.CliffConfig(preset="pi0-tiny", steps=2, thresholds=[-1.0, 1.01], modes=["full", "vision_only"], gates=[],
                          suites=["libero_spatial"], runs_dir=str(runs / "runs"), figures_dir=str(runs / "figures"))


def deterministic(table: pd.DataFrame) -> pd.DataFrame:
    """A cliff table without the measured times (they differ from run to run on any machine)."""
    return table.drop(columns=list(COLUMNS)).reset_index(drop=True)


def table_of(config: SC.CliffConfig) -> pd.DataFrame:
    paths = {(u.get("mode"), u.get("gate"), u.get("value"), u.get("episode")): Path(u.path) for u in SC.cliff_units(config)}
    return deterministic(SC.cliff_table(SC.load_cliff_runs(paths), load_timings(SC.timing_units(config))))


def run_here(config: SC.CliffConfig) -> None:
    """Every unit of the study's plan (recordings and timings), in this process."""
    U.run_units(*SC.plan(vars(config)), runner=U.Runner(), progress=False)


def test_units_are_named_by_their_parameters_and_shards_partition_them(tmp_path):
    units, factory = SC.plan({"preset": "pi0-tiny", "steps": 2, "thresholds": [0.9], "modes": ["full"], "gates": [],
                              "suites": ["libero_spatial", "libero_goal"], "runs_dir": str(tmp_path)})
    assert factory[0] == "dcvla.studies.stability_cliff" and len(units) == 6  # (reference + 1 run + timing) x 2 episodes
    assert units[1].name == "stability_cliff[mode=full, gate=cosine, value=0.9, episode=libero_spatial/task00/init00]"
    assert units[4].name == "stability_cliff[timed_runs=2, episode=libero_spatial/task00/init00]"
    again, _ = SC.plan({"preset": "pi0-tiny", "steps": 2, "thresholds": [0.9], "modes": ["full"], "gates": [],
                        "suites": ["libero_spatial", "libero_goal"], "runs_dir": str(tmp_path)})
    assert again == units  # deterministic: a shard of one process is the shard of another
    shards = [U.shard(units, i, 3) for i in range(3)]
    assert sorted(sum(shards, []), key=units.index) == units and sum(map(len, shards)) == len(units)
    with pytest.raises(ValueError, match="a shard is 'I/N'"):
        U.parse_shard("3")
    with pytest.raises(ValueError, match="I must be in 0..N-1"):
        U.parse_shard("2/2")


def test_in_process_and_shards_give_the_same_results_and_merge_refuses_what_is_missing(tmp_path):
    here, sharded = cliff_config(tmp_path / "here"), cliff_config(tmp_path / "shards")
    run_here(here)
    todo, factory = SC.plan({**vars(sharded)})
    with pytest.raises(U.IncompleteUnits, match=f"{len(todo)} of {len(todo)} units are not complete"):
        U.run_units(todo, factory, U.Runner(merge=True), progress=False)
    for index in (1, 0):
        runner = U.Runner(shard=(index, 2))
        U.run_units(todo, factory, runner, progress=False)
        assert len(runner.done) == len(U.shard(todo, index, 2))
    U.run_units(todo, factory, U.Runner(merge=True), progress=False)  # complete: nothing to compute, no error
    pd.testing.assert_frame_equal(table_of(here), table_of(sharded))
    for a, b in zip(SC.cliff_units(here), SC.cliff_units(sharded)):
        assert np.array_equal(open_recording(a.path).action.values, open_recording(b.path).action.values)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster of two CPUs for this module; its workers import tests/ray_helpers.py."""
    ray = pytest.importorskip("ray")
    markers = tmp_path_factory.mktemp("markers")
    old = {k: os.environ.get(k) for k in ("PYTHONPATH", "DCVLA_TEST_MARKERS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SLOW.parent), old["PYTHONPATH"]]))
    os.environ["DCVLA_TEST_MARKERS"] = str(markers)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray, markers
    ray.shutdown()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_ray_gives_the_in_process_results_and_reports_a_units_own_error(ray_cluster, tmp_path):
    """The units on two Ray actors: the same files and tables as in process; a unit that raises for a reason of its
    own (an episode that does not exist) is reported by name after the others have completed, and leaves no file."""
    from dcvla.ray_runner import UnitFailed

    here, remote = cliff_config(tmp_path / "here"), cliff_config(tmp_path / "ray")
    run_here(here)
    todo, factory = SC.plan({**vars(remote)})
    bad = U.make_unit("stability_cliff", tmp_path / "bad.nc", mode="full", gate="cosine", value=-1.0,
                      episode="libero_spatial/task99/init00")
    with pytest.raises(UnitFailed, match=r"1 unit\(s\) failed: stability_cliff\[.*task99.*KeyError"):
        U.run_units([bad, *todo], factory, U.Runner(ray="local", num_workers=2), progress=False)
    assert all(u.complete() for u in todo) and not Path(bad.path).exists()
    pd.testing.assert_frame_equal(table_of(here), table_of(remote))
    assert not list(Path(remote.runs_dir).rglob("*.tmp"))


def test_a_worker_killed_mid_unit_leaves_no_partial_file_and_the_unit_runs_again(ray_cluster, tmp_path):
    ray, markers = ray_cluster
    from dcvla.ray_runner import run_on_ray, start_workers

    here, remote = cliff_config(tmp_path / "here"), cliff_config(tmp_path / "ray")
    run_here(here)
    todo, (_, config) = SC.plan({**vars(remote)})
    import ray_helpers

    workers = start_workers(ray, ("ray_helpers", config), num_workers=2)
    first = ray_helpers.key(todo[0])
    thread = threading.Thread(target=run_on_ray, args=(todo, ("ray_helpers", config), "auto"),
                              kwargs={"progress": False, "workers": workers})
    thread.start()
    deadline = time.monotonic() + 120
    while not list(markers.glob(f"{first}.*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    started = list(markers.glob(f"{first}.*"))
    assert started, "the first unit never started"
    pid = int(started[0].read_text())
    assert not Path(todo[0].path).exists()  # it sleeps before it records: killed mid-unit
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    runs = sorted(markers.glob(f"{first}.*"))
    assert len(runs) == 2 and int(runs[1].read_text()) != pid  # run again, by a restarted process
    assert all(u.complete() for u in todo) and not list(Path(remote.runs_dir).rglob("*.tmp"))
    pd.testing.assert_frame_equal(table_of(here), table_of(remote))


def test_the_command_line_shards_and_refuses_to_merge_what_is_missing(tmp_path, capsys):
    from dcvla.cli import main

    params = ["-p", "preset", "pi0-tiny", "-p", "steps", "2", "-p", "thresholds", "[-1.0]", "-p", "modes", '["full"]',
              "-p", "gates", "[]", "-p", "suites", '["libero_spatial"]', "-p", "runs_dir", str(tmp_path / "runs")]
    assert main(["run", "stability_cliff", *params, "--shard", "0/2"]) == 0
    out = capsys.readouterr().out
    assert "shard 0/2 ran 2 units; 2 of 3 complete" in out and "dcvla merge stability_cliff" in out  # and the timing
    assert main(["progress", "stability_cliff", *params, "--shards", "2"]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[:3] == ["stability_cliff: 2 of 3 units complete", "  shard 0/2: 2 of 2 units complete",
                          "  shard 1/2: 0 of 1 units complete"]
    assert report[3:] == ["  stability_cliff[mode=full, gate=cosine, value=-1.0, episode=libero_spatial/task00/init00]"
                          ": absent"]
    assert main(["merge", "stability_cliff", *params]) == 2
    assert "1 of 3 units are not complete (first: stability_cliff[mode=full" in capsys.readouterr().err
    assert main(["run", "explorer", "--shard", "0/2"]) == 2
    assert "explorer has no units to shard or send to Ray" in capsys.readouterr().err
    assert main(["run", "stability_cliff", *params, "--shard", "0/2", "--ray", "auto"]) == 2


def test_progress_counts_the_trials_each_file_holds_and_leaves_out_the_complete_units(tmp_path):
    from dcvla.io import write_dataset

    units = [U.make_unit("bench", tmp_path / f"{m}.nc", trials=4, method=m) for m in ("a", "b", "c")]
    units.append(U.make_unit("bench", tmp_path / "rec.nc", episode="e"))
    write_dataset(xr.Dataset(attrs={"trials_done": 4}), units[0].path)
    write_dataset(xr.Dataset({"wall_s": ("trial", [720.0])}, attrs={"trials_done": 1}), units[1].path)
    Path(units[2].path).write_text("not netCDF")  # unreadable: no trials (the worker says why when it resumes)
    assert [u.done() for u in units] == [4, 1, 0, 0] and [u.complete() for u in units] == [True, False, False, False]
    assert U.progress(units, shards=2).splitlines() == [
        # 3 trials of b left at b's 720 s, 4 of c at the mean of every trial played (b's: a has no wall times)
        "bench: 1 of 4 units complete; trials 5 of 12 (42%); ~1.4 h left",
        "  shard 0/2: 1 of 2 units complete; trials 4 of 8 (50%); ~0.8 h left",
        "  shard 1/2: 0 of 2 units complete; trials 1 of 4 (25%); ~0.6 h left",
        "  bench[method=b]: 1 of 4 trials", "  bench[method=c]: 0 of 4 trials", "  bench[episode=e]: absent"]
    write_dataset(xr.Dataset(attrs={"trials_done": 7}), units[1].path)  # more than asked: complete, counted as 4
    assert U.progress(units[:2]) == "bench: 2 of 2 units complete; trials 8 of 8 (100%)"


def test_a_partial_merge_tables_the_trials_played_so_far(tmp_path, capsys):
    """A grid under way: `merge` refuses units of trials not complete yet, `merge --partial` tables the trials their
    files hold (the recordings must be whole)."""
    from dcvla.cli import main
    from dcvla.io import read_dataset

    params = ["-p", "preset", "pi0-tiny", "-p", "steps", "2", "-p", "thresholds", "[-1.0]", "-p", "modes", '["full"]',
              "-p", "gates", "[]", "-p", "suites", '["libero_spatial"]', "-p", "max_steps", "3", "-p", "success_runs",
              "[]", "-p", "runs_dir", str(tmp_path / "runs"), "-p", "figures_dir", str(tmp_path / "figures")]
    threads = torch.get_num_threads()
    try:  # a shard's process on one thread: its trials record it
        assert main(["run", "stability_cliff", *params, "-p", "success_trials", "1", "--shard", "0/1",
                     "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    trial_files = [p for p in (tmp_path / "runs").rglob("*.nc") if "torch_threads" in read_dataset(p)]
    assert trial_files and all(read_dataset(p).torch_threads.values.tolist() == [1] for p in trial_files)
    for wrong in (["--threads", "1"], ["--shard", "0/1", "--threads", "0"]):  # no shard; no thread
        assert main(["run", "stability_cliff", *params, *wrong]) == 2
        assert f"--threads {wrong[-1]}: a shard's torch threads (at least 1), given with --shard" in capsys.readouterr().err
    more = [*params, "-p", "success_trials", "2"]  # one trial of two played per run
    capsys.readouterr()
    assert main(["merge", "stability_cliff", *more]) == 2
    assert "2 of 5 units are not complete" in capsys.readouterr().err
    assert main(["merge", "stability_cliff", *more, "--partial"]) == 0
    out = capsys.readouterr().out
    assert "[dcvla] partial merge of stability_cliff: 3 of 5 units complete; trials 2 of 4 (50%)" in out
    assert U.MERGE_ENV not in os.environ  # set for the notebook's kernel only: this process computes units again
    table = read_dataset(tmp_path / "stability_cliff.nc").to_dataframe()
    assert table["trials"].dropna().tolist() == [1]  # full's one trial of two (the reference's is apart)
    rm = tmp_path / "runs" / "stability_cliff" / "pi0-tiny" / "full"
    for path in rm.glob("*.nc"):
        path.unlink()  # a recording missing: no merge, partial or not
    assert main(["merge", "stability_cliff", *more, "--partial"]) == 2
    assert "1 of 5 units are not complete (first: stability_cliff[mode=full" in capsys.readouterr().err


def test_sweep_runs_every_combination_and_summarises_them(tmp_path):
    from dcvla.cli import main
    from dcvla.io import read_dataset

    assert main(["sweep", "stability_cliff", "-p", "preset", '["pi0-tiny"]', "-p", "thresholds", "[[-1.0], [1.01]]",
                 "-p", "steps", "[2]", "-p", "modes", '[["full"]]', "-p", "gates", "[[]]", "-p", "suites",
                 '[["libero_spatial"]]', "--sweep-dir", str(tmp_path)]) == 0
    folders = sorted(p for p in (tmp_path / "stability_cliff").iterdir() if p.is_dir())
    assert len(folders) == 2 and all((f / "stability_cliff.ipynb").exists() and (f / "stability_cliff.nc").exists()
                                     for f in folders)
    reuse = {f.name: float(read_dataset(f / "stability_cliff.nc")["reuse rate"].values[0]) for f in folders}
    assert sorted(reuse.values()) == [0.0, 0.5]  # threshold 1.01 never reuses; -1 reuses every inference after the first
    summary = tmp_path / "stability_cliff" / "sweep_summary.ipynb"
    assert summary.exists() and "2 combinations of stability_cliff" in summary.read_text()
    assert main(["sweep", "stability_cliff", "-p", "steps", "2"]) == 2  # a sweep parameter is a list of values


def test_a_study_runs_on_any_folder_of_recorded_episodes_and_any_suite(tmp_path):
    """A libero_90 pick-and-place episode recorded by the oracle (a few steps) into a folder of its own: the study
    takes that folder and suite; a suite the folder has no episode of is refused, naming what it has."""
    from dcvla.libero.episodes import episode_path, record_episode, save_episode

    folder = tmp_path / "episodes"
    episode = record_episode("libero_90", 9, max_steps=12)  # KITCHEN_SCENE1: put the black bowl on the plate
    save_episode(episode, episode_path(folder, "libero_90", episode.task_id, 0))
    config = SC.CliffConfig(preset="pi0-tiny", steps=2, thresholds=[-1.0], modes=["full"], gates=[],
                            suites=["libero_90"], episodes_dir=str(folder), runs_dir=str(tmp_path / "runs"))
    paths = SC.record_cliff_runs(config, progress=False)
    assert {key[3] for key in paths} == {episode.name} and all(p.exists() for p in paths.values())
    with pytest.raises(ValueError, match=r"no episodes of \['libero_goal'\] in .*episodes \(it has libero_90\)"):
        replace(config, suites=["libero_goal"]).__post_init__()
    with pytest.raises(ValueError, match="shipped suites"):
        SC.CliffConfig(suites=["libero_90"])
