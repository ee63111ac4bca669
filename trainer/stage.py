"""The skeleton every stage shares, written once: the run directory (refused, resumed or
overwritten), the model's own split, the task's datasets, training, the evaluation on the test
split, the saved model and the record.

`train`, `sparse-train` and `finetune` are a `Stage` with a different model and loss; `prune`
and `export` use the run directory and the split resolution of this module. A new task changes
none of it: what depends on the task (datasets, evaluator, summary, eval outputs) is asked of
`task_for(meta)`.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from .datasets import check_classes, find_corrupt, load_split, resolve_split
from .records import read_json, write_record

Log = Callable[[str], None]
Options = TypeVar("Options")


def build_options(cls: type[Options], given: Options | None, fields: dict[str, Any]) -> Options:
    """`given` (or the defaults of `cls`) with `fields` replaced. A stage takes one options
    object, the CLI builds it; keyword arguments name the fields a script or a test changes."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TypeError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    return dataclasses.replace(given if given is not None else cls(), **fields)


# -- the run directory ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RunDirKind:
    """What makes a folder hold a finished or started run of some kind, so that it is never
    silently overwritten: a model the user may have paid hours for would be lost."""

    noun: str  # "a run", "an export": in the refusal
    markers: tuple[str, ...]  # glob patterns; any match means the folder holds one
    resumable: bool = True  # whether --resume may continue it
    companions: tuple[str, ...] = ()  # removed with the markers on --exist-ok (a stale split would be reused)
    announce: bool = True  # log what --exist-ok removed


RUN_MARKERS = ("record.json", "model.safetensors", "checkpoint.safetensors")
RUN = RunDirKind("a run", RUN_MARKERS, companions=("split.json",))


def _found(out: Path, patterns: tuple[str, ...]) -> list[Path]:
    seen: dict[str, Path] = {}
    for pattern in patterns:
        for p in sorted(out.glob(pattern)):
            seen.setdefault(p.name, p)
    return list(seen.values())


def open_run_dir(out: str | Path, resume: bool = False, exist_ok: bool = False, log: Log | None = print,
                 kind: RunDirKind = RUN) -> Path:
    """Create the run directory, refusing one that already holds a run of `kind` unless `resume`
    (continue it) or `exist_ok` (overwrite it). An accepted overwrite first removes the previous
    run's files, so a new run that fails early is never mistaken for the old one, nor resumes
    from it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    old = _found(out, kind.markers) if out.is_dir() else []
    if old and not (exist_ok or (resume and kind.resumable)):
        how = "pass --resume to continue it, " if kind.resumable else "pass "
        raise FileExistsError(f"{out} already holds {kind.noun} ({', '.join(p.name for p in old)}): {how}"
                              f"--exist-ok to overwrite it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if exist_ok and not resume and old:
        old += [p for p in _found(out, kind.companions) if p not in old]
        for p in old:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        if kind.announce and log is not None:
            log(f"--exist-ok: removed the previous run's {', '.join(p.name for p in old)} from {out}")
    return out


# -- the model's own split ------------------------------------------------------------------------

def model_split(meta: dict[str, Any], data: str | Path | None = None) -> dict[str, Any] | None:
    """The split the model was trained on (the split.json its metadata names) when that file is
    still there and `data` is None or the folder the split was made for; None otherwise."""
    path = meta.get("split")
    if not path or not Path(path).is_file():
        return None
    split = load_split(path)
    if data is not None and Path(split["root"]) != Path(data).resolve():
        return None
    return split


def split_for_model(meta: dict[str, Any], data: str | Path, out: str | Path, seed: int = 0, progress: bool = True,
                    log: Log = print) -> dict[str, Any]:
    """The split the model was trained on when `data` is that folder (so a later stage never
    trains on the model's test images), otherwise a new one; either way written to `out` and
    checked against the model's classes."""
    own = model_split(meta, data)
    if own is None and model_split(meta) is not None:
        log(f"{data} is not the folder the model was trained on: making a new split")
    from .tasks import task_for

    split = resolve_split(data, out, meta["split"] if own is not None else None, seed=seed, progress=progress,
                          task=task_for(meta), layout=meta.get("data_layout"))
    check_classes(meta["classes"], split["classes"], what=f"folder {split['root']}")
    return split


def readable(root: Path, samples: list, progress: bool = False, log: Log | None = None) -> list:
    """The samples whose image decodes (every one is decoded once)."""
    bad = find_corrupt(root, samples, progress)
    if bad and log is not None:
        log(f"warning: {len(bad)} unreadable image(s) skipped, e.g. {next(iter(bad))}")
    return [s for s in samples if s[0] not in bad]


def folder_items(meta: dict[str, Any], data: str | Path, progress: bool = False, log: Log | None = None
                 ) -> tuple[Path, list]:
    """Every readable image of `data` (a folder the model was not trained on), its classes
    checked against the model's by its task."""
    from .tasks import task_for

    root = Path(data).resolve()
    samples = task_for(meta).scan_folder(meta, root)
    return root, readable(root, samples, progress, log)


def model_items(meta: dict[str, Any], data: str | Path | None, part: str) -> tuple[Path, list] | None:
    """Items of `part` of the model's own split when `data` is None or its folder, otherwise
    every readable image of `data`; None when no images are at hand."""
    split = model_split(meta, data)
    if split is not None and Path(split["root"]).is_dir():
        return Path(split["root"]), split[part]
    if data is None:
        return None
    return folder_items(meta, data)


# -- evaluation -----------------------------------------------------------------------------------

def evaluate_model(model, dataset, meta: dict[str, Any], device: Any = "cpu", batch_size: int = 128,
                   workers: int = 1, progress: bool = False, log: Log | None = print) -> dict[str, Any]:
    """The task's metrics of `model` on `dataset`: the one evaluation every stage runs."""
    from .tasks import task_for
    from .train import evaluate, pick_device

    task = task_for(meta)
    device = pick_device(device) if isinstance(device, str) else device
    return evaluate(model, dataset, task.evaluator(meta), device, task.eval_batch_size(batch_size), workers,
                    progress, log=log, collate=task.collate, predict=task.predictor(meta))


# -- a stage that trains --------------------------------------------------------------------------

@dataclass
class StageData:
    """The datasets a training stage reads: its split's, the training part maybe thinned by
    --fraction (`fraction` says how; None: every training image)."""

    split: dict[str, Any]
    train: Any
    val: Any
    test: Any
    fraction: dict[str, Any] | None


TRAINING_OUTPUTS = {"model": "model.safetensors", "confusion": "confusion.png", "results": "results.csv",
                    "curves": "results.png"}


class Stage:
    """One run of a stage in its run directory: created (or refused, resumed, overwritten) when
    the stage starts; the model file, the evaluation outputs and `record.json` written when it
    ends, the checkpoint removed once the record is on disk."""

    def __init__(self, name: str, out: str | Path, *, resume: bool = False, exist_ok: bool = False,
                 progress: bool = True, log: Log = print, kind: RunDirKind = RUN):
        self.name, self.resume, self.progress, self.log = name, resume, progress, log
        self.out = open_run_dir(out, resume=resume, exist_ok=exist_ok, log=log, kind=kind)
        self.model_path = self.out / "model.safetensors"
        self.split_path = (self.out / "split.json").resolve()

    def finished(self, what: str) -> dict[str, Any] | None:
        """The record of a run that `--resume` finds complete (nothing is redone), else None."""
        if self.resume and self.model_path.is_file() and (self.out / "record.json").is_file():
            self.log(f"{self.model_path} exists: {what}")
            return read_json(self.out / "record.json")
        return None

    def model_split(self, meta: dict[str, Any], data: str | Path, seed: int) -> dict[str, Any]:
        return split_for_model(meta, data, self.out, seed=seed, progress=self.progress, log=self.log)

    def data(self, split: dict[str, Any], meta: dict[str, Any], cfg) -> StageData:
        """The task's datasets of `split`, the training part thinned to `cfg.fraction` first."""
        from .sampling import fraction_of_split
        from .tasks import task_for

        split, fraction = fraction_of_split(split, cfg.fraction, cfg.seed, meta["classes"], self.log)
        train, val, test = task_for(meta).datasets(split, meta)
        return StageData(split, train, val, test, fraction)

    def fit(self, model, data: StageData, cfg, meta: dict[str, Any], **hooks: Any):
        """`fit` in this run directory (its checkpoint, curves and --resume); `hooks`: its
        loss_fn, on_epoch_start, before_step."""
        from .tasks import task_for
        from .train import fit

        return fit(model, data.train, data.val, cfg, self.out, meta, resume=self.resume, progress=self.progress,
                   log=self.log, task=task_for(meta), **hooks)

    def conclude(self, model, data: StageData, cfg, meta: dict[str, Any], history: list[dict[str, Any]],
                 title: str, **metrics: Any) -> dict[str, Any]:
        """Evaluate on the test split, store the metrics in `meta` (with `metrics`), save the
        model, write metrics.json and the task's plots, print the summary; returns the test
        result as the record keeps it."""
        from .modelfile import save_model
        from .tasks import task_for

        task = task_for(meta)
        result = evaluate_model(model, data.test, meta, cfg.device, workers=cfg.workers, log=self.log)
        val_key = task.metric_key("val")
        meta["metrics"] = {task.metric_key("test"): result[task.primary_metric],
                           val_key: history[-1][val_key] if history else None, **metrics}
        save_model(self.model_path, model.cpu(), meta)
        task.write_eval_outputs(self.out, result, meta, title)
        self.log(task.summary(result))
        return task.record_result(result)

    def record(self, record: dict[str, Any]) -> dict[str, Any]:
        """Write record.json; the checkpoint goes only after it, so a crash in between still resumes."""
        write_record(self.out, self.name, record)
        (self.out / "checkpoint.safetensors").unlink(missing_ok=True)
        return record
