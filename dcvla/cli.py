"""Command line.

    dcvla predict [--checkpoint DIR] [--image PNG]     one action for one image
    dcvla run STUDY [-p NAME VALUE]...                 build notebooks/STUDY.ipynb from notebooks/STUDY.py and
                                                       execute it with papermill
    dcvla studies [-p NAME VALUE]...                   the paper set on the embedded default, then a summary

Executed notebooks are written next to their outputs: data/studies/STUDY.ipynb beside data/STUDY.nc.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

import numpy as np

from .openvla import CacheConfig, CachedPolicy


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
    if args.checkpoint:
        policy = CachedPolicy.from_pretrained(args.checkpoint, config, preset=args.preset)
    else:
        policy = CachedPolicy.from_preset(args.preset or "tiny", seed=args.seed, config=config)
    if args.image:
        from PIL import Image

        image, instruction, source = np.asarray(Image.open(args.image).convert("RGB")), args.instruction, args.image
    else:
        image, instruction, source = shipped_frame()
        instruction = args.instruction or instruction
    start = time.perf_counter()
    action = policy.step(image, instruction)
    ms = (time.perf_counter() - start) * 1e3
    print(f"preset {policy.model.config.name} | image {source} {image.shape} | instruction {instruction!r}")
    print(f"action tokens {policy.last.token_ids.tolist()}")
    print(f"action {np.array2string(action, precision=4, floatmode='fixed')}  ({ms:.0f} ms)")


ROOT = Path(__file__).resolve().parents[1]
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


def run_study(study: str, parameters: dict) -> Path:
    """Build notebooks/<study>.ipynb from its source notebooks/<study>.py, then execute it with papermill (kernel
    cwd: the repository root); returns the executed copy."""
    import papermill

    from .notebooks import build_notebook

    if study not in available_studies():
        raise ValueError(f"unknown study {study!r}; available: {', '.join(available_studies())}")
    source = build_notebook(study, NOTEBOOKS)
    runs_dir = Path(parameters.get("runs_dir", "data/runs"))
    out = (ROOT / runs_dir).parent / "studies" / f"{study}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"[dcvla] {study}: {parameters or 'default parameters'} -> {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}", flush=True)
    papermill.execute_notebook(str(source), str(out), parameters=parameters, cwd=str(ROOT), progress_bar=True,
                               kernel_name="python3")
    return out


def run(args: argparse.Namespace) -> None:
    run_study(args.study, {name: parse_value(value) for name, value in args.param})


def studies(args: argparse.Namespace) -> None:
    """The paper set, then the summary: method, reuse rate, FLOPs ratio, measured speedup, action drift."""
    parameters = {name: parse_value(value) for name, value in args.param}
    start = time.perf_counter()
    for study in PAPER_SET:
        run_study(study, parameters)
    from .io import read_dataset

    runs_dir = ROOT / Path(parameters.get("runs_dir", "data/runs"))
    table = read_dataset(runs_dir.parent / "cache_behaviour.nc").to_dataframe().set_index("method")
    columns = ["reuse rate", "LLM reuse rate", "FLOPs ratio", "measured speedup", "action drift", "action KL"]
    print(f"\nSummary (cache_behaviour, {parameters.get('preset', 'small')} preset, shipped LIBERO frames):")
    print(table[columns].round(4).to_string())
    print_cliff_summary(runs_dir.parent / "stability_cliff.nc", parameters.get("preset", "small"))
    figures = ROOT / Path(parameters.get("figures_dir", "figures"))
    print("\nFigures:\n" + "\n".join(f"  {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}"
                                       for p in sorted(figures.glob("*.png"))))
    print(f"\nDone in {time.perf_counter() - start:.0f} s")


def print_cliff_summary(path: Path, preset: str) -> None:
    """The stability_cliff study in three tables: reuse/speed/drift per mode and threshold, the cliff per mode,
    and full against vision_only at the same gate."""
    import pandas as pd

    from .io import read_dataset
    from .studies.stability_cliff import consistency_vs_freshness, locate_cliff

    table = read_dataset(path).to_dataframe()
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"\nStability cliff (Pi0-style policy, {preset} preset, prefix K/V reuse gated by cosine similarity):")
        columns = ["reuse rate", "KV reuse", "latency ms", "Hz", "speedup", "FLOPs ratio", "action drift"]
        print(table.set_index(["mode", "threshold"])[columns].round(4).to_string())
        print("\nWhere action drift jumps as the threshold is lowered:")
        print(locate_cliff(table).drop(columns="parameter").set_index("mode").round(4).to_string())
        print("\nConsistency vs freshness (full vs vision_only, same gate):")
        print(consistency_vs_freshness(table).set_index("threshold").round(4).to_string())


def main(argv: list[str] | None = None) -> int:
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
    r.set_defaults(func=run)
    s = sub.add_parser("studies", help="the paper set on the embedded default (small preset, shipped episodes)")
    s.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                   help="parameter for every study (e.g. -p preset tiny), repeatable")
    s.set_defaults(func=studies)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as err:
        print(f"dcvla: error: {err}", file=sys.stderr)
        return 2
    return 0
