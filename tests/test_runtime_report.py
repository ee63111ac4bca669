import csv
import io
import json

from rsedge.runtime.bench import report


def run(label, medians, power=None, accuracy=None, model="m.onnx"):
    results = []
    for batch, median in medians:
        r = {"batch": batch, "iterations": 10, "duration_s": 1.0, "cv": 1.5, "throughput_ips": batch * 1000.0 / median,
             "latency_ms": {"mean": median, "std": 0.1, "min": median - 0.2, "median": median, "p90": median + 0.1,
                            "p95": median + 0.2, "p99": median + 0.3, "max": median + 1.0}, "notes": []}
        if power:
            r["power"] = power
        results.append(r)
    return {"label": label, "model": model, "backend": "onnxruntime", "provider": "CPUExecutionProvider",
            "precision": "fp32", "results": results, "memory": {"peak_rss_mb": 123.4, "device_mb": None},
            "power": {"available": False, "reason": "not a Jetson"}, "accuracy": accuracy,
            "conditions": {"date": "2025-01-01T00:00:00Z", "hostname": "h", "os": "Linux", "cpu": "x86", "cpu_count": 2,
                           "threads": 2, "jetson": False, "versions": {"python": "3.11"}, "warnings": ["w1"]}}


def test_comparison_rows_and_speedup_against_the_first():
    power = {"available": True, "total_mw": 5000.0, "energy_mj_per_image": 12.5, "gpu_load_pct": {"mean": 80.0}}
    runs = [run("fp32", [(1, 10.0), (8, 40.0)]), run("int8", [(1, 4.0), (8, 10.0), (16, 18.0)], power=power,
                                                        accuracy={"top1": 0.91})]
    rows = report.comparison_rows(runs)
    assert [(r["label"], r["batch"]) for r in rows] == [("fp32", 1), ("fp32", 8), ("int8", 1), ("int8", 8),
                                                         ("int8", 16)]
    assert rows[0]["speedup"] == 1.0 and rows[2]["speedup"] == 2.5 and rows[3]["speedup"] == 4.0
    assert rows[4]["speedup"] is None  # no baseline at batch 16
    assert rows[2]["power_w"] == 5.0 and rows[2]["energy_mj_per_image"] == 12.5 and rows[2]["top1"] == 0.91
    assert rows[0]["power_w"] is None


def test_table_csv_markdown_json(tmp_path):
    runs = [run("fp32", [(1, 10.0)]), run("pruned", [(1, 5.0)], accuracy={"top1": 0.9})]
    doc = report.build_document(runs, command=["rsedge-bench", "a.onnx", "b.onnx"])
    table = report.format_table(doc["comparison"])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["model", "backend", "precision"] and "speed-up" in lines[0]
    assert "2.00x" in lines[3] and "90.00 %" in lines[3]
    assert "power W" not in lines[0]  # columns nobody measured are left out
    rows = list(csv.DictReader(io.StringIO(report.to_csv(doc))))
    assert rows[1]["label"] == "pruned" and float(rows[1]["speedup"]) == 2.0 and rows[0]["power_w"] == ""
    md = report.to_markdown(doc)
    assert "| model |" in md and "`rsedge-bench a.onnx b.onnx`" in md and "- w1" in md
    assert "power: not a Jetson" in md
    doc["runs"][0]["results"][0]["cv"] = float("nan")
    parsed = json.loads(report.to_json(doc))
    assert parsed["schema"] == "rsedge-bench/1" and parsed["runs"][0]["results"][0]["cv"] is None
    written = report.write_outputs(doc, str(tmp_path / "r.json"), str(tmp_path / "r.csv"), str(tmp_path / "o" / "r.md"))
    assert len(written) == 3 and (tmp_path / "o" / "r.md").read_text().startswith("# rsedge-bench results")


def test_describe_conditions_on_jetson():
    cond = {"date": "d", "hostname": "tx2", "os": "Linux", "jetson": True, "board": "NVIDIA Jetson TX2",
            "l4t": "32.7.1", "jetpack": "4.6.x", "nvpmodel": {"name": "MAXN", "id": 0}, "clocks_locked": True,
            "cpu": "ARMv8", "cpu_count": 6, "threads": "library default", "gpu": "NVIDIA Tegra X2",
            "versions": {"tensorrt": "8.2.1.8", "python": "3.6.9"}}
    text = "\n".join(report.describe_conditions(cond))
    assert "L4T 32.7.1 (JetPack 4.6.x), nvpmodel MAXN (0), clocks locked" in text
    assert "tensorrt 8.2.1.8" in text


def test_table_has_mean_min_max_and_names_wall_clock_throughput():
    runs = [run("fp32", [(1, 10.0)])]
    runs[0]["results"][0]["throughput_ips"] = 80.0  # less than 1 / median: the loop's wall time has gaps
    table = report.format_table(report.comparison_rows(runs))
    header, row = table.splitlines()[0], table.splitlines()[2]
    assert [h.strip() for h in header.split("  ") if h.strip()][4:11] == [
        "mean ms", "median ms", "min ms", "max ms", "p99 ms", "CV %", "thr img/s (wall)"]
    assert row.split()[4:8] == ["10.000", "10.000", "9.800", "11.000"] and "80.0" in row.split()
    assert "not batch / median latency" in report.THROUGHPUT_NOTE
    md = report.to_markdown(report.build_document(runs))
    assert "| mean ms | median ms | min ms | max ms |" in md and "not batch / median latency" in md


def test_path_labels_are_the_shortest_unique_suffixes():
    assert report.path_labels(["/r/base/model.onnx", "/r/pruned/model.onnx"]) == ["base/model.onnx",
                                                                                  "pruned/model.onnx"]
    assert report.path_labels(["a.onnx", "b.onnx"]) == ["a.onnx", "b.onnx"]
    assert report.path_labels(["/x/a/m.onnx", "/y/a/m.onnx", "/y/b/m.onnx"]) == ["x/a/m.onnx", "y/a/m.onnx",
                                                                                 "b/m.onnx"]
    assert report.path_labels(["/r/m.onnx", "/r/m.onnx"]) == ["m.onnx", "m.onnx (2)"]
    assert report.path_labels(["/m.onnx", "/x/m.onnx"]) == ["/m.onnx", "x/m.onnx"]
