"""Sparse training of BatchNorm scales, so that a gamma threshold can remove channels.

- `slimming` (Liu et al., "Network Slimming", 2017): L1 on gamma, gradient + sr * sign(gamma).
- `l1rr` (seed 001, eqs. 3-7): training runs in n phases of t epochs. At the start of each phase
  the dynamic sparse module refreshes the reweighting alpha = 1 / (|gamma| + eps) (alpha = 0 in the
  first phase: plain training), and the self-adaptive module sets one factor per layer,
  lambda_i = 2^(a (rho - Np_i / N_i - s_i)), with rho the model-wide fraction of |gamma| below
  `threshold` (0.01), Np_i / N_i the layer's, and s_i the layer's count of saturated refreshes
  (the lambda decay). The gradient on gamma becomes grad + theta * lambda_i * alpha * sign(gamma).

The paper does not define "saturated" exactly; we count a refresh (from the third phase on) at
which the layer's number of sparse channels is non-zero and unchanged since the previous
refresh: its sparsity has stopped moving, so pushing it harder only costs accuracy.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

METHODS = ("slimming", "l1rr")


class SparseRegularizer:
    def __init__(
        self,
        model: nn.Module,
        method: str = "l1rr",
        sr: float = 1e-4,
        theta: float = 1e-3,
        a: float = 1.0,
        eps: float = 1e-2,
        phase_epochs: int = 1,
        threshold: float = 0.01,
        phases: list[dict[str, Any]] | None = None,
        on_refresh: Callable[[list[dict[str, Any]]], None] | None = None,
    ):
        if method not in METHODS:
            raise ValueError(f"sparse training method must be one of {', '.join(METHODS)}, not {method!r}")
        if phase_epochs < 1:
            raise ValueError("--phase-epochs must be at least 1")
        self.method, self.sr, self.theta, self.a, self.eps = method, sr, theta, a, eps
        self.phase_epochs, self.threshold = int(phase_epochs), threshold
        self._bind(model)
        self.phases: list[dict[str, Any]] = list(phases or [])
        self.alpha: dict[str, torch.Tensor] = {}
        self.lam: dict[str, float] = {}
        self.on_refresh = on_refresh

    def _bind(self, model: nn.Module) -> None:
        """Follow the model object: a resumed `fit` continues with the checkpoint's copy."""
        self.model = model
        self.bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.affine}

    @torch.no_grad()
    def sparsity(self) -> tuple[float, dict[str, int], dict[str, int]]:
        counts = {n: int((bn.weight.abs() < self.threshold).sum()) for n, bn in self.bns.items()}
        sizes = {n: bn.num_features for n, bn in self.bns.items()}
        total = sum(sizes.values())
        return (sum(counts.values()) / total if total else 0.0), counts, sizes

    def _restore(self, entry: dict[str, Any]) -> None:
        self.lam = {n: float(v["lambda"]) for n, v in entry["layers"].items()}
        self.alpha = {}
        if entry.get("alpha"):
            for n, vals in entry["alpha"].items():
                bn = self.bns[n]
                self.alpha[n] = torch.tensor(vals, dtype=bn.weight.dtype, device=bn.weight.device)

    @torch.no_grad()
    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        if model is not self.model:
            self._bind(model)
        if self.method != "l1rr":
            return
        if epoch % self.phase_epochs:
            if not self.lam:  # resumed in the middle of a phase
                done = [p for p in self.phases if p["epoch"] <= epoch]
                if done:
                    self._restore(done[-1])
            return
        self.refresh(epoch)

    @torch.no_grad()
    def refresh(self, epoch: int) -> dict[str, Any]:
        phase = epoch // self.phase_epochs
        self.phases = [p for p in self.phases if p["epoch"] < epoch]
        prev = self.phases[-1] if self.phases else None
        rho, counts, sizes = self.sparsity()
        layers: dict[str, dict[str, Any]] = {}
        self.alpha, self.lam = {}, {}
        for n, bn in self.bns.items():
            s = int(prev["layers"][n]["s"]) if prev else 0
            if phase >= 2 and prev and counts[n] > 0 and counts[n] == prev["layers"][n]["sparse_channels"]:
                s += 1
            lam = 2.0 ** (self.a * (rho - counts[n] / sizes[n] - s)) if phase >= 1 else 1.0
            self.lam[n] = lam
            if phase >= 1:
                self.alpha[n] = 1.0 / (bn.weight.detach().abs() + self.eps)
            layers[n] = {"channels": sizes[n], "sparse_channels": counts[n],
                         "sparsity": round(counts[n] / sizes[n], 6), "lambda": lam, "s": s}
        entry = {"phase": phase, "epoch": epoch, "rho": rho, "regularized": phase >= 1, "layers": layers,
                 "alpha": {n: a.cpu().tolist() for n, a in self.alpha.items()}}
        self.phases.append(entry)
        if self.on_refresh is not None:
            self.on_refresh(self.phases)
        return entry

    @torch.no_grad()
    def before_step(self, model: nn.Module) -> None:
        if model is not self.model:
            self._bind(model)
        for n, bn in self.bns.items():
            g = bn.weight.grad
            if g is None:
                continue
            if self.method == "slimming":
                g.add_(self.sr * torch.sign(bn.weight))
            elif n in self.alpha:
                g.add_(self.theta * self.lam[n] * self.alpha[n] * torch.sign(bn.weight))

    def summary(self) -> dict[str, Any]:
        rho, counts, sizes = self.sparsity()
        return {"rho": rho, "layers": {n: round(counts[n] / sizes[n], 6) for n in self.bns}}


def sparse_train_run(
    model_file: str | Path,
    data: str | Path,
    out: str | Path,
    method: str = "l1rr",
    cfg=None,
    sr: float = 1e-4,
    theta: float = 1e-3,
    lambda_a: float = 1.0,
    eps: float = 1e-2,
    phase_epochs: int | None = None,
    threshold: float = 0.01,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    exist_ok: bool = False,
) -> dict[str, Any]:
    """The `sparse-train` stage: train on the model's split with the sparsity penalty, record the
    sparsity per phase (l1rr) or per epoch (slimming). A run already in `out` is refused unless
    `resume` or `exist_ok`."""
    from rsedge.trainer.modelfile import derive_meta, load_model, save_model
    from rsedge.trainer.records import atomic_write_json, read_json, write_record
    from rsedge.trainer.run import datasets_for, format_per_class, open_run_dir, split_for_model, write_eval_outputs
    from rsedge.trainer.sampling import subsample_dataset
    from rsedge.trainer.train import TrainConfig, evaluate, fit, pick_device

    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    cfg = (cfg or TrainConfig(epochs=10, lr=0.01)).resolved()
    if phase_epochs is None:
        phase_epochs = max(1, math.ceil(cfg.epochs / 10))
    n_phases = math.ceil(cfg.epochs / phase_epochs)
    if method == "l1rr" and n_phases > 10:
        log(f"warning: {n_phases} phases of {phase_epochs} epoch(s); L1RR uses at most 10 (raise --phase-epochs)")
    if method == "l1rr" and n_phases < 2:
        log("warning: one phase only: the first phase is unregularized, so nothing is sparsified")
    out = open_run_dir(out, resume=resume, exist_ok=exist_ok, log=log)
    final = out / "model.safetensors"
    if resume and final.is_file() and (out / "record.json").is_file():
        log(f"{final} exists: sparse training already finished")
        return read_json(out / "record.json")
    model, meta = load_model(model_file)
    if meta.get("layout", {}).get("graph"):
        raise ValueError("this model was pruned with --coupling reconstruct; sparse-train the unpruned model")
    split = split_for_model(meta, data, out, seed=cfg.seed, progress=progress, log=log)
    train_ds, val_ds, test_ds = datasets_for(split, meta["input_size"], meta["normalization"])
    train_ds, fraction = subsample_dataset(train_ds, cfg.fraction, cfg.seed, meta["classes"], log)
    state_file = out / "sparse_state.json"
    phases = read_json(state_file)["phases"] if resume and state_file.is_file() else None
    epoch_log: list[dict[str, Any]] = []
    reg = SparseRegularizer(model, method, sr=sr, theta=theta, a=lambda_a, eps=eps, phase_epochs=phase_epochs,
                            threshold=threshold, phases=phases,
                            on_refresh=lambda ph: atomic_write_json(state_file, {"phases": ph}))

    def on_epoch_start(m: nn.Module, epoch: int) -> None:
        reg.on_epoch_start(m, epoch)
        rho, _, _ = reg.sparsity()
        epoch_log.append({"epoch": epoch + 1, "rho_at_start": rho})
        if method == "l1rr" and epoch % phase_epochs == 0:
            log(f"phase {epoch // phase_epochs + 1}/{n_phases}: model sparsity {rho:.3f}"
                f"{' (unregularized)' if epoch == 0 else ''}")

    params = {"method": method, "sr": sr if method == "slimming" else None,
              "theta": theta if method == "l1rr" else None, "lambda_a": lambda_a if method == "l1rr" else None,
              "eps": eps if method == "l1rr" else None, "phase_epochs": phase_epochs if method == "l1rr" else None,
              "phases": n_phases if method == "l1rr" else None, "threshold": threshold}
    new_meta = derive_meta(meta, "sparse-train",
                           history_entry={**{k: v for k, v in params.items() if v is not None},
                                          "epochs": cfg.epochs, "source": str(Path(model_file).resolve())},
                           split=str((out / "split.json").resolve()))
    model, history = fit(model, train_ds, val_ds, cfg, out, new_meta, resume=resume, progress=progress, log=log,
                         on_epoch_start=on_epoch_start, before_step=reg.before_step)
    reg._bind(model)
    final_sparsity = reg.summary()
    log(f"final model sparsity (|gamma| < {threshold}): {final_sparsity['rho']:.3f}")
    result = evaluate(model, test_ds, meta["classes"], pick_device(cfg.device), workers=cfg.workers, log=log)
    new_meta["metrics"] = {"test_top1": result["top1"], "val_top1": history[-1]["val_top1"] if history else None,
                           "bn_sparsity": final_sparsity["rho"]}
    save_model(final, model.cpu(), new_meta)
    write_eval_outputs(out, result, meta["classes"], f"{meta['arch']} sparse-trained ({method})")
    log(format_per_class(result))
    record = {
        "inputs": {"model": str(Path(model_file).resolve()), "data": split["root"]},
        "parameters": {**params, **asdict(cfg)},
        "phases": [{k: v for k, v in p.items() if k != "alpha"} for p in reg.phases],
        "final_sparsity": final_sparsity,
        "fraction": fraction,
        "history": history,
        "test": {k: result[k] for k in ("top1", "samples", "per_class", "skipped_images")},
        "outputs": {"model": final.name, "confusion": "confusion.png", "results": "results.csv",
                    "curves": "results.png"},
    }
    write_record(out, "sparse-train", record)
    (out / "checkpoint.safetensors").unlink(missing_ok=True)
    return record
