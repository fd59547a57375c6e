"""The training loop the micro policies are trained with (`scripts/train_micro.py`): family-agnostic, resumable.

A family brings a model and a `loss(model, indices) -> scalar tensor` over sample indices of its dataset; the loop
brings everything else: AdamW with linear warm-up and cosine decay, gradient clipping, a fixed seed, a progress bar,
the loss per step in `loss.csv`, and a checkpoint (`train_state.pt`: weights, optimiser, step) written atomically
every `checkpoint_every` steps and at the end. The batches are a pure function of (seed, step): an epoch is a
seeded permutation of the samples, so a run stopped anywhere and resumed from its last checkpoint takes the same
batches, and ends with the same weights as one that never stopped (tests/test_training.py holds it to that).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .io import atomic_path

STATE_FILE, LOSS_FILE = "train_state.pt", "loss.csv"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 6000
    batch_size: int = 16
    lr: float = 3e-4
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError(f"steps, batch_size and checkpoint_every must be at least 1: {self}")

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup` steps, then cosine decay to a tenth of `lr` at `steps`."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.steps - self.warmup, 1)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@dataclass
class Demo:
    """One demonstration as a family's trainer takes it: its instruction, actions [n, 7] in the family's convention,
    robot states [n, 8], and a function returning its frames per camera (agent view, then wrist view), each
    [n, H, W, 3] uint8 as the family's LIBERO evaluation hands them to the policy (called once, when first needed)."""

    instruction: str
    actions: np.ndarray
    states: np.ndarray
    frames: Callable[[], Sequence[np.ndarray]]


class DemoSamples:
    """Every frame of `demos` as a training sample (`index[i]` = (demonstration, frame)); a demonstration's frames
    are decoded on first use and kept. A family's dataset builds on it with its own preprocessing and targets."""

    def __init__(self, demos: Sequence[Demo], cameras: int) -> None:
        self.demos, self.cameras = list(demos), cameras
        self.index = [(d, f) for d, demo in enumerate(self.demos) for f in range(len(demo.actions))]
        self._frames: dict[int, Sequence[np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.index)

    def frames(self, i: int) -> list[np.ndarray]:
        """Sample `i`'s images, one per camera (the first `cameras` of its demonstration), each [H, W, 3] uint8."""
        d, f = self.index[i]
        if d not in self._frames:
            cameras = self._frames[d] = self.demos[d].frames()[: self.cameras]
            lengths = [len(c) for c in cameras]
            if len(cameras) != self.cameras or set(lengths) != {len(self.demos[d].actions)}:
                raise ValueError(f"demonstration {d} ({self.demos[d].instruction!r}) has {lengths} frames per camera "
                                 f"for {self.cameras} cameras and {len(self.demos[d].actions)} actions")
        return [frames[f] for frames in self._frames[d]]


def chunk_rows(n: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """The action rows [n, chunk] each of n frames' chunk reads, clamped to the episode's last, and which of them are
    past the episode's end [n, chunk] (lerobot's `_get_query_indices` with delta indices 0..chunk-1; OpenVLA-OFT's
    RLDS chunking clamps the same way)."""
    wanted = np.arange(n)[:, None] + np.arange(chunk)[None, :]
    return np.minimum(wanted, n - 1), wanted >= n


def random_shift(pixels: torch.Tensor, shift: int, rng: np.random.Generator) -> torch.Tensor:
    """DrQ's random shift: each image of pixels [..., C, H, W] (its C channels together) padded by `shift` pixels
    (edge replicated) and cropped back to H x W at an offset drawn from `rng`, so the policy cannot key on a pixel's
    exact place."""
    if shift <= 0:
        return pixels
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    padded = torch.nn.functional.pad(flat, (shift,) * 4, mode="replicate")
    offsets = rng.integers(0, 2 * shift + 1, size=(len(flat), 2))
    h, w = pixels.shape[-2:]
    out = torch.stack([p[:, y : y + h, x : x + w] for p, (y, x) in zip(padded, offsets)])
    return out.reshape(pixels.shape)


def shift_batch(pixels: torch.Tensor, shift: int, indices) -> torch.Tensor:
    """`random_shift` of the pixels of the batch of sample `indices`, its offsets drawn from those indices (a stream
    of its own, apart from a family's other draws for the same batch), so a resumed run sees the same pixels."""
    return random_shift(pixels, shift, np.random.default_rng([1, *map(int, indices)]))


def batch_indices(n_samples: int, config: TrainConfig, step: int) -> np.ndarray:
    """The sample indices of batch `step`: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    if n_samples < 1:
        raise ValueError("no training samples")
    start = step * config.batch_size
    out = []
    while len(out) < config.batch_size:
        epoch, offset = divmod(start + len(out), n_samples)
        order = np.random.default_rng([config.seed, epoch]).permutation(n_samples)
        out.extend(order[offset: offset + config.batch_size - len(out)].tolist())
    return np.asarray(out)


def _save_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int, config: TrainConfig) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "config": asdict(config)}, tmp)


def _load_state(path: Path, config: TrainConfig) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != asdict(config):
        raise ValueError(f"{path} was trained with {state['config']}, not {asdict(config)}: resume with the same "
                         f"settings, or train into another directory")
    return state


def load_weights(model: torch.nn.Module, out_dir: str | Path, config: TrainConfig) -> int:
    """The weights of the last checkpoint under `out_dir` (of a run with `config`, else a clear error) into `model`,
    reading nothing else and writing nothing: a live run may be appending to its log there. Returns its step."""
    state = _load_state(Path(out_dir) / STATE_FILE, config)
    model.load_state_dict(state["model"])
    return int(state["step"])


def _resume(out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: TrainConfig) -> int:
    """Load the last checkpoint under `out_dir` if there is one (the same config, else a clear error) and trim
    `loss.csv` to its step. Returns the step to continue from."""
    path, log = out_dir / STATE_FILE, out_dir / LOSS_FILE
    if not path.exists():
        log.unlink(missing_ok=True)  # the log of a run stopped before its first checkpoint: those steps rerun
        return 0
    state = _load_state(path, config)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if log.exists():
        rows = list(csv.reader(log.open()))
        kept = [rows[0]] + [r for r in rows[1:] if int(r[0]) < state["step"]]
        with atomic_path(log) as tmp, tmp.open("w", newline="") as f:
            csv.writer(f).writerows(kept)
    return int(state["step"])


def train(model: torch.nn.Module, loss: Callable[[torch.nn.Module, np.ndarray], torch.Tensor], n_samples: int,
          config: TrainConfig, out_dir: str | Path, progress: bool = True, stop_after: int | None = None) -> int:
    """Train `model` in place with `loss` over batches of `n_samples` sample indices; resumes from `out_dir`.

    `stop_after` ends the run after that many steps of this call (a checkpoint is written first), as a time limit
    would. Returns the step reached.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=config.lr)
    step = _resume(out_dir, model, optimizer, config)
    end = config.steps if stop_after is None else min(config.steps, step + stop_after)
    log = out_dir / LOSS_FILE
    new_log = not log.exists()
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=step, desc=f"training {out_dir.name}", disable=not progress)
    with log.open("a", newline="") as f:
        writer = csv.writer(f)
        if new_log:
            writer.writerow(["step", "loss", "lr", "seconds"])
        while step < end:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            value = loss(model, batch_indices(n_samples, config, step))
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            writer.writerow([step - 1, f"{value.item():.6g}", f"{config.lr_at(step - 1):.6g}",
                             f"{time.perf_counter() - t0:.4f}"])
            bar.update(1)
            bar.set_postfix(loss=f"{value.item():.4f}")
            if step % config.checkpoint_every == 0 or step == end:
                f.flush()
                _save_state(out_dir / STATE_FILE, model, optimizer, step, config)
    bar.close()
    model.eval()
    return step
