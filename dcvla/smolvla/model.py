"""SmolVLA from transformers' modules, in the module tree of lerobot's `VLAFlowMatching` (so a lerobot checkpoint's
names are this model's names after its leading `model.`), with dcvla's own layer loops.

One inference:

    prefix = [image tokens of each present camera (SmolVLM's SigLIP -> pixel-shuffle connector, x sqrt(width)) |
              prompt tokens (x sqrt(width)) | state token (state_proj)]; the image and prompt tokens attend to each
              other, the state token to everything; run once through the kept SmolLM2 layers with SmolVLA's RoPE
              (max wavelength 10,000, in float32); every layer's post-RoPE K/V go to a `KVStore`;
    suffix = chunk_size action tokens (action_in_proj + time, action_time_mlp), causal among themselves; expert layer l
             (self-attention, l % self_attn_every_n_layers == 0) attends to [the prefix's K/V of layer l | its own],
             or (cross-attention) to the expert's own K/V projections of the prefix's post-RoPE K/V of layer l, with
             its queries' positions re-based to 0;
    actions = 10 Euler steps x += -0.1 * v from t = 1 (noise), v = action_out_proj(final-norm suffix) in float32.

What dcvla does differently, all exact (the parity test holds it to lerobot's numbers):
- masked inputs are never computed: the prompt's padding (and an empty camera) is attended by nobody and does not
  advance positions (`cumsum(pad) - 1`), so dropping it changes no other token;
- the cross-attention layers' K/V (`k_proj`, `v_proj` of the prefix's K/V) do not depend on the noisy actions or the
  time: they are projected once per inference (`cross_kv`), where lerobot projects them at every Euler step;
- the last prefix layer's output is read by nobody: it projects its K/V and stops (`dcvla.flow.prefix_layers`).

Every step but the Euler loop (`sample_actions`, under inference mode) is differentiable outside inference mode:
training (`dcvla.smolvla.train`) runs these very methods with gradients, the policy under `FlowPolicy.step`'s
inference mode.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import LlamaConfig, SmolVLMConfig, SmolVLMVisionConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector, SmolVLMVisionTransformer

from .. import flops as F
from ..attention import attend, project_qkv, rotate
from ..flow import Level, PrefixInputs, PrefixOutput, euler, prefix_layers, time_embedding
from ..kv_store import BatchKV, KVStore, LayerPlan
from ..normalization import LIBERO_STATE_STATS, Normalization, random_normalization
from ..prefix_reuse import LIBERO_ACTION_DIM
from .config import SmolVLAConfig, get_preset

def hf_configs(config: SmolVLAConfig, attn_implementation: str) -> tuple[SmolVLMConfig, LlamaConfig]:
    """transformers' SmolVLM config (vision, connector, text) and the expert's Llama config (lerobot: a copy of the
    text config at `expert_width_multiplier` of the width, its MLP from `get_intermediate_size`)."""
    v, t = config.vision, config.text
    vision = SmolVLMVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                                 num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
                                 patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps, hidden_act="gelu_pytorch_tanh")
    text = dict(vocab_size=config.vocab_size, hidden_size=t.width, intermediate_size=t.mlp_dim,
                num_hidden_layers=t.depth, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, hidden_act="silu", attention_bias=False,
                mlp_bias=False, pad_token_id=None, bos_token_id=None, eos_token_id=None)
    vlm = SmolVLMConfig(vision_config=vision.to_dict(), text_config=dict(model_type="llama", **text),
                        scale_factor=config.scale_factor)
    vlm.vision_config._attn_implementation = attn_implementation
    expert = LlamaConfig(**{**text, "hidden_size": config.expert_width, "intermediate_size": config.expert_mlp_dim})
    return vlm, expert


class TextStack(nn.Module):
    """`text_model`: the token table, the kept SmolLM2 layers and the final norm (lerobot keeps it; SmolVLA reads
    only the layers' K/V)."""

    def __init__(self, config: SmolVLAConfig, hf: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.text.width)
        self.layers = nn.ModuleList(LlamaDecoderLayer(hf, i) for i in range(config.text.depth))
        self.norm = LlamaRMSNorm(config.text.width, eps=config.text.rms_norm_eps)


class ExpertStack(nn.Module):
    """`lm_expert`: the expert's Llama layers (cross-attention ones with K/V projections from the VLM's K/V width) and
    its final norm, no token table."""

    def __init__(self, config: SmolVLAConfig, hf: LlamaConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LlamaDecoderLayer(hf, i) for i in range(config.text.depth))
        kv = config.text.num_kv_heads * config.text.head_dim
        for i, layer in enumerate(self.layers):
            if config.is_cross_layer(i):
                layer.self_attn.k_proj = nn.Linear(kv, kv, bias=False)
                layer.self_attn.v_proj = nn.Linear(kv, kv, bias=False)
        self.norm = LlamaRMSNorm(config.expert_width, eps=config.text.rms_norm_eps)


def rope_tables(positions: torch.Tensor, head_dim: int, max_wavelength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SmolVLA's `apply_rope` as cos and sin [1, row, head_dim] in float32 (radians = position /
    max_wavelength ** (2i / head_dim), each half rotated against the other), for `dcvla.attention.rotate`: Q and K
    come out in float32, as lerobot rotates them, and are cast back by the caller."""
    exponents = (2.0 / head_dim) * torch.arange(head_dim // 2, dtype=torch.float32, device=positions.device)
    radians = positions.to(torch.float32)[:, None] / (max_wavelength ** exponents)[None, :]  # [row, head_dim / 2]
    radians = torch.cat([radians, radians], dim=-1)[None]
    return torch.cos(radians), torch.sin(radians)


class SmolVLAModel(nn.Module):
    """SmolVLA, module names as lerobot's `VLAFlowMatching`: `vlm_with_expert.{vlm.model.{vision_model, connector,
    text_model}, lm_expert}`, `state_proj`, `action_in_proj`, `action_out_proj`, `action_time_mlp_{in,out}`."""

    def __init__(self, config: SmolVLAConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        vlm, expert = hf_configs(config, attn_implementation)
        parts = Level(vision_model=SmolVLMVisionTransformer(vlm.vision_config), connector=SmolVLMConnector(vlm),
                       text_model=TextStack(config, vlm.text_config))
        self.vlm_with_expert = Level(vlm=Level(model=parts), lm_expert=ExpertStack(config, expert))
        width, ew = config.text.width, config.expert_width
        self.state_proj = nn.Linear(config.max_state_dim, width)
        self.action_in_proj = nn.Linear(config.max_action_dim, ew)
        self.action_out_proj = nn.Linear(ew, config.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * ew, ew)
        self.action_time_mlp_out = nn.Linear(ew, ew)
        self.normalization: Normalization | None = None  # the checkpoint's (or a random preset's) statistics

    @property
    def device(self) -> torch.device:
        return self.action_in_proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.action_in_proj.weight.dtype

    @property
    def parts(self) -> nn.Module:
        return self.vlm_with_expert.vlm.model

    @property
    def text_model(self) -> TextStack:
        return self.parts.text_model

    @property
    def expert(self) -> ExpertStack:
        return self.vlm_with_expert.lm_expert

    def _heads(self) -> tuple[int, int, int]:
        t = self.config.text
        return t.num_heads, t.num_kv_heads, t.head_dim

    # ------------------------------------------------------------------------------------------------ prefix
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[camera, 3, H, W] in [-1, 1] -> image tokens [camera, tokens_per_image, width], x sqrt(width) (lerobot
        scales by the width's square root as a tensor of the model's dtype)."""
        features = self.parts.vision_model(pixel_values=pixel_values.to(self.dtype)).last_hidden_state
        tokens = self.parts.connector(features)
        return tokens * torch.tensor(tokens.shape[-1] ** 0.5, dtype=tokens.dtype, device=tokens.device)

    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[sample, text] -> [sample, text, width], x sqrt(width)."""
        embedded = self.text_model.embed_tokens(token_ids)
        return embedded * math.sqrt(embedded.shape[-1])

    def prefix_inputs(self, pixel_values: torch.Tensor, image_present: list[bool], token_ids: torch.Tensor,
                      state: torch.Tensor | None = None) -> PrefixInputs:
        """The prefix of present cameras (their pixels [present camera, 3, H, W]), the unpadded prompt tokens
        [1, text] and the state token of `state` [max_state_dim] (normalised, padded); `image_present` (host
        booleans, one per image slot) only checks the count."""
        if sum(image_present) != pixel_values.shape[0]:
            raise ValueError(f"{pixel_values.shape[0]} images for {sum(image_present)} present cameras")
        return self.prefix_of(self.embed_images(pixel_values), token_ids, state)

    def prefix_of(self, images: torch.Tensor, token_ids: torch.Tensor, state: torch.Tensor | None) -> PrefixInputs:
        """The prefix of the present cameras' image tokens [camera, tokens_per_image, width] (`embed_images`), the
        prompt tokens [1, text] and the state [max_state_dim]; or of a batch of samples (training), images [sample,
        camera, tokens_per_image, width], prompts of one length [sample, text] and states [sample, max_state_dim]."""
        if state is None:
            raise ValueError("SmolVLA's prefix ends with the state token: give the normalised, padded state")
        images, state = (images, state) if images.ndim == 4 else (images[None], state[None])
        if not images.shape[0] == token_ids.shape[0] == state.shape[0]:
            raise ValueError(f"a batched prefix needs one of each per sample: {images.shape[0]} samples' images, "
                             f"{token_ids.shape[0]} prompts, {state.shape[0]} states")
        state_token = self.state_proj(state.to(self.dtype))[:, None]  # [sample, 1, width]
        return PrefixInputs(list(images.unbind(1)), self.embed_text(token_ids), state_token)

    def new_store(self, prefix_len: int) -> KVStore:
        t = self.config.text
        return KVStore(t.depth, prefix_len, t.num_heads, t.num_kv_heads, t.head_dim, self.dtype, self.device)

    def run_prefix(self, inputs: PrefixInputs, plans: list[LayerPlan] | None, store: KVStore | BatchKV,
                   step: int) -> PrefixOutput:
        """Run the kept text layers over the prefix under per-layer plans (`dcvla.flow.prefix_layers`): the
        image and prompt rows attend to each other, the state token (last) to every row."""
        state_slot = inputs.spans["state"].start
        wavelength, head_dim = self.config.rope_max_wavelength, self.config.text.head_dim

        def mask(rows: torch.Tensor) -> torch.Tensor:  # nobody but the state token attends to the state token
            allowed = torch.ones(rows.numel(), inputs.length, dtype=torch.bool, device=rows.device)
            allowed[:, state_slot] = rows == state_slot
            return allowed

        return prefix_layers(self.text_model.layers, inputs, plans, store, step, self._heads(),
                             lambda x, rows: rope_tables(rows, head_dim, wavelength), mask)

    # ------------------------------------------------------------------------------------------------ suffix
    def embed_actions(self, noisy_actions: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The action tokens [sample, chunk, expert width] of noisy_actions [sample, chunk, max_action_dim] at times
        t [sample]: [action_in_proj(x) | time] through the action-time MLP."""
        actions = self.action_in_proj(noisy_actions.to(self.dtype))
        time = time_embedding(t, self.config.expert_width, self.config.min_period, self.config.max_period).to(self.dtype)
        fused = torch.cat([actions, time[:, None].expand_as(actions)], dim=-1)
        return self.action_time_mlp_out(nn.functional.silu(self.action_time_mlp_in(fused)))

    def cross_kv(self, store: KVStore | BatchKV) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per cross-attention layer, the expert's K/V of the prefix ([sample, kv_head, prefix, head_dim] each): its
        own `k_proj` / `v_proj` of the prefix's post-RoPE K/V of that layer, heads flattened as lerobot does."""
        _, kv_heads, head_dim = self._heads()
        out = {}
        for layer, block in enumerate(self.expert.layers):
            if not self.config.is_cross_layer(layer):
                continue
            kv = store.layer_kv(layer)
            samples = kv[0].shape[0]
            flat = [x.transpose(1, 2).reshape(samples, store.num_slots, -1) for x in kv]
            k, v = (proj(x).view(samples, store.num_slots, kv_heads, head_dim).transpose(1, 2)
                    for proj, x in zip((block.self_attn.k_proj, block.self_attn.v_proj), flat))
            out[layer] = (k, v)
        return out

    def velocity(self, store: KVStore | BatchKV, noisy_actions: torch.Tensor, t: torch.Tensor,
                 cross: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """The velocity [sample, chunk, max_action_dim] (float32) at time t [sample] of the action tokens
        noisy_actions [sample, chunk, max_action_dim], attending to the prefix K/V in `store` (one sample's, or a
        batch's `BatchKV`) and the cross layers' projections of it (`cross_kv`, computed here if not given)."""
        cross = self.cross_kv(store) if cross is None else cross
        hidden = self.embed_actions(noisy_actions, t)
        (samples, chunk), prefix_len, wavelength = hidden.shape[:2], store.num_slots, self.config.rope_max_wavelength
        heads, kv_heads, head_dim = self._heads()
        own = torch.arange(chunk, device=hidden.device)
        joint = rope_tables(prefix_len + own, head_dim, wavelength)  # positions after the prefix's
        rebased = rope_tables(own, head_dim, wavelength)              # cross layers: from 0
        causal = torch.cat([torch.ones(chunk, prefix_len, dtype=torch.bool, device=hidden.device),
                            torch.ones(chunk, chunk, dtype=torch.bool, device=hidden.device).tril()], dim=1)
        for layer, block in enumerate(self.expert.layers):
            x = block.input_layernorm(hidden)
            attn_mod = block.self_attn
            if layer in cross:
                q = attn_mod.q_proj(x).view(samples, chunk, heads, head_dim).transpose(1, 2)
                q = rotate(q, *rebased).to(hidden.dtype)
                keys, values = cross[layer]
                attn, _ = attend(q, keys, values, head_dim**-0.5, None)
            else:
                q, k, v = project_qkv(attn_mod, x, None, None, *joint, heads, kv_heads, head_dim)
                q, k = q.to(hidden.dtype), k.to(hidden.dtype)
                prefix_k, prefix_v = store.layer_kv(layer)
                keys, values = torch.cat([prefix_k, k], dim=2), torch.cat([prefix_v, v], dim=2)
                attn, _ = attend(q, keys, values, head_dim**-0.5, causal)
            hidden = hidden + attn_mod.o_proj(attn)
            hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        out = self.expert.norm(hidden)
        proj = self.action_out_proj
        return nn.functional.linear(out.float(), proj.weight.float(), proj.bias.float())  # in float32, as lerobot

    @torch.inference_mode()
    def sample_actions(self, store: KVStore, noise: torch.Tensor, state_kv: None = None) -> torch.Tensor:
        """Euler integration from t = 1 (noise [1, chunk, max_action_dim]) to t = 0 (`dcvla.flow.euler`), every step
        reading the same prefix K/V (lerobot's within-call prefix cache) and the cross layers' projections of it,
        made once here."""
        if state_kv is not None:
            raise ValueError("SmolVLA's state token is in the prefix; the expert has no state K/V")
        cross = self.cross_kv(store)
        return euler(lambda x, t: self.velocity(store, x, t, cross), noise, self.config.num_steps)

    # ------------------------------------------------------------------------------------------------- flops
    def stage_flops(self, prefix_work: list[F.LayerWork], prefix_len: int, num_images: int,
                    state_reused: bool = False) -> dict[str, int]:
        """FLOPs per stage of one inference: vision (SigLIP + connector per present camera, and the state token's
        projection: the inputs' embedding), prefix (as computed), expert (the cross layers' K/V projections once, the
        action tokens at every Euler step, the heads)."""
        cfg, v, t = self.config, self.config.vision, self.config.text
        n = v.num_patches
        siglip = 2 * n * v.hidden_size * 3 * v.patch_size**2 + v.num_layers * F.attention_layer_flops(
            F.LayerWork(n, n, n), v.hidden_size, v.hidden_size, v.intermediate_size, 2)
        vision = num_images * (siglip + 2 * cfg.tokens_per_image * v.hidden_size * cfg.scale_factor**2 * t.width)
        vision += 2 * cfg.max_state_dim * t.width  # the state token's projection, made with the image tokens
        kv, attn = t.num_kv_heads * t.head_dim, t.num_heads * t.head_dim
        prefix = sum(F.attention_layer_flops(w, t.width, kv, t.mlp_dim, 3, attn) for w in prefix_work)
        h, w, crosses = cfg.chunk_size, cfg.expert_width, sum(map(cfg.is_cross_layer, range(t.depth)))
        joint = F.attention_layer_flops(F.LayerWork(h, h, prefix_len + h), w, kv, cfg.expert_mlp_dim, 3, attn)
        cross = F.attention_layer_flops(F.LayerWork(h, 0, prefix_len), w, kv, cfg.expert_mlp_dim, 3, attn)
        per_step = (t.depth - crosses) * joint + crosses * cross
        per_step += 2 * h * (cfg.max_action_dim * w * 2) + 2 * h * 3 * w * w  # action in/out, action-time MLP
        cross_kv = crosses * 2 * prefix_len * kv * kv * 2
        return {"vision": vision, "prefix": prefix, "expert": cross_kv + cfg.num_steps * per_step}


def random_model(config: SmolVLAConfig | str, seed: int = 0, attn_implementation: str = "sdpa") -> SmolVLAModel:
    """A SmolVLAModel with seeded random weights (transformers' and PyTorch's init); the global RNG is left as it was.
    Its normalisation is MEAN_STD (SmolVLA's): LIBERO's state statistics, the action as the flow gives it."""
    config = get_preset(config) if isinstance(config, str) else config
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmolVLAModel(config, attn_implementation)
    model.normalization = random_normalization("MEAN_STD", LIBERO_STATE_STATS, LIBERO_ACTION_DIM)
    return model.eval()
