"""`rsedge prune`, `rsedge finetune` (and the other compression stages): their options."""
from __future__ import annotations

import os
from typing import Callable

from .options import train_config


def cmd_prune(args) -> int:
    from rsedge.compress.prune import prune_run

    prune_run(args.model, args.out, method=args.method, ratio=args.ratio, round_to=args.round_to,
              global_pruning=args.global_pruning, data=args.data)
    print(f"pruned model written to {os.path.join(args.out, 'model.safetensors')}")
    return 0


def cmd_finetune(args) -> int:
    from rsedge.compress.finetune import finetune_run

    finetune_run(args.model, args.data, args.out, cfg=train_config(args), loss=args.loss, aml_r=args.aml_r,
                 resume=args.resume, progress=not args.quiet)
    print(f"fine-tuned model written to {os.path.join(args.out, 'model.safetensors')}")
    return 0



def add_compress_parsers(sub, formatter: type, add_training_options: Callable[..., None]) -> None:
    pr = sub.add_parser("prune", help="structured channel pruning, physically slimmed", formatter_class=formatter)
    pr.add_argument("--model", required=True, help="model file to prune")
    pr.add_argument("--out", required=True, help="run directory for the pruned model")
    pr.add_argument("--method", choices=("l1", "bn-scale"), default="l1",
                    help="l1: filter L1 norm (Li et al. 2017); bn-scale: |BN gamma| (network slimming)")
    pr.add_argument("--ratio", type=float, default=0.5, help="fraction of each layer's channels to remove")
    pr.add_argument("--round-to", type=int, default=8,
                    help="keep channel counts at multiples of this (rounded down, never below it); 1 disables")
    pr.add_argument("--global", dest="global_pruning", action="store_true",
                    help="one threshold for the whole network instead of the same ratio in every layer")
    pr.add_argument("--data", help="training data folder: report validation accuracy right after pruning")
    pr.set_defaults(func=cmd_prune)

    f = sub.add_parser("finetune", help="fine-tune a (pruned) model on the same split", formatter_class=formatter)
    f.add_argument("--model", required=True, help="model file to fine-tune")
    f.add_argument("--data", required=True, help="dataset root (the model's split is reused when it matches)")
    f.add_argument("--out", required=True, help="run directory")
    f.add_argument("--loss", choices=("ce", "aml"), default="ce",
                   help="ce: cross-entropy; aml: RemoteTrimmer's adaptive mining loss")
    f.add_argument("--aml-r", type=float, default=0.4, help="weight r of the cross-entropy term in AML")
    add_training_options(f, epochs=10, lr=0.01)
    f.set_defaults(func=cmd_finetune)
