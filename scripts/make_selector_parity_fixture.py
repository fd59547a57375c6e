"""Build the selector parity fixture ``tests/fixtures/selector_parity/`` by running upstream's own selection code.

The baselines dcvla compares the dual cache with must select what their authors' code selects. This script runs
that code itself, copied unchanged out of the fetched repositories at pinned commits into a temporary folder:

* TTF-VLA (PKU-XLab/TTF-VLA @ afbd6bf) ``experiments/robot/aptube_manager.py``: the ``APTubeManager`` whose
  ``get_pixel_recompute_mask`` / ``get_attention_recompute_mask`` / ``get_hybrid_recompute_mask`` give one
  recompute mask per tower, driven frame by frame as ``prismatic/extern/hf/modeling_prismatic.py`` drives it
  (``is_keyframe`` first, ``update_cache`` after the frame, ``last_attention_layers`` = the prefill's attentions);
* VLA-Cache (siyuhsu/vla-cache @ a490988, its HEAD) ``src/openvla/experiments/robot/vla_cache_utils.py``:
  ``find_static_patches`` with ``top_k=130`` and ``task_relevant_selection`` with its default ``top_k=120``, as
  ``src/openvla/experiments/robot/openvla_utils.py`` calls them, and ``get_layer_mask_schedule``;
* the pruning block of VLA-Cache's transformers fork (siyuhsu/vla-cache @ 07ffe25,
  ``src/transformers/src/transformers/models/llama/modeling_llama.py``, ``LlamaModel.forward``: the
  ``if self.config.proportion_attn_var is not None ...`` block and ``self.pruning_loc``), cut out of the file by
  its first and last lines, dedented and executed once per layer on the variables it reads; the positions it
  keeps per layer are the per-layer reuse.

Stubs: none. Every import of the copied code (torch, numpy, cv2, PIL, skimage) is the real package; the pruning
block is executed with a stand-in ``self`` holding only the three attributes it reads (``config.
proportion_attn_var``, ``config.reusable_patches``, ``pruning_loc``) and ``causal_mask=None``.

Inputs (saved in the fixture, so the test feeds dcvla exactly these):
* frames: 8 consecutive frames each of two shipped episodes (``data/episodes``), decoded and resized to 224 with
  PIL bicubic, uint8; the towers' inputs are ``((frame / 255 - mean) / std)`` per tower (DINOv2: ImageNet mean and
  std; SigLIP: 0.5, 0.5) in float32, cast to bfloat16 as TTF's runs feed them;
* one fixed prefill attention, 16 layers x 2 heads over 1 + 256 + 38 positions, causal, bfloat16: random logits
  of 7 levels with a per-layer temperature (so the entropy schedule is not flat), and at layer 15 text rows whose vision
  columns come in groups of equal logits, so relevance ties straddle both top-k cutoffs (70 and 120);
* per VLA-Cache pair, which rows the previous prefill computed at each layer: every row after a keyframe, else
  the rows upstream's pruning block kept for the previous pair (VLA-Cache's prefill returns only those rows; its
  last element is the kept positions, which ``token_attention_merge`` uses to find the text rows);
* two made pairs (frame 0, then frame 0 with uniform noise outside some patches; `made_frames`, indexed after
  `frames`): one whose static patches are all among the 120 most attended (upstream's pruning block then
  raises a TypeError on ``len(None)``; recorded as such) and one with nothing static.

The OpenVLA-OFT path (keys ``oft_*``), as VLA-Cache's ``src/openvla-oft/experiments/robot/openvla_utils.py``
(``get_vla_action``) runs it with that path's own ``vla_cache_utils.py``: per image ``find_static_patches(...,
top_k=150)`` and ``task_relevant_selection(prev_attn, ..., primary=True / False)`` (its default ``top_k=100``), whose
``token_attention_merge`` reads the rows at positions [513, 513 + 34) and the image's vision columns (1..256 or
257..512); the two images' remaining positions concatenated (``primary + wrist``: already sorted); one
``get_layer_mask_schedule(prev_attn)`` over every row; then the pruning block. The third-person frames are the
first episode's 8, the wrist frames the second episode's 8 (two different scenes, so the images' masks differ); the
pairs are consecutive frames. One fixed bidirectional attention (no causal mask, as OFT runs it) over OFT's sequence
[BOS] + 512 vision + proprio + 25 prompt tokens + 56 action slots + STOP (596 positions), 16 layers x 2 heads,
rows repeated in blocks of 8 (it compresses; every row is still read) except layer 15's rows [513, 547), whose
vision columns tie in groups across ranks 100 and 120 of each image. The OFT fork of the transformers library
(siyuhsu/transformers, branch vla-cache-openvla-oft) is not in the mirror; its pruning block is taken from the
OpenVLA fork above (the stored siyuhsu/transformers @ 2302fce holds the same block, line for line).

Run it in a throwaway environment (never the project's venv)::

    python3.11 -m venv /tmp/selvenv
    /tmp/selvenv/bin/pip install torch==2.13.0 numpy opencv-python-headless scikit-image pillow
    /tmp/selvenv/bin/python scripts/make_selector_parity_fixture.py \\
        --ttf-repo PATH/TO/TTF-VLA --vla-cache-repo PATH/TO/vla-cache      # git folders (bare mirrors work)

Outputs ``tests/fixtures/selector_parity/{inputs,upstream}.npz`` and ``meta.json``; deterministic; a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import re
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TTF_COMMIT = "afbd6bf38fa08b6c5895f58677fe241ce9607100"
TTF_FILE = "experiments/robot/aptube_manager.py"
VLA_CACHE_COMMIT = "a4909880573868dee2769343d52e793c0341678b"
VLA_CACHE_FILE = "src/openvla/experiments/robot/vla_cache_utils.py"
CALLER_FILE = "src/openvla/experiments/robot/openvla_utils.py"
FORK_COMMIT = "07ffe2556ce124881b14864f9c3cc42ccc9b89a6"
FORK_FILE = "src/transformers/src/transformers/models/llama/modeling_llama.py"
BLOCK_FIRST = "if self.config.proportion_attn_var is not None and inputs_embeds.size(1) != 1 and layer_idx in self.pruning_loc:"
BLOCK_AFTER = "if hidden_states.shape[1] !=1:"
STUBS: tuple[str, ...] = ()  # no import of the copied code is stubbed

EPISODES = (("libero_spatial_task00_init00", 30), ("libero_goal_task06_init00", 40))  # (episode, first frame)
FRAMES_PER_EPISODE = 8
LAYERS, HEADS, TEXT = 16, 2, 38
SEQ = 1 + 256 + TEXT
MEANS = {"dino": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), "siglip": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
TTF_SETTINGS = dict(aptube_enabled=True, patch_diff_threshold=0.03, keyframe_interval=3, fusion_mode="hybrid",
                    attention_top_k=70, attention_layer_id=15)  # TTF README's LIBERO settings
VLA_CACHE_TOP_K_STATIC = 130  # openvla_utils.py at VLA_CACHE_COMMIT: find_static_patches(image, prev_image, top_k=130)
RELEVANCE_CUTOFFS = (70, 120)
OFT_VLA_CACHE_FILE = "src/openvla-oft/experiments/robot/vla_cache_utils.py"
OFT_CALLER_FILE = "src/openvla-oft/experiments/robot/openvla_utils.py"
OFT_CALLS = (  # get_vla_action at VLA_CACHE_COMMIT, as the script calls them
    "find_static_patches(all_images[0], prev_images[0], top_k=150)",
    "find_static_patches(all_images[1], prev_images[1], top_k=150)",
    "prev_attn, result_image[0], stable_patches_primary, primary=True",
    "prev_attn, result_image[1], stable_patches_wrist, primary=False",
    "final_static_token_indices = remaining_static_tokens_primary + remaining_static_tokens_wrist",
    "get_layer_mask_schedule(prev_attn)",
)
OFT_TOP_K_STATIC, OFT_REMOVE = 150, 100  # the calls above; task_relevant_selection's default top_k
OFT_TEXT_START, OFT_TEXT_ROWS = 513, 34  # token_attention_merge in OFT_VLA_CACHE_FILE
OFT_PROMPT = 25                          # prompt tokens after BOS in the made sequence
OFT_SEQ = 1 + 512 + 1 + OFT_PROMPT + 56 + 1
ROW_BLOCK = 8
OFT_CUTOFFS = (100, 120)


def git_show(repo: Path, commit: str, path: str) -> str:
    return subprocess.run(["git", f"--git-dir={git_dir(repo)}", "show", f"{commit}:{path}"], check=True,
                          capture_output=True, text=True).stdout


def git_dir(repo: Path) -> Path:
    return repo / ".git" if (repo / ".git").exists() else repo


def import_copy(folder: Path, name: str, source: str):
    path = folder / f"{name}.py"
    path.write_text(source)  # byte for byte what the repository holds at the commit
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pruning_block(fork_source: str) -> tuple[object, list[int]]:
    """The fork's pruning block, compiled, and its `pruning_loc`."""
    lines = fork_source.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip() == BLOCK_FIRST)
    after = next(i for i in range(first + 1, len(lines)) if lines[i].strip() == BLOCK_AFTER)
    block = textwrap.dedent("\n".join(lines[first:after]))
    loc = re.search(r"self\.pruning_loc = (\[[\d, ]+\])", fork_source)
    return compile(block, f"{FORK_FILE}@{FORK_COMMIT[:7]}", "exec"), json.loads(loc.group(1))


class _Config:
    proportion_attn_var = None
    reusable_patches = None


class _Self:
    """Stand-in for LlamaModel: the only attributes the pruning block reads."""

    def __init__(self, pruning_loc: list[int], schedule: torch.Tensor, reusable: torch.Tensor | None) -> None:
        self.config, self.pruning_loc = _Config(), pruning_loc
        self.config.proportion_attn_var, self.config.reusable_patches = schedule, reusable


def run_pruning(code, pruning_loc, schedule, reusable, seq: int = SEQ) -> np.ndarray:
    """The positions the pruning block keeps at each layer -> [layer, seq] bool."""
    scope = {"torch": torch, "self": _Self(pruning_loc, schedule, reusable), "inputs_embeds": torch.zeros(1, seq, 1),
             "hidden_states": torch.zeros(1, seq, 1), "causal_mask": None, "cache_position": torch.arange(seq),
             "position_ids": torch.arange(seq)[None], "last_reusable_patches": None}
    kept = np.zeros((LAYERS, seq), bool)
    for layer in range(LAYERS):
        scope["layer_idx"] = layer
        exec(code, scope)
        kept[layer, scope["cache_position"].numpy()] = True
    return kept


def load_frames(repo_root: Path) -> np.ndarray:
    frames = []
    for name, start in EPISODES:
        with np.load(repo_root / "data" / "episodes" / f"{name}.npz", allow_pickle=False) as z:
            blob, off = z["jpeg"].tobytes(), z["jpeg_offsets"]
            for i in range(start, start + FRAMES_PER_EPISODE):
                image = Image.open(io.BytesIO(blob[off[i]:off[i + 1]])).convert("RGB")
                frames.append(np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC)))
    return np.stack(frames)  # [frame, 224, 224, 3] uint8


def pixel_values(frame: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(frame).permute(2, 0, 1).float() / 255.0  # [3, H, W]
    towers = [(x - torch.tensor(m).view(3, 1, 1)) / torch.tensor(s).view(3, 1, 1) for m, s in MEANS.values()]
    return torch.cat(towers)[None].to(torch.bfloat16)  # [1, 6, H, W]


def tied_levels(g: torch.Generator, cutoffs: tuple[int, ...]) -> torch.Tensor:
    """[256] vision logits of evenly spaced levels in random order, equal within groups of 8 that straddle each
    rank in `cutoffs`, so the relevance ties across every top-k cutoff."""
    order = torch.randperm(256, generator=g)
    level = torch.empty(256)
    level[order] = torch.linspace(3.0, -3.0, 256)
    for cutoff in cutoffs:
        group = order[cutoff - 4 : cutoff + 4]
        level[group] = level[group].mean()
    return level


def make_attention(seed: int = 0) -> torch.Tensor:
    """[layer, head, seq, seq] causal attention probabilities, bfloat16."""
    g = torch.Generator().manual_seed(seed)
    # 7 logit levels: each row's probabilities take few values, so the saved bits compress well
    logits = torch.randint(-3, 4, (LAYERS, HEADS, SEQ, SEQ), generator=g).float()
    logits *= torch.linspace(0.5, 4.0, LAYERS).view(LAYERS, 1, 1, 1)  # sharper with depth: entropies differ
    # layer 15, text rows: vision logits tie across ranks 70 and 120; a row offset keeps the ties
    logits[15, :, 257:, 1:257] = tied_levels(g, RELEVANCE_CUTOFFS) + torch.randn(HEADS, TEXT, 1, generator=g)
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).to(torch.bfloat16)


def run_ttf(ttf, frames: np.ndarray, attention: torch.Tensor) -> dict[str, np.ndarray]:
    """TTF's manager over each episode's frames; per frame: keyframe flag, per tower pixel / attention / final
    recompute masks (all True on keyframes, as the model recomputes everything there)."""
    manager, layers = ttf.APTubeManager(), tuple(attention[layer][None] for layer in range(LAYERS))
    out = {k: [] for k in ("keyframe", "pixel_recompute", "attention_recompute", "recompute", "pixel_diff")}
    for e in range(len(EPISODES)):
        manager.configure(**TTF_SETTINGS)
        manager.last_attention_layers = None
        for f in range(FRAMES_PER_EPISODE):
            pv = pixel_values(frames[e * FRAMES_PER_EPISODE + f])
            keyframe = manager.is_keyframe()
            ones = (torch.ones(256, dtype=torch.bool),) * 2
            pixel = manager.get_pixel_recompute_mask(pv) if not keyframe else ones
            diff = manager.get_pixel_diff_values_for_visualization() if not keyframe else torch.zeros(256)
            attn = manager.get_attention_recompute_mask() if not keyframe else ones
            final = manager.get_hybrid_recompute_mask(pv) if not keyframe else ones
            manager.update_cache(pixel_values=pv, vision_tokens=torch.zeros(1, 256, 1), shallow_features=None)
            manager.last_attention_layers = layers  # this frame's prefill attention, for the next frame
            out["keyframe"].append(keyframe)
            out["pixel_recompute"].append(torch.stack(pixel).numpy())
            out["attention_recompute"].append(torch.stack(attn).numpy())
            out["recompute"].append(torch.stack(final).numpy())
            out["pixel_diff"].append(diff.float().numpy())
    return {f"ttf_{k}": np.asarray(v) for k, v in out.items()}


def vla_cache_pair(vc, code, loc, prev, cur, attention, rows) -> dict:
    """One VLA-Cache step as openvla_utils.get_vla_action runs it, given the previous prefill's kept rows."""
    prev_attn = tuple(attention[layer][:, torch.from_numpy(rows[layer])][None] for layer in range(LAYERS))
    prev_attn += (torch.from_numpy(np.flatnonzero(rows[-1])),)  # the fork appends the final cache_position
    image, prev_image = Image.fromarray(cur), Image.fromarray(prev)
    stable = vc.find_static_patches(image, prev_image, top_k=VLA_CACHE_TOP_K_STATIC)
    removed = vc.get_top_attention_patches(vc.token_attention_merge(prev_attn), 120)
    _, remaining = vc.task_relevant_selection(prev_attn, image, stable)
    mask_indices = torch.tensor(remaining) if remaining else None
    schedule = vc.get_layer_mask_schedule(prev_attn)
    try:
        kept, error = run_pruning(code, loc, schedule, mask_indices), ""
    except TypeError as exc:  # len(None): nothing left to reuse
        kept, error = np.ones((LAYERS, SEQ), bool), f"TypeError: {exc}"
    return {"stable": stable, "removed": removed, "remaining": remaining, "schedule": schedule.numpy(),
            "kept": kept, "error": error}


def run_vla_cache(vc, code, loc, frames, attention) -> tuple[dict, list[dict]]:
    """Consecutive pairs of each episode, then the two made pairs -> (inputs: the made frames, each pair's frame
    indices and the previous prefill's rows; upstream's result per pair)."""
    pairs, prev_rows, index = [], [], []
    full = np.ones((LAYERS, SEQ), bool)
    for e in range(len(EPISODES)):
        rows = full  # the episode's first prefill computes every row
        for f in range(1, FRAMES_PER_EPISODE):
            i = e * FRAMES_PER_EPISODE + f
            result = vla_cache_pair(vc, code, loc, frames[i - 1], frames[i], attention, rows)
            pairs.append(result), prev_rows.append(rows), index.append((i - 1, i))
            rows = result["kept"]
    relevance = vc.token_attention_merge(tuple(attention[layer][None] for layer in range(LAYERS)) +
                                         (torch.arange(SEQ),))
    top = vc.get_top_attention_patches(relevance, 20)
    made = []
    for keep in (top, []):  # frame 0 with noise everywhere but `keep`: static = 20 of the most attended; nothing
        noisy = np.random.default_rng(len(keep)).integers(0, 256, frames[0].shape, dtype=np.uint8)
        for p in keep:
            r, c = divmod(p, 16)
            noisy[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = frames[0][r * 14:(r + 1) * 14, c * 14:(c + 1) * 14]
        pairs.append(vla_cache_pair(vc, code, loc, frames[0], noisy, attention, full))
        prev_rows.append(full), index.append((0, len(frames) + len(made)))
        made.append(noisy)
    inputs = {"made_frames": np.stack(made), "vla_pairs": np.array(index), "vla_prev_rows": np.stack(prev_rows)}
    return inputs, pairs


def make_oft_attention(seed: int = 1) -> torch.Tensor:
    """[layer, head, seq, seq] bidirectional attention probabilities over OFT's sequence, bfloat16."""
    g = torch.Generator().manual_seed(seed)
    blocks = -(-OFT_SEQ // ROW_BLOCK)
    logits = torch.randint(-3, 4, (LAYERS, HEADS, blocks, OFT_SEQ), generator=g).float()
    logits = logits.repeat_interleave(ROW_BLOCK, dim=2)[:, :, :OFT_SEQ]  # rows repeat in blocks: it compresses
    logits *= torch.linspace(0.5, 4.0, LAYERS).view(LAYERS, 1, 1, 1)  # sharper with depth: entropies differ
    rows = slice(OFT_TEXT_START, OFT_TEXT_START + OFT_TEXT_ROWS)
    for image in range(2):  # each image's vision columns of the relevance rows: ties straddle ranks 100 and 120
        columns = slice(1 + 256 * image, 257 + 256 * image)
        logits[15, :, rows, columns] = tied_levels(g, OFT_CUTOFFS) + torch.randn(HEADS, OFT_TEXT_ROWS, 1, generator=g)
    return torch.softmax(logits, dim=-1).to(torch.bfloat16)  # no causal mask: OFT attends both ways


def oft_pair(vc, code, loc, prev: list[np.ndarray], cur: list[np.ndarray], attention, rows) -> dict:
    """One VLA-Cache step as the OFT path's get_vla_action runs it (third-person, wrist), given the previous
    prefill's kept rows."""
    prev_attn = tuple(attention[layer][:, torch.from_numpy(rows[layer])][None] for layer in range(LAYERS))
    prev_attn += (torch.from_numpy(np.flatnonzero(rows[-1])),)  # the fork appends the final cache_position
    images, prev_images = [Image.fromarray(c) for c in cur], [Image.fromarray(p) for p in prev]
    stable = [vc.find_static_patches(images[i], prev_images[i], top_k=OFT_TOP_K_STATIC) for i in range(2)]
    remaining = [vc.task_relevant_selection(prev_attn, images[i], stable[i], primary=i == 0)[1] for i in range(2)]
    final = remaining[0] + remaining[1]
    mask_indices = torch.tensor(final) if final else None
    schedule = vc.get_layer_mask_schedule(prev_attn)
    removed = [vc.get_top_attention_patches(vc.token_attention_merge(prev_attn, primary=i == 0), OFT_REMOVE)
               for i in range(2)]
    try:
        kept, error = run_pruning(code, loc, schedule, mask_indices, OFT_SEQ), ""
    except TypeError as exc:  # len(None): nothing left to reuse
        kept, error = np.ones((LAYERS, OFT_SEQ), bool), f"TypeError: {exc}"
    return {"stable": stable, "removed": removed, "remaining": final, "schedule": schedule.numpy(), "kept": kept,
            "error": error}


def run_oft(vc, code, loc, frames: np.ndarray, attention) -> tuple[dict, dict]:
    """Consecutive pairs: third-person = the first episode's frames, wrist = the second's -> (inputs, upstream)."""
    n = FRAMES_PER_EPISODE
    rows, pairs, prev_rows, index = np.ones((LAYERS, OFT_SEQ), bool), [], [], []
    for f in range(1, n):
        ids = [(f - 1, f), (n + f - 1, n + f)]  # [image][prev, cur] frame indices
        result = oft_pair(vc, code, loc, [frames[i] for i, _ in ids], [frames[j] for _, j in ids], attention, rows)
        pairs.append(result), prev_rows.append(rows), index.append(ids)
        rows = result["kept"]

    def per_image(key: str) -> np.ndarray:
        return np.stack([np.concatenate([as_mask(p[key][i]) for i in range(2)]) for p in pairs])  # [pair, 512]

    inputs = {"oft_pairs": np.array(index), "oft_prev_rows": np.stack(prev_rows)}
    upstream = {
        "oft_static": per_image("stable"), "oft_removed": per_image("removed"),
        "oft_reusable": np.stack([as_mask(p["remaining"], offset=1, n=512) for p in pairs]),
        "oft_schedule": np.stack([p["schedule"] for p in pairs]).astype(np.float32),
        "oft_layer_reuse": np.stack([~p["kept"][:, 1:513] for p in pairs]),  # [pair, layer, vision]
        "oft_raises": np.array([bool(p["error"]) for p in pairs]),
    }
    return inputs, upstream


def as_mask(ids, offset: int = 0, n: int = 256) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[np.asarray(list(ids), dtype=int) - offset] = True
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ttf-repo", type=Path, required=True, help="a git folder of PKU-XLab/TTF-VLA")
    parser.add_argument("--vla-cache-repo", type=Path, required=True, help="a git folder of siyuhsu/vla-cache")
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--out", type=Path, default=root / "tests" / "fixtures" / "selector_parity")
    args = parser.parse_args()
    caller = git_show(args.vla_cache_repo, VLA_CACHE_COMMIT, CALLER_FILE)
    assert f"find_static_patches(image, prev_image, top_k={VLA_CACHE_TOP_K_STATIC})" in caller
    oft_caller = git_show(args.vla_cache_repo, VLA_CACHE_COMMIT, OFT_CALLER_FILE)
    assert all(call in oft_caller for call in OFT_CALLS), [c for c in OFT_CALLS if c not in oft_caller]
    with tempfile.TemporaryDirectory() as tmp:
        ttf = import_copy(Path(tmp), "aptube_manager", git_show(args.ttf_repo, TTF_COMMIT, TTF_FILE))
        vc = import_copy(Path(tmp), "vla_cache_utils", git_show(args.vla_cache_repo, VLA_CACHE_COMMIT, VLA_CACHE_FILE))
        oft_vc = import_copy(Path(tmp), "oft_vla_cache_utils",
                             git_show(args.vla_cache_repo, VLA_CACHE_COMMIT, OFT_VLA_CACHE_FILE))
        code, loc = pruning_block(git_show(args.vla_cache_repo, FORK_COMMIT, FORK_FILE))
        frames, attention, oft_attention = load_frames(root), make_attention(), make_oft_attention()
        with contextlib.redirect_stdout(io.StringIO()):  # upstream prints a debug line per call
            ttf_out = run_ttf(ttf, frames, attention)
            vla_inputs, pairs = run_vla_cache(vc, code, loc, frames, attention)
            oft_inputs, oft_upstream = run_oft(oft_vc, code, loc, frames, oft_attention)
    upstream = {
        **ttf_out,
        "vla_static": np.stack([as_mask(p["stable"]) for p in pairs]),
        "vla_removed": np.stack([as_mask(p["removed"]) for p in pairs]),
        "vla_reusable": np.stack([as_mask(p["remaining"], offset=1) for p in pairs]),
        "vla_schedule": np.stack([p["schedule"] for p in pairs]).astype(np.float32),
        "vla_layer_reuse": np.stack([~p["kept"][:, 1:257] for p in pairs]),  # [pair, layer, patch]
        "vla_raises": np.array([bool(p["error"]) for p in pairs]),
    }
    # the fixture must contain what the test claims to cover
    assert upstream["vla_raises"][-2:].all() and not upstream["vla_raises"][:-2].any()
    assert upstream["vla_layer_reuse"][:-2].any() and upstream["vla_static"][-2].any() and not upstream["vla_static"][-1].any()
    assert (~upstream["ttf_recompute"][:, 0] != ~upstream["ttf_recompute"][:, 1]).any(), "no frame where the towers differ"
    assert oft_upstream["oft_layer_reuse"].any() and not oft_upstream["oft_raises"].any()
    assert (oft_upstream["oft_static"].reshape(-1, 2, 256).sum(-1) > 130).any(), "the 150 cap is never above OpenVLA's 130"
    bits = attention.view(torch.int16).numpy().view(np.uint16)
    oft_bits = oft_attention.view(torch.int16).numpy().view(np.uint16)
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "inputs.npz", frames=frames, attention_bf16_bits=bits, **vla_inputs,
                        oft_attention_bf16_bits=oft_bits, **oft_inputs)
    np.savez_compressed(args.out / "upstream.npz", **upstream, **oft_upstream)
    meta = {
        "made_by": "scripts/make_selector_parity_fixture.py",
        "upstream": {"ttf": {"repo": "PKU-XLab/TTF-VLA", "commit": TTF_COMMIT, "files": [TTF_FILE]},
                     "vla_cache": {"repo": "siyuhsu/vla-cache", "commit": VLA_CACHE_COMMIT,
                                   "files": [VLA_CACHE_FILE, CALLER_FILE]},
                     "vla_cache_pruning": {"repo": "siyuhsu/vla-cache", "commit": FORK_COMMIT, "files": [FORK_FILE]}},
        "stubs": list(STUBS),
        "episodes": [list(e) for e in EPISODES], "frames_per_episode": FRAMES_PER_EPISODE,
        "tower_mean_std": MEANS, "ttf_settings": TTF_SETTINGS,
        "vla_cache": {"top_k_static": VLA_CACHE_TOP_K_STATIC, "attention_top_k_remove": 120, "pruning_loc": loc},
        "attention": {"layers": LAYERS, "heads": HEADS, "text": TEXT, "seq": SEQ, "dtype": "bfloat16"},
        "vla_errors": [p["error"] for p in pairs],
        "oft": {"files": [OFT_VLA_CACHE_FILE, OFT_CALLER_FILE], "commit": VLA_CACHE_COMMIT, "calls": list(OFT_CALLS),
                "top_k_static": OFT_TOP_K_STATIC, "attention_top_k_remove": OFT_REMOVE,
                "text_rows": [OFT_TEXT_START, OFT_TEXT_START + OFT_TEXT_ROWS], "seq": OFT_SEQ,
                "sequence": "[BOS] + 512 vision + proprio + 25 prompt + 56 action slots + STOP; bidirectional",
                "third_person_frames": "frames[0:8]", "wrist_frames": "frames[8:16]", "row_block": ROW_BLOCK,
                "pruning_block": f"{FORK_FILE} @ {FORK_COMMIT[:7]} (OpenVLA fork; the OFT fork is not mirrored)"},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__},
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    sizes = {p.name: p.stat().st_size for p in args.out.iterdir()}
    print(f"wrote {args.out}: {sizes}; ttf frames {len(ttf_out['ttf_keyframe'])}, vla pairs {len(pairs)}, "
          f"oft pairs {len(oft_upstream['oft_raises'])}")


if __name__ == "__main__":
    main()
