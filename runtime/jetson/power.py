"""Power, GPU load and shared RAM during a timed run, from whatever the board offers.

Order of preference: `tegrastats` (every JetPack has it, no daemon needed), then jtop (the
jetson-stats service, which also works inside containers that lack tegrastats). On a machine
with neither (x86) the result says so instead of inventing a number.
"""

import time

from . import tegrastats


class PowerMonitor:
    """start() before the timed run, mark(t0, t1) its window, stop(), then summary(images)."""

    def __init__(self, sampler, source):
        self.sampler = sampler
        self.source = source
        self._window = (None, None)

    @property
    def available(self):
        return self.sampler is not None

    def start(self):
        self.sampler.start()
        # The first line tells us tegrastats works; without it a short run gets no samples.
        deadline = time.monotonic() + max(1.0, 3 * self.sampler.interval_ms / 1000.0)
        while not self.sampler.lines() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def mark(self, t0, t1):
        self._window = (t0, t1)

    def stop(self):
        t1 = self._window[1]
        if t1 is not None:
            # Wait for the line that covers the end of the run.
            deadline = time.monotonic() + 1.5 * self.sampler.interval_ms / 1000.0
            while time.monotonic() < deadline:
                lines = self.sampler.lines()
                if lines and lines[-1][0] >= t1:
                    break
                time.sleep(0.005)
        self.sampler.stop()

    def summary(self, images=None):
        t0, t1 = self._window
        samples = self.sampler.samples(t0, t1)
        duration = (t1 - t0) if (t0 is not None and t1 is not None) else None
        out = tegrastats.summarize(samples, duration_s=duration, images=images)
        out["source"] = self.source
        out["interval_ms"] = self.sampler.interval_ms
        return out


def open_power_monitor(interval_ms=100, enabled=True):
    """(PowerMonitor or None, reason) for this machine."""
    if not enabled:
        return None, "power sampling switched off (--no-power)"
    exe = tegrastats.find_tegrastats()
    if exe is not None:
        return PowerMonitor(tegrastats.TegrastatsSampler(interval_ms, exe), "tegrastats"), None
    sampler = JtopSampler.open(interval_ms)
    if sampler is not None:
        return PowerMonitor(sampler, "jtop"), None
    return None, "no tegrastats or jtop on this machine (not a Jetson): power and GPU load are not measured"


class JtopSampler:
    """Samples jetson-stats' `jtop` service in a thread, converted to tegrastats' sample shape.

    jtop 4.x reports `jetson.power` as {"rail": {name: {"power": mW, ...}}, "tot": {...}}
    and GPU load in `jetson.stats["GPU"]`; older layouts are skipped rather than guessed.
    """

    def __init__(self, jtop_cls, interval_ms):
        self._jtop_cls = jtop_cls
        self.interval_ms = int(interval_ms)
        self._lines = []
        self._stop = False
        self._thread = None

    @classmethod
    def open(cls, interval_ms):
        try:
            from jtop import jtop
        except ImportError:
            return None
        return cls(jtop, interval_ms)

    def start(self):
        import threading

        self._lines = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="jtop-sampler")
        self._thread.daemon = True
        self._thread.start()
        return self

    def _run(self):
        try:
            with self._jtop_cls(interval=self.interval_ms / 1000.0) as jetson:
                while not self._stop and jetson.ok():
                    self._lines.append((time.monotonic(), _jtop_sample(jetson)))
        except Exception:  # noqa: BLE001 - jtop's service may vanish mid-run; samples so far still count
            return

    def lines(self):
        return list(self._lines)

    def stop(self):
        self._stop = True
        if self._thread is not None:
            self._thread.join(timeout=5)

    def samples(self, t0=None, t1=None):
        return list(tegrastats.select_window(self.lines(), t0, t1, self.interval_ms / 1000.0))


def _jtop_sample(jetson):
    sample = tegrastats.parse_line("")
    power = getattr(jetson, "power", None)
    if isinstance(power, dict):
        for name, rail in (power.get("rail") or {}).items():
            if isinstance(rail, dict) and "power" in rail:
                sample["rails_mw"][name] = int(rail["power"])
    stats = getattr(jetson, "stats", None) or {}
    if isinstance(stats.get("GPU"), (int, float)):
        sample["gpu_load_pct"] = int(stats["GPU"])
    memory = getattr(jetson, "memory", None)
    if isinstance(memory, dict) and isinstance(memory.get("RAM"), dict):
        ram = memory["RAM"]
        if "used" in ram and "tot" in ram:
            sample["ram_used_mb"] = int(ram["used"] / 1024)
            sample["ram_total_mb"] = int(ram["tot"] / 1024)
    return sample
