"""OpenVLA-OFT (LIBERO recipe): OpenVLA's towers, projector and Llama, a proprio projector and an L1 regression head,
predicting a chunk of 8 actions in one bidirectional forward.

Module paths follow the published files: `vision_backbone`, `projector`, `language_model` (the merged backbone's
safetensors), `proprio_projector.fc{1,2}` and `action_head.model.*` (the `proprio_projector--*.pt` and
`action_head--*.pt` state dicts without DDP's `module.` prefix). The sequence, from upstream's `predict_action`:

    [BOS] + 512 patch tokens (third-person, then wrist) + proprio token + prompt[1:] + 56 zero slots + [STOP]

Every position attends to every other (upstream runs a transformers fork whose SDPA path is not causal); here the
stock Llama gets a 4D all-zero additive mask, which transformers uses as is. The head reads the final-norm hidden
states of 56 positions starting ONE before the first slot (the last prompt token and slots 0..54), as upstream reads
`[NUM_PATCHES + NUM_PROMPT_TOKENS :]` with BOS not counted, and as it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..actions import unnormalize_action
from ..model import PrismaticVLA
from ...stats import resolve_unnorm_key
from .config import OFTConfig
from .processing import OFTProcessor, check_state, normalize_proprio

UNNORM_EPS = 1e-8  # upstream's `_unnormalize_actions` widens q99 - q01 by this


class ProprioProjector(nn.Module):
    """The state -> one LLM token: fc1 -> GELU -> fc2 (upstream `prismatic/models/projectors.py`)."""

    def __init__(self, llm_dim: int, proprio_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(proprio_dim, llm_dim)
        self.act_fn1 = nn.GELU()
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act_fn1(self.fc1(proprio)))


class MLPResNetBlock(nn.Module):
    """x + ReLU(Linear(LayerNorm(x))), the modules in `ffn` as upstream names them."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """LayerNorm -> fc1 -> ReLU -> residual blocks -> LayerNorm -> fc2 (upstream `prismatic/models/action_heads.py`)."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.relu = nn.ReLU()
        self.mlp_resnet_blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(self.layer_norm1(x)))  # [batch, chunk, hidden]
        for block in self.mlp_resnet_blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))  # [batch, chunk, action_dim]


class L1RegressionActionHead(nn.Module):
    """The slot states [batch, action_slot, llm_hidden] -> normalised actions [batch, chunk, action_dim]: each chunk
    step reads its `action_dim` consecutive slot states, concatenated."""

    def __init__(self, config: OFTConfig) -> None:
        super().__init__()
        self.chunk_size = config.chunk_size
        self.model = MLPResNet(config.head_blocks, *config.head_dims)

    def forward(self, action_hidden: torch.Tensor) -> torch.Tensor:
        steps = action_hidden.reshape(action_hidden.shape[0], self.chunk_size, -1)  # [batch, chunk, action_dim * llm_hidden]
        return self.model(steps)


@dataclass
class OFTForward:
    """What one forward of OpenVLA-OFT gives, every tensor in the model's dtype unless noted."""

    patch_embeddings: torch.Tensor  # [1, vision_token, llm_hidden]: projected patches, third-person then wrist
    proprio_token: torch.Tensor     # [1, 1, llm_hidden]
    action_hidden: torch.Tensor     # [1, action_slot, llm_hidden]: final-norm states the head reads
    normalized: torch.Tensor        # [chunk, action_dim] float32: the head's output


class OpenVLAOFT(PrismaticVLA):
    """OpenVLA-OFT: two images and the proprio state in, a chunk of `chunk_size` continuous actions out.

    Args:
        config: the model dims (see `dcvla.openvla.oft.config.PRESETS`).
        attn_implementation: transformers attention backend ("sdpa" or "eager"), towers and Llama.
    """

    config: OFTConfig

    def __init__(self, config: OFTConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__(config, attn_implementation)
        self.proprio_projector = ProprioProjector(config.llm.hidden_size, config.proprio_dim)
        self.action_head = L1RegressionActionHead(config)
        self.eval()

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [1, 6 * num_images, H, W] -> tower features [1, vision_token, dino_hidden + siglip_hidden]:
        each 6-channel image through both towers, the images concatenated on the patch dim."""
        images = torch.split(pixel_values, [6] * self.config.num_images, dim=1)
        return torch.cat([self.vision_backbone(image) for image in images], dim=1)

    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [1, 6 * num_images, H, W] -> projected patch embeddings [1, vision_token, llm_hidden]."""
        return self.projector(self.vision_features(pixel_values))

    def embed_proprio(self, proprio: torch.Tensor) -> torch.Tensor:
        """Normalised state [proprio_dim] or [1, proprio_dim] -> its token [1, 1, llm_hidden]. The state passes through
        float32 first, as upstream's `torch.Tensor(proprio)` does, then takes the model's dtype."""
        proprio = proprio.to(torch.float32).to(self.device, self.dtype).reshape(1, -1)  # [1, proprio_dim]
        return self.proprio_projector(proprio)[:, None]

    def sequence_embeddings(self, input_ids: torch.Tensor, patch_embeddings: torch.Tensor,
                            proprio_token: torch.Tensor) -> torch.Tensor:
        """[BOS] + patches + proprio + prompt[1:] + zero action slots + [STOP] -> [1, seq, llm_hidden]."""
        prefix = self.multimodal_embeddings(input_ids, torch.cat([patch_embeddings, proprio_token], dim=1))
        stop = torch.full((1, 1), self.config.stop_token_id, dtype=torch.long, device=prefix.device)
        stop_embedding = self.language_model.get_input_embeddings()(stop)  # [1, 1, llm_hidden]
        slots = prefix.new_zeros(1, self.config.num_action_slots, prefix.shape[-1])  # upstream zeroes their embeddings
        return torch.cat([prefix, slots, stop_embedding], dim=1)

    def action_slice(self, prompt_length: int) -> slice:
        """The positions the head reads, for a prompt of `prompt_length` ids (BOS and the final "▁" included): from the
        last prompt token, one before the first slot (upstream's NUM_PATCHES + NUM_PROMPT_TOKENS), `action_slot` long."""
        start = 1 + self.config.num_vision_tokens + 1 + (prompt_length - 1) - 1  # BOS, patches, proprio, prompt[1:], -1
        return slice(start, start + self.config.num_action_slots)

    def bidirectional_mask(self, seq_len: int) -> torch.Tensor:
        """[1, 1, seq, seq] additive zeros: transformers takes a 4D mask as given, so no causal mask is built."""
        return torch.zeros(1, 1, seq_len, seq_len, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def reference_forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, proprio: torch.Tensor) -> OFTForward:
        """The plain forward, module by module (upstream `predict_action` with the L1 head, one pass).

        Args:
            input_ids: [1, text] prompt ids, BOS first and the bare "▁" last (`OFTProcessor.encode_prompt`).
            pixel_values: [1, 6 * num_images, size, size] (`OFTProcessor.pixel_values`).
            proprio: [proprio_dim] or [1, proprio_dim], already normalised (`normalize_proprio`).
        """
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must be [1, text] (one example); got shape {tuple(input_ids.shape)}")
        channels = 6 * self.config.num_images
        if pixel_values.ndim != 4 or pixel_values.shape[:2] != (1, channels):
            raise ValueError(f"pixel_values must be [1, {channels}, H, W] ({self.config.num_images} images of 6 channels); "
                             f"got shape {tuple(pixel_values.shape)}")
        if proprio.numel() != self.config.proprio_dim:
            raise ValueError(f"proprio must have {self.config.proprio_dim} values; got shape {tuple(proprio.shape)}")
        input_ids = input_ids.to(self.device)
        patches = self.embed_images(pixel_values.to(self.device, self.dtype))  # [1, vision_token, llm_hidden]
        proprio_token = self.embed_proprio(proprio)  # [1, 1, llm_hidden]
        embeds = self.sequence_embeddings(input_ids, patches, proprio_token)  # [1, seq, llm_hidden]
        mask = self.bidirectional_mask(embeds.shape[1])
        hidden = self.language_model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state  # after the final norm
        action_hidden = hidden[:, self.action_slice(input_ids.shape[1])]  # [1, action_slot, llm_hidden]
        normalized = self.action_head(action_hidden)[0].float()  # [chunk, action_dim]
        return OFTForward(patches, proprio_token, action_hidden, normalized)

    def stats(self, unnorm_key: str | None) -> dict:
        """The dataset statistics entry for `unnorm_key` ({"action": ..., "proprio": ...})."""
        return self.norm_stats[resolve_unnorm_key(self.norm_stats, unnorm_key)]

    def predict(self, images, state, instruction: str, *, processor: OFTProcessor, unnorm_key: str | None = None) -> np.ndarray:
        """One step: the action chunk in robot units.

        Args:
            images: [third-person, wrist] RGB images (uint8 [H, W, 3], or see `dcvla.images.validate_image`).
            state: the raw proprio state, `proprio_dim` numbers (normalised here with the dataset's q01/q99).
            instruction: the task, e.g. "put the bowl on the plate" (lower-cased into OpenVLA's prompt).
            processor: tokenizer and image preprocessing (`OFTProcessor`).
            unnorm_key: which dataset's statistics to use (`dcvla.stats.resolve_unnorm_key`).
        Returns:
            [chunk_size, action_dim] float64: BOUNDS_Q99 un-normalised on the masked dims, the gripper as predicted.
        """
        stats = self.stats(unnorm_key)  # a missing key fails first, naming the available ones
        proprio = normalize_proprio(check_state(state, self.config), stats["proprio"])
        input_ids, pixel_values = processor(images, instruction)
        out = self.reference_forward(input_ids, pixel_values, torch.tensor(proprio, dtype=torch.float32))
        return unnormalize_action(out.normalized.cpu().numpy(), stats["action"], eps=UNNORM_EPS)


def identity_stats(config: OFTConfig) -> dict:
    """One `"random"` entry whose q01 = -1, q99 = 1: actions and state stay in [-1, 1]."""
    def bounds(n: int) -> dict:
        return {"q01": [-1.0] * n, "q99": [1.0] * n}

    return {"random": {"action": bounds(config.action_dim) | {"mask": [True] * (config.action_dim - 1) + [False]},
                       "proprio": bounds(config.proprio_dim)}}


def random_model(config: OFTConfig, seed: int = 0, attn_implementation: str = "sdpa") -> OpenVLAOFT:
    """An OpenVLA-OFT with seeded random weights (PyTorch's and transformers' init), for presets without a checkpoint.

    The global torch RNG is left as it was; `norm_stats` holds `identity_stats`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OpenVLAOFT(config, attn_implementation)
    model.norm_stats = identity_stats(config)
    return model
