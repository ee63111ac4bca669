
import pytest
import runtime_fakes as H

from rsedge.runtime.build import onnx_meta
from rsedge.runtime.errors import RuntimeToolError
from rsedge.runtime.preprocess import onnx_metadata

pytest.importorskip("onnx", reason="the onnx package builds the test models (host-only dependency)")


def test_reads_metadata_io_and_nodes_without_onnx(tmp_path):
    path = H.make_classifier_onnx(str(tmp_path / "m.onnx"))
    info = onnx_meta.read_onnx_info(path)
    assert info["ir_version"] == 8 and info["producer"] == "rsedge-tests"
    assert info["opsets"] == {"ai.onnx": 13}
    assert info["metadata"] == H.metadata_props()
    assert info["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 3, 16, 16]}]
    assert info["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}]
    assert info["nodes"] == [("conv1", "Conv"), ("relu1", "Relu"), ("pool", "GlobalAveragePool"),
                             ("flatten", "Flatten"), ("fc", "Gemm")]
    assert onnx_meta.describe_node(info, 4) == "node 4 'fc' (Gemm)"
    assert onnx_meta.describe_node(info, 99) == "node 99"


def test_agrees_with_the_onnx_package(tmp_path):
    import onnx

    path = H.make_classifier_onnx(str(tmp_path / "m.onnx"), batch=2, qdq=True)
    model = onnx.load(path)
    info = onnx_meta.read_onnx_info(path)
    assert info["nodes"] == [(n.name, n.op_type) for n in model.graph.node]
    assert info["metadata"] == dict((p.key, p.value) for p in model.metadata_props)
    assert info["inputs"][0]["shape"] == [2, 3, 16, 16]


def test_initializers_listed_as_inputs_are_left_out(tmp_path):
    import onnx
    from onnx import helper

    path = H.make_classifier_onnx(str(tmp_path / "m.onnx"))
    model = onnx.load(path)
    for init in model.graph.initializer:  # old exporters list weights among graph inputs
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.save(model, path)
    assert [i["name"] for i in onnx_meta.read_onnx_info(path)["inputs"]] == ["input"]


def test_preprocess_metadata_from_onnx_and_fallback_json(tmp_path):
    path = H.make_classifier_onnx(str(tmp_path / "m.onnx"), metadata=False)
    assert onnx_metadata(path) == {}
    (tmp_path / "preprocess.json").write_text('{"input_size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [1, 1, 1]}')
    assert onnx_metadata(path) == {"input_size": [16, 16], "mean": [0.5, 0.5, 0.5], "std": [1, 1, 1]}
    with_meta = H.make_classifier_onnx(str(tmp_path / "n.onnx"))
    meta = onnx_metadata(with_meta)
    assert meta["mean"] == H.MEAN and meta["input_size"] == [16, 16]  # the model's own keys win
    assert meta["classes"] == list(H.CLASSES)


def test_truncated_and_foreign_files_are_clear_errors(tmp_path):
    path = H.make_classifier_onnx(str(tmp_path / "m.onnx"))
    data = open(path, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(onnx_meta.OnnxFormatError):
        onnx_meta.read_onnx_info(str(cut))
    text = tmp_path / "notes.onnx"
    text.write_bytes(b"this is not a model\n")
    with pytest.raises(onnx_meta.OnnxFormatError):
        onnx_meta.read_onnx_info(str(text))
    with pytest.raises(RuntimeToolError):
        onnx_meta.read_onnx_info(str(tmp_path / "missing.onnx"))
