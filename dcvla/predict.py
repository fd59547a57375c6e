"""`dcvla predict`: one action of an OpenVLA-family policy for one image (a file, or the first shipped frame)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

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


def read_image(path: Path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3]; a missing or unreadable file raises naming it."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"--image {path}: no such file")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"--image {path} is not an image file PIL can read ({err})") from err


def predict(args: argparse.Namespace) -> None:
    config = CacheConfig(method=args.method, unnorm_key=args.unnorm_key)
    if args.image:  # the inputs first: a bad one fails before a model is built
        if args.instruction is None:
            raise ValueError(f"--image {args.image} needs --instruction (the shipped frame's instruction is not its)")
        image, instruction, source = read_image(args.image), args.instruction, args.image
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
