"""VLA-Cache's token selection: static patches by raw-pixel similarity, minus the most attended, reused from a
per-layer share set by the previous frame's attention entropy.

Follows siyuhsu/vla-cache (`src/openvla/experiments/robot/vla_cache_utils.py`, `openvla_utils.py`, and the forked
`LlamaModel.forward` in `src/transformers/.../modeling_llama.py`). Patch j of the 16x16 grid (row-major, row =
image y) is LLM sequence position j + 1. Its OpenVLA-OFT path (`src/openvla-oft/experiments/robot/`) selects per
image (patch j of the wrist image is position 257 + j) and schedules the merged positions once
(`vla_cache_reusable`, `vla_cache_layer_reuse`). `tests/test_selector_parity.py` checks it against upstream's own code
(fixture: `scripts/make_selector_parity_fixture.py`). Another grid (`oft-micro`: 8 x 8 patches of 28 px) is passed as
`patch_size` and `grid`, with the counts of the config already for it (`ttf_selector.scaled_count`).

Everything here runs on the host (numpy for the data-dependent steps), from the raw frames and the previous
frame's relevance and entropies, which the policy reads from the device once per frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .ttf_selector import GRID, NUM_PATCHES, check_float, check_int, check_relevance, on_host, top_k_patches


# (static patches kept, most attended removed) as upstream runs them, per family, read at siyuhsu/vla-cache a490988:
# - "openvla": src/openvla/experiments/robot/openvla_utils.py calls find_static_patches(image, prev_image,
#   top_k=130) and task_relevant_selection(prev_attn, image, stable_patches), whose default in vla_cache_utils.py is
#   top_k=120. History of that path: (150, 100) at cfad38a, (120, 100) at b4115ff, (130, 120) from fa05c3e on.
# - "openvla-oft": src/openvla-oft/experiments/robot/openvla_utils.py calls find_static_patches(..., top_k=150) per
#   image and task_relevant_selection with its default top_k=100 (src/openvla-oft/.../vla_cache_utils.py).
UPSTREAM_CONSTANTS: dict[str, tuple[int, int]] = {"openvla": (130, 120), "openvla-oft": (150, 100)}


@dataclass(frozen=True)
class VLACacheConfig:
    similarity_threshold: float = 0.996         # patch cosine similarity >= this => static
    top_k_static: int = UPSTREAM_CONSTANTS["openvla"][0]            # keep the most similar static patches
    attention_top_k_remove: int = UPSTREAM_CONSTANTS["openvla"][1]  # never reuse the most attended patches
    prune_layers: tuple[int, ...] = (2, 6, 9, 11)  # LlamaModel.pruning_loc
    attention_layer_id: int = 15                # layer of the relevance (token_attention_merge)
    growth_factor: float = 0.55                 # damping of upward steps of the per-layer reuse share
    apply_weighted_growth: bool = True          # get_layer_mask_schedule's default

    def __post_init__(self) -> None:
        check_float("VLACacheConfig", "similarity_threshold", self.similarity_threshold, -1.0, 1.0)
        check_int("VLACacheConfig", "top_k_static", self.top_k_static, 0, NUM_PATCHES)
        check_int("VLACacheConfig", "attention_top_k_remove", self.attention_top_k_remove, 0, NUM_PATCHES)
        check_int("VLACacheConfig", "attention_layer_id", self.attention_layer_id, 0)
        check_float("VLACacheConfig", "growth_factor", self.growth_factor, 0.0, 1.0)
        if not isinstance(self.apply_weighted_growth, bool):
            raise ValueError(f"VLACacheConfig.apply_weighted_growth must be a bool, got {self.apply_weighted_growth!r}")
        layers = tuple(self.prune_layers) if isinstance(self.prune_layers, (list, tuple)) else None
        if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers) or \
                list(layers) != sorted(set(layers)):
            raise ValueError(f"VLACacheConfig.prune_layers must be a non-empty increasing tuple of layer indices >= 0, "
                             f"got {self.prune_layers!r}")
        object.__setattr__(self, "prune_layers", layers)


def _as_patches(image, name: str, patch_size: int, grid: int) -> np.ndarray:
    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    side = grid * patch_size
    if array.shape != (side, side, 3):
        raise ValueError(f"{name} must be an RGB image [{side}, {side}, 3] (H, W, C); got shape {list(array.shape)}")
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        raise TypeError(f"{name} must be uint8 or float, got dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{name} has NaN or infinite pixel values")
    blocks = array.reshape(grid, patch_size, grid, patch_size, 3).transpose(0, 2, 1, 3, 4)  # [row, col, y, x, c]
    return blocks.reshape(grid * grid, -1).astype(np.float32)  # [patch, y*x*c], skimage.view_as_blocks' order


def patch_cosine_similarity(prev_image, image, patch_size: int = 14, grid: int = GRID) -> torch.Tensor:
    """Cosine similarity of each patch's raw RGB values between two frames (VLA-Cache's static test).

    Upstream compares the uint8 224x224 RGB images the processor receives (after the optional center crop,
    before normalisation) in float32 with a 1e-8 guard, so an all-black patch scores 0 and a patch whose
    brightness only scales scores 1.

    Args:
        prev_image: [224, 224, 3] uint8 (numpy or torch) previous frame.
        image: [224, 224, 3] uint8 current frame.
        patch_size: patch side.
        grid: patches a side (the image is `grid * patch_size` pixels a side).
    Returns:
        [256] float32 similarity, patch j = row j // 16, column j % 16 (grid x grid in general).
    """
    a, b = _as_patches(prev_image, "prev_image", patch_size, grid), _as_patches(image, "image", patch_size, grid)
    dot = np.sum(a * b, axis=1)  # [patch]
    return torch.from_numpy(dot / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8))


def vla_cache_static_patches(
    prev_image, image, prev_text_to_vision: torch.Tensor | None, config: VLACacheConfig | None = None,
    patch_size: int = 14, grid: int = GRID,
) -> torch.Tensor:
    """The patches VLA-Cache may serve from the previous frame's K/V cache.

    Static = similarity >= threshold, capped at the `top_k_static` most similar (ties: lower index); minus the
    `attention_top_k_remove` most relevant patches of the previous frame's prefill.

    Args:
        prev_image, image: [224, 224, 3] uint8 RGB frames (see `patch_cosine_similarity`).
        prev_text_to_vision: [256] relevance of the previous prefill at `config.attention_layer_id`
            (`text_to_vision_relevance` with that prefill's query positions), or None on an episode's first frame.
        config: VLA-Cache parameters.
        patch_size, grid: the patches (`patch_cosine_similarity`).
    Returns:
        [256] bool, all False when there is no previous prefill.
    """
    config = config if config is not None else VLACacheConfig()
    similarity = patch_cosine_similarity(prev_image, image, patch_size, grid)  # [patch]
    relevance = check_relevance(prev_text_to_vision, "prev_text_to_vision", grid * grid)
    if relevance is None:
        return torch.zeros(grid * grid, dtype=torch.bool)
    order = torch.sort(similarity, descending=True, stable=True).indices.numpy()  # [patch]
    static = np.zeros(grid * grid, dtype=bool)
    static[order[similarity.numpy()[order] >= config.similarity_threshold][: config.top_k_static]] = True
    return torch.from_numpy(static) & ~top_k_patches(relevance, config.attention_top_k_remove)


def attention_entropy(attn: torch.Tensor, on_host: bool = True, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One layer's mean attention entropy, as VLA-Cache's get_layer_mask_schedule computes it.

    Heads are averaged, each row renormalised (+1e-10), row entropy -sum p log(p + 1e-10) in nats, then the mean
    over the rows the prefill computed at that layer. Upstream computes it in the attention's dtype (bfloat16 in
    its runs: pass `dtype=torch.bfloat16`, as `faithful=True` does); by default it is float32.

    Args:
        attn: [1, heads, q, k] or [heads, q, k] prefill attention probabilities of one layer.
        on_host: return it on the CPU (False: where `attn` is, for the caller to read with other values at once).
        dtype: the dtype every step is computed in (the probabilities are cast to it first).
    Returns:
        0-dim tensor of `dtype`.
    """
    probs = attn.detach().to(dtype)
    probs = (probs[0] if probs.dim() == 4 else probs).mean(dim=0)  # [q, k]
    probs = torch.nan_to_num(probs / (probs.sum(dim=-1, keepdim=True) + 1e-10), nan=0.0)
    entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=-1).mean()
    return entropy.cpu() if on_host else entropy


def vla_cache_reuse_proportions(layer_entropy: torch.Tensor, config: VLACacheConfig | None = None) -> torch.Tensor:
    """Per-layer share of the static patches to reuse: low entropy => high share.

    share = 1 - (e - min e) / (max e - min e + 1e-10) over all layers; then, walking up the layers, an increase
    over the layer below is damped to `growth_factor` of itself (decreases are kept).

    The normalisation runs in `layer_entropy`'s dtype, as upstream's runs in its entropies' (bfloat16 there).

    Args:
        layer_entropy: [num_layers] `attention_entropy` of every LLM layer of the previous prefill.
        config: VLA-Cache parameters.
    Returns:
        [num_layers] float32 in [0, 1].
    """
    config = config if config is not None else VLACacheConfig()
    entropy = on_host(layer_entropy.detach())
    entropy = entropy if entropy.is_floating_point() else entropy.float()
    if entropy.dim() != 1 or entropy.numel() == 0 or not np.isfinite(entropy.float().numpy()).all():
        raise ValueError(f"layer_entropy must be a finite [num_layers] vector; got shape {list(entropy.shape)}")
    share = 1.0 - (entropy - entropy.min()) / (entropy.max() - entropy.min() + 1e-10)  # [layer]
    if not config.apply_weighted_growth:
        return share.float()
    values = share.float().numpy().tolist()  # upstream smooths in Python floats, then returns float32
    for i in range(1, len(values)):
        if values[i] > values[i - 1]:
            values[i] = values[i - 1] + (values[i] - values[i - 1]) * config.growth_factor
    return torch.tensor(values, dtype=torch.float32)


def vla_cache_reusable(prev_images: list, images: list, prev_text_to_vision: torch.Tensor | None,
                       config: VLACacheConfig | None = None, patch_size: int = 14, grid: int = GRID) -> torch.Tensor:
    """`vla_cache_static_patches` of each image with its own 256 relevance values, joined in image order: what
    upstream's OpenVLA-OFT path merges (`remaining_static_tokens_primary + remaining_static_tokens_wrist`, positions
    1..256 then 257..512, so already sorted) before its one layer schedule. One image: that image's [256].

    Args:
        prev_images, images: [224, 224, 3] uint8 RGB frames, one per image (third-person, then wrist).
        prev_text_to_vision: [num_images * 256] relevance of the previous prefill, or None on an episode's first frame.
        config: VLA-Cache parameters.
        patch_size, grid: the patches (`patch_cosine_similarity`).
    Returns:
        [num_images * 256] bool.
    """
    if len(prev_images) != len(images):
        raise ValueError(f"{len(prev_images)} previous images for {len(images)} images")
    n = grid * grid
    parts = [vla_cache_static_patches(prev, image, None if prev_text_to_vision is None else
                                      prev_text_to_vision[i * n:(i + 1) * n], config, patch_size, grid)
             for i, (prev, image) in enumerate(zip(prev_images, images))]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def vla_cache_layer_reuse(
    reusable: torch.Tensor, layer_entropy: torch.Tensor, config: VLACacheConfig | None = None
) -> torch.Tensor:
    """Which vision tokens skip each LLM layer and use the cached K/V of the previous frame there.

    At pruning layer p, upstream drops the first max(1, int(share[p] * n)) of the n reusable positions in
    ascending order (not by similarity), unless that is fewer than already dropped; dropped tokens stay
    dropped. Layers before the first pruning layer compute every token. With several images (OpenVLA-OFT) the
    positions are those of all images together, so the first image's go first.

    Args:
        reusable: [vision] bool from `vla_cache_reusable` (256 per image).
        layer_entropy: [num_layers] per-layer entropies of the previous prefill (`attention_entropy`).
        config: VLA-Cache parameters.
    Returns:
        [num_layers, vision] bool, monotone non-decreasing along layers.
    """
    config = config if config is not None else VLACacheConfig()
    if not isinstance(reusable, torch.Tensor) or reusable.dim() != 1 or reusable.numel() == 0 \
            or reusable.dtype != torch.bool:
        raise ValueError(f"reusable must be a [vision] bool tensor ({NUM_PATCHES} per image: [{2 * NUM_PATCHES}] for "
                         f"two); got {getattr(reusable, 'shape', reusable)!r}")
    share = vla_cache_reuse_proportions(layer_entropy, config)  # [layer]
    num_layers = share.shape[0]
    if config.prune_layers[-1] >= num_layers:
        raise ValueError(f"VLACacheConfig.prune_layers {config.prune_layers} exceed the {num_layers} layers given")
    order = np.flatnonzero(on_host(reusable).numpy())  # [n] ascending position, as upstream's sorted positions
    share = share.numpy()
    out = np.zeros((num_layers, reusable.numel()), dtype=bool)
    dropped = 0
    for layer in range(num_layers):
        if len(order) and layer in config.prune_layers:
            dropped = max(dropped, max(1, int(share[layer] * np.float32(len(order)))))  # float32 product, truncated
        out[layer, order[:dropped]] = True
    return torch.from_numpy(out)
