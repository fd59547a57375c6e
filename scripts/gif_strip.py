"""Rollout GIFs (`scripts/rollout_gif.py`) side by side as one PNG: one row per GIF, the same frames of each, so two
trials of one init state can be compared step by step (a frame a shorter trial does not have stays blank).

    scripts/gif_strip.py /tmp/vanilla.gif /tmp/dual_cache.gif --first 4 --every 2 --count 9 --scale 0.75 \\
        --out figures/rollout_oft-micro-10_init1_vanilla_dual_cache.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageSequence

from dcvla.io import atomic_path


def gif_frames(path: Path) -> list[Image.Image]:
    """Every frame of a GIF as RGB; a file that is not a GIF is an error naming it."""
    try:
        with Image.open(path) as im:
            if im.format != "GIF":
                raise ValueError(f"{path}: not a GIF ({im.format})")
            return [frame.convert("RGB") for frame in ImageSequence.Iterator(im)]
    except OSError as e:
        raise ValueError(f"{path}: cannot read it as an image ({e})") from e


def strip(rows: list[list[Image.Image]], picked: list[int], scale: float = 1.0) -> Image.Image:
    """The frames `picked` of each row, rows stacked; frames a row lacks stay white."""
    width, height = rows[0][0].size
    out = Image.new("RGB", (len(picked) * width, len(rows) * height), "white")
    for r, frames in enumerate(rows):
        for c, i in enumerate(picked):
            if i < len(frames):
                out.paste(frames[i], (c * width, r * height))
    return out.resize((round(out.width * scale), round(out.height * scale))) if scale != 1.0 else out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gifs", nargs="+", type=Path, help="one row each, top to bottom")
    ap.add_argument("--first", type=int, default=0, help="first frame (default 0)")
    ap.add_argument("--every", type=int, default=1, help="every N-th frame from it (default 1)")
    ap.add_argument("--count", type=int, help="frames per row (default: to the longest GIF's end)")
    ap.add_argument("--scale", type=float, default=1.0, help="resize the strip by this factor (default 1)")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = ap.parse_args(argv)
    if args.first < 0 or args.every < 1 or (args.count is not None and args.count < 1) or args.scale <= 0:
        ap.error("--first must be >= 0, --every and --count >= 1, --scale > 0")
    try:
        rows = [gif_frames(p) for p in args.gifs]
    except (FileNotFoundError, ValueError) as e:
        ap.error(str(e))
    if len({frames[0].size for frames in rows}) > 1:
        ap.error("the GIFs differ in size: " + ", ".join(f"{p} {f[0].size}" for p, f in zip(args.gifs, rows)))
    end = max(map(len, rows)) if args.count is None else args.first + args.count * args.every
    picked = list(range(args.first, end, args.every))
    with atomic_path(args.out) as tmp:
        strip(rows, picked, args.scale).save(tmp, format="PNG", optimize=True)
    print(f"{len(rows)} rows of {len(picked)} frames -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
