"""Pickle-free model files: safetensors weights with the JSON metadata in the same file.

The metadata (architecture, its task and constructor arguments `model_args`, the pruned channel
layout, classes, input size, normalization, metrics, history of stages) lives in the safetensors
header under the key `rsedge`, so one file is written atomically and any safetensors reader can
open it. Loading rebuilds the architecture from the registry with the stored arguments, reshapes
the layers the layout names, and loads the tensors: no code from the file is ever executed.
Files written before `task` and `model_args` were stored load as the spec's task with its
default arguments, which is what they were built with.

Residual reconstruction (L1RR) changes the graph, not only layer widths: an add whose two inputs
keep different channels becomes an `IndexedAdd`. The layout names such modules (a fixed whitelist,
integer arguments only) and the traced node they replace; the loader traces the fresh
architecture with torch.fx, which is deterministic for a given architecture, and re-inserts them.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import SPEC_ATTR, create_model, get_spec
from .records import atomic_write_bytes

FORMAT = "rsedge-model/1"
META_KEY = "rsedge"
REQUIRED_META = ("arch", "classes", "input_size", "normalization")


class ModelFileError(ValueError):
    """A file given as a model (or as initial weights) that is not one rsedge can read: the CLI
    prints it as one line, exit code 2."""


def describe_file(path: str | os.PathLike) -> str:
    """What a file that is not an rsedge model looks like, from its first bytes and its name,
    so the error tells the user what they gave ("an ONNX file"), not a decoder's message."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    suffix = path.suffix.lower()
    if size == 0:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .pt/.pth checkpoint?)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (a PyTorch .pth checkpoint?)"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive (a .tar.gz bundle?)"
    if suffix == ".onnx" or (len(head) > 2 and head[0] == 0x08 and head[1] < 0x20
                             and head[2] in (0x12, 0x1a, 0x22, 0x28, 0x32, 0x3a, 0x42)):
        return "an ONNX file"
    if suffix in (".engine", ".trt", ".plan"):
        return "a TensorRT engine"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"GIF8", b"BM")):
        return "an image"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return "a damaged safetensors file"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file"
    if head and all(32 <= b < 127 or b in (9, 10, 13) for b in head):
        return "a text file"
    return "a file of unknown format"


def _model_path(path: str | os.PathLike, what: str = "model file") -> Path:
    path = Path(path)
    if path.is_dir():
        inner = path / "model.safetensors"
        hint = f": did you mean {inner}?" if inner.is_file() else ""
        raise ModelFileError(f"{path} is a folder, not a {what}{hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def not_a_model(path: str | os.PathLike, error: BaseException | None = None) -> ModelFileError:
    kind = describe_file(path)
    if kind == "a damaged safetensors file":
        return ModelFileError(f"{path} is a damaged or truncated safetensors file ({type(error).__name__}: {error})")
    return ModelFileError(f"{path} is {kind}, not an rsedge model file (.safetensors written by rsedge)")

_CONV_ATTRS = ("in_channels", "out_channels", "groups")


class IndexedAdd(nn.Module):
    """`a + b` for two tensors that hold different subsets of one channel space (L1RR's residual
    reconstruction): the channels both keep are summed, the others are concatenated after them,
    `out = cat(a[a_common] + b[b_common], a[a_only], b[b_only])`. Each input is permuted at most
    once (a Gather with constant indices, skipped when the order already fits) and cut by slices,
    so export sees only Gather, Slice, Add and Concat: no ScatterND, which TensorRT 8.2 handles
    poorly."""

    INDEX_KEYS = ("a_common", "b_common", "a_only", "b_only")

    def __init__(self, a_channels: int, b_channels: int, a_common, b_common, a_only, b_only, node: str = ""):
        super().__init__()
        self.a_channels, self.b_channels, self.node = int(a_channels), int(b_channels), str(node)
        self.index = {k: [int(i) for i in v] for k, v in zip(self.INDEX_KEYS, (a_common, b_common, a_only, b_only))}
        self.common = len(self.index["a_common"])
        if len(self.index["b_common"]) != self.common:
            raise ValueError("IndexedAdd: a_common and b_common must have the same length")
        for side, size in (("a", self.a_channels), ("b", self.b_channels)):
            perm = self.index[f"{side}_common"] + self.index[f"{side}_only"]
            if any(not 0 <= i < size for i in perm):
                raise ValueError(f"IndexedAdd: an index of {side} is outside 0..{size - 1}")
            if sorted(perm) != list(range(size)):
                raise ValueError(f"IndexedAdd: {side}_common and {side}_only must use every channel of {side} once")
            identity = perm == list(range(size))
            setattr(self, f"_{side}_identity", identity)
            if not identity:
                self.register_buffer(f"{side}_order", torch.tensor(perm, dtype=torch.long), persistent=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self._a_identity:
            a = a.index_select(1, self.a_order)
        if not self._b_identity:
            b = b.index_select(1, self.b_order)
        k = self.common
        parts = []
        if k:
            parts.append((a if k == self.a_channels else a[:, :k]) + (b if k == self.b_channels else b[:, :k]))
        if self.index["a_only"]:
            parts.append(a[:, k:])
        if self.index["b_only"]:
            parts.append(b[:, k:])
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    @property
    def gathers(self) -> int:
        return int(not self._a_identity) + int(not self._b_identity)

    @property
    def out_channels(self) -> int:
        return sum(len(self.index[k]) for k in ("a_common", "a_only", "b_only"))

    def config(self) -> dict[str, Any]:
        return {"type": "IndexedAdd", "node": self.node, "a_channels": self.a_channels,
                "b_channels": self.b_channels, **self.index}

    def extra_repr(self) -> str:
        return (f"a={self.a_channels}, b={self.b_channels}, common={self.common}, "
                f"a_only={len(self.index['a_only'])}, b_only={len(self.index['b_only'])}, gathers={self.gathers}")


GRAPH_MODULES: dict[str, type[nn.Module]] = {"IndexedAdd": IndexedAdd}


def _module_config(m: nn.Module) -> dict[str, Any] | None:
    if isinstance(m, nn.Conv2d):
        return {"type": "Conv2d", **{a: getattr(m, a) for a in _CONV_ATTRS}, "bias": m.bias is not None}
    if isinstance(m, nn.BatchNorm2d):
        return {"type": "BatchNorm2d", "num_features": m.num_features}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features}
    if isinstance(m, nn.LayerNorm):
        return {"type": "LayerNorm", "normalized_shape": list(m.normalized_shape)}
    return None


def channel_layout(model: nn.Module, reference: nn.Module) -> dict[str, Any]:
    """What differs from the unpruned architecture: layer configs, and the shapes of any other
    parameter or buffer (e.g. ConvNeXt's layer scale) that pruning resized."""
    ref_modules = dict(reference.named_modules())
    layers = {}
    for name, m in model.named_modules():
        cfg = _module_config(m)
        if cfg is None:
            continue
        ref = ref_modules.get(name)
        if ref is None or _module_config(ref) != cfg:
            layers[name] = cfg
    ref_state = reference.state_dict()
    tensors = {
        k: list(v.shape)
        for k, v in model.state_dict().items()
        if k in ref_state and tuple(ref_state[k].shape) != tuple(v.shape)
    }
    layout: dict[str, Any] = {"layers": layers, "tensors": tensors}
    graph = {name: m.config() for name, m in model.named_modules() if isinstance(m, tuple(GRAPH_MODULES.values()))}
    if graph:
        layout["graph"] = graph
    return layout


def _get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parts = name.split(".")
    parent = model
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1]


def _reshaped(old: nn.Module, cfg: dict[str, Any]) -> nn.Module:
    kind = cfg["type"]
    if kind == "Conv2d":
        assert isinstance(old, nn.Conv2d)
        return nn.Conv2d(
            int(cfg["in_channels"]), int(cfg["out_channels"]), old.kernel_size, old.stride, old.padding,
            old.dilation, int(cfg["groups"]), bool(cfg.get("bias", old.bias is not None)), old.padding_mode,
        )
    if kind == "BatchNorm2d":
        assert isinstance(old, nn.BatchNorm2d)
        return nn.BatchNorm2d(int(cfg["num_features"]), old.eps, old.momentum, old.affine, old.track_running_stats)
    if kind == "Linear":
        assert isinstance(old, nn.Linear)
        return nn.Linear(int(cfg["in_features"]), int(cfg["out_features"]), old.bias is not None)
    if kind == "LayerNorm":
        assert isinstance(old, nn.LayerNorm)
        new = type(old)(tuple(int(x) for x in cfg["normalized_shape"]), eps=old.eps,
                        elementwise_affine=old.elementwise_affine)
        return new
    raise ValueError(f"unknown layer type in layout: {kind}")


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"layout: {what} must be a list of integers")
    return value


def trace(model: nn.Module):
    """torch.fx trace in which modules that read `self.training` at run time (stochastic depth)
    stay modules: a traced function call would freeze the mode the model had when traced."""
    import torch.fx as fx

    try:
        from torchvision.ops import StochasticDepth

        leaves: tuple[type, ...] = (StochasticDepth,)
    except ImportError:  # pragma: no cover - torchvision is a host dependency
        leaves = ()

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    if hasattr(model, SPEC_ATTR):  # the declared head travels with the traced copy
        setattr(gm, SPEC_ATTR, getattr(model, SPEC_ATTR))
    return gm


def apply_graph(model: nn.Module, graph: dict[str, Any]) -> nn.Module:
    """Re-insert the whitelisted graph modules a pruning stage put in place of traced adds."""
    import operator

    adds = (operator.add, operator.iadd, torch.add)
    gm = trace(model)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, cfg in graph.items():
        if not isinstance(cfg, dict) or cfg.get("type") not in GRAPH_MODULES:
            kind = cfg.get("type") if isinstance(cfg, dict) else cfg
            raise ValueError(f"layout: unknown graph module type {kind!r} (known: {', '.join(GRAPH_MODULES)})")
        if not name.isidentifier() or hasattr(gm, name):
            raise ValueError(f"layout: bad graph module name {name!r}")
        node = nodes.get(str(cfg.get("node")))
        if node is None or node.op != "call_function" or node.target not in adds or len(node.args) != 2:
            raise ValueError(f"layout: graph module {name} replaces {cfg.get('node')!r}, which is not an add "
                             f"of this architecture")
        for key in ("a_channels", "b_channels"):
            if not isinstance(cfg.get(key), int):
                raise ValueError(f"layout: {name}.{key} must be an integer")
        module = IndexedAdd(cfg["a_channels"], cfg["b_channels"],
                            *(_int_list(cfg.get(k), f"{name}.{k}") for k in IndexedAdd.INDEX_KEYS), node=node.name)
        gm.add_submodule(name, module)
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(name, args=tuple(node.args))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def apply_layout(model: nn.Module, layout: dict[str, Any]) -> nn.Module:
    """Reshape `model` to `layout`; returns the model to use (a traced copy when the layout
    changes the graph)."""
    modules = dict(model.named_modules())
    for name, cfg in layout.get("layers", {}).items():
        if name not in modules:
            raise ValueError(f"layout names a layer the architecture does not have: {name}")
        old = modules[name]
        if _module_config(old) is None or _module_config(old)["type"] != cfg["type"]:
            raise ValueError(f"layout says {name} is a {cfg['type']}, architecture has {type(old).__name__}")
        parent, attr = _get_parent(model, name)
        setattr(parent, attr, _reshaped(old, cfg))
    for key, shape in layout.get("tensors", {}).items():
        owner_name, _, tname = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        cur = getattr(owner, tname)
        if tuple(cur.shape) == tuple(shape):
            continue
        new = torch.empty(tuple(int(s) for s in shape), dtype=cur.dtype)
        if isinstance(cur, nn.Parameter):
            setattr(owner, tname, nn.Parameter(new, requires_grad=cur.requires_grad))
        else:
            owner.register_buffer(tname, new)
    if layout.get("graph"):
        model = apply_graph(model, layout["graph"])
    return model


EXTRA_PREFIX = "__"


def _plain_value(v: Any) -> bool:
    """A number, string, flag or None, or a (nested) list of them (a detector's anchors)."""
    if isinstance(v, list):
        return all(_plain_value(i) for i in v)
    return isinstance(v, (int, float, str, bool, type(None)))


def model_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """`task` and `model_args` of a model's metadata, with the defaults of its spec for a file
    written before they were stored; a task other than the architecture's is refused."""
    spec = get_spec(meta["arch"])
    task = meta.get("task", spec.task)
    if task != spec.task:
        raise ValueError(f"the file says task {task!r}, but {spec.name} is a {spec.task} model")
    args = meta.get("model_args") or {}
    if not isinstance(args, dict):
        raise ValueError(f"model_args must be a JSON object, not {type(args).__name__}")
    odd = [k for k, v in args.items() if not _plain_value(v)]
    if odd:  # constructor arguments are numbers, strings and flags, never objects to build
        raise ValueError(f"model_args {', '.join(odd)} must be numbers, strings, flags or (nested) lists of them")
    return {"task": task, "model_args": args}


def _fresh(meta: dict[str, Any]) -> nn.Module:
    """A new instance of the file's architecture, with its arguments, whose random
    initialization leaves the global RNG untouched: saving a checkpoint or loading a model must
    not change what training does next."""
    args = model_identity(meta)["model_args"]
    with torch.random.fork_rng(devices=[]):
        return create_model(meta["arch"], len(meta["classes"]), **args)


# -- fixed-point weights (`rsedge quantize --scheme msb-fixed`, rsedge.compress.msb_fixed) -----------

QUANT_KEY = "quantization"
FIXED_POINT_SCHEMES = ("msb-fixed",)


def fixed_point_tensors(quant: dict[str, Any] | None) -> tuple[int, dict[str, int]]:
    """(bits, {tensor name: fractional bits f}) of a model file's `quantization` metadata; (0, {})
    for a float model. A tensor stored as integers q means the weights q * 2**-f."""
    if not quant:
        return 0, {}
    if not isinstance(quant, dict) or quant.get("scheme") not in FIXED_POINT_SCHEMES:
        found = quant.get("scheme") if isinstance(quant, dict) else quant
        raise ValueError(f"unknown quantization scheme {found!r} (this rsedge reads {', '.join(FIXED_POINT_SCHEMES)})")
    bits, layers = quant.get("bits"), quant.get("layers")
    if not isinstance(bits, int) or not 2 <= bits <= 16 or not isinstance(layers, dict):
        raise ValueError("quantization metadata needs an integer 'bits' in 2..16 and a 'layers' object")
    fracs = {k: v.get("frac_bits") if isinstance(v, dict) else None for k, v in layers.items()}
    bad = [k for k, f in fracs.items() if not isinstance(f, int) or isinstance(f, bool)]
    if bad:
        raise ValueError(f"quantization metadata: {bad[0]} has no integer 'frac_bits'")
    return bits, fracs


def encode_fixed_point(state: dict[str, torch.Tensor], quant: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The quantized tensors of `state` as the integers they are (int8 up to 8 bits, else int16), so
    the file holds what the weights occupy; a value off its grid q * 2**-f, or beyond the symmetric
    range, is an error: the weights changed after quantizing."""
    bits, fracs = fixed_point_tensors(quant)
    out = {}
    for key, f in fracs.items():
        if key not in state:
            raise ValueError(f"quantization metadata names {key}, which the model does not have")
        v = state[key].double()
        q = torch.round(torch.ldexp(v, torch.tensor(f, dtype=torch.float64)))
        qmax = 2 ** (bits - 1) - 1
        if not torch.equal(torch.ldexp(q, torch.tensor(-f, dtype=torch.float64)), v) or q.abs().max() > qmax:
            raise ValueError(f"{key} is not on its {bits}-bit fixed-point grid (steps of 2^-{f}, at most "
                             f"{qmax} steps): were the weights changed after quantizing?")
        out[key] = q.to(torch.int8 if bits <= 8 else torch.int16)
    return out


def decode_fixed_point(weights: dict[str, torch.Tensor], quant: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    """The float32 weights q * 2**-f of the integer tensors a quantized file stores."""
    bits, fracs = fixed_point_tensors(quant)
    out = {}
    for key, f in fracs.items():
        q = weights.get(key)
        if q is None or q.dtype not in (torch.int8, torch.int16):
            found = "missing" if q is None else f"stored as {q.dtype}"
            raise ValueError(f"the {bits}-bit fixed-point tensor {key} is {found}, not as integers")
        out[key] = torch.ldexp(q.to(torch.float32), torch.tensor(-f, dtype=torch.float32))
    return out


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    meta: dict[str, Any],
    extra_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """`meta` needs `arch`, `classes`, `input_size`, `normalization`; `task` and `model_args`
    default to the spec's; the layout is computed here against a fresh instance of the
    architecture built with `model_args`. `extra_tensors` (a training checkpoint's
    optimizer state, RNG state) are stored under names starting with `__` and ignored by
    `load_model`."""
    from safetensors.torch import save

    for key in ("arch", "classes", "input_size", "normalization"):
        if key not in meta:
            raise ValueError(f"model metadata needs {key!r}")
    full = {"format": FORMAT, **meta, **model_identity(meta)}
    reference = _fresh(full)
    full["layout"] = channel_layout(model, reference)
    full["params"] = int(sum(p.numel() for p in model.parameters()))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state.update(encode_fixed_point(state, full.get(QUANT_KEY)))
    for k, v in (extra_tensors or {}).items():
        state[EXTRA_PREFIX + k] = v.detach().cpu().contiguous()
    data = save(state, metadata={META_KEY: json.dumps(full)})
    path = Path(path)
    atomic_write_bytes(path, data)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata alone, without reading the weights."""
    from safetensors import safe_open

    path = _model_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: whatever it is, it is no model file
        raise not_a_model(path, e) from e
    if raw is None:
        raise ModelFileError(f"{path} is a safetensors file but not an rsedge model (no '{META_KEY}' metadata)")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ModelFileError(f"{path}: its '{META_KEY}' metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ModelFileError(f"{path}: unsupported model format {found!r} (this rsedge reads {FORMAT})")
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ModelFileError(f"{path}: the model metadata lacks {', '.join(missing)}")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    from safetensors.torch import load_file

    path = _model_path(path)
    meta = read_metadata(path)
    try:
        model = _fresh(meta)
        model = apply_layout(model, meta.get("layout", {}))
        setattr(model, SPEC_ATTR, meta["arch"])
    except (KeyError, ValueError, AttributeError, TypeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise ModelFileError(f"{path}: cannot rebuild its model: {msg}") from e
    try:
        state = load_file(str(path), device="cpu")
    except Exception as e:  # noqa: BLE001 - a truncated or damaged tensor section
        raise ModelFileError(f"{path}: its tensors cannot be read ({type(e).__name__}: {e}); "
                             f"the file is damaged or truncated") from e
    weights = {k: v for k, v in state.items() if not k.startswith(EXTRA_PREFIX)}
    try:
        weights.update(decode_fixed_point(weights, meta.get(QUANT_KEY)))
    except ValueError as e:
        raise ModelFileError(f"{path}: {e}") from e
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    wrong = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or extra or wrong:
        example = (missing or extra or wrong)[0]
        raise ModelFileError(f"{path}: its tensors do not fit its own layout ({len(missing)} missing, "
                             f"{len(extra)} unexpected, {len(wrong)} of another shape, e.g. {example})")
    model.load_state_dict(weights, strict=True)
    return model.to(device).eval(), meta


def load_extra_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as f:
        for k in f.keys():
            if k.startswith(EXTRA_PREFIX):
                out[k[len(EXTRA_PREFIX):]] = f.get_tensor(k)
    return out


# what a segmentation model knows of its data (colour map, ignore label, dataset layout, window
# overlap): every model derived from it reads the same masks the same way
TASK_DATA_KEYS = ("colors", "ignore_index", "data_layout", "overlap")


def derive_meta(parent: dict[str, Any], stage: str, **updates: Any) -> dict[str, Any]:
    """Metadata for a model made from another: same data contract, one more history entry."""
    keep = ("arch", "task", "model_args", "classes", "input_size", "normalization", "split", "data_root",
            *TASK_DATA_KEYS)
    meta = {k: parent[k] for k in keep if k in parent}
    meta["history"] = list(parent.get("history", [])) + [{"stage": stage, **updates.pop("history_entry", {})}]
    meta.update(updates)
    return meta
