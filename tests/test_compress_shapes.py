"""Hardware-friendly shapes: rounding, minimums, per-layer caps, exclusions, global and
threshold selection, and the warnings and per-layer table of the record."""
import pytest
import torch
from torch import nn

from rsedge.compress.plan import Plan, Unit, select
from rsedge.compress.prune import prune_model, prune_network
from rsedge.trainer.models import create_model


def _plan(scores_by_unit, original=None):
    units = []
    for i, s in enumerate(scores_by_unit):
        s = torch.as_tensor(s, dtype=torch.float32)
        units.append(Unit(key=f"u{i}", group=i, channels=len(s), original=(original or {}).get(i, len(s)), scores=s,
                          producers=[f"u{i}"], members=[f"u{i}"], zero_rows=[]))
    return Plan(model=nn.Identity(), dg=None, groups=[], units=units, names={}, coupling="shared")


def _kept(plan):
    return [u.kept for u in plan.units]


def test_rounding_goes_down_to_the_multiple_but_not_below_the_minimum():
    plan = _plan([torch.arange(64.0), torch.arange(12.0), torch.arange(24.0), torch.arange(4.0)])
    select(plan, ratio=0.3, round_to=8, min_channels=8)
    # 64: keep int(44.8) = 44 -> 40; 12: keep 8 (multiple of 8); 24: keep 16 -> 16; 4: too narrow, left alone
    assert _kept(plan) == [40, 8, 16, 4]
    assert plan.units[3].warning and "below --min-channels 8" in plan.units[3].warning
    assert not any(u.warning for u in plan.units[:3])
    # the lowest scores go
    assert plan.units[0].prune == list(range(24))


def test_minimum_is_rounded_up_to_the_multiple_and_max_ratio_caps_each_layer():
    plan = _plan([torch.arange(64.0), torch.arange(64.0)])
    select(plan, ratio=0.95, round_to=8, min_channels=12)
    assert _kept(plan) == [16, 16]  # 12 rounded up to 16
    select(plan, ratio=0.95, round_to=8, min_channels=8, max_ratio=0.6)
    assert _kept(plan) == [32, 32]  # at most 60 %: keep >= 25.6 -> 26 -> rounded up to 32
    select(plan, ratio=0.95, round_to=1, min_channels=1, max_ratio=0.6)
    assert _kept(plan) == [26, 26]


def test_nothing_requested_keeps_an_odd_width():
    plan = _plan([torch.ones(12) * 5])
    select(plan, threshold=1.0, round_to=8, min_channels=8)
    assert _kept(plan) == [12] and plan.units[0].requested == 0


def test_threshold_prunes_scores_at_or_below_it():
    plan = _plan([[0.1, 0.5, 0.2, 0.9], [0.05, 0.3, 0.7]])
    select(plan, threshold=0.2, round_to=1, min_channels=1)
    assert [u.prune for u in plan.units] == [[0, 2], [0]]


def test_global_ranking_uses_one_threshold():
    plan = _plan([[0.1, 0.5, 0.2, 0.9, 0.8, 0.7], [0.05, 0.3, 0.6, 0.4]])
    select(plan, ratio=0.5, global_ranking=True, round_to=1, min_channels=1)
    # 10 channels, 5 removed: the five lowest overall (0.05, 0.1, 0.2, 0.3, 0.4)
    assert [u.prune for u in plan.units] == [[0, 2], [0, 1, 3]]
    with pytest.raises(ValueError, match="either"):
        select(plan, ratio=0.5, threshold=0.1)


def test_ratios_are_relative_to_the_original_widths_in_iterative_steps():
    plan = _plan([torch.arange(48.0)], original={0: 64})
    select(plan, ratio=0.5, round_to=8, min_channels=8)
    assert _kept(plan) == [32]


def test_resnet_min_channels_max_ratio_and_exclusions():
    torch.manual_seed(0)
    m = create_model("resnet18", 5)
    report = prune_model(m, [32, 32], "l1", 0.9, round_to=8, min_channels=16, max_ratio=0.8, exclude=["layer4.*"])
    widths = {n: c.out_channels for n, c in m.named_modules() if isinstance(c, nn.Conv2d)}
    assert all(w % 8 == 0 for w in widths.values())
    assert all(w == 512 for n, w in widths.items() if n.startswith("layer4"))
    rows = {r["layer"]: r for r in report["layers"]}
    for n, w in widths.items():
        if not n.startswith("layer4") and not n.startswith("layer3.0.downsample"):
            assert w >= max(16, 0.2 * rows[n]["channels_before"]), (n, w)
    assert rows["layer1.0.conv1"]["requested_ratio"] == 0.9
    assert rows["layer1.0.conv1"]["achieved_ratio"] == pytest.approx(1 - 16 / 64)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match="matches no layer"):
        prune_model(create_model("resnet18", 5), [32, 32], exclude=["nolayer*"])


def test_record_warns_when_a_layer_ends_below_its_minimum():
    torch.manual_seed(0)
    m = create_model("efficientnet_b0", 5)
    _, report = prune_network(m, [32, 32], "l1", 0.5, min_channels=8)
    # squeeze-excitation layers of 4 or 6 channels cannot reach 8: kept as they are, and reported
    assert report["warnings"] and all("below --min-channels 8" in w for w in report["warnings"])
    assert any(w.startswith("features.2.0.block.2.fc1 keeps 4 ") for w in report["warnings"])
    widths = [c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert all(w % 8 == 0 or w < 8 for w in widths)


def test_threshold_is_refused_for_ranking_criteria():
    with pytest.raises(ValueError, match="absolute score"):
        prune_network(create_model("resnet18", 5), [32, 32], "l1", None, threshold=0.1)
