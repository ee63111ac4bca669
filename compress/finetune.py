"""The `finetune` stage: recover the accuracy a pruned model lost, on the same split."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from rsedge.trainer.datasets import check_classes
from rsedge.trainer.modelfile import derive_meta, load_model
from rsedge.trainer.stage import TRAINING_OUTPUTS, Stage, build_options
from rsedge.trainer.tasks import task_for
from rsedge.trainer.train import LossFn, TrainConfig, pick_device

from .losses import adaptive_mining_loss, distillation_loss
from .msb_fixed import check_not_quantized

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


@dataclass
class FinetuneOptions:
    """`rsedge finetune`: the training configuration, the loss, distillation and a preset."""

    cfg: TrainConfig | None = None  # default 5 epochs at lr 0.01
    loss: str = "ce"  # ce (the task's loss) or aml (RemoteTrimmer's adaptive mining loss)
    aml_r: float = 0.4  # weight of the cross-entropy term in AML
    kd_from: str | Path | None = None  # an (unpruned) model file whose logits the student also matches
    kd_temperature: float = 4.0
    kd_weight: float = 0.5  # against (1 - kd_weight) for the hard-label loss
    preset: str | None = None  # "remotetrimmer": the seed paper's optimizer and schedule over `cfg`
    resume: bool = False
    exist_ok: bool = False
    progress: bool = True

    def check(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}")
        if not 0 <= self.kd_weight <= 1:
            raise ValueError(f"--kd-weight must be between 0 and 1, not {self.kd_weight}")
        if self.kd_temperature <= 0:
            raise ValueError(f"--kd-temperature must be positive, not {self.kd_temperature}")


def finetune_run(model_file: str | Path, data: str | Path, out: str | Path, options: FinetuneOptions | None = None,
                 *, log: Callable[[str], None] = print, **fields: Any) -> dict[str, Any]:
    """Fine-tune on the model's own split. A run already in `out` is refused unless `resume`
    (continue it) or `exist_ok` (overwrite it); `fields` replace those of `options`."""
    o = build_options(FinetuneOptions, options, fields)
    cfg = apply_preset(o.cfg or TrainConfig(epochs=5, lr=0.01), o.preset).resolved()
    o.check()
    stage = Stage("finetune", out, resume=o.resume, exist_ok=o.exist_ok, progress=o.progress, log=log)
    done = stage.finished("fine-tuning already finished")
    if done is not None:
        return done
    model, meta = load_model(model_file)
    check_not_quantized(meta, "fine-tune")
    d = stage.data(stage.model_split(meta, data, cfg.seed), meta, cfg)
    loss_fn = adaptive_loss(o.aml_r) if o.loss == "aml" else None
    teacher_info = None
    if o.kd_from is not None:
        loss_fn, teacher_info = distilled_loss(o, meta, cfg, loss_fn or task_for(meta).model_loss(meta, cfg))
    new_meta = derive_meta(
        meta, "finetune",
        history_entry={"epochs": cfg.epochs, "loss": o.loss, "source": str(Path(model_file).resolve()),
                       **({"kd_from": teacher_info["model"]} if teacher_info else {}),
                       **({"preset": o.preset} if o.preset and o.preset != "none" else {})},
        split=str(stage.split_path),
    )
    model, history = stage.fit(model, d, cfg, new_meta, loss_fn=loss_fn)
    test = stage.conclude(model, d, cfg, new_meta, history, f"{meta['arch']} fine-tuned, test split")
    return stage.record({
        "inputs": {"model": str(Path(model_file).resolve()), "data": d.split["root"]},
        "parameters": {"loss": o.loss, "aml_r": o.aml_r if o.loss == "aml" else None, "preset": o.preset,
                       "distillation": teacher_info, **asdict(cfg)},
        "fraction": d.fraction,
        "history": history,
        "test": test,
        "outputs": dict(TRAINING_OUTPUTS),
    })


def adaptive_loss(r: float) -> LossFn:
    return lambda logits, y, x: adaptive_mining_loss(logits, y, r)


def distilled_loss(o: FinetuneOptions, meta: dict[str, Any], cfg: TrainConfig, hard: LossFn
                   ) -> tuple[LossFn, dict[str, Any]]:
    """`hard` mixed with the distillation of the teacher `o.kd_from` (frozen, same classes and
    input size as the student); the loss and the record's description of the teacher."""
    import torch

    teacher, tmeta = load_model(o.kd_from, device=pick_device(cfg.device))
    check_classes(meta["classes"], tmeta["classes"], what=f"teacher {o.kd_from}")
    if list(tmeta["input_size"]) != list(meta["input_size"]):
        raise ValueError(f"teacher input size {tmeta['input_size']} differs from the student's {meta['input_size']}")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def loss_fn(logits, y, x):
        with torch.no_grad():
            t_logits = teacher(x).float()
        return (1 - o.kd_weight) * hard(logits, y, x) + o.kd_weight * distillation_loss(logits, t_logits,
                                                                                        o.kd_temperature)

    info = {"model": str(Path(o.kd_from).resolve()), "arch": tmeta["arch"], "params": tmeta.get("params"),
            "temperature": o.kd_temperature, "weight": o.kd_weight}
    return loss_fn, info
