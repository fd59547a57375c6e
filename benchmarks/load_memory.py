"""Peak host memory of loading a bf16 OpenVLA-layout checkpoint, against its size on disk.

For each preset a random bf16 checkpoint is written to a temporary folder (deleted afterwards) and loaded with
`load_pretrained(dtype=torch.bfloat16)` in a fresh subprocess, which reports its RSS after the imports, its peak
RSS over its life and during the load alone (the kernel's VmHWM, reset just before the load) and the bytes the
loaded model holds. (Not `ru_maxrss`: after a fork/vfork + exec it starts from the parent's peak, which here holds
the random model that was saved.) `small` is written with `save_pretrained` from a random
model; `openvla-7b` is written without ever building the model: its tensors' shapes come from the meta-device
model (`to_openvla_layout`) plus the parts OpenVLA checkpoints carry and dcvla never runs (each tower's last
block, the final norms, SigLIP's attention-pool head), each shard filled with random bf16 values as it is
written, so the folder holds the published key layout and exactly the published 15,082,474,368 bytes of weights.

`--baseline` also loads the checkpoint the way `load_pretrained` did before streaming (float32 model allocated with
`to_empty`, the whole state dict read, copied, then cast): sensible for `small` only; at 7B it needs ~45 GB.

    python benchmarks/load_memory.py --preset small --baseline
    python benchmarks/load_memory.py --preset openvla-7b          # writes ~15 GB to --tmp (default: $TMPDIR)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from dcvla.devices import place, read_header, read_tensor
from dcvla.openvla import checkpoint
from dcvla.openvla.checkpoint import TOWER_PREFIX, save_pretrained, to_openvla_layout, write_checkpoint
from dcvla.openvla.config import get_preset
from dcvla.openvla.model import OpenVLA, random_model

GB = 1e9
PUBLISHED_7B_BYTES = 15_082_474_368  # openvla/openvla-7b: 7,541,237,184 bf16 parameters


def never_run_shapes(config, layout: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Tensors OpenVLA checkpoints carry that dcvla never builds: each tower's last block (the shapes of its
    first block in `layout`, timm names), DINOv2's final norm, SigLIP's norm and attention-pool head."""
    out: dict[str, tuple[int, ...]] = {}
    for tower, cfg in (("dino", config.dino), ("siglip", config.siglip)):
        first = TOWER_PREFIX[tower] + "blocks.0."
        last = TOWER_PREFIX[tower] + f"blocks.{cfg.depth - 1}."
        out |= {last + k[len(first):]: tuple(v.shape) for k, v in layout.items() if k.startswith(first)}
        out |= {TOWER_PREFIX[tower] + f"norm.{p}": (cfg.hidden_size,) for p in ("weight", "bias")}
    s, m, pool = config.siglip.hidden_size, config.siglip.mlp_dim, TOWER_PREFIX["siglip"] + "attn_pool."
    out |= {pool + "latent": (1, 1, s), pool + "q.weight": (s, s), pool + "q.bias": (s,), pool + "kv.weight": (2 * s, s),
            pool + "kv.bias": (2 * s,), pool + "proj.weight": (s, s), pool + "proj.bias": (s,), pool + "norm.weight": (s,),
            pool + "norm.bias": (s,), pool + "mlp.fc1.weight": (m, s), pool + "mlp.fc1.bias": (m,),
            pool + "mlp.fc2.weight": (s, m), pool + "mlp.fc2.bias": (s,)}
    return out


def write_random_checkpoint(preset: str, directory: Path, max_shard_bytes: int) -> None:
    """A random bf16 checkpoint of `preset` in OpenVLA's layout, written shard by shard from shapes alone."""
    config = get_preset(preset)
    with torch.device("meta"):
        layout = to_openvla_layout(OpenVLA(config))
    shapes = {key: tuple(value.shape) for key, value in layout.items()} | never_run_shapes(config, layout)
    generator = torch.Generator().manual_seed(0)

    def make(key: str) -> torch.Tensor:
        return torch.empty(shapes[key], dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)

    stats = {"random": {"action": {"q01": [-1.0] * 7, "q99": [1.0] * 7, "mask": [True] * 6 + [False]}}}
    write_checkpoint(directory, {key: (shape, torch.bfloat16) for key, shape in shapes.items()}, make, stats, preset,
                     max_shard_bytes)


def write_small(preset: str, directory: Path, max_shard_bytes: int) -> None:
    """A random model of `preset`, saved with `save_pretrained` in bf16 (the ordinary path)."""
    save_pretrained(random_model(get_preset(preset)), directory, max_shard_bytes, dtype=torch.bfloat16)


def child(directory: str, how: str) -> None:
    """Run in the subprocess: load, then print what memory it took (JSON on the last line)."""
    before, import_peak = psutil.Process().memory_info().rss, vm_hwm()
    reset = reset_peak()
    start = time.perf_counter()
    if how == "streaming":
        model = checkpoint.load_pretrained(directory, dtype=torch.bfloat16)
    else:  # the pre-streaming loader: float32 model, whole state dict, copy, cast
        with torch.device("meta"):
            model = OpenVLA(get_preset(checkpoint.detect_preset(Path(directory))))
        model = model.to_empty(device="cpu")
        checkpoint.load_openvla_state_dict(model, checkpoint.read_state_dict(directory))
        model = place(model, dtype=torch.bfloat16)
    seconds = time.perf_counter() - start
    load_peak = vm_hwm()  # since just before the load (since the exec when the reset is refused)
    peak = max(import_peak, load_peak)
    after = psutil.Process().memory_info().rss
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    verify(model, Path(directory))
    print(json.dumps({"rss_before": before, "peak_rss": peak, "load_peak_rss": load_peak, "peak_reset": reset, "rss_after": after, "model_bytes": held,
                      "seconds": seconds, "dtype": str(model.dtype)}))


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process, so the load's own peak is read after it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def vm_hwm() -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def verify(model: OpenVLA, directory: Path) -> None:
    """The loaded values are the file's (after measuring): the projector, and DINOv2's K from a fused qkv."""
    checks = {"projector.fc1.weight": model.projector.fc1.weight,
              "vision_backbone.featurizer.blocks.0.attn.qkv.weight": model.vision_backbone.featurizer.blocks[0].attention.k_proj.weight}
    for file in sorted(directory.glob("model-*.safetensors")):
        entries = read_header(file)
        with open(file, "rb") as fh:
            for key in set(entries) & set(checks):
                value = read_tensor(fh, file, key, entries[key])
                assert torch.equal(value.chunk(3)[1] if "qkv" in key else value, checks.pop(key)), key
    assert not checks, f"not found in the checkpoint: {list(checks)}"


def measure(directory: Path, how: str) -> dict:
    """Load `directory` in a fresh interpreter; its report, and this (writing) process's RSS beside it."""
    parent_rss = psutil.Process().memory_info().rss
    proc = subprocess.run([sys.executable, __file__, "--child", str(directory), "--how", how],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"loading subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1]) | {"writer_rss": parent_rss}
    return result


def run(preset: str, tmp: str | None, max_shard_bytes: int, baseline: bool) -> list[dict]:
    directory = Path(tempfile.mkdtemp(prefix=f"dcvla-{preset}-", dir=tmp))
    try:
        start = time.perf_counter()
        (write_small if preset != "openvla-7b" else write_random_checkpoint)(preset, directory, max_shard_bytes)
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        files = sorted(directory.glob("model-*.safetensors"))
        size = {"weights": index["metadata"]["total_size"], "on_disk": sum(f.stat().st_size for f in files),
                "shards": len(files), "write_s": time.perf_counter() - start}
        if preset == "openvla-7b":
            assert size["weights"] == PUBLISHED_7B_BYTES, size
        return [{"preset": preset, "how": how, **size, **measure(directory, how)}
                for how in (["streaming", "state_dict"] if baseline else ["streaming"])]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def report(rows: list[dict]) -> None:
    print("| preset | loader | checkpoint GB (shards) | model held GB | RSS after imports | peak RSS (process) | "
          "peak RSS during load | load peak - imports | (load peak - imports) / checkpoint | load s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = r["load_peak_rss"] - r["rss_before"]
        print(f"| {r['preset']} | {r['how']} | {r['on_disk'] / GB:.3f} ({r['shards']}) | {r['model_bytes'] / GB:.3f} | "
              f"{r['rss_before'] / GB:.2f} | {r['peak_rss'] / GB:.2f} | {r['load_peak_rss'] / GB:.2f} | {extra / GB:.2f} | "
              f"{extra / r['on_disk']:.2f} | {r['seconds']:.1f} |")
    print(json.dumps(rows, indent=1), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="small (default), tiny or openvla-7b; repeatable")
    parser.add_argument("--tmp", help="parent folder of the temporary checkpoint (default: the system's)")
    parser.add_argument("--max-shard-gb", type=float, default=2.0, help="shard size when writing (default 2)")
    parser.add_argument("--baseline", action="store_true", help="also load the pre-streaming way (not at 7B)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--how", default="streaming", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.how)
    rows = [row for preset in args.preset or ["small"]
            for row in run(preset, args.tmp, int(args.max_shard_gb * 1024**3), args.baseline)]
    report(rows)


if __name__ == "__main__":
    main()
