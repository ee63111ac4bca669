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
from dataclasses import asdict, dataclass
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


@dataclass
class SparseOptions:
    """`rsedge sparse-train`: the sparsity method and its constants, the training configuration."""

    method: str = "l1rr"
    cfg: Any = None  # a TrainConfig; default 10 epochs at lr 0.01
    sr: float = 1e-4  # slimming: L1 strength on gamma
    theta: float = 1e-3  # l1rr: sparsity rate
    lambda_a: float = 1.0  # l1rr: a in lambda = 2^(a(rho - Np/N - s))
    eps: float = 1e-2  # l1rr: epsilon in alpha = 1/(|gamma| + eps)
    phase_epochs: int | None = None  # l1rr: epochs per phase; default epochs/10 rounded up
    threshold: float = 0.01  # |gamma| below this counts as sparse
    from_scratch: bool = False  # seed 001's protocol: the file's architecture, freshly initialized
    resume: bool = False
    exist_ok: bool = False
    progress: bool = True

    def parameters(self, phase_epochs: int, n_phases: int) -> dict[str, Any]:
        """The record's parameters: each constant only for the method that reads it."""
        l1rr = self.method == "l1rr"
        return {"method": self.method, "sr": self.sr if self.method == "slimming" else None,
                "theta": self.theta if l1rr else None, "lambda_a": self.lambda_a if l1rr else None,
                "eps": self.eps if l1rr else None, "phase_epochs": phase_epochs if l1rr else None,
                "phases": n_phases if l1rr else None, "threshold": self.threshold,
                "from_scratch": self.from_scratch}


def sparse_train_run(model_file: str | Path, data: str | Path, out: str | Path, options: SparseOptions | None = None,
                     *, log: Callable[[str], None] = print, **fields: Any) -> dict[str, Any]:
    """The `sparse-train` stage: train on the model's split with the sparsity penalty, record the
    sparsity per phase (l1rr) or per epoch (slimming). A run already in `out` is refused unless
    `resume` or `exist_ok`; `fields` replace those of `options`."""
    from rsedge.trainer.modelfile import derive_meta
    from rsedge.trainer.stage import TRAINING_OUTPUTS, Stage, build_options
    from rsedge.trainer.train import TrainConfig

    o = build_options(SparseOptions, options, fields)
    if o.method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}, not {o.method!r}")
    cfg = (o.cfg or TrainConfig(epochs=10, lr=0.01)).resolved()
    phase_epochs = o.phase_epochs if o.phase_epochs is not None else max(1, math.ceil(cfg.epochs / 10))
    n_phases = math.ceil(cfg.epochs / phase_epochs)
    if o.method == "l1rr" and n_phases > 10:
        log(f"warning: {n_phases} phases of {phase_epochs} epoch(s); L1RR uses at most 10 (raise --phase-epochs)")
    if o.method == "l1rr" and n_phases < 2:
        log("warning: one phase only: the first phase is unregularized, so nothing is sparsified")
    stage = Stage("sparse-train", out, resume=o.resume, exist_ok=o.exist_ok, progress=o.progress, log=log)
    done = stage.finished("sparse training already finished")
    if done is not None:
        return done
    model, meta = _starting_model(model_file, o.from_scratch, cfg.seed, log)
    d = stage.data(stage.model_split(meta, data, cfg.seed), meta, cfg)
    reg, on_epoch_start = _regularizer(model, o, phase_epochs, n_phases, stage, log)
    params = o.parameters(phase_epochs, n_phases)
    new_meta = derive_meta(meta, "sparse-train",
                           history_entry={**{k: v for k, v in params.items() if v is not None},
                                          "epochs": cfg.epochs, "source": str(Path(model_file).resolve())},
                           split=str(stage.split_path))
    model, history = stage.fit(model, d, cfg, new_meta, on_epoch_start=on_epoch_start, before_step=reg.before_step)
    reg._bind(model)
    final_sparsity = reg.summary()
    log(f"final model sparsity (|gamma| < {o.threshold}): {final_sparsity['rho']:.3f}")
    how = f"{o.method}, from scratch" if o.from_scratch else o.method
    test = stage.conclude(model, d, cfg, new_meta, history, f"{meta['arch']} sparse-trained ({how})",
                          bn_sparsity=final_sparsity["rho"])
    return stage.record({
        "inputs": {"model": str(Path(model_file).resolve()), "data": d.split["root"]},
        "parameters": {**params, **asdict(cfg)},
        "phases": [{k: v for k, v in p.items() if k != "alpha"} for p in reg.phases],
        "final_sparsity": final_sparsity,
        "fraction": d.fraction,
        "history": history,
        "test": test,
        "outputs": dict(TRAINING_OUTPUTS),
    })


def _starting_model(model_file: str | Path, from_scratch: bool, seed: int, log: Callable[[str], None]
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """The model sparse training starts from: the file's trained weights, or with `from_scratch`
    (seed 001 sparse-trains from scratch) its architecture initialized afresh as `rsedge train
    --seed` initializes it, the file supplying only the architecture, classes, input size and split."""
    from rsedge.compress.msb_fixed import check_not_quantized
    from rsedge.trainer.modelfile import load_model, read_metadata

    if not from_scratch:
        model, meta = load_model(model_file)
        check_not_quantized(meta, "sparse-train")
        if meta.get("layout", {}).get("graph"):
            raise ValueError("this model was pruned with --coupling reconstruct; sparse-train the unpruned model")
        return model, meta
    meta = read_metadata(model_file)
    _check_unpruned_float(meta, model_file)
    log(f"--from-scratch: {meta['arch']} initialized afresh (seed {seed}); the weights of {model_file} are not used")
    return fresh_model(meta, seed), meta


def _check_unpruned_float(meta: dict[str, Any], model_file: str | Path) -> None:
    """Only the unpruned float architecture can start from scratch: a pruned layout is the
    product of a trained model's gammas, and a fresh copy of it would not be the paper's model."""
    quant = meta.get("quantization")
    if quant:
        raise ValueError(f"--from-scratch needs an unpruned float model, but {model_file} is quantized "
                         f"({quant.get('bits')}-bit {quant.get('scheme')}): give the model it was made from")
    layout = meta.get("layout") or {}
    if any(layout.get(k) for k in ("layers", "tensors", "graph")):
        raise ValueError(f"--from-scratch needs an unpruned architecture, but {model_file} is pruned "
                         f"({len(layout.get('layers') or {})} layer(s) reshaped): give the model it was pruned from")


def fresh_model(meta: dict[str, Any], seed: int) -> nn.Module:
    """The file's architecture with the initial weights `rsedge train --seed seed` gives it
    (train seeds torch, then builds); the global RNG is left as it was."""
    from rsedge.trainer.modelfile import _fresh

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _fresh(meta)


def _regularizer(model: nn.Module, o: SparseOptions, phase_epochs: int, n_phases: int, stage,
                 log: Callable[[str], None]) -> tuple[SparseRegularizer, Callable[[nn.Module, int], None]]:
    """The regularizer (its phases saved to sparse_state.json at every refresh, so --resume
    continues them) and the epoch hook that refreshes and logs it."""
    from rsedge.trainer.records import atomic_write_json, read_json

    state_file = stage.out / "sparse_state.json"
    phases = read_json(state_file)["phases"] if o.resume and state_file.is_file() else None
    reg = SparseRegularizer(model, o.method, sr=o.sr, theta=o.theta, a=o.lambda_a, eps=o.eps,
                            phase_epochs=phase_epochs, threshold=o.threshold, phases=phases,
                            on_refresh=lambda ph: atomic_write_json(state_file, {"phases": ph}))

    def on_epoch_start(m: nn.Module, epoch: int) -> None:
        reg.on_epoch_start(m, epoch)
        rho, _, _ = reg.sparsity()
        if o.method == "l1rr" and epoch % phase_epochs == 0:
            log(f"phase {epoch // phase_epochs + 1}/{n_phases}: model sparsity {rho:.3f}"
                f"{' (unregularized)' if epoch == 0 else ''}")

    return reg, on_epoch_start
