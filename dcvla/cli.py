"""Command line: `dcvla predict` runs one step; `dcvla studies` runs the main job on the embedded default.

Until the study notebooks land, `studies` is the smoke run: build the `tiny` preset, predict one action for
a shipped LIBERO frame, and print it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .policy import VLAPolicy


def shipped_frame() -> tuple[np.ndarray, str, str]:
    """The first frame of the first shipped LIBERO episode: (image, instruction, description)."""
    from .libero.episodes import list_episodes, load_episode

    paths = list_episodes()
    if not paths:
        raise FileNotFoundError("no shipped LIBERO episodes under data/episodes (record some: scripts/record_episodes.py)")
    episode = load_episode(paths[0])
    return episode.frames[0], episode.instruction, f"{paths[0].name} frame 0"


def predict(args: argparse.Namespace) -> None:
    if args.checkpoint:
        policy = VLAPolicy.from_pretrained(args.checkpoint, unnorm_key=args.unnorm_key, preset=args.preset)
    else:
        policy = VLAPolicy.from_preset(args.preset or "tiny", seed=args.seed, unnorm_key=args.unnorm_key)
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


def studies(args: argparse.Namespace) -> None:
    predict(argparse.Namespace(checkpoint=None, preset="tiny", seed=0, unnorm_key=None, image=None, instruction=None))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcvla", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="predict one action for one image")
    p.add_argument("--preset", help="model preset (default tiny, or read from the checkpoint)")
    p.add_argument("--checkpoint", help="checkpoint directory or hub id (OpenVLA layout, safetensors)")
    p.add_argument("--unnorm-key", help="dataset statistics to un-normalise with")
    p.add_argument("--seed", type=int, default=0, help="weights seed of a random preset")
    p.add_argument("--image", type=Path, help="an RGB image file (default: a shipped LIBERO frame)")
    p.add_argument("--instruction", help="task instruction (default: the shipped episode's)")
    p.set_defaults(func=predict)
    s = sub.add_parser("studies", help="the main job on the embedded default (small preset, shipped episodes)")
    s.set_defaults(func=studies)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as err:
        print(f"dcvla: error: {err}", file=sys.stderr)
        return 2
    return 0
