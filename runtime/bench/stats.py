"""Latency statistics computed the way trtexec computes them.

Using trtexec's definitions (nearest-rank percentiles on the ascending timings, median as the
mean of the two middle values, population standard deviation, coefficient of variation in
percent) keeps our numbers comparable with the `trtexec` figures users already have.
Pure Python + numpy so it can be tested anywhere.
"""

import math

import numpy as np

PERCENTILES = (90, 95, 99)


def percentile(sorted_values, pct):
    """trtexec's percentile: drop floor((1 - pct/100) * n) values from the top, take the next."""
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {pct}")
    # (100 - pct) * n / 100 rather than (1 - pct/100) * n: the latter makes p90 of 100 values
    # exclude 9.999... -> 9 in double precision, where trtexec (in float) excludes 10.
    exclude = int((100.0 - pct) * n / 100.0 + 1e-9)
    return float(sorted_values[max(n - 1 - exclude, 0)])


def median(sorted_values):
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    m = n // 2
    if n % 2:
        return float(sorted_values[m])
    return (float(sorted_values[m - 1]) + float(sorted_values[m])) / 2.0


def coefficient_of_variation(values):
    """Standard deviation over mean, in percent (trtexec prints it the same way)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return 0.0
    mean = float(arr.mean())
    if mean == 0.0:
        return float("inf")
    return float(arr.std()) / mean * 100.0


def summarize(values_ms):
    """mean / std / min / median / p90 / p95 / p99 / max of a list of milliseconds."""
    arr = np.sort(np.asarray(values_ms, dtype=np.float64))
    if arr.size == 0:
        raise ValueError("no timings to summarize")
    out = {
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "min": float(arr[0]),
        "median": median(arr),
    }
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(arr, p)
    out["max"] = float(arr[-1])
    return out


def throughput_ips(queries, batch, wall_s):
    """Images per second: queries per second times the batch, as trtexec reports it."""
    if wall_s <= 0:
        return float("nan")
    return queries * batch / float(wall_s)


def finite_or_none(x):
    """JSON has no NaN/inf; None says 'not measured' honestly."""
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
