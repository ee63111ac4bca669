"""Benchmarking with trtexec's methodology.

For each batch size: a time-based warm-up (at least one run), then timed runs until both at
least `iterations` runs and at least `duration_s` seconds are done. Each run is timed on the
host with perf_counter around the backend's bound `run()`; backends that can (TensorRT) also
return host-to-device, compute and device-to-host times from CUDA events. Throughput is
queries per second times the batch, over the wall time of the timed section.

The loop does nothing but call run() and read the clock: the prepared run holds its inputs,
so the harness adds no allocation or copy to what it times (benchmarks/bench_harness_overhead.py
checks this against a bare onnxruntime loop).
"""

import os
import time

from ..backends import Runner, open_runner
from ..jetson import memory
from ..jetson.conditions import collect_conditions
from ..jetson.power import open_power_monitor
from . import stats

DEFAULT_WARMUP_S = 0.2
DEFAULT_ITERATIONS = 10
DEFAULT_DURATION_S = 3.0
DEFAULT_POWER_INTERVAL_MS = 100


def timed_loop(run, warmup_s=DEFAULT_WARMUP_S, iterations=DEFAULT_ITERATIONS, duration_s=DEFAULT_DURATION_S,
               clock=time.perf_counter):
    """Warm up, then time run() until >= iterations and >= duration_s; returns raw timings.

    {"times_ms", "parts_ms" (list of (h2d, compute, d2h) or None), "wall_s", "warmup_runs",
    "warmup_s", "t0", "t1"} where t0/t1 bound the timed section on time.monotonic().
    """
    start = clock()
    warm = 0
    while True:
        run()
        warm += 1
        if clock() - start >= warmup_s:
            break
    warm_s = clock() - start
    times = []
    parts = []
    append, append_part = times.append, parts.append
    mono0 = time.monotonic()
    t_start = clock()
    t_end = t_start
    n = 0
    while n < iterations or t_end - t_start < duration_s:
        a = clock()
        p = run()
        t_end = clock()
        append(t_end - a)
        if p is not None:
            append_part(p)
        n += 1
    mono1 = time.monotonic()
    return {
        "times_ms": [t * 1000.0 for t in times],
        "parts_ms": parts or None,
        "wall_s": t_end - t_start,
        "warmup_runs": warm,
        "warmup_s": warm_s,
        "t0": mono0,
        "t1": mono1,
    }


def summarize_loop(loop, batch):
    """The result entry of one batch size from timed_loop's raw timings."""
    lat = stats.summarize(loop["times_ms"])
    n = len(loop["times_ms"])
    out = {
        "batch": batch,
        "latency_ms": lat,
        "cv": stats.coefficient_of_variation(loop["times_ms"]),
        "throughput_ips": stats.throughput_ips(n, batch, loop["wall_s"]),
        "iterations": n,
        "duration_s": loop["wall_s"],
        "warmup_runs": loop["warmup_runs"],
        "warmup_s": loop["warmup_s"],
    }
    if loop["parts_ms"]:
        for i, key in enumerate(("h2d_ms", "compute_ms", "d2h_ms")):
            out[key] = stats.summarize([p[i] for p in loop["parts_ms"]])
        out["compute_cv"] = stats.coefficient_of_variation([p[1] for p in loop["parts_ms"]])
    return out


def _warnings(result):
    """trtexec's diagnostics, in words."""
    notes = []
    if result["cv"] > 10.0:
        notes.append("latency varies a lot (CV {:.1f} %): lock clocks, close other programs, or run longer".format(
            result["cv"]))
    if "h2d_ms" in result and result["h2d_ms"]["median"] >= result["compute_ms"]["median"]:
        notes.append("host-to-device copies take as long as the compute: throughput is bound by transfers")
    if result.get("compute_cv", 0) > 1.0 and result["cv"] <= 10.0:
        notes.append("GPU compute time CV {:.1f} %: locking GPU clocks or --spin-wait may steady it".format(
            result["compute_cv"]))
    return notes


def benchmark_runner(runner, batch_sizes=(1,), warmup_s=DEFAULT_WARMUP_S, iterations=DEFAULT_ITERATIONS,
                     duration_s=DEFAULT_DURATION_S, cuda_graph=False, spin_wait=False, power=True,
                     power_interval_ms=DEFAULT_POWER_INTERVAL_MS, log=None):
    """Benchmark an already loaded runner (any backend, e.g. a host TorchRunner) at each batch size.

    Returns {"results": [...], "power": {...}}; power sampling (tegrastats/jtop) covers each
    batch's timed section separately.
    """
    log = log or (lambda msg: None)
    monitor, reason = open_power_monitor(power_interval_ms, enabled=power)
    power_doc = {"available": monitor is not None}
    if monitor is None:
        power_doc["reason"] = reason
    else:
        power_doc.update(source=monitor.source, interval_ms=power_interval_ms)
    results = []
    for batch in batch_sizes:
        prepared = runner.prepare(batch, cuda_graph=cuda_graph, spin_wait=spin_wait)
        try:
            log(f"  batch {batch}: warm-up {warmup_s:.2f} s, then >= {iterations} runs and >= {duration_s:.1f} s")
            if monitor is not None:
                monitor.start()
            try:
                loop = timed_loop(prepared.run, warmup_s, iterations, duration_s)
            except BaseException:
                if monitor is not None:
                    monitor.stop()
                raise
            result = summarize_loop(loop, batch)
            if monitor is not None:
                monitor.mark(loop["t0"], loop["t1"])
                monitor.stop()
                result["power"] = monitor.summary(images=result["iterations"] * batch)
        finally:
            prepared.close()
        result["notes"] = _warnings(result)
        results.append(result)
        lat = result["latency_ms"]
        log("  batch {}: median {:.3f} ms, p99 {:.3f} ms, {:.1f} images/s ({} runs in {:.2f} s){}".format(
            batch, lat["median"], lat["p99"], result["throughput_ips"], result["iterations"], result["duration_s"],
            _power_words(result.get("power"))))
        for note in result["notes"]:
            log("  note: " + note)
    return {"results": results, "power": power_doc}


def _power_words(p):
    if not p or not p.get("available"):
        return ""
    words = ", {:.2f} W".format(p["total_mw"] / 1000.0)
    if p.get("energy_mj_per_image") is not None:
        words += ", {:.2f} mJ/image".format(p["energy_mj_per_image"])
    return words


def run_benchmark(model_path, backend="auto", batch_sizes=(1,), warmup_s=DEFAULT_WARMUP_S,
                  iterations=DEFAULT_ITERATIONS, duration_s=DEFAULT_DURATION_S, threads=None, providers=None,
                  cuda_graph=False, spin_wait=False, power=True, power_interval_ms=DEFAULT_POWER_INTERVAL_MS,
                  log=None, evaluate=None):
    """Load a model (.onnx or TensorRT engine), benchmark it at each batch size, return a JSON-able dict.

    `model_path` may also be a Runner the caller made (e.g. a TorchRunner around a host
    nn.Module); it is loaded if needed and left open for the caller to close.

    {"model", "backend", "backend_reason", "provider", "precision", "results": [per batch:
    {"batch", "latency_ms": {mean, std, min, median, p90, p95, p99, max}, "cv" (percent),
    "throughput_ips", "iterations", "duration_s", optional "h2d_ms"/"compute_ms"/"d2h_ms",
    optional "power"}], "memory", "power", "conditions"}. See runtime/README.md for the schema.
    `evaluate`, if given, is called with the loaded runner after timing and its result stored
    under "accuracy" (the CLI passes evaluate_folder_with / evaluate_arrays this way).
    """
    log = log or (lambda msg: None)
    reset = memory.reset_peak_rss()
    rss_before = memory.rss_mb()
    t0 = time.time()
    owned = not isinstance(model_path, Runner)
    if owned:
        runner = open_runner(model_path, backend=backend, providers=providers, threads=threads, log=log)
    else:
        runner = model_path
        model_path = getattr(runner, "model_path", None) or getattr(runner, "engine_path", None) or runner.backend
        if not runner.loaded:
            runner.load()
    try:
        load_s = time.time() - t0
        rss_loaded = memory.rss_mb()
        info = runner.info
        log("{}: {} ({}), {} precision{}".format(
            os.path.basename(model_path), info["backend"], info.get("provider"), info.get("precision"),
            "" if not info.get("backend_reason") else "; " + info["backend_reason"]))
        bench = benchmark_runner(runner, batch_sizes, warmup_s, iterations, duration_s, cuda_graph, spin_wait,
                                 power, power_interval_ms, log)
        doc = describe_run(model_path, runner, bench, threads, load_s)
        doc["memory"] = memory_report(runner, rss_before, rss_loaded, reset, bench["results"])
        if evaluate is not None:
            doc["accuracy"] = evaluate(runner)
        return doc
    finally:
        if owned:
            runner.close()


def describe_run(model_path, runner, bench, threads=None, load_s=None):
    info = runner.info
    return {
        "model": model_path,
        "backend": info.get("backend", runner.backend),
        "backend_reason": info.get("backend_reason"),
        "provider": info.get("provider"),
        "provider_reason": info.get("provider_reason"),
        "precision": info.get("precision"),
        "load_s": load_s,
        "results": bench["results"],
        "power": bench["power"],
        "conditions": collect_conditions(threads=threads, runner_info=info),
    }


def memory_report(runner, rss_before, rss_loaded, reset, results):
    out = {
        "peak_rss_mb": memory.peak_rss_mb(),
        "peak_rss_scope": "this model" if reset else "whole process so far (could not reset VmHWM)",
        "rss_before_load_mb": rss_before,
        "rss_after_load_mb": rss_loaded,
    }
    device = getattr(runner, "device_memory_mb", None)
    if device is not None:
        out["device_mb"], out["device_method"] = device, "cudaMemGetInfo delta around engine load and buffers"
    else:
        nvml = memory.nvml_process_memory_mb()
        if nvml is not None:
            out["device_mb"], out["device_method"] = nvml, "NVML, this process"
        else:
            out["device_mb"], out["device_method"] = None, "not measured (CPU backend, or no NVML/CUDA binding)"
    ram = [r["power"]["ram_used_mb"]["max"] for r in results if (r.get("power") or {}).get("ram_used_mb")]
    if ram:
        out["tegrastats_ram_used_mb_max"] = max(ram)
        out["tegrastats_note"] = "system-wide RAM in use (CPU and GPU share it on Jetson)"
    return out
