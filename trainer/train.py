"""Training and evaluation loops shared by `train`, `finetune` and the pruning methods.

A checkpoint (a model file plus optimizer and RNG state) is written atomically after every
epoch; `resume=True` continues from it and reaches the same weights an uninterrupted run would
on the same machine, because the data order of epoch e is seeded by (seed, e) alone.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .curves import curve_title, write_curves
from .modelfile import load_extra_tensors, load_model, read_metadata, save_model
from .tasks import Evaluator, Task, task_for

LossFn = Callable[[Any, Any, Any], torch.Tensor]


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: int = 0
    step_milestones: Sequence[float] = (0.5, 0.75)
    step_gamma: float = 0.1
    seed: int = 0
    workers: int = 1
    amp: bool = True
    device: str = "auto"
    label_smoothing: float = 0.0
    dice: float = 0.0  # segmentation: weight of a soft Dice term added to the cross-entropy
    fraction: float = 1.0  # of the training images, stratified by class (datasets.stratified_fraction)
    ema: bool | None = None  # evaluate and ship an EMA of the weights (None: the task's default; detection on)
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        c = TrainConfig(**asdict(self))
        if c.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, not {c.optimizer!r}")
        if c.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be cosine, step or constant, not {c.schedule!r}")
        if c.dice < 0:
            raise ValueError(f"--dice must be >= 0, not {c.dice}")
        if not 0 < c.fraction <= 1:
            raise ValueError(f"--fraction must be in (0, 1], not {c.fraction}")
        if c.lr is None:
            c.lr = 0.05 if c.optimizer == "sgd" else 1e-3
        if c.weight_decay is None:
            c.weight_decay = 5e-4 if c.optimizer == "sgd" else 0.05
        c.step_milestones = tuple(float(m) for m in c.step_milestones)
        return c


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but PyTorch sees no CUDA device")
    return dev


def lr_at(cfg: TrainConfig, epoch: int, step: float = 0.0) -> float:
    """Learning rate at fractional epoch `epoch + step`; a pure function, so resuming needs no
    scheduler state."""
    t = epoch + step
    if cfg.warmup_epochs and t < cfg.warmup_epochs:
        return cfg.lr * (t + 1e-3) / cfg.warmup_epochs
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.step_gamma ** sum(epoch >= m * cfg.epochs for m in cfg.step_milestones)
    span = max(cfg.epochs - cfg.warmup_epochs, 1)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (t - cfg.warmup_epochs) / span))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on BN/LN scales and biases: decaying them fights pruning criteria that
    read BN scales and hurts small-data accuracy."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warn_skipped(skipped: Sequence[str], log: Callable[[str], None] | None = print, what: str = "") -> None:
    if skipped and log is not None:
        log(f"warning: {what}{len(skipped)} image(s) unreadable since the split was made were skipped, "
            f"e.g. {skipped[0]}")


class SkippingLoader:
    """A DataLoader over `SkipUnreadable(dataset)` that iterates (x, y) batches as usual; the
    images of the last pass that could not be read are in `skipped` ("path: error"), and
    `report(skipped)` is called once at the end of a pass that skipped any."""

    def __init__(self, loader, min_batch: int = 1, report: Callable[[list[str]], None] | None = None):
        self.loader, self.min_batch, self.report = loader, min_batch, report
        self.dataset = loader.dataset.dataset
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.skipped = []
        try:
            for batch, bad in self.loader:
                self.skipped.extend(bad)
                # a batch cut to one image by skips cannot train BatchNorm
                if batch is not None and len(batch[1]) >= self.min_batch:
                    yield batch
        finally:
            if self.skipped and self.report is not None:
                self.report(self.skipped)


def make_loader(dataset, batch_size: int, shuffle: bool, seed: int, epoch: int, workers: int, drop_last: bool = False,
                min_batch: int = 1, report: Callable[[list[str]], None] | None = warn_skipped,
                collate: Callable[[list[Any]], Any] | None = None) -> SkippingLoader:
    """`collate`: the task's batching (None: torch's default_collate), applied to the readable
    samples of each batch."""
    from functools import partial

    from .datasets import SkipUnreadable, collate_readable

    g = torch.Generator()
    g.manual_seed(seed * 1000003 + epoch)
    loader = torch.utils.data.DataLoader(
        SkipUnreadable(dataset),
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g,
        num_workers=workers,
        drop_last=drop_last and len(dataset) > batch_size,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        collate_fn=partial(collate_readable, collate=collate) if collate is not None else collate_readable,
    )
    return SkippingLoader(loader, min_batch, report)


def to_device(batch: Any, device: torch.device) -> Any:
    """A tensor, or the tensors of a (nested) tuple, list or dict, moved to `device`."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def _count(targets: Any) -> int:
    """Samples in a batch of targets (a tensor's first axis, or a sequence of per-image targets)."""
    return int(targets.shape[0]) if torch.is_tensor(targets) else len(targets)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, evaluator: Evaluator, device: torch.device | str = "cpu",
             batch_size: int = 128, workers: int = 1, progress: bool = False,
             log: Callable[[str], None] | None = print, collate: Callable | None = None,
             predict: Callable[[nn.Module, Any], Any] | None = None) -> dict[str, Any]:
    """The task's metrics of `model` on `dataset`, from `evaluator` (`task.evaluator(meta)`:
    top-1, per-class accuracy and confusion matrix for classification); images that became
    unreadable are skipped, counted in `skipped_images` and warned about through `log` (None:
    silent). `predict(model, inputs)`: the task's forward (`task.predictor(meta)`; default one
    pass); an evaluator with `observe_inputs` also sees the inputs (segmentation overlays)."""
    device = torch.device(device)
    model.eval().to(device)
    loader = make_loader(dataset, batch_size, False, 0, 0, workers, report=None, collate=collate)
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="evaluating", unit="batch", leave=False)
    predict = predict or (lambda m, inputs: m(inputs))
    observe = getattr(evaluator, "observe_inputs", None)
    for x, y in it:
        if observe is not None:
            observe(x)
        evaluator.update(predict(model, to_device(x, device)), y)
    result = evaluator.result()
    result["skipped_images"] = len(loader.skipped)
    if loader.skipped:
        result["skipped"] = loader.skipped
        warn_skipped(loader.skipped, log, "evaluation: ")
    return result


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    for name, v in info.get("scalars", {}).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})


@dataclass
class _Run:
    """What one `fit` call works with, shared by its epochs."""

    cfg: TrainConfig
    task: Task
    meta: dict[str, Any]
    device: torch.device
    opt: torch.optim.Optimizer
    scaler: Any
    use_amp: bool
    loss_fn: LossFn
    log: Callable[[str], None]
    progress: bool
    before_step: Callable[[nn.Module], None] | None
    ema: Any = None  # ema.ModelEMA when the run averages its weights


def _resume(model: nn.Module, run_dir: Path, cfg: TrainConfig, resume: bool, log: Callable[[str], None]
            ) -> tuple[nn.Module, int, list[dict[str, Any]], dict[str, Any]]:
    """(model, first epoch to run, history, checkpoint info) of the run in `run_dir`."""
    ckpt = run_dir / "checkpoint.safetensors"
    if resume and ckpt.is_file():
        info = read_metadata(ckpt).get("checkpoint", {})
        if info.get("config") and info["config"] != json.loads(json.dumps(asdict(cfg))):
            log("warning: resuming with a configuration that differs from the checkpoint's")
        model, _ = load_model(ckpt)
        start_epoch = int(info["epoch"]) + 1
        log(f"resuming from {ckpt} at epoch {start_epoch + 1}/{cfg.epochs}")
        return model, start_epoch, list(info.get("history", [])), info
    if resume:
        log(f"no checkpoint in {run_dir}; starting from the beginning")
    return model, 0, [], {}


def fit(
    model: nn.Module,
    train_ds,
    val_ds,
    cfg: TrainConfig,
    run_dir: str | Path,
    meta: dict[str, Any],
    resume: bool = False,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_epoch_start: Callable[[nn.Module, int], None] | None = None,
    before_step: Callable[[nn.Module], None] | None = None,
    task: Task | None = None,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train `model` for cfg.epochs; returns the final model and the per-epoch history.

    `meta` is the model metadata the checkpoint carries (so a pruned layout can be resumed);
    `task` (default: the task of `meta`) gives the loss, the evaluator of the running training
    metric and of validation, and the batching; `loss_fn(outputs, targets, images)` replaces the
    task's loss (AML, distillation...). Sparse training hooks in without a loop of its own:
    `on_epoch_start(model, epoch)` runs before each epoch (also the first one after a resume)
    and `before_step(model)` between the backward pass and the optimizer step, on unscaled
    gradients."""
    cfg = cfg.resolved()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = task or task_for(meta)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    model, start_epoch, history, info = _resume(model, run_dir, cfg, resume, log)
    model.to(device)
    opt = make_optimizer(model, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    extra: dict[str, torch.Tensor] = {}
    if start_epoch:
        extra = load_extra_tensors(run_dir / "checkpoint.safetensors")
        _restore_optimizer(opt, extra, info["optimizer"])
        torch.set_rng_state(extra["rng.torch"])
        if use_amp and "scaler" in info:
            scaler.load_state_dict(info["scaler"])
    run = _Run(cfg, task, meta, device, opt, scaler, use_amp, loss_fn or task.model_loss(meta, cfg), log, progress,
               before_step, _make_ema(model, cfg, task, extra, info))
    val_key = task.metric_key("val")
    if history and history[-1].get(val_key) is None and val_ds is not None and len(val_ds) > 0:
        log(f"validating epoch {history[-1]['epoch']}, which the interrupted run checkpointed but did not validate")
        _validate_epoch(_evaluated(model, run), val_ds, history[-1], [], run)

    for epoch in range(start_epoch, cfg.epochs):
        if on_epoch_start is not None:
            on_epoch_start(model, epoch)
        t0 = time.perf_counter()
        entry, skipped = _train_epoch(model, train_ds, epoch, run)
        history.append(entry)
        # the finished epoch is on disk before anything that can still fail (validation included)
        _checkpoint(model, run_dir, epoch, history, run)
        _validate_epoch(_evaluated(model, run), val_ds, entry, skipped, run)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        write_curves(run_dir, history, curve_title(meta), (task.metric_key("train"), val_key))
        train_key = task.metric_key("train")
        val_txt = f" {val_key} {entry[val_key]:.4f}" if entry[val_key] is not None else ""
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {entry['train_loss']:.4f} {train_key} {entry[train_key]:.4f}"
            f"{val_txt} ({entry['seconds']:.1f}s)")
    return _evaluated(model, run).eval(), history


def _make_ema(model: nn.Module, cfg: TrainConfig, task: Task, extra: dict[str, torch.Tensor], info: dict[str, Any]):
    """The weight average of a run that keeps one (`cfg.ema`, else the task's default), restored
    from the checkpoint's tensors (`extra`, empty for a new run) when resuming."""
    if not (cfg.ema if cfg.ema is not None else task.ema_by_default):
        return None
    from .ema import ModelEMA

    ema = ModelEMA(model)
    if extra:
        ema.restore(extra, info.get("ema_updates", 0))
    return ema


def _evaluated(model: nn.Module, run: _Run) -> nn.Module:
    """The weights a run validates and ships: the average when it keeps one."""
    return run.ema.module if run.ema is not None else model


def _train_epoch(model: nn.Module, train_ds, epoch: int, run: _Run) -> tuple[dict[str, Any], list[str]]:
    """One pass over the training set; (the epoch's history entry, the images it skipped)."""
    cfg, device, opt = run.cfg, run.device, run.opt
    if hasattr(train_ds, "set_epoch"):  # augmentation seeded by (seed, epoch, index), as the data order
        train_ds.set_epoch(epoch)
    model.train()
    loader = make_loader(train_ds, cfg.batch_size, True, cfg.seed, epoch, cfg.workers, drop_last=True,
                         min_batch=2, report=None, collate=run.task.collate)
    n_batches = max(len(loader), 1)
    t0 = time.perf_counter()
    seen, loss_sum = 0, 0.0
    running = run.task.training_evaluator(run.meta)
    it = loader
    if run.progress:
        from tqdm import tqdm

        it = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
    for i, (x, y) in enumerate(it):
        lr = lr_at(cfg, epoch, i / n_batches)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = to_device(x, device), to_device(y, device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=run.use_amp):
            outputs = model(x)
            loss = run.loss_fn(_to_float(outputs), y, x)
        opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if run.before_step is not None:
            if run.use_amp:
                run.scaler.unscale_(opt)
            run.before_step(model)
        run.scaler.step(opt)
        run.scaler.update()
        if run.ema is not None:
            run.ema.update(model)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}; lower --lr")
        n = _count(y)
        seen += n
        loss_sum += loss.item() * n
        running.update(_detach(outputs), y)
        if run.progress:
            metric = run.task.primary_metric if run.task.primary_metric != "top1" else "acc"
            it.set_postfix({"loss": f"{loss_sum / seen:.3f}",
                            metric: f"{running.result()[run.task.primary_metric]:.3f}", "lr": f"{lr:.2g}"})
    entry = {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(seen, 1),
        run.task.metric_key("train"): running.result()[run.task.primary_metric] if seen else 0.0,
        run.task.metric_key("val"): None,
        "lr": lr_at(cfg, epoch),
        "seconds": round(time.perf_counter() - t0, 2),
        "skipped_images": len(loader.skipped),
    }
    return entry, loader.skipped


def _to_float(outputs: Any) -> Any:
    """Outputs in float32 for the loss (autocast computes them in float16)."""
    if torch.is_tensor(outputs):
        return outputs.float()
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float(o) for o in outputs)
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    return outputs


def _detach(outputs: Any) -> Any:
    if torch.is_tensor(outputs):
        return outputs.detach()
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_detach(o) for o in outputs)
    if isinstance(outputs, dict):
        return {k: _detach(v) for k, v in outputs.items()}
    return outputs


def _checkpoint(model: nn.Module, run_dir: Path, epoch: int, history: list[dict[str, Any]], run: _Run) -> None:
    tensors, opt_info = _optimizer_tensors(run.opt)
    tensors["rng.torch"] = torch.get_rng_state()
    if run.ema is not None:
        tensors.update(run.ema.tensors())
    ck_meta = dict(run.meta)
    ck_meta["checkpoint"] = {
        "epoch": epoch,
        "history": history,
        "optimizer": opt_info,
        "config": json.loads(json.dumps(asdict(run.cfg))),
        **({"ema_updates": run.ema.updates} if run.ema is not None else {}),
        **({"scaler": run.scaler.state_dict()} if run.use_amp else {}),
    }
    save_model(run_dir / "checkpoint.safetensors", model, ck_meta, extra_tensors=tensors)


def _validate_epoch(model: nn.Module, val_ds, entry: dict[str, Any], train_skipped: Sequence[str], run: _Run) -> None:
    """Fill in the epoch's validation metric and its count of skipped images, warned about once."""
    val = None
    if val_ds is not None and len(val_ds) > 0:
        val = evaluate(model, val_ds, run.task.evaluator(run.meta), run.device,
                       batch_size=run.task.eval_batch_size(128), workers=run.cfg.workers, log=None,
                       collate=run.task.collate, predict=run.task.predictor(run.meta))
        entry[run.task.metric_key("val")] = val[run.task.primary_metric]
    val_skipped = val.get("skipped", []) if val else []
    entry["skipped_images"] = entry.get("skipped_images", 0) + len(val_skipped)
    warn_skipped(list(train_skipped) + val_skipped, run.log, f"epoch {entry['epoch']}: ")
