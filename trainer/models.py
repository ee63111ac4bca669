"""The model registry: torchvision classifiers by name, any number of classes, small inputs.

One `create_model(name, num_classes, weights=PATH)`, as in timm. Models are plain torchvision
modules with the classification head resized, so pruning and export see ordinary layers.
Weights never come from the network: a local file or nothing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn


def _resize_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replace the last Linear layer, wherever the architecture keeps it."""
    for attr in ("fc", "classifier", "head"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        if isinstance(head, nn.Linear):
            setattr(model, attr, nn.Linear(head.in_features, num_classes))
            return model
        if isinstance(head, nn.Sequential):
            for i in range(len(head) - 1, -1, -1):
                if isinstance(head[i], nn.Linear):
                    head[i] = nn.Linear(head[i].in_features, num_classes)
                    return model
    raise ValueError(f"no classification head found on {type(model).__name__}")


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


def create_model(name: str, num_classes: int, weights: str | os.PathLike | None = None) -> nn.Module:
    """Build `name` for `num_classes`; `weights` is a local file (safetensors, or a torch state
    dict read with weights_only=True) such as torchvision's ImageNet weights saved beforehand.
    Tensors whose shape does not fit (the ImageNet head) are left at their initial values."""
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    if num_classes < 2:
        raise ValueError("num_classes must be at least 2")
    model = REGISTRY[name](num_classes)
    if weights is not None:
        load_initial_weights(model, weights)
    return model


def load_initial_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"initial weights file not found: {path} (rsedge never downloads weights; save them locally first)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(k for k in state if k not in usable)
    if not usable:
        raise ValueError(f"no tensor of {path} fits {type(model).__name__}: is it the same architecture?")
    model.load_state_dict(usable, strict=False)
    return {"loaded": sorted(usable), "skipped": skipped}
