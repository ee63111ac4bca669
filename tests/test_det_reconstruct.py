"""L1RR's residual reconstruction on the detector: the C3 blocks' residual channel space flows
into a channel concat, whose 1x1 conv then gathers each segment in its own order. The slimmed
model computes what the masked model computes, saves and loads, exports to ONNX and matches
ONNX Runtime; what cannot be rewritten exactly (a concat along another dim, or read by anything
but a convolution) is refused with the node named."""
import numpy as np
import pytest
import torch
from tiny_models import randomized
from torch import nn

import rsedge.trainer.det_models  # noqa: F401  (registers yolo_n)
from rsedge.compress.importance import get_criterion
from rsedge.compress.plan import build_units, select
from rsedge.compress.prune import prune_network
from rsedge.compress.slim import apply_plan, masked_copy
from rsedge.trainer.det_models import DEFAULT_ANCHORS, DETECT_HEAD, DetectExport
from rsedge.trainer.modelfile import IndexedAdd, load_model, save_model
from rsedge.trainer.models import create_model, head_modules

SIZE = (64, 96)
C3_ADDS = 7  # yolo_n, depth 0.33: C3 repeats 1, 2, 3, 1 in the backbone


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1.0)


@pytest.fixture(scope="module")
def pruned():
    """yolo_n with random BatchNorm statistics and gammas, pruned by |gamma| at 0.3 with residual
    reconstruction; the masked model comes from the same plan, made before slimming."""
    model = randomized("yolo_n", 3, seed=4)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        full = model(x)
    plan = build_units(model, torch.zeros(1, 3, *SIZE), get_criterion("bn-scale"), head_modules(model), "reconstruct")
    select(plan, ratio=0.3, round_to=8, min_channels=8)
    masked = masked_copy(model, plan).eval()
    slim, rewritten = apply_plan(plan)
    return {"x": x, "full": full, "plan": plan, "masked": masked, "slim": slim.eval(), "rewritten": rewritten}


def test_slimmed_detector_equals_masked(pruned):
    x, full = pruned["x"], pruned["full"]
    with torch.no_grad():
        masked, slim = pruned["masked"](x), pruned["slim"](x)
    assert len(slim) == 3
    for f, a, b in zip(full, masked, slim):
        assert a.shape == b.shape == f.shape
        assert float((a - f).abs().max()) > 1e-2, "masking must change the function, or the test proves nothing"
        assert _close(b, a), float((a - b).abs().max())
    adds = [m for m in pruned["slim"].modules() if isinstance(m, IndexedAdd)]
    assert len(adds) == len(pruned["rewritten"]) == C3_ADDS
    # each C3's concat conv reads the union of its last add, then what survived of its cv2 branch
    slim = pruned["slim"]
    units = {u.key: u for u in pruned["plan"].units}
    nodes = {n.target: n for n in slim.graph.nodes if n.op == "call_module"}
    for k in (1, 2, 3, 4):
        cat = nodes[f"backbone.c3_{k}.cv3.conv"].args[0]
        last = slim.get_submodule(cat.args[0][0].target)
        assert isinstance(last, IndexedAdd)
        cv3 = slim.get_submodule(f"backbone.c3_{k}.cv3.conv")
        assert cv3.in_channels == last.out_channels + units[f"backbone.c3_{k}.cv2.conv"].kept
        assert cv3.in_channels < create_model("yolo_n", 3).get_submodule(f"backbone.c3_{k}.cv3.conv").in_channels

def test_l1rr_path_reconstructs_every_c3_add_and_exports(tmp_path):
    import onnx
    import onnxruntime as ort

    model = randomized("yolo_n", 3, seed=4)
    original = sum(p.numel() for p in model.parameters())
    slim, report = prune_network(model, SIZE, "bn-scale", 0.3, coupling="reconstruct")
    assert report["coupling"] == "reconstruct" and len(report["reconstructed_adds"]) == C3_ADDS
    assert sum(p.numel() for p in slim.parameters()) == report["after"]["params"] < 0.8 * original
    for name in DETECT_HEAD:
        assert slim.get_submodule(name).out_channels == 3 * (5 + 3)
    slim.eval()
    x = torch.randn(1, 3, *SIZE, generator=torch.Generator().manual_seed(2))
    meta = {"arch": "yolo_n", "classes": ["a", "b", "c"], "input_size": list(SIZE),
            "normalization": {"mean": [0.0] * 3, "std": [1.0] * 3}}
    loaded, _ = load_model(save_model(tmp_path / "det.safetensors", slim, meta))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(slim(x), loaded.eval()(x)))
    wrapper = DetectExport(slim, SIZE, anchors=torch.tensor(DEFAULT_ANCHORS)).eval()
    with torch.no_grad():
        boxes, scores = wrapper(x)
    path = tmp_path / "det.onnx"
    torch.onnx.export(wrapper, (x,), str(path), dynamo=False, opset_version=13, input_names=["images"],
                      output_names=["boxes", "scores"])
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"ScatterND", "ScatterElements", "Scatter"}, ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ob, osc = sess.run(None, {"images": x.numpy()})
    assert ob.shape == tuple(boxes.shape) and osc.shape == tuple(scores.shape) == (1, 3 * (8 * 12 + 4 * 6 + 2 * 3), 3)
    assert np.abs(ob - boxes.numpy()).max() <= 1e-4 * max(np.abs(boxes.numpy()).max(), 1.0)
    assert np.abs(osc - scores.numpy()).max() <= 1e-4


class _CatNet(nn.Module):
    """A residual add whose output is concatenated SECOND (after a plain pruned branch), by list
    and positional dim, then read by a 3x3 conv: the residual segment sits at an offset."""

    def __init__(self, dim: int = 1, reader: str = "conv"):
        super().__init__()
        self.dim = dim
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.branch = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.side = nn.Sequential(nn.Conv2d(16, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.mix = nn.Conv2d(40, 16, 3, padding=1) if reader == "conv" else nn.Conv2d(40, 40, 3, padding=1, groups=40)
        self.head = nn.Conv2d(self.mix.out_channels, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = x + self.branch(x)
        return self.head(self.mix(torch.cat([self.side(x), y], self.dim)))


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.weight.data.uniform_(0.2, 1.0, generator=g)
            m.bias.data.uniform_(-0.5, 0.5, generator=g)
    return model.eval()


def test_a_residual_segment_after_another_segment_is_gathered_at_its_offset():
    model = _randomize(_CatNet())
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    plan = build_units(model, torch.zeros(1, 3, 16, 16), get_criterion("random", seed=5), [model.head], "reconstruct")
    select(plan, ratio=0.5, round_to=1, min_channels=1)
    assert sum(u.residual for u in plan.units) == 2 and all(u.prune for u in plan.units if u.scores is not None)
    masked = masked_copy(model, plan).eval()
    slim, rewritten = apply_plan(plan)
    with torch.no_grad():
        a, b = masked(x), slim.eval()(x)
    assert len(rewritten) == 1 and _close(b, a), float((a - b).abs().max())
    assert slim.get_submodule("mix").in_channels == slim.get_submodule("side.0").out_channels + rewritten[0]["out"] < 40


@pytest.mark.parametrize("dim, reader, why", [(2, "conv", "along dim 2"), (1, "depthwise", "groups=1")])
def test_a_concat_that_cannot_be_rewritten_is_refused(dim, reader, why):
    model = _randomize(_CatNet(dim, reader))
    size = [16, 16]
    if dim == 2:
        model.side[0] = nn.Conv2d(16, 16, 1, bias=False)
        model.side[1] = nn.BatchNorm2d(16)
        model.mix = nn.Conv2d(16, 16, 3, padding=1)
    with pytest.raises(NotImplementedError, match=f"(?s)cannot rewrite.*{why}.*--coupling shared"):
        prune_network(model.eval(), size, "l1", 0.5, coupling="reconstruct", head=["head"])
    slim, report = prune_network(model.eval(), size, "l1", 0.5, coupling="shared", head=["head"])
    assert report["after"]["params"] < report["before"]["params"]
    assert slim(torch.zeros(1, 3, *size)).shape[1] == 4
