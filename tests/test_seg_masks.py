"""runtime/masks.py: colour maps (CSV, JSON), colour and index masks, the ignore label, and images
(RGBA, 16-bit, grey) read the same way on the host and the device."""

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from rsedge.runtime.masks import (
    MaskError,
    NeedsColormap,
    colors_to_index,
    image_size,
    read_colormap,
    read_mask,
    read_rgb,
    write_index_mask,
)

CSV = "name,r,g,b\nBuilding,60,16,152\nRoad,110,193,228\nWater,226,169,41\nUnlabeled,155,155,155\n"
COLORS = [(60, 16, 152), (110, 193, 228), (226, 169, 41)]


def write_png16(path, arr):
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one)."""
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


@pytest.fixture
def cmap(tmp_path):
    path = tmp_path / "class_dict.csv"
    path.write_text(CSV)
    return read_colormap(str(path))


def test_csv_colormap_sets_unlabelled_aside(cmap):
    assert cmap.names == ["Building", "Road", "Water"]
    assert cmap.colors == COLORS
    assert cmap.ignore_colors == [(155, 155, 155)] and cmap.ignore_names == ["Unlabeled"]
    assert cmap.num_classes == 3


def test_csv_with_bom_spaces_quotes_and_any_column_order(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes("\ufeff r , g , b , name \n 1, 2, 3 , \"a, b\"\n4,5,6,UNLABELLED\n\n7,8,9,c\n".encode("utf-8"))
    cm = read_colormap(str(path))
    assert cm.names == ["a, b", "c"] and cm.colors == [(1, 2, 3), (7, 8, 9)]
    assert cm.ignore_colors == [(4, 5, 6)]


def test_csv_without_header(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("sky,0,0,255\ngrass,0,255,0\n")
    assert read_colormap(str(path)).names == ["sky", "grass"]


@pytest.mark.parametrize("data", [
    {"classes": [{"name": "sky", "color": [0, 0, 255]}, {"name": "grass", "color": [0, 255, 0]},
                 {"name": "unlabelled", "color": [0, 0, 0]}]},
    {"sky": [0, 0, 255], "grass": [0, 255, 0], "Unlabelled": [0, 0, 0]},
    [{"name": "sky", "color": [0, 0, 255]}, {"name": "grass", "color": [0, 255, 0]},
     {"name": "unlabeled", "color": [0, 0, 0]}],
    {"classes": [{"title": "sky", "color": "#0000FF"}, {"title": "grass", "color": "#00ff00"},
                 {"title": "Unlabeled", "color": "#000000"}]},  # Supervisely's classes.json
])
def test_json_colormaps(tmp_path, data):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(data))
    cm = read_colormap(str(path))
    assert cm.names == ["sky", "grass"] and cm.colors == [(0, 0, 255), (0, 255, 0)]
    assert cm.ignore_colors == [(0, 0, 0)]


@pytest.mark.parametrize("text, words", [
    ("name,r,g,b\na,1,2,3\nb,1,2,3\n", "duplicate colour #010203"),
    ("name,r,g,b\na,1,2,3\nunlabelled,1,2,3\n", "duplicate colour"),
    ("name,r,g,b\na,1,2,3\na,4,5,6\n", "duplicate class name a"),
    ("name,r,g,b\na,1,2,300\n", "three integers 0..255"),
    ("name,r,g,b\na,1,x,3\n", "three integers 0..255"),
    ("name,r,g,b\na,1.5,2,3\n", "three integers 0..255"),
    ("name,r,g,b\na,1,2\n", "line 2 has 3 fields"),
    ("name,red,green\na,1,2\n", "needs the columns name,r,g,b"),
    ("name,r,g,b\nunlabelled,0,0,0\n", "lists no class"),
    ("", "is empty"),
    ('{"classes": [{"name": "a"}]}', "needs a name and a color"),
    ('{"a": "#12345"}', "expected [r, g, b] or #rrggbb"),
    ("{not json", "not valid JSON"),
])
def test_bad_colormaps_one_line_errors(tmp_path, text, words):
    path = tmp_path / ("c.json" if text.startswith("{") else "c.csv")
    path.write_text(text)
    with pytest.raises(MaskError) as e:
        read_colormap(str(path))
    assert words in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_colors_to_index_ignores_unlabelled_and_unknown(cmap):
    rgb = np.array([[COLORS[0], COLORS[1], (155, 155, 155)],
                    [COLORS[2], (1, 2, 3), COLORS[0]]], np.uint8)
    index, ignored = colors_to_index(rgb, cmap)
    assert index.dtype == np.uint8
    assert index.tolist() == [[0, 1, 255], [2, 255, 0]]
    assert ignored == 2
    index, _ = colors_to_index(rgb, cmap, ignore_index=7)
    assert index[0, 2] == 7


def test_colors_to_index_on_a_whole_tile(cmap):
    """A 2000x2000 tile, the size of the largest Dubai tiles (tests never assert timings: a
    per-pixel loop would make this test take minutes, which the suite's duration shows)."""
    rng = np.random.default_rng(0)
    palette = np.array(COLORS + [(155, 155, 155), (0, 0, 0)], np.uint8)
    labels = rng.integers(0, 5, (2000, 2000))
    index, ignored = colors_to_index(palette[labels], cmap)
    assert np.array_equal(index, np.where(labels < 3, labels, 255))
    assert ignored == int(np.count_nonzero(labels >= 3))


def test_ignore_label_may_not_be_a_class(cmap):
    with pytest.raises(MaskError, match="ignore label 1 is a class"):
        colors_to_index(np.zeros((2, 2, 3), np.uint8), cmap, ignore_index=1)


def test_rgb_and_rgba_colour_masks(tmp_path, cmap):
    rgb = np.array([[COLORS[0], COLORS[2]], [(9, 9, 9), (155, 155, 155)]], np.uint8)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    rgba = np.concatenate([rgb, np.array([[[0], [255]], [[128], [7]]], np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "ma.png")
    for name in ("m.png", "ma.png"):
        mask, stats = read_mask(str(tmp_path / name), cmap)
        assert mask.tolist() == [[0, 2], [255, 255]]
        assert stats["ignored"] == 2 and stats["unknown"] == 1 and stats["unknown_colors"] == [[9, 9, 9]]
        assert stats["pixels"] == 4


def test_colour_mask_without_colormap_is_refused(tmp_path):
    Image.fromarray(np.array([[COLORS[0], COLORS[1]]], np.uint8)).save(tmp_path / "m.png")
    with pytest.raises(NeedsColormap, match="give a colour map"):
        read_mask(str(tmp_path / "m.png"))


def test_grey_rgb_mask_is_read_as_indices(tmp_path):
    values = np.array([[0, 1], [2, 255]], np.uint8)
    Image.fromarray(np.repeat(values[:, :, None], 3, axis=2)).save(tmp_path / "m.png")
    mask, stats = read_mask(str(tmp_path / "m.png"), num_classes=3)
    assert mask.tolist() == values.tolist() and stats["ignored"] == 1


def _palette_png(path, values, palette_colors):
    img = Image.new("P", values.shape[::-1])
    img.putdata(values.ravel().tolist())
    flat = [v for c in palette_colors for v in c]
    img.putpalette(flat + [0] * (768 - len(flat)))
    img.save(path)


def test_palette_mask_holds_indices(tmp_path):
    values = np.array([[0, 1, 2], [5, 255, 1]], np.uint8)
    _palette_png(tmp_path / "p.png", values, [(0, 0, 0), (128, 0, 0), (0, 128, 0)])
    assert Image.open(tmp_path / "p.png").mode == "P"
    mask, stats = read_mask(str(tmp_path / "p.png"), num_classes=3)
    assert mask.tolist() == [[0, 1, 2], [255, 255, 1]]
    assert stats["ignored"] == 2 and stats["unknown"] == 1 and stats["unknown_values"] == [5]
    raw, _ = read_mask(str(tmp_path / "p.png"))
    assert raw.tolist() == values.tolist()


def test_palette_mask_is_read_through_its_palette_with_a_colormap(tmp_path, cmap):
    """The Dubai set saves some colour masks as palette PNGs."""
    values = np.array([[0, 1], [2, 3]], np.uint8)
    _palette_png(tmp_path / "p.png", values, [COLORS[2], COLORS[0], (155, 155, 155), (1, 1, 1)])
    mask, stats = read_mask(str(tmp_path / "p.png"), cmap)
    assert mask.tolist() == [[2, 0], [255, 255]] and stats["unknown"] == 1


def test_l_mask_and_out_of_range_values(tmp_path):
    Image.fromarray(np.array([[0, 3], [4, 9]], np.uint8)).save(tmp_path / "l.png")
    assert Image.open(tmp_path / "l.png").mode == "L"
    mask, stats = read_mask(str(tmp_path / "l.png"), num_classes=4)
    assert mask.tolist() == [[0, 3], [255, 255]] and stats["ignored"] == 2 and stats["unknown_values"] == [4, 9]


def test_16bit_index_mask(tmp_path):
    values = np.array([[0, 300], [1000, 7]], np.uint16)
    Image.fromarray(values).save(tmp_path / "m16.png")
    assert Image.open(tmp_path / "m16.png").mode.startswith("I;16")
    mask, stats = read_mask(str(tmp_path / "m16.png"))
    assert mask.dtype == np.uint16 and mask.tolist() == values.tolist() and stats["ignored"] == 0
    mask, stats = read_mask(str(tmp_path / "m16.png"), num_classes=8)
    assert mask.dtype == np.uint8 and mask.tolist() == [[0, 255], [255, 7]] and stats["ignored"] == 2


def test_binary_l_mask_with_a_grey_colormap(tmp_path):
    """0/255 building masks: 255 is a class, not the ignore label, under a grey colour map."""
    (tmp_path / "c.csv").write_text("name,r,g,b\nbackground,0,0,0\nbuilding,255,255,255\n")
    Image.fromarray(np.array([[0, 255], [255, 17]], np.uint8)).save(tmp_path / "b.png")
    mask, stats = read_mask(str(tmp_path / "b.png"), read_colormap(str(tmp_path / "c.csv")))
    assert mask.tolist() == [[0, 1], [1, 255]] and stats["unknown_colors"] == [[17, 17, 17]]


def test_npy_mask(tmp_path):
    np.save(tmp_path / "m.npy", np.array([[1, 2], [0, 6]], np.int32))
    mask, stats = read_mask(str(tmp_path / "m.npy"), num_classes=3)
    assert mask.tolist() == [[1, 2], [0, 255]] and stats["ignored"] == 1


def test_write_index_mask_round_trip(tmp_path):
    small = np.array([[0, 4], [255, 2]], np.uint8)
    large = np.array([[0, 400], [255, 2]], np.uint16)
    for name, arr in (("a.png", small), ("b.png", large), ("c.npy", small)):
        write_index_mask(str(tmp_path / name), arr)
        assert read_mask(str(tmp_path / name))[0].tolist() == arr.tolist()


def test_read_rgb_drops_alpha_and_repeats_grey(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(read_rgb(str(tmp_path / "a.png")), rgba[:, :, :3])
    grey = rgba[:, :, 0]
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = read_rgb(str(tmp_path / "g.png"))
    assert out.shape == (5, 7, 3) and all(np.array_equal(out[:, :, c], grey) for c in range(3))


def test_read_rgb_scales_16bit(tmp_path):
    grey16 = np.array([[0, 257, 65535], [12850, 32768, 1000]], np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    expected = np.round(grey16 / 257.0).astype(np.uint8)
    out = read_rgb(str(tmp_path / "g16.png"))
    assert out.dtype == np.uint8 and np.array_equal(out[:, :, 1], expected)
    np.save(tmp_path / "c16.npy", np.stack([grey16] * 3, axis=2))
    assert np.array_equal(read_rgb(str(tmp_path / "c16.npy"))[:, :, 2], expected)
    rgb16 = np.stack([grey16, grey16 // 2, 65535 - grey16], axis=2)
    write_png16(tmp_path / "c16.png", rgb16)
    out = read_rgb(str(tmp_path / "c16.png"))
    assert out.shape == (2, 3, 3) and np.abs(out.astype(int) - np.round(rgb16 / 257.0)).max() <= 1


def test_image_size_from_the_header(tmp_path):
    Image.fromarray(np.zeros((13, 29, 3), np.uint8)).save(tmp_path / "x.jpg")
    np.save(tmp_path / "y.npy", np.zeros((3, 11, 17), np.uint8))
    assert image_size(str(tmp_path / "x.jpg")) == (13, 29)
    assert image_size(str(tmp_path / "y.npy")) == (11, 17)
