"""The `finetune` stage: recover the accuracy a pruned model lost, on the same split."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from rsedge.trainer.datasets import check_classes, load_split, resolve_split
from rsedge.trainer.modelfile import derive_meta, load_model, save_model
from rsedge.trainer.records import read_json, write_record
from rsedge.trainer.run import datasets_for, format_per_class, write_eval_outputs
from rsedge.trainer.train import TrainConfig, evaluate, fit, pick_device

from .losses import adaptive_mining_loss

LOSSES = ("ce", "aml")


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
) -> dict[str, Any]:
    cfg = (cfg or TrainConfig(epochs=5, lr=0.01)).resolved()
    if loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    final = out / "model.safetensors"
    if resume and final.is_file() and (out / "record.json").is_file():
        log(f"{final} exists: fine-tuning already finished")
        return read_json(out / "record.json")
    model, meta = load_model(model_file)
    split_file = meta.get("split")
    if split_file and Path(split_file).is_file() and Path(load_split(split_file)["root"]) != Path(data).resolve():
        log(f"{data} is not the folder the model was trained on: making a new split")
        split_file = None
    split = resolve_split(data, out, split_file, seed=cfg.seed, progress=progress)
    check_classes(meta["classes"], split["classes"], what=f"folder {split['root']}")
    train_ds, val_ds, test_ds = datasets_for(split, meta["input_size"], meta["normalization"])
    loss_fn = None
    if loss == "aml":
        loss_fn = lambda logits, y, x: adaptive_mining_loss(logits, y, aml_r)  # noqa: E731
    new_meta = derive_meta(
        meta, "finetune",
        history_entry={"epochs": cfg.epochs, "loss": loss, "source": str(Path(model_file).resolve())},
        split=str((out / "split.json").resolve()),
    )
    model, history = fit(model, train_ds, val_ds, cfg, out, new_meta, resume=resume, loss_fn=loss_fn,
                         progress=progress, log=log)
    result = evaluate(model, test_ds, meta["classes"], pick_device(cfg.device), workers=cfg.workers)
    new_meta["metrics"] = {"test_top1": result["top1"], "val_top1": history[-1]["val_top1"] if history else None}
    save_model(final, model.cpu(), new_meta)
    write_eval_outputs(out, result, meta["classes"], f"{meta['arch']} fine-tuned, test split")
    log(format_per_class(result))
    record = {
        "inputs": {"model": str(Path(model_file).resolve()), "data": split["root"]},
        "parameters": {"loss": loss, "aml_r": aml_r if loss == "aml" else None, **asdict(cfg)},
        "history": history,
        "test": {k: result[k] for k in ("top1", "samples", "per_class")},
        "outputs": {"model": final.name, "confusion": "confusion.png"},
    }
    write_record(out, "finetune", record)
    (out / "checkpoint.safetensors").unlink(missing_ok=True)
    return record
