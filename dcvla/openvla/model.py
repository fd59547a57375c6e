"""The OpenVLA (Prismatic dinosiglip-224px + Llama-2) architecture, assembled from transformers' own modules.

Module paths mirror the published checkpoint: `vision_backbone.featurizer` (DINOv2 with registers),
`vision_backbone.fused_featurizer` (SigLIP), `projector.fc{1,2,3}`, `language_model` (LlamaForCausalLM).
Each tower keeps transformers' embeddings and layer modules, but only the blocks whose output is used are
built: features come from the second-to-last block, before the final norm, so the last block, the final
norm and SigLIP's pooling head never exist here (upstream runs the last block and throws it away).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import (
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from ..stats import resolve_unnorm_key
from .actions import ActionTokenizer, unnormalize_action
from ..vision import ViTConfig
from .config import LLMConfig, OpenVLAConfig


def _hf_vision_model(cfg: ViTConfig, attn_implementation: str) -> nn.Module:
    if cfg.name == "dino":
        if cfg.mlp_dim % cfg.hidden_size:  # transformers' DINOv2 sizes its MLP by an integer ratio
            raise ValueError(f"dino mlp_dim={cfg.mlp_dim} must be a multiple of hidden_size={cfg.hidden_size}")
        hf_cfg = Dinov2WithRegistersConfig(
            hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers_run, num_attention_heads=cfg.num_heads,
            mlp_ratio=cfg.mlp_dim // cfg.hidden_size, image_size=cfg.image_size, patch_size=cfg.patch_size,
            num_register_tokens=cfg.num_register_tokens, layerscale_value=1.0, layer_norm_eps=cfg.layer_norm_eps,
            hidden_act=cfg.hidden_act, qkv_bias=True,
        )
        hf_cfg._attn_implementation = attn_implementation
        return Dinov2WithRegistersModel(hf_cfg)
    if cfg.name == "siglip":
        hf_cfg = SiglipVisionConfig(
            hidden_size=cfg.hidden_size, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers_run,
            num_attention_heads=cfg.num_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
            hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps, vision_use_head=False,
        )
        hf_cfg._attn_implementation = attn_implementation
        return SiglipVisionModel(hf_cfg)
    raise ValueError(f"unknown vision tower {cfg.name!r}; expected 'dino' or 'siglip'")


class VisionTower(nn.Module):
    """One ViT, run up to its second-to-last block; returns the patch tokens without the final norm.

    `embeddings` and `blocks` are transformers' own modules (Dinov2WithRegisters or Siglip).
    """

    def __init__(self, cfg: ViTConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        hf = _hf_vision_model(cfg, attn_implementation)
        self.hf_config = hf.config
        self.embeddings = hf.embeddings
        self.blocks = hf.encoder.layer if cfg.name == "dino" else hf.encoder.layers
        if len(self.blocks) != cfg.num_layers_run:
            raise AssertionError(f"{cfg.name}: built {len(self.blocks)} blocks, expected {cfg.num_layers_run}")
        if cfg.name == "dino":
            # timm's DINOv2 gives the cls token no position (no_embed_class): keep transformers' cls slot at zero.
            # The mask token only serves masked-image pretraining; it is not in OpenVLA checkpoints.
            with torch.no_grad():
                self.embeddings.position_embeddings[:, 0].zero_()
                self.embeddings.mask_token.zero_()
            self.embeddings.mask_token.requires_grad_(False)

    @property
    def num_prefix_tokens(self) -> int:
        return self.cfg.num_prefix_tokens

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [batch, 3, H, W] -> tokens [batch, prefix + patch, hidden] (prefix first)."""
        return self.embeddings(pixel_values)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(pixel_values)  # [batch, prefix + patch, hidden]
        for block in self.blocks:
            hidden = block(hidden, None)
        return hidden[:, self.num_prefix_tokens :]  # [batch, patch, hidden]


class VisionBackbone(nn.Module):
    """The fused DINOv2 + SigLIP featurizer: 6-channel pixels in, concatenated patch features out."""

    def __init__(self, config: OpenVLAConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.featurizer = VisionTower(config.dino, attn_implementation)
        self.fused_featurizer = VisionTower(config.siglip, attn_implementation)

    @property
    def towers(self) -> dict[str, VisionTower]:
        return {"dino": self.featurizer, "siglip": self.fused_featurizer}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [batch, 6, H, W] -> patch features [batch, patch, dino_hidden + siglip_hidden]."""
        dino_pixels, siglip_pixels = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(dino_pixels), self.fused_featurizer(siglip_pixels)], dim=2)


class Projector(nn.Module):
    """Prismatic's fused-backbone projector: fc1 -> GELU -> fc2 -> GELU -> fc3 (exact GELU, all with bias)."""

    def __init__(self, in_dim: int, hidden_dim: int, llm_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, llm_dim)
        self.act_fn2 = nn.GELU()
        self.fc3 = nn.Linear(llm_dim, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act_fn2(self.fc2(self.act_fn1(self.fc1(features)))))


def llama_config(cfg: LLMConfig, attn_implementation: str = "sdpa") -> LlamaConfig:
    hf_cfg = LlamaConfig(
        hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads or cfg.num_heads,
        vocab_size=cfg.vocab_size, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, tie_word_embeddings=False,
        pad_token_id=cfg.text_vocab_size, bos_token_id=1, eos_token_id=2,
    )
    hf_cfg._attn_implementation = attn_implementation
    return hf_cfg


@dataclass
class ActionPrediction:
    """What one forward of the VLA gives: the 7 greedy action tokens and their logits."""

    token_ids: torch.Tensor      # [action_dim] int64
    logits: torch.Tensor         # [action_dim, vocab] float32: logits that chose each token
    normalized: np.ndarray       # [action_dim] in [-1, 1]: bin centres of the tokens
    action: np.ndarray           # [action_dim]: un-normalised with the dataset statistics


class PrismaticVLA(nn.Module):
    """The modules every Prismatic-based VLA shares (OpenVLA, OpenVLA-OFT): vision backbone -> projector -> Llama.

    Module paths are the published checkpoint's; `dcvla.openvla.checkpoint` loads exactly these three. The dataset
    statistics (`norm_stats`) are set by the checkpoint loader.
    """

    def __init__(self, config: OpenVLAConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.vision_backbone = VisionBackbone(config, attn_implementation)
        self.projector = Projector(*config.projector_dims)
        self.language_model = LlamaForCausalLM(llama_config(config.llm, attn_implementation))
        self.norm_stats: dict = {}  # dataset statistics keyed by unnorm_key, set by the checkpoint loader

    @property
    def device(self) -> torch.device:
        return self.projector.fc1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.fc1.weight.dtype

    def embed_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [1, 6, H, W] -> projected patch embeddings [1, patch, llm_hidden]."""
        return self.projector(self.vision_backbone(pixel_values))

    def multimodal_embeddings(self, input_ids: torch.Tensor, patch_embeddings: torch.Tensor) -> torch.Tensor:
        """[BOS] + vision tokens (positions 1..patch) + the prompt tokens after BOS -> [1, seq, llm_hidden]."""
        text = self.language_model.get_input_embeddings()(input_ids)  # [1, text, llm_hidden]
        return torch.cat([text[:, :1], patch_embeddings.to(text.dtype), text[:, 1:]], dim=1)

    def action_stats(self, unnorm_key: str | None) -> dict:
        """The `action` statistics for `unnorm_key` (q01, q99, mask, ...)."""
        return self.norm_stats[resolve_unnorm_key(self.norm_stats, unnorm_key)]["action"]


class OpenVLA(PrismaticVLA):
    """OpenVLA: vision backbone -> projector -> Llama, predicting `action_dim` discretised action tokens.

    Args:
        config: the model dims (see `dcvla.config.PRESETS`).
        attn_implementation: transformers attention backend for every tower ("sdpa" or "eager").
    """

    def __init__(self, config: OpenVLAConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__(config, attn_implementation)
        self.action_tokenizer = ActionTokenizer(config.llm.text_vocab_size, config.n_action_bins)
        self.eval()

    def new_kv_cache(self) -> DynamicCache:
        return DynamicCache(config=self.language_model.config)

    @torch.inference_mode()
    def generate_action_tokens(self, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding of `action_dim` tokens after a prefill of `inputs_embeds` [1, seq, llm_hidden].

        Returns:
            token_ids [action_dim] and the logits that chose them [action_dim, vocab] (float32).
        """
        cache = self.new_kv_cache()
        out = self.language_model(inputs_embeds=inputs_embeds, cache=cache, use_cache=True, logits_to_keep=1)
        return self.decode_actions(out.logits[:, -1], cache)

    @torch.inference_mode()
    def decode_actions(self, first_logits: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Continue greedy decoding from the prefill's last logits [1, vocab] and its filled KV cache."""
        logits = [first_logits.float()]
        tokens = [first_logits.argmax(-1)]  # [1]
        for _ in range(self.config.action_dim - 1):
            out = self.language_model(input_ids=tokens[-1][:, None], cache=cache, use_cache=True)
            logits.append(out.logits[:, -1].float())
            tokens.append(out.logits[:, -1].argmax(-1))
        return torch.cat(tokens), torch.cat(logits)

    @torch.inference_mode()
    def reference_action(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, unnorm_key: str | None = None
    ) -> ActionPrediction:
        """The reference forward: towers and projector as modules, then the plain transformers `LlamaForCausalLM`
        prefill and greedy decode (upstream `predict_action`). Policies run the cache engine instead
        (`dcvla.openvla.policy.CachedPolicy`); the tests hold the engine's every method against this.

        Args:
            input_ids: [1, text] prompt ids starting with BOS (see `dcvla.processing.Processor`).
            pixel_values: [1, 6, 224, 224] (DINOv2- then SigLIP-normalised channels).
            unnorm_key: which dataset's statistics un-normalise the action (see `resolve_unnorm_key`).
        """
        if input_ids.ndim != 2 or input_ids.shape[0] != 1 or pixel_values.shape[0] != 1:
            raise ValueError(
                f"reference_action takes one example (batch 1); got input_ids {tuple(input_ids.shape)}, "
                f"pixel_values {tuple(pixel_values.shape)}"
            )
        self.action_stats(unnorm_key)  # a missing key fails before the forward, naming the available ones
        embeds = self.multimodal_embeddings(input_ids.to(self.device), self.embed_image(pixel_values.to(self.device, self.dtype)))
        token_ids, logits = self.generate_action_tokens(embeds)
        return ActionPrediction(token_ids, logits, *self.decode_action(token_ids, unnorm_key))

    def decode_action(self, token_ids: torch.Tensor, unnorm_key: str | None) -> tuple[np.ndarray, np.ndarray]:
        """Action token ids [action_dim] -> (bin centres in [-1, 1], the action un-normalised for `unnorm_key`)."""
        normalized = self.action_tokenizer.decode(token_ids.cpu().numpy())
        return normalized, unnormalize_action(normalized, self.action_stats(unnorm_key))


# Random presets: a trained OpenVLA puts its greedy mass on the 256 action tokens. With random weights the argmax
# almost never lands there, so every action would clip to a bin edge. Scaling the action rows of lm_head makes
# greedy decoding pick action tokens (and action drift measurable) while the architecture stays as published.
ACTION_ROW_GAIN = 8.0


def random_model(config: OpenVLAConfig, seed: int = 0, attn_implementation: str = "sdpa") -> OpenVLA:
    """An OpenVLA with seeded random weights (transformers' init), for presets without a checkpoint.

    The global torch RNG is left as it was. `norm_stats` holds one identity entry, `"random"`
    (q01 = -1, q99 = 1), so actions stay in the normalised [-1, 1] range.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OpenVLA(config, attn_implementation)
    top, n = config.llm.text_vocab_size, config.n_action_bins
    with torch.no_grad():
        model.language_model.lm_head.weight[top - n : top] *= ACTION_ROW_GAIN
    dims = config.action_dim
    model.norm_stats = {
        "random": {"action": {"q01": [-1.0] * dims, "q99": [1.0] * dims, "mask": [True] * (dims - 1) + [False]}}
    }
    return model
