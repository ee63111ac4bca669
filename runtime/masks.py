"""Segmentation masks and the images beside them, read the same way on the host and the device.

A mask holds either class indices (a palette "P" PNG, 8-bit "L" or 16-bit PNG/TIFF, a .npy
array) or colours mapped to classes through a colour map (`read_colormap`: a CSV `name,r,g,b`
with a header, the CamVid / DeepGlobe `class_dict.csv` convention, or JSON). Rules:

- A colour-map row named "unlabelled"/"unlabeled" is not a class: its colour becomes the ignore
  label, as does any colour in no row; both are counted (`stats["ignored"]`), never silently a
  class. With an index mask, values >= the number of classes become the ignore label, counted.
- A palette PNG is read through its palette when a colour map is given (the Dubai set saves some
  colour masks as palette PNGs) and as indices otherwise (Pascal VOC).
- An RGB mask whose three channels are equal is read as indices when no colour map is given.
  A single-channel ("L") mask holds indices, except under a colour map whose colours are all grey
  (r == g == b), where value v is the colour (v, v, v): `background,0,0,0` + `building,255,255,255`
  reads the common 0/255 binary masks, whose 255 would otherwise be the ignore label.
- Masks are never resized here: nearest-neighbour resizing, if any, is the caller's business.

Images (`read_rgb`) come out as HxWx3 uint8: alpha dropped, grey repeated into three channels,
single-channel 16-bit divided by 257 and rounded (65535 -> 255; a 12-bit image therefore looks
dark), while Pillow itself reads a 16-bit-per-channel RGB PNG as the high byte of each value
(v >> 8, within one level of v / 257). numpy only at import; Pillow is imported when a file is read.
"""

import csv
import io
import json

import numpy as np

from .errors import RuntimeToolError

IGNORE_INDEX = 255
UNLABELLED_NAMES = ("unlabelled", "unlabeled")
MAX_EXAMPLES = 5


class MaskError(RuntimeToolError, ValueError):
    """A colour map or mask file the user must fix (bad values, duplicate colours...)."""


class NeedsColormap(MaskError):
    """A colour mask read without a colour map."""


class ColorMap(object):
    """Class names and their mask colours; `ignore_colors` are the "unlabelled" rows' colours."""

    def __init__(self, names, colors, ignore_colors=(), ignore_names=(), path=None):
        self.names = [str(n) for n in names]
        self.colors = [tuple(int(v) for v in c) for c in colors]
        self.ignore_colors = [tuple(int(v) for v in c) for c in ignore_colors]
        self.ignore_names = [str(n) for n in ignore_names]
        self.path = path
        where = " in {}".format(path) if path else ""
        if len(self.names) != len(self.colors):
            raise MaskError("colour map{}: {} names for {} colours".format(where, len(self.names), len(self.colors)))
        if not self.names:
            raise MaskError("colour map{} lists no class (only unlabelled rows, or none)".format(where))
        _check_unique(self.names, "class name", where)
        _check_unique([_hex(c) for c in self.colors + self.ignore_colors], "colour", where)
        packed = [_pack_one(c) for c in self.colors + self.ignore_colors]
        values = list(range(len(self.colors))) + [-1] * len(self.ignore_colors)
        order = np.argsort(packed)
        self._keys = np.asarray(packed, dtype=np.int32)[order]
        self._values = np.asarray(values, dtype=np.int64)[order]

    @property
    def num_classes(self):
        return len(self.names)

    @property
    def all_grey(self):
        """Every colour has r == g == b: a single-channel mask is then read as colours (v, v, v)."""
        return all(c[0] == c[1] == c[2] for c in self.colors + self.ignore_colors)

    def lookup(self):
        """(sorted packed colours int32, class index per colour, -1 for an unlabelled colour)."""
        return self._keys, self._values

    def to_dict(self):
        return {"names": list(self.names), "colors": [list(c) for c in self.colors],
                "ignore_colors": [list(c) for c in self.ignore_colors], "ignore_names": list(self.ignore_names)}

    @classmethod
    def from_meta(cls, names, colors, ignore_colors=()):
        """From a model's metadata (classes, colors); None colours -> None (index masks)."""
        if colors is None:
            return None
        return cls(names, colors, ignore_colors or ())

    def __repr__(self):
        return "ColorMap({})".format(", ".join("{}={}".format(n, _hex(c)) for n, c in zip(self.names, self.colors)))


def _hex(color):
    return "#{:02x}{:02x}{:02x}".format(*color)


def _check_unique(values, what, where):
    seen = {}
    for i, v in enumerate(values):
        if v in seen:
            raise MaskError("colour map{}: duplicate {} {} (rows {} and {})".format(where, what, v, seen[v] + 1, i + 1))
        seen[v] = i


def _pack_one(color):
    r, g, b = color
    return (int(r) << 16) | (int(g) << 8) | int(b)


def is_unlabelled(name):
    return str(name).strip().lower() in UNLABELLED_NAMES


def _parse_color(value, name, where):
    """[r, g, b] (ints 0..255) or "#rrggbb" -> (r, g, b)."""
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if len(text) == 6:
            try:
                return tuple(int(text[i:i + 2], 16) for i in (0, 2, 4))
            except ValueError:
                pass
        raise MaskError("colour map{}: class {!r} has colour {!r}, expected [r, g, b] or #rrggbb".format(
            where, name, value))
    if isinstance(value, dict):
        value = [value.get(k) for k in ("r", "g", "b")]
    try:
        parts = [float(v) for v in value]
    except (TypeError, ValueError):
        parts = None
    if parts is None or len(parts) != 3 or any(p != int(p) or not 0 <= p <= 255 for p in parts):
        raise MaskError("colour map{}: class {!r} has colour {!r}, expected three integers 0..255".format(
            where, name, value))
    return tuple(int(p) for p in parts)


def _build(rows, path):
    """[(name, colour)] -> ColorMap, the unlabelled rows set aside as ignore colours."""
    where = " in {}".format(path) if path else ""
    names, colors, ignore_colors, ignore_names = [], [], [], []
    for name, value in rows:
        name = str(name).strip()
        if not name:
            raise MaskError("colour map{}: a row has no class name".format(where))
        color = _parse_color(value, name, where)
        if is_unlabelled(name):
            ignore_names.append(name)
            ignore_colors.append(color)
        else:
            names.append(name)
            colors.append(color)
    return ColorMap(names, colors, ignore_colors, ignore_names, path)


def _csv_rows(text, path):
    reader = csv.reader(io.StringIO(text), skipinitialspace=True)
    rows = [[c.strip() for c in row] for row in reader if any(c.strip() for c in row)]
    if not rows:
        raise MaskError("colour map {} is empty".format(path))
    header = [c.lower() for c in rows[0]]
    names = ("name", "class", "class_name", "classname", "label", "label_name")
    if any(h in names for h in header) or any(h in ("r", "red") for h in header):
        cols = [next((header.index(h) for h in alias if h in header), None)
                for alias in (names, ("r", "red"), ("g", "green"), ("b", "blue"))]
        if None in cols:
            raise MaskError("colour map {}: header {} needs the columns name,r,g,b".format(path, ",".join(rows[0])))
        body = rows[1:]
    else:
        cols, body = [0, 1, 2, 3], rows
    out = []
    for line, row in enumerate(body, 2 if body is not rows else 1):
        if len(row) <= max(cols):
            raise MaskError("colour map {}: line {} has {} fields, expected name,r,g,b".format(path, line, len(row)))
        out.append((row[cols[0]], [row[cols[1]], row[cols[2]], row[cols[3]]]))
    return out


def _json_rows(data, path):
    if isinstance(data, dict) and isinstance(data.get("classes"), list):
        data = data["classes"]
    if isinstance(data, dict):
        return list(data.items())
    if isinstance(data, list):
        rows = []
        for entry in data:
            if not isinstance(entry, dict):
                raise MaskError("colour map {}: expected objects with name and color, got {!r}".format(path, entry))
            name = next((entry[k] for k in ("name", "title", "class", "label") if k in entry), None)
            color = next((entry[k] for k in ("color", "colour", "rgb") if k in entry), None)
            if name is None or color is None:
                raise MaskError("colour map {}: entry {!r} needs a name and a color".format(path, entry))
            rows.append((name, color))
        return rows
    raise MaskError("colour map {}: expected {{\"classes\": [...]}}, {{name: [r, g, b]}} or [{{name, color}}]".format(
        path))


def read_colormap(path):
    """A ColorMap from a CSV (`name,r,g,b` with a header line) or a JSON file."""
    try:
        with io.open(path, "r", encoding="utf-8-sig") as f:
            text = f.read()
    except (IOError, OSError, UnicodeDecodeError) as e:
        raise MaskError("cannot read colour map {}: {}".format(path, e)) from e
    if path.lower().endswith(".json") or text.lstrip()[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise MaskError("colour map {} is not valid JSON: {}".format(path, e)) from e
        return _build(_json_rows(data, path), path)
    return _build(_csv_rows(text, path), path)


def _index_dtype(max_value):
    return np.uint8 if max_value <= 255 else np.uint16


def _pack(rgb):
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise MaskError("expected an HxWx3 colour mask, got shape {}".format(rgb.shape))
    rgb = rgb[:, :, :3].astype(np.int32)
    return (rgb[:, :, 0] << 16) | (rgb[:, :, 1] << 8) | rgb[:, :, 2]


def _map_colors(rgb, colormap, ignore_index):
    """(index mask, kept (a class) flags, found (in the map) flags, packed colours) of an RGB mask:
    a binary search of each packed colour among the sorted map colours, then one table gather."""
    packed = _pack(rgb)
    keys, values = colormap.lookup()
    pos = np.searchsorted(keys, packed)
    np.minimum(pos, len(keys) - 1, out=pos)
    found = keys[pos] == packed
    pos[~found] = len(keys)
    dtype = _index_dtype(max(ignore_index, colormap.num_classes - 1))
    table = np.append(np.where(values >= 0, values, ignore_index), ignore_index).astype(dtype)
    out = table[pos]
    return out, out != ignore_index, found, packed


def colors_to_index(rgb, colormap, ignore_index=IGNORE_INDEX):
    """(HxW index mask, pixels set to ignore_index: unlabelled or in no class) of an HxWx3 mask."""
    _check_ignore(ignore_index, colormap.num_classes)
    out, keep, _, _ = _map_colors(rgb, colormap, ignore_index)
    return out, int(keep.size - np.count_nonzero(keep))


def _check_ignore(ignore_index, num_classes):
    if num_classes is not None and 0 <= ignore_index < num_classes:
        raise MaskError("the ignore label {} is a class index ({} classes)".format(ignore_index, num_classes))


def _unknown_colors(packed, found):
    colors = np.unique(packed[~found])[:MAX_EXAMPLES] if not np.all(found) else []
    return [[int(c) >> 16 & 255, int(c) >> 8 & 255, int(c) & 255] for c in colors]


def _index_mask(values, num_classes, ignore_index, stats):
    values = np.asarray(values)
    if values.dtype.kind not in "ui" and values.dtype != np.bool_:
        raise MaskError("an index mask must hold integers, got {}".format(values.dtype))
    values = values.astype(np.int64)
    if values.size and values.min() < 0:
        raise MaskError("an index mask holds negative values ({})".format(int(values.min())))
    ignored = values == ignore_index
    if num_classes is not None:
        bad = (values >= num_classes) & ~ignored
        if np.any(bad):
            stats["unknown"] = int(np.count_nonzero(bad))
            stats["unknown_values"] = [int(v) for v in np.unique(values[bad])[:MAX_EXAMPLES]]
            values = np.where(bad, ignore_index, values)
            ignored = ignored | bad
    stats["ignored"] = int(np.count_nonzero(ignored))
    top = int(values.max()) if values.size else 0
    return values.astype(_index_dtype(max(top, ignore_index)))


def _color_mask(rgb, colormap, ignore_index, stats):
    out, keep, found, packed = _map_colors(rgb, colormap, ignore_index)
    stats["ignored"] = int(keep.size - np.count_nonzero(keep))
    stats["unknown"] = int(found.size - np.count_nonzero(found))
    stats["unknown_colors"] = _unknown_colors(packed, found)
    return out


def _mask_array(path, colormap):
    """The raw array of a mask file: HxW indices or HxWx3 colours (palette expanded when mapped)."""
    if path.lower().endswith(".npy"):
        return np.load(path, allow_pickle=False)
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode == "P" and colormap is not None:
            im = im.convert("RGB")
        elif mode == "PA":
            im = im.convert("RGB") if colormap is not None else im.getchannel(0)
        elif mode in ("LA", "RGBA"):
            im = im.convert(mode[:-1])
        elif mode not in ("P", "L", "1", "RGB", "I", "I;16", "I;16B", "I;16L"):
            raise MaskError("{}: unsupported mask mode {} (index PNG, 16-bit PNG or RGB colours)".format(path, mode))
        return np.asarray(im)


def read_mask(path, colormap=None, num_classes=None, ignore_index=IGNORE_INDEX):
    """(HxW uint8 mask, or uint16 when a value exceeds 255, stats) of one mask file.

    stats: "ignored" (pixels set to ignore_index, including those already at it), "unknown"
    (pixels of a colour / value in no class), "unknown_colors" / "unknown_values" (a few examples),
    "pixels". With a colour map, num_classes defaults to its class count."""
    if colormap is not None and num_classes is None:
        num_classes = colormap.num_classes
    _check_ignore(ignore_index, num_classes)
    arr = _mask_array(path, colormap)
    stats = {"pixels": 0, "ignored": 0, "unknown": 0, "unknown_colors": [], "unknown_values": []}
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]
        if colormap is not None:
            out = _color_mask(arr, colormap, ignore_index, stats)
        elif arr.shape[2] == 3 and np.array_equal(arr[:, :, 0], arr[:, :, 1]) and np.array_equal(
                arr[:, :, 0], arr[:, :, 2]):
            out = _index_mask(arr[:, :, 0], num_classes, ignore_index, stats)
        else:
            raise NeedsColormap("{} is a colour mask: give a colour map (class_dict.csv at the dataset root, or "
                                "--colormap)".format(path))
    elif arr.ndim == 2 and colormap is not None and colormap.all_grey and arr.dtype == np.uint8:
        out = _color_mask(np.repeat(arr[:, :, None], 3, axis=2), colormap, ignore_index, stats)
    elif arr.ndim == 2:
        out = _index_mask(arr, num_classes, ignore_index, stats)
    else:
        raise MaskError("{}: expected an HxW or HxWx3 mask, got shape {}".format(path, arr.shape))
    stats["pixels"] = int(out.size)
    return out, stats


def _scale_16bit(arr):
    return np.round(arr.astype(np.float64) / 257.0).clip(0, 255).astype(np.uint8)


def read_rgb(path):
    """Any image file -> HxWx3 uint8 RGB (alpha dropped, grey repeated, 16-bit divided by 257)."""
    from .preprocess import _to_rgb_uint8, load_image

    if path.lower().endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
        if arr.dtype == np.uint16:
            arr = _scale_16bit(arr)
        return _to_rgb_uint8(arr, path)
    try:
        from PIL import Image
    except ImportError:
        return load_image(path)
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(im)
            if arr.dtype != np.uint8 and arr.size and int(arr.max()) > 65535:
                raise MaskError("{}: {}-bit grey values above 65535 are not supported".format(path, im.mode))
            return _to_rgb_uint8(_scale_16bit(arr), path)
        return np.asarray(im.convert("RGB"))


def image_size(path):
    """(height, width) from the file header, without decoding the pixels."""
    if path.lower().endswith(".npy"):
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        if len(shape) == 3 and shape[0] in (1, 3) and shape[2] not in (1, 3, 4):
            return int(shape[1]), int(shape[2])
        return int(shape[0]), int(shape[1])
    from PIL import Image

    with Image.open(path) as im:
        return int(im.size[1]), int(im.size[0])


def write_index_mask(path, mask, palette=None):
    """An index mask as an 8-bit (or 16-bit when needed) PNG, or .npy by extension. `palette`: 768
    bytes (r, g, b per class id) that make an 8-bit mask a palette PNG, shown in colour by any
    viewer while its pixel values stay the class ids."""
    mask = np.asarray(mask)
    if str(path).lower().endswith(".npy"):
        np.save(path, mask)
        return
    from PIL import Image

    if mask.size and int(mask.max()) > 255:
        Image.fromarray(mask.astype(np.uint16)).save(path)
        return
    img = Image.fromarray(mask.astype(np.uint8))
    if palette is not None:
        img = img.convert("P")
        img.putpalette(list(palette))
    img.save(path)

