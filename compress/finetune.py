"""The `finetune` stage: recover the accuracy a pruned model lost, on the same split."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from rsedge.trainer.datasets import check_classes
from rsedge.trainer.modelfile import derive_meta, load_model, save_model
from rsedge.trainer.records import read_json, write_record
from rsedge.trainer.run import datasets_for, format_per_class, open_run_dir, split_for_model, write_eval_outputs
from rsedge.trainer.sampling import subsample_dataset
from rsedge.trainer.train import TrainConfig, evaluate, fit, pick_device

from .losses import adaptive_mining_loss, distillation_loss

LOSSES = ("ce", "aml")
PRESETS = {
    # RemoteTrimmer's fine-tuning (seed 000, section III-A): SGD, lr 1e-3, decayed by 0.9 at
    # 50 % and 75 % of the epochs
    "remotetrimmer": {"optimizer": "sgd", "lr": 1e-3, "schedule": "step", "step_milestones": (0.5, 0.75),
                      "step_gamma": 0.9},
}


def apply_preset(cfg: TrainConfig, preset: str | None) -> TrainConfig:
    if not preset or preset == "none":
        return cfg
    if preset not in PRESETS:
        raise ValueError(f"unknown schedule preset {preset!r}; known: {', '.join(PRESETS)}")
    return TrainConfig(**{**asdict(cfg), **PRESETS[preset]})


def finetune_run(
    model_file: str | Path,
    data: str | Path,
    out: str | Path,
    cfg: TrainConfig | None = None,
    loss: str = "ce",
    aml_r: float = 0.4,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    kd_from: str | Path | None = None,
    kd_temperature: float = 4.0,
    kd_weight: float = 0.5,
    preset: str | None = None,
    exist_ok: bool = False,
) -> dict[str, Any]:
    """`kd_from`: an (unpruned) model file whose logits the student also matches, with weight
    `kd_weight` against (1 - kd_weight) for the hard-label loss. `preset="remotetrimmer"` sets
    the seed paper's optimizer and schedule over `cfg`. A run already in `out` is refused unless
    `resume` (continue it) or `exist_ok` (overwrite it)."""
    cfg = apply_preset(cfg or TrainConfig(epochs=5, lr=0.01), preset).resolved()
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}")
    if not 0 <= kd_weight <= 1:
        raise ValueError(f"--kd-weight must be between 0 and 1, not {kd_weight}")
    if kd_temperature <= 0:
        raise ValueError(f"--kd-temperature must be positive, not {kd_temperature}")
    out = open_run_dir(out, resume=resume, exist_ok=exist_ok, log=log)
    final = out / "model.safetensors"
    if resume and final.is_file() and (out / "record.json").is_file():
        log(f"{final} exists: fine-tuning already finished")
        return read_json(out / "record.json")
    model, meta = load_model(model_file)
    split = split_for_model(meta, data, out, seed=cfg.seed, progress=progress, log=log)
    train_ds, val_ds, test_ds = datasets_for(split, meta["input_size"], meta["normalization"])
    train_ds, fraction = subsample_dataset(train_ds, cfg.fraction, cfg.seed, meta["classes"], log)
    loss_fn = None
    if loss == "aml":
        loss_fn = lambda logits, y, x: adaptive_mining_loss(logits, y, aml_r)  # noqa: E731
    teacher_info = None
    if kd_from is not None:
        import torch
        import torch.nn.functional as F

        teacher, tmeta = load_model(kd_from, device=pick_device(cfg.device))
        check_classes(meta["classes"], tmeta["classes"], what=f"teacher {kd_from}")
        if list(tmeta["input_size"]) != list(meta["input_size"]):
            raise ValueError(f"teacher input size {tmeta['input_size']} differs from the student's "
                             f"{meta['input_size']}")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        hard = loss_fn or (lambda logits, y, x: F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing))

        def loss_fn(logits, y, x):
            with torch.no_grad():
                t_logits = teacher(x).float()
            return (1 - kd_weight) * hard(logits, y, x) + kd_weight * distillation_loss(logits, t_logits,
                                                                                        kd_temperature)

        teacher_info = {"model": str(Path(kd_from).resolve()), "arch": tmeta["arch"], "params": tmeta.get("params"),
                        "temperature": kd_temperature, "weight": kd_weight}
    new_meta = derive_meta(
        meta, "finetune",
        history_entry={"epochs": cfg.epochs, "loss": loss, "source": str(Path(model_file).resolve()),
                       **({"kd_from": teacher_info["model"]} if teacher_info else {}),
                       **({"preset": preset} if preset and preset != "none" else {})},
        split=str((out / "split.json").resolve()),
    )
    model, history = fit(model, train_ds, val_ds, cfg, out, new_meta, resume=resume, loss_fn=loss_fn,
                         progress=progress, log=log)
    result = evaluate(model, test_ds, meta["classes"], pick_device(cfg.device), workers=cfg.workers, log=log)
    new_meta["metrics"] = {"test_top1": result["top1"], "val_top1": history[-1]["val_top1"] if history else None}
    save_model(final, model.cpu(), new_meta)
    write_eval_outputs(out, result, meta["classes"], f"{meta['arch']} fine-tuned, test split")
    log(format_per_class(result))
    record = {
        "inputs": {"model": str(Path(model_file).resolve()), "data": split["root"]},
        "parameters": {"loss": loss, "aml_r": aml_r if loss == "aml" else None, "preset": preset,
                       "distillation": teacher_info, **asdict(cfg)},
        "fraction": fraction,
        "history": history,
        "test": {k: result[k] for k in ("top1", "samples", "per_class", "skipped_images")},
        "outputs": {"model": final.name, "confusion": "confusion.png", "results": "results.csv",
                    "curves": "results.png"},
    }
    write_record(out, "finetune", record)
    (out / "checkpoint.safetensors").unlink(missing_ok=True)
    return record
