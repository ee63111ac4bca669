"""MSB fixed-point weight quantization (seed 002, section 2.3): the exponent rule on crafted
weights, underflow and saturation exactly as the paper's example, int8 model files, the memory
the paper reports, prune-then-quantize, and `rsedge quantize` end to end."""
import argparse
import copy
import json

import pytest
import torch
from torch import nn

from rsedge.compress.msb_fixed import (
    MsbOptions,
    QuantizedTensor,
    choose_frac_bits,
    msb_histogram,
    msb_positions,
    msb_quantize_model,
    quantization_meta,
    quantize_fixed,
    quantize_run,
    quantize_tensor,
    quantized_weights,
    weight_memory,
    weight_memory_bytes,
)
from rsedge.trainer.modelfile import ModelFileError, derive_meta, load_model, read_metadata, save_model
from rsedge.trainer.models import create_model


def _meta(classes=("a", "b", "c")):
    return {"arch": "resnet18", "classes": list(classes), "input_size": [32, 32],
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}


def _resnet(seed=0, classes=3):
    torch.manual_seed(seed)
    model = create_model("resnet18", classes).eval()
    for m in model.modules():  # BN statistics that are not the identity, so a wrong load shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.2, 1.0)
    return model


# -- the rule on hand-made weights ----------------------------------------------------------------

def test_the_papers_example_underflow_precision_loss_and_saturation():
    """f = 3 in 8 bits: steps of 0.125, largest 15.875 (the paper prints 15.874)."""
    w = torch.tensor([0.03125, 2.1, 16.25, -16.25, -0.03125, 0.125, 0.0])
    q, stats = quantize_tensor(w, bits=8, frac_bits=3)
    assert q.ints.dtype == torch.int8
    assert q.ints.tolist() == [0, 17, 127, -127, 0, 1, 0]
    assert q.dequantize().tolist() == [0.0, 2.125, 15.875, -15.875, 0.0, 0.125, 0.0]
    assert stats["max_value"] == 15.875 and stats["window"] == [-3, 3]
    assert (stats["nonzero"], stats["underflow_count"], stats["saturated_count"]) == (6, 2, 2)
    assert stats["underflow"] == pytest.approx(2 / 6) and stats["saturated"] == pytest.approx(2 / 6)
    assert stats["max_abs_error"] == pytest.approx(0.375)  # 16.25 -> 15.875


def test_the_majority_of_msbs_places_the_papers_window():
    """Ten weights at each MSB position -3..3 and one outlier on either side: the 7-bit window
    [-3, 3] holds 70 MSBs, any other at most 61, so f = 3; the outliers underflow and saturate."""
    body = [s * 1.3 * 2.0 ** p for p in range(-3, 4) for s in (1, -1) * 5]
    w = torch.tensor(body + [16.25, 0.03125])
    assert msb_histogram(w) == {**{p: 10 for p in range(-3, 4)}, 4: 1, -5: 1}
    q, stats = quantize_tensor(w)  # 8 bits, majority
    assert stats["frac_bits"] == 3 and stats["window"] == [-3, 3]
    assert (stats["underflow_count"], stats["saturated_count"]) == (1, 1)
    assert stats["underflow"] == pytest.approx(1 / 72) and stats["saturated"] == pytest.approx(1 / 72)
    assert q.dequantize()[-2:].tolist() == [15.875, 0.0]
    assert stats["msb_histogram"] == {str(p): c for p, c in msb_histogram(w).items()}


def test_window_rules_on_crafted_histograms():
    # a tie between two windows goes to the higher one (a saturated weight loses more than an underflowed one)
    assert choose_frac_bits({0: 5, 7: 5}, bits=8) == 6 - 7
    # the window's top is an occupied position: nothing is wasted above the largest MSB
    assert choose_frac_bits({-4: 3}, bits=8) == 6 + 4
    # one large weight is outvoted by many small ones at the bottom of a wider spread ...
    hist = {2: 1, **{p: 10 for p in range(-6, 1)}}
    assert choose_frac_bits(hist, bits=8, window="majority") == 6  # window [-6, 0]: 2 saturates
    # ... but covered by the `max` rule
    assert choose_frac_bits(hist, bits=8, window="max") == 4  # window [-4, 2]
    assert choose_frac_bits({}, bits=8) == 6  # all zeros: any f is exact
    assert choose_frac_bits({0: 1}, bits=4) == 2  # 3 magnitude bits: window [-2, 0]
    with pytest.raises(ValueError, match="unknown window rule"):
        choose_frac_bits({0: 1}, window="median")
    with pytest.raises(ValueError, match="needs the values"):
        choose_frac_bits({0: 1}, window="mse")


def test_the_mse_window_has_the_least_error_of_the_candidates():
    torch.manual_seed(0)
    w = torch.randn(4000) * 0.05
    w[0] = 0.9  # an outlier several positions above the bulk
    errors = {}
    for window in ("majority", "max", "mse"):
        q, stats = quantize_tensor(w, bits=4, window=window)
        errors[window] = float((q.dequantize().double() - w.double()).square().sum())
    assert errors["mse"] <= min(errors["majority"], errors["max"])
    top = max(msb_histogram(w))
    brute = min(float((QuantizedTensor(quantize_fixed(w, 2 - t, 4)[0], 2 - t, 4).dequantize().double()
                       - w.double()).square().sum()) for t in set(msb_histogram(w)) if t >= top - 3)
    assert errors["mse"] == pytest.approx(brute)


def test_msb_positions_are_exact_at_powers_of_two():
    w = torch.tensor([1.0, 0.5, 0.25 * (1 - 2 ** -20), 3.0, -8.0, 0.0, 2.0 ** -30, 1000.0])
    assert msb_positions(w).tolist() == [0, -1, -3, 1, 3, -30, 9]


def test_rounding_ties_away_from_zero_and_the_range_is_symmetric():
    step = 0.125
    w = torch.tensor([step / 2, -step / 2, step / 2 * 0.999, 1.5 * step, -1.5 * step, -100.0])
    q, clipped = quantize_fixed(w, 3, 8)
    assert q.tolist() == [1, -1, 0, 2, -2, -127]  # half a step rounds up in magnitude; -128 is never used
    assert clipped.tolist() == [False] * 5 + [True]
    torch.manual_seed(1)
    r = torch.randn(1000) * 4
    assert torch.equal(quantize_fixed(-r, 3, 8)[0], -quantize_fixed(r, 3, 8)[0])


@pytest.mark.parametrize("bits,dtype,qmax", [(4, torch.int8, 7), (8, torch.int8, 127), (12, torch.int16, 2047),
                                             (16, torch.int16, 32767)])
def test_word_lengths(bits, dtype, qmax):
    torch.manual_seed(0)
    q, stats = quantize_tensor(torch.randn(500), bits=bits)
    assert q.ints.dtype == dtype and int(q.ints.abs().max()) <= qmax
    assert stats["window"][1] - stats["window"][0] == bits - 2  # bits - 1 magnitude positions


@pytest.mark.parametrize("bad", [3, 17, 8.0, True])
def test_bits_outside_4_to_16_are_refused(bad):
    with pytest.raises(ValueError, match="--bits must be an integer from 4 to 16"):
        MsbOptions(bits=bad).check()


def test_non_finite_weights_are_refused():
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_tensor(torch.tensor([1.0, float("nan")]))


# -- a model --------------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1)
        self.fc = nn.Linear(24, 4)

    def forward(self, x):
        return self.fc(self.conv2(torch.relu(self.bn1(self.conv1(x)))).mean((2, 3)))


def test_model_quantized_in_place_weights_on_the_grid_bn_float():
    torch.manual_seed(0)
    model = Tiny()
    bn_before = {k: v.clone() for k, v in model.bn1.state_dict().items()}
    _, record = msb_quantize_model(model)
    assert set(record["layers"]) == {"conv1.weight", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias"}
    assert record["layers"]["conv2.bias"]["layer"] == "conv2" and record["layers"]["conv2.bias"]["kind"] == "bias"
    for key, stats in record["layers"].items():
        w = model.state_dict()[key]
        assert torch.equal(w * 2.0 ** stats["frac_bits"], torch.round(w * 2.0 ** stats["frac_bits"])), key
    assert all(torch.equal(v, bn_before[k]) for k, v in model.bn1.state_dict().items())
    weights = quantized_weights(model, quantization_meta(record))
    assert weights.frac_bits() == {k: v["frac_bits"] for k, v in record["layers"].items()}
    _, no_bias = msb_quantize_model(Tiny(), options=MsbOptions(biases=False))
    assert set(no_bias["layers"]) == {"conv1.weight", "conv2.weight", "fc.weight"}


def test_weight_memory_counts_int8_exponents_and_what_stays_float():
    model = Tiny()
    conv_fc = 16 * 3 * 9 + 24 * 16 * 9 + 24 + 24 * 4 + 4
    bn = 16 * 4  # weight, bias, running mean and variance; the batch counter is no weight
    assert weight_memory_bytes(model) == 4 * (conv_fc + bn)
    _, record = msb_quantize_model(model)
    mem = weight_memory(model, quantization_meta(record))
    assert mem["bytes"] == conv_fc + 5 + 4 * bn  # one byte per weight, one per exponent, BN float32
    assert mem["params"] == conv_fc + bn and mem["quantized_params"] == conv_fc
    _, record16 = msb_quantize_model(Tiny(), options=MsbOptions(bits=12))
    assert weight_memory_bytes(Tiny(), quantization_meta(record16)) == 2 * conv_fc + 5 + 4 * bn


# -- the model file -------------------------------------------------------------------------------

def _quantized_file(folder, model=None, meta=None, **options):
    model = model if model is not None else _resnet()
    meta = meta or _meta()
    _, record = msb_quantize_model(model, options=MsbOptions(**options))
    path = save_model(folder / "q.safetensors", model, derive_meta(
        meta, "quantize", quantization=quantization_meta(record), history_entry={"scheme": "msb-fixed"}))
    return model, record, path


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    """An 8-bit resnet18 model file: (the quantized model, its record, the file)."""
    return _quantized_file(tmp_path_factory.mktemp("q8"))


def test_model_file_stores_int8_and_loads_an_evaluable_float_model(tmp_path, q8):
    from safetensors import safe_open

    float_path = save_model(tmp_path / "f.safetensors", _resnet(), _meta())
    model, record, path = q8
    with safe_open(str(path), framework="pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    assert {dtypes[k] for k in record["layers"]} == {torch.int8}
    assert dtypes["bn1.weight"] == torch.float32 and dtypes["bn1.running_var"] == torch.float32
    assert 0.24 < path.stat().st_size / float_path.stat().st_size < 0.27
    loaded, meta = load_model(path)
    assert all(v.dtype == torch.float32 for k, v in loaded.state_dict().items() if k in record["layers"])
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    q = meta["quantization"]
    assert q["scheme"] == "msb-fixed" and q["bits"] == 8 and q["window"] == "majority"
    assert q["layers"]["conv1.weight"]["frac_bits"] == record["layers"]["conv1.weight"]["frac_bits"]
    assert meta["history"][-1]["stage"] == "quantize"


def test_weights_changed_after_quantizing_are_not_saved_as_int8(tmp_path, q8):
    model, record, path = q8
    model, meta = copy.deepcopy(model), read_metadata(path)
    with torch.no_grad():
        model.conv1.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(ValueError, match="conv1.weight is not on its 8-bit fixed-point grid"):
        save_model(tmp_path / "bad.safetensors", model, meta)


def test_a_quantized_file_whose_tensors_are_float_is_refused(tmp_path, q8):
    from safetensors.torch import load_file, save_file

    _, _, path = q8
    state = {k: v.float() if v.dtype == torch.int8 else v for k, v in load_file(str(path)).items()}
    save_file(state, str(tmp_path / "odd.safetensors"), metadata={"rsedge": json.dumps(read_metadata(path))})
    with pytest.raises(ModelFileError, match="fixed-point tensor .* is stored as torch.float32, not as integers"):
        load_model(tmp_path / "odd.safetensors")


def test_sixteen_bit_words_are_stored_as_int16(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    small = create_model("mobilenet_v3_small", 3).eval()
    _, _, path = _quantized_file(tmp_path, small, {**_meta(), "arch": "mobilenet_v3_small"}, bits=12)
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("features.0.0.weight").dtype == torch.int16
    loaded, meta = load_model(path)
    assert meta["quantization"]["bits"] == 12


# -- the stage: prune before quantize, never twice ------------------------------------------------

def test_a_pruned_model_quantizes_and_a_quantized_one_is_refused(tmp_path):
    from rsedge.compress.prune import prune_model

    model = _resnet()
    prune_model(model, [32, 32], method="l1", ratio=0.5)
    meta = {**_meta(), "history": [{"stage": "prune", "method": "l1"}]}
    pruned = save_model(tmp_path / "pruned.safetensors", model, meta)
    result = quantize_run(pruned, tmp_path / "q", plot_layers=2, log=lambda m: None)
    loaded, qmeta = load_model(tmp_path / "q" / "model.safetensors")
    assert [h["stage"] for h in qmeta["history"]] == ["prune", "quantize"]
    assert qmeta["layout"]["layers"] and qmeta["params"] == read_metadata(pruned)["params"]
    assert result["memory"]["float"]["bytes"] / result["memory"]["quantized"]["bytes"] > 3.8
    with pytest.raises(ValueError, match="already 8-bit msb-fixed .* quantize the float model it was made from"):
        quantize_run(tmp_path / "q" / "model.safetensors", tmp_path / "q2", log=lambda m: None)
    assert not (tmp_path / "q2").exists()


# -- the command ----------------------------------------------------------------------------------

@pytest.fixture
def rsedge_main(monkeypatch):
    """`rsedge` with the quantize command registered (cli/main.py registers it; until then here)."""
    from rsedge.cli import main as cli_main
    from rsedge.cli.quantize_cmd import add_quantize_parser

    build = cli_main.build_parser

    def with_quantize():
        parser = build()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "quantize" not in sub.choices:
            add_quantize_parser(sub)
        return parser

    monkeypatch.setattr(cli_main, "build_parser", with_quantize)
    return cli_main.main


def test_cli_quantize_end_to_end_with_evaluation(tmp_path, synth_data, rsedge_main, capsys):
    from rsedge.trainer.stage import split_for_model

    classes = sorted(p.name for p in synth_data.iterdir() if p.is_dir())
    meta = {**_meta(classes), "task": "classification"}
    split_for_model(meta, synth_data, tmp_path, progress=False, log=lambda m: None)
    meta["split"] = str(tmp_path / "split.json")
    model_file = save_model(tmp_path / "m.safetensors", _resnet(classes=len(classes)), meta)
    out = tmp_path / "q"
    rc = rsedge_main(["quantize", str(model_file), "--out", str(out), "--data", str(synth_data), "--workers", "0",
                      "--quiet", "--plot-layers", "4"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "tensors quantized  22 (8-bit msb-fixed, window majority, biases too)" in printed
    assert "underflow          mean" in printed and "MB ->" in printed and "top1" in printed
    record = json.loads((out / "record.json").read_text())
    assert record["stage"] == "quantize" and len(record["layers"]) == 22
    assert record["evaluation"]["before"]["samples"] == record["evaluation"]["after"]["samples"] > 0
    assert "test split" in record["evaluation"]["images"]
    assert (out / "msb_histograms.png").read_bytes()[:4] == b"\x89PNG"
    meta_q = read_metadata(out / "model.safetensors")
    assert meta_q["metrics"]["test_top1"] == record["evaluation"]["after"]["top1"]
    # again into the same folder: refused without --exist-ok, accepted with it
    assert rsedge_main(["quantize", "--model", str(model_file), "--out", str(out)]) == 2
    assert "--exist-ok" in capsys.readouterr().err
    assert rsedge_main(["quantize", "--model", str(model_file), "--out", str(out), "--exist-ok", "--bits", "6",
                        "--window", "mse", "--plot-layers", "0"]) == 0
    assert json.loads((out / "record.json").read_text())["parameters"]["bits"] == 6
    assert not (out / "msb_histograms.png").exists()
    # a quantized model is not quantized again; bad --bits is one line
    assert rsedge_main(["quantize", str(out / "model.safetensors"), "--out", str(tmp_path / "again")]) == 2
    assert "already 6-bit msb-fixed" in capsys.readouterr().err
    assert rsedge_main(["quantize", str(model_file), "--out", str(tmp_path / "b"), "--bits", "20"]) == 2
    assert "--bits must be an integer from 4 to 16" in capsys.readouterr().err
