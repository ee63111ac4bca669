"""`sparse-train --from-scratch` (seed 001's protocol): the file's architecture freshly initialized,
its trained weights unused; pruned or quantized models refused; the flag from the CLI and the
benchmark's --l1rr-protocol."""
import importlib.util
from pathlib import Path

import pytest
import torch

from rsedge.cli.main import main

QUIET = dict(progress=False, log=lambda m: None)
BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_fresh_model_is_seeded_and_leaves_the_global_rng_alone(trained):
    from rsedge.compress.sparse import fresh_model
    from rsedge.trainer.modelfile import read_metadata

    meta = read_metadata(trained)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = _params(fresh_model(meta, 0)), _params(fresh_model(meta, 0)), _params(fresh_model(meta, 1))
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_from_scratch_starts_from_fresh_weights_and_says_so(tmp_path, synth_data, trained):
    from rsedge.compress.sparse import fresh_model, sparse_train_run
    from rsedge.trainer.modelfile import load_model, read_metadata
    from rsedge.trainer.train import TrainConfig

    # lr 0: the parameters stay what training started from, so they show where it started
    cfg = TrainConfig(epochs=1, batch_size=32, optimizer="sgd", lr=0.0, workers=0, seed=3, device="cpu")
    rec = sparse_train_run(trained, synth_data, tmp_path / "s", method="l1rr", cfg=cfg, phase_epochs=1,
                           from_scratch=True, **QUIET)
    out, meta = load_model(tmp_path / "s" / "model.safetensors")
    source, _ = load_model(trained)
    got, src, fresh = _params(out), _params(source), _params(fresh_model(read_metadata(trained), 3))
    assert all(torch.equal(got[k], fresh[k]) for k in got)
    assert not torch.allclose(got["conv1.weight"], src["conv1.weight"])
    assert rec["parameters"]["from_scratch"] is True
    assert meta["history"][-1]["stage"] == "sparse-train" and meta["history"][-1]["from_scratch"] is True
    assert meta["classes"] == read_metadata(trained)["classes"]


def test_a_pruned_model_cannot_start_from_scratch(tmp_path, synth_data, trained):
    from rsedge.compress.prune import prune_run
    from rsedge.compress.sparse import sparse_train_run

    prune_run(trained, tmp_path / "p", method="l1", ratio=0.5, **QUIET)
    with pytest.raises(ValueError, match="--from-scratch needs an unpruned architecture, but .* is pruned"):
        sparse_train_run(tmp_path / "p" / "model.safetensors", synth_data, tmp_path / "s", from_scratch=True,
                         **QUIET)


def test_a_quantized_model_cannot_start_from_scratch():
    from rsedge.compress.sparse import _check_unpruned_float

    with pytest.raises(ValueError, match="unpruned float model, but m.safetensors is quantized .8-bit msb-fixed"):
        _check_unpruned_float({"quantization": {"scheme": "msb-fixed", "bits": 8}, "layout": {}}, "m.safetensors")
    _check_unpruned_float({"layout": {"layers": {}, "tensors": {}}}, "m.safetensors")  # unpruned float: accepted


def test_the_record_says_from_scratch_false_by_default():
    from rsedge.compress.sparse import SparseOptions

    assert SparseOptions().parameters(1, 3)["from_scratch"] is False
    assert SparseOptions(from_scratch=True).parameters(1, 3)["from_scratch"] is True


@pytest.mark.parametrize("flag, expected", [([], False), (["--from-scratch"], True)])
def test_cli_flag_reaches_the_options(monkeypatch, tmp_path, flag, expected):
    import rsedge.compress.sparse as sparse

    seen = {}
    monkeypatch.setattr(sparse, "sparse_train_run", lambda model, data, out, options: seen.update(o=options))
    assert main(["sparse-train", "--model", "m.safetensors", "--data", "d", "--out", str(tmp_path), *flag]) == 0
    assert seen["o"].from_scratch is expected and seen["o"].method == "l1rr"


def test_bench_pruning_takes_the_l1rr_protocol(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_pruning_protocol", str(BENCH / "bench_pruning.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_args([]).l1rr_protocol == "rsedge"
    assert bench.parse_args(["--l1rr-protocol", "paper"]).l1rr_protocol == "paper"
    with pytest.raises(SystemExit):
        bench.parse_args(["--l1rr-protocol", "other"])
    assert bench.method_dir("l1rr", "paper") != bench.method_dir("l1rr", "rsedge")
    assert bench.method_dir("l1", "paper") == "l1"
    settings, note = bench.l1rr_text("rsedge", 4, 2)
    assert "rsedge" in settings and "from scratch" in note and "without fine-tuning" in note
    settings, note = bench.l1rr_text("paper", 4, 2)
    assert "`paper`" in settings and "from scratch" in settings and "no fine-tuning" in settings
