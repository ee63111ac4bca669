"""Structured channel pruning, physically slimmed: the pruned channels are removed from the
weights, so the saved model, its ONNX and its engine are smaller and faster.

Torch-Pruning's dependency graph decides which layers are coupled (a residual add, a depthwise
conv, the head); our criteria score the channels (`compress.importance`); `compress.plan` picks
the channels under the shape rules (kept counts rounded *down* to a multiple of `round_to`, never
below `min_channels` or what `max_ratio` allows), because TensorRT kernels and tensor cores run
best on multiples of 8; `compress.slim` removes them, sharing one kept set per coupled group or,
with residual reconstruction, one per branch (`compress.reconstruct`).
"""
from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rsedge.trainer.modelfile import derive_meta, load_model, save_model
from rsedge.trainer.models import head_modules
from rsedge.trainer.tasks import task_for

from .counting import count_macs, count_params
from .importance import Criterion, get_criterion
from .methods import METHOD_SPECS, METHODS, THRESHOLD_METHODS, MethodSpec, method_spec
from .msb_fixed import check_not_quantized
from .plan import build_units, layer_table, select
from .slim import apply_plan, compensate, conv_widths, masked_copy

COUPLINGS = ("shared", "reconstruct")


def excluded_layers(model: nn.Module, patterns: Sequence[str]) -> list[nn.Module]:
    """Modules whose name matches one of the shell-style `patterns` (`layer4.*`, `features.0.0`)."""
    found = []
    for pat in patterns:
        hits = [m for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f"--exclude {pat!r} matches no layer of this model (see `rsedge info --layout`)")
        found.extend(hits)
    return found


def linear_layers(model: nn.Module, prune_linear: bool) -> list[nn.Module]:
    """The fully connected layers kept whole: all of them unless `prune_linear` (RemoteTrimmer
    and network slimming prune convolutions only; VGG16's hidden 4096-wide layers hold most of
    its parameters, and the paper's 48.90 M after pruning keeps them)."""
    return [] if prune_linear else [m for m in model.modules() if isinstance(m, nn.Linear)]


def make_criterion(method: str, seed: int = 0) -> Criterion:
    if method not in METHODS:
        raise KeyError(f"unknown pruning method {method!r}; known: {', '.join(METHODS)}")
    if METHOD_SPECS[method].data:
        raise ValueError(f"--method {method} needs data: compute its scores first (prune_run does, with --data)")
    return get_criterion(method, seed=seed) if method == "random" else get_criterion(method)


def prune_network(
    model: nn.Module,
    input_size: Sequence[int],
    method: str = "l1",
    ratio: float | None = 0.5,
    round_to: int | None = 8,
    global_pruning: bool = False,
    ignored: Sequence[nn.Module] = (),
    *,
    threshold: float | None = None,
    min_channels: int = 8,
    max_ratio: float = 1.0,
    exclude: Sequence[str] = (),
    coupling: str = "shared",
    criterion: Criterion | None = None,
    compensate_inputs: torch.Tensor | None = None,
    original: dict[str, int] | None = None,
    seed: int = 0,
    head: Sequence[str] | None = None,
    prune_linear: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune `model`; returns the pruned model (the same object under shared coupling, a traced
    copy under reconstruction) and the report: per-layer table, counts before and after.
    `head`: the modules never pruned, by name; default: the head the model's spec declares (a
    model made by `create_model`), never guessed. Linear layers keep their outputs unless
    `prune_linear` (their inputs follow the convolutions before them)."""
    if coupling not in COUPLINGS:
        raise ValueError(f"--coupling must be one of {', '.join(COUPLINGS)}, not {coupling!r}")
    crit = criterion or make_criterion(method, seed)
    if threshold is not None and not crit.threshold_ok:
        raise ValueError(f"--threshold needs a method with an absolute score ({', '.join(THRESHOLD_METHODS)}); "
                         f"{method} ranks channels by --ratio")
    crit.raw = crit.threshold_ok and (threshold is not None or global_pruning)
    model.eval()
    device = next(model.parameters()).device
    example = torch.zeros(1, 3, *input_size, device=device)
    before_w = conv_widths(model)
    before = {"params": count_params(model), "macs": count_macs(model, input_size)}
    ignored = (head_modules(model, head) + list(ignored) + excluded_layers(model, exclude)
               + linear_layers(model, prune_linear))
    plan = build_units(model, example, crit, ignored, coupling, original)
    gamma = score_distribution(plan, threshold) if threshold is not None else None
    select(plan, ratio=ratio, threshold=threshold, global_ranking=global_pruning, round_to=round_to,
           min_channels=min_channels, max_ratio=max_ratio)
    comp = compensate(plan, compensate_inputs) if compensate_inputs is not None else None
    model, rewritten = apply_plan(plan)
    after_w = conv_widths(model)
    after = {"params": count_params(model), "macs": count_macs(model, input_size)}
    warnings = [u.warning for u in plan.units if u.warning]
    odd = [r["out"] for r in rewritten if round_to and round_to > 1 and r["out"] % round_to]
    if odd:
        warnings.append(f"residual reconstruction: {len(odd)} add output(s) hold the union of their branches' "
                        f"channels, not a multiple of {round_to}: {odd}")
    report = {
        "method": method,
        "requested_ratio": ratio,
        "threshold": threshold,
        "round_to": round_to,
        "min_channels": min_channels,
        "max_ratio": max_ratio,
        "global": global_pruning,
        "coupling": coupling,
        "excluded": list(exclude),
        "prune_linear": prune_linear,
        "before": before,
        "after": after,
        "params_ratio": after["params"] / before["params"],
        "macs_ratio": after["macs"] / before["macs"],
        "pruned_channel_fraction": sum(len(u.prune) for u in plan.units) / max(sum(u.channels for u in plan.units), 1),
        "layers": layer_table(plan, before_w, after_w),
        "units": [{"unit": u.key, "channels": u.channels, "kept": u.kept, "requested": u.requested,
                   "residual_branch": u.residual, **({"note": u.note} if u.note else {})} for u in plan.units],
        "reconstructed_adds": rewritten,
        "compensation": comp,
        "gamma_distribution": gamma,
        "warnings": warnings,
    }
    return model, report


QUANTILES = {"min": 0.0, "q01": 0.01, "q05": 0.05, "q25": 0.25, "median": 0.5, "max": 1.0}


def score_distribution(plan, threshold: float) -> dict[str, Any] | None:
    """Quantiles of the scores a threshold is compared with (|gamma|, the largest over the
    BatchNorms that write a channel) and how many channels are at or below it: what a user needs
    to choose a threshold that removes something."""
    scored = [u.scores for u in plan.units if u.scores is not None]
    if not scored:
        return None
    s = torch.cat(scored).double()
    q = torch.quantile(s, torch.tensor(list(QUANTILES.values()), dtype=torch.float64))
    return {"channels": int(s.numel()), **{k: float(v) for k, v in zip(QUANTILES, q)},
            "threshold": threshold, "at_or_below_threshold": int((s <= threshold).sum())}


def format_distribution(d: dict[str, Any]) -> str:
    qs = ", ".join(f"{k} {d[k]:.3g}" for k in QUANTILES)
    return (f"|gamma| over {d['channels']} channels: {qs}; {d['at_or_below_threshold']} at or below "
            f"the threshold {d['threshold']:.3g}")


def prune_model(
    model: nn.Module,
    input_size: Sequence[int],
    method: str = "l1",
    ratio: float = 0.5,
    round_to: int | None = 8,
    global_pruning: bool = False,
    ignored: Sequence[nn.Module] = (),
    **kwargs: Any,
) -> dict[str, Any]:
    """Prune `model` in place (shared coupling); returns the per-layer table and the counts
    before and after. Residual reconstruction changes the graph: use `prune_network`."""
    if kwargs.get("coupling", "shared") != "shared":
        raise ValueError("prune_model prunes in place; --coupling reconstruct returns a new model: use prune_network")
    pruned, report = prune_network(model, input_size, method, ratio, round_to, global_pruning, ignored, **kwargs)
    assert pruned is model
    return report


class _Data:
    """The training data a data-driven method reads: the model's own split when it applies."""

    def __init__(self, data, out: Path, meta: dict[str, Any], o: PruneOptions, log: Callable[[str], None]):
        from rsedge.trainer.sampling import fraction_of_split
        from rsedge.trainer.stage import split_for_model

        self.split = split_for_model(meta, data, out, seed=o.seed, progress=o.progress, log=log)
        self.task, self.meta = task_for(meta), meta
        thinned, self.fraction = fraction_of_split(self.split, o.fraction, o.seed, meta["classes"], log)
        self.train, self.val, _ = self.task.datasets(thinned, meta)
        self.train_eval, _, _ = self.task.datasets(thinned, meta, augment=False)
        self.seed, self.batch_size, self.workers = o.seed, o.batch_size, o.workers

    def loader(self, ds, shuffle: bool, epoch: int = 0, train: bool = False):
        """`train`: batches that train BatchNorm (CAP with its network): never a batch of one,
        which a BatchNorm over a 1x1 map (DeepLabV3+'s ASPP pooling branch) cannot normalize."""
        from rsedge.trainer.train import make_loader

        return make_loader(ds, self.batch_size, shuffle, self.seed, epoch, self.workers, drop_last=train,
                           min_batch=2 if train else 1, collate=self.task.collate)

    def tensors(self, ds, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        from rsedge.trainer.datasets import SkipUnreadable, Unreadable

        idx = torch.randperm(len(ds), generator=g)[:n].tolist()
        view = SkipUnreadable(ds)
        samples = [view[i] for i in idx]
        bad = [s for s in samples if isinstance(s, Unreadable)]
        if bad:
            print(f"warning: {len(bad)} image(s) unreadable since the split was made, skipped, e.g. {bad[0].path}")
        good = [s for s in samples if not isinstance(s, Unreadable)]
        if not good:
            raise ValueError("the split has no images for this step")
        collate = getattr(getattr(self, "task", None), "collate", None) or torch.utils.data.default_collate
        images, targets = collate(list(good))
        return images, targets


def _taylor_criterion(model: nn.Module, data: _Data, o: PruneOptions, device, log
                      ) -> tuple[Criterion, dict[str, Any]]:
    """First-order Taylor scores accumulated over `o.taylor_batches` training batches."""
    from .importance import Taylor
    from .taylor import taylor_scores

    scores = taylor_scores(model, data.loader(data.train_eval, shuffle=True), o.taylor_batches, device,
                           o.progress, loss=data.task.model_loss(data.meta))
    model.cpu()
    info = {"batches": min(o.taylor_batches, len(data.loader(data.train_eval, shuffle=False)))}
    return Taylor({m: s for m, s in scores.items()}), info


def _cap_criterion(model: nn.Module, data: _Data, o: PruneOptions, device, log) -> tuple[Criterion, dict[str, Any]]:
    """RemoteTrimmer's channel attention (`compress.cap`): the SE-augmented network trains
    `o.cap_epochs` on the training data, s_bar is averaged over `o.cap_samples` images, the
    scores s_bar * |gamma| are taken, then the attention is folded into the BatchNorms."""
    from .cap import CapOptions, attention_batchnorms, channel_attention, fold_attention, overlap_with_gamma
    from .importance import ChannelAttention

    bns = attention_batchnorms(model)
    samples = data.tensors(data.train_eval, o.cap_samples)[0]
    sample_batches = [(samples[i:i + data.batch_size],) for i in range(0, len(samples), data.batch_size)]

    class _Epochs:
        def __init__(self):
            self.epoch = 0

        def __iter__(self):
            self.epoch += 1
            return iter(data.loader(data.train, shuffle=True, epoch=self.epoch, train=o.cap_train_model))

    cap = CapOptions(epochs=o.cap_epochs, lr=o.cap_lr, train_model=o.cap_train_model, seed=data.seed,
                     progress=o.progress)
    s_bar, info = channel_attention(model, bns, _Epochs(), sample_batches, cap, device=device,
                                    loss=data.task.model_loss(data.meta))
    model.cpu()
    s_bar = {bn: s.cpu() for bn, s in s_bar.items()}
    crit = ChannelAttention(s_bar)
    info["jaccard_vs_bn_scale"] = overlap_with_gamma(s_bar, o.ratio if o.ratio is not None else 0.5)
    if o.cap_train_model:
        fold_attention(s_bar)
        info["folded_into_batchnorm"] = True
    log(f"channel attention: {info['probes']} probes ({info['probes_after_activation']} after an activation), "
        f"s_bar mean {info['s_bar_mean']:.3f} (min {info['s_bar_min']:.3f}, max {info['s_bar_max']:.3f}), "
        f"per-layer CV {info['s_bar_cv_mean']:.1%}; pruned set vs |gamma| alone: Jaccard "
        f"{info['jaccard_vs_bn_scale']:.2f}")
    return crit, info


# the methods whose `MethodSpec` says `data`: how their scores are measured (with the task's loss)
DATA_SCORERS = {"taylor": _taylor_criterion, "cap": _cap_criterion}


def _prepare_criterion(model: nn.Module, data: _Data | None, o: PruneOptions, device,
                       log) -> tuple[Criterion, dict[str, Any]]:
    """The criterion of `o.method`, its scores measured on the training data first when it is
    a data method; and the record's description of that measurement."""
    if o.method in DATA_SCORERS:
        return DATA_SCORERS[o.method](model, data, o, device, log)
    return make_criterion(o.method, o.seed), {}


def _search_lfa(model: nn.Module, meta: dict[str, Any], crit: Criterion, data: _Data, o: PruneOptions,
                log) -> tuple[float, dict[str, Any]]:
    """The largest gamma threshold whose feature-attention loss stays within `o.target_lfa`, on
    `o.lfa_images` validation images (training images when the split has no validation part)."""
    from .lfa import feature_attention, feature_model, lfa, search_threshold

    target, coupling = o.target_lfa, o.coupling
    select_kw = {"round_to": o.round_to, "min_channels": o.min_channels, "max_ratio": o.max_ratio}
    crit.raw = True
    example = torch.zeros(1, 3, *meta["input_size"])
    ign = (head_modules(model, data.task.head(meta)) + excluded_layers(model, o.exclude)
           + linear_layers(model, o.prune_linear))
    plan = build_units(model, example, crit, ign, coupling)
    images, targets = data.tensors(data.val if len(data.val) else data.train_eval, o.lfa_images)
    every = getattr(data.task, "lfa_every_head", False)
    head = data.task.head(meta) if every else None
    fm = feature_model(model, every_head=every, head=head, example=example)
    masks = data.task.target_regions(fm, images, targets)
    fa_sparse = feature_attention(fm, images, masks)
    scored = [u.scores for u in plan.units if u.scores is not None]
    if not scored:
        raise ValueError("no BatchNorm scale to threshold in this model")
    total = sum(u.channels for u in plan.units if u.scores is not None)

    def evaluate(delta: float) -> tuple[float, float]:
        select(plan, threshold=delta, **select_kw)
        fa = feature_attention(feature_model(masked_copy(model, plan), copy=False, every_head=every, head=head,
                                             example=example), images, masks)
        return lfa(fa, fa_sparse), sum(len(u.prune) for u in plan.units) / total

    limit = target * (1 + o.lfa_tolerance)
    log(f"searching the gamma threshold for |L_FA| <= {target:.2%} (+{o.lfa_tolerance:.0%}: {limit:.3%}) on "
        f"{len(images)} images")
    best, curve = search_threshold(torch.cat(scored), evaluate, target, log=log, tolerance=o.lfa_tolerance)
    if best is None:
        raise ValueError(f"even the smallest gamma threshold changes the feature attention by more than {limit:.2%}; "
                         f"raise --target-lfa or prune by --ratio")
    chosen = next(r for r in curve if r["threshold"] == best)
    log(f"chosen threshold {best:.6g}: L_FA {chosen['lfa']:.4%}, {chosen['pruned_fraction']:.1%} of the channels")
    return best, {"target": target, "tolerance": o.lfa_tolerance, "accepted_abs_lfa": limit, "images": len(images),
                  "fa_sparse": fa_sparse, "chosen": chosen, "curve": curve}


MAX_SEARCH_RATIO = 0.99


def budget_targets(target_macs: float | None, target_params: float | None,
                   before: dict[str, int]) -> dict[str, int]:
    """Absolute budgets from `--target-macs` / `--target-params`: a fraction of the model's
    count in (0, 1), or a count above 1."""
    out = {}
    for key, value in (("macs", target_macs), ("params", target_params)):
        if value is None:
            continue
        if not (0 < value < 1 or value > 1):
            raise ValueError(f"--target-{key} must be a fraction in (0, 1) of the model's {key} or a count "
                             f"above 1, not {value:g}")
        out[key] = int(value * before[key]) if value < 1 else int(value)
        if out[key] >= before[key]:
            raise ValueError(f"the model has {before[key]:,} {key}, already within --target-{key} {out[key]:,}: "
                             f"nothing to prune")
    return out


def search_budget(model: nn.Module, crit: Criterion, targets: dict[str, int], before: dict[str, int],
                  prune_kw: dict[str, Any], log: Callable[[str], None], tol: float = 1e-3,
                  ) -> tuple[float, dict[str, Any]]:
    """The smallest ratio whose pruned model meets every budget in `targets`: bisection on the
    (uniform or global) ratio, each trial pruning a copy of the model with a copy of the
    criterion (the same scores), so the counts are exactly those of the final model."""
    trials: list[dict[str, Any]] = []

    def counts(r: float) -> dict[str, int]:
        m, c = copy.deepcopy((model, crit))
        _, rep = prune_network(m, ratio=r, criterion=c, **prune_kw)
        trials.append({"ratio": round(r, 6), **rep["after"]})
        return rep["after"]

    def meets(after: dict[str, int]) -> bool:
        return all(after[k] <= v for k, v in targets.items())

    want = ", ".join(f"{k} <= {v:,} ({v / before[k]:.1%})" for k, v in targets.items())
    log(f"searching the pruning ratio for {want}")
    lo, hi = 0.0, MAX_SEARCH_RATIO
    best = counts(hi)
    if not meets(best):
        raise ValueError(f"even --ratio {hi} leaves {', '.join(f'{best[k]:,} {k}' for k in targets)}: the budget "
                         f"{want} is out of reach under --min-channels / --max-ratio / --round-to / --exclude")
    while hi - lo > tol:
        mid = (lo + hi) / 2
        after = counts(mid)
        if meets(after):
            hi, best = mid, after
        else:
            lo = mid
    info = {"requested": dict(targets), "requested_fraction": {k: v / before[k] for k, v in targets.items()},
            "ratio": hi, "predicted": best, "trials": trials}
    log(f"ratio {hi:.4f} meets the budget: params {best['params']:,}, MACs {best['macs']:,}")
    return hi, info


@dataclass
class PruneOptions:
    """`rsedge prune`: the method, how much (one of ratio, threshold, target_lfa, a budget), the
    shape rules, the iterative schedule and the data-driven criteria's settings. What a method
    needs is in its `MethodSpec` (`compress.methods`); `checked` enforces it."""

    method: str = "l1"
    ratio: float | None = 0.5
    threshold: float | None = None  # bn-scale / l1rr: remove the channels whose |gamma| is at or below
    target_lfa: float | None = None  # bn-scale / l1rr: the largest threshold within this feature-attention loss
    target_macs: float | None = None  # a budget: fraction of the model's count in (0, 1), or a count;
    target_params: float | None = None  # the ratio that meets it is searched
    global_pruning: bool = False
    round_to: int | None = 8
    min_channels: int = 8
    max_ratio: float = 1.0
    exclude: Sequence[str] = ()
    prune_linear: bool = False  # also the hidden fully connected layers' outputs (VGG's classifier)
    coupling: str = "shared"
    compensate_bias: bool = False
    steps: int = 1
    step_epochs: int = 1
    step_batches: int = 0  # > 0: fine-tune this many batches between steps instead of step_epochs epochs
    step_lr: float = 0.01
    data: str | Path | None = None  # the training data folder the data-driven parts read
    taylor_batches: int = 16
    cap_epochs: int = 2  # the SE-augmented network's training epochs
    cap_samples: int = 256
    cap_lr: float = 1e-3
    cap_train_model: bool = True  # False: only the probes train, on the frozen network
    lfa_images: int = 64
    lfa_tolerance: float = 0.25  # --target-lfa accepts |L_FA| <= target * (1 + this): "around" the target
    batch_size: int = 64
    workers: int = 1
    seed: int = 0
    device: str = "auto"
    fraction: float = 1.0  # of the training images the criteria and the fine-tuning steps read
    progress: bool = True
    exist_ok: bool = False  # overwrite a run already in the folder (refused otherwise)

    @property
    def spec(self) -> MethodSpec:
        return method_spec(self.method)

    @property
    def budget(self) -> bool:
        return self.target_macs is not None or self.target_params is not None

    @property
    def fine_tunes_between_steps(self) -> bool:
        return self.step_batches > 0 or self.step_epochs > 0

    @property
    def thresholded(self) -> bool:
        return self.threshold is not None or self.target_lfa is not None

    def checked(self, log: Callable[[str], None]) -> PruneOptions:
        """These options made consistent (a threshold or a budget replaces the ratio; l1rr
        ranks globally), or the error a user must fix."""
        from rsedge.trainer.sampling import check_fraction

        spec = self.spec
        check_fraction(self.fraction)
        o = replace(self, ratio=None) if self.thresholded or self.budget else self
        if o.threshold is not None and o.target_lfa is not None:
            raise ValueError("give --threshold or --target-lfa, not both")
        if o.budget and o.thresholded:
            raise ValueError("--target-macs / --target-params search a ratio: not with --threshold or --target-lfa")
        if o.thresholded and not spec.threshold:
            raise ValueError(f"--threshold and --target-lfa need a threshold method ({', '.join(THRESHOLD_METHODS)}), "
                             f"not {o.method}")
        if o.ratio is None and not o.thresholded and not o.budget:
            raise ValueError("give --ratio, --threshold, --target-lfa, --target-macs or --target-params")
        if spec.global_only and (o.ratio is not None or o.budget) and not o.global_pruning:
            log(f"{o.method} cuts every layer at one gamma threshold: the ratio is applied globally")
            o = replace(o, global_pruning=True)
        o.check_data()
        if o.steps < 1:
            raise ValueError("--steps must be at least 1")
        if o.step_epochs < 0:
            raise ValueError("--step-epochs must be 0 (no fine-tuning between steps, as seed 002) or more")
        if o.step_batches < 0:
            raise ValueError("--step-batches must be 0 (use --step-epochs) or more")
        if o.steps > 1 and ((o.ratio is None and not o.budget) or o.coupling != "shared"):
            raise ValueError("--steps > 1 needs --ratio (or a --target-*) and --coupling shared")
        return o

    def check_data(self) -> None:
        if self.data is not None:
            return
        why = (f"--method {self.method}" if self.spec.data else "--target-lfa" if self.target_lfa is not None
               else "--steps > 1 (fine-tuning between steps)" if self.steps > 1 and self.fine_tunes_between_steps
               else None)
        if why is not None:
            raise ValueError(f"{why} needs --data DIR: the training data folder (its training split is read)")

    def network_kw(self) -> dict[str, Any]:
        """`prune_network`'s settings that stay the same over the steps and the searches."""
        return {"method": self.method, "round_to": self.round_to, "global_pruning": self.global_pruning,
                "min_channels": self.min_channels, "max_ratio": self.max_ratio, "exclude": self.exclude,
                "coupling": self.coupling, "seed": self.seed, "prune_linear": self.prune_linear}

    def parameters(self, ratio: float | None, threshold: float | None) -> dict[str, Any]:
        """The record's parameters: the common ones, then those of the method and the schedule."""
        p = {"method": self.method, "ratio": ratio, "threshold": threshold, "target_lfa": self.target_lfa,
             "round_to": self.round_to, "min_channels": self.min_channels, "max_ratio": self.max_ratio,
             "global": self.global_pruning, "coupling": self.coupling, "exclude": list(self.exclude),
             "prune_linear": self.prune_linear,
             "compensate": self.compensate_bias, "steps": self.steps, "seed": self.seed,
             "target_macs": self.target_macs, "target_params": self.target_params, "fraction": self.fraction}
        if self.target_lfa is not None:
            p["lfa_tolerance"] = self.lfa_tolerance
        if self.method == "taylor":
            p["taylor_batches"] = self.taylor_batches
        if self.method == "cap":
            p.update({"cap_epochs": self.cap_epochs, "cap_samples": self.cap_samples, "cap_lr": self.cap_lr,
                      "cap_train_model": self.cap_train_model})
        if self.steps > 1:
            between = {"step_batches": self.step_batches} if self.step_batches else {"step_epochs": self.step_epochs}
            p.update({**between, "step_lr": self.step_lr})
        return p


def sparse_warnings(spec: MethodSpec, o: PruneOptions, meta: dict[str, Any], log: Callable[[str], None]
                    ) -> list[str]:
    """What pruning a model that was not sparse-trained as `spec` expects costs; the warnings
    the record keeps (a method whose scores are its sparse training's gammas only logs: its
    record says which model it pruned)."""
    if spec.sparse is None:
        return []
    trained = [h.get("method") for h in meta.get("history", []) if h.get("stage") == "sparse-train"]
    if spec.sparse_exact and spec.sparse not in trained:
        log(f"warning: this model was not sparse-trained with {spec.sparse} (`rsedge sparse-train --method "
            f"{spec.sparse}`): its BatchNorm scales are not sparse, so a gamma threshold removes useful channels")
    if not spec.sparse_exact and o.thresholded and not trained:
        w = (f"this model was not sparse-trained (`rsedge sparse-train --method {spec.sparse}`): its |gamma| are not "
             "pushed toward zero, so a small --threshold removes few or no channels")
        log(f"warning: {w}")
        return [w]
    return []


class _Pruning:
    """One `prune_run`: the steps (each scoring, maybe searching a ratio or a threshold,
    pruning, fine-tuning briefly before the next), then the report over all of them."""

    def __init__(self, model: nn.Module, meta: dict[str, Any], o: PruneOptions, out: Path,
                 log: Callable[[str], None]):
        from rsedge.trainer.train import pick_device

        self.model, self.meta, self.o, self.out, self.log = model, meta, o, out, log
        self.device = pick_device(o.device)
        torch.manual_seed(o.seed)
        self.data = _Data(o.data, out, meta, o, log) if o.data is not None else None
        self.head = task_for(meta).head(meta)
        self.original_widths = conv_widths(model)
        self.before = {"params": count_params(model), "macs": count_macs(model, meta["input_size"])}
        self.targets = budget_targets(o.target_macs, o.target_params, self.before) if o.budget else {}
        self.ratio = o.ratio
        self.budget_info: dict[str, Any] | None = None
        self.lfa_info: dict[str, Any] | None = None
        self.steps: list[dict[str, Any]] = []
        self.original: dict[str, int] | None = None

    def compensation_inputs(self) -> torch.Tensor | None:
        if not self.o.compensate_bias:
            return None
        if self.data is not None:
            return self.data.tensors(self.data.train_eval, 64)[0]
        g = torch.Generator().manual_seed(self.o.seed)
        return torch.randn(16, 3, *self.meta["input_size"], generator=g)

    def run(self) -> dict[str, Any]:
        o, report = self.o, {}
        comp_inputs = self.compensation_inputs()
        for k in range(1, o.steps + 1):
            report = self.step(k, comp_inputs if k == o.steps else None)
            if k < o.steps and o.step_batches > 0:
                self.finetune_batches(k)
            elif k < o.steps and o.step_epochs > 0:  # 0: seed 002's schedule, retraining only at the end
                self.finetune(k)
        return report

    def step(self, k: int, comp_inputs: torch.Tensor | None) -> dict[str, Any]:
        o, meta = self.o, self.meta
        r_k = self.ratio * k / o.steps if self.ratio is not None else None
        crit, crit_info = _prepare_criterion(self.model, self.data, o, self.device, self.log)
        self.model.cpu()
        kw = {"input_size": meta["input_size"], "head": self.head, **o.network_kw()}
        if self.targets and k == 1:
            self.ratio, self.budget_info = search_budget(self.model, crit, self.targets, self.before, kw, self.log)
            r_k = self.ratio / o.steps
        thr = o.threshold
        if o.target_lfa is not None:
            thr, self.lfa_info = _search_lfa(self.model, meta, crit, self.data, o, self.log)
        self.model, report = prune_network(self.model, ratio=r_k, threshold=thr, criterion=crit,
                                           compensate_inputs=comp_inputs, original=self.original, **kw)
        if self.original is None:
            self.original = {u["unit"]: u["channels"] for u in report["units"]}
        self.steps.append({"step": k, "ratio": r_k, "threshold": thr, "params": report["after"]["params"],
                           "macs": report["after"]["macs"], "criterion": crit_info})
        if o.steps > 1:
            self.log(f"step {k}/{o.steps}: params {report['after']['params']:,}, MACs {report['after']['macs']:,}")
        return report

    def finetune(self, k: int) -> None:
        """A short fine-tuning between steps (SGD, `step_epochs` at `step_lr`) in out/step<k>."""
        from rsedge.trainer.train import TrainConfig, fit

        o, ds = self.o, self.data
        cfg = TrainConfig(epochs=o.step_epochs, batch_size=o.batch_size, optimizer="sgd", lr=o.step_lr,
                          workers=o.workers, seed=o.seed + k, device=o.device)
        step_meta = derive_meta(self.meta, "prune", history_entry={"step": k})
        self.model, hist = fit(self.model, ds.train, ds.val, cfg, self.out / f"step{k}", step_meta,
                               progress=o.progress, log=self.log)
        (self.out / f"step{k}" / "checkpoint.safetensors").unlink(missing_ok=True)
        self.steps[-1]["finetune"] = hist
        self.model.cpu()

    def finetune_batches(self, k: int) -> None:
        """`step_batches` SGD steps at `step_lr` on training batches (drawn anew for every step,
        seeded by step), with the task's loss: a pruning loop of many short recoveries."""
        from rsedge.trainer.train import to_device

        o, ds, model = self.o, self.data, self.model.to(self.device)
        loss_fn = ds.task.model_loss(self.meta)
        opt = torch.optim.SGD(model.parameters(), lr=o.step_lr, momentum=0.9)
        model.train()
        losses, done = [], 0
        while done < o.step_batches:
            start = done
            for x, y in ds.loader(ds.train, shuffle=True, epoch=k * 1000 + done, train=True):
                x, y = to_device(x, self.device), to_device(y, self.device)
                value = loss_fn(model(x), y, x)
                if torch.isfinite(value):
                    opt.zero_grad(set_to_none=True)
                    value.backward()
                    opt.step()
                    losses.append(value.item())
                done += 1
                if done >= o.step_batches:
                    break
            if done == start:
                raise ValueError("--step-batches: the training split gives no batch (too few images for a batch of 2?)")
        model.eval().cpu()
        self.steps[-1]["finetune"] = {"batches": done, "mean_loss": sum(losses) / len(losses) if losses else None}

    def report(self, report: dict[str, Any], warnings: list[str]) -> dict[str, Any]:
        """The last step's report over the whole run: counts and per-layer widths against the
        model before the first step, the budget met or missed, every warning."""
        after, before, log = report["after"], self.before, self.log
        report["warnings"] = warnings + report["warnings"] + _threshold_notes(report, log)
        if self.budget_info is not None:
            self.budget_info["achieved"] = {k: after[k] for k in ("params", "macs")}
            self.budget_info["achieved_fraction"] = {k: after[k] / before[k] for k in ("params", "macs")}
            missed = [k for k, v in self.targets.items() if after[k] > v]
            if missed:
                report["warnings"].append(f"the pruned model misses the budget on {', '.join(missed)} (the ratio was "
                                          f"searched on one-shot pruning; --steps re-scores between steps)")
        report["budget"] = self.budget_info
        for w in report["warnings"][len(warnings):]:
            log(f"warning: {w}")
        final = conv_widths(self.model)
        rows = {r["layer"]: r for r in report["layers"]}
        layers = [{"layer": n, "channels_before": c0, "channels_after": final.get(n, c0),
                   "requested_ratio": rows.get(n, {}).get("requested_ratio", 0.0),
                   "achieved_ratio": round(1 - final.get(n, c0) / c0, 4)} for n, c0 in self.original_widths.items()]
        report.update({"before": before, "layers": layers, "params_ratio": after["params"] / before["params"],
                       "macs_ratio": after["macs"] / before["macs"], "requested_ratio": self.ratio})
        log(f"pruned with {self.o.method} ({self.o.coupling} coupling): params {before['params']:,} -> "
            f"{after['params']:,} ({report['params_ratio']:.1%}), MACs {before['macs']:,} -> {after['macs']:,} "
            f"({report['macs_ratio']:.1%})")
        return report


def prune_run(model_file: str | Path, out: str | Path, options: PruneOptions | None = None, *,
              log: Callable[[str], None] = print, **fields: Any) -> dict[str, Any]:
    """The `prune` stage: prune the model file by `options` (`fields` replace some of them),
    check the validation accuracy right after when the data is at hand, save the pruned model
    and the record; returns the report."""
    from rsedge.trainer.stage import Stage, build_options

    o = build_options(PruneOptions, options, fields)
    method_spec(o.method)
    o = o.checked(log)
    stage = Stage("prune", out, exist_ok=o.exist_ok, progress=o.progress, log=log)
    model, meta = load_model(model_file)
    check_not_quantized(meta, "prune")
    if meta.get("layout", {}).get("graph"):
        raise ValueError("this model was already pruned with --coupling reconstruct; prune the unpruned model instead")
    warnings = sparse_warnings(o.spec, o, meta, log)
    run = _Pruning(model, meta, o, stage.out, log)
    report = run.report(run.run(), warnings)
    evaluation = eval_run_quiet(stage.out, o.data, run.model, meta, log) if o.data is not None else None
    # the task's primary metric: val_top1_before_finetune for a classifier, val_miou_... for segmentation
    eval_key = f"{task_for(meta).metric_key('val')}_before_finetune"
    parameters = o.parameters(run.ratio, report["threshold"])
    source = str(Path(model_file).resolve())
    new_meta = derive_meta(
        meta, "prune",
        history_entry={**{k: v for k, v in parameters.items()
                          if v not in (None, [], False) and not (k == "fraction" and v == 1)}, "source": source},
        metrics={eval_key: evaluation} if evaluation is not None else {},
    )
    path = save_model(stage.model_path, run.model, new_meta)
    stage.record({
        "inputs": {"model": source, "data": str(o.data) if o.data else None},
        "parameters": parameters,
        **report,
        "steps": run.steps,
        "feature_attention": run.lfa_info,
        "fraction": run.data.fraction if run.data is not None else None,
        eval_key: evaluation,
        "outputs": {"model": path.name},
    })
    return report


def _threshold_notes(report: dict[str, Any], log: Callable[[str], None]) -> list[str]:
    """Show the |gamma| distribution a threshold cut; a warning when it removed nothing."""
    d = report.get("gamma_distribution")
    if d is None:
        return []
    log(format_distribution(d))
    if report["pruned_channel_fraction"] > 0:
        return []
    return [f"--threshold {d['threshold']:.3g} removed no channel: the smallest |gamma| is {d['min']:.3g} "
            f"(1 % quantile {d['q01']:.3g}); choose a threshold from the distribution above, or prune by --ratio"]


def eval_run_quiet(out: Path, data, model: nn.Module, meta: dict[str, Any], log) -> float | None:
    """The task's primary validation metric right after pruning (before fine-tuning), when the
    model's split is at hand."""
    from rsedge.trainer.datasets import load_split
    from rsedge.trainer.stage import evaluate_model, model_split

    split = model_split(meta)
    if split is None and (Path(out) / "split.json").is_file():
        split = load_split(Path(out) / "split.json")
    if split is None:
        log("no split file for this model: skipping the accuracy check after pruning")
        return None
    if Path(split["root"]) != Path(data).resolve():
        log(f"--data {data} is not the folder this model was trained on: skipping the accuracy check")
        return None
    if not split["val"]:
        log("the split has no validation part: skipping the accuracy check after pruning")
        return None
    task = task_for(meta)
    acc = evaluate_model(model, task.eval_dataset(split["root"], split["val"], meta), meta)[task.primary_metric]
    model.cpu()
    log(f"validation {task.primary_metric} right after pruning: {acc:.4f}")
    return acc
