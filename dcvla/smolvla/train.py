"""Training a SmolVLA-architecture model on demonstrations (the micro preset), with lerobot SmolVLA's objective.

Each sample is one frame of a demonstration, as lerobot's LIBERO datasets give it to `SmolVLAPolicy.forward`: the
cameras (agent view, wrist view) and the robot state at that frame, the instruction, and the next `chunk_size`
actions. Past the episode's end the chunk repeats its last action and `action_is_pad` masks those rows out of the
loss (lerobot's delta-timestamp query: indices clamped to the episode, `is_pad` where they were). The actions stay
in LIBERO's own convention (gripper -1 open, +1 close), as lerobot's LIBERO datasets hold them and as
`SmolVLAPolicy` declares (`action_convention = "libero"`).

The objective is lerobot's `VLAFlowMatching.forward` with `SmolVLAPolicy.forward`'s reduction: time t ~ Beta(1.5, 1)
x 0.999 + 0.001, noise ~ N(0, 1) over the padded chunk, x_t = t noise + (1 - t) actions, target u_t = noise -
actions; the loss is the squared error of the predicted velocity per element over the real action dims (7 of
`max_action_dim`) and the unpadded rows, summed and divided by their count. State and action are normalised MEAN_STD
with the statistics lerobot's checkpoint stores (`dataset_statistics`, float32), the state and action zero-padded to
`max_state_dim` / `max_action_dim` as lerobot's `pad_vector`. Everything is trained (a micro preset has no pretrained
VLM to freeze, where lerobot fine-tunes the expert only).

The inputs are prepared by the policy itself (`SmolVLAPolicy.pixel_values`, `encode_prompt`, `normalize_state`) and
the velocity is the model's own differentiable code (`velocities`: `embed_images`, `prefix_of`, `run_prefix`,
`velocity`), the code the policy integrates at inference (tests/test_training.py holds them equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..kv_store import BatchKV
from ..normalization import ACTION, STATE, Normalization
from ..prefix_reuse import LIBERO_ACTION_DIM
from ..training import Demo, DemoSamples, chunk_rows, shift_batch
from .model import SmolVLAModel
from .policy import SmolVLAPolicy

QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)  # lerobot's DEFAULT_QUANTILES, as q01 ... q99
TIME_BETA, TIME_SCALE, TIME_OFFSET = (1.5, 1.0), 0.999, 0.001  # lerobot's `sample_time`


def dataset_statistics(demos: Sequence[Demo]) -> Normalization:
    """The demonstrations' normaliser as a lerobot SmolVLA checkpoint carries it: MEAN_STD for the state and the
    action, each with the per-dim statistics lerobot's `compute_stats` keeps over every frame (min, max, mean, std
    over the population, the `QUANTILES`, here exact; not its frame count), rounded to float32 as the statistics
    file stores them, so training normalises as the loaded checkpoint will."""
    def stats(x: np.ndarray) -> dict[str, np.ndarray]:
        x = x.astype(np.float64)
        values = {"min": x.min(0), "max": x.max(0), "mean": x.mean(0), "std": x.std(0),
                  **{f"q{round(q * 100):02d}": np.quantile(x, q, axis=0) for q in QUANTILES}}
        return {k: v.astype(np.float32).astype(np.float64) for k, v in values.items()}

    return Normalization({STATE: "MEAN_STD", ACTION: "MEAN_STD"},
                         {STATE: stats(np.concatenate([d.states for d in demos])),
                          ACTION: stats(np.concatenate([d.actions for d in demos]))})


def pad_vector(x: np.ndarray, dim: int) -> np.ndarray:
    """lerobot's `pad_vector`: x [..., d] zero-padded to [..., dim]."""
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dim - x.shape[-1])])


@dataclass
class Batch:
    """A batch of samples as the model takes them."""

    pixels: torch.Tensor         # [sample, camera, 3, H, W] in [-1, 1]
    prompts: list[torch.Tensor]  # per sample, the prompt's token ids [1, text]
    states: torch.Tensor         # [sample, max_state_dim] normalised, zero-padded
    actions: torch.Tensor        # [sample, chunk, max_action_dim] normalised, zero-padded
    is_pad: torch.Tensor         # [sample, chunk] bool: past the episode's end


class DemoFrames(DemoSamples):
    """Every frame of `demos` as SmolVLA training samples, prepared by `policy` (its model's statistics must be the
    demonstrations'); a demonstration's frames are decoded on first use and kept. `shift` > 0 shifts each batch's
    images at random by up to that many pixels (`shift_batch`, drawn from the batch's sample indices)."""

    def __init__(self, demos: Sequence[Demo], policy: SmolVLAPolicy, shift: int = 0) -> None:
        super().__init__(demos, cameras=2)  # agent view, wrist view
        self.policy, self.shift = policy, shift
        cfg, norm = policy.model.config, policy.model.normalization
        self.prompts = {demo.instruction: torch.tensor([policy.encode_prompt(demo.instruction)[0]]) for demo in self.demos}
        self.states = [torch.from_numpy(pad_vector(np.stack([policy.normalize_state(s) for s in demo.states]),
                                                   cfg.max_state_dim)).float() for demo in self.demos]
        self.chunks = []
        for demo in self.demos:
            rows, is_pad = chunk_rows(len(demo.actions), cfg.chunk_size)
            normalised = pad_vector(norm.normalize(demo.actions, ACTION), cfg.max_action_dim)  # [n, max_action_dim]
            self.chunks.append((torch.from_numpy(normalised[rows]).float(), torch.from_numpy(is_pad)))

    def batch(self, indices: Sequence[int]) -> Batch:
        """Samples `indices`: each frame's cameras through the policy's preprocessing, its prompt, state and chunk."""
        pixels, prompts, states, actions, is_pad = [], [], [], [], []
        for i in map(int, indices):
            d, f = self.index[i]
            pixels.append(self.policy.pixel_values(self.frames(i))[1])
            prompts.append(self.prompts[self.demos[d].instruction])
            states.append(self.states[d][f])
            actions.append(self.chunks[d][0][f])
            is_pad.append(self.chunks[d][1][f])
        return Batch(shift_batch(torch.stack(pixels), self.shift, indices), prompts, torch.stack(states),
                     torch.stack(actions), torch.stack(is_pad))


def velocities(model: SmolVLAModel, batch: Batch, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's velocity [sample, chunk, max_action_dim] (float32) at x_t [sample, chunk, max_action_dim] and t
    [sample], with gradients: every sample's cameras through the vision tower at once, then, for each group of
    samples whose prompts have one length, the policy's prefix over the group at once (its K/V in a `BatchKV`) and
    the expert at the group's (x_t, t)."""
    device = model.device
    cameras = batch.pixels.shape[1]
    images = model.embed_images(batch.pixels.flatten(0, 1).to(device))  # [sample * camera, token, width]
    images = images.unflatten(0, (-1, cameras))  # [sample, camera, token, width]
    groups: dict[int, list[int]] = {}
    for b, prompt in enumerate(batch.prompts):
        groups.setdefault(prompt.shape[1], []).append(b)
    out = torch.empty(x_t.shape, dtype=torch.float32, device=device)
    for members in groups.values():
        index = torch.tensor(members, device=device)
        prompts = torch.cat([batch.prompts[b] for b in members]).to(device)
        prefix = model.prefix_of(images[index], prompts, batch.states[members].to(device))
        store = BatchKV(model.config.text.depth, prefix.length)
        model.run_prefix(prefix, None, store, 0)
        out[index] = model.velocity(store, x_t[members].to(device), t[members].to(device))
    return out


def flow_noise(indices: Sequence[int], shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise [shape] and times [sample] of a batch, a function of its sample indices (so a resumed run draws
    what the uninterrupted one drew): lerobot's N(0, 1) and Beta(1.5, 1) x 0.999 + 0.001."""
    rng = np.random.default_rng([int(i) for i in indices])
    noise = rng.standard_normal(shape, dtype=np.float32)
    t = rng.beta(*TIME_BETA, size=shape[0]) * TIME_SCALE + TIME_OFFSET
    return torch.from_numpy(noise), torch.from_numpy(t.astype(np.float32))


def flow_loss(model: SmolVLAModel, data: DemoFrames, indices: Sequence[int]) -> torch.Tensor:
    """lerobot SmolVLA's flow-matching loss of samples `indices`: the squared error of the velocity against
    noise - actions, over the real action dims of the unpadded rows."""
    batch = data.batch(indices)
    noise, t = flow_noise(indices, tuple(batch.actions.shape))
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * batch.actions
    v_t = velocities(model, batch, x_t, t)
    u_t = (noise - batch.actions).to(v_t.device)
    keep = ~batch.is_pad.to(v_t.device)  # [sample, chunk]
    losses = torch.nn.functional.mse_loss(v_t, u_t, reduction="none")[:, :, :LIBERO_ACTION_DIM] * keep[..., None]
    return losses.sum() / (keep.sum() * LIBERO_ACTION_DIM).clamp_min(1)
