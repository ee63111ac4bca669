"""The segmentation architectures of the registry: DeepLabV3+ (smp, output stride 16, ASPP rates
6/12/18, stride-4 skip) and LR-ASPP; logits (N, C, H, W) at the input size, the input-size
check, local weights only, and a static opset-13 ONNX export that runs in ONNX Runtime."""
import collections
import socket

import numpy as np
import pytest
import torch
from tiny_models import randomized  # noqa: F401 - test_seg_prune imports it from here too
from torch import nn

from rsedge.trainer.models import create_model, get_spec, head_modules
from rsedge.trainer.seg_models import INPUT_MULTIPLE, check_input_size, input_multiple

SEG = ["deeplabv3plus_resnet18", "deeplabv3plus_resnet50", "lraspp_mobilenet_v3_large"]
# ops that compute shapes at run time: none may survive simplification of a static-size export
SHAPE_OPS = {"Shape", "Size", "Range", "ConstantOfShape", "NonZero"}


def export_simplified(model, size, path):
    """The export path of `rsedge export` for a static input: the TorchScript exporter at opset
    13, then onnxslim (kept only when ONNX Runtime gives the same outputs); returns the graph."""
    import onnx

    from rsedge.export.onnx_export import _torch_export, exportable, simplify

    example = torch.zeros(1, 3, *size)
    to_export, _ = exportable(model.eval(), example)
    raw = path.with_suffix(".raw.onnx")
    assert _torch_export(to_export, example, raw, 13, ["logits"], {}) == "torchscript"
    check = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    info = simplify(raw, path, "onnxslim", check, log=lambda m: None)
    assert info["applied"], info
    return onnx.load(str(path))


def shape_chains(graph) -> list[str]:
    """Nodes that compute or read a run-time shape: shape ops, and Gather / Slice / Concat /
    Resize inputs produced by one."""
    shape_out = {o for n in graph.node if n.op_type in SHAPE_OPS for o in n.output}
    return [n.op_type for n in graph.node if n.op_type in SHAPE_OPS or shape_out & set(n.input)]


def ort_outputs(path, images):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"input": images[i:i + 1]})[0] for i in range(len(images))])


def test_registry_declares_task_head_outputs_size_and_normalization():
    for arch in SEG:
        spec = get_spec(arch)
        assert spec.task == "segmentation" and spec.outputs == ("logits",)
        assert spec.input_size == (256, 256) and spec.normalization["mean"] == pytest.approx([0.485, 0.456, 0.406])
        assert input_multiple(arch) == INPUT_MULTIPLE == 32
    assert input_multiple("resnet18") == 1
    assert get_spec("deeplabv3plus_resnet18").args["decoder_atrous_rates"] == [6, 12, 18]
    assert get_spec("lraspp_mobilenet_v3_large").head == ("classifier.low_classifier", "classifier.high_classifier")


@pytest.mark.parametrize("arch", SEG)
def test_logits_at_the_input_size_and_head_is_the_classifier(arch):
    model = create_model(arch, 4)
    heads = head_modules(model)
    assert heads and all(isinstance(h, nn.Conv2d) and h.out_channels == 4 for h in heads)
    x = torch.randn(2, 3, 64, 96)
    model.train()
    assert model(x).shape == (2, 4, 64, 96)  # training mode too (BatchNorm over a batch of two)
    with torch.no_grad():
        out = model.eval()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 64, 96)


def test_deeplab_output_stride_16_rates_6_12_18_and_the_stride_4_skip():
    model = create_model("deeplabv3plus_resnet18", 3).eval()
    rates = [model.get_submodule(f"decoder.aspp.0.convs.{i}.0.0").dilation for i in (1, 2, 3)]
    assert rates == [(6, 6), (12, 12), (18, 18)]
    assert all(model.get_submodule(f"decoder.aspp.0.convs.{i}.0.0").groups > 1 for i in (1, 2, 3))  # separable
    seen = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, inp, out, n=n: seen.__setitem__(
        n, tuple(inp[0].shape[-2:]))) for n in ("decoder.aspp", "decoder.block1")]
    with torch.no_grad():
        model(torch.zeros(1, 3, 128, 192))
    for h in hooks:
        h.remove()
    assert seen["decoder.aspp"] == (8, 12)  # output stride 16
    assert seen["decoder.block1"] == (32, 48)  # low-level skip from stride 4
    assert model.decoder.block1[0].in_channels == model.encoder.layer1[-1].conv2.out_channels


def test_input_sides_must_be_multiples_of_32():
    with pytest.raises(ValueError, match=r"^input 250x250: segmentation models need sides that are multiples of 32, "
                                         r"e\.g\. 256$"):
        check_input_size((250, 250))
    with pytest.raises(ValueError, match=r"input 100x520: .* e\.g\. 96x512$"):
        check_input_size([100, 520])
    assert check_input_size((64, 96)) == (64, 96) and check_input_size(256) == (256, 256)
    for arch in ("deeplabv3plus_resnet18", "lraspp_mobilenet_v3_large"):
        with pytest.raises(ValueError, match="input 48x64: segmentation models need sides"):
            create_model(arch, 3).eval()(torch.zeros(1, 3, 48, 64))


def test_construction_never_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access while building a model")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for arch in SEG:
        create_model(arch, 3)
    with pytest.raises(ValueError, match="never downloads"):
        create_model("deeplabv3plus_resnet18", 3, encoder_weights="imagenet")
    with pytest.raises(ValueError, match="never downloads"):
        create_model("lraspp_mobilenet_v3_large", 3, weights_backbone="DEFAULT")
    with pytest.raises(ValueError, match="at least 2"):
        create_model("deeplabv3plus_resnet18", 1)


def test_initial_weights_from_a_local_file_and_smp_names(tmp_path):
    import segmentation_models_pytorch as smp
    from safetensors.torch import save_file

    source = randomized("deeplabv3plus_resnet18", classes=3, seed=4)
    path = tmp_path / "deeplab.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_model("deeplabv3plus_resnet18", 3, weights=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    # smp's own parameter names, so a checkpoint of smp.DeepLabV3Plus loads as it is
    reference = smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=3, decoder_atrous_rates=(6, 12, 18))
    assert {k: v.shape for k, v in reference.state_dict().items()} == {
        k: v.shape for k, v in loaded.state_dict().items()}


@pytest.mark.parametrize("arch", ["deeplabv3plus_resnet18", "lraspp_mobilenet_v3_large"])
def test_static_opset13_export_has_no_shape_chain_and_matches_torch(tmp_path, arch):
    model = randomized(arch, classes=4)
    proto = export_simplified(model, (64, 96), tmp_path / "m.onnx")
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 13
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*proto.graph.input,
                                                                                   *proto.graph.output]}
    assert dims == {"input": [1, 3, 64, 96], "logits": [1, 4, 64, 96]}
    assert not shape_chains(proto.graph), collections.Counter(shape_chains(proto.graph))
    images = np.random.default_rng(1).standard_normal((2, 3, 64, 96)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(images)).numpy()
    assert np.abs(ort_outputs(tmp_path / "m.onnx", images) - ref).max() < 1e-4
