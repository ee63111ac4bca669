"""Atomic writes: a reader (or a power cut) never sees half a file.

Each write goes to a temporary file in the same directory, is flushed to disk, and then
replaces the target with os.replace, which is atomic on POSIX.
"""

import json
import os
import tempfile
import time


def atomic_write_bytes(path, data):
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        # mkstemp makes the file 0600: results, engines and bundle files must stay readable by
        # the other users of a device or a container mount, as an ordinary write would leave them
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _umask():
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path, text):
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def read_json(path):
    with open(path, "r") as f:
        return json.load(f)


def utc_now():
    """ISO 8601 UTC timestamp, e.g. 2025-01-31T12:00:00Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
