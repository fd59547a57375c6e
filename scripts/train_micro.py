"""Train a micro policy on the project's demonstrations (scripts/record_demos.py) and write it in its family's
published layout, loadable by the family's strict loader.

    MUJOCO_GL=egl .venv/bin/python scripts/train_micro.py openvla-micro            # make train-micro (both)
    MUJOCO_GL=egl .venv/bin/python scripts/train_micro.py smolvla-micro
    .venv/bin/python scripts/train_micro.py openvla-micro --stop-after 500          # a slice; rerun to go on
    .venv/bin/python scripts/train_micro.py openvla-micro --export --out /tmp/ckpt  # the last checkpoint, to evaluate

`openvla-micro` is the OpenVLA architecture (DINOv2 + SigLIP towers, projector, Llama with action tokens) at micro
widths, trained from seeded random weights with OpenVLA's objective (`dcvla.openvla.train`); `oft-micro` is the
same model with OpenVLA-OFT's LIBERO inputs and heads (both views, the proprio state, 8-action chunks regressed
with an L1 loss in one bidirectional pass, its towers in 28 px patches; `dcvla.openvla.oft.train`); `smolvla-micro` is
SmolVLA's (SigLIP, pixel-shuffle connector, SmolLM2 layers, the flow-matching action expert), trained with lerobot
SmolVLA's flow-matching objective (`dcvla.smolvla.train`). Each learns from every frame of every demonstration
under --demos. The run is resumable: its state (weights, optimiser, step) goes to <work>/train_state.pt every
--checkpoint-every steps, the loss per step to <work>/loss.csv; a rerun with the same settings continues from the
last checkpoint and takes the same batches. At the end the checkpoint goes to --out (bfloat16, in the family's
published layout: OpenVLA's safetensors and dataset_statistics.json; lerobot's model.safetensors, config.json and
normaliser files, with dcvla's tokenizer) and the loss curve to --figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from dcvla.libero.episodes import DEMO_DIR, load_episodes
from dcvla.training import LOSS_FILE, STATE_FILE, TrainConfig, load_weights, train

ROOT = Path(__file__).resolve().parents[1]


def load_demos(directory: Path) -> list:
    """Every demonstration under `directory`, with a count per task; a clear error when there is none."""
    episodes = load_episodes(directory)
    if not episodes:
        raise SystemExit(f"no demonstrations under {directory}: record them first (scripts/record_demos.py, "
                         f"about 2 h on 2 cores for 50 per task)")
    counts = Counter(f"{ep.suite} task {ep.task_id}" for ep in episodes)
    print("demonstrations: " + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())), flush=True)
    return episodes


def openvla_demos(episodes: list) -> list:
    """Episodes as OpenVLA training demonstrations: the center-cropped frames the LIBERO evaluation hands an OpenVLA
    policy, the oracle's actions in OpenVLA's gripper convention, the robot states."""
    from dcvla.libero import protocol
    from dcvla.training import Demo

    return [Demo(ep.instruction, protocol.openvla_action(ep.actions), ep.states, lambda ep=ep: (cropped(ep.jpegs),))
            for ep in episodes]


def oft_demos(episodes: list) -> list:
    """Episodes as OpenVLA-OFT training demonstrations: `openvla_demos`' with the wrist view too, center-cropped
    alike, as OFT's LIBERO evaluation hands the policy both."""
    from dcvla.libero import protocol
    from dcvla.training import Demo

    return [Demo(ep.instruction, protocol.openvla_action(ep.actions), ep.states,
                 lambda ep=ep: (cropped(ep.jpegs), cropped(ep.wrist_jpegs))) for ep in episodes]


def cropped(jpegs) -> np.ndarray:
    """An episode's frames of one camera center-cropped, decoded one at a time rather than through `ep.frames` (which
    keeps the uncropped frames in the episode too: twice the memory, 9 GB for the 200 demonstrations)."""
    from dcvla.libero import protocol

    if jpegs is None:
        raise ValueError("the episode has no frames of this camera (recorded without the wrist view?)")
    return np.stack([protocol.policy_input(protocol.decode_frame(jpeg)) for jpeg in jpegs])


def train_openvla(args: argparse.Namespace, config: TrainConfig) -> None:
    """`openvla-micro` (OpenVLA's objective and inputs) or `oft-micro` (OpenVLA-OFT's): the same backbone, each
    family's processor, frames, loss and layout."""
    from dcvla.openvla.train import dataset_statistics
    from dcvla.tokenizer import load_tokenizer

    if args.preset == "oft-micro":
        from dcvla.openvla.oft import OFTProcessor as Processor, get_preset, random_model, save_pretrained
        from dcvla.openvla.oft.train import OFTFrames as Frames, l1_loss as objective
        demos = oft_demos(load_demos(args.demos))
    else:
        from dcvla.openvla.checkpoint import save_pretrained
        from dcvla.openvla.config import get_preset
        from dcvla.openvla.model import random_model
        from dcvla.openvla.processing import Processor
        from dcvla.openvla.train import DemoFrames as Frames, action_loss as objective
        demos = openvla_demos(load_demos(args.demos))
    preset = get_preset(args.preset)
    model = random_model(preset, seed=config.seed)
    model.norm_stats = dataset_statistics(demos)
    data = Frames(demos, Processor(load_tokenizer(), preset), model, model.norm_stats, shift=args.shift)
    train_and_save(args, config, model, lambda m, idx: objective(m, data, idx), len(data),
                   lambda out: save_pretrained(model, out))


def train_and_save(args: argparse.Namespace, config: TrainConfig, model: torch.nn.Module, loss, n_samples: int,
                   save) -> None:
    """Train `model` with `loss` over `n_samples` (resuming from --work) and, once every step is done, `save` it to
    --out."""
    print(f"{args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {n_samples} frames, "
          f"{config.steps} steps of {config.batch_size}", flush=True)
    if args.export:  # the run's weights as they are; its state and log untouched (it may be training on)
        step = load_weights(model, args.work, config)
    else:
        step = train(model, loss, n_samples, config, args.work, stop_after=args.stop_after)
    if step < config.steps:
        print(f"stopped at step {step} of {config.steps}; rerun the same command to go on", flush=True)
        if not args.export:
            return
    save(args.out)
    print(f"checkpoint{f' of step {step}' if step < config.steps else ''} -> {args.out}", flush=True)


def smolvla_demos(episodes: list) -> list:
    """Episodes as SmolVLA training demonstrations: the agent and wrist views as the LIBERO evaluation hands a flow
    policy them (uncropped: lerobot and openpi resize the whole view), the oracle's actions in LIBERO's own
    convention (SmolVLA's, as lerobot's LIBERO datasets hold them), the robot states."""
    from dcvla.training import Demo

    return [Demo(ep.instruction, ep.actions, ep.states, lambda ep=ep: (ep.frames, ep.wrist_frames)) for ep in episodes]


def train_smolvla(args: argparse.Namespace, config: TrainConfig) -> None:
    from dcvla.smolvla import SmolVLAPolicy, random_model
    from dcvla.smolvla.train import DemoFrames, dataset_statistics, flow_loss
    from dcvla.tokenizer import load_tokenizer

    demos = smolvla_demos(load_demos(args.demos))
    model = random_model(args.preset, seed=config.seed)
    model.normalization = dataset_statistics(demos)
    policy = SmolVLAPolicy(model, load_tokenizer())
    data = DemoFrames(demos, policy, shift=args.shift)
    train_and_save(args, config, model, lambda m, idx: flow_loss(m, data, idx), len(data), policy.save_pretrained)


TRAINERS = {"openvla-micro": (train_openvla, "action-token cross-entropy"),
            "oft-micro": (train_openvla, "L1 error of the action chunk"),
            "smolvla-micro": (train_smolvla, "flow-matching squared error")}
FAMILIES = tuple(TRAINERS)


def loss_figure(work: Path, figure: Path, title: str) -> None:
    import pandas as pd
    import plotly.express as px

    from dcvla.studies.common import save_figure

    log = pd.read_csv(work / LOSS_FILE)
    log["loss (mean of 50 steps)"] = log["loss"].rolling(50, min_periods=1).mean()
    fig = px.line(log, x="step", y=["loss", "loss (mean of 50 steps)"], title=title, log_y=True)
    save_figure(fig, figure.stem, figure.parent, width=900, height=450)
    print(f"loss curve -> {figure}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preset", choices=FAMILIES)
    ap.add_argument("--demos", type=Path, default=DEMO_DIR, help=f"demonstrations (default {DEMO_DIR})")
    ap.add_argument("--out", type=Path, help="the checkpoint (default checkpoints/PRESET)")
    ap.add_argument("--work", type=Path, help="training state and loss log (default data/train/PRESET)")
    ap.add_argument("--figure", type=Path, help="the loss curve (default figures/train_PRESET.png)")
    ap.add_argument("--steps", type=int, default=TrainConfig.steps, help=f"default {TrainConfig.steps}")
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help=f"default {TrainConfig.batch_size}")
    ap.add_argument("--lr", type=float, default=TrainConfig.lr)
    ap.add_argument("--seed", type=int, default=TrainConfig.seed)
    ap.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every)
    ap.add_argument("--stop-after", type=int, help="stop after this many steps of this run (a checkpoint is kept)")
    ap.add_argument("--export", action="store_true",
                    help="train nothing: write the run's last checkpoint to --out, to evaluate it before the end")
    ap.add_argument("--shift", type=int, default=8,
                    help="random image shift, pixels (DrQ augmentation; default 8 of 224; 0: none)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    args.out = args.out or ROOT / "checkpoints" / args.preset
    args.work = args.work or ROOT / "data" / "train" / args.preset
    args.figure = args.figure or ROOT / "figures" / f"train_{args.preset}.png"
    if args.export and not (args.work / STATE_FILE).is_file():  # else it would write the seeded random weights
        ap.error(f"--export: no training state {args.work / STATE_FILE} to export; train first (or pass its --work)")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, warmup=min(TrainConfig.warmup, args.steps // 10))
    t0 = time.perf_counter()
    print(f"training {args.preset} on the demonstrations under {args.demos}", flush=True)  # load_demos counts them
    trainer, objective = TRAINERS[args.preset]
    trainer(args, config)
    loss_figure(args.work, args.figure, f"{args.preset}: {objective} per step")
    print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
