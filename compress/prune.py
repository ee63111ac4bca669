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
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rsedge.trainer.modelfile import derive_meta, load_model, save_model
from rsedge.trainer.records import write_record

from .counting import count_macs, count_params
from .importance import Criterion, get_criterion
from .plan import build_units, layer_table, select
from .slim import apply_plan, compensate, conv_widths, masked_copy

METHODS = ("random", "l1", "bn-scale", "fpgm", "taylor", "cap", "group", "l1rr")
THRESHOLD_METHODS = ("bn-scale", "l1rr")
DATA_METHODS = ("taylor", "cap", "l1rr")
COUPLINGS = ("shared", "reconstruct")


def _conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def classifier_layers(model: nn.Module, num_classes: int) -> list[nn.Module]:
    """Layers whose outputs are the class scores: never pruned."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]


def excluded_layers(model: nn.Module, patterns: Sequence[str]) -> list[nn.Module]:
    """Modules whose name matches one of the shell-style `patterns` (`layer4.*`, `features.0.0`)."""
    found = []
    for pat in patterns:
        hits = [m for n, m in model.named_modules() if n and fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ValueError(f"--exclude {pat!r} matches no layer of this model (see `rsedge info --layout`)")
        found.extend(hits)
    return found


def make_criterion(method: str, seed: int = 0) -> Criterion:
    if method not in METHODS:
        raise KeyError(f"unknown pruning method {method!r}; known: {', '.join(METHODS)}")
    if method in ("taylor", "cap"):
        raise ValueError(f"--method {method} needs data: compute its scores first (prune_run does, with --data)")
    return get_criterion(method, seed=seed) if method == "random" else get_criterion(method)


def prune_network(
    model: nn.Module,
    input_size: Sequence[int],
    num_classes: int,
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
) -> tuple[nn.Module, dict[str, Any]]:
    """Prune `model`; returns the pruned model (the same object under shared coupling, a traced
    copy under reconstruction) and the report: per-layer table, counts before and after."""
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
    ignored = list(classifier_layers(model, num_classes)) + list(ignored) + excluded_layers(model, exclude)
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
    num_classes: int,
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
    pruned, report = prune_network(model, input_size, num_classes, method, ratio, round_to, global_pruning,
                                   ignored, **kwargs)
    assert pruned is model
    return report


class _Data:
    """The training data a data-driven method reads: the model's own split when it applies."""

    def __init__(self, data, out: Path, meta: dict[str, Any], seed: int, batch_size: int, workers: int,
                 progress: bool, log: Callable[[str], None], fraction: float = 1.0):
        from rsedge.trainer.datasets import check_classes, load_split, resolve_split
        from rsedge.trainer.run import datasets_for
        from rsedge.trainer.sampling import subsample_dataset

        split_file = meta.get("split")
        if split_file and Path(split_file).is_file() and Path(load_split(split_file)["root"]) != Path(data).resolve():
            log(f"{data} is not the folder the model was trained on: making a new split")
            split_file = None
        self.split = resolve_split(data, out, split_file, seed=seed, progress=progress)
        check_classes(meta["classes"], self.split["classes"], what=f"folder {self.split['root']}")
        self.train, self.val, _ = datasets_for(self.split, meta["input_size"], meta["normalization"])
        self.train_eval, _, _ = datasets_for(self.split, meta["input_size"], meta["normalization"], augment=False)
        self.train, self.fraction = subsample_dataset(self.train, fraction, seed, meta["classes"], log)
        self.train_eval, _ = subsample_dataset(self.train_eval, fraction, seed)
        self.seed, self.batch_size, self.workers = seed, batch_size, workers

    def loader(self, ds, shuffle: bool, epoch: int = 0):
        from rsedge.trainer.train import make_loader

        return make_loader(ds, self.batch_size, shuffle, self.seed, epoch, self.workers)

    def tensors(self, ds, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(ds), generator=g)[:n].tolist()
        xs, ys = zip(*(ds[i] for i in idx)) if idx else ((), ())
        if not xs:
            raise ValueError("the split has no images for this step")
        return torch.stack(xs), torch.tensor(ys)


def _prepare_criterion(method: str, model: nn.Module, data: _Data | None, opts: dict[str, Any], device,
                       progress: bool, log) -> tuple[Criterion, dict[str, Any]]:
    info: dict[str, Any] = {}
    if method == "taylor":
        from .importance import Taylor
        from .taylor import taylor_scores

        scores = taylor_scores(model, data.loader(data.train_eval, shuffle=True), opts["taylor_batches"], device,
                               progress)
        model.cpu()
        info = {"batches": min(opts["taylor_batches"], len(data.loader(data.train_eval, shuffle=False)))}
        return Taylor({m: s for m, s in scores.items()}), info
    if method == "cap":
        from .cap import channel_attention, fold_attention
        from .importance import ChannelAttention

        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.affine]
        samples = data.tensors(data.train_eval, opts["cap_samples"])[0]
        sample_batches = [(samples[i:i + data.batch_size],) for i in range(0, len(samples), data.batch_size)]

        class _Epochs:
            def __init__(self):
                self.epoch = 0

            def __iter__(self):
                self.epoch += 1
                return iter(data.loader(data.train, shuffle=True, epoch=self.epoch))

        s_bar, info = channel_attention(model, bns, _Epochs(), sample_batches, epochs=opts["cap_epochs"],
                                        lr=opts["cap_lr"], train_model=opts["cap_train_model"], device=device,
                                        seed=data.seed, progress=progress)
        model.cpu()
        crit = ChannelAttention({bn: s.cpu() for bn, s in s_bar.items()})
        if opts["cap_train_model"]:
            fold_attention(s_bar)
            info["folded_into_batchnorm"] = True
        log(f"channel attention: {info['probes']} probes, mean s_bar {info['s_bar_mean']:.3f} "
            f"(min {info['s_bar_min']:.3f}, max {info['s_bar_max']:.3f})")
        return crit, info
    return make_criterion(method, opts["seed"]), info


def _search_lfa(model: nn.Module, meta: dict[str, Any], crit: Criterion, ignored, data: _Data, target: float,
                n_images: int, select_kw: dict[str, Any], coupling: str, log) -> tuple[float, dict[str, Any]]:
    from .lfa import feature_attention, feature_model, lfa, search_threshold, target_masks

    crit.raw = True
    example = torch.zeros(1, 3, *meta["input_size"])
    ign = list(classifier_layers(model, len(meta["classes"]))) + list(ignored)
    plan = build_units(model, example, crit, ign, coupling)
    images, labels = data.tensors(data.val if len(data.val) else data.train_eval, n_images)
    fm = feature_model(model)
    masks = target_masks(fm, images, labels)
    fa_sparse = feature_attention(fm, images, masks)
    scored = [u.scores for u in plan.units if u.scores is not None]
    if not scored:
        raise ValueError("no BatchNorm scale to threshold in this model")
    total = sum(u.channels for u in plan.units if u.scores is not None)

    def evaluate(delta: float) -> tuple[float, float]:
        select(plan, threshold=delta, **select_kw)
        fa = feature_attention(feature_model(masked_copy(model, plan), copy=False), images, masks)
        return lfa(fa, fa_sparse), sum(len(u.prune) for u in plan.units) / total

    log(f"searching the gamma threshold for L_FA <= {target:.2%} on {len(images)} images")
    best, curve = search_threshold(torch.cat(scored), evaluate, target, log=log)
    if best is None:
        raise ValueError(f"even the smallest gamma threshold loses more than {target:.2%} of the feature attention; "
                         f"raise --target-lfa or prune by --ratio")
    chosen = next(r for r in curve if r["threshold"] == best)
    log(f"chosen threshold {best:.6g}: L_FA {chosen['lfa']:.4%}, {chosen['pruned_fraction']:.1%} of the channels")
    return best, {"target": target, "images": len(images), "fa_sparse": fa_sparse, "chosen": chosen, "curve": curve}


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


def prune_run(
    model_file: str | Path,
    out: str | Path,
    method: str = "l1",
    ratio: float | None = 0.5,
    round_to: int | None = 8,
    global_pruning: bool = False,
    data: str | Path | None = None,
    log: Callable[[str], None] = print,
    *,
    threshold: float | None = None,
    target_lfa: float | None = None,
    min_channels: int = 8,
    max_ratio: float = 1.0,
    exclude: Sequence[str] = (),
    coupling: str = "shared",
    compensate_bias: bool = False,
    steps: int = 1,
    step_epochs: int = 1,
    step_lr: float = 0.01,
    taylor_batches: int = 16,
    cap_epochs: int = 1,
    cap_samples: int = 256,
    cap_lr: float = 1e-3,
    cap_train_model: bool = False,
    lfa_images: int = 64,
    batch_size: int = 64,
    workers: int = 1,
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    target_macs: float | None = None,
    target_params: float | None = None,
    fraction: float = 1.0,
    exist_ok: bool = False,
) -> dict[str, Any]:
    """`exist_ok`: overwrite a run already in `out` (refused otherwise).
    `target_macs` / `target_params`: a budget (fraction of the model's count in (0, 1), or a
    count) instead of a ratio; the ratio that meets it is searched. `fraction`: the part of the
    training images the data-driven criteria and the fine-tuning steps read."""
    from rsedge.trainer.sampling import check_fraction
    from rsedge.trainer.train import TrainConfig, fit, pick_device

    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    check_fraction(fraction)
    budget = target_macs is not None or target_params is not None
    if threshold is not None or target_lfa is not None or budget:
        ratio = None
    if threshold is not None and target_lfa is not None:
        raise ValueError("give --threshold or --target-lfa, not both")
    if budget and (threshold is not None or target_lfa is not None):
        raise ValueError("--target-macs / --target-params search a ratio: not with --threshold or --target-lfa")
    if (threshold is not None or target_lfa is not None) and method not in THRESHOLD_METHODS:
        raise ValueError(f"--threshold and --target-lfa need a threshold method ({', '.join(THRESHOLD_METHODS)}), "
                         f"not {method}")
    if ratio is None and threshold is None and target_lfa is None and not budget:
        raise ValueError("give --ratio, --threshold, --target-lfa, --target-macs or --target-params")
    if method == "l1rr" and (ratio is not None or budget) and not global_pruning:
        log("l1rr cuts every layer at one gamma threshold: the ratio is applied globally")
        global_pruning = True
    needs_data = method in ("taylor", "cap") or target_lfa is not None or steps > 1
    if needs_data and data is None:
        why = f"--method {method}" if method in ("taylor", "cap") else (
            "--target-lfa" if target_lfa is not None else "--steps > 1 (fine-tuning between steps)")
        raise ValueError(f"{why} needs --data DIR: the training data folder (its training split is read)")
    if steps < 1:
        raise ValueError("--steps must be at least 1")
    if steps > 1 and ((ratio is None and not budget) or coupling != "shared"):
        raise ValueError("--steps > 1 needs --ratio (or a --target-*) and --coupling shared")
    from rsedge.trainer.run import open_run_dir

    out = open_run_dir(out, exist_ok=exist_ok, log=log)
    model, meta = load_model(model_file)
    if meta.get("layout", {}).get("graph"):
        raise ValueError("this model was already pruned with --coupling reconstruct; prune the unpruned model instead")
    if method == "l1rr" and not any(h.get("stage") == "sparse-train" and h.get("method") == "l1rr"
                                    for h in meta.get("history", [])):
        log("warning: this model was not sparse-trained with l1rr (`rsedge sparse-train --method l1rr`): "
            "its BatchNorm scales are not sparse, so a gamma threshold removes useful channels")
    warnings = []
    if method == "bn-scale" and (threshold is not None or target_lfa is not None) and not any(
            h.get("stage") == "sparse-train" for h in meta.get("history", [])):
        warnings.append("this model was not sparse-trained (`rsedge sparse-train --method slimming`): its "
                        "|gamma| are not pushed toward zero, so a small --threshold removes few or no channels")
        log(f"warning: {warnings[-1]}")
    dev = pick_device(device)
    torch.manual_seed(seed)
    ds = _Data(data, out, meta, seed, batch_size, workers, progress, log, fraction) if data is not None else None
    opts = {"taylor_batches": taylor_batches, "cap_epochs": cap_epochs, "cap_samples": cap_samples, "cap_lr": cap_lr,
            "cap_train_model": cap_train_model, "seed": seed}
    select_kw = {"round_to": round_to, "min_channels": min_channels, "max_ratio": max_ratio}
    num_classes = len(meta["classes"])
    original_widths = conv_widths(model)
    before = {"params": count_params(model), "macs": count_macs(model, meta["input_size"])}
    targets = budget_targets(target_macs, target_params, before) if budget else {}
    budget_info = None
    comp_inputs = None
    if compensate_bias:
        comp_inputs = (ds.tensors(ds.train_eval, 64)[0] if ds is not None
                       else torch.randn(16, 3, *meta["input_size"], generator=torch.Generator().manual_seed(seed)))
    step_log: list[dict[str, Any]] = []
    lfa_info = None
    original: dict[str, int] | None = None
    report: dict[str, Any] = {}
    for k in range(1, steps + 1):
        r_k = ratio * k / steps if ratio is not None else None
        crit, crit_info = _prepare_criterion(method, model, ds, opts, dev, progress, log)
        model.cpu()
        if targets and k == 1:
            ratio, budget_info = search_budget(model, crit, targets, before, dict(
                input_size=meta["input_size"], num_classes=num_classes, method=method, round_to=round_to,
                global_pruning=global_pruning, min_channels=min_channels, max_ratio=max_ratio, exclude=exclude,
                coupling=coupling, seed=seed), log)
            r_k = ratio / steps
        thr = threshold
        if target_lfa is not None:
            thr, lfa_info = _search_lfa(model, meta, crit, excluded_layers(model, exclude), ds, target_lfa,
                                        lfa_images, select_kw, coupling, log)
        model, report = prune_network(
            model, meta["input_size"], num_classes, method, r_k, round_to, global_pruning, threshold=thr,
            min_channels=min_channels, max_ratio=max_ratio, exclude=exclude, coupling=coupling, criterion=crit,
            compensate_inputs=comp_inputs if k == steps else None, original=original, seed=seed)
        if original is None:
            original = {u["unit"]: u["channels"] for u in report["units"]}
        step_log.append({"step": k, "ratio": r_k, "threshold": thr, "params": report["after"]["params"],
                         "macs": report["after"]["macs"], "criterion": crit_info})
        if steps > 1:
            log(f"step {k}/{steps}: params {report['after']['params']:,}, MACs {report['after']['macs']:,}")
        if k < steps:
            cfg = TrainConfig(epochs=step_epochs, batch_size=batch_size, optimizer="sgd", lr=step_lr, workers=workers,
                              seed=seed + k, device=device)
            step_meta = derive_meta(meta, "prune", history_entry={"step": k})
            model, hist = fit(model, ds.train, ds.val, cfg, out / f"step{k}", step_meta, progress=progress, log=log)
            (out / f"step{k}" / "checkpoint.safetensors").unlink(missing_ok=True)
            step_log[-1]["finetune"] = hist
            model.cpu()
    after = report["after"]
    report["warnings"] = warnings + report["warnings"] + _threshold_notes(report, log)
    if budget_info is not None:
        budget_info["achieved"] = {k: after[k] for k in ("params", "macs")}
        budget_info["achieved_fraction"] = {k: after[k] / before[k] for k in ("params", "macs")}
        missed = [k for k, v in targets.items() if after[k] > v]
        if missed:
            report["warnings"].append(f"the pruned model misses the budget on {', '.join(missed)} (the ratio was "
                                      f"searched on one-shot pruning; --steps re-scores between steps)")
    report["budget"] = budget_info
    for w in report["warnings"][len(warnings):]:
        log(f"warning: {w}")
    final_widths = conv_widths(model)
    rows = {r["layer"]: r for r in report["layers"]}
    layers = [{"layer": n, "channels_before": c0, "channels_after": final_widths.get(n, c0),
               "requested_ratio": rows.get(n, {}).get("requested_ratio", 0.0),
               "achieved_ratio": round(1 - final_widths.get(n, c0) / c0, 4)} for n, c0 in original_widths.items()]
    report.update({"before": before, "layers": layers, "params_ratio": after["params"] / before["params"],
                   "macs_ratio": after["macs"] / before["macs"], "requested_ratio": ratio})
    log(f"pruned with {method} ({coupling} coupling): params {before['params']:,} -> {after['params']:,} "
        f"({report['params_ratio']:.1%}), MACs {before['macs']:,} -> {after['macs']:,} ({report['macs_ratio']:.1%})")
    evaluation = None
    if data is not None:
        evaluation = eval_run_quiet(out, data, model, meta, log)
    parameters = {"method": method, "ratio": ratio, "threshold": report["threshold"], "target_lfa": target_lfa,
                  "round_to": round_to, "min_channels": min_channels, "max_ratio": max_ratio, "global": global_pruning,
                  "coupling": coupling, "exclude": list(exclude), "compensate": compensate_bias, "steps": steps,
                  "seed": seed, "target_macs": target_macs, "target_params": target_params, "fraction": fraction}
    if method == "taylor":
        parameters["taylor_batches"] = taylor_batches
    if method == "cap":
        parameters.update({"cap_epochs": cap_epochs, "cap_samples": cap_samples, "cap_lr": cap_lr,
                           "cap_train_model": cap_train_model})
    if steps > 1:
        parameters.update({"step_epochs": step_epochs, "step_lr": step_lr})
    new_meta = derive_meta(
        meta,
        "prune",
        history_entry={**{k: v for k, v in parameters.items()
                          if v not in (None, [], False) and not (k == "fraction" and v == 1)},
                       "source": str(Path(model_file).resolve())},
        metrics={"val_top1_before_finetune": evaluation} if evaluation is not None else {},
    )
    path = save_model(out / "model.safetensors", model, new_meta)
    write_record(
        out,
        "prune",
        {
            "inputs": {"model": str(Path(model_file).resolve()), "data": str(data) if data else None},
            "parameters": parameters,
            **report,
            "steps": step_log,
            "feature_attention": lfa_info,
            "fraction": ds.fraction if ds is not None else None,
            "val_top1_before_finetune": evaluation,
            "outputs": {"model": path.name},
        },
    )
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
    """Validation accuracy right after pruning (before fine-tuning), when the model's split is at hand."""
    from rsedge.trainer.datasets import ImageListDataset, load_split
    from rsedge.trainer.train import evaluate
    from rsedge.trainer.transforms import eval_transform

    split_file = meta.get("split")
    if (not split_file or not Path(split_file).is_file()) and (Path(out) / "split.json").is_file():
        split_file = str(Path(out) / "split.json")
    if not split_file or not Path(split_file).is_file():
        log("no split file for this model: skipping the accuracy check after pruning")
        return None
    split = load_split(split_file)
    if Path(split["root"]) != Path(data).resolve():
        log(f"--data {data} is not the folder this model was trained on: skipping the accuracy check")
        return None
    if not split["val"]:
        log("the split has no validation part: skipping the accuracy check after pruning")
        return None
    ds = ImageListDataset(split["root"], split["val"], eval_transform(meta["input_size"], **meta["normalization"]))
    acc = evaluate(model, ds, meta["classes"])["top1"]
    model.cpu()
    log(f"validation top-1 right after pruning: {acc:.4f}")
    return acc
