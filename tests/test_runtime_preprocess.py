import json

import numpy as np
import pytest

from rsedge.runtime import preprocess
from rsedge.runtime.errors import RuntimeToolError
from rsedge.runtime.preprocess import PreprocessSpec


def test_normalize_metadata_accepts_props_and_json_forms():
    props = {"rsedge.classes": '["a", "b"]', "rsedge.input_size": "[32, 48]", "rsedge.mean": "[0.5, 0.5, 0.5]",
             "rsedge.layout": "NCHW", "rsedge.precision": "int8-qdq", "other.key": "x", "rsedge.unknown": "y"}
    meta = preprocess.normalize_metadata(props)
    assert meta == {"classes": ["a", "b"], "input_size": [32, 48], "mean": [0.5, 0.5, 0.5], "layout": "NCHW",
                    "precision": "int8-qdq"}
    assert preprocess.normalize_metadata({"classes": ["a", "b"], "std": [1, 1, 1]}) == {"classes": ["a", "b"],
                                                                                       "std": [1, 1, 1]}
    roundtrip = preprocess.normalize_metadata(preprocess.to_metadata_props(meta))
    assert roundtrip == meta


def test_spec_normalizes_and_lays_out_nchw():
    image = np.zeros((4, 6, 3), dtype=np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 51, 0
    spec = PreprocessSpec((4, 6), mean=(0.5, 0.2, 0.0), std=(0.5, 0.1, 1.0))
    x = spec(image)
    assert x.shape == (3, 4, 6) and x.dtype == np.float32
    assert np.allclose(x[0], 1.0) and np.allclose(x[1], 0.0) and np.allclose(x[2], 0.0)
    nhwc = PreprocessSpec((4, 6), layout="NHWC")(image)
    assert nhwc.shape == (4, 6, 3) and np.allclose(nhwc[0, 0], [1.0, 0.2, 0.0])
    bgr = PreprocessSpec((4, 6), color="BGR")(image)
    assert np.allclose(bgr[:, 0, 0], [0.0, 0.2, 1.0])


def test_spec_from_metadata_and_its_errors():
    spec = PreprocessSpec.from_metadata({"input_size": [8, 8], "mean": [0, 0, 0], "std": [1, 1, 1]})
    assert spec.input_size == (8, 8)
    warnings = []
    spec = PreprocessSpec.from_metadata({}, input_shape=(-1, 3, 10, 12), log=warnings.append)
    assert spec.input_size == (10, 12) and "scaled to 0..1" in warnings[0]
    with pytest.raises(RuntimeToolError, match="input_size"):
        PreprocessSpec.from_metadata({}, input_shape=(-1, 3, -1, -1))
    with pytest.raises(RuntimeToolError, match="resize mode"):
        PreprocessSpec((8, 8), resize="center-crop")
    with pytest.raises(RuntimeToolError, match="std"):
        PreprocessSpec((8, 8), std=(0, 1, 1))


def test_numpy_bilinear_uses_half_pixel_centres():
    img = np.array([[0, 100], [200, 255]], dtype=np.uint8)[:, :, None].repeat(3, axis=2)
    up = preprocess.resize_bilinear_numpy(img, (4, 4))[:, :, 0]
    # half-pixel centres: output pixel 1 samples input coordinate 0.25
    assert up[0, 0] == 0 and up[0, 3] == 100 and up[3, 0] == 200 and up[3, 3] == 255
    assert up[0, 1] == 25 and up[1, 0] == 50
    flat = np.full((7, 9, 3), 77, dtype=np.uint8)
    assert np.all(preprocess.resize_bilinear_numpy(flat, (3, 5)) == 77)
    assert preprocess.resize_bilinear(flat, (7, 9)) is flat


def test_pillow_and_numpy_agree_on_a_smooth_image():
    pytest.importorskip("PIL", reason="compares against Pillow's resize")
    y, x = np.mgrid[0:32, 0:32]
    img = np.stack([x * 4, y * 4, (x + y) * 2], axis=2).astype(np.uint8)
    a = preprocess.resize_bilinear(img, (64, 64)).astype(int)
    b = preprocess.resize_bilinear_numpy(img, (64, 64)).astype(int)
    assert np.abs(a - b)[4:-4, 4:-4].max() <= 2


def test_numpy_only_image_formats(tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess, "_pil", lambda: None)
    rgb = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    (tmp_path / "a.ppm").write_bytes(b"P6\n# comment\n5 2\n255\n" + rgb.tobytes())
    assert np.array_equal(preprocess.load_image(str(tmp_path / "a.ppm")), rgb)
    gray = np.array([[1, 2, 3]], dtype=np.uint8)
    (tmp_path / "g.pgm").write_bytes(b"P5 3 1 255\n" + gray.tobytes())
    assert preprocess.load_image(str(tmp_path / "g.pgm")).shape == (1, 3, 3)
    np.save(str(tmp_path / "c.npy"), rgb.transpose(2, 0, 1))  # CHW is accepted when unambiguous
    assert np.array_equal(preprocess.load_image(str(tmp_path / "c.npy")), rgb)
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(RuntimeToolError, match="Pillow"):
        preprocess.load_image(str(tmp_path / "x.jpg"))
    np.save(str(tmp_path / "f.npy"), rgb.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        preprocess.load_image(str(tmp_path / "f.npy"))


def test_labeled_folder_listing(tmp_path):
    for cls in ("river", "forest"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            (tmp_path / cls / f"{i}.png").write_bytes(b"")
    (tmp_path / "forest" / "notes.txt").write_text("not an image")
    items, classes = preprocess.list_labeled_folder(str(tmp_path), ["forest", "river", "urban"])
    assert classes == ["forest", "river", "urban"]
    assert [(p.split("/")[-2], y) for p, y in items] == [("forest", 0), ("forest", 0), ("river", 1), ("river", 1)]
    items, classes = preprocess.list_labeled_folder(str(tmp_path))
    assert classes == ["forest", "river"]
    (tmp_path / "Rivers").mkdir()
    with pytest.raises(RuntimeToolError, match="Rivers"):
        preprocess.list_labeled_folder(str(tmp_path), ["forest", "river"])
    with pytest.raises(RuntimeToolError, match="does not exist"):
        preprocess.list_labeled_folder(str(tmp_path / "nope"))


def test_preprocess_json_beside_model(tmp_path):
    assert preprocess.read_preprocess_json(str(tmp_path)) == {}
    (tmp_path / "preprocess.json").write_text(json.dumps({"input_size": [8, 8], "color": "RGB"}))
    assert preprocess.read_preprocess_json(str(tmp_path)) == {"input_size": [8, 8], "color": "RGB"}
    (tmp_path / "preprocess.json").write_text("{")
    with pytest.raises(RuntimeToolError, match="not valid JSON"):
        preprocess.read_preprocess_json(str(tmp_path))
