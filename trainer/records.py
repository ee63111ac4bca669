"""Machine-readable records.

Every stage writes `record.json` in its output folder (`trainer.stage` makes the folder); later
stages read it. Writes are atomic (the runtime's temporary file + rename) so an interrupted run
never leaves a half-written record, and dates are the runtime's (`fileio.utc_now`), so a record
of the host and a report of the device read the same way.
"""
from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from rsedge.runtime.fileio import atomic_write_bytes, utc_now


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _jsonable(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


now_iso = utc_now  # the name the benchmark scripts import: one format, e.g. 2025-01-31T12:00:00Z


def versions() -> dict[str, str]:
    """Versions of everything that can change a result, so a record can be reproduced."""
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for mod in ("rsedge", "torch", "torchvision", "torch_pruning", "onnx", "onnxruntime", "onnxslim", "numpy"):
        try:
            if mod == "rsedge":
                from importlib.metadata import version

                out[mod] = version("rsedge")
                continue
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "?"))
        except Exception:  # noqa: BLE001 - a missing optional package is simply not recorded
            continue
    return out


def write_record(run_dir: str | os.PathLike, stage: str, record: dict[str, Any]) -> Path:
    """Write `record.json` for one stage with the common header every record carries."""
    run_dir = Path(run_dir)
    full = {"stage": stage, "date": now_iso(), "versions": versions(), **record}
    path = run_dir / "record.json"
    atomic_write_json(path, full)
    return path

