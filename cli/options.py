"""Options shared by the stages that train (train, finetune, and the compression stages)."""
from __future__ import annotations

import argparse
import os


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def add_training_options(p: argparse.ArgumentParser, epochs: int, lr: float | None) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help="number of epochs")
    g.add_argument("--batch-size", type=int, default=64, help="images per step")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="optimizer")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (default: 0.05 for sgd, 1e-3 for adamw)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay on conv/linear weights (default: 5e-4 sgd, 0.05 adamw); never on BN/biases")
    g.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine",
                   help="learning-rate schedule; step multiplies by --step-gamma at --step-milestones")
    g.add_argument("--step-milestones", type=float, nargs="+", default=[0.5, 0.75],
                   help="fractions of the epochs where the step schedule decays")
    g.add_argument("--step-gamma", type=float, default=0.1, help="decay factor of the step schedule")
    g.add_argument("--warmup-epochs", type=int, default=0, help="linear warm-up epochs")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    g.add_argument("--seed", type=int, default=0, help="seed for the split, initialization and data order")
    g.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)),
                   help="data-loading worker processes")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--no-amp", action="store_true", help="disable mixed precision (it is only used on CUDA)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the run directory's checkpoint (written after every epoch)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def train_config(args):
    from rsedge.trainer.train import TrainConfig

    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        step_milestones=tuple(args.step_milestones), step_gamma=args.step_gamma, seed=args.seed,
        workers=args.workers, amp=not args.no_amp, device=args.device, label_smoothing=args.label_smoothing,
    )
