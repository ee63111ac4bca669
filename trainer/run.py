"""The `train` and `eval` stages: a data folder and a run directory in, a model file and a
record out."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .datasets import resolve_split
from .modelfile import load_model, read_metadata
from .models import create_model, get_spec
from .records import write_record
from .sampling import check_fraction, fraction_info, stratified_fraction
from .stage import (
    TRAINING_OUTPUTS,
    Stage,
    build_options,
    evaluate_model,
    model_split,
    open_run_dir,
    readable,
    split_for_model,
)
from .tasks import get_task, task_for
from .train import TrainConfig, seed_everything

__all__ = ["EvalOptions", "TrainOptions", "eval_run", "open_run_dir", "split_for_model", "train_run"]


@dataclass
class TrainOptions:
    """`rsedge train`: everything but the data folder, the architecture and the run directory."""

    img_size: int = 64
    cfg: TrainConfig | None = None
    weights: str | None = None  # initial weights: a local file, never downloaded
    partial_weights: bool = False  # accept `weights` of which less than 90 % fits the model
    val: float = 0.1
    test: float = 0.2
    split_file: str | None = None  # reuse this split instead of making one
    layout: dict[str, Any] | None = None  # segmentation: {"images", "masks", "colormap"} (None: by convention)
    overlap: int | None = None  # segmentation: pixels shared by neighbouring windows (None: a quarter of the side)
    mosaic: float = 0.0  # detection: probability of a four-image mosaic per training sample
    model_args: dict[str, Any] | None = None  # constructor arguments over the spec's (detection: {"act": "relu"})
    resume: bool = False
    exist_ok: bool = False  # overwrite a run already in the folder (else refused unless `resume`)
    progress: bool = True


def train_run(data: str | Path, model_name: str, out: str | Path, options: TrainOptions | None = None, *,
              log: Callable[[str], None] = print, **fields: Any) -> dict[str, Any]:
    """Train `model_name` on a new split of `data` (or `split_file`), test it, save it; `fields`
    replace those of `options`."""
    o = build_options(TrainOptions, options, fields)
    cfg = (o.cfg or TrainConfig()).resolved()
    task = get_task(get_spec(model_name).task)
    task.check_input_size((o.img_size, o.img_size))
    initial = None
    if o.weights is not None:  # a wrong file is refused before the images are scanned
        initial = check_initial_weights(model_name, o.weights, o.partial_weights)
    stage = Stage("train", out, resume=o.resume, exist_ok=o.exist_ok, progress=o.progress, log=log)
    done = stage.finished("training already finished (delete it to train again)")
    if done is not None:
        return done
    split = resolve_split(data, stage.out, o.split_file, val=o.val, test=o.test, seed=cfg.seed, progress=o.progress,
                          task=task, layout=o.layout)
    if split["skipped"]:
        log(f"warning: {len(split['skipped'])} unreadable image(s) skipped; listed in {stage.out / 'split.json'}")
    meta = new_model_meta(model_name, split, o, stage, cfg.epochs)
    d = stage.data(split, meta, cfg)
    meta["model_args"] = task.fit_model_args(meta, d.train, log)
    train_n = (f"{len(d.train)} windows of {len(d.split['train'])} images" if len(d.train) != len(d.split["train"])
               else len(d.train))
    log(f"data: {len(meta['classes'])} classes, train {train_n} / val {len(d.val)} / test {len(d.test)}")
    seed_everything(cfg.seed)  # the initial weights are part of what --seed fixes
    model = create_model(model_name, len(meta["classes"]), o.weights, partial_weights=o.partial_weights,
                         **meta["model_args"])
    if initial is not None:
        log(initial.pop("message"))
    model, history = stage.fit(model, d, cfg, meta)
    test = stage.conclude(model, d, cfg, meta, history, f"{model_name} test split")
    return stage.record({
        "inputs": {"data": split["root"], "model": model_name, "initial_weights": o.weights},
        "initial_weights": initial,
        "parameters": {"img_size": o.img_size, "layout": o.layout, "overlap": meta.get("overlap"),
                       "mosaic": meta.get("mosaic"), "model_args": meta["model_args"], **asdict(cfg)},
        "split": {"file": "split.json", "counts": split["counts"], "skipped": len(split["skipped"]),
                  "seed": split["seed"]},
        "fraction": d.fraction,
        "history": history,
        "test": test,
        "params": int(read_metadata(stage.model_path)["params"]),
        "outputs": {**TRAINING_OUTPUTS, "metrics": "metrics.json"},
    })


def new_model_meta(model_name: str, split: dict[str, Any], o: TrainOptions, stage: Stage, epochs: int
                   ) -> dict[str, Any]:
    """The metadata of a model trained from scratch: its spec's task, arguments and normalization,
    and what its task keeps of the split (segmentation: colours, ignore label, layout, overlap)."""
    spec = get_spec(model_name)
    img_size, weights = o.img_size, o.weights
    task = get_task(spec.task)
    return {
        "arch": model_name,
        "task": task.name,
        "model_args": {**spec.args, **(o.model_args or {})},
        "classes": split["classes"],
        "input_size": [img_size, img_size],
        "normalization": {"mean": list(spec.normalization["mean"]), "std": list(spec.normalization["std"])},
        "data_root": split["root"],
        "split": str(stage.split_path),
        "history": [{"stage": "train", "epochs": epochs, "initial_weights": weights}],
        **task.split_meta(split, o),
    }


def check_initial_weights(model_name: str, weights: str | Path, partial: bool) -> dict[str, Any]:
    """Load `weights` into a throw-away instance (two classes: the head does not count), so a
    file that is no weights file, or weights of another architecture, fail in a second."""
    import torch

    from .models import load_initial_weights

    with torch.random.fork_rng(devices=[]):
        return load_initial_weights(create_model(model_name, 2), weights, partial=partial, arch=model_name)


@dataclass
class EvalOptions:
    """`rsedge eval`: which images (`part`, `fraction`, `seed`) and how to run the model."""

    part: str = "auto"  # auto: the model's test split when the folder is its own, else every image
    batch_size: int = 128
    workers: int = 1
    device: str = "auto"
    progress: bool = True
    fraction: float = 1.0
    seed: int = 0
    save_predictions: str | Path | None = None  # detection: COCO predictions.json + ground_truth.json here


RAW_RESULT_KEYS = ("examples", "detections", "truths")  # per-image data the figures read, not a record's


def eval_run(model_file: str | Path, data: str | Path, out: str | Path | None = None,
             options: EvalOptions | None = None, *, log: Callable[[str], None] = print,
             **fields: Any) -> dict[str, Any]:
    """Evaluate on the model's own test split when `data` is the folder it was trained on
    (`part=auto`), otherwise on every image of `data` (a separate test set); `fraction`: on a
    stratified part of those images."""
    o = build_options(EvalOptions, options, fields)
    check_fraction(o.fraction)
    model, meta = load_model(model_file)
    root, part, items = eval_items(meta, data, o.part, o.progress, log)
    sampled = None
    if o.fraction < 1:
        items, total = stratified_fraction(items, o.fraction, o.seed), items
        sampled = fraction_info(o.fraction, o.seed, items, total, meta["classes"])
        log(f"--fraction {o.fraction:g}: {len(items)} of {len(total)} images, stratified by class (seed {o.seed})")
    task = task_for(meta)
    if o.save_predictions is not None and not task.saves_predictions:
        raise ValueError(f"rsedge eval --save-predictions is for detection; a {task.name} model's predictions are "
                         f"written by rsedge-bench --save-predictions on its bundle")
    dataset = task.eval_dataset(root, items, meta)
    result = evaluate_model(model, dataset, meta, o.device, o.batch_size, o.workers, o.progress, log=log)
    result["split"] = part
    if o.save_predictions is not None:
        saved = task.save_predictions(Path(o.save_predictions), result, meta, dataset, items, log)
        log(f"predictions written to {saved['predictions']} (and {saved['ground_truth']})")
    if sampled is not None:
        result["fraction"] = sampled
    log(task.summary(result))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        task.write_eval_outputs(out, result, meta, f"{meta['arch']} ({part})")
        write_record(out, "eval", {"inputs": {"model": str(Path(model_file).resolve()), "data": str(root)},
                                   "split": part,
                                   "result": {k: v for k, v in result.items() if k not in RAW_RESULT_KEYS}})
    return result


def eval_items(meta: dict[str, Any], data: str | Path, part: str, progress: bool, log: Callable[[str], None]
               ) -> tuple[Path, str, list]:
    """(folder, part, items) `eval` reads: `part` of the model's own split, or every readable
    image of the folder ("all"; what `auto` means for a folder the model was not trained on)."""
    root = Path(data).resolve()
    samples = task_for(meta).scan_folder(meta, root)
    split = model_split(meta, root)
    if part == "auto":
        part = "test" if split is not None else "all"
    if part == "all":
        return root, part, readable(root, samples, progress, log)
    if split is None:
        raise ValueError(f"--split {part} needs the model's split file for {root}; use --split all")
    return root, part, split[part]
