"""Host-device synchronisations in one non-keyframe `CachedPolicy.step` (or `OFTCachedPolicy.step` with an `oft-*`
preset), per method.

On a GPU, an op whose result the host must see (a data-dependent shape, a Python number or bool, a copy to host
memory) waits for every kernel queued before it: the host stops feeding the device. This script counts the ops of
one step that would do so, running on the CPU (or on any device) under `torch.profiler`, so the count needs no GPU
and is deterministic (it can be, and is, a test: `tests/test_host_syncs.py`).

Which step: `reset()`, then frames 0 and 1 of a shipped LIBERO episode (`--episode`, default the first shipped
one; the protocol's center crop), then the step of frame 2 is counted. With the default `keyframe_interval=3`
frame 2 is not a keyframe, and VLA-Cache has a previous frame and its attention entropies, so every method runs
its reuse path (the script prints how many vision tokens the counted step reused).

Counting rule. One count per event of either kind:
1. an ATen op the profiler records that synchronises when its input lives on a GPU: `aten::nonzero` (what
   boolean-mask indexing, `aten::index` / `aten::index_put_` with a bool index, runs underneath),
   `aten::_local_scalar_dense` (`.item()`, `int()`, `float()`, `bool()` of a tensor; also seen as `aten::item` or
   `aten::is_nonzero` around it), `aten::is_nonzero`, `aten::equal`, `aten::masked_select`, and the `unique`
   family (`aten::_unique`, `aten::_unique2`, `aten::unique_dim`, `aten::unique_consecutive`). Only the outermost
   such op of a nest counts: `bool(t)` is one count (`aten::is_nonzero` around `aten::item` around
   `aten::_local_scalar_dense`), and so is `t[mask]` (`aten::index` around `aten::nonzero`).
2. a copy to host memory, which the profiler does not see on a CPU (there it is a no-op): a call of
   `Tensor.cpu()` or `Tensor.tolist()`, caught with a `TorchFunctionMode`. (`Tensor.numpy()` and `np.asarray(t)`
   need a tensor in host memory already, so on a GPU the `.cpu()` before them is what synchronises.)
Every tensor is taken to live on the device: a host-side tensor op (an `int()` of a CPU mask's sum, say) counts as
if it ran on the device, so the engine keeps its host-side decisions in numpy. Not seen on a CPU: a copy written
`.to("cpu")`, or one skipped by a device test (`ttf_selector.on_host`, which the engine uses only on tensors it has
already read to the host). Not counted: host-to-device copies (on a GPU, `.to(device)` from pageable memory waits
for the stream too; the engine's are the frame's inputs, and the row plans' index tensors go through pinned
memory without blocking, `dcvla.kv_store.to_device`), the stage clock's own synchronisations on CUDA (timing, by
design), and whatever a recorder does (none is attached here). `--device cuda` also counts the synchronisations
CUDA itself reports (`torch.cuda.set_sync_debug_mode`), which include all of these.

    python benchmarks/host_syncs.py --preset small
    python benchmarks/host_syncs.py --preset tiny --methods dual_cache --sites      # where each count comes from
    python benchmarks/host_syncs.py --preset small --device cuda --dtype bfloat16
    python benchmarks/host_syncs.py --preset oft-tiny      # OpenVLA-OFT (the agent view stands in for the wrist view)
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _setup import DTYPES, OFT_NOTE, base_policy, has_wrist, is_oft, place_model, step_inputs  # noqa: E402

from dcvla.libero.episodes import list_episodes, load_episode  # noqa: E402
from dcvla.libero.protocol import policy_input  # noqa: E402
from dcvla.openvla import METHODS, CacheConfig  # noqa: E402

SYNC_OPS = frozenset({
    "aten::nonzero", "aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal",
    "aten::masked_select", "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive",
})
HOST_READS = frozenset({"tolist", "cpu"})
LIMIT = 16          # the most a step may make (the target), for every method
COUNTED_FRAME = 2   # frames 0 and 1 are stepped first
SITE = "site: "     # --sites: profiler ranges naming the dcvla line of each torch call


class _HostReads(TorchFunctionMode):
    """Counts `Tensor.cpu()` and `Tensor.tolist()` calls (copies to host memory) and where they come from."""

    def __init__(self, sites: bool) -> None:
        super().__init__()
        self.sites = sites
        self.calls: list[tuple[str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if not self.sites:
            if name in HOST_READS:
                self.calls.append((f"Tensor.{name}", ""))
            return func(*args, **(kwargs or {}))
        site = _caller(traceback.extract_stack()[:-1])
        if name in HOST_READS:
            self.calls.append((f"Tensor.{name}", site))
        with record_function(SITE + site):  # the profiler's sync events below it are attributed to this site
            return func(*args, **(kwargs or {}))


def _caller(stack) -> str:
    """The innermost frame of dcvla's own code (else the innermost frame) of a stack."""
    frames = [f for f in stack if "/dcvla/" in f.filename.replace(os.sep, "/")] or list(stack)
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} {f.name}"


def _outermost_syncs(events) -> list:
    out = []
    for e in events:
        if e.name not in SYNC_OPS:
            continue
        parent = e.cpu_parent
        while parent is not None and parent.name not in SYNC_OPS:
            parent = parent.cpu_parent
        if parent is None:
            out.append(e)
    return out


def _event_site(event) -> str:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(SITE):
        parent = parent.cpu_parent
    return parent.name.removeprefix(SITE) if parent is not None else "?"


def count(fn, device: torch.device | str = "cpu", sites: bool = False) -> dict:
    """Run `fn()` under the counter: {"total", "by_op", "by_site", "cuda", "result"} (cuda: the synchronisations
    CUDA itself reports when `device` is a GPU, else None; result: what fn returned)."""
    cuda = torch.device(device).type == "cuda"
    reads = _HostReads(sites)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof, reads:
                result = fn()
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    syncs = _outermost_syncs(prof.events())
    by_op = collections.Counter(e.name for e in syncs) + collections.Counter(name for name, _ in reads.calls)
    by_site = collections.Counter()
    if sites:
        by_site = collections.Counter(f"{e.name} @ {_event_site(e)}" for e in syncs)
        by_site += collections.Counter(f"{name} @ {site}" for name, site in reads.calls)
    cuda_syncs = sum("synchroniz" in str(w.message) for w in caught) if cuda else None
    return {"total": sum(by_op.values()), "by_op": dict(by_op), "by_site": dict(by_site), "cuda": cuda_syncs,
            "result": result}


def count_step(policy, step_args: tuple, sites: bool = False) -> dict:
    """`count` of one `policy.step(*step_args)`."""
    return count(lambda: policy.step(*step_args), policy.model.device, sites)


def count_method(base, method: str, steps: list[tuple], sites: bool = False) -> dict:
    """`count_step` of frame COUNTED_FRAME after stepping the frames before it, for one method on `base`'s model.

    Args:
        base: a `CachedPolicy` or `OFTCachedPolicy`.
        steps: each frame's `policy.step` arguments (`_setup.step_inputs`).
    """
    policy = base.with_config(CacheConfig(method))
    policy.reset()
    for step_args in steps[:COUNTED_FRAME]:
        policy.step(*step_args)
    result = count_step(policy, steps[COUNTED_FRAME], sites)
    record = policy.records[-1]
    result["reused_tokens"] = int(record.llm_reuse.any(0).sum())
    result["reused_patches"] = int(record.selection.reuse.sum()) if record.selection is not None else 0
    result["keyframe"] = bool(record.selection.keyframe) if record.selection is not None else False
    return result


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--episode", type=int, default=0, help="index into the shipped episodes (sorted by name)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--sites", action="store_true", help="also list where each count comes from")
    args = parser.parse_args(argv)
    base = base_policy(args.preset)
    place_model(base.model, args.device, DTYPES[args.dtype])
    episode = load_episode(list_episodes()[args.episode])
    steps = step_inputs(base, episode, COUNTED_FRAME + 1, policy_input)
    print(f"torch {torch.__version__}, preset {args.preset}, {args.device} {args.dtype}, episode {episode.name}, "
          f"counted: frame {COUNTED_FRAME}")
    if is_oft(args.preset):
        print(f"wrist view: {'recorded' if has_wrist(episode) else 'none, the agent view stands in'}. {OFT_NOTE}")
    results = {}
    cuda_col = " | CUDA-reported" if base.model.device.type == "cuda" else ""
    print(f"\n| method | syncs per step | LLM tokens reused | patches reused{cuda_col} | by op |")
    print("|---|---|---|---|" + ("---|" if cuda_col else "") + "---|")
    for method in args.methods:
        r = results[method] = count_method(base, method, steps, args.sites)
        ops = ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in sorted(r["by_op"].items(), key=lambda kv: -kv[1]))
        cuda = f" | {r['cuda']}" if cuda_col else ""
        print(f"| {method} | {r['total']} | {r['reused_tokens']} | {r['reused_patches']}{cuda} | {ops or '-'} |",
              flush=True)
        if args.sites:
            for site, n in sorted(r["by_site"].items(), key=lambda kv: -kv[1]):
                print(f"    {n:4d}  {site}")
    worst = max(r["total"] for r in results.values())
    print(f"\nmost per step: {worst} (limit {LIMIT})")
    return results


if __name__ == "__main__":
    main()
