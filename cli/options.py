"""Options shared by the stages that train (train, finetune, and the compression stages)."""
from __future__ import annotations

import argparse
import os

ADAMW_LR = 1e-3


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Appends '(default: X)' to options that have a meaningful default, and only to those: not
    to required options, flags, options whose default is worked out later (None), or help that
    already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.required or default is None or default is False
                or default == argparse.SUPPRESS or "default" in text):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(str(v) for v in default)
        return f"{text} (default: {default})"


def add_fraction_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--fraction", type=float, default=1.0, metavar="F",
                   help=f"use a seeded, per-class stratified fraction F in (0, 1] of {what}; the record "
                   "says how many images that was")


def add_training_options(p: argparse.ArgumentParser, epochs: int, sgd_lr: float = 0.05) -> None:
    """`sgd_lr`: this command's default learning rate with SGD; AdamW's is 1e-3 everywhere (a
    rate made for SGD makes AdamW collapse to one class)."""
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help="number of epochs")
    g.add_argument("--batch-size", type=int, default=64, help="images per step")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd", help="optimizer")
    g.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default: {sgd_lr:g} with sgd, {ADAMW_LR:g} with adamw)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="weight decay on conv/linear weights (default: 5e-4 with sgd, 0.05 with adamw); "
                   "never on BN/biases")
    g.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine",
                   help="learning-rate schedule; step multiplies by --step-gamma at --step-milestones")
    g.add_argument("--step-milestones", type=float, nargs="+", default=[0.5, 0.75],
                   help="fractions of the epochs where the step schedule decays")
    g.add_argument("--step-gamma", type=float, default=0.1, help="decay factor of the step schedule")
    g.add_argument("--warmup-epochs", type=int, default=0, help="linear warm-up epochs")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    g.add_argument("--dice", type=float, default=0.0, metavar="W",
                   help="segmentation: add W x soft Dice loss to the cross-entropy (0: cross-entropy only)")
    g.add_argument("--seed", type=int, default=0, help="seed for the split, initialization and data order")
    add_fraction_option(g, "the training part of the split (validation and test stay whole)")
    g.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)),
                   help="data-loading worker processes")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--no-amp", action="store_true", help="disable mixed precision (it is only used on CUDA)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the run directory's checkpoint (written after every epoch)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(sgd_lr=sgd_lr)


def default_lr(optimizer: str, sgd_lr: float) -> float:
    return sgd_lr if optimizer == "sgd" else ADAMW_LR


def train_config(args):
    from rsedge.trainer.train import TrainConfig

    lr = args.lr if args.lr is not None else default_lr(args.optimizer, args.sgd_lr)
    return TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=lr,
        weight_decay=args.weight_decay, schedule=args.schedule, warmup_epochs=args.warmup_epochs,
        step_milestones=tuple(args.step_milestones), step_gamma=args.step_gamma, seed=args.seed,
        workers=args.workers, amp=not args.no_amp, device=args.device, label_smoothing=args.label_smoothing,
        dice=args.dice, fraction=args.fraction,
    )
