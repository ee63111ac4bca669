"""Every pruning criterion on the segmentation models: the classifier conv(s) keep their classes,
ASPP's concat and the separable convs stay coupled, slimmed == masked, Taylor and CAP read the
per-pixel cross-entropy with the ignore label on (image, mask) batches, the iterative schedule
re-scores between steps, and the slimmed model exports without shape chains."""
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_seg_models import export_simplified, ort_outputs, randomized, shape_chains
from torch import nn

from rsedge.compress.cap import CapOptions, channel_attention
from rsedge.compress.importance import ChannelAttention, Taylor, get_criterion
from rsedge.compress.plan import build_units, select
from rsedge.compress.prune import PruneOptions, _search_lfa, prune_network
from rsedge.compress.slim import apply_plan, masked_copy
from rsedge.compress.taylor import taylor_scores
from rsedge.trainer.models import head_modules

IGNORE = 255
CLASSES = 5
SIZE = (64, 64)
METHODS = ["random", "l1", "bn-scale", "fpgm", "taylor", "cap", "group", "l1rr"]


def seg_loss(outputs, masks, images):
    return F.cross_entropy(outputs, masks, ignore_index=IGNORE)


def batches(n=2, seed=0):
    """(images, masks) pairs: masks (N, H, W) of class indices, a band of ignored pixels in each."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(2, 3, *SIZE, generator=g)
        y = torch.randint(0, CLASSES, (2, *SIZE), generator=g)
        y[:, :8] = IGNORE
        out.append((x, y))
    return out


def criterion(method, model):
    """The criterion as `rsedge prune` makes it; Taylor and CAP measured with the segmentation loss."""
    if method == "taylor":
        return Taylor(taylor_scores(model, batches(), loss=seg_loss))
    if method == "cap":
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        s_bar, _ = channel_attention(model, bns, batches(), [(x,) for x, _ in batches(1, seed=9)],
                                     CapOptions(epochs=1, train_model=False), loss=seg_loss)
        return ChannelAttention(s_bar)
    return get_criterion(method, seed=3) if method == "random" else get_criterion(method)


def slim_and_masked(arch, method, coupling="shared", ratio=0.5):
    model = randomized(arch, CLASSES)
    x = torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full = model(x)
    params = sum(p.numel() for p in model.parameters())
    plan = build_units(model, torch.zeros(1, 3, *SIZE), criterion(method, model), head_modules(model), coupling)
    select(plan, ratio=ratio, round_to=8, min_channels=8)
    masked = masked_copy(model, plan).eval()
    slim, _ = apply_plan(plan)
    slim.eval()
    with torch.no_grad():
        a, b = masked(x), slim(x)
    assert (a - full).abs().max() > 1e-2, "masking must change the function, or the test proves nothing"
    assert b.shape == (2, CLASSES, *SIZE)
    assert (a - b).abs().max() < 1e-4
    assert sum(p.numel() for p in slim.parameters()) < 0.6 * params
    assert all(h.out_channels == CLASSES for h in head_modules(slim))
    return slim


def check_deeplab_coupling(slim):
    aspp = slim.decoder.aspp[0]
    branch_out = [aspp.convs[0][0].out_channels] + [aspp.convs[i][0][1].out_channels for i in (1, 2, 3)] + [
        aspp.convs[4][1].out_channels]
    assert aspp.project[0].in_channels == sum(branch_out)  # the ASPP concat, pooling branch included
    separable = [slim.decoder.aspp[1], slim.decoder.block2[0]] + [aspp.convs[i][0] for i in (1, 2, 3)]
    for sep in separable:
        dw, pw = sep[0], sep[1]
        assert dw.groups == dw.in_channels == dw.out_channels == pw.in_channels
    assert slim.decoder.block2[0][0].in_channels == slim.decoder.aspp[1][1].out_channels + \
        slim.decoder.block1[0].out_channels  # the concat of the upsampled ASPP and the stride-4 skip
    assert slim.decoder.block1[0].out_channels < 48 and aspp.project[0].in_channels < 5 * 256


@pytest.mark.parametrize("method", METHODS)
def test_every_criterion_on_deeplab_slimmed_equals_masked(method):
    check_deeplab_coupling(slim_and_masked("deeplabv3plus_resnet18", method))


@pytest.mark.parametrize("method", ["l1", "taylor"])
def test_lraspp_slimmed_equals_masked_and_both_classifiers_kept(method):
    slim = slim_and_masked("lraspp_mobilenet_v3_large", method)
    head = slim.classifier
    assert head.low_classifier.out_channels == head.high_classifier.out_channels == CLASSES
    assert head.cbr[0].out_channels == head.scale[1].out_channels == head.high_classifier.in_channels < 128


def test_deeplab_residual_reconstruction_slimmed_equals_masked():
    """Reconstruction traces the model: ASPP's pooling branch reads the shape of a residual tensor
    and the separable convs follow the last add, neither of which blocks the rewrite."""
    slim = slim_and_masked("deeplabv3plus_resnet18", "bn-scale", coupling="reconstruct")
    assert any(type(m).__name__ == "IndexedAdd" for m in slim.modules())


def test_taylor_reads_the_per_pixel_loss_with_the_ignore_label():
    model = randomized("deeplabv3plus_resnet18", CLASSES)
    data = batches(1)
    scores = taylor_scores(model, data, loss=seg_loss)
    x, y = data[0]
    model.zero_grad()
    seg_loss(model(x), y, x).backward()
    conv = model.decoder.block1[0]
    direct = (conv.weight.grad * conv.weight).detach().flatten(1).mean(1).abs()
    assert torch.allclose(scores[conv], direct, rtol=1e-4, atol=1e-12)
    relabelled = [(x, torch.where(y == 0, torch.full_like(y, IGNORE), y))]  # ignoring pixels changes the loss
    assert not torch.allclose(taylor_scores(model, relabelled, loss=seg_loss)[conv], scores[conv])
    unlabelled = [(x, torch.full_like(y, IGNORE))]  # NaN loss: skipped, not spread into every score
    again = taylor_scores(model, unlabelled + data, loss=seg_loss)
    assert all(torch.isfinite(v).all() for v in again.values())
    assert torch.allclose(again[conv], scores[conv], rtol=1e-5)
    with pytest.raises(ValueError, match="no finite loss"):
        taylor_scores(model, unlabelled, loss=seg_loss)


def test_cap_probes_learn_from_masks_and_skip_unlabelled_batches():
    model = randomized("lraspp_mobilenet_v3_large", CLASSES)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    x, y = batches(1)[0]
    train = [(x, torch.full_like(y, IGNORE)), (x, y)]
    s_bar, info = channel_attention(model, bns, train, [(x,)], CapOptions(epochs=2, lr=1e-2), loss=seg_loss)
    assert set(s_bar) == set(bns) and all(torch.isfinite(s).all() for s in s_bar.values())
    assert np.isfinite(info["final_loss"]) and 0 < info["s_bar_min"] < info["s_bar_max"] < 1


def iterative_taylor(model, steps, ratio):
    """The paper's schedule without the fine-tuning between steps: score, remove, repeat; each
    step's ratio is relative to the unpruned widths (`original`)."""
    original, widths = None, []
    for k in range(1, steps + 1):
        crit = Taylor(taylor_scores(model, batches(1, seed=k), loss=seg_loss))
        model, report = prune_network(model, SIZE, "taylor", ratio * k / steps, criterion=crit, original=original)
        original = original or {u["unit"]: u["channels"] for u in report["units"]}
        widths.append(report["after"]["params"])
    return model, widths


def test_iterative_taylor_schedule_rescores_and_reaches_the_ratio():
    model = randomized("deeplabv3plus_resnet18", CLASSES)
    before = sum(p.numel() for p in model.parameters())
    model, params = iterative_taylor(model, steps=3, ratio=0.5)
    assert params == sorted(params, reverse=True) and params[0] > params[-1]
    one_shot, _ = prune_network(randomized("deeplabv3plus_resnet18", CLASSES), SIZE, "l1", 0.5)
    assert abs(params[-1] - sum(p.numel() for p in one_shot.parameters())) < 0.1 * before
    with torch.no_grad():
        assert model(torch.zeros(1, 3, *SIZE)).shape == (1, CLASSES, *SIZE)
    assert model.segmentation_head[0].out_channels == CLASSES


@pytest.mark.slow
def test_sixty_taylor_steps_on_deeplab():
    model, params = iterative_taylor(randomized("deeplabv3plus_resnet18", CLASSES), steps=60, ratio=0.5)
    assert params[-1] < 0.4 * params[0]


@pytest.mark.parametrize("arch", ["deeplabv3plus_resnet18", "lraspp_mobilenet_v3_large"])
def test_half_the_parameters_gone_and_the_slim_graph_exports_clean(tmp_path, arch):
    model = randomized(arch, CLASSES)
    slim, report = prune_network(model, SIZE, "l1", 0.3)
    assert report["params_ratio"] <= 0.5, report["params_ratio"]
    proto = export_simplified(slim, SIZE, tmp_path / "slim.onnx")
    assert not shape_chains(proto.graph)
    images = np.random.default_rng(2).standard_normal((2, 3, *SIZE)).astype(np.float32)
    with torch.no_grad():
        ref = slim(torch.from_numpy(images)).numpy()
    assert ref.shape == (2, CLASSES, *SIZE)
    assert np.abs(ort_outputs(tmp_path / "slim.onnx", images) - ref).max() < 1e-4


def test_feature_attention_threshold_search_on_deeplab():
    """`--target-lfa` on a segmentation model: F is the map the classifier conv reads, the regions
    come from the task (a stand-in here: the labelled pixels at F's size)."""
    model = randomized("deeplabv3plus_resnet18", CLASSES)

    def target_regions(fm, images, masks):
        with torch.no_grad():
            _, feat = fm(images)
        labelled = (masks != IGNORE).float()[:, None]
        return F.interpolate(labelled, size=feat.shape[-2:], mode="nearest")[:, 0]

    images, masks = batches(1)[0]
    task = types.SimpleNamespace(head=lambda meta: ("segmentation_head.0",), target_regions=target_regions)
    data = types.SimpleNamespace(task=task, val=[0], train_eval=[0], tensors=lambda ds, n: (images, masks))
    meta = {"input_size": list(SIZE)}
    o = PruneOptions(method="l1rr", ratio=None, target_lfa=0.05, round_to=8)
    thr, info = _search_lfa(model, meta, get_criterion("l1rr"), data, o, log=lambda m: None)
    assert info["chosen"]["lfa"] <= 0.05 and info["chosen"]["pruned_fraction"] > 0
    slim, report = prune_network(model, SIZE, "l1rr", None, threshold=thr)
    assert report["after"]["params"] < report["before"]["params"]
    assert slim(images).shape == (2, CLASSES, *SIZE)


def test_prune_run_steps_without_fine_tuning_between_them(tmp_path):
    """`rsedge prune --steps 3 --step-epochs 0`: the paper's loop (retraining comes after, with
    `rsedge finetune`): no data needed for l1, no fine-tuning folders, one record entry per step."""
    import json

    from rsedge.compress.prune import prune_run
    from rsedge.trainer.modelfile import load_model, save_model

    meta = {"arch": "deeplabv3plus_resnet18", "task": "segmentation", "classes": [f"c{i}" for i in range(CLASSES)],
            "input_size": list(SIZE), "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    src = save_model(tmp_path / "m.safetensors", randomized("deeplabv3plus_resnet18", CLASSES), meta)
    with pytest.raises(ValueError, match="--step-epochs must be 0"):
        prune_run(src, tmp_path / "bad", method="l1", steps=3, step_epochs=-1, progress=False, log=lambda m: None)
    report = prune_run(src, tmp_path / "p", method="l1", ratio=0.5, steps=3, step_epochs=0, progress=False,
                       log=lambda m: None)
    record = json.loads((tmp_path / "p" / "record.json").read_text())
    assert [s["step"] for s in record["steps"]] == [1, 2, 3] and not list((tmp_path / "p").glob("step*"))
    params = [s["params"] for s in record["steps"]]
    assert params == sorted(params, reverse=True) and report["params_ratio"] < 0.5
    model, _ = load_model(tmp_path / "p" / "model.safetensors")
    with torch.no_grad():
        assert model(torch.zeros(1, 3, *SIZE)).shape == (1, CLASSES, *SIZE)


@pytest.mark.parametrize("arch, channels, stride", [("deeplabv3plus_resnet18", 256, 4),
                                                    ("lraspp_mobilenet_v3_large", 128, 8)])
def test_feature_map_of_a_segmentation_model_is_what_its_classifier_reads(arch, channels, stride):
    from rsedge.compress.lfa import feature_model

    model = randomized(arch, CLASSES)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        logits, feat = feature_model(model)(x)
        assert torch.equal(logits, model(x))
    assert feat.shape == (1, channels, SIZE[0] // stride, SIZE[1] // stride)
