"""Inputs as OpenVLA prepares them: image checks, the two towers' preprocessing, the prompt and its tokens.

Upstream's processor (resize strategy "resize-naive") resizes the PIL image to 224x224 with bicubic
interpolation (torchvision's resize on a PIL image is PIL's own resize), center-crops 224 (a no-op after the
resize), scales to [0, 1] and normalises once per tower; the two 3-channel results are stacked into
6 channels, DINOv2's first.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from ..images import resize_image, validate_image
from .config import OpenVLAConfig

PROMPT_TEMPLATE = "In: What action should the robot take to {instruction}?\nOut:"
EMPTY_PIECE = "▁"  # OpenVLA appends this bare SentencePiece space (Llama-2 id 29871) to every prompt


def preprocess_image(image: np.ndarray | Image.Image, config: OpenVLAConfig) -> torch.Tensor:
    """One RGB image -> pixel_values [1, 6, size, size]: DINOv2-normalised channels, then SigLIP-normalised."""
    size = config.dino.image_size
    pixels = torch.from_numpy(resize_image(validate_image(image), size).copy()).permute(2, 0, 1).float() / 255.0
    towers = []
    for cfg in (config.dino, config.siglip):
        mean = torch.tensor(cfg.mean).view(3, 1, 1)
        std = torch.tensor(cfg.std).view(3, 1, 1)
        towers.append((pixels - mean) / std)  # [3, size, size]
    return torch.cat(towers, dim=0)[None]  # [1, 6, size, size]


def build_prompt(instruction: str) -> str:
    """OpenVLA's prompt for one instruction (lower-cased, as the LIBERO evaluation passes it)."""
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    if not instruction.strip():
        raise ValueError("instruction is empty; the policy needs a task description")
    return PROMPT_TEMPLATE.format(instruction=instruction.strip().lower())


def check_sequence_length(instruction: str, prompt_tokens: int, config: OpenVLAConfig,
                          before: tuple[tuple[int, str], ...] | None = None,
                          after: tuple[tuple[int, str], ...] | None = None) -> None:
    """A ValueError when the Llama's sequence, [BOS] + `before` + the prompt's tokens (BOS excluded) + `after`, would
    pass its `max_position_embeddings`: the count, the limit, and by how much (in tokens, and roughly in characters)
    to shorten the instruction. `before` / `after` are (count, name) parts; by default OpenVLA's: the vision tokens,
    then the decoded action tokens."""
    before = ((config.num_patches, "vision"),) if before is None else before
    after = ((config.action_dim, "action"),) if after is None else after
    limit = config.llm.max_position_embeddings
    total = 1 + sum(n for n, _ in before) + prompt_tokens + sum(n for n, _ in after)
    if total <= limit:
        return
    over = total - limit
    chars = -(-over * len(instruction) // max(prompt_tokens, 1))  # ceil, at this prompt's characters per token
    parts = " + ".join(["1 BOS", *(f"{n} {name}" for n, name in before), f"{prompt_tokens} prompt",
                        *(f"{n} {name}" for n, name in after)])
    raise ValueError(
        f"instruction too long: the LLM would see {total} tokens ({parts} tokens), past its max_position_embeddings of "
        f"{limit}; shorten the instruction by at least {over} tokens (about {chars} of its {len(instruction)} characters)"
    )


class Processor:
    """Turns (image, instruction) into the model's `input_ids` and `pixel_values`.

    Args:
        tokenizer: a Llama-style tokenizer that prepends BOS and has the bare "▁" piece.
        config: the model config (image size and per-tower normalisation).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: OpenVLAConfig) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.empty_piece_id = tokenizer.convert_tokens_to_ids(EMPTY_PIECE)
        if self.empty_piece_id is None or self.empty_piece_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no bare {EMPTY_PIECE!r} piece, which OpenVLA appends to every prompt")

    def encode_prompt(self, instruction: str) -> torch.Tensor:
        """Instruction -> input_ids [1, text], BOS first and the bare "▁" last (added if missing).

        Raises:
            ValueError: the LLM's sequence ([BOS] + vision tokens + prompt + the decoded action tokens) would pass
                its `max_position_embeddings` (RoPE past the trained length gives actions, silently wrong).
        """
        prompt = build_prompt(instruction)
        ids = self.tokenizer(prompt).input_ids
        if ids[0] != self.tokenizer.bos_token_id:
            raise ValueError("tokenizer did not prepend BOS; OpenVLA's sequence starts with it")
        if ids[-1] != self.empty_piece_id:
            ids = ids + [self.empty_piece_id]
        check_sequence_length(instruction, len(ids) - 1, self.config, *self.sequence_parts())
        return torch.tensor([ids], dtype=torch.long)

    def sequence_parts(self) -> tuple[tuple[tuple[int, str], ...] | None, tuple[tuple[int, str], ...] | None]:
        """The (count, name) parts of the LLM's sequence before and after the prompt (None: OpenVLA's)."""
        return None, None

    def __call__(self, image: np.ndarray | Image.Image, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (input_ids [1, text], pixel_values [1, 6, size, size])."""
        return self.encode_prompt(instruction), preprocess_image(image, self.config)
