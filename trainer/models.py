"""The model registry: torchvision classifiers by name, any number of classes, small inputs.

One `create_model(name, num_classes, weights=PATH)`, as in timm. Models are plain torchvision
modules with the classification head resized, so pruning and export see ordinary layers.
Weights never come from the network: a local file or nothing.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

MIN_WEIGHTS_FRACTION = 0.9


def head_name(model: nn.Module) -> str:
    """The qualified name of the classification head: the last Linear layer, wherever the
    architecture keeps it (`fc`, `classifier.1`, `head.2`...)."""
    for attr in ("fc", "classifier", "head"):
        head = getattr(model, attr, None)
        if isinstance(head, nn.Linear):
            return attr
        if isinstance(head, nn.Sequential):
            for i in range(len(head) - 1, -1, -1):
                if isinstance(head[i], nn.Linear):
                    return f"{attr}.{i}"
    raise ValueError(f"no classification head found on {type(model).__name__}")


def _resize_head(model: nn.Module, num_classes: int) -> nn.Module:
    name = head_name(model)
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, attr) if not attr.isdigit() else parent[int(attr)]
    new = nn.Linear(old.in_features, num_classes)
    if attr.isdigit():
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
    return model


def _tv(builder_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int) -> nn.Module:
        import torchvision.models as tvm

        model = getattr(tvm, builder_name)(weights=None)
        return _resize_head(model, num_classes)

    build.__doc__ = f"torchvision `{builder_name}` with a {builder_name} head of num_classes outputs"
    return build


REGISTRY: dict[str, Callable[..., nn.Module]] = {
    name: _tv(name)
    for name in (
        "resnet18",
        "resnet34",
        "resnet50",
        "vgg16_bn",
        "mobilenet_v2",
        "mobilenet_v3_small",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "efficientnet_b3",
        "convnext_tiny",
    )
}


def list_models() -> list[str]:
    return sorted(REGISTRY)


def create_model(name: str, num_classes: int, weights: str | os.PathLike | None = None,
                 partial_weights: bool = False) -> nn.Module:
    """Build `name` for `num_classes`; `weights` is a local file (safetensors, or a torch state
    dict read with weights_only=True) such as torchvision's ImageNet weights saved beforehand.
    Tensors whose shape does not fit (the ImageNet head) are left at their initial values."""
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    if num_classes < 2:
        raise ValueError("num_classes must be at least 2")
    model = REGISTRY[name](num_classes)
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
    head = head_name(model) + "."
    counted = [k for k in own if not k.startswith(head) and not k.endswith("num_batches_tracked")]
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    loaded = [k for k in counted if k in usable]
    offered = [k for k in state if not k.startswith(head) and not k.endswith("num_batches_tracked")]
    unused = [k for k in offered if k not in usable]
    report = {"file": str(path), "loaded": len(loaded), "of": len(counted), "unused_in_file": len(unused),
              "head_loaded": any(k.startswith(head) for k in usable), "partial": bool(partial)}
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
    report["message"] = (f"initial weights: loaded {len(loaded)}/{len(counted)} tensors of {name} from {path}"
                         + ("" if report["head_loaded"] else f" (the head `{head[:-1]}` starts fresh)")
                         + (f"; {len(unused)} tensor(s) of the file fit no layer" if unused else ""))
    return report
