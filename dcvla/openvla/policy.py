"""`CachedPolicy`: any registered method behind the streaming API, `reset()` per episode, `step(image,
instruction)` per frame. Vanilla is this policy with nothing reused and no store kept.

One frame runs in stages: the selection (which patches may reuse), the towers, the projector, the LLM prefill and
the decode. The stages up to the prefill, the episode state and the bookkeeping are the family's shared machinery
(`cache_policy.CachePolicyBase`, which OpenVLA-OFT's policy shares too); OpenVLA adds its sequence ([BOS] + 256
vision tokens + prompt, causal) and the greedy decode of its action tokens. The shadow pass of drift recording runs
the same stages as `vanilla`, with no store.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..images import validate_image
from ..streaming import StageClock
from ..tokenizer import load_tokenizer
from . import flops as F
from .actions import unnormalize_action
from .cache_policy import CachePolicyBase, Forward, Reuse, StepRecord
from .checkpoint import is_oft_checkpoint, load_pretrained, resolve_checkpoint_dir
from .config import get_preset
from .llm_cache import PrefillOutput
from .methods import CacheConfig
from .model import ActionPrediction, OpenVLA, random_model
from .processing import Processor

__all__ = ["CachedPolicy", "Forward", "Reuse", "StepRecord"]


class CachedPolicy(CachePolicyBase):
    """A method of `METHODS` as a closed-loop OpenVLA policy (lerobot-style `reset()` / `step()`).

    Args:
        model: the VLA.
        processor: turns (image, instruction) into model inputs.
        config: the method and its parameters (default: the dual cache).
    """

    model: OpenVLA
    default_preset = "tiny"
    preset_config = staticmethod(get_preset)
    build_model = staticmethod(random_model)
    processor_type = Processor

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, config: CacheConfig | None = None, preset: str | None = None,
                        dtype: torch.dtype = torch.float32, device: str = "cpu") -> "CachedPolicy":
        """A checkpoint in OpenVLA's layout; its own tokenizer if it ships one, else dcvla's offline one.

        Raises:
            ValueError: the directory is an OpenVLA-OFT checkpoint (`dcvla.openvla.oft.OFTCachedPolicy` loads it).
        """
        directory = resolve_checkpoint_dir(path_or_id)
        if is_oft_checkpoint(directory):
            raise ValueError(f"{directory} is an OpenVLA-OFT checkpoint (it holds action_head--*.pt / "
                             "proprio_projector--*.pt beside the backbone); load it with "
                             "dcvla.openvla.oft.OFTCachedPolicy.from_pretrained")
        model = load_pretrained(directory, preset, dtype=dtype, device=device)
        folder = directory if directory.is_dir() else directory.parent
        has_tokenizer = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
        if model.config.name == "openvla-7b" and not has_tokenizer:
            raise FileNotFoundError(f"{folder} has no Llama-2 tokenizer (tokenizer.json or tokenizer.model)")
        tokenizer = load_tokenizer(folder if has_tokenizer else None)
        return cls(model, Processor(tokenizer, model.config), config)

    @torch.inference_mode()
    def step(self, image, instruction: str) -> np.ndarray:
        """One frame -> the un-normalised 7-dim action; `self.last` keeps its tokens and logits.

        Inputs are checked before anything changes; an error after that (out of memory, an observer's) marks the
        policy broken, and every later step raises until `reset()`.
        """
        self.guard.check_usable()
        image = validate_image(image)
        input_ids, pixel_values = self.processor(image, instruction)
        self.guard.check(image.shape, input_ids)
        self._run([image], input_ids, pixel_values, None)
        return self.last.action

    # ------------------------------------------------------------------------------------ OpenVLA's hooks
    def _sequence(self, input_ids: torch.Tensor, vision: torch.Tensor, extra) -> torch.Tensor:
        return self.model.multimodal_embeddings(input_ids, vision)  # [BOS] + vision + prompt[1:]

    def _readout(self, out: PrefillOutput, clock: StageClock) -> tuple[torch.Tensor, torch.Tensor]:
        with clock.stage("llm_decode"):
            return self.model.decode_actions(out.logits, out.cache)  # token ids [action_dim], logits

    def _readout_values(self, readout: tuple) -> torch.Tensor:
        return readout[0].double()

    def _prediction(self, readout: tuple, values: np.ndarray) -> ActionPrediction:
        token_ids = values.astype(np.int64)
        normalized = self.model.action_tokenizer.decode(token_ids)
        action = unnormalize_action(normalized, self.model.action_stats(self.unnorm_key))
        return ActionPrediction(readout[0], readout[1], normalized, action)

    def _flops(self, out: Forward) -> dict[str, int]:
        cfg = self.model.config
        return {
            "dino": F.vit_flops(cfg.dino, out.vit_work["dino"]),
            "siglip": F.vit_flops(cfg.siglip, out.vit_work["siglip"]),
            "projector": F.projector_flops(cfg, out.projector_rows),
            "llm_prefill": F.llm_flops(cfg.llm, out.prefill.work),
            "llm_decode": F.decode_flops(cfg, out.seq_len),
        }
