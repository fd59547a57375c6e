"""pi0 and pi0.5 from transformers' modules, in the module tree of lerobot's `PI0Pytorch` / `PI05Pytorch` (so a
published checkpoint's names are this model's names), with dcvla's own layer loops.

One inference:

    prefix = [image tokens of each present camera (SigLIP -> multi_modal_projector, not rescaled) | prompt tokens
              (Gemma's embedding, x sqrt(width))], bidirectional, run once through the PaliGemma LM; every layer's
              post-RoPE K/V go to a `KVStore` (one slot per prefix token);
    suffix = pi0:   [state token (state_proj) | chunk_size action tokens (action_in_proj + time, action_time_mlp)]
             pi0.5: [chunk_size action tokens (action_in_proj)], every expert norm adaRMS-conditioned on the time MLP;
             run by the expert, whose layer l attends to [the prefix's K/V of layer l | its own];
    actions = 10 Euler steps x += -0.1 * v from t = 1 (noise), v = action_out_proj(final-norm suffix) in float32.

What dcvla does differently, all exact (the parity test holds it to lerobot's numbers):
- masked inputs are never computed: an empty camera's 256 tokens and the prompt's padding are attended by nobody
  (big_vision's mask rule) and do not advance positions (`cumsum(pad) - 1`), so dropping them changes no other
  token; the prefix is the present tokens, at positions 0..n-1;
- pi0's state token sees only the prefix and itself, so its expert K/V do not depend on the noisy actions or the
  time: they are computed once per inference (`expert_state_kv`) instead of at every Euler step.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GemmaConfig, GemmaModel, SiglipVisionConfig, SiglipVisionModel
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaRMSNorm, GemmaRotaryEmbedding

from .. import flops as F
from ..attention import attend, project_qkv
from ..flow import Level, PrefixInputs, PrefixOutput, euler, run_prefix_layers, time_embedding
from ..kv_store import KVStore, LayerPlan
from ..normalization import Normalization, random_normalization
from .config import LIBERO_ACTION_DIM, LIBERO_STATE_STATS, GemmaDims, PiConfig, get_preset


def gemma_config(dims: GemmaDims, config: PiConfig, vocab_size: int) -> GemmaConfig:
    return GemmaConfig(
        vocab_size=vocab_size, hidden_size=dims.width, intermediate_size=dims.mlp_dim, num_hidden_layers=dims.depth,
        num_attention_heads=dims.num_heads, num_key_value_heads=dims.num_kv_heads, head_dim=dims.head_dim,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=config.rms_norm_eps, pad_token_id=None, bos_token_id=None,
        eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta}, max_position_embeddings=8192,
    )


class AdaRMSNorm(nn.Module):
    """pi0.5's adaptive RMSNorm (lerobot `PiGemmaRMSNorm` with `cond_dim`): `dense(cond)` gives scale, shift and the
    gate of the residual that follows; `norm(x) * (1 + scale) + shift`, in float32."""

    def __init__(self, dim: int, cond_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + self.eps)  # float32
        scale, shift, gate = self.dense(cond)[:, None].chunk(3, dim=-1)  # [1, 1, dim] each
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype), gate.to(x.dtype)


class Projector(nn.Module):
    """PaliGemma's `multi_modal_projector`: one linear layer, SigLIP width -> LM width."""

    def __init__(self, vision_width: int, lm_width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(vision_width, lm_width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class PaliGemmaParts(nn.Module):
    """`paligemma.model`: the SigLIP tower, the projector and the Gemma LM (its embedding is the tied table that
    checkpoints store as `paligemma.lm_head.weight`)."""

    def __init__(self, config: PiConfig, attn_implementation: str) -> None:
        super().__init__()
        v = config.vision
        vision = SiglipVisionConfig(
            hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
            num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
            hidden_act="gelu_pytorch_tanh", layer_norm_eps=v.layer_norm_eps, vision_use_head=False)
        vision._attn_implementation = attn_implementation
        self.vision_tower = Level(vision_model=SiglipVisionModel(vision))  # lerobot's transformers nests it
        self.multi_modal_projector = Projector(v.hidden_size, config.lm.width)
        self.language_model = GemmaModel(gemma_config(config.lm, config, config.vocab_size))


class ExpertStack(nn.Module):
    """`gemma_expert.model`: the expert's Gemma layers and final norm (adaRMS ones in pi0.5), no token table."""

    def __init__(self, config: PiConfig) -> None:
        super().__init__()
        hf = gemma_config(config.expert, config, 1)
        width, eps = config.expert.width, config.rms_norm_eps
        self.layers = nn.ModuleList(GemmaDecoderLayer(hf, i) for i in range(config.expert.depth))
        if config.pi05:
            for layer in self.layers:
                layer.input_layernorm = AdaRMSNorm(width, width, eps)
                layer.post_attention_layernorm = AdaRMSNorm(width, width, eps)
            self.norm = AdaRMSNorm(width, width, eps)
        else:
            self.norm = GemmaRMSNorm(width, eps=eps)
        self.rotary_emb = GemmaRotaryEmbedding(hf)


class PaliGemmaWithExpert(nn.Module):
    def __init__(self, config: PiConfig, attn_implementation: str) -> None:
        super().__init__()
        self.paligemma = Level(model=PaliGemmaParts(config, attn_implementation))
        self.gemma_expert = Level(model=ExpertStack(config))


class PiModel(nn.Module):
    """pi0 or pi0.5 (`config.variant`), module names as lerobot's: `paligemma_with_expert.{paligemma,gemma_expert}`,
    `action_in_proj`, `action_out_proj`, and `state_proj` + `action_time_mlp_{in,out}` (pi0) or `time_mlp_{in,out}`
    (pi0.5)."""

    def __init__(self, config: PiConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        width = config.expert.width
        self.paligemma_with_expert = PaliGemmaWithExpert(config, attn_implementation)
        self.action_in_proj = nn.Linear(config.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, config.max_action_dim)
        if config.pi05:
            self.time_mlp_in = nn.Linear(width, width)
            self.time_mlp_out = nn.Linear(width, width)
        else:
            self.state_proj = nn.Linear(config.max_state_dim, width)
            self.action_time_mlp_in = nn.Linear(2 * width, width)
            self.action_time_mlp_out = nn.Linear(width, width)
        self.normalization: Normalization | None = None  # the checkpoint's (or a random preset's) statistics

    @property
    def device(self) -> torch.device:
        return self.action_in_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.action_in_proj.weight.dtype

    @property
    def language_model(self) -> GemmaModel:
        return self.paligemma_with_expert.paligemma.model.language_model

    @property
    def expert(self) -> ExpertStack:
        return self.paligemma_with_expert.gemma_expert.model

    # ------------------------------------------------------------------------------------------------ prefix
    @torch.inference_mode()
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[camera, 3, H, W] in [-1, 1] -> image tokens [camera, tokens_per_image, lm_width] (PaliGemma's
        `get_image_features`: SigLIP's last hidden state through the projector, not rescaled)."""
        parts = self.paligemma_with_expert.paligemma.model
        features = parts.vision_tower.vision_model(pixel_values=pixel_values.to(self.dtype)).last_hidden_state
        return parts.multi_modal_projector(features)

    @torch.inference_mode()
    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[1, text] -> [1, text, lm_width], x sqrt(width) (transformers' Gemma embedding scales it)."""
        return self.language_model.embed_tokens(token_ids)

    def prefix_inputs(self, pixel_values: torch.Tensor, image_present: list[bool], token_ids: torch.Tensor,
                      state: None = None) -> PrefixInputs:
        """The prefix of present cameras (their pixels [present camera, 3, H, W]) and unpadded prompt tokens
        [1, text]; `image_present` (host booleans, one per image slot) only checks the count. pi0's prefix holds no
        state (its token is the expert's, pi0.5's are prompt bins)."""
        if state is not None:
            raise ValueError("pi0 / pi0.5 put no state token in the prefix")
        if sum(image_present) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images for {sum(image_present)} present cameras")
        images = self.embed_images(pixel_values)
        return PrefixInputs([images[i : i + 1] for i in range(images.shape[0])], self.embed_text(token_ids))

    def new_store(self, prefix_len: int) -> KVStore:
        lm = self.config.lm
        return KVStore(lm.depth, prefix_len, lm.num_heads, lm.num_kv_heads, lm.head_dim, self.dtype, self.device)

    # ------------------------------------------------------------------------------------------------ suffix
    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """The sinusoidal embedding of t [batch] (float32) -> [batch, expert width] (`dcvla.flow.time_embedding`)."""
        return time_embedding(t, self.config.expert.width, self.config.min_period, self.config.max_period)

    def embed_actions(self, noisy_actions: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The action tokens [1, chunk, width] and pi0.5's adaRMS condition [1, width] (None for pi0)."""
        time = self.time_embedding(t).to(self.dtype)  # [1, width]
        actions = self.action_in_proj(noisy_actions.to(self.dtype))
        if self.config.pi05:
            cond = nn.functional.silu(self.time_mlp_out(nn.functional.silu(self.time_mlp_in(time))))
            return actions, cond
        fused = torch.cat([actions, time[:, None].expand_as(actions)], dim=-1)
        return self.action_time_mlp_out(nn.functional.silu(self.action_time_mlp_in(fused))), None

    def _expert_layer(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                      values: torch.Tensor, cond: torch.Tensor | None, own_kv: bool
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One expert layer over `hidden` [1, row, width] attending to [keys | its own K/V]; returns the new hidden and
        its own K/V (post-RoPE)."""
        block, dims = self.expert.layers[layer], self.config.expert
        x, gate = block.input_layernorm(hidden, cond) if cond is not None else (block.input_layernorm(hidden), None)
        cos, sin = self.expert.rotary_emb(x, positions[None])
        q, k, v = project_qkv(block.self_attn, x, None, None, cos, sin, dims.num_heads, dims.num_kv_heads, dims.head_dim)
        all_k = torch.cat([keys, k], dim=2) if own_kv else keys
        all_v = torch.cat([values, v], dim=2) if own_kv else values
        attn, _ = attend(q, all_k, all_v, block.self_attn.scaling, None)
        out = block.self_attn.o_proj(attn)
        hidden = hidden + (out if gate is None else out * gate)
        x, gate = (block.post_attention_layernorm(hidden, cond) if cond is not None
                   else (block.post_attention_layernorm(hidden), None))
        out = block.mlp(x)
        return hidden + (out if gate is None else out * gate), k, v

    @torch.inference_mode()
    def expert_state_kv(self, store: KVStore, state: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """pi0: the state token's expert K/V per layer ([1, kv_head, 1, head_dim] each). It attends to the prefix and
        itself only (big_vision's rule with its ar flag 1), so they hold for every Euler step of the inference."""
        if self.config.pi05:
            raise ValueError("pi0.5 has no state token in the expert (its state is in the prompt)")
        hidden = self.state_proj(state.to(self.dtype))[None, None]  # [1, 1, width]
        position = torch.tensor([store.num_slots], device=hidden.device)
        kv = []
        for layer in range(self.config.expert.depth):
            hidden, k, v = self._expert_layer(layer, hidden, position, store.keys[layer][None], store.values[layer][None],
                                              None, own_kv=True)
            kv.append((k, v))
        return kv

    @torch.inference_mode()
    def velocity(self, store: KVStore, noisy_actions: torch.Tensor, t: torch.Tensor,
                 state_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """The velocity [1, chunk, max_action_dim] (float32) at time t [1] of the action tokens, attending to the
        prefix K/V in `store` (and pi0's state token's, `expert_state_kv`)."""
        if self.config.pi05 == (state_kv is not None):
            raise ValueError("pi0 needs the state token's K/V (expert_state_kv); pi0.5 has none")
        hidden, cond = self.embed_actions(noisy_actions, t)
        start = store.num_slots + self.config.suffix_state_tokens
        positions = torch.arange(start, start + hidden.shape[1], device=hidden.device)
        for layer in range(self.config.expert.depth):
            keys, values = store.keys[layer][None], store.values[layer][None]
            if state_kv is not None:
                keys, values = torch.cat([keys, state_kv[layer][0]], dim=2), torch.cat([values, state_kv[layer][1]], dim=2)
            hidden, _, _ = self._expert_layer(layer, hidden, positions, keys, values, cond, own_kv=True)
        out = self.expert.norm(hidden, cond)[0] if cond is not None else self.expert.norm(hidden)
        proj = self.action_out_proj
        return nn.functional.linear(out.float(), proj.weight.float(), proj.bias.float())  # in float32, as published

    @torch.inference_mode()
    def sample_actions(self, store: KVStore, noise: torch.Tensor, state: torch.Tensor | None = None,
                       state_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Euler integration from t = 1 (noise [1, chunk, max_action_dim]) to t = 0, in float32 (lerobot's
        `euler_integrate`: t = 1 + step * dt). pi0: `state` [max_state_dim] (normalised, padded), its expert K/V
        computed here unless given (`state_kv`, e.g. reused from an earlier inference)."""
        if not self.config.pi05 and state_kv is None:
            state_kv = self.expert_state_kv(store, state)
        return euler(lambda x, t: self.velocity(store, x, t, state_kv), noise, self.config.num_steps)

    def run_prefix(self, inputs: PrefixInputs, plans: list[LayerPlan] | None, store: KVStore, step: int) -> PrefixOutput:
        """`run_prefix` on this model (what `dcvla.flow_policy.FlowPolicy` calls)."""
        return run_prefix(self, inputs, plans, store, step)

    # ------------------------------------------------------------------------------------------------- flops
    def stage_flops(self, prefix_work: list[F.LayerWork], prefix_len: int, num_images: int,
                    state_reused: bool = False) -> dict[str, int]:
        """FLOPs per stage of one inference: vision (SigLIP + projector per present camera), prefix (as computed),
        expert (pi0's state token once unless its K/V were reused, the action tokens at every Euler step, the
        heads)."""
        cfg, v = self.config, self.config.vision
        n = v.num_patches
        siglip = 2 * n * v.hidden_size * 3 * v.patch_size**2 + sum(
            F.attention_layer_flops(F.LayerWork(n, n, n), v.hidden_size, v.hidden_size, v.intermediate_size, 2)
            for _ in range(v.num_layers))
        vision = num_images * (siglip + 2 * n * v.hidden_size * cfg.lm.width)
        lm, ex = cfg.lm, cfg.expert
        kv = lambda d: d.num_kv_heads * d.head_dim  # noqa: E731
        attn = lambda d: d.num_heads * d.head_dim  # noqa: E731
        prefix = sum(F.attention_layer_flops(w, lm.width, kv(lm), lm.mlp_dim, 3, attn(lm)) for w in prefix_work)
        h, s, w = cfg.chunk_size, cfg.suffix_state_tokens, ex.width
        per_step = ex.depth * F.attention_layer_flops(F.LayerWork(h, h, prefix_len + s + h), w, kv(ex), ex.mlp_dim, 3, attn(ex))
        per_step += 2 * h * (cfg.max_action_dim * w * 2)  # action_in_proj, action_out_proj
        per_step += 2 * (2 * w * w if cfg.pi05 else h * 3 * w * w)  # time MLP (pi0.5) / action-time MLP (pi0)
        if cfg.pi05:
            per_step += 2 * (2 * ex.depth + 1) * w * 3 * w  # adaRMS modulations
        state = 0 if cfg.pi05 or state_reused else 2 * cfg.max_state_dim * w + ex.depth * F.attention_layer_flops(
            F.LayerWork(1, 1, prefix_len + 1), w, kv(ex), ex.mlp_dim, 3, attn(ex))
        return {"vision": vision, "prefix": prefix, "expert": state + cfg.num_steps * per_step}


def run_prefix(model: PiModel, inputs: PrefixInputs, plans: list[LayerPlan] | None, store: KVStore, step: int) -> PrefixOutput:
    """Run the PaliGemma LM over the prefix (bidirectional) under per-layer plans, leaving every layer's K/V of every
    prefix position in `store` (`dcvla.flow.run_prefix_layers`: plans, store, step)."""
    lm, cfg = model.language_model, model.config.lm
    return run_prefix_layers(lm.layers, inputs, plans, store, step, (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
                             lambda x, rows: lm.rotary_emb(x, rows[None]))


def random_model(config: PiConfig | str, seed: int = 0, attn_implementation: str = "sdpa") -> PiModel:
    """A PiModel with seeded random weights (transformers' and PyTorch's init; adaRMS modulations random too, where
    lerobot zero-initialises them, so a random pi0.5 is conditioned on time); the global RNG is left as it was.
    Its normalisation is `random_normalization`'s: LIBERO's state statistics, the action as the flow gives it."""
    config = get_preset(config) if isinstance(config, str) else config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PiModel(config, attn_implementation)
    model.normalization = random_normalization("QUANTILES" if config.pi05 else "MEAN_STD", LIBERO_STATE_STATS, LIBERO_ACTION_DIM)
    return model.eval()
