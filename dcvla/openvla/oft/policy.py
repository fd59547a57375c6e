"""`OFTCachedPolicy`: every method of `METHODS` on OpenVLA-OFT behind the streaming API: `reset()` per episode,
`step(images, instruction, state)` per frame -> the chunk of 8 actions (the argument order of the Pi0 family and of
`dcvla.libero`'s closed loop, which calls it with [agent view, wrist view] and executes the whole chunk).

It is the OpenVLA family's cached policy (`cache_policy.CachePolicyBase`: selection, towers, projector, plans,
prefill, bookkeeping) with OpenVLA-OFT's inputs and readout:
- two images (third-person, then wrist), each with its own unified selector and its own tower stores, so the reuse
  mask has 512 entries (LLM positions 1..512); TTF's per-tower masks are per image too;
- the sequence [BOS] + 512 vision tokens + proprio token + prompt[1:] + 56 zero action slots + [STOP], attended
  bidirectionally in ONE pass: no causal mask, no decode; the L1 head reads the final-norm states of the 56
  positions from one before the first slot (`OpenVLAOFT.action_slice`);
- BOS is never served from the store: under bidirectional attention its K/V read the proprio token, the prompt and
  the slots, which change;
- VLA-Cache as upstream's OFT path runs it (siyuhsu/vla-cache `src/openvla-oft/experiments/robot/openvla_utils.py`,
  `get_vla_action`): static patches per image (top 150), minus each image's 100 most attended, merged in position
  order, one entropy schedule over every row of the previous pass (`UPSTREAM_CONSTANTS["openvla-oft"]`).

Relevance (every selector's): upstream's OFT `token_attention_merge` averages the rows at positions [513, 513 + 34)
of layer 15, each image's vision columns (1..256, 257..512). Position 513 is OFT's proprio token, so these "text"
rows are the proprio token and the first 33 prompt tokens after BOS (or action slots, for a prompt shorter than
that); dcvla reads exactly those rows (`relevance_rows`, from position 1 + 512).

H1/H2 hold under bidirectional attention as under causal: a static token whose K/V come from the store at every
layer is read by nobody through its own row, so dropping its rows (dual_cache), reusing its Q (faithful=True) and
recomputing its Q with cached K/V (dual_cache_llm_kv) give the same chunk (tests/test_oft_policy.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ...images import validate_image
from ...streaming import StageClock
from ..actions import unnormalize_action
from ..cache_policy import CachePolicyBase, Forward
from ..checkpoint import OFT_PATTERNS, resolve_checkpoint_dir
from ..llm_cache import PrefillOutput
from ..methods import CacheConfig
from .checkpoint import load_pretrained, load_processor
from .config import get_preset
from .flops import stage_flops
from .model import UNNORM_EPS, OpenVLAOFT, random_model
from .processing import IMAGE_NAMES, OFTProcessor, check_state, normalize_proprio

RELEVANCE_ROWS = 34  # upstream's OFT token_attention_merge: rows [513, 513 + 34)


@dataclass
class ChunkPrediction:
    """One step's output."""

    normalized: np.ndarray  # [chunk, action_dim] float32: the L1 head's output, in [-1, 1] units
    action: np.ndarray      # [chunk, action_dim] float64: un-normalised (BOUNDS_Q99 on the masked dims)


class OFTCachedPolicy(CachePolicyBase):
    """A method of `METHODS` as a closed-loop OpenVLA-OFT policy.

    Args:
        model: the OpenVLA-OFT model (two images).
        processor: turns (images, instruction) into model inputs.
        config: the method and its parameters (default: the dual cache); VLA-Cache's top-k default to upstream's
            OFT constants (150 static, 100 removed per image).
    """

    family = "openvla-oft"
    uses_wrist = True     # dcvla.libero: step([agent view, wrist view], instruction, state)
    uses_state = True
    replan_steps = 8      # upstream's num_open_loop_steps: the whole chunk runs open loop
    image_names = IMAGE_NAMES
    causal = False
    relevance_rows = RELEVANCE_ROWS
    model: OpenVLAOFT
    default_preset = "oft-tiny"
    preset_config = staticmethod(get_preset)
    build_model = staticmethod(random_model)
    processor_type = OFTProcessor

    def __init__(self, model: OpenVLAOFT, processor: OFTProcessor, config: CacheConfig | None = None) -> None:
        if model.config.num_images != len(self.image_names):
            raise ValueError(f"OFTCachedPolicy runs {len(self.image_names)} images ({', '.join(self.image_names)}); "
                             f"the model takes {model.config.num_images}")
        super().__init__(model, processor, config)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, config: CacheConfig | None = None, preset: str | None = None,
                        dtype: torch.dtype = torch.float32, device: str = "cpu") -> "OFTCachedPolicy":
        """A checkpoint in the published OpenVLA-OFT layout (`dcvla.openvla.oft.load_pretrained`, strict)."""
        directory = resolve_checkpoint_dir(path_or_id, extra_patterns=OFT_PATTERNS)
        model = load_pretrained(directory, preset, dtype=dtype, device=device)
        return cls(model, load_processor(directory, model.config), config)

    @torch.inference_mode()
    def step(self, images, instruction: str, state) -> np.ndarray:
        """One frame -> the un-normalised chunk [chunk_size, action_dim]; `self.last` keeps the normalised one.

        Args:
            images: [third-person, wrist] RGB images (uint8 [H, W, 3], float [0, 1] or PIL).
            instruction: the task.
            state: the raw proprio state, `proprio_dim` numbers (LIBERO: eef pos, axis-angle, gripper qpos).
        Inputs are checked before anything changes; an error after that marks the policy broken until `reset()`.
        """
        self.guard.check_usable()
        stats = self.model.stats(self.unnorm_key)
        proprio = normalize_proprio(check_state(state, self.model.config), stats["proprio"])
        input_ids, pixel_values = self.processor(images, instruction)  # checks each image, naming it
        images = [validate_image(image) for image in images]
        self.guard.check(tuple(image.shape for image in images), input_ids)
        self._run(images, input_ids, pixel_values, torch.tensor(proprio, dtype=torch.float32))
        return self.last.action

    # ----------------------------------------------------------------------------------- OpenVLA-OFT's hooks
    def _extra_tokens(self, proprio: torch.Tensor) -> torch.Tensor:
        return self.model.embed_proprio(proprio)  # [1, 1, llm_hidden]

    def _sequence(self, input_ids: torch.Tensor, vision: torch.Tensor, proprio_token: torch.Tensor) -> torch.Tensor:
        return self.model.sequence_embeddings(input_ids, vision, proprio_token)  # [1, seq, llm_hidden]

    def _readout_positions(self, input_ids: torch.Tensor) -> slice:
        return self.model.action_slice(input_ids.shape[1])

    def _readout(self, out: PrefillOutput, clock: StageClock) -> tuple[torch.Tensor]:
        with clock.stage("head"):
            return (self.model.action_head(out.hidden)[0].float(),)  # [chunk, action_dim]

    def _readout_values(self, readout: tuple) -> torch.Tensor:
        return readout[0].flatten().double()

    def _prediction(self, readout: tuple, values: np.ndarray) -> ChunkPrediction:
        cfg = self.model.config
        normalized = values.astype(np.float32).reshape(cfg.chunk_size, cfg.action_dim)  # exact: float32 via float64
        action = unnormalize_action(normalized, self.model.stats(self.unnorm_key)["action"], eps=UNNORM_EPS)
        return ChunkPrediction(normalized, action)

    def _flops(self, out: Forward) -> dict[str, int]:
        return stage_flops(self.model.config, out.vit_work, out.projector_rows, out.prefill.work)
