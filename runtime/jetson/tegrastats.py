"""Parse and sample `tegrastats`, the Jetson's own RAM / GPU-load / power-rail monitor.

The line format differs by JetPack and board, and all of them must parse:

* JetPack 4 (TX2, Nano, Xavier): rails are `NAME cur/avg` in mW without a unit, and their names
  are per board (TX2 `VDD_IN VDD_SYS_GPU ...`, Nano `POM_5V_IN POM_5V_GPU ...`, AGX Xavier
  `GPU CPU SOC CV VDDRQ SYS5V`);
* JetPack 5/6 (Xavier, Orin): `NAME 1234mW/1200mW`, often behind a `MM-DD-YYYY HH:MM:SS` stamp,
  and `GR3D_FREQ 14%@[407,407]` for multi-partition GPUs.

We keep each line's *current* values and average them over our own timed window; tegrastats'
second figure is an average since tegrastats started, which would mix in the idle time before
the benchmark.
"""

import os
import re
import shutil
import subprocess
import threading
import time

_STAMP = re.compile(r"^\s*(\d\d-\d\d-\d{4} \d\d:\d\d:\d\d)\s")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)MB")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)MB")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CORE = re.compile(r"^(\d+)%@(\d+)$")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+)%(?:@\[?(\d+))?")
_EMC = re.compile(r"\bEMC_FREQ (\d+)%")
_TEMP = re.compile(r"\b([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
# A rail is `NAME cur/avg` with an optional mW on either figure; the lookahead keeps
# `RAM 2344/7852MB` and `IRAM 0/252kB` out (a unit letter or digit follows their numbers).
_RAIL = re.compile(r"(?<![\w@])([A-Za-z][A-Za-z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?![\w/])")
_NOT_RAILS = frozenset(["RAM", "SWAP", "IRAM"])

# Rails that measure the whole module's input: when one is present it is the total, because
# the others are parts of it. Boards without one (AGX Xavier, AGX Orin) get the sum of rails.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")
# Sensors that report this sentinel are switched off (e.g. Orin's `CV0@-256C`).
_OFFLINE_TEMP = -256.0


def parse_line(line):
    """One tegrastats line -> dict; fields a board does not print are None / empty."""
    out = {
        "stamp": None,
        "ram_used_mb": None,
        "ram_total_mb": None,
        "swap_used_mb": None,
        "swap_total_mb": None,
        "cpu": [],
        "gpu_load_pct": None,
        "gpu_freq_mhz": None,
        "emc_load_pct": None,
        "temps_c": {},
        "rails_mw": {},
        "rails_avg_mw": {},
    }
    m = _STAMP.match(line)
    if m:
        out["stamp"] = m.group(1)
    m = _RAM.search(line)
    if m:
        out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    m = _SWAP.search(line)
    if m:
        out["swap_used_mb"], out["swap_total_mb"] = int(m.group(1)), int(m.group(2))
    m = _CPU.search(line)
    if m:
        for core in m.group(1).split(","):
            cm = _CORE.match(core.strip())
            out["cpu"].append({"load_pct": int(cm.group(1)), "freq_mhz": int(cm.group(2))} if cm else None)
    m = _GR3D.search(line)
    if m:
        out["gpu_load_pct"] = int(m.group(1))
        if m.group(2):
            out["gpu_freq_mhz"] = int(m.group(2))
    m = _EMC.search(line)
    if m:
        out["emc_load_pct"] = int(m.group(1))
    for name, value in _TEMP.findall(line):
        t = float(value)
        if t != _OFFLINE_TEMP:
            out["temps_c"][name] = t
    for name, cur, avg in _RAIL.findall(line):
        if name in _NOT_RAILS:
            continue
        out["rails_mw"][name] = int(cur)
        out["rails_avg_mw"][name] = int(avg)
    return out


def total_power(rails_mw):
    """(total mW, rule in words) for one sample's rails, or (None, reason) without rails."""
    if not rails_mw:
        return None, "no power rails in the tegrastats output"
    for name in INPUT_RAILS:
        if name in rails_mw:
            return float(rails_mw[name]), f"{name} (module input rail)"
    names = sorted(rails_mw)
    return float(sum(rails_mw.values())), "sum of rails {} (this board has no input rail)".format("+".join(names))


def _mean(values):
    return float(sum(values)) / len(values) if values else None


def summarize(samples, duration_s=None, images=None):
    """Mean power per rail and in total, energy per image, GPU load and RAM over `samples`.

    `duration_s` and `images` are those of the timed run the samples cover; energy per image
    is mean total power times duration over images (mW x s = mJ).
    """
    rails = {}
    totals = []
    rule = None
    for s in samples:
        for name, mw in s["rails_mw"].items():
            rails.setdefault(name, []).append(mw)
        total, why = total_power(s["rails_mw"])
        if total is not None:
            totals.append(total)
            rule = why
    loads = [s["gpu_load_pct"] for s in samples if s["gpu_load_pct"] is not None]
    ram = [s["ram_used_mb"] for s in samples if s["ram_used_mb"] is not None]
    ram_total = [s["ram_total_mb"] for s in samples if s["ram_total_mb"] is not None]
    out = {"samples": len(samples)}
    if totals:
        out["available"] = True
        out["rails_mw"] = {name: _mean(v) for name, v in sorted(rails.items())}
        out["total_mw"] = _mean(totals)
        out["total_rule"] = rule
        if duration_s and images:
            out["energy_mj_per_image"] = out["total_mw"] * float(duration_s) / float(images)
    else:
        out["available"] = False
        out["reason"] = (
            "tegrastats printed no power rails" if samples else "tegrastats printed nothing during the run"
        ) + " (on some boards the rails need root: run under sudo)"
    if loads:
        out["gpu_load_pct"] = {"mean": _mean(loads), "max": max(loads)}
    if ram:
        out["ram_used_mb"] = {"mean": _mean(ram), "max": max(ram), "total": ram_total[-1] if ram_total else None}
    return out


def find_tegrastats():
    """Path of the tegrastats binary, or None (x86, or a container without it)."""
    path = shutil.which("tegrastats")
    if path:
        return path
    for candidate in ("/usr/bin/tegrastats", "/usr/sbin/tegrastats"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class TegrastatsSampler:
    """Runs `tegrastats --interval MS` in the background and timestamps each line on arrival.

    tegrastats writes through stdio, which a pipe makes block-buffered: lines would arrive in
    4 kB bursts and the tail be lost when we stop it. `stdbuf -oL` makes it line-buffered.
    """

    source = "tegrastats"

    def __init__(self, interval_ms=100, exe=None):
        self.interval_ms = int(interval_ms)
        self.exe = exe or find_tegrastats()
        self._proc = None
        self._thread = None
        self._lines = []
        self._lock = threading.Lock()

    def start(self):
        if self.exe is None:
            raise OSError("tegrastats not found")
        with self._lock:
            self._lines = []
        cmd = [self.exe, "--interval", str(self.interval_ms)]
        stdbuf = shutil.which("stdbuf")
        if stdbuf:
            cmd = [stdbuf, "-oL"] + cmd
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True, bufsize=1
        )
        self._thread = threading.Thread(target=self._read, name="tegrastats-reader")
        self._thread.daemon = True
        self._thread.start()
        return self

    def _read(self):
        for line in self._proc.stdout:
            line = line.strip()
            if line:
                with self._lock:
                    self._lines.append((time.monotonic(), line))

    def stop(self):
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._thread is not None:
            self._thread.join(timeout=3)
        self._proc.stdout.close()
        self._proc = None

    def lines(self):
        with self._lock:
            return list(self._lines)

    def samples(self, t0=None, t1=None):
        """Parsed samples whose interval lies in the monotonic window [t0, t1]."""
        return [parse_line(line) for line in select_window(self.lines(), t0, t1, self.interval_ms / 1000.0)]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def select_window(timed_lines, t0, t1, interval_s):
    """Lines whose sampling interval falls mostly inside [t0, t1].

    A line that arrives at time a describes roughly (a - interval, a], so we keep lines with
    a - interval/2 inside the window. A run shorter than one interval keeps the line closest to
    its middle rather than nothing.
    """
    if t0 is None or t1 is None:
        return [line for _, line in timed_lines]
    half = interval_s / 2.0
    kept = [line for a, line in timed_lines if t0 <= a - half <= t1]
    if kept or not timed_lines:
        return kept
    middle = (t0 + t1) / 2.0
    return [min(timed_lines, key=lambda item: abs(item[0] - half - middle))[1]]
