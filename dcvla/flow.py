"""What the flow-matching VLA families (pi0, pi0.5, SmolVLA) build and compute alike: a level of lerobot's module
tree, the prefix's inputs and outputs, the sinusoidal time embedding, the Euler integration of the action chunk,
and lerobot's resize-with-pad of an image.

Facts from lerobot 0.6.1 (`policies/common/vla_utils.py`, `policies/common/flow_matching.py`), held to lerobot's
numbers by each family's parity test (`tests/test_pi_parity.py`, `tests/test_smolvla_parity.py`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as TF
from torch import nn

from . import flops as F
from .attention import attend, gather_kv, project_qkv
from .kv_store import BatchKV, KVStore, LayerPlan


class Level(nn.Module):
    """A level of lerobot's module trees that only names its children (`paligemma.model`, `vlm_with_expert.vlm`), so
    a family's modules sit at the checkpoint's names."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


@dataclass
class PrefixInputs:
    """One inference's prefix: the present cameras' image tokens, the prompt's unpadded tokens and, where the family
    puts it there (SmolVLA), the robot state's one token, last. One sample at inference; training stacks samples
    whose prompts have one length (`dcvla.smolvla.train`)."""

    images: list[torch.Tensor]           # per present camera [sample, tokens_per_image, lm_width]
    text: torch.Tensor                   # [sample, text, lm_width]
    state: torch.Tensor | None = None    # [sample, 1, lm_width]

    @property
    def num_image_tokens(self) -> int:
        return sum(image.shape[1] for image in self.images)

    @property
    def length(self) -> int:
        return self.num_image_tokens + self.text.shape[1] + (0 if self.state is None else self.state.shape[1])

    @property
    def spans(self) -> dict[str, slice]:
        """The prefix rows of the image tokens, the prompt and the state token (empty without one)."""
        n_vision, n_text = self.num_image_tokens, self.text.shape[1]
        return {"vision": slice(0, n_vision), "text": slice(n_vision, n_vision + n_text),
                "state": slice(n_vision + n_text, self.length)}

    def embeddings(self) -> torch.Tensor:
        """[sample, prefix, lm_width]."""
        return torch.cat([*self.images, self.text, *([] if self.state is None else [self.state])], dim=1)


@dataclass
class PrefixOutput:
    work: list[F.LayerWork]   # per layer
    reused: torch.Tensor      # [layer, prefix] bool (host): K/V taken from the store


def time_embedding(t: torch.Tensor, width: int, min_period: float, max_period: float) -> torch.Tensor:
    """lerobot's (openpi's) `create_sinusoidal_pos_embedding` of t [batch] (float32) -> [batch, width] as
    [sin | cos], float64 inside, returned in t's dtype."""
    if width % 2:
        raise ValueError(f"the time embedding's width must be even, got {width}")
    fraction = torch.linspace(0.0, 1.0, width // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi)[None, :] * t[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).to(t.dtype)


def euler(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, steps: int) -> torch.Tensor:
    """lerobot's `euler_integrate` (openpi's sampling loop) in float32: from x = noise at t = 1, `steps` steps of
    x += dt * velocity(x, t) with dt = -1 / steps and t = 1 + step * dt, to the actions at t = 0."""
    dt = -1.0 / steps
    x = noise.float()
    for step in range(steps):
        t = torch.tensor([1.0 + step * dt], dtype=torch.float32, device=x.device)
        x = x + dt * velocity(x, t)
    return x


def resize_with_pad(images: torch.Tensor, height: int, width: int, pad_value: float = 0.0) -> torch.Tensor:
    """lerobot's `resize_with_pad` (SmolVLA's convention) of [batch, channel, h, w] float images: scaled by one ratio
    to fit (bilinear, no antialias, `int()` of each side), then padded on the left and the top with `pad_value`.
    An image already at the size is returned as is."""
    if images.ndim != 4:
        raise ValueError(f"resize_with_pad needs [batch, channel, height, width], got shape {tuple(images.shape)}")
    h, w = images.shape[2:]
    if (h, w) == (height, width):
        return images
    ratio = max(w / width, h / height)
    resized = TF.interpolate(images, size=(int(h / ratio), int(w / ratio)), mode="bilinear", align_corners=False)
    pad_h, pad_w = max(0, height - resized.shape[2]), max(0, width - resized.shape[3])
    return TF.pad(resized, (pad_w, 0, pad_h, 0), value=pad_value)


Rope = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (x, rows) -> cos, sin


@torch.inference_mode()
def run_prefix_layers(layers, inputs: PrefixInputs, plans: list[LayerPlan] | None, store: KVStore, step: int,
                      heads: tuple[int, int, int], rope: Rope, mask: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> PrefixOutput:
    """`prefix_layers` under inference mode (pi0's prefix). `prefix_layers` itself is differentiable outside inference
    mode, the store's K/V carrying the graph: SmolVLA's training runs it so (`dcvla.smolvla.train`)."""
    return prefix_layers(layers, inputs, plans, store, step, heads, rope, mask)


def prefix_layers(layers, inputs: PrefixInputs, plans: list[LayerPlan] | None, store: KVStore | BatchKV, step: int,
                  heads: tuple[int, int, int], rope: Rope, mask: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> PrefixOutput:
    """Run a prefix LM's decoder layers (transformers' Llama / Gemma layers) over the prefix under per-layer plans,
    leaving every layer's post-RoPE K/V of every prefix position in `store`. The last layer's output is read by
    nobody (the expert reads the prefix's K/V only), so the last layer projects K/V and stops.

    Args:
        plans: one per layer, a layer's rows a subset of the previous layer's; rows carried are computed and their K/V
            stored (computed_at = step), the others' K/V are the store's. None: every row of every layer.
        store, step: the episode's store (a slot per prefix token; a training batch's: a `BatchKV`), the inference.
        heads, rope: (query heads, K/V heads, head_dim); cos and sin [1, row, head_dim] of the rows carried
            (positions 0..n-1), float32 where the family rotates in float32 (SmolVLA): Q/K are cast back.
        mask: [row, prefix] bool of the rows carried, True where a row may attend (None: bidirectional).
    """
    prefix_len, depth, hidden = inputs.length, len(layers), inputs.embeddings()  # hidden: [sample, prefix, width]
    if store.num_slots != prefix_len:
        raise ValueError(f"the store holds {store.num_slots} prefix positions, this prefix has {prefix_len}")
    if plans is None:
        plans = [LayerPlan.full(prefix_len, hidden.device)] * depth
    if len(plans) != depth:
        raise ValueError(f"{len(plans)} layer plans for {depth} prefix layers")
    rows = plans[0].rows
    if rows.numel() != prefix_len:
        hidden = hidden[:, rows]  # [sample, row, width]
    reused = np.ones((depth, prefix_len), dtype=bool)
    work = []
    for layer, (block, plan) in enumerate(zip(layers, plans)):
        if plan.rows.numel() != rows.numel():  # rows dropped from this layer on (a subset of the previous rows)
            hidden, rows = hidden[:, torch.searchsorted(rows, plan.rows)], plan.rows
        n, last = rows.numel(), layer == depth - 1
        work.append(F.LayerWork(0 if last else n, n, prefix_len if n and not last else 0))
        reused[layer, plan.host[0]] = False  # the plan's host copy: no read of the device
        if n == 0:
            continue
        if plan.n_kv != n:
            raise ValueError("the prefix projects K/V for every row it carries")
        x = block.input_layernorm(hidden)
        cos, sin = rope(x, rows)
        no_rows = torch.arange(0, device=rows.device) if last else None  # the last layer: K/V only, no Q
        q, k, v = project_qkv(block.self_attn, x, no_rows, None, cos, sin, *heads)
        q, k = q.to(hidden.dtype), k.to(hidden.dtype)
        store.put(layer, rows, k, v, step)
        if last:
            break
        keys, values = gather_kv(store, layer, prefix_len, rows, k, v)
        attn, _ = attend(q, keys, values, block.self_attn.scaling, None if mask is None else mask(rows))
        hidden = hidden + block.self_attn.o_proj(attn)
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
    return PrefixOutput(work, torch.from_numpy(reused))
