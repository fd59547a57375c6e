"""The notebooks: written as jupytext percent-format sources `notebooks/<name>.py`, run as `notebooks/<name>.ipynb`
built from them (outputs empty, git-ignored).

Papermill (`dcvla run`, `make studies`) and Voila (`make explorer`) need the `.ipynb`; `dcvla run` builds it
before running, `make notebooks` (or `python -m dcvla.notebooks [NAME]...`) builds them all.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def notebook_names(directory: str | Path = NOTEBOOKS) -> list[str]:
    """The notebooks written as sources: the stems of `<directory>/*.py`."""
    return sorted(p.stem for p in Path(directory).glob("*.py"))


def read_notebook(name: str, directory: str | Path = NOTEBOOKS):
    """`<directory>/<name>.py` as an nbformat notebook: no outputs, cell ids `<name>-<index>` (stable, so a
    rebuild changes nothing the source did not), no jupytext metadata (the `.ipynb` is not paired with it)."""
    import jupytext

    source = Path(directory) / f"{name}.py"
    if not source.is_file():
        raise FileNotFoundError(f"no notebook source {source}; notebooks: {', '.join(notebook_names(directory))}")
    nb = jupytext.read(source, fmt="py:percent")
    nb.metadata.pop("jupytext", None)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name}-{i}"
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    return nb


def build_notebook(name: str, directory: str | Path = NOTEBOOKS) -> Path:
    """Write `<directory>/<name>.ipynb` from `<directory>/<name>.py`; returns its path.

    The file is replaced atomically and only when its content changes (concurrent builds are safe).
    """
    import jupytext

    nb = read_notebook(name, directory)
    target = Path(directory) / f"{name}.ipynb"
    text = jupytext.writes(nb, fmt="ipynb")
    if target.is_file() and target.read_text(encoding="utf-8") == text:
        return target
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}.", suffix=".ipynb.tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def build_all(directory: str | Path = NOTEBOOKS) -> list[Path]:
    """Build every notebook under `directory` from its source."""
    return [build_notebook(name, directory) for name in notebook_names(directory)]


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    for name in names or notebook_names():
        path = build_notebook(name)
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
