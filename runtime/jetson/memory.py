"""Memory a model costs: peak process RSS, and device memory where the platform can tell.

On a Jetson CPU and GPU share one DRAM, so the process RSS (which includes CUDA's mappings)
and tegrastats' RAM figure are the numbers that matter; on a discrete GPU NVML reports the
process's device memory, and the CUDA free-memory delta around model loading is the fallback.
"""

import os


def _status_kb(field, path="/proc/self/status"):
    try:
        with open(path, "r") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_mb(path="/proc/self/status"):
    """VmHWM: the process's peak resident set since start (or since reset_peak_rss)."""
    kb = _status_kb("VmHWM", path)
    return kb / 1024.0 if kb is not None else None


def rss_mb(path="/proc/self/status"):
    kb = _status_kb("VmRSS", path)
    return kb / 1024.0 if kb is not None else None


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each model of a multi-model run gets its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def nvml_process_memory_mb(pid=None):
    """Device memory NVML attributes to this process (discrete GPUs; Jetsons have no NVML), or None."""
    try:
        import pynvml
    except ImportError:
        return None
    pid = os.getpid() if pid is None else pid
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        total = 0
        found = False
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory is not None:
                    total += proc.usedGpuMemory
                    found = True
        return total / 2.0 ** 20 if found else None
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()
