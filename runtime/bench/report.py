"""One comparison from several runs: the terminal table and the JSON, CSV and Markdown files.

Every model benchmarked in one call becomes rows (one per batch size) of a single table, with
the speed-up of each against the first model at the same batch size, so "how much faster is the
pruned INT8 engine than the FP32 ONNX" is one command and one table.
"""

import csv
import io
import json
import os

from .. import __version__
from ..fileio import atomic_write_text, utc_now
from .stats import finite_or_none

SCHEMA = "rsedge-bench/1"

COLUMNS = (
    ("label", "model"), ("backend", "backend"), ("precision", "precision"), ("batch", "batch"),
    ("mean_ms", "mean ms"), ("median_ms", "median ms"), ("min_ms", "min ms"), ("max_ms", "max ms"),
    ("p99_ms", "p99 ms"), ("cv_pct", "CV %"), ("throughput_ips", "thr img/s (wall)"),
    ("speedup", "speed-up"), ("compute_ms", "GPU ms"), ("power_w", "power W"),
    ("energy_mj_per_image", "mJ/img"), ("preprocess_ms", "pre ms/img"), ("postprocess_ms", "decode+NMS ms/img"),
    ("top1", "top-1"), ("miou", "mIoU"), ("map50", "mAP@0.5"), ("peak_rss_mb", "peak RSS MB"),
)
THROUGHPUT_NOTE = ("thr img/s (wall) = batch x timed runs / wall-clock time of the timed loop (every gap between "
                   "runs included), not batch / median latency; latencies are per batch")
CSV_FIELDS = ("label", "model", "backend", "provider", "precision", "batch", "iterations", "duration_s", "mean_ms",
              "std_ms", "min_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "cv_pct", "throughput_ips",
              "speedup", "h2d_ms", "compute_ms", "d2h_ms", "power_w", "energy_mj_per_image", "gpu_load_pct",
              "peak_rss_mb", "device_mb", "preprocess_ms", "postprocess_ms", "top1", "miou", "map50", "map50_95")


def label_of(run):
    return run.get("label") or os.path.basename(str(run.get("model")).rstrip("/"))


def path_labels(paths):
    """The shortest trailing part of each path that no other path ends with (base/model.onnx, pruned/model.onnx).

    The same file given twice gets " (2)", " (3)"... on its later rows, so no two labels are equal.
    """
    parts = [os.path.abspath(str(p)).replace(os.sep, "/").rstrip("/").split("/") for p in paths]
    labels = []
    for i, mine in enumerate(parts):
        others = [p for j, p in enumerate(parts) if j != i and p != mine]
        k = 1
        while k < len(mine) and any(p[-k:] == mine[-k:] for p in others):
            k += 1
        labels.append("/".join(mine[-k:]))
    seen = {}
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = "{} ({})".format(label, seen[label])
    return labels


def comparison_rows(runs):
    """Flat rows, one per run and batch size; speed-up is the first run's median latency over this one's."""
    baseline = {}
    if runs:
        for r in runs[0].get("results", []):
            baseline[r["batch"]] = r["latency_ms"]["median"]
    rows = []
    for run in runs:
        accuracy = run.get("accuracy") or {}
        mem = run.get("memory") or {}
        for r in run.get("results", []):
            lat = r["latency_ms"]
            power = r.get("power") or {}
            base = baseline.get(r["batch"])
            row = {
                "label": label_of(run), "model": run.get("model"), "backend": run.get("backend"),
                "provider": run.get("provider"), "precision": run.get("precision"), "batch": r["batch"],
                "iterations": r["iterations"], "duration_s": r["duration_s"],
                "mean_ms": lat["mean"], "std_ms": lat["std"], "min_ms": lat["min"], "median_ms": lat["median"],
                "p90_ms": lat["p90"], "p95_ms": lat["p95"], "p99_ms": lat["p99"], "max_ms": lat["max"],
                "cv_pct": r["cv"], "throughput_ips": r["throughput_ips"],
                "speedup": base / lat["median"] if base and lat["median"] else None,
                "h2d_ms": (r.get("h2d_ms") or {}).get("median"),
                "compute_ms": (r.get("compute_ms") or {}).get("median"),
                "d2h_ms": (r.get("d2h_ms") or {}).get("median"),
                "power_w": power["total_mw"] / 1000.0 if power.get("available") else None,
                "energy_mj_per_image": power.get("energy_mj_per_image") if power.get("available") else None,
                "gpu_load_pct": (power.get("gpu_load_pct") or {}).get("mean"),
                "peak_rss_mb": mem.get("peak_rss_mb"), "device_mb": mem.get("device_mb"),
                "top1": accuracy.get("top1"), "miou": accuracy.get("miou"), "map50": accuracy.get("map50"),
                "map50_95": accuracy.get("map50_95"),
                # a detector's host-side costs around the timed inference: letterbox + normalize, decode + NMS
                "preprocess_ms": accuracy.get("preprocess_ms"), "postprocess_ms": accuracy.get("postprocess_ms"),
            }
            rows.append({k: finite_or_none(v) if isinstance(v, float) else v for k, v in row.items()})
    return rows


def _cell(key, value):
    if value is None:
        return "-"
    if key == "speedup":
        return f"{value:.2f}x"
    if key in ("top1", "miou", "map50", "map50_95"):
        return f"{100.0 * value:.2f} %"
    if key in ("throughput_ips", "peak_rss_mb"):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def _visible_columns(rows):
    return [(k, h) for k, h in COLUMNS if k in ("label", "batch", "median_ms") or any(r.get(k) is not None
                                                                                       for r in rows)]


def format_table(rows):
    """The comparison as aligned plain text for the terminal."""
    cols = _visible_columns(rows)
    cells = [[h for _, h in cols]] + [[_cell(k, r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown_table(rows):
    cols = _visible_columns(rows)
    out = ["| " + " | ".join(h for _, h in cols) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|"]
    for r in rows:
        out.append("| " + " | ".join(_cell(k, r.get(k)).replace("|", "/") for k, _ in cols) + " |")
    return "\n".join(out)


def build_document(runs, command=None, extra=None):
    """The JSON document: schema, tool, command, conditions (of the first run), runs, comparison."""
    doc = {
        "schema": SCHEMA,
        "tool": {"name": "rsedge-bench", "version": __version__},
        "created": utc_now(),
        "command": command,
        "conditions": runs[0].get("conditions") if runs else None,
        "runs": runs,
        "comparison": comparison_rows(runs),
    }
    doc.update(extra or {})
    return doc


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return finite_or_none(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    try:
        return finite_or_none(float(obj)) if hasattr(obj, "__float__") else str(obj)
    except (TypeError, ValueError):
        return str(obj)


def to_json(doc):
    return json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n"


def to_csv(doc):
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in doc["comparison"]:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in CSV_FIELDS})
    return buf.getvalue()


def describe_conditions(cond):
    """Lines saying where and how the numbers were measured."""
    if not cond:
        return []
    v = cond.get("versions") or {}
    lines = ["date: {}".format(cond.get("date")), "host: {} ({})".format(cond.get("hostname"), cond.get("os"))]
    if cond.get("jetson"):
        nv = cond.get("nvpmodel") or {}
        lines.append("board: {}, L4T {} (JetPack {}), nvpmodel {}{}, clocks {}".format(
            cond.get("board"), cond.get("l4t"), cond.get("jetpack") or "?",
            nv.get("name", "?"), " ({})".format(nv["id"]) if nv.get("id") is not None else "",
            "locked" if cond.get("clocks_locked") else "NOT locked"))
    lines.append("CPU: {} x{}, threads: {}".format(cond.get("cpu"), cond.get("cpu_count"), cond.get("threads")))
    lines.append("GPU: {}".format(cond.get("gpu") or "none"))
    lines.append("versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)))
    return lines


def run_warnings(runs):
    """The warnings runs carry (e.g. a bundle on a GPU without INT8), each once, in order."""
    seen = []
    for run in runs:
        for w in run.get("warnings") or []:
            if w not in seen:
                seen.append(w)
    return seen


def to_markdown(doc):
    lines = ["# rsedge-bench results", ""]
    if doc.get("command"):
        lines += ["Command: `{}`".format(" ".join(doc["command"])), ""]
    lines += ["- " + line for line in describe_conditions(doc.get("conditions"))]
    lines += ["**WARNING: {}**".format(w) for w in run_warnings(doc["runs"])]
    lines += ["", format_markdown_table(doc["comparison"]), ""]
    lines.append("Latency is per batch on the host clock (mean, median, min, max, p99); throughput (thr img/s "
                 "(wall)) is batch x timed runs over the wall-clock time of the timed loop, not batch / median "
                 "latency; speed-up is the first row's median latency "
                 "over each row's at the same batch; GPU ms is TensorRT compute time from CUDA events; power is the "
                 "mean over the timed run, energy per image = power x time / images.")
    warnings = list((doc.get("conditions") or {}).get("warnings") or [])
    for run in doc["runs"]:
        for r in run.get("results", []):
            warnings += ["{} batch {}: {}".format(label_of(run), r["batch"], n) for n in r.get("notes", [])]
        p = run.get("power") or {}
        if p and not p.get("available") and p.get("reason"):
            warnings.append("power: " + p["reason"])
    if warnings:
        lines += ["", "Warnings:", ""] + ["- " + w for w in sorted(set(warnings), key=warnings.index)]
    return "\n".join(lines) + "\n"


def write_outputs(doc, json_path=None, csv_path=None, md_path=None):
    written = []
    for path, render in ((json_path, to_json), (csv_path, to_csv), (md_path, to_markdown)):
        if path:
            atomic_write_text(path, render(doc))
            written.append(path)
    return written
