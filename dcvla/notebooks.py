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
from typing import Any

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


class NotALiteral(str):
    """A parameter whose default is an expression (e.g. `os.environ.get(...)`), kept as its source text: its type is
    not known before the notebook runs."""


def notebook_parameters(name: str, directory: str | Path = NOTEBOOKS) -> dict[str, Any]:
    """The names the `parameters` cell of `<directory>/<name>.py` assigns, in order, each with its default: the value
    when the cell assigns a Python literal, else a `NotALiteral` holding the expression. Empty when the notebook has
    no parameters cell. Read from the source, nothing executed (`dcvla run` checks -p names and types with it)."""
    import ast

    nb = read_notebook(name, directory)
    cells = [c for c in nb.cells if c.cell_type == "code" and "parameters" in c.metadata.get("tags", [])]
    defaults: dict[str, Any] = {}
    for cell in cells[:1]:  # papermill injects after the first tagged cell
        for node in ast.parse(cell.source).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                if isinstance(target, ast.Name) and node.value is not None:
                    try:
                        defaults[target.id] = ast.literal_eval(node.value)
                    except (ValueError, SyntaxError, TypeError):
                        defaults[target.id] = NotALiteral(ast.unparse(node.value))
    return defaults


def parameter_type_error(value: Any, default: Any) -> str | None:
    """Why `value` cannot replace a parameter whose default is `default` (None: it can), as the type wanted: an int
    takes ints, a float ints and floats, a bool True or False, a str strings, a list a list (whose items fit the
    default's items when those share one type), a dict a dict; an expression default (`NotALiteral`) or None takes
    anything."""

    def kind(v: Any, d: Any) -> str | None:  # the kind wanted, when v is not of it
        if isinstance(d, bool):
            return None if isinstance(v, bool) else "bool"
        if isinstance(d, int):
            return None if isinstance(v, int) and not isinstance(v, bool) else "int"
        if isinstance(d, float):
            return None if isinstance(v, (int, float)) and not isinstance(v, bool) else "float"
        if isinstance(d, str) and not isinstance(d, NotALiteral):
            return None if isinstance(v, str) else "str"
        if isinstance(d, dict):
            return None if isinstance(v, dict) else "dict"
        return None

    words = {"bool": "True or False", "int": "an int", "float": "a number (int or float)", "str": "a str", "dict": "a dict"}
    if isinstance(default, list):
        if not isinstance(value, list):
            return "a list"
        if default and len({type(d) for d in default}) == 1:
            wanted = next((k for k in (kind(v, default[0]) for v in value) if k), None)
            if wanted:
                return f"a list of {wanted} items"
        return None
    wanted = kind(value, default)
    return words[wanted] if wanted else None


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
