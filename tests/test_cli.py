"""The command line on bad input: `dcvla run`/`dcvla studies` check -p names and types against the notebook's
parameters cell before anything runs, an exception inside a study is one `dcvla: error:` line, `dcvla predict` names
the input at fault. Every error exits with status 2. Only the notebook-exception test executes a notebook."""

import numpy as np
import papermill
import pytest

from dcvla import notebooks
from dcvla.cli import PAPER_SET, available_studies, cli_parameters, main as cli
from dcvla.notebooks import notebook_parameters


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fails the test if a notebook were built or executed; returns the parameters papermill would have got."""
    calls = []

    def execute(source, out, parameters=None, **kw):
        calls.append(parameters)

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    monkeypatch.setattr(notebooks, "build_notebook", lambda name, directory=None: f"{name}.ipynb")
    return calls


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("dcvla: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_an_unknown_parameter_fails_before_anything_runs(nothing_runs, capsys):
    assert cli(["run", "cache_behaviour", "-p", "framez", "3"]) == 2
    line = error_of(capsys)
    assert "cache_behaviour: unknown parameter 'framez' (did you mean frames?)" in line
    assert "notebooks/cache_behaviour.py" in line and "preset, checkpoint" in line and "drift" in line
    assert cli(["run", "cache_behaviour", "-p", "framez", "3", "-p", "methds", "[]"]) == 2
    assert "'framez' (did you mean frames?), 'methds' (did you mean methods?)" in error_of(capsys)
    assert nothing_runs == []


@pytest.mark.parametrize("name, value, wanted", [
    ("frames", "abc", "frames must be an int, got 'abc' (str); its default in notebooks/cache_behaviour.py is 5"),
    ("frames", "2.5", "frames must be an int, got 2.5"),
    ("drift", "1", "drift must be True or False, got 1"),
    ("suites", "libero_10", """suites must be a list, got 'libero_10' (str)"""),
    ("methods", "[1]", "methods must be a list of str items, got [1]"),
])
def test_a_value_of_another_type_than_the_default_fails(nothing_runs, capsys, name, value, wanted):
    assert cli(["run", "cache_behaviour", "-p", name, value]) == 2
    line = error_of(capsys)
    assert line.startswith("dcvla: error: cache_behaviour: parameter ") and wanted in line
    if name == "suites":
        assert """-p suites '["libero_10"]'""" in line
    assert nothing_runs == []


def test_values_that_fit_are_passed_as_typed(nothing_runs, tmp_path):
    runs = str(tmp_path / "runs")
    assert cli(["run", "stability_cliff", "-p", "thresholds", "[-1, 0.95]", "-p", "steps", "3", "-p", "runs_dir", runs,
                "-p", "compare_to", "anchor", "-p", "preset", '"tiny"']) == 0
    assert cli(["run", "cache_behaviour", "-p", "unnorm_key", "2024", "-p", "runs_dir", runs]) == 0
    assert nothing_runs == [{"thresholds": [-1, 0.95], "steps": 3, "runs_dir": runs, "compare_to": "anchor", "preset": "tiny"},
                            {"unnorm_key": "2024", "runs_dir": runs}]  # a str parameter takes the text as typed


@pytest.mark.parametrize("study", sorted(set(available_studies())))
def test_every_default_passes_its_own_check(study):
    """Each notebook's defaults, typed back on the command line, are accepted unchanged: the rules fit them all."""
    defaults = notebook_parameters(study)
    assert defaults, f"{study} has no parameters cell"
    typed = [(name, d if isinstance(d, str) else repr(d)) for name, d in defaults.items()]
    assert cli_parameters(typed, study) == defaults


def test_studies_checks_every_parameter_before_the_first_study(nothing_runs, capsys):
    assert cli(["studies", "-p", "framez", "3"]) == 2
    line = error_of(capsys)
    assert "studies: unknown parameter 'framez' (did you mean frames?)" in line and "stability_cliff" in line
    assert cli(["studies", "-p", "preset", "tiny", "-p", "steps", "x"]) == 2  # steps: stability_cliff's, the last study
    assert "stability_cliff: parameter steps must be an int, got 'x'" in error_of(capsys)
    assert nothing_runs == []
    assert set(PAPER_SET) <= set(available_studies())


def test_an_unknown_study_suggests_the_closest(capsys):
    assert cli(["run", "cache_behaviour.py"]) == 2
    assert "unknown study 'cache_behaviour.py'; did you mean cache_behaviour?" in error_of(capsys)


def test_an_exception_in_a_study_is_one_line_naming_notebook_cell_and_error(tmp_path, capsys):
    args = ["run", "cache_behaviour", "-p", "preset", "tiny", "-p", "methods", '["no_such_method"]',
            "-p", "runs_dir", str(tmp_path / "runs"), "-p", "figures_dir", str(tmp_path / "figures")]
    assert cli(args) == 2
    err = capsys.readouterr().err
    executed = tmp_path / "studies" / "cache_behaviour.ipynb"
    line = next(line for line in err.splitlines() if line.startswith("dcvla: error: "))
    assert line.startswith(f"dcvla: error: cache_behaviour (notebook {executed}, cell ")
    assert line.endswith("): ValueError: StudyConfig.methods: unknown ['no_such_method']; known: " + line.split("known: ")[-1])
    assert f"the full traceback is in {executed}" in err and "Traceback" not in err and "PapermillExecutionError" not in err
    assert executed.exists() and "no_such_method" in executed.read_text()


# --------------------------------------------------------------------------------------------------- predict
def test_predict_names_a_bad_image(tmp_path, capsys):
    assert cli(["predict", "--image", str(tmp_path / "missing.png"), "--instruction", "go"]) == 2
    assert error_of(capsys) == f"dcvla: error: --image {tmp_path / 'missing.png'}: no such file"
    (tmp_path / "notes.png").write_text("not an image")
    assert cli(["predict", "--image", str(tmp_path / "notes.png"), "--instruction", "go"]) == 2
    assert f"--image {tmp_path / 'notes.png'} is not an image file PIL can read" in error_of(capsys)
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "frame.png")
    assert cli(["predict", "--image", str(tmp_path / "frame.png")]) == 2
    assert "needs --instruction" in error_of(capsys)


def test_predict_rejects_an_empty_or_too_long_instruction_and_an_unknown_unnorm_key(capsys):
    assert cli(["predict", "--instruction", ""]) == 2  # not silently replaced by the shipped episode's
    assert error_of(capsys) == "dcvla: error: instruction is empty; the policy needs a task description"
    assert cli(["predict", "--instruction", "pick up the bowl " * 600]) == 2
    assert "instruction too long" in error_of(capsys)
    assert cli(["predict", "--unnorm-key", "nosuch"]) == 2
    assert error_of(capsys) == "dcvla: error: unnorm_key 'nosuch' not found; available: random"  # not a KeyError's repr


def test_the_studies_summary_prints_the_tables_and_how_speed_was_measured(tmp_path, capsys):
    """`dcvla studies` ends with the cache behaviour table and the cliff table per (mode, gate, value), each followed
    by how its speedups were measured (the table's "speed" attribute), the cliff per gate and mode, and H4."""
    import pandas as pd
    import xarray as xr

    from dcvla.io import write_dataset
    from dcvla.studies.speed import COLUMNS
    from dcvla.studies.summary import print_cache_summary, print_cliff_summary

    note = "speedup (interleaved, median): median over frames of the paired latency ratio vanilla / run; 9 frames, cpu"
    speed = dict(zip(COLUMNS, (1.2, 1.1, 100.0, 10.0)))
    rows = [{"method": m, "reuse rate": r, "LLM reuse rate": r, "FLOPs ratio": f, **speed, "action drift": 0.0,
             "action KL": 0.0} for m, r, f in (("vanilla", 0.0, 1.0), ("dual_cache", 0.4, 1.5))]
    write_dataset(xr.Dataset.from_dataframe(pd.DataFrame(rows)).assign_attrs(speed=note), tmp_path / "cache_behaviour.nc")
    print_cache_summary(tmp_path / "cache_behaviour.nc", "tiny preset")
    out = capsys.readouterr().out
    assert "speedup (interleaved, median)" in out.splitlines()[2] and "measured speedup" not in out and note[:60] in out
    assert "(cache_behaviour, tiny preset," in out
    from dcvla.studies.summary import print_benchmark_summary
    from dcvla.success import paired

    trials = xr.DataArray([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]], dims=("method", "trial"),
                          coords={"method": ["vanilla", "ttf", "dual_cache"]})
    success = [{"method": m, "suite": "libero_goal", "task": 8, "trials": 4, "successes": int(trials.sel({"method": m}).sum()),
                "success rate": float(trials.sel({"method": m}).mean()), "McNemar p": 1.0} for m in ("vanilla", "ttf", "dual_cache")]
    write_dataset(xr.Dataset.from_dataframe(pd.DataFrame(success)), tmp_path / "libero_benchmark.nc")
    verdicts = pd.DataFrame([paired(trials, "dual_cache", b) | {"kept": 1.0} for b in ("vanilla", "ttf")])
    print_benchmark_summary(tmp_path / "libero_benchmark.nc", tmp_path / "none.nc", "openvla-micro-goal")
    out = capsys.readouterr().out
    assert "success (openvla-micro-goal;" in out and "dual_cache libero_goal 8" in " ".join(out.split())
    assert "Does the dual cache keep success" not in out  # no verdicts file: the dual cache was not run
    write_dataset(xr.Dataset.from_dataframe(verdicts), tmp_path / "verdicts.nc")
    print_benchmark_summary(tmp_path / "libero_benchmark.nc", tmp_path / "verdicts.nc", "openvla-micro-goal")
    lines = capsys.readouterr().out.split("Does the dual cache keep success where the others do?")[1].strip().splitlines()
    write_dataset(xr.Dataset.from_dataframe(pd.DataFrame(success[:2])), tmp_path / "no_dual.nc")
    print_benchmark_summary(tmp_path / "no_dual.nc", tmp_path / "verdicts.nc", "openvla-micro-goal")
    assert "Does the dual cache keep success" not in capsys.readouterr().out  # an earlier run's verdicts
    assert lines[0].split()[:2] == ["paired", "trials"] and lines[-1].split()[0] == "ttf" and "too few paired trials" in lines[-1]
    rows = []
    for mode in ("full", "vision_only"):
        for gate, values in (("cosine", [0.97, 0.98, 0.99]), ("max_age", [2, 3])):
            for i, value in enumerate(values):
                drift = 0.1 / (i + 1) if gate == "cosine" else 0.2 * (i + 1)
                played = mode == "full" and value == 0.98  # the one run that played closed-loop trials
                rows.append({"mode": mode, "gate": gate, "value": float(value), "reuse rate": 0.5 / (i + 1),
                             "KV reuse": 0.4, **speed, "FLOPs ratio": 1.5, "action drift": drift,
                             "success rate": 0.25 if played else np.nan, "McNemar p": 0.125 if played else np.nan})
    write_dataset(xr.Dataset.from_dataframe(pd.DataFrame(rows)).assign_attrs(speed=note), tmp_path / "stability_cliff.nc")
    print_cliff_summary(tmp_path / "stability_cliff.nc", "smolvla-micro-goal")
    out = capsys.readouterr().out
    assert "Stability cliff (smolvla-micro-goal," in out and "max_age" in out and "Hz (interleaved, median)" in out
    success = out.split("Closed-loop LIBERO success")[1].split("Where action drift")[0].strip().splitlines()
    assert len(success) == 4 and success[-1].split()[:5] == ["full", "cosine", "0.98", "0.25", "0.125"]
    assert note[:60] in out
    assert "Where action drift jumps along each gate's parameter" in out
    assert "Consistency vs freshness (full vs vision_only, same cosine gate)" in out and "no difference" in out
