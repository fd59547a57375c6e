"""The package's layout rules, checked from the source: dependencies run one way (front ends -> studies ->
families and the simulator wrapper -> engine), no import cycle (function-local imports count), files and
functions stay readable."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dcvla"
FRONT_ENDS = {"cli", "explorer", "notebooks", "__main__", "__init__"}
NOT_FAMILIES = {"libero", "studies", "assets", "__pycache__"}
FAMILIES = sorted(p.name for p in PACKAGE.iterdir()
                  if p.is_dir() and p.name not in NOT_FAMILIES and (p / "__init__.py").exists())
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 50


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imported(name: str, path: Path) -> set[str]:
    """Every dcvla module `name` imports, anywhere in the file (function bodies included)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {target} | {f"{target}.{a.name}" for a in node.names}
    return {t for t in found if t.split(".")[0] == "dcvla"}


def layer(name: str) -> tuple[str, set[str]]:
    """(the module's layer, the top-level subpackages it must not import)."""
    parts = name.split(".")
    if len(parts) == 2 and parts[1] not in FAMILIES and parts[1] not in NOT_FAMILIES:
        if parts[1] in FRONT_ENDS:
            return "front end", set()
        return "engine", set(FAMILIES) | {"libero", "studies"}
    if len(parts) >= 2 and parts[1] in FAMILIES:
        return f"family {parts[1]}", (set(FAMILIES) - {parts[1]}) | {"libero", "studies"}
    return "other", set()


def test_the_package_has_families_and_an_engine():
    assert {"openvla", "pi0"} <= set(FAMILIES)
    assert {"dcvla.kv_store", "dcvla.attention", "dcvla.recording", "dcvla.io"} <= set(modules())


@pytest.mark.parametrize("name", sorted(modules()))
def test_dependencies_run_one_way(name):
    kind, banned = layer(name)
    bad = sorted(t for t in imported(name, modules()[name]) if len(t.split(".")) > 1 and t.split(".")[1] in banned)
    assert not bad, f"{name} ({kind}) imports {bad}"


def test_no_import_cycle():
    mods = modules()
    graph = {m: {t for t in imported(m, f) if t in mods and t != m and not m.startswith(t + ".")} for m, f in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_stay_short(path):
    lines = path.read_text().count("\n")
    assert lines <= MAX_FILE_LINES, f"{path.name} has {lines} lines (split it by responsibility)"
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.name}: functions over {MAX_FUNCTION_LINES} lines: {long}"
