"""Bundle archives: `rsedge bundle --tar` writes BUNDLE.tar.gz; the device can benchmark it as is.

The archive is extracted once, into a folder named after it next to it (bundle.tar.gz ->
bundle/), so the engines built there are kept for the next run; a folder already holding the
same bundle (the same manifest.json) is reused, any other folder of that name is left alone
and the run refused. Where the archive's folder is read-only (a read-only mount), the
extraction goes to a temporary folder removed at exit. The manifest is then verified as for
a folder.

Extraction is checked member by member on every Python (3.6 has no tarfile filters): only
regular files and folders, no absolute paths, no '..', so nothing lands outside the folder;
where tarfile has the 'data' filter it is applied as well.
"""

import os
import shutil
import tarfile
import tempfile

from ..errors import RuntimeToolError

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
MANIFEST = "manifest.json"


def is_bundle_archive(path):
    return os.path.isfile(path) and path.lower().endswith(ARCHIVE_SUFFIXES)


def archive_stem(path):
    name = os.path.basename(path)
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return name


def _member_parts(member, archive):
    name = member.name.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts:
        raise RuntimeToolError(f"{archive}: member {member.name!r} points outside the bundle: refused")
    if not (member.isfile() or member.isdir()):
        raise RuntimeToolError(f"{archive}: member {member.name!r} is a link or a special file, which an rsedge "
                               "bundle never holds: refused")
    return parts


def bundle_root_in(members, archive):
    """The folder inside the archive that holds manifest.json: '' (top level) or its one top folder."""
    paths = [tuple(_member_parts(m, archive)) for m in members]
    paths = [p for p in paths if p]
    if (MANIFEST,) in paths:
        return ""
    tops = set(p[0] for p in paths)
    if len(tops) == 1:
        top = tops.pop()
        if (top, MANIFEST) in paths:
            return top
    raise RuntimeToolError(f"{archive} has no {MANIFEST} at its top or in its one top folder: not an rsedge bundle")


def _plain(member):
    """What the 'data' filter does to a checked member: ordinary permissions, owned by whoever extracts."""
    member.mode = 0o755 if member.isdir() else (0o755 if member.mode & 0o100 else 0o644)
    member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
    return member


def _extract_into(archive, dest):
    """Extract into the empty folder `dest`; returns the path of the bundle folder inside it."""
    try:
        with tarfile.open(archive, "r:*") as t:
            members = t.getmembers()
            root = bundle_root_in(members, archive)
            if hasattr(tarfile, "data_filter"):
                t.extractall(dest, members=members, filter="data")
            else:
                t.extractall(dest, members=[_plain(m) for m in members])
    except (tarfile.TarError, EOFError, OSError) as e:
        raise RuntimeToolError(f"cannot read {archive} ({e}): copy the archive again") from e
    return os.path.join(dest, root) if root else dest


def _same_manifest(a, b):
    try:
        with open(os.path.join(a, MANIFEST), "rb") as fa, open(os.path.join(b, MANIFEST), "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False


def extract_bundle(archive, log=None):
    """(bundle folder, temporary folder to remove afterwards or None) for a bundle archive."""
    log = log or (lambda msg: None)
    parent = os.path.dirname(os.path.abspath(archive))
    target = os.path.join(parent, archive_stem(archive))
    if not os.access(parent, os.W_OK):
        tmp = tempfile.mkdtemp(prefix="rsedge-bundle-")
        log(f"{parent} is read-only: extracting {archive} into {tmp} (removed at exit; engines built there are lost)")
        try:
            return _extract_into(archive, tmp), tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    staging = tempfile.mkdtemp(prefix="." + archive_stem(archive) + ".extract-", dir=parent)
    try:
        root = _extract_into(archive, staging)
        if os.path.exists(target):
            if not _same_manifest(root, target):
                raise RuntimeToolError(f"{target} exists and does not hold the bundle in {archive} (another "
                                       "manifest.json): move it away, or give the folder itself")
            log(f"{archive}: using {target}, extracted before (same manifest)")
        else:
            os.rename(root, target)
            log(f"{archive}: extracted into {target}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target, None
