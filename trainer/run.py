"""The `train` and `eval` stages: a data folder and a run directory in, a model file and a
record out."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .datasets import ImageListDataset, check_classes, load_split, resolve_split, scan_image_folder
from .metrics import plot_confusion
from .modelfile import load_model, read_metadata, save_model
from .models import create_model
from .records import RUN_MARKERS, atomic_write_json, prepare_run_dir, write_record
from .sampling import check_fraction, fraction_info, stratified_fraction, subsample_dataset
from .train import TrainConfig, evaluate, fit, pick_device, seed_everything
from .transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform


def datasets_for(split: dict[str, Any], input_size, normalization, augment: bool = True):
    mean, std = normalization["mean"], normalization["std"]
    root = split["root"]
    tf_train = train_transform(input_size, mean, std) if augment else eval_transform(input_size, mean, std)
    tf_eval = eval_transform(input_size, mean, std)
    return (
        ImageListDataset(root, split["train"], tf_train),
        ImageListDataset(root, split["val"], tf_eval),
        ImageListDataset(root, split["test"], tf_eval),
    )


def write_eval_outputs(out: Path, result: dict[str, Any], classes, title: str) -> None:
    atomic_write_json(out / "metrics.json", result)
    plot_confusion(np.asarray(result["confusion"]), classes, out / "confusion.png", title)


def format_per_class(result: dict[str, Any]) -> str:
    width = max(len(c) for c in result["per_class"])
    lines = [f"top-1 accuracy: {result['top1']:.4f} ({result['samples']} images)"]
    for name, acc in result["per_class"].items():
        lines.append(f"  {name:<{width}}  {'n/a' if acc is None else f'{acc:.4f}'}")
    return "\n".join(lines)


def split_for_model(
    meta: dict[str, Any],
    data: str | Path,
    out: str | Path,
    seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The split the model was trained on when `data` is that folder (so a later stage never
    trains on the model's test images), otherwise a new one; either way written to `out` and
    checked against the model's classes."""
    split_file = meta.get("split")
    if split_file and Path(split_file).is_file() and Path(load_split(split_file)["root"]) != Path(data).resolve():
        log(f"{data} is not the folder the model was trained on: making a new split")
        split_file = None
    split = resolve_split(data, out, split_file, seed=seed, progress=progress)
    check_classes(meta["classes"], split["classes"], what=f"folder {split['root']}")
    return split


def train_run(
    data: str | Path,
    model_name: str,
    out: str | Path,
    img_size: int = 64,
    cfg: TrainConfig | None = None,
    weights: str | None = None,
    val: float = 0.1,
    test: float = 0.2,
    split_file: str | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    exist_ok: bool = False,
    partial_weights: bool = False,
) -> dict[str, Any]:
    """`exist_ok`: overwrite a run already in `out` (else refused unless `resume`);
    `partial_weights`: accept `weights` of which less than 90 % fits the model."""
    cfg = (cfg or TrainConfig()).resolved()
    if weights is not None:  # a wrong file is refused before the images are scanned
        initial = check_initial_weights(model_name, weights, partial_weights)
    out = open_run_dir(out, resume=resume, exist_ok=exist_ok, log=log)
    final = out / "model.safetensors"
    if resume and final.is_file() and (out / "record.json").is_file():
        log(f"{final} exists: training already finished (delete it to train again)")
        from .records import read_json

        return read_json(out / "record.json")
    split = resolve_split(data, out, split_file, val=val, test=test, seed=cfg.seed, progress=progress)
    if split["skipped"]:
        log(f"warning: {len(split['skipped'])} unreadable image(s) skipped; listed in {out / 'split.json'}")
    classes = split["classes"]
    norm = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    size = [img_size, img_size]
    train_ds, val_ds, test_ds = datasets_for(split, size, norm)
    train_ds, fraction = subsample_dataset(train_ds, cfg.fraction, cfg.seed, classes, log)
    log(f"data: {len(classes)} classes, train {len(train_ds)} / val {len(val_ds)} / test {len(test_ds)}")
    seed_everything(cfg.seed)  # the initial weights are part of what --seed fixes
    model = create_model(model_name, len(classes), weights, partial_weights=partial_weights)
    if weights is not None:
        log(initial.pop("message"))
    meta = {
        "arch": model_name,
        "classes": classes,
        "input_size": size,
        "normalization": norm,
        "data_root": split["root"],
        "split": str((out / "split.json").resolve()),
        "history": [{"stage": "train", "epochs": cfg.epochs, "initial_weights": weights}],
    }
    model, history = fit(model, train_ds, val_ds, cfg, out, meta, resume=resume, progress=progress, log=log)
    device = pick_device(cfg.device)
    result = evaluate(model, test_ds, classes, device, workers=cfg.workers, log=log)
    meta["metrics"] = {"test_top1": result["top1"], "val_top1": history[-1]["val_top1"] if history else None}
    save_model(final, model.cpu(), meta)
    write_eval_outputs(out, result, classes, f"{model_name} test split")
    log(format_per_class(result))
    record = {
        "inputs": {"data": split["root"], "model": model_name, "initial_weights": weights},
        "initial_weights": initial if weights is not None else None,
        "parameters": {"img_size": img_size, **asdict(cfg)},
        "split": {"file": "split.json", "counts": split["counts"], "skipped": len(split["skipped"]),
                  "seed": split["seed"]},
        "fraction": fraction,
        "history": history,
        "test": {k: result[k] for k in ("top1", "samples", "per_class", "skipped_images")},
        "params": meta_params(final),
        "outputs": {"model": final.name, "confusion": "confusion.png", "metrics": "metrics.json",
                    "results": "results.csv", "curves": "results.png"},
    }
    write_record(out, "train", record)
    (out / "checkpoint.safetensors").unlink(missing_ok=True)
    return record


def check_initial_weights(model_name: str, weights: str | Path, partial: bool) -> dict[str, Any]:
    """Load `weights` into a throw-away instance (two classes: the head does not count), so a
    file that is no weights file, or weights of another architecture, fail in a second."""
    import torch

    from .models import load_initial_weights

    with torch.random.fork_rng(devices=[]):
        return load_initial_weights(create_model(model_name, 2), weights, partial=partial, arch=model_name)


def open_run_dir(out: str | Path, resume: bool = False, exist_ok: bool = False,
                 log: Callable[[str], None] = print) -> Path:
    """`prepare_run_dir` (a run already there is refused unless `resume` or `exist_ok`); an
    accepted overwrite first removes the previous run's model, checkpoint, record and split, so a
    new run that fails early is never mistaken for the old one, nor resumes from it."""
    out = prepare_run_dir(out, resume=resume, exist_ok=exist_ok)
    if exist_ok and not resume:
        old = [out / m for m in RUN_MARKERS if (out / m).exists()]
        if old and (out / "split.json").is_file():
            old.append(out / "split.json")
        for f in old:
            f.unlink()
        if old:
            log(f"--exist-ok: removed the previous run's {', '.join(f.name for f in old)} from {out}")
    return out


def meta_params(path: Path) -> int:
    return int(read_metadata(path)["params"])


def eval_run(
    model_file: str | Path,
    data: str | Path,
    out: str | Path | None = None,
    part: str = "auto",
    batch_size: int = 128,
    workers: int = 1,
    device: str = "auto",
    progress: bool = True,
    log: Callable[[str], None] = print,
    fraction: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate on the model's own test split when `data` is the folder it was trained on
    (`part=auto`), otherwise on every image of `data` (a separate test set); `fraction`: on a
    stratified part of those images."""
    check_fraction(fraction)
    model, meta = load_model(model_file)
    root = Path(data).resolve()
    classes_here, samples = scan_image_folder(root)
    check_classes(meta["classes"], classes_here, what=f"folder {root}")
    split = None
    if meta.get("split") and Path(meta["split"]).is_file():
        split = load_split(meta["split"])
        if Path(split["root"]) != root:
            split = None
    if part == "auto":
        part = "test" if split is not None else "all"
    if part == "all":
        items = samples
        from .datasets import find_corrupt

        bad = find_corrupt(root, samples, progress)
        if bad:
            log(f"warning: {len(bad)} unreadable image(s) skipped, e.g. {next(iter(bad))}")
        items = [s for s in samples if s[0] not in bad]
    else:
        if split is None:
            raise ValueError(f"--split {part} needs the model's split file for {root}; use --split all")
        items = split[part]
    sampled = None
    if fraction < 1:
        items, total = stratified_fraction(items, fraction, seed), items
        sampled = fraction_info(fraction, seed, items, total, meta["classes"])
        log(f"--fraction {fraction:g}: {len(items)} of {len(total)} images, stratified by class (seed {seed})")
    ds = ImageListDataset(root, items, eval_transform(meta["input_size"], **meta["normalization"]))
    result = evaluate(model, ds, meta["classes"], pick_device(device), batch_size, workers, progress, log=log)
    result["split"] = part
    if sampled is not None:
        result["fraction"] = sampled
    log(format_per_class(result))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_eval_outputs(out, result, meta["classes"], f"{meta['arch']} ({part})")
        write_record(out, "eval", {"inputs": {"model": str(Path(model_file).resolve()), "data": str(root)},
                                   "split": part, "result": result})
    return result
