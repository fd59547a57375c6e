"""A Pi0-style flow-matching policy, assembled from transformers' own modules.

Layout (Black et al., "pi0", and openpi's PyTorch port, with the proprio state in the prefix as the issue asks):

    prefix  = [image tokens (SigLIP -> linear projector) | instruction tokens (x sqrt(width)) | state token]
              run once per control step through a Gemma decoder, bidirectional attention within the prefix;
    suffix  = action_horizon tokens (noisy action chunk + flow-matching time embedding, openpi's action_time_mlp)
              run by the action expert, a smaller Gemma with the same depth, heads and head_dim: at layer l its
              queries attend to [the prefix's K/V of layer l | its own K/V], so the prefix K/V are all it reads;
    actions = 10 Euler steps of the learned velocity from t = 1 (noise) to t = 0.

`run_prefix` is the prefix loop: it runs the Gemma submodules on the rows each layer carries and fills a `KVStore`
with the K/V of every prefix position; rows a layer does not carry are neither computed nor stored: their K/V are
the store's (a previous control step's). The expert reads only the store. Cross-step reuse (dcvla.pi0.policy) is
therefore a choice of rows, and a skipped row is work not done.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import GemmaConfig, GemmaModel, SiglipVisionConfig, SiglipVisionModel
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaRMSNorm, GemmaRotaryEmbedding

from .. import flops as F
from ..attention import attend, gather_kv, project_qkv
from ..kv_store import KVStore, LayerPlan
from .config import LIBERO_STATE_STATS, Pi0Config, GemmaDims, get_pi0_preset


def _gemma_config(dims: GemmaDims, cfg: Pi0Config, vocab_size: int) -> GemmaConfig:
    return GemmaConfig(
        vocab_size=vocab_size, hidden_size=dims.hidden_size, intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.num_layers, num_attention_heads=dims.num_heads, num_key_value_heads=dims.num_kv_heads,
        head_dim=dims.head_dim, hidden_activation="gelu_pytorch_tanh", rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, pad_token_id=None,
        max_position_embeddings=8192,
    )


class ActionExpert(nn.Module):
    """The expert's Gemma layers, final norm and rotary embedding (transformers' modules; no token table)."""

    def __init__(self, hf_config: GemmaConfig) -> None:
        super().__init__()
        self.config = hf_config
        self.layers = nn.ModuleList(GemmaDecoderLayer(hf_config, i) for i in range(hf_config.num_hidden_layers))
        self.norm = GemmaRMSNorm(hf_config.hidden_size, eps=hf_config.rms_norm_eps)
        self.rotary_emb = GemmaRotaryEmbedding(hf_config)


@dataclass
class PrefixInputs:
    """One control step's prefix embeddings, by span, each [1, tokens, lm_width]."""

    vision: torch.Tensor
    text: torch.Tensor
    state: torch.Tensor

    @property
    def spans(self) -> dict[str, slice]:
        n_v, n_t = self.vision.shape[1], self.text.shape[1]
        return {"vision": slice(0, n_v), "text": slice(n_v, n_v + n_t), "state": slice(n_v + n_t, n_v + n_t + self.state.shape[1])}

    @property
    def length(self) -> int:
        return self.vision.shape[1] + self.text.shape[1] + self.state.shape[1]

    def embeddings(self) -> torch.Tensor:
        return torch.cat([self.vision, self.text, self.state], dim=1)  # [1, prefix, lm_width]


class Pi0Model(nn.Module):
    """SigLIP + projector, Gemma prefix LM, state projection, Gemma action expert and the flow-matching heads.

    Module names follow openpi's PyTorch port where it has one: `vision`, `projector`, `language_model`,
    `expert`, `state_proj`, `action_in_proj`, `action_time_mlp_in`, `action_time_mlp_out`, `action_out_proj`.
    """

    def __init__(self, config: Pi0Config, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        v = config.vision
        vision_cfg = SiglipVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
            image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps,
            vision_use_head=False,
        )
        vision_cfg._attn_implementation = attn_implementation
        self.vision = SiglipVisionModel(vision_cfg)
        self.projector = nn.Linear(v.hidden_size, config.lm.hidden_size)
        self.language_model = GemmaModel(_gemma_config(config.lm, config, config.vocab_size))
        self.expert = ActionExpert(_gemma_config(config.expert, config, 1))
        w_lm, w_ex = config.lm.hidden_size, config.expert.hidden_size
        self.state_proj = nn.Linear(config.state_dim, w_lm)
        self.action_in_proj = nn.Linear(config.action_dim, w_ex)
        self.action_time_mlp_in = nn.Linear(2 * w_ex, w_ex)
        self.action_time_mlp_out = nn.Linear(w_ex, w_ex)
        self.action_out_proj = nn.Linear(w_ex, config.action_dim)
        self.norm_stats: dict = {}

    @property
    def device(self) -> torch.device:
        return self.projector.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.weight.dtype

    # ------------------------------------------------------------------------------------------------ prefix
    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[1, 3, 224, 224] in [-1, 1] -> image tokens [1, patches, lm_width] (PaliGemma: not rescaled)."""
        return self.projector(self.vision(pixel_values=pixel_values).last_hidden_state)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[1, text] -> [1, text, lm_width], scaled by sqrt(width): transformers' Gemma token embedding
        (`GemmaTextScaledWordEmbedding`) applies that scale itself, so it is not applied again here."""
        return self.language_model.embed_tokens(input_ids)

    def embed_state(self, state: torch.Tensor) -> torch.Tensor:
        """Normalised state [state_dim] -> the state token [1, 1, lm_width]."""
        return self.state_proj(state.to(self.dtype))[None, None]

    def new_store(self, prefix_len: int) -> KVStore:
        lm = self.config.lm
        return KVStore(lm.num_layers, prefix_len, lm.num_heads, lm.num_kv_heads, lm.head_dim, self.dtype, self.device)

    # ------------------------------------------------------------------------------------------------ suffix
    def embed_suffix(self, noisy_actions: torch.Tensor, t: float) -> torch.Tensor:
        """openpi's suffix: action tokens fused with the sinusoidal time embedding by a 2-layer swish MLP."""
        width = self.config.expert.hidden_size
        actions = self.action_in_proj(noisy_actions)  # [1, horizon, width]
        time = sinusoidal_time(torch.tensor([t], device=self.device), width).to(self.dtype)  # [1, width]
        fused = torch.cat([actions, time[:, None].expand_as(actions)], dim=-1)
        return self.action_time_mlp_out(nn.functional.silu(self.action_time_mlp_in(fused)))  # swish

    @torch.inference_mode()
    def velocity(self, store: KVStore, noisy_actions: torch.Tensor, t: float) -> torch.Tensor:
        """The expert's velocity field [1, horizon, action_dim] at time t, attending to the prefix K/V in `store`."""
        expert, cfg = self.expert, self.config.expert
        prefix_len = store.num_slots
        hidden = self.embed_suffix(noisy_actions, t)
        positions = torch.arange(prefix_len, prefix_len + hidden.shape[1], device=hidden.device)
        for layer, block in enumerate(expert.layers):
            x = block.input_layernorm(hidden)
            cos, sin = expert.rotary_emb(x, positions[None])
            q, k, v = project_qkv(block.self_attn, x, None, None, cos, sin, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
            keys = torch.cat([store.keys[layer][None], k], dim=2)  # [1, kv_head, prefix + horizon, head_dim]
            values = torch.cat([store.values[layer][None], v], dim=2)
            attn, _ = attend(q, keys, values, block.self_attn.scaling, None)
            hidden = hidden + block.self_attn.o_proj(attn)
            hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        return self.action_out_proj(expert.norm(hidden))

    @torch.inference_mode()
    def sample_actions(self, store: KVStore, noise: torch.Tensor) -> torch.Tensor:
        """Euler integration of the velocity from t = 1 (noise [1, horizon, action_dim]) to t = 0, in float32
        whatever the model's dtype (the expert runs in it): ten bf16 accumulations would round the chunk each step."""
        steps = self.config.num_steps
        dt = -1.0 / steps
        x = noise.float()
        for i in range(steps):
            x = x + dt * self.velocity(store, x.to(self.dtype), 1.0 + i * dt).float()
        return x

    # ------------------------------------------------------------------------------------------------- flops
    def stage_flops(self, prefix_work: list[F.LayerWork], prefix_len: int) -> dict[str, int]:
        """FLOPs per stage of one control step: vision (SigLIP + projector, state projection), prefix (as computed),
        expert."""
        cfg, v = self.config, self.config.vision
        n = v.num_patches
        vision = F.vit_flops(v, [F.LayerWork(n, n, n)] * v.depth) + 2 * n * v.hidden_size * cfg.lm.hidden_size
        vision += 2 * cfg.state_dim * cfg.lm.hidden_size  # the state token
        lm, ex = cfg.lm, cfg.expert
        kv = lambda d: d.num_kv_heads * d.head_dim  # noqa: E731
        attn = lambda d: d.num_heads * d.head_dim  # noqa: E731
        prefix = sum(F.attention_layer_flops(w, lm.hidden_size, kv(lm), lm.intermediate_size, 3, attn(lm)) for w in prefix_work)
        h = cfg.action_horizon
        per_layer = F.attention_layer_flops(F.LayerWork(h, h, prefix_len + h), ex.hidden_size, kv(ex), ex.intermediate_size, 3, attn(ex))
        heads = 2 * h * (cfg.action_dim * ex.hidden_size * 2 + 2 * ex.hidden_size * ex.hidden_size + ex.hidden_size * ex.hidden_size)
        expert = cfg.num_steps * (ex.num_layers * per_layer + heads)
        return {"vision": vision, "prefix": prefix, "expert": expert}


def sinusoidal_time(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """openpi's `create_sinusoidal_pos_embedding`: [batch] times -> [batch, dim] (sin half, then cos half)."""
    if dim % 2:
        raise ValueError(f"time embedding width must be even, got {dim}")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None] * t.double()[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).float()


@dataclass
class PrefixOutput:
    work: list[F.LayerWork]   # per layer
    reused: torch.Tensor      # [layer, prefix] bool: K/V taken from the store


@torch.inference_mode()
def run_prefix(model: Pi0Model, inputs: PrefixInputs, plans: list[LayerPlan], store: KVStore, step: int) -> PrefixOutput:
    """Run the prefix LM under per-layer plans, leaving every layer's K/V of every prefix position in `store`.

    Args:
        inputs: the step's prefix embeddings.
        plans: one per layer; a layer's rows are a subset of the previous layer's (a dropped row stays dropped).
            Rows a layer carries are computed and their K/V stored (computed_at = step); the others' K/V are the
            store's. Every K/V row is fresh (Pi0 has no Q reuse): `kv_fresh` must be all True.
        store: the episode's store (prefix_len slots); a fresh one for a no-reuse pass.
        step: this control step's index.
    """
    lm, cfg = model.language_model, model.config.lm
    prefix_len = inputs.length
    if len(plans) != cfg.num_layers:
        raise ValueError(f"{len(plans)} layer plans for {cfg.num_layers} prefix layers")
    if store.num_slots != prefix_len:
        raise ValueError(f"the store holds {store.num_slots} prefix positions, this prefix has {prefix_len}")
    rows = plans[0].rows
    hidden = inputs.embeddings()  # [1, prefix, width]
    if rows.numel() != prefix_len:
        hidden = hidden[:, rows]  # [1, row, width]
    reused = np.ones((cfg.num_layers, prefix_len), dtype=bool)
    work = []
    for layer, (block, plan) in enumerate(zip(lm.layers, plans)):
        if plan.rows.numel() != rows.numel():  # rows dropped from this layer on (a subset of the previous rows)
            hidden, rows = hidden[:, torch.searchsorted(rows, plan.rows)], plan.rows
        n = rows.numel()
        work.append(F.LayerWork(n, n, prefix_len if n else 0))
        reused[layer, plan.host[0]] = False  # the plan's host copy: no read of the device
        if n == 0:
            continue
        if plan.n_kv != n:
            raise ValueError("the Pi0 prefix projects K/V for every row it carries")
        x = block.input_layernorm(hidden)
        cos, sin = lm.rotary_emb(x, rows[None])
        # every carried row projects Q and K/V
        q, k, v = project_qkv(block.self_attn, x, None, None, cos, sin, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        keys, values = gather_kv(store, layer, prefix_len, rows, k, v)  # bidirectional: every prefix position
        store.update(layer, rows, k[0], v[0], step)
        attn, _ = attend(q, keys, values, block.self_attn.scaling, None)
        hidden = hidden + block.self_attn.o_proj(attn)
        hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
    return PrefixOutput(work, torch.from_numpy(reused))


def random_pi0(config: Pi0Config | str, seed: int = 0, attn_implementation: str = "sdpa") -> Pi0Model:
    """A Pi0Model with seeded random weights (transformers' init for its modules); the global RNG is untouched.

    `norm_stats` holds one entry, `"random"`: actions mean 0, std 1 (the flow's output is the action); the state
    is z-scored with LIBERO's statistics (`LIBERO_STATE_STATS`), as a LIBERO-trained Pi0's norm stats would do.
    """
    config = get_pi0_preset(config) if isinstance(config, str) else config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Pi0Model(config, attn_implementation)
    model.eval()
    pad = config.state_dim - len(LIBERO_STATE_STATS["mean"])
    model.norm_stats = {"random": {
        "state": {"mean": LIBERO_STATE_STATS["mean"] + [0.0] * pad, "std": LIBERO_STATE_STATS["std"] + [1.0] * pad},
        "action": {"mean": [0.0] * config.action_dim, "std": [1.0] * config.action_dim},
    }}
    return model

