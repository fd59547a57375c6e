"""The study notebooks: built from their jupytext sources (notebooks/*.py) into well-formed notebooks, and run end
to end through `dcvla run` at tiny size, writing their datasets and figures."""

import ast
import os
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from dcvla.cli import available_studies, main as cli, parse_value
from dcvla.io import read_dataset, write_dataset
from dcvla.notebooks import NOTEBOOKS, build_all, build_notebook, notebook_names
from dcvla.openvla import CacheConfig
from dcvla.studies.common import StudyConfig, find_cliff, suite_tasks
from dcvla.studies.libero_benchmark import BenchmarkConfig, benchmark_units
from dcvla.studies.speed import HZ, SPEEDUP, TOTAL
from dcvla.studies.stability_cliff import CliffConfig, success_units
from study_helpers import run_study


def test_the_quickstart_runs_end_to_end(tmp_path):
    """The first notebook the README points to: a policy, a cache method, a recording, the mask, the drift."""
    from dcvla.cli import run_study as execute

    out = execute("quickstart", {"frames": 4}, out=tmp_path / "quickstart.ipynb")
    cells = nbformat.read(out, as_version=4).cells
    text = "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "libero_spatial/task00/init00" in text and "4 frames, 256 patches; reuse rate" in text
    figures = [o for c in cells if c.cell_type == "code" for o in c.get("outputs", [])
               if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 2  # the mask over the image, the drift over frames


def test_mechanism_equivalence_verdicts(tmp_path):
    run_study("mechanism_equivalence", tmp_path, "-p", "frames", "4")
    table = read_dataset(tmp_path / "mechanism_equivalence.nc").to_dataframe()
    h0 = table[table.hypothesis.str.startswith("H0")]
    assert len(h0) == 7 and (h0.verdict == "holds").all(), h0[["compared", "max |output diff|"]]
    assert (table.output == "action-token logits").all()
    h1 = table[table.hypothesis.str.startswith("H1")]
    assert h1.verdict.str.startswith("holds").all() and (h1["max |output diff|"] <= 1e-4).all()
    # H4's verdict follows its numbers: consistent reuse (dual_cache) against stale vision fed to a fresh LLM
    h4 = table[table.hypothesis.str.startswith("H4")].set_index("compared")
    consistent, fresh = h4.loc["dual_cache vs vanilla", "mean action KL"], h4.loc["vit_kv_only vs vanilla", "mean action KL"]
    expected = "holds" if consistent < fresh else "does not hold"
    assert h4.verdict.str.endswith(f"consistency beats freshness: {expected}").all(), h4.verdict
    assert (tmp_path / "figures" / "mechanism_equivalence.png").stat().st_size > 10_000


OFT_TINY = ["-p", "preset", "oft-tiny", "-p", "suites", '["libero_spatial"]', "-p", "episodes_per_suite", "1"]


def run_oft_study(name: str, tmp_path, *params: str) -> None:
    assert cli(["run", name, *OFT_TINY, "-p", "runs_dir", str(tmp_path / "runs"), "-p", "figures_dir",
                str(tmp_path / "figures"), *params]) == 0


def test_mechanism_equivalence_on_openvla_oft(tmp_path):
    """The study on OpenVLA-OFT (both images and the state per frame, bidirectional attention): equality judged on
    the L1 head's chunk, H0 and H1/H2 hold, drift is the chunk's L1."""
    run_oft_study("mechanism_equivalence", tmp_path, "-p", "frames", "3")
    table = read_dataset(tmp_path / "mechanism_equivalence.nc").to_dataframe()
    assert (table.output == "normalised action chunk (L1 head)").all() and table["token mismatch rate"].isna().all()
    h0, h1 = table[table.hypothesis.str.startswith("H0")], table[table.hypothesis.str.startswith("H1")]
    assert len(h0) == 7 and (h0.verdict == "holds").all(), h0[["compared", "max |output diff|"]]
    assert h1.verdict.str.startswith("holds").all() and (h1["max |output diff|"] <= 1e-4).all()
    h4 = table[table.hypothesis.str.startswith("H4")].set_index("compared")
    assert (h4["mean action L1"] > 0).all() and "mean action KL" not in table
    h3 = table[table.hypothesis.str.startswith("H3 dual_cache vs TTF")]
    assert "150 static, 100 most attended removed per image" in h3.verdict.item()
    runs = sorted((tmp_path / "runs" / "mechanism_equivalence" / "dual_cache").glob("*.nc"))
    ds = read_dataset(runs[0])
    assert ds.attrs["family"] == "openvla-oft" and ds.sizes["patch"] == 512 and ds.action.dims == ("frame", "chunk", "action_dim")


def test_cache_behaviour_and_long_horizon_on_openvla_oft(tmp_path):
    # oft-micro: towers in 28 px patches, 8 x 8 an image; the tables and the mask over the images take its own grid
    run_oft_study("cache_behaviour", tmp_path, "-p", "preset", "oft-micro", "-p", "frames", "3",
                  "-p", "methods", '["vanilla", "vla_cache", "dual_cache"]')
    table = read_dataset(tmp_path / "cache_behaviour.nc").to_dataframe().set_index("method")
    assert table.loc["vanilla", "action L1"] == 0 and table.loc["dual_cache", "FLOPs ratio"] > 1.0
    assert 0 < table.loc["dual_cache", "LLM reuse rate"] < 1 and table.loc["dual_cache", "action drift"] > 0
    assert {"cache_behaviour_mask.png", "cache_behaviour_savings.png"} <= {p.name for p in (tmp_path / "figures").glob("*.png")}
    run_oft_study("long_horizon_stability", tmp_path, "-p", "frames", "3", "-p", "sweep_frames", "2",
                  "-p", "sweep_methods", '["dual_cache"]', "-p", "keyframe_intervals", "[1, 3]",
                  "-p", "pixel_thresholds", "[0.03]", "-p", "attention_top_ks", "[70]")
    sweeps = read_dataset(tmp_path / "long_horizon_stability.nc").to_dataframe()
    fresh = sweeps[(sweeps.parameter == "keyframe_interval") & (sweeps.value == 1)]
    assert (fresh["action L1"] == 0).all() and (fresh["reuse rate"] == 0).all()


def test_cache_behaviour_writes_table_and_figures(tmp_path):
    run_study("cache_behaviour", tmp_path, "-p", "frames", "3", "-p", "methods", '["vanilla", "dual_cache"]')
    table = read_dataset(tmp_path / "cache_behaviour.nc").to_dataframe().set_index("method")
    assert table.loc["vanilla", "FLOPs ratio"] == 1.0 and table.loc["dual_cache", "FLOPs ratio"] > 1.0
    assert 0 < table.loc["dual_cache", "LLM reuse rate"] < 1
    # one mask for every tower and every LLM layer: the LLM's reuse is the mask's (padded layers excluded)
    assert table.loc["dual_cache", "LLM reuse rate"] == pytest.approx(table.loc["dual_cache", "reuse rate"])
    names = {p.name for p in (tmp_path / "figures").glob("*.png")}
    assert {"cache_behaviour_reuse_by_suite.png", "cache_behaviour_mask.png", "cache_behaviour_savings.png"} <= names
    # the speed columns come from the episode's timing unit (both methods interleaved), and the table says so
    (timed,) = (tmp_path / "runs" / "cache_behaviour" / "timing").glob("*.nc")
    assert read_dataset(timed).latency_ms.dims == ("run", "frame") and table.loc["vanilla", SPEEDUP] == 1.0
    assert "measured speedup" not in table and table.loc["dual_cache", TOTAL] > 0
    assert "interleaved frame by frame in a rotating order" in read_dataset(tmp_path / "cache_behaviour.nc").attrs["speed"]


def test_long_horizon_sweeps_and_cliff(tmp_path):
    run_study("long_horizon_stability", tmp_path, "-p", "suites", '["libero_10"]', "-p", "frames", "6",
              "-p", "sweep_frames", "4", "-p", "keyframe_intervals", "[1, 3]", "-p", "pixel_thresholds", "[0.03, 1.0]",
              "-p", "attention_top_ks", "[70, 256]")
    sweeps = read_dataset(tmp_path / "long_horizon_stability.nc").to_dataframe()
    assert set(sweeps.parameter) == {"keyframe_interval", "pixel_threshold", "attention_top_k"}
    every_frame_fresh = sweeps[(sweeps.parameter == "keyframe_interval") & (sweeps.value == 1)]
    assert (every_frame_fresh["action KL"] == 0).all() and (every_frame_fresh["reuse rate"] == 0).all()


def test_libero_benchmark_smoke(tmp_path):
    from dcvla.libero.evaluate import result_path

    # an earlier run's file in the same folder (another method, more init states) stays out of this run's table
    earlier = xr.Dataset({"success": ("trial", np.ones(3, np.int8)), "steps": ("trial", np.full(3, 2, np.int32))},
                         coords={"trial": [0, 1, 2], "step": [0, 1]},
                         attrs={"method": "vla_cache", "suite": "libero_spatial", "task_id": 0})
    write_dataset(earlier, result_path(tmp_path / "runs" / "libero_benchmark", "vla_cache", "libero_spatial", 0))
    run_study("libero_benchmark", tmp_path, "-p", "suites", '["libero_spatial"]', "-p", "methods", '["dual_cache"]',
              "-p", "max_steps", "2")
    table = read_dataset(tmp_path / "libero_benchmark.nc").to_dataframe().set_index("method")
    assert list(table.index) == ["dual_cache"] and table["success rate"].between(0, 1).all()
    assert table.loc["dual_cache", "trials"] == 2  # the notebook's two init states (the earlier file is another method's)
    assert (table["95% CI low"] <= table["success rate"]).all() and (table["success rate"] <= table["95% CI high"]).all()
    assert table.loc["dual_cache", "McNemar p"] == 1.0  # without vanilla, against itself (tests/test_success.py pairs)


def test_figure_export_retries_kaleidos_unready_page_only(tmp_path):
    from dcvla.studies.common import KALEIDO_TRIES, save_figure

    class Figure:
        def __init__(self, errors):
            self.errors, self.calls = list(errors), 0

        def write_image(self, path, **kwargs):
            self.calls += 1
            if self.errors:
                raise self.errors.pop(0)
            Path(path).write_bytes(b"png")

    unready = RuntimeError("JavascriptError: ReferenceError: kaleido_scopes is not defined")
    fig = Figure([unready])
    assert save_figure(fig, "a", tmp_path).read_bytes() == b"png" and fig.calls == 2
    with pytest.raises(RuntimeError, match="kaleido_scopes"):
        save_figure(Figure([unready] * KALEIDO_TRIES), "b", tmp_path)
    other = Figure([ValueError("chromium not found")])
    with pytest.raises(ValueError, match="chromium"):
        save_figure(other, "c", tmp_path)
    assert other.calls == 1


def timings_of(latency: dict[str, list[float]], episode: str) -> xr.Dataset:
    """What a timing unit writes (`dcvla.timing.paired_latency`), with the given per-run latencies."""
    return xr.Dataset({"latency_ms": (("run", "frame"), np.array(list(latency.values())))},
                      coords={"run": list(latency), "frame": np.arange(len(next(iter(latency.values()))))},
                      attrs={"device": "cpu", "dtype": "float32", "torch_threads": 1, "warmup_frames": 2, "episode": episode})


def test_the_speedups_come_from_the_interleaved_timings_not_the_recordings(tmp_path):
    """The recordings say each cache is 100x slower than the reference (recorded under another load); the paired
    timings say 2x and 2.5x faster on the two frames: the tables' speedups are the median of the paired ratios and the
    ratio of the totals, and the tables say how they were measured."""
    from dcvla.studies import cache_behaviour, common
    from dcvla.studies import stability_cliff as SC

    config = StudyConfig(preset="tiny", suites=["libero_goal"], episodes_per_suite=1, frames=2,
                         methods=["vanilla", "dual_cache"], runs_dir=str(tmp_path / "runs"))
    runs = [ds.assign(latency_ms=ds.latency_ms * (100 if ds.attrs["method"] == "dual_cache" else 1))
            for ds in common.load_runs(common.record_runs("cache_behaviour", config, progress=False))]
    episode = str(runs[0].episode.item())
    table = cache_behaviour.summary(runs, [timings_of({"vanilla": [10.0, 10.0], "dual_cache": [5.0, 4.0]}, episode)])
    assert table.loc["dual_cache", SPEEDUP] == pytest.approx(2.25) and table.loc["dual_cache", TOTAL] == pytest.approx(20 / 9)
    assert "median over frames of the paired latency ratio vanilla / run" in table.attrs["speed"]
    assert "2 frames per run from 1 episode(s), cpu float32, 1 torch threads" in table.attrs["speed"]
    with pytest.raises(ValueError, match=r"the timings hold no \['dual_cache'\]"):
        cache_behaviour.summary(runs, [timings_of({"vanilla": [10.0, 10.0]}, episode)])

    cliff = CliffConfig(preset="pi0-tiny", steps=2, thresholds=[-1.0], modes=["full"], gates=[],
                        suites=["libero_goal"], runs_dir=str(tmp_path / "runs"))
    recorded = {key: ds.assign(latency_ms=ds.latency_ms * (1 if key[0] == "none" else 100))
                for key, ds in SC.load_cliff_runs(SC.record_cliff_runs(cliff, progress=False)).items()}
    table = SC.cliff_table(recorded, [timings_of({"none": [8.0, 8.0], "full-cosine--1": [8.0, 2.0]}, episode)])
    assert table[[SPEEDUP, TOTAL, HZ]].values.tolist() == [[2.5, 1.6, 200.0]]
    assert "paired latency ratio none / run" in table.attrs["speed"]


def test_find_cliff_locates_the_largest_jump():
    table = pd.DataFrame({"parameter": "pixel_threshold", "method": "dual_cache",
                          "value": [0.0, 0.01, 0.03, 0.1], "action KL": [0.001, 0.002, 0.003, 0.5]})
    cliff = find_cliff(table).iloc[0]
    assert (cliff["from"], cliff["to"]) == (0.03, 0.1) and cliff["jump / median step"] > 100
    one_jump = table.assign(**{"action KL": [0.0, 0.0, 0.0, 0.5]})
    assert find_cliff(one_jump).iloc[0]["jump / median step"] == float("inf")
    flat = table.assign(**{"action KL": 0.0})  # nothing reused anywhere on the sweep: no jump at all
    assert np.isnan(find_cliff(flat).iloc[0]["jump / median step"])


def test_study_config_and_parameters_are_checked():
    with pytest.raises(ValueError, match="StudyConfig.methods: unknown \\['turbo'\\]"):
        StudyConfig(methods=["turbo"])
    with pytest.raises(ValueError, match="shipped suites"):
        StudyConfig(suites=["libero_100"])
    assert parse_value("[1, 3]") == [1, 3] and parse_value("0.03") == 0.03 and parse_value("small") == "small"
    assert cli(["run", "no_such_study"]) == 2


def test_benchmark_config_is_checked():
    assert BenchmarkConfig().max_steps == 10 and BenchmarkConfig(tasks=[0, 3]).tasks == [0, 3]
    units = benchmark_units(BenchmarkConfig(suites=["libero_goal", "libero_10"]))
    trained = [(u.get("suite"), u.get("task")) for u in units]
    assert trained == [("libero_goal", 8), ("libero_10", 4)] * 2  # no tasks given: each suite's trained one, per method
    cliff = CliffConfig(suites=["libero_goal"], success_trials=1, modes=["full"], thresholds=[0.99], gates=[])
    assert {(u.get("suite"), u.get("task")) for u in success_units(cliff)} == {("libero_goal", 8)}
    with pytest.raises(ValueError, match=r"no trained task in \['libero_90'\] .*: name the task ids"):
        suite_tasks(["libero_goal", "libero_90"], [])
    assert suite_tasks(["libero_90"], [3]) == [("libero_90", 3)]
    with pytest.raises(ValueError, match="BenchmarkConfig.methods: unknown \\['turbo'\\]"):
        BenchmarkConfig(methods=["turbo"])
    with pytest.raises(ValueError, match="BenchmarkConfig.suites: unknown"):
        BenchmarkConfig(suites=["libero_100"])
    with pytest.raises(ValueError, match="task ids >= 0"):
        BenchmarkConfig(tasks=[-1])
    with pytest.raises(ValueError, match="trials must be >= 1"):
        BenchmarkConfig(trials=0)
    with pytest.raises(ValueError, match="trials_per_unit >= 0"):
        BenchmarkConfig(trials_per_unit=-1)


def test_a_benchmark_grid_runs_in_blocks_of_init_states():
    """trials_per_unit: a unit (and a file) per block of init states, every method's first block first, so shards
    share a task's trials evenly and a grid stopped early has played the same init states under every method."""
    grid = dict(methods=["vanilla", "dual_cache"], suites=["libero_goal"], trials=5)
    assert BenchmarkConfig(**grid, trials_per_unit=2).blocks() == [range(0, 2), range(2, 4), range(4, 5)]
    units = benchmark_units(BenchmarkConfig(**grid, trials_per_unit=2))
    assert [(u.get("method"), u.get("first"), u.trials) for u in units] == [
        ("vanilla", 0, 2), ("dual_cache", 0, 2), ("vanilla", 2, 2), ("dual_cache", 2, 2), ("vanilla", 4, 1),
        ("dual_cache", 4, 1)]
    assert Path(units[2].path).name == "libero_goal_task08_trials02-03.nc" and Path(units[2].path).parent.name == "vanilla"
    whole = benchmark_units(BenchmarkConfig(**grid))
    assert benchmark_units(BenchmarkConfig(**grid, trials_per_unit=5)) == whole  # one block: the one file per method
    assert Path(whole[0].path).name == "libero_goal_task08.nc" and whole[0].trials == 5


@pytest.mark.parametrize("config, fields_, message", [
    (StudyConfig, {"frames": "5"}, "StudyConfig.frames must be an int, got '5' (str)"),
    (StudyConfig, {"frames": 2.5}, "StudyConfig.frames must be an int, got 2.5"),
    (StudyConfig, {"methods": "dual_cache"}, "StudyConfig.methods must be a list of str, got 'dual_cache'"),
    (StudyConfig, {"drift": "yes"}, "StudyConfig.drift must be True or False"),
    (StudyConfig, {"device": "cdua"}, "StudyConfig.device: 'cdua' is not a torch device"),
    (StudyConfig, {"dtype": "flaot32"}, "StudyConfig.dtype: 'flaot32' is not a model dtype"),
    (StudyConfig, {"preset": "nosuch"}, "StudyConfig.preset: unknown preset 'nosuch'; OpenVLA presets: openvla-7b, small, openvla-micro, tiny; "
                                         "OpenVLA-OFT presets: openvla-oft-7b, oft-small, oft-tiny, oft-micro, or a shipped micro policy: "),
    (BenchmarkConfig, {"trials": "2"}, "BenchmarkConfig.trials must be an int"),
    (BenchmarkConfig, {"tasks": 0}, "BenchmarkConfig.tasks must be a list of ints, got 0"),
    (CliffConfig, {"thresholds": 0.9}, "CliffConfig.thresholds must be a list of numbers, got 0.9"),
    (CliffConfig, {"steps": "3"}, "CliffConfig.steps must be an int"),
    (CliffConfig, {"device": "cdua"}, "CliffConfig.device: 'cdua' is not a torch device"),
    (CliffConfig, {"dtype": "half-ish"}, "CliffConfig.dtype: 'half-ish' is not a model dtype"),
])
def test_a_config_field_of_the_wrong_type_or_a_typo_is_named(config, fields_, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config(**fields_)


def test_config_checks_accept_what_fits():
    config = StudyConfig(methods=("vanilla",), frames=np.int64(3))
    assert config.methods == ["vanilla"] and config.frames == 3  # a tuple becomes a list, a numpy int is an int
    assert StudyConfig(preset="nosuch", checkpoint="/some/checkpoint").preset == "nosuch"  # a checkpoint names the model
    assert CliffConfig(thresholds=[-1, 0.5]).thresholds == [-1, 0.5]  # ints are numbers
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="StudyConfig.device: 'cuda', but torch sees no CUDA device"):
            StudyConfig(device="cuda")


def test_cache_config_names_a_field_of_the_wrong_type():
    with pytest.raises(ValueError, match=re.escape("CacheConfig.prune_layers must be a list or tuple of LLM layer ids, got 3")):
        CacheConfig(prune_layers=3)
    with pytest.raises(ValueError, match="CacheConfig.faithful must be True or False, got 'yes'"):
        CacheConfig(faithful="yes")
    with pytest.raises(ValueError, match="CacheConfig.unnorm_key must be a dataset name"):
        CacheConfig(unnorm_key=3)


# ------------------------------------------------------------------------------------ notebooks from source
# The config dataclass each notebook builds with `<Config>.from_parameters(globals())`: its parameters cell has the
# dataclass's field names, less the fields the study does not read and plus its own notebook-level parameters.
PARAMETERS = {
    "cache_behaviour": (StudyConfig, set(), set()),
    # equivalence_tests records the methods each hypothesis needs, without a shadow recompute
    "mechanism_equivalence": (StudyConfig, {"methods", "drift"}, set()),
    # the sweeps (long_horizon_stability.sweep) run on a copy of the config with these
    "long_horizon_stability": (StudyConfig, set(), {"sweep_methods", "sweep_frames", "keyframe_intervals",
                                                    "pixel_thresholds", "attention_top_ks"}),
    "libero_benchmark": (BenchmarkConfig, set(), set()),
    "stability_cliff": (CliffConfig, set(), set()),
}


def assigned_names(source: str) -> list[str]:
    """The names a cell's top-level statements assign (imports excluded), in order."""
    names = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, nbformat.NotebookNode]:
    """Every notebooks/*.py source built into an .ipynb in a scratch copy of notebooks/ (the repo's untouched)."""
    scratch = tmp_path_factory.mktemp("notebooks")
    for source in NOTEBOOKS.glob("*.py"):
        shutil.copy(source, scratch / source.name)
    paths = build_all(scratch)
    assert [p.name for p in paths] == [f"{name}.ipynb" for name in notebook_names()]
    return {p.stem: nbformat.read(p, as_version=4) for p in paths}


def test_every_study_is_a_source_and_no_notebook_is_committed():
    names = notebook_names()
    assert set(PARAMETERS) | {"explorer", "sweep_summary", "quickstart"} == set(names) == set(available_studies())
    if (NOTEBOOKS.parent / ".git").exists():  # check-ignore answers 1 for a tracked file: generated, not committed
        ipynb = [f"notebooks/{name}.ipynb" for name in names]
        ignored = subprocess.run(["git", "check-ignore", *ipynb], cwd=NOTEBOOKS.parent, capture_output=True, text=True)
        assert ignored.stdout.split() == ipynb, "the .ipynb are generated from the .py: git-ignored, not committed"


@pytest.mark.parametrize("name", sorted(PARAMETERS) + ["explorer"])
def test_notebook_source_builds_with_real_markdown_and_parameters(built, name):
    nb = built[name]
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3" and "jupytext" not in nb.metadata
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ") and "\n\n" in first.source, \
        "the first cell is the title heading and an intro"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code)
    # a markdown piece written as code (the old `md ## ...` / `#md` cells) would show as plain text or a comment
    for cell in nb.cells:
        lines = cell.source.lstrip().splitlines() or [""]
        assert not lines[0].startswith(("md ", "#md", "# md", "%%")), f"{name}: not a real markdown cell:\n{cell.source}"
        if cell.cell_type == "code":
            assert not all(line.startswith("#") for line in cell.source.splitlines()), \
                f"{name}: a code cell of comments only (a markdown cell?):\n{cell.source}"
            ast.parse(cell.source)  # every code cell is Python on its own
    parameters = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and parameters[0] is nb.cells[1] and parameters[0].cell_type == "code"
    names = assigned_names(parameters[0].source)
    assert len(names) == len(set(names)), f"{name}: a parameter assigned twice: {names}"
    if name == "explorer":
        assert names == ["runs_dir"]
        return
    config, unread, extra = PARAMETERS[name]
    assert set(names) == {f.name for f in fields(config)} - unread | extra
    assert f"{config.__name__}.from_parameters(globals())" in nb.cells[2].source


def test_build_notebook_writes_only_when_the_source_changes(tmp_path):
    shutil.copy(NOTEBOOKS / "explorer.py", tmp_path / "explorer.py")
    path = build_notebook("explorer", tmp_path)
    assert path == tmp_path / "explorer.ipynb"
    stamp = path.stat().st_mtime_ns
    os.utime(path, ns=(stamp - 10**9, stamp - 10**9))
    assert build_notebook("explorer", tmp_path).stat().st_mtime_ns == stamp - 10**9, "unchanged: not rewritten"
    source = (tmp_path / "explorer.py").read_text().replace("# # dcvla explorer", "# # dcvla explorer (edited)")
    (tmp_path / "explorer.py").write_text(source)
    assert nbformat.read(build_notebook("explorer", tmp_path), as_version=4).cells[0].source.startswith("# dcvla explorer (edited)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explorer.ipynb", "explorer.py"]  # no temporary left
    with pytest.raises(FileNotFoundError, match="no notebook source"):
        build_notebook("no_such_notebook", tmp_path)


