"""The conditions a benchmark ran under, recorded with every result.

A latency number means little without the board, power mode, clocks, software versions and
thread count behind it; on a Jetson, unlocked clocks alone can change it by 2x. Everything here
is read from files and commands that exist on L4T (device tree, /etc/nv_tegra_release,
nvpmodel, sysfs cpufreq/devfreq) and degrades to None elsewhere. The file-parsing parts take
their input as arguments so they are tested on sample text.
"""

import glob
import os
import platform
import re
import socket
import subprocess
import sys

from ..fileio import utc_now

_GPU_DEVFREQ = re.compile(r"(gpu|gp10b|gv11b|ga10b|gb10b|gm20b)", re.IGNORECASE)


def read_text(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def board_model(root="/"):
    """'NVIDIA Jetson TX2' etc. from the device tree (NUL-terminated), or None off Jetson/ARM boards."""
    text = read_text(os.path.join(root, "proc/device-tree/model"))
    return text.replace("\x00", "").strip() if text else None


def parse_l4t_release(text):
    """'# R32 (release), REVISION: 7.1, ...' -> '32.7.1'; None if unrecognised."""
    if not text:
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)\.(\d+)", text)
    if not m:
        return None
    return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"


JETPACK_BY_L4T = (("36.4", "6.1/6.2"), ("36.3", "6.0"), ("35.", "5.1.x"), ("32.7", "4.6.x"), ("32.6", "4.6"),
                  ("32.5", "4.5"), ("32.4", "4.4"))


def jetpack_for_l4t(l4t):
    if not l4t:
        return None
    for prefix, jetpack in JETPACK_BY_L4T:
        if l4t.startswith(prefix):
            return jetpack
    return None


def parse_nvpmodel(text):
    """`nvpmodel -q` output ('NV Power Mode: MAXN\\n0') -> {"name": "MAXN", "id": 0}."""
    if not text:
        return None
    name = re.search(r"NV Power Mode:\s*(\S+)", text)
    ident = re.search(r"^\s*(\d+)\s*$", text, re.MULTILINE)
    if not name:
        return None
    return {"name": name.group(1), "id": int(ident.group(1)) if ident else None}


def run_command(cmd, timeout=5):
    """stdout of a command, or None if it is missing, fails or hangs (Python 3.6: no capture_output)."""
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.decode("utf-8", "replace") if proc.returncode == 0 else None


def _read_int(path):
    text = read_text(path)
    try:
        return int(text.strip()) if text else None
    except ValueError:
        return None


def cpu_clocks(root="/"):
    """[{cpu, governor, min, max, cur}] for online CPUs (kHz)."""
    out = []
    for d in sorted(glob.glob(os.path.join(root, "sys/devices/system/cpu/cpu[0-9]*/cpufreq"))):
        out.append({"cpu": os.path.basename(os.path.dirname(d)),
                    "governor": (read_text(os.path.join(d, "scaling_governor")) or "").strip() or None,
                    "min": _read_int(os.path.join(d, "scaling_min_freq")),
                    "max": _read_int(os.path.join(d, "scaling_max_freq")),
                    "cur": _read_int(os.path.join(d, "scaling_cur_freq"))})
    return out


def gpu_clocks(root="/"):
    """[{name, min, max, cur}] of the Jetson GPU's devfreq node(s) (Hz)."""
    out = []
    for d in sorted(glob.glob(os.path.join(root, "sys/class/devfreq/*"))):
        name = os.path.basename(d)
        if _GPU_DEVFREQ.search(name):
            out.append({"name": name, "min": _read_int(os.path.join(d, "min_freq")),
                        "max": _read_int(os.path.join(d, "max_freq")), "cur": _read_int(os.path.join(d, "cur_freq"))})
    return out


def clocks_locked(cpus, gpus):
    """(locked, detail): jetson_clocks pins every CPU's and the GPU's minimum to its maximum."""
    if not cpus and not gpus:
        return None, "no cpufreq/devfreq information"
    loose = ["{} min {} < max {}".format(c["cpu"], c["min"], c["max"]) for c in cpus
             if c["min"] is not None and c["max"] is not None and c["min"] < c["max"]]
    loose += ["GPU {} min {} < max {}".format(g["name"], g["min"], g["max"]) for g in gpus
              if g["min"] is not None and g["max"] is not None and g["min"] < g["max"]]
    if loose:
        return False, "; ".join(loose[:3]) + (" ..." if len(loose) > 3 else "")
    return True, "CPU and GPU minimum clocks equal their maximum"


def cpu_model(root="/"):
    text = read_text(os.path.join(root, "proc/cpuinfo")) or ""
    for key in ("model name", "Hardware", "Processor"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            return m.group(1).strip()
    return platform.processor() or platform.machine()


def _try_import(module):
    try:
        __import__(module)
    except Exception:  # noqa: BLE001 - a broken optional library (missing .so, wrong CUDA) is just absent
        return False
    return True


def library_versions():
    """Versions of the optional libraries that are importable, without importing torch or onnx."""
    versions = {"python": platform.python_version()}
    for module, key in (("numpy", "numpy"), ("onnxruntime", "onnxruntime"), ("tensorrt", "tensorrt"),
                        ("pycuda", "pycuda"), ("PIL", "pillow")):
        if module not in sys.modules and not _try_import(module):
            continue
        mod = sys.modules.get(module)
        version = getattr(mod, "__version__", None) or getattr(mod, "VERSION_TEXT", None)
        if version is not None:
            versions[key] = str(version)
    return versions


def nvidia_smi_gpus():
    out = run_command(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if not out:
        return []
    gpus = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 2:
            gpus.append({"name": parts[0], "driver": parts[1], "memory": parts[2] if len(parts) > 2 else None})
    return gpus


def collect_conditions(threads=None, runner_info=None, root="/"):
    """Everything about the machine a benchmark ran on, plus warnings about what may skew it."""
    board = board_model(root)
    l4t = parse_l4t_release(read_text(os.path.join(root, "etc/nv_tegra_release")))
    jetson = l4t is not None or bool(board and "jetson" in board.lower())
    cpus = cpu_clocks(root)
    gpus = gpu_clocks(root) if jetson else []
    locked, locked_detail = clocks_locked(cpus, gpus)
    info = dict(runner_info or {})
    cond = {
        "date": utc_now(),
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(root),
        "cpu_count": os.cpu_count(),
        "threads": threads if threads else "library default",
        "jetson": jetson,
        "board": board,
        "l4t": l4t,
        "jetpack": jetpack_for_l4t(l4t),
        "nvpmodel": parse_nvpmodel(run_command(["nvpmodel", "-q"])) if jetson else None,
        "clocks_locked": locked,
        "clocks_detail": locked_detail,
        "cpu_governors": sorted({c["governor"] for c in cpus if c["governor"]}),
        "gpu": (info.get("device") or {}).get("name") if info.get("device") else None,
        "versions": library_versions(),
        "warnings": [],
    }
    if not jetson:
        smi = nvidia_smi_gpus()
        if smi:
            cond["gpu"] = cond["gpu"] or smi[0]["name"]
            cond["nvidia_driver"] = smi[0]["driver"]
    elif cond["gpu"] is None:
        cond["gpu"] = "integrated ({})".format(board or "Jetson")
    for key in ("tensorrt", "cuda", "cuda_driver", "onnxruntime", "pycuda", "cuda-python"):
        if info.get(key) and key not in cond["versions"]:
            cond["versions"][key] = info[key]
    if jetson and locked is False:
        cond["warnings"].append(f"clocks are not locked ({locked_detail}): results will vary; run `sudo jetson_clocks` "
                                "(benchmarks/bench_device.sh does it and restores them)")
    if not jetson and cond["cpu_governors"] and cond["cpu_governors"] != ["performance"]:
        cond["warnings"].append("CPU frequency governor is {} (not 'performance'): CPU timings may vary".format(
            "/".join(cond["cpu_governors"])))
    return cond
