import math

import pytest

from rsedge.runtime.bench import benchmark, stats


def test_percentile_matches_trtexec_nearest_rank():
    values = list(range(1, 101))  # 1..100 ms
    assert stats.percentile(values, 90) == 90
    assert stats.percentile(values, 99) == 99
    assert stats.percentile(values, 100) == 100
    # trtexec: exclude = int((1 - p/100) * n) values from the top; 10 values, p95 -> exclude 0
    ten = list(range(10))
    assert stats.percentile(ten, 95) == 9
    assert stats.percentile(ten, 90) == 8
    assert stats.percentile(ten, 50) == 4
    assert stats.percentile([7.0], 99) == 7.0
    assert math.isnan(stats.percentile([], 50))
    with pytest.raises(ValueError):
        stats.percentile(ten, 101)


def test_median_even_and_odd():
    assert stats.median([1, 2, 3]) == 2
    assert stats.median([1, 2, 3, 10]) == 2.5


def test_summarize_and_cv():
    s = stats.summarize([4.0, 1.0, 3.0, 2.0])
    assert s["min"] == 1.0 and s["max"] == 4.0
    assert s["mean"] == 2.5 and s["median"] == 2.5
    assert s["std"] == pytest.approx(math.sqrt(1.25))  # population std, as trtexec
    assert set(s) == {"mean", "std", "min", "median", "p90", "p95", "p99", "max"}
    assert stats.coefficient_of_variation([4.0, 1.0, 3.0, 2.0]) == pytest.approx(100 * math.sqrt(1.25) / 2.5)
    assert stats.coefficient_of_variation([5, 5, 5]) == 0.0
    with pytest.raises(ValueError):
        stats.summarize([])


def test_throughput_is_queries_per_second_times_batch():
    assert stats.throughput_ips(100, 8, 2.0) == 400.0
    assert math.isnan(stats.throughput_ips(1, 1, 0))


def test_finite_or_none():
    assert stats.finite_or_none(float("nan")) is None
    assert stats.finite_or_none(float("inf")) is None
    assert stats.finite_or_none(1.5) == 1.5
    assert stats.finite_or_none(None) is None


class FakeClock:
    """Each run() advances time by a fixed step, so the loop is deterministic."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_timed_loop_stops_after_both_iterations_and_duration():
    clock = FakeClock()
    calls = []

    def run():
        clock.now += 0.01
        calls.append(1)

    loop = benchmark.timed_loop(run, warmup_s=0.05, iterations=3, duration_s=0.2, clock=clock)
    assert loop["warmup_runs"] == 5
    assert len(loop["times_ms"]) == 20  # the 0.2 s floor dominates 3 iterations
    assert loop["times_ms"][0] == pytest.approx(10.0)
    assert loop["wall_s"] == pytest.approx(0.2)
    assert loop["parts_ms"] is None
    assert len(calls) == 25

    clock.now = 0.0
    loop = benchmark.timed_loop(run, warmup_s=0.0, iterations=7, duration_s=0.0, clock=clock)
    assert loop["warmup_runs"] == 1  # at least one warm-up run
    assert len(loop["times_ms"]) == 7


def test_summarize_loop_with_stage_times():
    loop = {"times_ms": [2.0, 2.0, 4.0, 4.0], "parts_ms": [(0.1, 1.5, 0.2)] * 4, "wall_s": 0.012,
            "warmup_runs": 3, "warmup_s": 0.2}
    r = benchmark.summarize_loop(loop, batch=8)
    assert r["batch"] == 8 and r["iterations"] == 4
    assert r["latency_ms"]["median"] == 3.0
    assert r["throughput_ips"] == pytest.approx(4 * 8 / 0.012)
    assert r["compute_ms"]["median"] == 1.5 and r["h2d_ms"]["mean"] == pytest.approx(0.1)
    assert r["cv"] == pytest.approx(100.0 / 3.0)
    notes = benchmark._warnings(r)
    assert any("varies" in n for n in notes)
