"""What recording costs: step latency with and without a Recorder, and bytes per recorded frame.

Three policies share one model and step the same frames, interleaved per frame in a rotating order:
- `plain`: a policy no recorder ever touched;
- `detached`: a policy that had a recorder attached and removed (recording off);
- `recording`: a policy inside `recorder_for(policy)` with the default variables (masks, staleness, text-to-vision
  attention of every LLM layer and head, actions, FLOPs, latency).
Bytes per frame are measured on disk (compressed netCDF) for the preset run, with and without drift, and
computed from the schema's shapes (uncompressed) for the published openvla-7b dims.

On a GPU (`--device cuda --dtype bfloat16`) every step is timed between two device synchronisations.

    python benchmarks/recording_overhead.py --preset small --frames 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import DTYPES, first_frames, place_model, timer  # noqa: E402

from dcvla.libero.episodes import list_episodes, load_episode  # noqa: E402
from dcvla.openvla import CacheConfig, CachedPolicy, get_preset  # noqa: E402
from dcvla.openvla.record import DEFAULT_WHAT, DRIFT_VARIABLES, SCHEMA  # noqa: E402
from dcvla.recording import record_episode, recorder_for  # noqa: E402

ITEM_BYTES = {"reuse": 1, "tower_reuse": 1, "pixel_dynamic": 1, "attn_relevant": 1, "keyframe": 1, "reuse_by_layer": 1, "staleness": 4,
              "text_to_vision": 2, "action": 4, "action_tokens": 4, "action_logits": 4, "flops": 8, "latency_ms": 4, "q_drift": 2,
              "k_drift": 2, "v_drift": 2, "action_ref": 4, "logit_kl": 4}


def bytes_per_frame(preset: str, drift: bool) -> int:
    """Uncompressed bytes of one recorded frame (default variables, optionally drift) from the schema."""
    cfg = get_preset(preset)
    sizes = {"patch": cfg.num_patches, "tower": 3, "layer": max(cfg.dino.num_layers_run, cfg.siglip.num_layers_run,
             cfg.llm.num_layers), "head": cfg.llm.num_heads, "action_dim": cfg.action_dim, "stage": 6, "metric": 2,
             "action_bin": cfg.n_action_bins}
    names = [v for group in DEFAULT_WHAT for v in SCHEMA.groups[group]]
    names += list(DRIFT_VARIABLES) if drift else []
    return sum(ITEM_BYTES[n] * int(np.prod([sizes[d] for d in SCHEMA.dims_of(n)])) for n in names)


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--method", default="dual_cache")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = parser.parse_args(argv)
    episode = load_episode(list_episodes(suite="libero_spatial")[0])
    frames = first_frames(episode, args.frames)
    base = CachedPolicy.from_preset(args.preset, config=CacheConfig("vanilla"))
    place_model(base.model, args.device, DTYPES[args.dtype])
    policies = {name: base.with_config(CacheConfig(method=args.method)) for name in ("plain", "detached", "recording")}
    with recorder_for(policies["detached"]):
        policies["detached"].step(frames[0], episode.instruction)
    recorder = recorder_for(policies["recording"]).__enter__()
    for p in policies.values():
        p.reset()
    ms = {name: [] for name in policies}
    names = list(policies)
    try:
        for i, frame in enumerate(frames):
            for name in names[i % 3:] + names[: i % 3]:
                timed = {}
                with timer(args.device, timed):
                    policies[name].step(frame, episode.instruction)
                ms[name].append(timed["ms"])
    finally:
        recorder.__exit__(None, None, None)
    plain = statistics.median(ms["plain"])
    print(f"preset {args.preset}, {args.device} {args.dtype}, method {args.method}, {len(frames)} frames of {episode.name}, "
          "interleaved")
    print("| policy | median step ms | vs plain |\n|---|---|---|")
    for name, values in ms.items():
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / plain - 1:+.1%} |")

    with tempfile.TemporaryDirectory() as tmp:
        disk = {}
        for drift in (False, True):
            path = record_episode(policies["plain"], frames, episode.instruction, Path(tmp) / f"drift{drift}.nc", drift=drift)
            disk[drift] = path.stat().st_size / len(frames)
    print("\n| bytes per frame | default recording | + drift |\n|---|---|---|")
    print(f"| {args.preset}, on disk (compressed netCDF) | {disk[False]:,.0f} | {disk[True]:,.0f} |")
    for preset in (args.preset, "openvla-7b"):
        print(f"| {preset}, from shapes (uncompressed) | {bytes_per_frame(preset, False):,} | {bytes_per_frame(preset, True):,} |")
    return ms


if __name__ == "__main__":
    main()
