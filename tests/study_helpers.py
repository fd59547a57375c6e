"""Running a study notebook end to end through `dcvla run` at tiny size (tests/test_studies*.py)."""

from dcvla.cli import main as cli

TINY = ["-p", "preset", "tiny", "-p", "suites", '["libero_goal"]', "-p", "episodes_per_suite", "1"]


def run_study(name: str, tmp_path, *params: str) -> None:
    tiny = TINY[:6] if name == "libero_benchmark" else TINY  # it runs tasks, not episodes: no episodes_per_suite
    args = ["run", name, *tiny, "-p", "runs_dir", str(tmp_path / "runs"), "-p", "figures_dir", str(tmp_path / "figures"), *params]
    assert cli(args) == 0
    assert (tmp_path / "studies" / f"{name}.ipynb").exists()  # the executed notebook, next to the outputs
