"""L1RR's feature-attention loss: the formula, the class-activation target regions, and the
search for the largest threshold within the target."""
import pytest
import torch
from torch import nn

from rsedge.compress.lfa import feature_attention, feature_model, lfa, search_threshold
from rsedge.trainer.tasks.classification import grad_cam_masks as target_masks


class GapNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.relu(self.conv(x))), 1))


def test_feature_attention_and_lfa_on_a_hand_case():
    class Fixed(nn.Module):
        def forward(self, x):
            return x.sum((1, 2, 3)), x

    feats = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.5, 0.0], [0.0, 8.0]]]])
    masks = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 0.0], [1.0, 1.0]]])
    fa = feature_attention(Fixed(), feats, masks)
    assert fa == pytest.approx(((1 + 4) + (0 + 8)) / 2)
    assert lfa(fa * 0.99, fa) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="FA = 0"):
        lfa(1.0, 0.0)


def test_target_region_is_the_class_activation_map_above_its_mean():
    torch.manual_seed(0)
    net = GapNet().eval()
    fm = feature_model(net)
    x = torch.randn(3, 3, 6, 6)
    y = torch.tensor([0, 2, 3])
    logits, feat = fm(x)
    assert torch.allclose(logits, net(x)) and feat.shape == (3, 5, 6, 6)
    masks = target_masks(fm, x, y)
    cam = torch.einsum("nc,nchw->nhw", net.fc.weight[y], feat).detach()  # CAM (Zhou et al. 2016)
    assert torch.equal(masks.bool(), cam >= cam.mean((1, 2), keepdim=True))


def test_search_picks_the_largest_threshold_within_the_target():
    scores = torch.linspace(0, 1, 101)
    evaluated = []

    def evaluate(delta):
        evaluated.append(delta)
        return delta / 10, delta  # L_FA grows with the threshold

    best, curve = search_threshold(scores, evaluate, target=0.0405, log=lambda m: None)
    assert best == pytest.approx(0.40, abs=1e-6)
    assert len(evaluated) <= 19 + 8 and curve == sorted(curve, key=lambda r: r["threshold"])
    none, _ = search_threshold(scores, lambda d: (1.0, d), target=0.01, log=lambda m: None)
    assert none is None
    # two-sided: a large NEGATIVE L_FA (the pruned model attends far more than the sparse one) fails too
    swing, _ = search_threshold(scores, lambda d: (-d / 10, d), target=0.0405, log=lambda m: None)
    assert swing == pytest.approx(0.40, abs=1e-6)


def test_search_on_a_sparse_model_prunes_its_silent_channels(tmp_path, synth_data, trained):
    from rsedge.compress.prune import prune_run
    from rsedge.trainer.modelfile import load_model, save_model

    model, meta = load_model(trained)
    with torch.no_grad():  # what L1RR's sparse training produces: a quarter of the scales near zero
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight[::4] = 1e-4
                bn.bias[::4] = 0.0
    meta["history"] = meta["history"] + [{"stage": "sparse-train", "method": "l1rr"}]
    sparse = save_model(tmp_path / "sparse.safetensors", model, meta)
    logs = []
    report = prune_run(sparse, tmp_path / "p", method="l1rr", ratio=None, target_lfa=0.01, data=synth_data,
                       log=logs.append, round_to=1, min_channels=1, workers=0, progress=False, lfa_images=16)
    assert report["threshold"] >= 1e-4
    assert 0.2 <= report["pruned_channel_fraction"] < 0.5
    import json

    rec = json.loads((tmp_path / "p" / "record.json").read_text())
    fa = rec["feature_attention"]
    assert fa["chosen"]["lfa"] <= 0.01 and len(fa["curve"]) >= 5 and fa["target"] == 0.01
    assert not any("not sparse-trained" in m for m in logs)
