"""`rsedge prune`, `rsedge sparse-train`, `rsedge finetune` (the compression stages): their options."""
from __future__ import annotations

import os
from typing import Callable

from rsedge.compress.methods import METHOD_SPECS, METHODS, methods_help

from .options import add_fraction_option, train_config

PRUNE_METHODS = METHODS  # --method's choices and the help below come from the one table of methods

PRUNE_METHODS_HELP = methods_help() + """

how much: --ratio, --threshold, --target-lfa, or a budget --target-macs / --target-params
(a fraction of the model's count in (0, 1), or a count above 1), for which the ratio is searched.

examples:
  rsedge prune --model m.safetensors --out p --method l1 --ratio 0.5
  rsedge prune --model m.safetensors --out p --method l1 --target-macs 0.3
  rsedge prune --model m.safetensors --out p --method cap --ratio 0.7 --data data/eurosat
  rsedge prune --model m.safetensors --out p --method taylor --ratio 0.5 --steps 5 --data data/eurosat
  rsedge prune --model sparse/model.safetensors --out p --method l1rr --target-lfa 0.01 \\
               --coupling reconstruct --compensate --data data/eurosat
"""


def prune_amount(args) -> tuple[float | None, float | None]:
    """--ratio and --target-lfa after the defaults: 0.5, or --target-lfa 0.01 for l1rr, when the
    user gave no amount at all."""
    budget = args.target_macs is not None or args.target_params is not None
    if budget and args.ratio is not None:
        raise ValueError("give --ratio or --target-macs / --target-params, not both: the budget decides the ratio")
    ratio, target_lfa = args.ratio, args.target_lfa
    if ratio is not None or args.threshold is not None or target_lfa is not None or budget:
        return ratio, target_lfa
    default_lfa = METHOD_SPECS[args.method].default_target_lfa
    if default_lfa is None:
        return 0.5, None
    if args.data is None:
        raise ValueError(f"--method {args.method} without --ratio or --threshold defaults to --target-lfa "
                         f"{default_lfa:g}, which needs --data DIR (the training data folder); or give --ratio R or "
                         "--threshold T")
    return None, default_lfa


def cmd_prune(args) -> int:
    from rsedge.compress.prune import PruneOptions, prune_run

    ratio, target_lfa = prune_amount(args)
    options = PruneOptions(
        method=args.method, ratio=ratio, threshold=args.threshold, target_lfa=target_lfa,
        target_macs=args.target_macs, target_params=args.target_params, global_pruning=args.global_pruning,
        round_to=args.round_to, min_channels=args.min_channels, max_ratio=args.max_ratio, exclude=args.exclude or (),
        prune_linear=args.prune_linear,
        coupling=args.coupling, compensate_bias=args.compensate, steps=args.steps, step_epochs=args.step_epochs,
        step_batches=args.step_batches, step_lr=args.step_lr, data=args.data, taylor_batches=args.taylor_batches,
        cap_epochs=args.cap_epochs, cap_samples=args.cap_samples, cap_lr=args.cap_lr,
        cap_train_model=not args.cap_probes_only,
        lfa_images=args.lfa_images, lfa_tolerance=args.lfa_tolerance, batch_size=args.batch_size,
        workers=args.workers, seed=args.seed,
        device=args.device, fraction=args.fraction, progress=not args.quiet, exist_ok=args.exist_ok)
    prune_run(args.model, args.out, options)
    print(f"pruned model written to {os.path.join(args.out, 'model.safetensors')}")
    return 0


def cmd_sparse_train(args) -> int:
    from rsedge.compress.sparse import SparseOptions, sparse_train_run

    options = SparseOptions(method=args.method, cfg=train_config(args), sr=args.sr, theta=args.theta,
                            lambda_a=args.lambda_a, eps=args.eps, phase_epochs=args.phase_epochs,
                            threshold=args.sparse_threshold, from_scratch=args.from_scratch, resume=args.resume,
                            exist_ok=args.exist_ok, progress=not args.quiet)
    sparse_train_run(args.model, args.data, args.out, options)
    print(f"sparse-trained model written to {os.path.join(args.out, 'model.safetensors')}")
    return 0


def cmd_finetune(args) -> int:
    from rsedge.compress.finetune import FinetuneOptions, finetune_run

    options = FinetuneOptions(cfg=train_config(args), loss=args.loss, aml_r=args.aml_r, kd_from=args.kd_from,
                              kd_temperature=args.kd_temperature, kd_weight=args.kd_weight, preset=args.preset,
                              resume=args.resume, exist_ok=args.exist_ok, progress=not args.quiet)
    finetune_run(args.model, args.data, args.out, options)
    print(f"fine-tuned model written to {os.path.join(args.out, 'model.safetensors')}")
    return 0


def add_compress_parsers(sub, formatter: type, add_training_options: Callable[..., None]) -> None:
    add_prune_parser(sub, formatter)
    add_sparse_train_parser(sub, formatter, add_training_options)
    add_finetune_parser(sub, formatter, add_training_options)


def add_prune_parser(sub, formatter: type) -> None:
    pr = sub.add_parser("prune", help="structured channel pruning, physically slimmed", formatter_class=formatter,
                        epilog=PRUNE_METHODS_HELP)
    pr.add_argument("--model", required=True, help="model file to prune")
    pr.add_argument("--out", required=True, help="run directory for the pruned model and record.json")
    pr.add_argument("--exist-ok", action="store_true", help="overwrite an existing run directory")
    pr.add_argument("--method", choices=PRUNE_METHODS, default="l1", help="channel criterion (see below)")
    amount = pr.add_argument_group("how much (one of)")
    amount.add_argument("--ratio", type=float, default=None,
                        help="fraction of channels removed, in every layer (or overall with --global); "
                        "default 0.5 (l1rr: --target-lfa 0.01)")
    amount.add_argument("--threshold", type=float, default=None,
                        help="bn-scale / l1rr: remove the channels whose |gamma| is at or below this")
    amount.add_argument("--target-lfa", type=float, default=None,
                        help="bn-scale / l1rr: the largest gamma threshold whose feature-attention loss "
                        "stays within this (L1RR); needs --data")
    amount.add_argument("--target-macs", type=float, default=None, metavar="X",
                        help="MACs budget: a fraction in (0, 1) of the model's MACs or a count above 1; the "
                        "smallest ratio that meets it is searched (bisection)")
    amount.add_argument("--target-params", type=float, default=None, metavar="X",
                        help="parameter budget, as --target-macs (both may be given)")
    amount.add_argument("--global", dest="global_pruning", action="store_true",
                        help="one ranking for the whole network instead of the same ratio in every layer")
    shapes = pr.add_argument_group("shapes")
    shapes.add_argument("--round-to", type=int, default=8,
                        help="kept channel counts are multiples of this, rounded down; 1 disables")
    shapes.add_argument("--min-channels", type=int, default=8, help="never keep fewer channels in a layer")
    shapes.add_argument("--max-ratio", type=float, default=1.0,
                        help="never remove more than this fraction of a layer's channels")
    shapes.add_argument("--exclude", nargs="+", metavar="LAYER",
                        help="layer names or patterns (fnmatch, e.g. 'layer4.*') whose channels are kept")
    shapes.add_argument("--prune-linear", action="store_true",
                        help="also prune the outputs of hidden fully connected layers (VGG's 4096-wide classifier); "
                        "by default only convolutions are pruned, as RemoteTrimmer and network slimming do")
    shapes.add_argument("--coupling", choices=("shared", "reconstruct"), default="shared",
                        help="channels coupled by residual adds: one kept set per group (shared) or one per "
                        "branch with the add rewritten (reconstruct, L1RR)")
    shapes.add_argument("--compensate", action="store_true",
                        help="fold the constant a removed channel still emits (its BN shift) into the "
                        "consumer's bias / BN mean")
    _add_prune_schedule_and_data(pr)
    pr.set_defaults(func=cmd_prune)


def _add_prune_schedule_and_data(pr) -> None:
    sched = pr.add_argument_group("iterative schedule")
    sched.add_argument("--steps", type=int, default=1,
                       help="prune in this many score-and-remove steps, fine-tuning briefly between them unless "
                       "--step-epochs 0 (needs --data for data-driven criteria or fine-tuning)")
    sched.add_argument("--step-epochs", type=int, default=1,
                       help="fine-tuning epochs between steps; 0: none (seed 002's schedule: --steps 60 "
                       "--step-epochs 0, then `rsedge finetune`)")
    sched.add_argument("--step-batches", type=int, default=0,
                       help="fine-tune this many training batches between steps instead of --step-epochs epochs "
                       "(seed 002's loop: a few mini-batches per pruning iteration); 0: use --step-epochs")
    sched.add_argument("--step-lr", type=float, default=0.01, help="SGD learning rate between steps")
    crit = pr.add_argument_group("data-driven criteria")
    crit.add_argument("--data", help="training data folder: read by taylor, cap, --target-lfa, --steps; "
                      "also the validation accuracy right after pruning")
    crit.add_argument("--taylor-batches", type=int, default=16, help="taylor: training batches to average over")
    crit.add_argument("--cap-epochs", type=int, default=2,
                      help="cap: epochs the SE-augmented network trains (all its weights, as the paper; the "
                      "attention is folded into the BatchNorms after)")
    crit.add_argument("--cap-samples", type=int, default=256, help="cap: images s_bar is averaged over")
    crit.add_argument("--cap-lr", type=float, default=1e-3, help="cap: learning rate of the SE network (Adam)")
    crit.add_argument("--cap-probes-only", action="store_true",
                      help="cap: train only the probes, the network frozen (cheaper; on a trained network the "
                      "attention then barely separates channels)")
    crit.add_argument("--lfa-images", type=int, default=64, help="--target-lfa: validation images used")
    crit.add_argument("--lfa-tolerance", type=float, default=0.25,
                      help="--target-lfa: a threshold passes when |L_FA| <= target x (1 + this), on either side "
                      "(L1RR accepts 'around 1 %%' and chose 1.14 %%)")
    crit.add_argument("--batch-size", type=int, default=64, help="images per batch")
    crit.add_argument("--workers", type=int, default=max(1, min(4, (os.cpu_count() or 2) - 1)),
                      help="data-loading worker processes")
    crit.add_argument("--seed", type=int, default=0, help="seed of random scores, probes, data order and --fraction")
    add_fraction_option(crit, "the training images taylor, cap and --steps read")
    crit.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    crit.add_argument("--quiet", action="store_true", help="no progress bars")


def add_sparse_train_parser(sub, formatter: type, add_training_options: Callable[..., None]) -> None:
    s = sub.add_parser("sparse-train", help="train BatchNorm scales sparse (network slimming or L1RR)",
                       formatter_class=formatter)
    s.add_argument("--model", required=True, help="model file to sparse-train (usually the trained baseline)")
    s.add_argument("--data", required=True, help="dataset root (the model's split is reused when it matches)")
    s.add_argument("--out", required=True, help="run directory")
    s.add_argument("--exist-ok", action="store_true", help="overwrite an existing run directory")
    s.add_argument("--method", choices=("slimming", "l1rr"), default="l1rr",
                   help="slimming: L1 on gamma; l1rr: dynamic reweighted L1 x self-adaptive per-layer factor")
    s.add_argument("--sr", type=float, default=1e-4, help="slimming: L1 strength on gamma")
    s.add_argument("--theta", type=float, default=1e-3, help="l1rr: sparsity rate theta")
    s.add_argument("--lambda-a", type=float, default=1.0, help="l1rr: a in lambda = 2^(a(rho - Np/N - s))")
    s.add_argument("--eps", type=float, default=1e-2, help="l1rr: epsilon in alpha = 1/(|gamma| + eps)")
    s.add_argument("--phase-epochs", type=int, default=None,
                   help="l1rr: epochs per phase t (alpha and lambda refreshed at each phase); "
                   "default: epochs/10 rounded up (at most 10 phases)")
    s.add_argument("--sparse-threshold", type=float, default=0.01, help="|gamma| below this counts as sparse")
    s.add_argument("--from-scratch", action="store_true",
                   help="the L1RR paper's protocol (seed 001): sparse-train from freshly initialized weights "
                   "(seeded by --seed) instead of the model's trained ones; the model file supplies the "
                   "architecture, classes, input size and split, its weights are discarded (an unpruned "
                   "float model only). The paper then prunes without fine-tuning")
    add_training_options(s, epochs=20, sgd_lr=0.01)
    s.set_defaults(func=cmd_sparse_train)


def add_finetune_parser(sub, formatter: type, add_training_options: Callable[..., None]) -> None:
    f = sub.add_parser("finetune", help="fine-tune a (pruned) model on the same split", formatter_class=formatter)
    f.add_argument("--model", required=True, help="model file to fine-tune")
    f.add_argument("--data", required=True, help="dataset root (the model's split is reused when it matches)")
    f.add_argument("--out", required=True, help="run directory")
    f.add_argument("--exist-ok", action="store_true", help="overwrite an existing run directory")
    f.add_argument("--loss", choices=("ce", "aml"), default="ce",
                   help="ce: cross-entropy; aml: RemoteTrimmer's adaptive mining loss")
    f.add_argument("--aml-r", type=float, default=0.4, help="weight r of the cross-entropy term in AML")
    f.add_argument("--kd-from", help="distill the logits of this model file (e.g. the unpruned model)")
    f.add_argument("--kd-temperature", type=float, default=4.0, help="distillation temperature T")
    f.add_argument("--kd-weight", type=float, default=0.5,
                   help="weight of the distillation term (the hard-label loss gets 1 - this)")
    f.add_argument("--preset", choices=("none", "remotetrimmer"), default="none",
                   help="remotetrimmer: the seed paper's schedule (SGD, lr 1e-3, x0.9 at 50 %% and 75 %% of the "
                   "epochs), overriding --optimizer, --lr, --schedule, --step-*")
    add_training_options(f, epochs=10, sgd_lr=0.01)
    f.set_defaults(func=cmd_finetune)
