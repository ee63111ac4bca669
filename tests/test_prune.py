import pytest
import torch
import torch_pruning as tp
from tiny_models import Tiny
from torch import nn

from rsedge.compress.counting import count_macs, count_params
from rsedge.compress.importance import BNScale, FilterL1
from rsedge.compress.prune import prune_model


def _group(model, layer):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 8, 8))
    return dg.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=list(range(layer.out_channels)))


def test_filter_l1_equals_direct_computation():
    torch.manual_seed(0)
    m = Tiny()
    scores = FilterL1()(_group(m, m.conv1))
    direct = m.conv1.weight.abs().sum((1, 2, 3))
    assert torch.allclose(scores, direct / direct.mean(), atol=1e-6)
    assert torch.equal(scores.argsort(), direct.argsort())


def test_bn_scale_equals_direct_computation():
    torch.manual_seed(0)
    m = Tiny()
    m.bn2.weight.data = torch.linspace(-2, 1, 24)[torch.randperm(24)]
    scores = BNScale()(_group(m, m.conv2))
    direct = m.bn2.weight.abs()
    assert torch.allclose(scores, direct / direct.mean(), atol=1e-6)


def test_residual_group_averages_normalized_scores():
    from rsedge.trainer.models import create_model

    torch.manual_seed(0)
    m = create_model("resnet18", 3)
    group = _group(m, m.layer1[0].conv2)  # coupled with conv1 and every block's output in layer1
    producers = [dep.layer for dep, _ in group if dep.pruning_fn == tp.prune_conv_out_channels]
    assert len(producers) >= 3
    per = [p.weight.abs().sum((1, 2, 3)) for p in producers]
    expected = torch.stack([s / s.mean() for s in per]).mean(0)
    assert torch.allclose(FilterL1()(group), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["l1", "bn-scale"])
def test_prune_removes_the_weakest_channels_physically(method):
    torch.manual_seed(0)
    m = Tiny().eval()
    m.bn1.weight.data = torch.arange(1, 17, dtype=torch.float32)
    keep_by_bn = set(range(8, 16))
    with torch.no_grad():
        m.conv1.weight.mul_(torch.arange(1, 17, dtype=torch.float32).view(16, 1, 1, 1) * 10)
    w_before = m.conv1.weight.detach().clone()
    report = prune_model(m, [8, 8], method=method, ratio=0.5, round_to=8, head=["fc"])
    assert m.conv1.out_channels == 8 and m.bn1.num_features == 8 and m.conv2.in_channels == 8
    assert m.conv2.out_channels == 8 and m.fc.out_features == 4
    kept = {i for i in range(16) if any(torch.equal(w_before[i], k) for k in m.conv1.weight)}
    assert kept == keep_by_bn  # both criteria rank channel i by i here
    assert report["after"]["params"] == count_params(m) < report["before"]["params"]


def test_round_to_keeps_multiples_of_eight():
    from rsedge.trainer.models import create_model

    m = create_model("resnet18", 5)
    prune_model(m, [32, 32], method="l1", ratio=0.3, round_to=8)
    widths = [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths), widths
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)


def test_macs_counted_by_the_conv_rule():
    m = Tiny()
    # conv1: 8*8*16 outputs * 3*9; conv2: 8*8*24 * 16*9; fc: 24*4
    assert count_macs(m, [8, 8]) == 64 * 16 * 27 + 64 * 24 * 144 + 96


def test_prune_model_stays_in_place_and_refuses_reconstruction():
    from rsedge.trainer.models import create_model

    m = create_model("resnet18", 5)
    with pytest.raises(ValueError, match="prune_network"):
        prune_model(m, [32, 32], "l1", 0.5, coupling="reconstruct")
    report = prune_model(m, [32, 32], "l1", 0.5)
    assert report["after"]["params"] == count_params(m)
