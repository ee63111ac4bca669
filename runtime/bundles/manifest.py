"""Bundle manifests: every file's SHA-256 and size, so the device knows it got what was sent.

A bundle travels by USB stick, scp or an uplink; a truncated copy or a swapped file must be
caught before hours of engine building and benchmarking, and reported by name. `engines/` is
excluded: the device writes its own engines there, and they are not part of what was sent; so is
`unpacked/`, where the device unpacks a bundle's .rspack (the pack is what was sent and is listed).
"""

import hashlib
import json
import os

from ..errors import ManifestError
from ..fileio import atomic_write_text, utc_now

FORMAT = "rsedge-bundle/1"
MANIFEST = "manifest.json"
UNLISTED_DIRS = ("engines", "unpacked")


def sha256_file(path, chunk_size=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk_size)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def list_bundle_files(bundle_dir):
    """Relative POSIX paths of every file the manifest covers, sorted."""
    out = []
    for root, dirs, files in os.walk(bundle_dir):
        rel_root = os.path.relpath(root, bundle_dir)
        if rel_root == ".":
            dirs[:] = [d for d in dirs if d not in UNLISTED_DIRS]
        dirs.sort()
        for name in files:
            rel = name if rel_root == "." else os.path.join(rel_root, name)
            rel = rel.replace(os.sep, "/")
            if rel == MANIFEST or name.endswith(".tmp"):
                continue
            out.append(rel)
    return sorted(out)


def write_manifest(bundle_dir, extra=None):
    """Hash every file under `bundle_dir` and write manifest.json atomically; returns the manifest.

    `extra` holds the bundle's description (versions, variants, preprocess, labels, calibration,
    eval); "format", "created" and "files" are always set here.
    """
    if not os.path.isdir(bundle_dir):
        raise ManifestError(f"bundle directory {bundle_dir} does not exist")
    doc = {"format": FORMAT, "created": utc_now()}
    for key, value in (extra or {}).items():
        if key not in ("format", "files"):
            doc[key] = value
    files = {}
    for rel in list_bundle_files(bundle_dir):
        path = os.path.join(bundle_dir, *rel.split("/"))
        files[rel] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
    doc["files"] = files
    atomic_write_text(os.path.join(bundle_dir, MANIFEST), json.dumps(doc, indent=2, allow_nan=False) + "\n")
    return doc


def load_manifest(bundle_dir):
    path = os.path.join(bundle_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ManifestError(f"{bundle_dir} has no {MANIFEST}: not an rsedge bundle")
    try:
        with open(path, "r") as f:
            doc = json.load(f)
    except ValueError as e:
        raise ManifestError(f"{path} is not valid JSON ({e}): the manifest itself is damaged") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError("{}: format is {!r}, expected {!r}".format(
            path, doc.get("format") if isinstance(doc, dict) else None, FORMAT))
    if not isinstance(doc.get("files"), dict):
        raise ManifestError(f"{path}: no 'files' table")
    return doc


def referenced_files(doc):
    """Files the manifest's description points at; each must be one of the listed files."""
    refs = []
    for variant in doc.get("variants") or []:
        source = variant.get("pack") or variant.get("onnx")  # a pack's ONNX is unpacked on the device
        if source:
            refs.append(source)
    for key in ("preprocess", "labels"):
        if doc.get(key):
            refs.append(doc[key])
    for key in ("images", "labels", "masks", "shapes"):  # classification; segmentation
        if (doc.get("eval") or {}).get(key):
            refs.append(doc["eval"][key])
    return refs


def _safe_rel(rel):
    parts = rel.split("/")
    return not (rel.startswith("/") or ".." in parts or rel == "")


def verify_manifest(bundle_dir):
    """Check every listed file; raise ManifestError naming all missing, truncated and tampered ones.

    Returns the manifest with a "verification" entry: counts and any files present but not
    listed (reported, not fatal: a README dropped into the bundle should not stop a benchmark).
    """
    doc = load_manifest(bundle_dir)
    missing, resized, tampered, unsafe = [], [], [], []
    for rel, entry in sorted(doc["files"].items()):
        if not _safe_rel(rel):
            unsafe.append(rel)
            continue
        path = os.path.join(bundle_dir, *rel.split("/"))
        if not os.path.isfile(path):
            missing.append(rel)
            continue
        size = os.path.getsize(path)
        if "bytes" in entry and size != entry["bytes"]:
            resized.append("{} ({} bytes, manifest says {}{})".format(
                rel, size, entry["bytes"], ": truncated" if size < entry["bytes"] else ""))
            continue
        if sha256_file(path) != entry.get("sha256"):
            tampered.append(rel)
    dangling = [r for r in referenced_files(doc) if r not in doc["files"]]
    problems = []
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if resized:
        problems.append("size mismatch: " + ", ".join(resized))
    if tampered:
        problems.append("content changed (SHA-256 mismatch): " + ", ".join(tampered))
    if unsafe:
        problems.append("paths outside the bundle: " + ", ".join(unsafe))
    if dangling:
        problems.append("referenced but not listed in the manifest: " + ", ".join(dangling))
    if problems:
        raise ManifestError("bundle {} failed verification; {}. Copy the bundle again.".format(
            bundle_dir, "; ".join(problems)))
    listed = set(doc["files"])
    unlisted = [rel for rel in list_bundle_files(bundle_dir) if rel not in listed]
    doc["verification"] = {"files": len(listed), "unlisted": unlisted}
    return doc
