"""The host side of a task: everything a stage needs to know that depends on what the model
predicts, so that train, prune, fine-tune and export are written once for every task.

A task answers: which datasets a split makes and how they are batched (`datasets`, `collate`),
the loss that training and the data-driven pruning criteria differentiate (`loss`, as
Torch-Pruning's Taylor importance reads the gradients of the user's own loss), how predictions
are scored (`evaluator`, with one primary metric), which modules are never pruned (`head`, from
the model spec), where L_FA measures the feature attention (`target_regions`), what the exported
graph is called and which axes are dynamic (`export_outputs`, `dynamic_axes`), the rsedge.*
metadata table the device preprocesses with (`preprocess`), and what a bundle stores under
`eval/` (`bundle_eval`). The device has its own half (`rsedge.runtime.tasks`), registered under
the same name and chosen by the model's `rsedge.task` metadata.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..models import REGISTRY, get_spec

INPUT_NAME = "input"
LossFn = Callable[[Any, Any, Any], Any]


class Evaluator(ABC):
    """Accumulates a model's outputs batch by batch; `result()` holds the task's primary metric
    (under its name) and `samples`."""

    @abstractmethod
    def update(self, outputs: Any, targets: Any) -> None: ...

    @abstractmethod
    def result(self) -> dict[str, Any]: ...


def stack_dataset(ds, input_size: Sequence[int], log: Callable[[str], None] = print) -> tuple[np.ndarray, list[Any]]:
    """Every readable (image, target) of a preprocessing dataset as one float32 NCHW array and a
    list; an image that became unreadable after the split is skipped and counted, as at split time."""
    from rsedge.trainer.datasets import SkipUnreadable, Unreadable

    view = SkipUnreadable(ds)
    samples = [view[i] for i in range(len(view))]
    bad = [s for s in samples if isinstance(s, Unreadable)]
    if bad:
        log(f"warning: {len(bad)} image(s) unreadable since the split was made, skipped, e.g. {bad[0].path}")
    good = [s for s in samples if not isinstance(s, Unreadable)]
    if not good:
        return np.zeros((0, 3, *input_size), np.float32), []
    xs, ys = zip(*good)
    return np.stack([x.numpy() for x in xs]).astype(np.float32), list(ys)


def percent(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def per_class_lines(per_class: dict[str, dict[str, Any]], columns: Sequence[tuple[str, str]]) -> list[str]:
    """One summary line per class: `columns` are (label, key) of its row, printed as percentages."""
    width = max((len(c) for c in per_class), default=0)
    return [f"  {name:<{width}}  " + "  ".join(f"{label} {percent(row.get(key))}" for label, key in columns)
            for name, row in per_class.items()]


class Task(ABC):
    name = "?"
    primary_metric = "top1"
    higher_is_better = True
    agreement_name = "top-1 agreement"  # what the export's parity calls the task's agreement
    outputs: tuple[str, ...] = ("logits",)  # output names of a model whose spec is not registered
    collate: Callable[[list[Any]], Any] | None = None  # None: torch's default_collate
    record_keys: tuple[str, ...] = ()  # result keys a stage's record keeps; () = primary, samples, skipped
    default_lr: dict[str, float] | None = None  # by optimizer, when --lr is not given (None: TrainConfig's)
    ema_by_default = False  # train with an EMA of the weights unless the user says otherwise
    saves_predictions = False  # `rsedge eval --save-predictions` writes this task's predictions
    lfa_every_head = False  # L_FA reads the input of every head module (detection layers), not the last map

    # -- data ---------------------------------------------------------------------------------
    @abstractmethod
    def eval_dataset(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]):
        """A dataset of (preprocessed image, target) over split items, as the device preprocesses."""

    def train_dataset(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]):
        """The training images, augmented; by default preprocessed as for evaluation."""
        return self.eval_dataset(root, items, meta)

    def datasets(self, split: dict[str, Any], meta: dict[str, Any], augment: bool = True):
        """(train, val, test) datasets of a split; `augment=False` preprocesses training images
        like the others (what a scoring pass reads)."""
        root = split["root"]
        train = self.train_dataset(root, split["train"], meta) if augment else self.eval_dataset(
            root, split["train"], meta)
        return train, self.eval_dataset(root, split["val"], meta), self.eval_dataset(root, split["test"], meta)

    def tensor_dataset(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]):
        """Samples at the model's input size, not augmented: what calibration, the ONNX parity check
        and the INT8 guard stack into one array. By default the evaluation dataset."""
        return self.eval_dataset(root, items, meta)

    # -- splits and folders -------------------------------------------------------------------
    def new_split(self, root: Path, options: Any) -> dict[str, Any]:
        """A new split of the dataset folder `root` (`options`: datasets.SplitOptions)."""
        from ..datasets import make_split

        return make_split(root, val=options.val, test=options.test, seed=options.seed, progress=options.progress)

    def check_split(self, split: dict[str, Any], root: Path) -> None:
        """An earlier split of `root` still fits it (same classes, no image gone); raises otherwise."""
        from ..datasets import check_folder_split

        check_folder_split(split, root)

    def scan_folder(self, meta: dict[str, Any], root: Path) -> list:
        """Every item of a folder the model was not trained on, its classes checked against the model's."""
        from ..datasets import check_classes, scan_image_folder

        classes, samples = scan_image_folder(root)
        check_classes(meta["classes"], classes, what=f"folder {root}")
        return samples

    def split_meta(self, split: dict[str, Any], options: Any) -> dict[str, Any]:
        """What a model trained on `split` stores about its data besides the classes (segmentation:
        colours, ignore label, layout, window overlap); `options`: the run's run.TrainOptions."""
        return {}

    def check_input_size(self, size: Sequence[int]) -> None:
        """Refuse an input size the task's models cannot take, before any data is read (by
        default every size is taken)."""
        return None

    # -- training and scoring -----------------------------------------------------------------
    @abstractmethod
    def loss(self, outputs: Any, targets: Any, inputs: Any) -> Any:
        """A scalar tensor; what fit, Taylor and CAP differentiate."""

    def training_loss(self, cfg: Any) -> LossFn:
        """The loss under a training configuration (e.g. label smoothing); by default `loss`."""
        return self.loss

    def model_loss(self, meta: dict[str, Any], cfg: Any = None) -> LossFn:
        """The loss of one model (a detector's depends on its anchors): what every stage trains and
        scores with; `cfg` None: the plain loss, as Taylor and CAP differentiate it."""
        return self.training_loss(cfg) if cfg is not None else self.loss

    def fit_model_args(self, meta: dict[str, Any], train_ds, log: Callable[[str], None]) -> dict[str, Any]:
        """The constructor arguments of a model trained from scratch on `train_ds`, fitted to the
        data where the task has any (a detector's anchors); by default `meta["model_args"]`."""
        return dict(meta.get("model_args") or {})

    @abstractmethod
    def evaluator(self, meta: dict[str, Any]) -> Evaluator: ...

    def training_evaluator(self, meta: dict[str, Any]) -> Evaluator:
        """The running metric of training batches (a cheaper one may skip what only a report needs)."""
        return self.evaluator(meta)

    def predictor(self, meta: dict[str, Any]) -> Callable[[Any, Any], Any]:
        """predict(model, inputs) -> outputs the evaluator reads; by default one forward pass
        (segmentation: sliding windows over whole images)."""
        return lambda model, inputs: model(inputs)

    def eval_batch_size(self, requested: int) -> int:
        """Images per evaluation batch (whole aerial tiles are large: segmentation takes a few)."""
        return requested

    def metric_key(self, part: str) -> str:
        """The key of the primary metric of `part` (train, val, test) in histories and metrics."""
        return f"{part}_{self.primary_metric}"

    def record_result(self, result: dict[str, Any]) -> dict[str, Any]:
        keys = self.record_keys or (self.primary_metric, "samples", "skipped_images")
        return {k: result[k] for k in keys if k in result}

    def summary(self, result: dict[str, Any]) -> str:
        return f"{self.primary_metric}: {result[self.primary_metric]:.4f} ({result.get('samples', 0)} images)"

    def write_eval_outputs(self, out: Path, result: dict[str, Any], meta: dict[str, Any], title: str) -> None:
        from ..records import atomic_write_json

        atomic_write_json(Path(out) / "metrics.json", result)

    def save_predictions(self, directory: Path, result: dict[str, Any], meta: dict[str, Any], dataset,
                         items: Sequence[Sequence[Any]], log: Callable[[str], None]) -> dict[str, Any]:
        """Write the evaluation's predictions where other tools can score them; {"predictions": path, ...}.
        Only a task with `saves_predictions` does."""
        raise NotImplementedError(f"the {self.name} task writes no predictions on the host")

    # -- compression --------------------------------------------------------------------------
    def head(self, meta: dict[str, Any]) -> tuple[str, ...]:
        """Module names pruning keeps whole: the head the model's spec declares."""
        return get_spec(meta["arch"]).head

    def target_regions(self, feature_model, images, targets):
        """{0,1} masks at the feature map's size where L_FA measures attention (`--target-lfa`)."""
        raise NotImplementedError(f"the {self.name} task defines no target regions: --target-lfa needs them")

    # -- export and the device ----------------------------------------------------------------
    def export_module(self, model, meta: dict[str, Any]):
        """The module the ONNX graph is written from (a detector appends its box decode)."""
        return model

    def export_outputs(self, meta: dict[str, Any]) -> list[str]:
        """The output names the model's spec declares (the task's own for an unregistered module)."""
        spec = REGISTRY.get(meta.get("arch", ""))
        return list(spec.outputs if spec is not None else self.outputs)

    def dynamic_axes(self, meta: dict[str, Any], dynamic_batch: bool) -> dict[str, dict[int, str]]:
        """ONNX dynamic axes by tensor name: the batch of the input and of every output."""
        if not dynamic_batch:
            return {}
        return {name: {0: "batch"} for name in [INPUT_NAME, *self.export_outputs(meta)]}

    def preprocess(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The rsedge.* table (without the prefix): what the device needs to preprocess and to
        read the outputs with no other file. ONNX metadata_props and a bundle's preprocess.json
        are both written from it."""
        return {
            "task": self.name,
            "classes": list(meta["classes"]),
            "input_size": list(meta["input_size"]),
            "mean": list(meta["normalization"]["mean"]),
            "std": list(meta["normalization"]["std"]),
            "layout": "NCHW",
            "color": "RGB",
            "resize": "resize",
        }

    def device_targets(self, targets: list[Any]) -> Any:
        """Targets from `stack_dataset` as the device task's accumulator reads them (by default
        one array: class ids, or masks)."""
        if targets and hasattr(targets[0], "numpy"):
            return np.stack([t.numpy() for t in targets])
        return np.asarray(targets)

    @abstractmethod
    def bundle_eval(self, root: str | os.PathLike, items: Sequence[Sequence[Any]], meta: dict[str, Any]
                    ) -> dict[str, Any]:
        """{"images": float32 NCHW array, "targets": {file name: array}}: saved under eval/ of a
        bundle, where the device task's `load_targets` reads them."""
