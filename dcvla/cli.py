"""Command line.

    dcvla predict [--checkpoint DIR] [--image PNG]     one action for one image
    dcvla run STUDY [-p NAME VALUE]...                 build notebooks/STUDY.ipynb from notebooks/STUDY.py and
                                                       execute it with papermill
    dcvla run STUDY ... --shard I/N                    only shard I of N of the study's units (SLURM arrays)
    dcvla merge STUDY [-p NAME VALUE]...               the notebook over the shards' results (computes no unit)
    dcvla merge STUDY ... --partial                    the same over the trials played so far (a grid under way)
    dcvla progress STUDY [-p NAME VALUE]... [--shards N]  units complete and trials played so far (computes none)
    dcvla run STUDY ... --ray auto|ADDRESS|local       the study's units on a Ray cluster, then the notebook
    dcvla sweep STUDY -p NAME '[v1, v2]' ... [--ray]   the notebook per combination, then sweep_summary
    dcvla studies [-p NAME VALUE]...                   the paper set on the embedded default, then a summary

Executed notebooks are written next to their outputs: data/studies/STUDY.ipynb beside data/STUDY.nc.

A -p NAME must be one the notebook's `parameters` cell defines, and its VALUE of the default's type; both are checked
before anything runs. An exception inside a notebook is reported in one line (study, executed notebook, cell,
exception); the executed notebook holds the full traceback. Errors exit with status 2.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from .images import read_image
from .openvla import CacheConfig, CachedPolicy
from .openvla.processing import build_prompt


def shipped_frame() -> tuple[np.ndarray, str, str]:
    """The first frame of the first shipped LIBERO episode: (image, instruction, description)."""
    from .libero.episodes import list_episodes, load_episode

    paths = list_episodes()
    if not paths:
        raise FileNotFoundError("no shipped LIBERO episodes under data/episodes (record some: scripts/record_episodes.py)")
    episode = load_episode(paths[0])
    return episode.frames[0], episode.instruction, f"{paths[0].name} frame 0"


def predict(args: argparse.Namespace) -> None:
    config = CacheConfig(method=args.method, unnorm_key=args.unnorm_key)
    if args.image:  # the inputs first: a bad one fails before a model is built
        if args.instruction is None:
            raise ValueError(f"--image {args.image} needs --instruction (the shipped frame's instruction is not its)")
        image, instruction, source = read_image(args.image, "--image"), args.instruction, args.image
    else:
        image, instruction, source = shipped_frame()
        instruction = instruction if args.instruction is None else args.instruction  # "" is an (empty) instruction
    build_prompt(instruction)  # an empty instruction raises here
    if args.checkpoint:
        policy = CachedPolicy.from_pretrained(args.checkpoint, config, preset=args.preset)
    else:
        policy = CachedPolicy.from_preset(args.preset or "tiny", seed=args.seed, config=config)
    start = time.perf_counter()
    action = policy.step(image, instruction)
    ms = (time.perf_counter() - start) * 1e3
    print(f"preset {policy.model.config.name} | image {source} {image.shape} | instruction {instruction!r}")
    print(f"action tokens {policy.last.token_ids.tolist()}")
    print(f"action {np.array2string(action, precision=4, floatmode='fixed')}  ({ms:.0f} ms)")


ROOT = Path(__file__).resolve().parents[1]
STUDY_MODULES = ("cache_behaviour", "long_horizon_stability", "mechanism_equivalence", "libero_benchmark",
                 "stability_cliff")  # the studies whose units `--shard` / `--ray` run (each module's `plan`)
NOTEBOOKS = ROOT / "notebooks"  # <study>.py sources (jupytext percent); run_study builds <study>.ipynb from one
PAPER_SET = ("mechanism_equivalence", "cache_behaviour", "long_horizon_stability", "libero_benchmark", "stability_cliff")


def parse_value(text: str):
    """A -p value as Python reads it (numbers, lists, booleans); anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def available_studies() -> list[str]:
    """The notebooks written as sources under notebooks/ (<study>.py), the explorer included."""
    from .notebooks import notebook_names

    return notebook_names(NOTEBOOKS)


def shown(path: Path) -> Path:
    """`path` relative to the repository when it is inside it (shorter in messages)."""
    path = Path(path)
    return path.relative_to(ROOT) if path.is_absolute() and path.is_relative_to(ROOT) else path


class StudyError(RuntimeError):
    """A study notebook raised: one line naming the study, the executed notebook, the cell and the exception."""


def check_study(study: str) -> None:
    studies = available_studies()
    if study not in studies:
        close = difflib.get_close_matches(study.removesuffix(".py").removesuffix(".ipynb"), studies, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ValueError(f"unknown study {study!r}; {hint}available: {', '.join(studies)}")


def check_parameters(study: str, parameters: dict, defaults: dict | None = None) -> None:
    """A ValueError when a parameter is not one the study notebook's `parameters` cell defines (naming the closest
    names and all the known ones), or its value's type differs from the default's; nothing runs before this."""
    from .notebooks import notebook_parameters, parameter_type_error

    defaults = notebook_parameters(study, NOTEBOOKS) if defaults is None else defaults
    source = shown(NOTEBOOKS / f"{study}.py")
    unknown = [name for name in parameters if name not in defaults]
    if unknown:
        guesses = []
        for name in unknown:
            close = difflib.get_close_matches(name, defaults, n=3, cutoff=0.6)
            guesses.append(f"{name!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise ValueError(f"{study}: unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(guesses)}: the "
                         f"parameters cell of {source} defines {', '.join(defaults) or 'none'}")
    for name, value in parameters.items():
        wanted = parameter_type_error(value, defaults[name])
        if wanted:
            hint = f" (a list on the command line: -p {name} '{json.dumps([value])}')" if wanted == "a list" else ""
            raise ValueError(f"{study}: parameter {name} must be {wanted}, got {value!r} ({type(value).__name__}); "
                             f"its default in {source} is {defaults[name]!r}{hint}")


def cli_parameters(pairs: list[tuple[str, str]], study: str) -> dict:
    """-p NAME VALUE pairs for one study: each value as Python reads it (`parse_value`), except that a parameter
    whose default is a str takes the text as typed (-p runs_dir 2024 is a directory, not a number); checked."""
    from .notebooks import NotALiteral, notebook_parameters

    defaults = notebook_parameters(study, NOTEBOOKS)
    parameters = {}
    for name, text in pairs:
        default, value = defaults.get(name), parse_value(text)
        as_typed = isinstance(default, str) and not isinstance(default, NotALiteral) and not isinstance(value, str)
        parameters[name] = text if as_typed else value
    check_parameters(study, parameters, defaults)
    return parameters


def run_study(study: str, parameters: dict, out: Path | None = None, merge: str = "") -> Path:
    """Build notebooks/<study>.ipynb from its source notebooks/<study>.py, then execute it with papermill (kernel
    cwd: the repository root); returns the executed copy. `merge`: the units' results are there, the notebook reads
    them and computes none ("1"), or tables the trials played so far ("partial"; `dcvla.units.Runner`).

    Raises:
        ValueError: an unknown study, or a parameter its notebook does not define or of another type than the
            default's (checked before anything is built or run).
        StudyError: the notebook raised; the message names the executed notebook (full traceback in it), the cell and
            the exception.
    """
    import papermill

    from .notebooks import build_notebook
    from .units import merging

    check_study(study)
    check_parameters(study, parameters)
    source = build_notebook(study, NOTEBOOKS)
    runs_dir = Path(parameters.get("runs_dir", "data/runs"))
    out = out or (ROOT / runs_dir).parent / "studies" / f"{study}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[dcvla] {study}: {parameters or 'default parameters'} -> {shown(out)}", flush=True)
    started = time.time()
    try:  # the cells' own output streams here as it comes: which run is recording, the units done out of all
        with merging(merge):  # the kernel inherits it
            papermill.execute_notebook(str(source), str(out), parameters=parameters, cwd=str(ROOT), progress_bar=True,
                                       kernel_name="python3", stdout_file=sys.stdout, stderr_file=sys.stderr)
    except papermill.PapermillExecutionError as err:
        message = " ".join(str(err.evalue).split()) or "(no message)"
        raise StudyError(f"{study} (notebook {shown(out)}, cell {err.exec_count}): {err.ename}: {message}\n"
                         f"  the full traceback is in {shown(out)}, at In [{err.exec_count}]; the notebook's source is "
                         f"{shown(NOTEBOOKS / f'{study}.py')}") from err
    figures = ROOT / parameters.get("figures_dir", "figures")
    made = sorted(p for p in figures.rglob("*.png") if p.stat().st_mtime >= started) if figures.is_dir() else []
    print(f"[dcvla] {study}: executed notebook {shown(out)}" + (f"; figures: {', '.join(str(shown(p)) for p in made)}"
                                                                if made else ""), flush=True)
    return out


def study_plan(study: str, parameters: dict):
    """The study's units and their worker with these parameters (the notebook's defaults for the rest)."""
    import importlib

    from .notebooks import notebook_parameters

    module = importlib.import_module(f"dcvla.studies.{study}") if study in STUDY_MODULES else None
    if module is None or not hasattr(module, "plan"):
        raise ValueError(f"{study} has no units to shard or send to Ray; these do: {', '.join(STUDY_MODULES)}")
    return module.plan({**notebook_parameters(study, NOTEBOOKS), **parameters})


def run_distributed(study: str, parameters: dict, runner) -> None:
    """Run the study's units under `runner` (a shard, or Ray), saying how many ran and how many are complete."""
    from .units import run_units

    units, factory = study_plan(study, parameters)
    where = f"shard {runner.shard[0]}/{runner.shard[1]}" if runner.shard else f"Ray ({runner.ray})"
    print(f"[dcvla] {study}: {len(units)} units; running the incomplete ones on {where}", flush=True)
    run_units(units, factory, runner)
    complete = sum(u.complete() for u in units)
    print(f"[dcvla] {study}: {where} ran {len(runner.done)} units; {complete} of {len(units)} complete", flush=True)


def run(args: argparse.Namespace) -> None:
    """A study notebook; with --shard, only that share of its units (no notebook: `dcvla merge` makes the tables
    when every shard is done); with --ray, its units on a Ray cluster, then the notebook over the results."""
    from .units import Runner, parse_shard

    check_study(args.study)
    parameters = cli_parameters(args.param, args.study)
    if args.shard and args.ray:
        raise ValueError("--shard and --ray are two runners: give one")
    if args.threads is not None and (args.threads < 1 or not args.shard):
        raise ValueError(f"--threads {args.threads}: a shard's torch threads (at least 1), given with --shard")
    if args.shard:
        runner = Runner(shard=parse_shard(args.shard), threads=args.threads or 0)
        run_distributed(args.study, parameters, runner)
        print(f"[dcvla] when every shard is done: dcvla merge {args.study}"
              + "".join(f" -p {n} {v!r}" for n, v in args.param), flush=True)
        return
    if args.ray:
        run_distributed(args.study, parameters, Runner(ray=args.ray, num_workers=args.workers))
    run_study(args.study, parameters, merge="1" if args.ray else "")  # after Ray: the notebook reads the results


def sweep(args: argparse.Namespace) -> None:
    """The study's notebook for every combination of the -p lists (a list-valued parameter's values are lists),
    each in its own folder under `<sweep_dir>/<study>/<combination>/` (runs, figures, table and the executed
    notebook: the record of that run), then `sweep_summary` over them all; with --ray, each combination's units
    on Ray first."""
    import itertools

    from .notebooks import notebook_parameters

    check_study(args.study)
    defaults = notebook_parameters(args.study, NOTEBOOKS)
    grid = {name: parse_value(text) for name, text in args.param}
    bad = [name for name, values in grid.items() if not isinstance(values, list) or not values]
    if bad:
        raise ValueError(f"sweep: -p {bad[0]} must be a non-empty list of values (one value: a one-element list)")
    root = Path(args.sweep_dir) / args.study
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    varying = [name for name, values in grid.items() if len(values) > 1]  # name the folders; the rest is fixed
    for combo in combos:
        name = ",".join(f"{k}={json.dumps(combo[k], separators=(',', ':'))}" for k in varying).replace("/", "_")
        folder = root / (name or "defaults")
        parameters = {**combo, "runs_dir": str(folder / "runs"), "figures_dir": str(folder / "figures")}
        check_parameters(args.study, parameters, defaults)
        if args.ray:
            from .units import Runner

            run_distributed(args.study, parameters, Runner(ray=args.ray, num_workers=args.workers))
        (folder / "parameters.json").parent.mkdir(parents=True, exist_ok=True)
        (folder / "parameters.json").write_text(json.dumps({"swept": {k: combo[k] for k in varying}, "all": combo},
                                                           indent=1))
        run_study(args.study, parameters, out=folder / f"{args.study}.ipynb")
    run_study("sweep_summary", {"study": args.study, "sweep_dir": str(root)}, out=root / "sweep_summary.ipynb")
    print(f"[dcvla] sweep of {args.study}: {len(combos)} combinations under {shown(root)}; summary "
          f"{shown(root / 'sweep_summary.ipynb')}", flush=True)


def progress(args: argparse.Namespace) -> None:
    """How far a study's units are with these parameters (computes nothing): units complete, trials played, per
    shard with --shards N, and each incomplete unit."""
    from .units import progress as report

    check_study(args.study)
    if args.shards < 0:
        raise ValueError(f"--shards must be >= 0, got {args.shards}")
    units, _ = study_plan(args.study, cli_parameters(args.param, args.study))
    print(report(units, args.shards), flush=True)


def merge(args: argparse.Namespace) -> None:
    """The study's notebook over the shards' results: every unit must be complete (none is computed here); with
    --partial, units of closed-loop trials may not be yet, and the tables count the trials played so far."""
    from .units import IncompleteUnits, progress, refuse_incomplete

    check_study(args.study)
    parameters = cli_parameters(args.param, args.study)
    units, _ = study_plan(args.study, parameters)  # a study without units fails here, naming the ones with
    try:
        refuse_incomplete(units, len(units), args.partial)
    except IncompleteUnits as err:
        raise ValueError(f"{args.study}: {err}") from None
    if args.partial:
        print(f"[dcvla] partial merge of {progress(units).splitlines()[0]}", flush=True)
    run_study(args.study, parameters, merge="partial" if args.partial else "1")


def studies(args: argparse.Namespace) -> None:
    """The paper set, then the summary (`studies.summary`): per method reuse rate, FLOPs ratio, the speedup from
    interleaved timings (said how it was measured), action drift; then the stability cliff's tables.

    Each -p goes to the studies whose notebook defines it; a name none of them defines, or a value of the wrong
    type for one that does, fails before the first study runs."""
    from .notebooks import notebook_parameters

    defined = {study: notebook_parameters(study, NOTEBOOKS) for study in PAPER_SET}
    known = list(dict.fromkeys(name for names in defined.values() for name in names))
    unknown = [name for name, _ in args.param if name not in known]
    if unknown:
        close = {name: difflib.get_close_matches(name, known, n=3) for name in unknown}
        guesses = [f"{name!r}" + (f" (did you mean {' or '.join(close[name])}?)" if close[name] else "") for name in unknown]
        raise ValueError(f"studies: unknown parameter{'s' if len(unknown) > 1 else ''} {', '.join(guesses)}: no notebook of "
                         f"the paper set ({', '.join(PAPER_SET)}) defines it; their parameters: {', '.join(known)}")
    per_study = {study: cli_parameters([(n, v) for n, v in args.param if n in defined[study]], study) for study in PAPER_SET}
    parameters = {name: value for params in per_study.values() for name, value in params.items()}
    start = time.perf_counter()
    for study in PAPER_SET:
        run_study(study, per_study[study])
    from .studies.cliff_config import CliffConfig
    from .studies.common import PolicyParameters
    from .studies.summary import print_benchmark_summary, print_cache_summary, print_cliff_summary

    runs_dir = ROOT / Path(parameters.get("runs_dir", "data/runs"))
    model = {study: {**defined[study], **per_study[study]} for study in PAPER_SET}
    openvla = {study: PolicyParameters.from_parameters(model[study]).model_name()
               for study in ("cache_behaviour", "libero_benchmark")}
    print_cache_summary(runs_dir.parent / "cache_behaviour.nc", openvla["cache_behaviour"])
    print_benchmark_summary(runs_dir.parent / "libero_benchmark.nc", runs_dir.parent / "libero_benchmark_dual_cache.nc",
                            openvla["libero_benchmark"])
    cliff = CliffConfig.from_parameters(model["stability_cliff"]).model_name()
    print_cliff_summary(runs_dir.parent / "stability_cliff.nc", cliff)
    figures = ROOT / Path(parameters.get("figures_dir", "figures"))
    print("\nFigures:\n" + "\n".join(f"  {shown(p)}" for p in sorted(figures.glob("*.png"))))
    print(f"\nDone in {time.perf_counter() - start:.0f} s")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcvla", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict one action for one image")
    p.add_argument("--preset", help="model preset (default tiny, or read from the checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint directory or hub id (OpenVLA layout, safetensors)")
    p.add_argument("--unnorm-key", help="dataset statistics to un-normalise with")
    p.add_argument("--seed", type=int, default=0, help="weights seed of a random preset")
    p.add_argument("--method", default="vanilla", help="cache method (one frame: every method computes it in full)")
    p.add_argument("--image", type=Path, help="an RGB image file (default: a shipped LIBERO frame)")
    p.add_argument("--instruction", help="task instruction (default: the shipped episode's)")
    p.set_defaults(func=predict)
    r = sub.add_parser("run", help="execute one study notebook with papermill")
    r.add_argument("study", help="a notebook name under notebooks/ (e.g. cache_behaviour)")
    r.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="notebook parameter (Python literal or string), repeatable")
    r.add_argument("--shard", metavar="I/N", help="run only shard I of N of the study's units (SLURM arrays, "
                   "background processes); then `dcvla merge`")
    r.add_argument("--ray", metavar="ADDRESS", help="run the study's units on Ray: auto (the cluster `ray start` "
                   "made here), an address, or local (a cluster for this run)")
    r.add_argument("--workers", type=int, default=0, help="Ray actors (default: one per GPU, else one per CPU)")
    r.add_argument("--threads", type=int, help="a shard's torch threads (default torch's: every core; shards sharing "
                   "a machine: its cores / shards each)")
    r.set_defaults(func=run)
    w = sub.add_parser("sweep", help="run a study notebook for every combination of parameter lists")
    w.add_argument("study")
    w.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUES"),
                   help="a parameter and the list of its values, repeatable (the grid is their product)")
    w.add_argument("--sweep-dir", default="data/sweeps", help="where each combination's folder goes")
    w.add_argument("--ray", metavar="ADDRESS", help="each combination's units on Ray first (see run --ray)")
    w.add_argument("--workers", type=int, default=0)
    w.set_defaults(func=sweep)
    g = sub.add_parser("merge", help="make a study's tables from its shards' results (dcvla run --shard)")
    g.add_argument("study")
    g.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="the notebook parameters the shards ran with, repeatable")
    g.add_argument("--partial", action="store_true", help="tables of the trials played so far (a grid under way)")
    g.set_defaults(func=merge)
    q = sub.add_parser("progress", help="how far a study's units are (units complete, trials played)")
    q.add_argument("study")
    q.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="the parameters the study runs with, repeatable")
    q.add_argument("--shards", type=int, default=0, help="also per shard of N (the runs' --shard I/N)")
    q.set_defaults(func=progress)
    s = sub.add_parser("studies", help="the paper set on the embedded default (small preset, shipped episodes)")
    s.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="parameter for every study (e.g. -p preset tiny), repeatable")
    s.set_defaults(func=studies)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, OSError, TypeError, StudyError) as err:
        # a KeyError's str() is its argument's repr; the message reads better without the quotes
        message = err.args[0] if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str) else err
        print(f"dcvla: error: {message}", file=sys.stderr)
        return 2
    return 0
