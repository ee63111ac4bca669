"""The TensorRT version adapter's pure logic: version dispatch, batch profiles, precision plans, cache names."""

import pytest

from rsedge.runtime.build import trt_compat
from rsedge.runtime.errors import RuntimeToolError


@pytest.mark.parametrize("version,named,pool,explicit_flag,build_engine_api,calib_deprecated", [
    ("8.0.1.6", False, False, True, True, False),     # JetPack 4.6 (TX2)
    ("8.2.1.8", False, False, True, True, False),     # JetPack 4.6.1 / 4.6.2
    ("8.4.1.5", False, True, True, True, False),
    ("8.5.2.2", True, True, True, True, False),       # JetPack 5.1
    ("8.6.2.3", True, True, True, True, False),       # JetPack 6.0
    ("10.3.0.30", True, True, False, False, True),    # JetPack 6.1/6.2
    ("11.0.0.12", True, True, False, False, True),    # x86, strongly typed only
])
def test_features_per_version(version, named, pool, explicit_flag, build_engine_api, calib_deprecated):
    f = trt_compat.TrtFeatures(version)
    assert (f.named_tensors, f.memory_pool_limit, f.explicit_batch_flag, f.build_engine_api,
            f.calibrators_deprecated) == (named, pool, explicit_flag, build_engine_api, calib_deprecated)
    assert f.tested


def test_version_parsing():
    assert trt_compat.parse_version("8.2.1.8") == (8, 2, 1, 8)
    assert trt_compat.parse_version("10.3.0") == (10, 3, 0, 0)
    assert trt_compat.parse_version("10.0.0b6") == (10, 0, 0, 6)
    assert not trt_compat.TrtFeatures("12.0").tested
    assert not trt_compat.TrtFeatures("7.2.3").tested
    assert trt_compat.TrtFeatures("10.5.0").fast_precision_queries_deprecated
    with pytest.raises(ValueError):
        trt_compat.parse_version("dev")


def test_parse_batch():
    assert trt_compat.parse_batch("8") == (1, 8, 8)
    assert trt_compat.parse_batch(4) == (1, 4, 4)
    assert trt_compat.parse_batch("1,4,8") == (1, 4, 8)
    assert trt_compat.parse_batch((2, 2, 2)) == (2, 2, 2)
    for bad in ("8,1,4", "0", "1,2", "a"):
        with pytest.raises(RuntimeToolError):
            trt_compat.parse_batch(bad)


def test_profile_shapes():
    assert trt_compat.profile_shapes("input", (-1, 3, 64, 64), (1, 4, 8)) == (
        (1, 3, 64, 64), (4, 3, 64, 64), (8, 3, 64, 64))
    assert trt_compat.profile_shapes("input", (1, 3, 64, 64), (1, 1, 1)) is None
    with pytest.raises(RuntimeToolError, match="fixed batch of 1.*--batch 1,1,1"):
        trt_compat.profile_shapes("input", (1, 3, 64, 64), (1, 8, 8))
    with pytest.raises(RuntimeToolError, match="dynamic non-batch"):
        trt_compat.profile_shapes("input", (-1, 3, -1, -1), (1, 1, 1))


@pytest.mark.parametrize("cc,fp16,int8", [
    ("6.2", True, False),   # TX2
    ("5.3", True, False),   # Nano
    ("6.1", False, True),   # GTX 10xx
    ("7.2", True, True),    # Xavier
    ("8.7", True, True),    # Orin
    ("8.9", True, True),
])
def test_fast_precisions_from_compute_capability(cc, fp16, int8):
    assert trt_compat.fast_precisions_from_cc(cc) == (fp16, int8)


def test_platform_precisions_prefers_the_builder_until_deprecated():
    class B:
        platform_has_fast_fp16 = True
        platform_has_fast_int8 = False

    assert trt_compat.platform_precisions(B(), trt_compat.TrtFeatures("8.2.1"), "8.7") == (True, False, "builder")
    fp16, int8, source = trt_compat.platform_precisions(B(), trt_compat.TrtFeatures("10.5.0"), "8.7")
    assert (fp16, int8) == (True, True) and "compute capability" in source


def test_plan_precision():
    f8, f10 = trt_compat.TrtFeatures("8.2.1"), trt_compat.TrtFeatures("10.3.0")
    plan = trt_compat.plan_precision("fp16", None, True, True, True, f8)
    assert plan["flags"] == ["FP16"] and plan["precision"] == "fp16" and plan["fallback"] is None
    assert trt_compat.plan_precision("fp32", None, True, True, True, f8)["flags"] == []
    plan = trt_compat.plan_precision("int8", "qdq", True, True, False, f10)
    assert plan["flags"] == ["INT8", "FP16"] and plan["int8_from"] == "qdq"
    # TX2 / Nano: calibration falls back to FP16 and says so; Q/DQ cannot
    plan = trt_compat.plan_precision("int8", "calib", True, False, True, f8)
    assert plan["precision"] == "fp16" and plan["flags"] == ["FP16"] and "no fast INT8" in plan["fallback"]
    with pytest.raises(RuntimeToolError, match="no fast INT8"):
        trt_compat.plan_precision("int8", "qdq", True, False, True, f8)
    # calibrators removed (TensorRT 11) or deprecated (10.1+)
    with pytest.raises(RuntimeToolError, match="removed the INT8 calibrators.*--int8-from qdq"):
        trt_compat.plan_precision("int8", "calib", True, True, False, trt_compat.TrtFeatures("11.0"))
    plan = trt_compat.plan_precision("int8", "calib", True, True, True, f10)
    assert any("deprecated" in n for n in plan["notes"])
    with pytest.raises(RuntimeToolError, match="--int8-from"):
        trt_compat.plan_precision("int8", None, True, True, True, f8)
    with pytest.raises(RuntimeToolError):
        trt_compat.plan_precision("fp16", "qdq", True, True, True, f8)
    with pytest.raises(RuntimeToolError):
        trt_compat.plan_precision("bf16", None, True, True, True, f8)


def test_validate_dla():
    trt_compat.validate_dla(None, 0, "fp32")
    trt_compat.validate_dla(1, 2, "fp16")
    with pytest.raises(RuntimeToolError, match="no DLA cores"):
        trt_compat.validate_dla(0, 0, "fp16")
    with pytest.raises(RuntimeToolError, match="0..1"):
        trt_compat.validate_dla(2, 2, "fp16")
    with pytest.raises(RuntimeToolError, match="FP16 or INT8"):
        trt_compat.validate_dla(0, 2, "fp32")


def test_cache_names_separate_versions_and_gpus():
    a = trt_compat.timing_cache_name("8.2.1.8", "NVIDIA Tegra X2", "6.2")
    b = trt_compat.timing_cache_name("10.3.0", "Orin", "8.7")
    assert a == "timing-trt8.2.1.8-nvidia-tegra-x2-sm62.cache" and a != b
    assert trt_compat.calib_cache_name("/b/model_fp32.onnx", "8.6.2") == "calib-model_fp32-trt8.6.2.cache"


def test_network_flags_and_workspace_dispatch():
    import types

    trt = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(EXPLICIT_BATCH=0),
                                MemoryPoolType=types.SimpleNamespace(WORKSPACE="ws"))
    assert trt_compat.network_flags(trt, trt_compat.TrtFeatures("8.2.1")) == 1
    assert trt_compat.network_flags(trt, trt_compat.TrtFeatures("10.3.0")) == 0

    class OldConfig:
        max_workspace_size = 0

    class NewConfig:
        def set_memory_pool_limit(self, pool, nbytes):
            self.limit = (pool, nbytes)

    old, new = OldConfig(), NewConfig()
    trt_compat.set_workspace(trt, old, trt_compat.TrtFeatures("8.2.1"), 1 << 20)
    trt_compat.set_workspace(trt, new, trt_compat.TrtFeatures("8.6.1"), 1 << 20)
    assert old.max_workspace_size == 1 << 20 and new.limit == ("ws", 1 << 20)


def test_weak_typing_ends_at_tensorrt_11():
    assert trt_compat.TrtFeatures("8.0.1").weak_typing and trt_compat.TrtFeatures("10.13").weak_typing
    f11 = trt_compat.TrtFeatures("11.1.0")
    assert not f11.weak_typing and f11.calibrators_removed and f11.tested


def test_plan_precision_tensorrt_11_builds_what_the_graph_declares():
    f11 = trt_compat.TrtFeatures("11.0.0")
    assert trt_compat.plan_precision("fp32", None, True, True, False, f11)["flags"] == []
    with pytest.raises(RuntimeToolError, match="strong typing.*FP16 first"):
        trt_compat.plan_precision("fp16", None, True, True, False, f11)
    plan = trt_compat.plan_precision("fp16", None, True, True, False, f11, graph_fp16=True)
    assert plan["flags"] == [] and plan["precision"] == "fp16"
    plan = trt_compat.plan_precision("int8", "qdq", True, True, False, f11)
    assert plan["flags"] == [] and plan["precision"] == "int8" and any("strongly typed" in n for n in plan["notes"])
    # even a fake module that still exposes a calibrator class is refused on 11
    with pytest.raises(RuntimeToolError, match="removed the INT8 calibrators"):
        trt_compat.plan_precision("int8", "calib", True, True, True, f11)


def test_plan_precision_tensorrt_8_0_tx2_has_no_int8():
    f80 = trt_compat.TrtFeatures("8.0.1.6")
    plan = trt_compat.plan_precision("int8", "calib", True, False, True, f80)
    assert plan["precision"] == "fp16" and "no fast INT8" in plan["fallback"]
    with pytest.raises(RuntimeToolError, match="no fast INT8"):
        trt_compat.plan_precision("int8", "qdq", True, False, True, f80)


def test_platform_precisions_on_11_come_from_the_compute_capability():
    class NoQueries:
        pass

    fp16, int8, source = trt_compat.platform_precisions(NoQueries(), trt_compat.TrtFeatures("11.0"), "6.2")
    assert (fp16, int8) == (True, False) and "compute capability" in source


def test_calibrators_available_per_version():
    import types

    old = types.SimpleNamespace(__version__="10.3.0", IInt8EntropyCalibrator2=object)
    new = types.SimpleNamespace(__version__="11.0.0", IInt8EntropyCalibrator2=object)
    gone = types.SimpleNamespace(__version__="11.0.0")
    assert trt_compat.calibrators_available(old)
    assert not trt_compat.calibrators_available(new) and not trt_compat.calibrators_available(gone)


def test_graph_is_fp16():
    assert trt_compat.graph_is_fp16({"metadata": {"rsedge.precision": "fp16"}, "inputs": [], "outputs": []})
    assert trt_compat.graph_is_fp16({"metadata": {}, "inputs": [{"dtype": "float16"}], "outputs": []})
    assert not trt_compat.graph_is_fp16({"metadata": {"rsedge.precision": "fp32"},
                                         "inputs": [{"dtype": "float32"}], "outputs": [{"dtype": "float32"}]})


def test_bundle_plan_on_tensorrt_11_skips_fp16_of_an_fp32_graph(tmp_path, runtime_helpers):
    pytest.importorskip("onnx", reason="the onnx package builds the test bundle")
    from rsedge.runtime.bundles.bundle import Bundle, plan_engines

    runtime_helpers.make_bundle(str(tmp_path / "b"))
    bundle = Bundle.open(str(tmp_path / "b"))
    caps = {"fast_fp16": True, "fast_int8": True, "calibrators": False, "tensorrt_version": "11.0.0"}
    plan = {(p["variant"], p["precision"]): p["skip"] for p in plan_engines(bundle, caps, (1, 8, 8))}
    assert "strongly typed" in plan[("fp32", "fp16")]
    assert plan[("fp32", "fp32")] is None
    caps10 = dict(caps, calibrators=True, tensorrt_version="10.3.0")
    assert {(p["variant"], p["precision"]): p["skip"] for p in plan_engines(bundle, caps10, (1, 8, 8))}[
        ("fp32", "fp16")] is None
