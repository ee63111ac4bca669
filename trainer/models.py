"""The model registry, timm-style: each architecture is a `ModelSpec` that declares what every
stage needs to know about it (its task, the head modules that are never pruned, its output
names, its constructor arguments, its default input size and normalization), so nothing is
guessed from the layers later.

One `create_model(name, num_classes, weights=PATH, **args)`, as in timm. The torchvision models
are plain modules with the classification head resized, so pruning and export see ordinary
layers. Weights never come from the network: a local file or nothing. A model made here carries
the name of its spec (`model_spec(model)`), as a timm model carries its `pretrained_cfg`: a
name, so the module still pickles whatever its spec's builder is.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .transforms import IMAGENET_MEAN, IMAGENET_STD

MIN_WEIGHTS_FRACTION = 0.9
SPEC_ATTR = "rsedge_arch"
IMAGENET = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


@dataclass(frozen=True)
class ModelSpec:
    """`build(num_classes, **args)` makes the module; `args` are its default constructor
    arguments (a model file stores the ones it was built with as `model_args`). `head` names the
    modules whose outputs are the task's outputs: pruning never removes their channels."""

    name: str
    task: str
    build: Callable[..., nn.Module]
    head: tuple[str, ...]
    outputs: tuple[str, ...] = ("logits",)
    input_size: tuple[int, int] = (224, 224)
    normalization: dict[str, list[float]] = field(default_factory=lambda: dict(IMAGENET))
    args: dict[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec, replace: bool = False) -> ModelSpec:
    """Add `spec` under `spec.name`; a second spec of the same name is an error unless `replace`."""
    if not spec.head:
        raise ValueError(f"model {spec.name!r} declares no head: name the module(s) pruning must keep")
    if spec.name in REGISTRY and not replace:
        raise ValueError(f"model {spec.name!r} is already registered")
    REGISTRY[spec.name] = spec
    return spec


def unregister_model(name: str) -> None:
    REGISTRY.pop(name, None)


def get_spec(name: str) -> ModelSpec:
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return REGISTRY[name]


def list_models() -> list[str]:
    return sorted(REGISTRY)


def model_spec(model: nn.Module) -> ModelSpec | None:
    """The spec a model was made from (None for a module built elsewhere)."""
    return REGISTRY.get(getattr(model, SPEC_ATTR, None) or "")


def head_modules(model: nn.Module, names: Sequence[str] | None = None) -> list[nn.Module]:
    """The modules of the declared head: `names`, or the head of the model's own spec. A name the
    model lacks is an error, as is a module that declares nothing: the head is never guessed."""
    if names is None:
        spec = model_spec(model)
        if spec is None:
            raise ValueError(f"{type(model).__name__} was not made by create_model and declares no head: "
                             f"pass the names of its head modules (e.g. head=['fc'])")
        names = spec.head
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no module {', '.join(missing)} (its declared head)")
    return [modules[n] for n in names]


def _replace_linear(model: nn.Module, name: str, out_features: int) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = model.get_submodule(name)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"the declared head {name} is a {type(old).__name__}, not a Linear layer")
    new = nn.Linear(old.in_features, out_features)
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)


def torchvision_classifier(builder_name: str, head: str) -> Callable[..., nn.Module]:
    """torchvision's `builder_name` (no weights), its ImageNet head `head` resized to
    num_classes outputs; `args` go to torchvision's constructor (`width_mult`, `dropout`...)."""

    def build(num_classes: int, **args: Any) -> nn.Module:
        import torchvision.models as tvm

        model = getattr(tvm, builder_name)(weights=None, **args)
        _replace_linear(model, head, num_classes)
        return model

    build.__doc__ = f"torchvision `{builder_name}` with its head `{head}` resized to num_classes outputs"
    return build


_TORCHVISION_HEADS = {
    "resnet18": "fc",
    "resnet34": "fc",
    "resnet50": "fc",
    "vgg16_bn": "classifier.6",
    "mobilenet_v2": "classifier.1",
    "mobilenet_v3_small": "classifier.3",
    "mobilenet_v3_large": "classifier.3",
    "efficientnet_b0": "classifier.1",
    "efficientnet_b3": "classifier.1",
    "convnext_tiny": "classifier.2",
    # the seed-003 backbones (coresets and compression); regnet_y_3_2gf is below
    "swin_t": "head",
    "efficientnet_v2_s": "classifier.1",
}
for _name, _head in _TORCHVISION_HEADS.items():
    register_model(ModelSpec(_name, "classification", torchvision_classifier(_name, _head), head=(_head,)))


def regnet_y_3_2gf(num_classes: int, **args: Any) -> nn.Module:
    """torchvision's `regnet_y_3_2gf` (no weights), its head `fc` resized. torchvision's builder
    computes the block widths with tensors, which fails on the meta device where `rsedge models`
    counts MACs; here they are computed on the CPU (same constants) and the network is built as
    torchvision builds it, so its state dict loads torchvision's weights."""
    from functools import partial

    from torchvision.models.regnet import BlockParams, RegNet

    with torch.device("cpu"):
        params = BlockParams.from_init_params(depth=21, w_0=80, w_a=42.63, w_m=2.66, group_width=24, se_ratio=0.25)
    args.setdefault("norm_layer", partial(nn.BatchNorm2d, eps=1e-05, momentum=0.1))
    model = RegNet(params, **args)
    _replace_linear(model, "fc", num_classes)
    return model


register_model(ModelSpec("regnet_y_3_2gf", "classification", regnet_y_3_2gf, head=("fc",)))


def create_model(name: str, num_classes: int, weights: str | os.PathLike | None = None,
                 partial_weights: bool = False, **args: Any) -> nn.Module:
    """Build `name` for `num_classes` with the spec's constructor arguments updated by `args`;
    `weights` is a local file (safetensors, or a torch state dict read with weights_only=True)
    such as torchvision's ImageNet weights saved beforehand. Tensors whose shape does not fit
    (the ImageNet head) are left at their initial values."""
    spec = get_spec(name)
    if spec.task == "classification" and num_classes < 2:
        raise ValueError("num_classes must be at least 2")
    model = spec.build(num_classes, **{**spec.args, **args})
    setattr(model, SPEC_ATTR, spec.name)
    head_modules(model)  # a spec whose head names no module of what it builds is a bug of the spec
    if weights is not None:
        load_initial_weights(model, weights, partial=partial_weights, arch=name)
    return model


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a local weights file: safetensors, or a torch state dict (also one nested under
    `state_dict` or `model`, as training scripts save it); anything else is a one-line error that
    says what the file is."""
    from .modelfile import ModelFileError, describe_file

    path = Path(path)
    if path.is_dir() or not path.is_file():
        raise FileNotFoundError(
            f"initial weights file not found: {path} (rsedge never downloads weights; save them locally first)"
        )
    kind = describe_file(path)
    what = "not a weights file (a .safetensors file or a PyTorch state dict saved with torch.save)"
    if path.suffix == ".safetensors" or kind == "a damaged safetensors file":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError: the file is something else or damaged
            raise ModelFileError(f"{path} is {kind}, {what}") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError from the zip reader...
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            if found:
                raise ModelFileError(f"{path} holds pickled Python objects, not only tensors ({found.group(1)}: a "
                                     f"whole model object?): save model.state_dict() instead; rsedge never "
                                     f"unpickles code") from e
            raise ModelFileError(f"{path} is {kind}, {what}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ModelFileError(f"{path} holds no state dict of tensors (found {type(state).__name__})")
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_initial_weights(model: nn.Module, path: str | os.PathLike, partial: bool = False,
                         min_fraction: float = MIN_WEIGHTS_FRACTION, arch: str | None = None) -> dict[str, Any]:
    """Load the tensors of `path` that fit `model` by name and shape. Weights of another
    architecture fit only here and there (a resnet50 file gives a resnet18 its stem and little
    else): below `min_fraction` of the model's tensors, or when that much of the file fits no
    layer, it is an error unless `partial`. The head (resized to the classes) never counts."""
    from .modelfile import EXTRA_PREFIX, ModelFileError

    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(EXTRA_PREFIX)}
    own = model.state_dict()
    spec = model_spec(model)
    head = tuple(f"{n}." for n in spec.head) if spec is not None else ()

    def counts(k: str) -> bool:
        return not k.startswith(head) and not k.endswith("num_batches_tracked")

    counted = [k for k in own if counts(k)]
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    loaded = [k for k in counted if k in usable]
    offered = [k for k in state if counts(k)]
    unused = [k for k in offered if k not in usable]
    report = {"file": str(path), "loaded": len(loaded), "of": len(counted), "unused_in_file": len(unused),
              "head_loaded": bool(head) and any(k.startswith(head) for k in usable), "partial": bool(partial)}
    name = arch or type(model).__name__
    if not usable:
        raise ModelFileError(f"no tensor of {path} fits {name}: is it the same architecture?")
    short = len(loaded) < min_fraction * len(counted) or len(unused) > (1 - min_fraction) * len(offered)
    if short and not partial:
        raise ModelFileError(
            f"{len(loaded)}/{len(counted)} tensors of {name} (head excluded) load from {path}, and "
            f"{len(unused)} of its {len(offered)} fit no layer: weights of another architecture? "
            f"Pass --partial-weights to start from the tensors that fit")
    model.load_state_dict(usable, strict=False)
    fresh = f" (the head `{', '.join(spec.head)}` starts fresh)" if head and not report["head_loaded"] else ""
    report["message"] = (f"initial weights: loaded {len(loaded)}/{len(counted)} tensors of {name} from {path}"
                         + fresh
                         + (f"; {len(unused)} tensor(s) of the file fit no layer" if unused else ""))
    return report


from . import det_models as _det_models  # noqa: E402,F401  (registers the detection specs)
from . import seg_models as _seg_models  # noqa: E402,F401  (registers the segmentation specs)
