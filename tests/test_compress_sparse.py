"""Sparse training: L1RR's alpha / lambda / decay updates on a hand-computed case, network
slimming's L1 gradient, and the sparse-train stage's record."""
import math

import pytest
import torch
from torch import nn

from rsedge.compress.sparse import SparseRegularizer


class TwoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn2(x)


G1 = [0.005, -0.5, 2.0, 0.001]  # 2 of 4 below 0.01
G2 = [1.0, -0.002, 3.0, 4.0, 0.5, 0.25]  # 1 of 6


def _model():
    m = TwoBN()
    with torch.no_grad():
        m.bn1.weight.copy_(torch.tensor(G1))
        m.bn2.weight.copy_(torch.tensor(G2))
    return m


def _grads(m, reg):
    for bn in (m.bn1, m.bn2):
        bn.weight.grad = torch.zeros_like(bn.weight)
    reg.before_step(m)
    return m.bn1.weight.grad.clone(), m.bn2.weight.grad.clone()


def test_l1rr_alpha_and_lambda_follow_the_formulas():
    m = _model()
    theta, a, eps = 0.1, 2.0, 0.01
    reg = SparseRegularizer(m, "l1rr", theta=theta, a=a, eps=eps, phase_epochs=2)
    reg.on_epoch_start(m, 0)  # phase 1 of the paper: alpha = 0, plain training
    g1, g2 = _grads(m, reg)
    assert not g1.any() and not g2.any()
    assert reg.phases[0]["regularized"] is False and reg.phases[0]["layers"]["bn1"]["lambda"] == 1.0
    reg.on_epoch_start(m, 1)  # inside a phase: nothing refreshed
    assert len(reg.phases) == 1
    reg.on_epoch_start(m, 2)  # second phase: alpha and lambda from the current gammas
    rho = 3 / 10
    lam1 = 2 ** (a * (rho - 2 / 4 - 0))
    lam2 = 2 ** (a * (rho - 1 / 6 - 0))
    entry = reg.phases[-1]
    assert entry["rho"] == pytest.approx(rho)
    assert entry["layers"]["bn1"]["lambda"] == pytest.approx(lam1)
    assert entry["layers"]["bn2"]["lambda"] == pytest.approx(lam2)
    assert entry["layers"]["bn1"]["sparsity"] == 0.5 and entry["layers"]["bn2"]["sparse_channels"] == 1
    g1, g2 = _grads(m, reg)
    exp1 = [theta * lam1 / (abs(v) + eps) * math.copysign(1, v) for v in G1]
    exp2 = [theta * lam2 / (abs(v) + eps) * math.copysign(1, v) for v in G2]
    assert torch.allclose(g1, torch.tensor(exp1), rtol=1e-5)
    assert torch.allclose(g2, torch.tensor(exp2), rtol=1e-5)
    # alpha is frozen for the phase: gamma moves, the reweighting does not
    with torch.no_grad():
        m.bn1.weight.mul_(0.5)
    g1b, _ = _grads(m, reg)
    assert torch.allclose(g1b, g1, rtol=1e-5)


def test_lambda_decays_when_a_layer_stays_saturated():
    m = _model()
    a = 1.0
    reg = SparseRegularizer(m, "l1rr", theta=0.1, a=a, eps=0.01, phase_epochs=1)
    for epoch in range(3):  # gammas unchanged: both layers' sparse counts stay the same
        reg.on_epoch_start(m, epoch)
    last = reg.phases[-1]["layers"]
    assert last["bn1"]["s"] == 1 and last["bn2"]["s"] == 1
    assert last["bn1"]["lambda"] == pytest.approx(2 ** (a * (0.3 - 0.5 - 1)))
    reg.on_epoch_start(m, 3)
    assert reg.phases[-1]["layers"]["bn1"]["s"] == 2
    # a layer whose sparsity moves is not saturated
    with torch.no_grad():
        m.bn2.weight[0] = 0.0
    reg.on_epoch_start(m, 4)
    assert reg.phases[-1]["layers"]["bn2"]["s"] == 2 and reg.phases[-1]["layers"]["bn1"]["s"] == 3
    # a refresh at an epoch already recorded (a resume) replaces it instead of counting twice
    reg.on_epoch_start(m, 4)
    assert [p["epoch"] for p in reg.phases] == [0, 1, 2, 3, 4]


def test_resume_in_the_middle_of_a_phase_restores_alpha_and_lambda():
    m = _model()
    reg = SparseRegularizer(m, "l1rr", theta=0.1, a=1.0, eps=0.01, phase_epochs=2)
    reg.on_epoch_start(m, 0)
    reg.on_epoch_start(m, 2)
    g_ref = _grads(m, reg)
    m2 = _model()
    resumed = SparseRegularizer(m2, "l1rr", theta=0.1, a=1.0, eps=0.01, phase_epochs=2, phases=reg.phases)
    resumed.on_epoch_start(m2, 3)
    g_res = _grads(m2, resumed)
    assert all(torch.allclose(x, y) for x, y in zip(g_ref, g_res))


def test_slimming_adds_sr_sign_gamma():
    m = _model()
    reg = SparseRegularizer(m, "slimming", sr=0.01)
    reg.on_epoch_start(m, 0)
    g1, g2 = _grads(m, reg)
    assert torch.allclose(g1, 0.01 * torch.sign(torch.tensor(G1)))
    assert torch.allclose(g2, 0.01 * torch.sign(torch.tensor(G2)))
    with pytest.raises(ValueError, match="slimming, l1rr"):
        SparseRegularizer(m, "l2")


def test_sparse_train_stage_records_phases_and_shrinks_gamma(tmp_path, synth_data, trained):
    from rsedge.compress.sparse import sparse_train_run
    from rsedge.trainer.modelfile import load_model
    from rsedge.trainer.train import TrainConfig

    quiet = dict(progress=False, log=lambda m: None)
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="sgd", lr=0.01, workers=0, seed=0, device="cpu")
    rec = sparse_train_run(trained, synth_data, tmp_path / "l1rr", method="l1rr", cfg=cfg, theta=0.05,
                           phase_epochs=1, **quiet)
    plain = sparse_train_run(trained, synth_data, tmp_path / "plain", method="l1rr", cfg=cfg, theta=0.0,
                             phase_epochs=1, **quiet)
    assert [p["phase"] for p in rec["phases"]] == [0, 1, 2]
    assert rec["phases"][0]["regularized"] is False and rec["phases"][1]["regularized"] is True
    assert set(rec["phases"][1]["layers"]["layer1.0.bn1"]) >= {"sparsity", "lambda", "s", "channels"}
    assert "rho" in rec["final_sparsity"] and "layer4.1.bn2" in rec["final_sparsity"]["layers"]
    m, meta = load_model(tmp_path / "l1rr" / "model.safetensors")
    p, _ = load_model(tmp_path / "plain" / "model.safetensors")

    def gamma_l1(model):
        return sum(float(b.weight.detach().abs().sum()) for b in model.modules() if isinstance(b, nn.BatchNorm2d))

    assert gamma_l1(m) < gamma_l1(p) - 1.0
    assert meta["history"][-1]["stage"] == "sparse-train" and meta["history"][-1]["method"] == "l1rr"
    assert (tmp_path / "l1rr" / "sparse_state.json").is_file()
    assert plain["phases"][1]["regularized"] is True
