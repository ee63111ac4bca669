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
from .metrics import confusion_matrix, summarize
from .modelfile import load_extra_tensors, load_model, read_metadata, save_model

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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
    fraction: float = 1.0  # of the training images, stratified by class (datasets.stratified_fraction)
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        c = TrainConfig(**asdict(self))
        if c.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be sgd or adamw, not {c.optimizer!r}")
        if c.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be cosine, step or constant, not {c.schedule!r}")
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
                min_batch: int = 1, report: Callable[[list[str]], None] | None = warn_skipped) -> SkippingLoader:
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
        collate_fn=collate_readable,
    )
    return SkippingLoader(loader, min_batch, report)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, classes: Sequence[str], device: torch.device | str = "cpu",
             batch_size: int = 128, workers: int = 1, progress: bool = False,
             log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Top-1, per-class accuracy and confusion matrix; images that became unreadable are
    skipped, counted in `skipped_images` and warned about through `log` (None: silent)."""
    device = torch.device(device)
    model.eval().to(device)
    loader = make_loader(dataset, batch_size, False, 0, 0, workers, report=None)
    preds, targets = [], []
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="evaluating", unit="batch", leave=False)
    for x, y in it:
        out = model(x.to(device, non_blocking=True))
        preds.append(out.argmax(1).cpu())
        targets.append(y)
    p = torch.cat(preds).numpy() if preds else np.zeros(0, np.int64)
    t = torch.cat(targets).numpy() if targets else np.zeros(0, np.int64)
    result = summarize(confusion_matrix(t, p, len(classes)), classes)
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
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Train `model` for cfg.epochs; returns the final model and the per-epoch history.

    `meta` is the model metadata the checkpoint carries (so a pruned layout can be resumed);
    `loss_fn(logits, targets, images)` replaces cross-entropy (AML, distillation...).
    Sparse training hooks in without a loop of its own: `on_epoch_start(model, epoch)` runs
    before each epoch (also the first one after a resume) and `before_step(model)` between the
    backward pass and the optimizer step, on unscaled gradients."""
    cfg = cfg.resolved()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt = run_dir / "checkpoint.safetensors"
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    if resume and ckpt.is_file():
        info = read_metadata(ckpt).get("checkpoint", {})
        if info.get("config") and info["config"] != json.loads(json.dumps(asdict(cfg))):
            log("warning: resuming with a configuration that differs from the checkpoint's")
        model, _ = load_model(ckpt)
        start_epoch = int(info["epoch"]) + 1
        history = list(info.get("history", []))
        log(f"resuming from {ckpt} at epoch {start_epoch + 1}/{cfg.epochs}")
    elif resume:
        log(f"no checkpoint in {run_dir}; starting from the beginning")
    model.to(device)
    opt = make_optimizer(model, cfg)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    if start_epoch:
        extra = load_extra_tensors(ckpt)
        _restore_optimizer(opt, extra, info["optimizer"])
        torch.set_rng_state(extra["rng.torch"])
        if use_amp and "scaler" in info:
            scaler.load_state_dict(info["scaler"])
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    loss_fn = loss_fn or (lambda logits, y, x: criterion(logits, y))
    classes = meta["classes"]
    if history and history[-1].get("val_top1") is None and val_ds is not None and len(val_ds) > 0:
        log(f"validating epoch {history[-1]['epoch']}, which the interrupted run checkpointed but did not validate")
        _validate_epoch(model, val_ds, history[-1], [], classes, device, cfg, log)

    for epoch in range(start_epoch, cfg.epochs):
        if on_epoch_start is not None:
            on_epoch_start(model, epoch)
        model.train()
        loader = make_loader(train_ds, cfg.batch_size, True, cfg.seed, epoch, cfg.workers, drop_last=True,
                             min_batch=2, report=None)
        n_batches = max(len(loader), 1)
        t0 = time.perf_counter()
        seen, loss_sum, correct = 0, 0.0, 0
        it = loader
        if progress:
            from tqdm import tqdm

            it = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False)
        for i, (x, y) in enumerate(it):
            lr = lr_at(cfg, epoch, i / n_batches)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                logits = model(x)
                loss = loss_fn(logits.float(), y, x)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if before_step is not None:
                if use_amp:
                    scaler.unscale_(opt)
                before_step(model)
            scaler.step(opt)
            scaler.update()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}; lower --lr")
            seen += y.numel()
            loss_sum += loss.item() * y.numel()
            correct += int((logits.argmax(1) == y).sum())
            if progress:
                it.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", lr=f"{lr:.2g}")
        entry = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_acc": correct / max(seen, 1),
            "val_top1": None,
            "lr": lr_at(cfg, epoch),
            "seconds": round(time.perf_counter() - t0, 2),
            "skipped_images": len(loader.skipped),
        }
        history.append(entry)
        # the finished epoch is on disk before anything that can still fail (validation included)
        tensors, opt_info = _optimizer_tensors(opt)
        tensors["rng.torch"] = torch.get_rng_state()
        ck_meta = dict(meta)
        ck_meta["checkpoint"] = {
            "epoch": epoch,
            "history": history,
            "optimizer": opt_info,
            "config": json.loads(json.dumps(asdict(cfg))),
            **({"scaler": scaler.state_dict()} if use_amp else {}),
        }
        save_model(ckpt, model, ck_meta, extra_tensors=tensors)
        _validate_epoch(model, val_ds, entry, loader.skipped, classes, device, cfg, log)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        write_curves(run_dir, history, curve_title(meta))
        val_txt = f" val_top1 {entry['val_top1']:.4f}" if entry["val_top1"] is not None else ""
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {entry['train_loss']:.4f} train_acc {entry['train_acc']:.4f}"
            f"{val_txt} ({entry['seconds']:.1f}s)")
    return model.eval(), history


def _validate_epoch(model: nn.Module, val_ds, entry: dict[str, Any], train_skipped: Sequence[str], classes,
                    device: torch.device, cfg: TrainConfig, log: Callable[[str], None]) -> None:
    """Fill in the epoch's validation accuracy and its count of skipped images, warned about once."""
    val = None
    if val_ds is not None and len(val_ds) > 0:
        val = evaluate(model, val_ds, classes, device, workers=cfg.workers, log=None)
        entry["val_top1"] = val["top1"]
    val_skipped = val.get("skipped", []) if val else []
    entry["skipped_images"] = entry.get("skipped_images", 0) + len(val_skipped)
    warn_skipped(list(train_skipped) + val_skipped, log, f"epoch {entry['epoch']}: ")
