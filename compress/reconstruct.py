"""L1RR's residual reconstruction procedure (seed 001, section 3.2): every branch of a residual
add keeps its own channels, the add becomes "sum the common channels, concatenate the rest"
(`IndexedAdd`) and every consumer's input channels are gathered in that order.

Works on a torch.fx trace of the model. Each tensor of a residual channel space carries the list
of original channel ids it holds, in order; in the masked model the channels it lacks are exactly
zero, so the rewrite is exact as long as every operation between producers and consumers maps
zero to zero channel by channel (BatchNorm is sliced with its producer; ReLU, SiLU, pools,
stochastic depth, flatten of a 1x1 map qualify). Anything else is refused with the node named.

A residual tensor may also be concatenated along the channels with other tensors (a CSP "C3"
block: `cv3(cat(bottlenecks(x), cv2(x)))`) when only convolutions with groups 1 read the result:
those gather their input columns segment by segment, the residual segment in the order it holds
and the others whole, as Torch-Pruning's concat index mapping has already cut them and the
consumer's columns for them. The concat itself is left as it is, so nothing else is added to the
graph; the segment offsets are measured on the model as it is after Torch-Pruning, with the
input `analyze` was given.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsedge.trainer.modelfile import IndexedAdd, trace

from .importance import is_filter_producer

ADDS = (operator.add, operator.iadd, torch.add)
MULS = (operator.mul, operator.imul, torch.mul)
CATS = tuple(f for f in (torch.cat, getattr(torch, "concat", None), getattr(torch, "concatenate", None)) if f)
_UNARY_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.Identity, nn.Dropout,
                  nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_UNARY_FUNCTIONS = (F.relu, torch.relu, F.relu6, F.silu, F.hardswish, F.gelu, F.adaptive_avg_pool2d,
                    F.avg_pool2d, F.max_pool2d, F.dropout)
_UNARY_METHODS = ("relu", "relu_")
_SHAPE_METHODS = ("size", "dim")


def _shape_read(node) -> bool:
    """`x.shape`, `x.size()`, `x.dim()`: reads the shape, not the channels (an ASPP pooling
    branch or LR-ASPP sizing its upsampling by a residual tensor), so no channel flows through."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] == "shape"
    return node.op == "call_method" and node.target in _SHAPE_METHODS


def _unary_module(m: nn.Module) -> bool:
    if isinstance(m, _UNARY_MODULES):
        return True
    try:
        from torchvision.ops import StochasticDepth

        return isinstance(m, StochasticDepth)
    except ImportError:  # pragma: no cover
        return False


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _consumer(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear)


@dataclass
class Structure:
    """Per group: the clusters of producers that must share a mask (producers meeting at a
    multiplication, e.g. squeeze-excitation); more than one cluster means the group is a
    residual channel space that reconstruction splits."""

    clusters: dict[int, list[list[str]]] = field(default_factory=dict)
    adds: dict[int, list[tuple[str, frozenset, frozenset]]] = field(default_factory=dict)
    example: torch.Tensor | None = None  # the input analysed: `apply` measures concat segments with it


def _kind(gm, node, shapes) -> str:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.BatchNorm2d):
            return "bn"
        if _unary_module(m):
            return "unary"
        if _depthwise(m):
            return "depthwise"
        if _consumer(m):
            return "consumer"
        return "?"
    if node.op == "call_function":
        if node.target in ADDS:
            return "add"
        if node.target in MULS:
            return "mul"
        if node.target in _UNARY_FUNCTIONS:
            return "unary"
        if node.target is torch.flatten:
            shape = shapes.get(node.args[0].name)
            return "unary" if shape is not None and len(shape) == 4 and shape[2] * shape[3] == 1 else "?"
        return "?"
    if node.op == "call_method" and node.target in _UNARY_METHODS:
        return "unary"
    return "?"


def _shapes(gm, example) -> dict[str, tuple[int, ...]]:
    from torch.fx.passes.shape_prop import ShapeProp

    was = gm.training
    gm.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    gm.train(was)
    return {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")}


def _cat_parts(node) -> tuple[list, Any] | None:
    """(inputs, dim) of a `torch.cat` node (tuple or list, positional or keyword dim), else None."""
    if node.op != "call_function" or node.target not in CATS:
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", node.kwargs.get("axis", 0))
    return list(tensors), dim


def _cat_problem(gm, node, shapes) -> str:
    """'' when `node` concatenates along the channels and only convolutions (groups 1) read the
    result: those then gather every input segment in its own order (a residual one in its union
    order, the others as Torch-Pruning left them), and no other operation sees the residual
    channels. Otherwise what is wrong, for the refusal."""
    tensors, dim = _cat_parts(node)
    rank = len(shapes.get(node.name, ()))
    if not isinstance(dim, int) or rank < 2 or dim % rank != 1:
        return f"{node.format_node()} (a concatenation along dim {dim}, not the channels)"
    if not all(isinstance(t, torch.fx.Node) for t in tensors):
        return f"{node.format_node()} (a concatenation of something that is not a traced tensor)"
    for user in node.users:
        if _shape_read(user):
            continue
        m = gm.get_submodule(user.target) if user.op == "call_module" else None
        reads = m is not None and user.args[:1] == (node,) and len(user.all_input_nodes) == 1
        if not (reads and ((isinstance(m, nn.Conv2d) and m.groups == 1) or (isinstance(m, nn.Linear) and rank == 2))):
            return (f"{node.format_node()} (the concatenation feeds {user.format_node()}, "
                    f"not a convolution with groups=1)")
    return ""


def _find(parent: dict[str, str], p: str) -> str:
    while parent[p] != p:
        parent[p] = parent[parent[p]]
        p = parent[p]
    return p


def _join(node, kind, reach, parent, adds) -> bool:
    """An add or a multiplication of two tensors of the channel space: record an add of two
    different branch sets, merge the producers a multiplication couples. False: not that case."""
    tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
    if len(tensors) == 2 and all(a.name in reach for a in tensors):
        ra, rb = reach[tensors[0].name], reach[tensors[1].name]
        if kind == "add" and ra != rb:
            adds.append((node.name, ra, rb))
        if kind == "mul":
            root = _find(parent, next(iter(ra | rb)))
            for p in ra | rb:
                parent[_find(parent, p)] = root
        reach[node.name] = ra | rb
        return True
    if kind == "mul" and len(tensors) == 1:
        reach[node.name] = reach[[a for a in node.all_input_nodes if a.name in reach][0].name]
        return True
    return False


def _walk(gm, shapes, parent: dict[str, str]) -> tuple[list, list[str], list]:
    """Follow the channel space of the producers in `parent` through the graph: its adds, the
    operations that cannot be rewritten, and the stateful ones (BatchNorm, biased depthwise)."""
    reach: dict[str, frozenset[str]] = {}
    adds, problems, stateful = [], [], []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in parent:
            reach[node.name] = frozenset([node.target])
            continue
        ins = [a for a in node.all_input_nodes if a.name in reach]
        if not ins or _shape_read(node):
            continue
        if _cat_parts(node) is not None:
            problem = _cat_problem(gm, node, shapes)
            if problem:
                problems.append(problem)
            continue
        kind = _kind(gm, node, shapes)
        if kind == "consumer":
            continue
        if kind in ("add", "mul"):
            if not _join(node, kind, reach, parent, adds):
                problems.append(node.format_node())
            continue
        if kind in ("bn", "unary", "depthwise") and len(ins) == 1:
            reach[node.name] = reach[ins[0].name]
            if kind == "bn" or (kind == "depthwise" and gm.get_submodule(node.target).bias is not None):
                stateful.append((node.format_node(), reach[node.name]))
            continue
        problems.append(node.format_node())
    return adds, problems, stateful


def analyze(model: nn.Module, example: torch.Tensor, groups: list, names: dict[nn.Module, str]) -> Structure:
    gm = trace(model)
    shapes = _shapes(gm, example)
    out = Structure(example=example)
    for gi, group in enumerate(groups):
        producers = [names[dep.layer] for dep, _ in group if is_filter_producer(dep) and dep.layer in names]
        if len(producers) < 2:
            continue
        parent = {p: p for p in producers}
        adds, problems, stateful = _walk(gm, shapes, parent)
        if not adds:
            continue
        if problems:
            raise NotImplementedError(
                f"--coupling reconstruct cannot rewrite the residual channels of {producers[0]}: "
                f"unsupported operation {problems[0]}; use --coupling shared")
        clusters: dict[str, list[str]] = {}
        for p in producers:
            clusters.setdefault(_find(parent, p), []).append(p)
        for text, r in stateful:
            # a BatchNorm (or a biased depthwise conv) after an add maps a removed zero to its shift;
            # a depthwise conv without bias (DeepLabV3+'s separable ASPP convs) keeps it zero
            if len({_find(parent, p) for p in r}) > 1:
                raise NotImplementedError(f"--coupling reconstruct cannot rewrite the residual channels of "
                                          f"{producers[0]}: {text} follows an add; use --coupling shared")
        if len(clusters) > 1:
            out.clusters[gi] = list(clusters.values())
            out.adds[gi] = adds
    return out


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t.detach().clone().contiguous(), requires_grad=like.requires_grad)


def _slice_out(m: nn.Module, idx: list[int]) -> None:
    t = torch.as_tensor(idx, dtype=torch.long, device=m.weight.device)
    m.weight = _param(m.weight.data.index_select(0, t), m.weight)
    if getattr(m, "bias", None) is not None:
        m.bias = _param(m.bias.data.index_select(0, t), m.bias)
    if isinstance(m, nn.Conv2d):
        m.out_channels = len(idx)
        if _depthwise_shape(m):
            m.in_channels = m.groups = len(idx)
    elif isinstance(m, nn.Linear):
        m.out_features = len(idx)


def _depthwise_shape(m: nn.Conv2d) -> bool:
    return m.groups > 1 and m.groups == m.in_channels


def _slice_in(m: nn.Module, idx: list[int]) -> None:
    t = torch.as_tensor(idx, dtype=torch.long, device=m.weight.device)
    m.weight = _param(m.weight.data.index_select(1, t), m.weight)
    if isinstance(m, nn.Conv2d):
        m.in_channels = len(idx)
    else:
        m.in_features = len(idx)


def _slice_bn(bn: nn.BatchNorm2d, idx: list[int]) -> None:
    t = torch.as_tensor(idx, dtype=torch.long, device=bn.running_mean.device)
    if bn.affine:
        bn.weight = _param(bn.weight.data.index_select(0, t), bn.weight)
        bn.bias = _param(bn.bias.data.index_select(0, t), bn.bias)
    bn.running_mean = bn.running_mean.index_select(0, t).clone()
    bn.running_var = bn.running_var.index_select(0, t).clone()
    bn.num_features = len(idx)


def _free_chain(gm, node, kept: dict[str, list[int]]) -> list | None:
    """The nodes from `node` back to its producer conv when nothing else reads them: then the
    producer's channel order is ours to choose."""
    chain = []
    cur = node
    while isinstance(cur, torch.fx.Node) and len(cur.users) == 1:
        chain.append(cur)
        if cur.op == "call_module" and cur.target in kept:
            return chain
        if cur.op == "call_module":
            m = gm.get_submodule(cur.target)
            if not (isinstance(m, nn.BatchNorm2d) or _unary_module(m)):
                return None
        elif not ((cur.op == "call_function" and cur.target in _UNARY_FUNCTIONS)
                  or (cur.op == "call_method" and cur.target in _UNARY_METHODS)):
            return None
        cur = cur.args[0]
    return None


def _reorder(gm, chain, idx: dict[str, list[int]], order: list[int]) -> None:
    old = idx[chain[0].name]
    if old == order:
        return
    pos = {c: j for j, c in enumerate(old)}
    perm = [pos[c] for c in order]
    for node in chain:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if isinstance(m, nn.BatchNorm2d):
                _slice_bn(m, perm)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                _slice_out(m, perm)
        idx[node.name] = list(order)


def _align(gm, a, b, kept, idx) -> None:
    """Put the common channels first, in the same order, in whichever input of an add comes
    straight from a producer: its slices then need no Gather, and an add of two equal sets
    becomes a plain add."""
    ia, ib = idx[a.name], idx[b.name]
    fa, fb = _free_chain(gm, a, kept), _free_chain(gm, b, kept)
    sa, sb = set(ia), set(ib)
    if fa and fb:
        common = [c for c in ia if c in sb]
        _reorder(gm, fa, idx, common + [c for c in ia if c not in sb])
        _reorder(gm, fb, idx, common + [c for c in ib if c not in sa])
    elif fa:
        _reorder(gm, fa, idx, [c for c in ib if c in sa] + [c for c in ia if c not in sb])
    elif fb:
        _reorder(gm, fb, idx, [c for c in ia if c in sb] + [c for c in ib if c not in sa])


def _rewrite_add(gm, node, tensors, kept, idx) -> tuple[Any, dict[str, Any] | None]:
    """Replace the add `node` of two residual tensors by an `IndexedAdd`: the new node and its
    report row (the node itself and None when both inputs hold the same channels in the same
    order: it stays a plain add)."""
    _align(gm, tensors[0], tensors[1], kept, idx)
    ia, ib = idx[tensors[0].name], idx[tensors[1].name]
    if ia == ib:
        idx[node.name] = ia
        return node, None
    in_b = {c: j for j, c in enumerate(ib)}
    in_a = set(ia)
    a_common = [j for j, c in enumerate(ia) if c in in_b]
    b_common = [in_b[ia[j]] for j in a_common]
    a_only = [j for j, c in enumerate(ia) if c not in in_b]
    b_only = [j for j, c in enumerate(ib) if c not in in_a]
    module = IndexedAdd(len(ia), len(ib), a_common, b_common, a_only, b_only, node=node.name)
    name = f"rsedge_{node.name}"
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, args=tuple(tensors))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    idx[new.name] = [ia[j] for j in a_common] + [ia[j] for j in a_only] + [ib[j] for j in b_only]
    return new, {"add": node.name, "module": name, "a": len(ia), "b": len(ib), "common": len(a_common),
                 "a_only": len(a_only), "b_only": len(b_only), "out": module.out_channels, "gathers": module.gathers}


def _current_shapes(gm, structure: Structure | None) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of the graph as it is now (Torch-Pruning has already slimmed the
    shared groups), measured with the analysed input; only needed where concatenations are."""
    if structure is None or structure.example is None or not any(_cat_parts(n) for n in gm.graph.nodes):
        return {}
    return _shapes(gm, structure.example)


def _cat_order(gm, node, idx, shapes) -> list[int]:
    """The input channels a consumer of the channel concat `node` reads, segment by segment: a
    residual segment in the order it holds (its slimmed channels), any other one whole (Torch-
    Pruning has already cut it, and the consumer's columns for it)."""
    tensors, _ = _cat_parts(node)
    missing = [t.name for t in [node, *tensors] if isinstance(t, torch.fx.Node) and t.name not in shapes]
    if missing:
        raise RuntimeError(f"reconstruct: no shape for {', '.join(missing)} (the concatenation {node.name}): "
                           f"pass apply() the Structure that analyze() returned")
    problem = _cat_problem(gm, node, shapes)
    if problem:
        raise NotImplementedError(f"--coupling reconstruct cannot rewrite {problem}; use --coupling shared")
    order, offset = [], 0
    for t in tensors:
        width = shapes[t.name][1]
        order += [offset + c for c in idx[t.name]] if t.name in idx else list(range(offset, offset + width))
        offset += width
    return order


def apply(model: nn.Module, kept: dict[str, list[int]],
          structure: Structure | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Slim the residual channel spaces: `kept` maps each producer (conv name) to the original
    channel ids it keeps; `structure` (from `analyze`) is needed where a residual tensor is
    concatenated. Returns the traced model and one entry per rewritten add."""
    gm = trace(model)
    shapes = _current_shapes(gm, structure)
    idx: dict[str, list[int]] = {}
    cats: dict[str, list[int]] = {}
    rewritten = []
    for node in list(gm.graph.nodes):
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        if m is not None and _consumer(m):
            src = node.args[0] if node.args else None
            order = (idx.get(src.name, cats.get(src.name)) if isinstance(src, torch.fx.Node) else None)
            if order is not None:
                _slice_in(m, order)
            if node.target in kept:
                _slice_out(m, kept[node.target])
                idx[node.name] = list(kept[node.target])
            continue
        if node.op == "call_module" and node.target in kept:
            _slice_out(m, kept[node.target])
            idx[node.name] = list(kept[node.target])
            continue
        ins = [a for a in node.all_input_nodes if a.name in idx]
        if not ins or _shape_read(node):
            continue
        if _cat_parts(node) is not None:
            cats[node.name] = _cat_order(gm, node, idx, shapes)
            continue
        if m is not None:
            order = idx[ins[0].name]
            if isinstance(m, nn.BatchNorm2d):
                _slice_bn(m, order)
            elif _depthwise(m):
                _slice_out(m, order)
            idx[node.name] = order
            continue
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if node.op == "call_function" and node.target in ADDS and len(tensors) == 2 and all(
                a.name in idx for a in tensors):
            new, row = _rewrite_add(gm, node, tensors, kept, idx)
            if row is not None:
                if node.name in shapes:
                    shapes[new.name] = shapes[node.name]
                rewritten.append(row)
            continue
        if node.op == "call_function" and node.target in MULS and len(tensors) == 2:
            orders = [idx.get(a.name) for a in tensors]
            if orders[0] is not None and orders[1] is not None and orders[0] != orders[1]:
                raise RuntimeError(f"reconstruct: {node.name} multiplies tensors with different channels")
        idx[node.name] = idx[ins[0].name]
    gm.graph.lint()
    gm.recompile()
    return gm, rewritten
