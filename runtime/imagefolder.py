"""How rsedge reads an image folder, on the host and on the device alike.

`rsedge eval --split all` (trainer/datasets.py) and `rsedge-bench --eval DIR` both list
ROOT/<class>/<images> with `scan_class_folders`, so they see the same files: class folders are
the non-hidden sub-folders of ROOT, images are found at any depth below a class folder (symbolic
links to folders are not followed), names starting with "." (hidden files, macOS "._" copies)
are skipped at every level, and extensions are matched without regard to case. Images come in
the order of their path components, which is the order `pathlib` sorts them in. No numpy here:
the host's dataset code imports it too.
"""

import os

from .errors import RuntimeToolError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".npy")


def is_hidden(name):
    return name.startswith(".")


def is_image_name(name):
    return not is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def class_folder_names(root):
    """The non-hidden sub-folders of root, sorted."""
    return sorted(d for d in os.listdir(root) if not is_hidden(d) and os.path.isdir(os.path.join(root, d)))


def image_files(folder, root=None):
    """Image files at any depth under folder, as '/'-separated paths relative to root (default: folder)."""
    root = folder if root is None else root
    found = []
    for here, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        for name in names:
            path = os.path.join(here, name)
            if is_image_name(name) and os.path.isfile(path):
                found.append(tuple(os.path.relpath(path, root).split(os.sep)))
    return ["/".join(parts) for parts in sorted(found)]


def scan_class_folders(root):
    """[(class folder name, [image paths relative to root])] for ROOT/<class>/<images>, in sorted order."""
    return [(name, image_files(os.path.join(root, name), root)) for name in class_folder_names(root)]


def list_labeled_folder(folder, class_names=None):
    """[(path, class index)] from an ImageFolder-style tree: folder/<class name>/<image>.

    With the model's class names, every subfolder must be one of them (a typo would silently
    score 0 %); without them, subfolders are the classes in sorted order, as ImageFolder does.
    """
    if not os.path.isdir(folder):
        raise RuntimeToolError("evaluation folder {} does not exist".format(folder))
    scanned = scan_class_folders(folder)
    if not scanned:
        raise RuntimeToolError("{0} has no class subfolders (expected {0}/<class>/<image files>)".format(folder))
    subdirs = [name for name, _ in scanned]
    if class_names is None:
        class_names = subdirs
    unknown = [d for d in subdirs if d not in class_names]
    if unknown:
        raise RuntimeToolError("class folders {} in {} are not classes of the model (model classes: {})".format(
            ", ".join(unknown), folder, ", ".join(class_names)))
    index = {name: i for i, name in enumerate(class_names)}
    items = [(os.path.join(folder, *rel.split("/")), index[name]) for name, files in scanned for rel in files]
    if not items:
        raise RuntimeToolError("no image files ({}) under {}".format(" ".join(IMAGE_EXTENSIONS), folder))
    return items, list(class_names)
