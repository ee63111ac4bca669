"""Every pruning criterion against a direct computation of its definition on a tiny model."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from tiny_models import Tiny
from torch import nn

from rsedge.compress.importance import (
    FPGM,
    BNScale,
    ChannelAttention,
    FilterL1,
    GroupMagnitude,
    L1RRScale,
    RandomScores,
    Taylor,
)


def _tiny(seed=0):
    torch.manual_seed(seed)
    m = Tiny()
    for bn in (m.bn1, m.bn2):
        bn.weight.data.uniform_(-1.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _group(model, layer, size=8):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, size, size))
    return dg.get_pruning_group(layer, tp.prune_conv_out_channels, idxs=list(range(layer.out_channels)))


def _by_mean(x):
    x = torch.as_tensor(x, dtype=torch.float64)
    return (x / x.mean()).float()


def test_fpgm_is_the_sum_of_l2_distances_to_the_other_filters():
    m = _tiny()
    w = m.conv2.weight.detach().numpy().reshape(24, -1).astype(np.float64)
    direct = np.array([sum(np.linalg.norm(w[i] - w[j]) for j in range(24)) for i in range(24)])
    scores = FPGM()(_group(m, m.conv2))
    assert torch.allclose(scores, _by_mean(direct), atol=1e-5)
    # the filter closest to the others (the geometric median's neighbourhood) goes first
    assert int(scores.argmin()) == int(direct.argmin())


def _direct_taylor(model, batches):
    ref = copy.deepcopy(model).eval()
    layers = {"conv1": ref.conv1, "conv2": ref.conv2, "fc": ref.fc}
    acc = {k: 0.0 for k in layers}
    for x, y in batches:
        loss = F.cross_entropy(ref(x), y)
        grads = torch.autograd.grad(loss, [layer.weight for layer in layers.values()])
        for (k, layer), g in zip(layers.items(), grads):
            acc[k] = acc[k] + (g * layer.weight).detach().flatten(1).mean(1).abs()
    return {k: v / len(batches) for k, v in acc.items()}


def test_taylor_is_the_batch_average_of_abs_mean_grad_times_weight():
    from rsedge.compress.taylor import taylor_scores

    m = _tiny()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 4, (6,), generator=g)) for _ in range(3)]
    scores = taylor_scores(m, batches)
    direct = _direct_taylor(m, batches)
    for name in ("conv1", "conv2", "fc"):
        assert torch.allclose(scores[getattr(m, name)], direct[name], rtol=1e-4, atol=1e-9), name
    assert all(not p.requires_grad or p.grad is None for p in m.parameters())
    group_scores = Taylor(scores)(_group(m, m.conv2))
    assert torch.allclose(group_scores, _by_mean(direct["conv2"]), atol=1e-5)
    # only the first batches count when max_batches is given
    two = taylor_scores(m, batches, max_batches=2)
    assert torch.allclose(two[m.conv2], _direct_taylor(m, batches[:2])["conv2"], rtol=1e-4, atol=1e-9)


def test_taylor_needs_eval_mode_because_batchnorm_cancels_it_in_training():
    m = _tiny().train()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    g = torch.autograd.grad(F.cross_entropy(m(x), y), m.conv1.weight)[0]
    # training-mode BatchNorm makes the loss scale-invariant in each filter: sum(g * w) = 0
    assert (g * m.conv1.weight).flatten(1).sum(1).abs().max() < 1e-6


def test_cap_score_is_mean_probe_attention_times_abs_gamma():
    from rsedge.compress.cap import CapOptions, SEProbe, channel_attention

    m = _tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(3)
    probes = {m.bn1: SEProbe(16), m.bn2: SEProbe(24)}
    with torch.no_grad():
        for p in probes.values():
            p.fc2.weight.normal_(0, 0.5)
            p.fc2.bias.normal_(0, 0.5)
    samples = torch.randn(10, 3, 8, 8)
    x_check = torch.randn(2, 3, 8, 8)
    out_before = m(x_check).detach()
    s_bar, info = channel_attention(m, [m.bn1, m.bn2], [], [(samples[:6],), (samples[6:],)],
                                    CapOptions(epochs=0), probes=probes)
    # direct: each probe reads its BatchNorm's output after the ReLU that follows it and scales the
    # BatchNorm's output; the probe after bn2 sees the network *with* the first probe applied
    with torch.no_grad():
        a1 = m.bn1(m.conv1(samples))
        s1 = probes[m.bn1](torch.relu(a1))
        x = torch.relu(a1 * s1[:, :, None, None])
        s2 = probes[m.bn2](torch.relu(m.bn2(m.conv2(x))))
    assert torch.allclose(s_bar[m.bn1], s1.mean(0), atol=1e-6)
    assert torch.allclose(s_bar[m.bn2], s2.mean(0), atol=1e-6)
    scores = ChannelAttention(s_bar)(_group(m, m.conv2))
    assert torch.allclose(scores, _by_mean(s2.mean(0) * m.bn2.weight.abs()), atol=1e-5)
    # the probes are gone and, with no epoch trained, the network is untouched
    assert torch.equal(m(x_check).detach(), out_before)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert info["probes"] == 2 and info["samples"] == 10 and info["probes_after_activation"] == 2


def test_cap_probes_only_moves_attention_but_not_the_frozen_network():
    from rsedge.compress.cap import CapOptions, channel_attention

    m = _tiny()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(4)]
    s0, _ = channel_attention(m, [m.bn1, m.bn2], batches, [(batches[0][0],)], CapOptions(epochs=0, seed=1))
    s1, info = channel_attention(m, [m.bn1, m.bn2], batches, [(batches[0][0],)],
                                 CapOptions(epochs=3, lr=1e-2, seed=1, train_model=False))
    assert not torch.allclose(s0[m.bn2], s1[m.bn2])
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    assert info["final_loss"] is not None and info["train_model"] is False


def test_group_magnitude_equals_the_group_l2_definition():
    m = _tiny()
    scores = GroupMagnitude()(_group(m, m.conv1))
    # conv1's output filters, bn1's scales and conv2's input columns, squared L2 per channel,
    # averaged over the three layers, divided by the mean
    per = [m.conv1.weight.pow(2).sum((1, 2, 3)), m.bn1.weight.pow(2), m.conv2.weight.pow(2).sum((0, 2, 3))]
    direct = _by_mean(torch.stack([p.detach().double() for p in per]).mean(0))
    assert torch.allclose(scores, direct, atol=1e-5)


def test_group_magnitude_on_a_residual_group_counts_every_member():
    from rsedge.trainer.models import create_model

    torch.manual_seed(0)
    m = create_model("resnet18", 3).eval()
    group = _group(m, m.layer4[0].downsample[0], size=32)
    parts = []
    for dep, _ in group:
        layer, fn = dep.layer, dep.pruning_fn
        if fn == tp.prune_conv_out_channels:
            parts.append(layer.weight.pow(2).sum((1, 2, 3)))
        elif fn == tp.prune_conv_in_channels:
            parts.append(layer.weight.pow(2).sum((0, 2, 3)))
        elif fn == tp.prune_linear_in_channels:
            parts.append(layer.weight.pow(2).sum(0))
        elif fn == tp.prune_batchnorm_out_channels:
            parts.append(layer.weight.pow(2))
    assert len(parts) == 8  # 3 convs out + 3 BNs + 1 conv in + the classifier's inputs
    direct = _by_mean(torch.stack([p.detach().double() for p in parts]).mean(0))
    assert torch.allclose(GroupMagnitude()(group), direct, atol=1e-5)


def test_random_scores_are_seeded_uniform():
    m = _tiny()
    a = RandomScores(seed=5)(_group(m, m.conv2))
    assert torch.equal(a, torch.rand(24, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(a, RandomScores(seed=5)(_group(m, m.conv2)))
    assert not torch.equal(a, RandomScores(seed=6)(_group(m, m.conv2)))


def test_threshold_criteria_take_the_raw_max_gamma_of_coupled_batchnorms():
    from rsedge.trainer.models import create_model

    torch.manual_seed(0)
    m = create_model("resnet18", 3).eval()
    for bn in (m.bn1, m.layer1[0].bn2, m.layer1[1].bn2):
        bn.weight.data.uniform_(-2, 2)
    group = _group(m, m.conv1, size=32)
    crit = L1RRScale()
    crit.raw = True
    direct = torch.stack([bn.weight.abs() for bn in (m.bn1, m.layer1[0].bn2, m.layer1[1].bn2)]).max(0).values
    assert torch.allclose(crit(group), direct.detach(), atol=1e-6)
    # without raw, the usual mean-normalized average (what --ratio ranks by)
    bn = BNScale()(group)
    per = [b.weight.abs().detach() for b in (m.bn1, m.layer1[0].bn2, m.layer1[1].bn2)]
    assert torch.allclose(bn, torch.stack([_by_mean(p) for p in per]).mean(0), atol=1e-5)


def test_group_without_batchnorm_falls_back_to_filter_l1_but_is_not_thresholded():
    lin = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    dg = tp.DependencyGraph().build_dependency(lin, example_inputs=torch.randn(1, 6))
    group = dg.get_pruning_group(lin[0], tp.prune_linear_out_channels, idxs=list(range(12)))
    assert torch.allclose(BNScale()(group), FilterL1()(group))
    crit = BNScale()
    crit.raw = True
    assert crit.unit_scores(group) is None


@pytest.mark.parametrize("name", ["random", "l1", "bn-scale", "fpgm", "group", "l1rr"])
def test_every_data_free_criterion_ranks_every_channel(name):
    from rsedge.compress.prune import make_criterion

    m = _tiny()
    scores = make_criterion(name)(_group(m, m.conv2))
    assert scores.shape == (24,) and torch.isfinite(scores).all()
