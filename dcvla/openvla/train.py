"""Training an OpenVLA-architecture model on demonstrations (the micro preset), with OpenVLA's objective.

Each sample is one frame of a demonstration: the image as the policy sees it at evaluation, the task's prompt, and
the action taken after that frame as OpenVLA's 7 action tokens. The loss is the cross-entropy of those tokens under
teacher forcing, over the whole vocabulary, as OpenVLA fine-tunes: [BOS, vision tokens, prompt, action tokens] in
one causal pass, logits only where an action token is predicted (the 32k-way head is the costly part at micro
widths). `teacher_forced_logits` equals the policy's own prefill and greedy decode (tests/test_training.py).

Actions come in OpenVLA's convention (gripper 1 = open, 0 = close; LIBERO's: `dcvla.libero.protocol.openvla_action`)
and are normalised to [-1, 1] by the demonstrations' 1st and 99th percentiles on every dim but the gripper, as
OpenVLA's `dataset_statistics.json` (kept under `STATS_KEY`) says, so the trained model runs through the family's
unchanged code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..training import Demo, DemoSamples, shift_batch
from .model import OpenVLA
from .processing import Processor, preprocess_image

STATS_KEY = "libero_demos"  # the unnorm_key of a micro checkpoint


def dataset_statistics(demos: Sequence[Demo]) -> dict:
    """OpenVLA's `dataset_statistics.json` for the demonstrations: action and proprio statistics, counts."""
    actions = np.concatenate([d.actions for d in demos]).astype(np.float64)
    states = np.concatenate([d.states for d in demos]).astype(np.float64)

    def stats(x: np.ndarray) -> dict:
        out = {"mean": x.mean(0), "std": x.std(0), "max": x.max(0), "min": x.min(0), "q01": np.quantile(x, 0.01, axis=0),
               "q99": np.quantile(x, 0.99, axis=0)}
        return {k: [float(v) for v in values] for k, values in out.items()}

    mask = [True] * (actions.shape[-1] - 1) + [False]  # the gripper is used as is
    return {STATS_KEY: {"action": stats(actions) | {"mask": mask}, "proprio": stats(states),
                        "num_transitions": int(len(actions)), "num_trajectories": len(demos)}}


def normalize(actions: np.ndarray, stats: dict) -> np.ndarray:
    """Actions -> [-1, 1] by q01 / q99 where `mask` (the inverse of `unnormalize_action`), clipped."""
    low, high = np.asarray(stats["q01"]), np.asarray(stats["q99"])
    scaled = 2.0 * (actions - low) / np.maximum(high - low, 1e-8) - 1.0
    return np.clip(np.where(np.asarray(stats["mask"]), scaled, actions), -1.0, 1.0)


class DemoFrames(DemoSamples):
    """Every (frame, action) of `demos` as OpenVLA training samples (a demonstration's frames loaded on first use).
    `shift` > 0 shifts each batch's images at random by up to that many pixels (`shift_batch`: both towers' pixels
    together, drawn from the batch's sample indices, so a resumed run sees the same pixels)."""

    def __init__(self, demos: Sequence[Demo], processor: Processor, model: OpenVLA, statistics: dict,
                 shift: int = 0) -> None:
        super().__init__(demos, cameras=1)  # the agent view: OpenVLA sees one camera
        self.processor, self.shift = processor, shift
        self.prompts = {demo.instruction: processor.encode_prompt(demo.instruction)[0] for demo in self.demos}
        stats = statistics[STATS_KEY]["action"]
        self.tokens = [torch.from_numpy(model.action_tokenizer.encode(normalize(demo.actions, stats))) for demo in self.demos]

    def frame(self, i: int) -> np.ndarray:
        """Sample `i`'s agent view [H, W, 3] uint8, as the policy is handed it."""
        return self.frames(i)[0]

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixel_values [6, H, W], prompt ids [text], action token ids [7]) of sample `i`."""
        d, f = self.index[i]
        return (preprocess_image(self.frame(i), self.processor.config)[0], self.prompts[self.demos[d].instruction],
                self.tokens[d][f])


def teacher_forced_logits(model: OpenVLA, pixels: torch.Tensor, prompts: Sequence[torch.Tensor],
                          targets: torch.Tensor) -> torch.Tensor:
    """The logits [B, action_dim, vocab] (float32) that predict each of `targets` [B, action_dim] given the ones
    before it: [BOS, vision tokens, prompt, targets[:-1]] in one causal pass per sample (right-padded into a batch),
    the same logits the policy's prefill and greedy decode produce when they pick `targets`."""
    device = model.device
    patches = model.embed_image(pixels.to(device, model.dtype))  # [B, patch, hidden]
    embed = model.language_model.get_input_embeddings()
    rows, starts = [], []
    for b, (ids, tokens) in enumerate(zip(prompts, targets)):
        text = embed(torch.cat([ids.to(device), tokens[:-1].to(device)]))  # the prompt, then the actions fed back
        rows.append(torch.cat([text[:1], patches[b].to(text.dtype), text[1:]]))
        starts.append(patches.shape[1] + len(ids) - 1)  # the last prompt token predicts the first action token
    length = max(len(r) for r in rows)
    inputs = torch.zeros(len(rows), length, rows[0].shape[-1], dtype=rows[0].dtype, device=device)
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        inputs[b, : len(r)], mask[b, : len(r)] = r, 1
    hidden = model.language_model.model(inputs_embeds=inputs, attention_mask=mask).last_hidden_state
    at = torch.tensor(starts, device=device)[:, None] + torch.arange(targets.shape[1], device=device)  # [B, n]
    picked = hidden.gather(1, at[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, n, hidden]
    return model.language_model.lm_head(picked).float()


def action_loss(model: OpenVLA, data: DemoFrames, indices: np.ndarray) -> torch.Tensor:
    """Mean cross-entropy of the action tokens of samples `indices` under teacher forcing."""
    pixels, prompts, targets = zip(*(data.sample(int(i)) for i in indices))
    targets = torch.stack(targets)
    pixels = shift_batch(torch.stack(pixels), data.shift, indices)
    logits = teacher_forced_logits(model, pixels, prompts, targets)
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.to(logits.device).flatten())
