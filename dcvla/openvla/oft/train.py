"""Training an OpenVLA-OFT model on demonstrations (the micro preset), with OFT's LIBERO objective.

Each sample is one frame of a demonstration, as OFT's LIBERO evaluation hands the policy that frame: the agent and
wrist views center-cropped, the robot state (eef position, axis-angle, gripper qpos) normalised by the
demonstrations' q01 / q99 as OFT's proprio, the task's prompt; the target is the chunk of the next `chunk_size`
actions (clamped at the episode's end: the last action repeats, as OFT's RLDS chunking reads past the end) in
OpenVLA's convention (gripper 1 = open), normalised by q01 / q99 on every dim but the gripper. The loss is upstream's
L1 regression loss, the mean absolute error of the head's chunk, over every row.

`chunk_predictions` is `OpenVLAOFT.reference_forward` for a batch: each sample's sequence [BOS, patches, proprio,
prompt[1:], zero slots, STOP], right-padded, in one bidirectional pass whose padded keys are masked, the head on the
same positions; tests/test_training_oft.py holds each sample's chunk equal to the policy's own forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ...training import Demo, DemoSamples, chunk_rows, shift_batch
from ..processing import preprocess_image
from ..train import STATS_KEY, normalize
from .model import OpenVLAOFT
from .processing import OFTProcessor, normalize_proprio


class OFTFrames(DemoSamples):
    """Every frame of `demos` as OpenVLA-OFT training samples (a demonstration's frames decoded on first use and
    kept). `statistics` is the model's `dataset_statistics.json` (`dcvla.openvla.train.dataset_statistics`). `shift`
    > 0 shifts each image at random by up to that many pixels (`shift_batch`: both towers' channels of an image
    together, drawn from the batch's sample indices, so a resumed run sees the same pixels)."""

    def __init__(self, demos: Sequence[Demo], processor: OFTProcessor, model: OpenVLAOFT, statistics: dict,
                 shift: int = 0) -> None:
        super().__init__(demos, cameras=model.config.num_images)  # agent view, then wrist view
        self.processor, self.shift = processor, shift
        stats = statistics[STATS_KEY]
        self.prompts = {demo.instruction: processor.encode_prompt(demo.instruction)[0] for demo in self.demos}
        self.proprio = [torch.from_numpy(np.stack([normalize_proprio(s, stats["proprio"]) for s in
                                                   demo.states.astype(np.float64)])).float() for demo in self.demos]
        self.chunks = []
        for demo in self.demos:
            rows, _ = chunk_rows(len(demo.actions), model.config.chunk_size)
            self.chunks.append(torch.from_numpy(normalize(demo.actions, stats["action"])[rows]).float())

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixel_values [6 * num_images, H, W], prompt ids [text], normalised proprio [proprio_dim], normalised chunk
        [chunk, action_dim]) of sample `i`."""
        d, f = self.index[i]
        pixels = [preprocess_image(image, self.processor.config)[0] for image in self.frames(i)]  # [6, H, W] each
        return torch.stack(pixels), self.prompts[self.demos[d].instruction], self.proprio[d][f], self.chunks[d][f]


def chunk_predictions(model: OpenVLAOFT, pixels: torch.Tensor, prompts: Sequence[torch.Tensor],
                      proprio: torch.Tensor) -> torch.Tensor:
    """The head's normalised chunks [B, chunk, action_dim] (float32) for pixels [B, 6 * num_images, H, W], prompt ids
    (each BOS first and "▁" last, `OFTProcessor.encode_prompt`) and normalised proprio [B, proprio_dim]: the
    reference forward of each sample, batched."""
    device = model.device
    patches = model.embed_images(pixels.to(device, model.dtype))  # [B, vision_token, hidden]
    tokens = model.proprio_projector(proprio.to(torch.float32).to(device, model.dtype))[:, None]  # [B, 1, hidden]
    rows = [model.sequence_embeddings(ids[None].to(device), patches[b: b + 1], tokens[b: b + 1])[0]
            for b, ids in enumerate(prompts)]
    length = max(len(r) for r in rows)
    inputs = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    mask = torch.zeros(len(rows), 1, length, length, dtype=model.dtype, device=device)  # additive: bidirectional
    for b, r in enumerate(rows):
        inputs[b, : len(r)] = r
        mask[b, ..., len(r):] = torch.finfo(model.dtype).min  # nobody reads a padded position
    hidden = model.language_model.model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
    starts = torch.tensor([model.action_slice(len(ids)).start for ids in prompts], device=device)
    at = starts[:, None] + torch.arange(model.config.num_action_slots, device=device)  # [B, action_slot]
    picked = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, action_slot, hidden]
    return model.action_head(picked).float()


def l1_loss(model: OpenVLAOFT, data: OFTFrames, indices: np.ndarray) -> torch.Tensor:
    """Upstream's L1 regression loss over the chunks of samples `indices`."""
    pixels, prompts, proprio, chunks = zip(*(data.sample(int(i)) for i in indices))
    pixels = torch.stack(pixels)  # [B, num_images, 6, H, W]: each image shifted on its own, its towers alike
    pixels = shift_batch(pixels, data.shift, indices).flatten(1, 2)
    predicted = chunk_predictions(model, pixels, prompts, torch.stack(proprio))
    return torch.nn.functional.l1_loss(predicted, torch.stack(chunks).to(predicted.device))
