import math

import pytest
import torch

from rsedge.compress.losses import adaptive_mining_loss
from rsedge.trainer.modelfile import load_model
from rsedge.trainer.run import train_run
from rsedge.trainer.train import TrainConfig, lr_at


def test_lr_schedules():
    c = TrainConfig(epochs=10, lr=1.0, schedule="cosine").resolved()
    assert lr_at(c, 0) == pytest.approx(1.0) and lr_at(c, 5) == pytest.approx(0.5) and lr_at(c, 10) == pytest.approx(0)
    s = TrainConfig(epochs=8, lr=1.0, schedule="step", step_milestones=(0.5, 0.75), step_gamma=0.9).resolved()
    assert [round(lr_at(s, e), 4) for e in (0, 3, 4, 5, 6, 7)] == [1.0, 1.0, 0.9, 0.9, 0.81, 0.81]
    w = TrainConfig(epochs=10, lr=1.0, warmup_epochs=2).resolved()
    assert lr_at(w, 0, 0.5) < lr_at(w, 1, 0.5) < 1.0


def test_resume_reaches_the_same_weights(tmp_path, synth_data):
    cfg = TrainConfig(epochs=2, batch_size=32, optimizer="sgd", lr=0.02, workers=0, seed=1, device="cpu")
    quiet = dict(progress=False, log=lambda m: None)
    train_run(synth_data, "resnet18", tmp_path / "full", img_size=32, cfg=cfg, **quiet)
    one = TrainConfig(**cfg.__dict__)
    # an interrupted run: the process dies right after the first epoch's checkpoint
    from rsedge.trainer import train as train_mod

    part = tmp_path / "part"
    calls = {"n": 0}
    real_save = train_mod.save_model

    def crash_after_first_checkpoint(*a, **k):
        real_save(*a, **k)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    train_mod.save_model = crash_after_first_checkpoint
    try:
        with pytest.raises(KeyboardInterrupt):
            train_run(synth_data, "resnet18", part, img_size=32, cfg=one, **quiet)
    finally:
        train_mod.save_model = real_save
    assert (part / "checkpoint.safetensors").is_file() and not (part / "model.safetensors").exists()
    train_run(synth_data, "resnet18", part, img_size=32, cfg=one, resume=True, **quiet)
    a, _ = load_model(tmp_path / "full" / "model.safetensors")
    b, meta = load_model(part / "model.safetensors")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert (part / "confusion.png").is_file() and meta["metrics"]["test_top1"] is not None


def test_aml_value_and_gradient_on_a_hand_computed_case():
    z = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0])
    e2 = math.exp(2.0)
    p0 = e2 / (e2 + 2)
    ce = -math.log(p0)
    d = (1 - p0) + 2 * (1 / (e2 + 2))  # ||onehot - softmax||_1
    expected = 0.4 * ce + math.exp(d / 3 + (d / 3) ** 2)
    loss = adaptive_mining_loss(z, y, r=0.4)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # d = 2(1 - p0), so dL/dz = 0.4 (p - onehot) + exp(.)(1/3 + 2d/9) * (-2) dp0/dz,
    # with dp0/dz = p0 (onehot - p)
    p = torch.tensor([p0, 1 / (e2 + 2), 1 / (e2 + 2)])
    onehot = torch.tensor([1.0, 0, 0])
    dd_dz = -2 * p0 * (onehot - p)
    g = 0.4 * (p - onehot) + math.exp(d / 3 + (d / 3) ** 2) * (1 / 3 + 2 * d / 9) * dd_dz
    assert torch.allclose(z.grad[0], g, atol=1e-5)
