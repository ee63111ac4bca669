"""tegrastats parsing on real lines from each board family and JetPack generation."""

import os
import stat
import sys
import time

import pytest

from rsedge.runtime.jetson import power, tegrastats

# JetPack 4 (L4T r32), Jetson TX2: rails cur/avg in mW without a unit.
TX2 = ("RAM 2344/7852MB (lfb 1154x4MB) SWAP 0/3926MB (cached 0MB) CPU [1%@345,off,off,1%@345,0%@345,2%@345] "
       "EMC_FREQ 4%@1600 GR3D_FREQ 0%@624 APE 150 PLL@37.5C MCPU@37.5C PMIC@100C Tboard@32C GPU@35C BCPU@37.5C "
       "thermal@36.5C Tdiode@34.25C VDD_SYS_GPU 152/152 VDD_SYS_SOC 687/687 VDD_4V0_WIFI 0/0 VDD_IN 3056/3056 "
       "VDD_SYS_CPU 152/152 VDD_SYS_DDR 883/883")
# JetPack 4, Jetson Nano (sudo): POM_* rails, IRAM field.
NANO = ("RAM 1655/3956MB (lfb 311x4MB) SWAP 0/1978MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
        "CPU [14%@204,14%@204,10%@204,11%@204] EMC_FREQ 3%@1600 GR3D_FREQ 16%@76 APE 25 PLL@36C CPU@39C "
        "iwlwifi@44C PMIC@50C GPU@37C AO@47C thermal@38C POM_5V_IN 2247/2189 POM_5V_GPU 78/78 POM_5V_CPU 275/275")
# JetPack 4, Jetson AGX Xavier: bare rail names, no input rail.
XAVIER = ("RAM 1903/15692MB (lfb 3251x4MB) CPU [1%@1190,1%@1190,2%@1190,0%@1190,0%@1190,0%@1190,0%@1190,0%@1190] "
          "EMC_FREQ 0% GR3D_FREQ 0% AO@32.5C GPU@32C Tboard@32C Tdiode@34.75C AUX@31.5C CPU@33.5C thermal@32.9C "
          "PMIC@100C GPU 0/0 CPU 216/216 SOC 864/864 CV 0/0 VDDRQ 144/144 SYS5V 1889/1889")
# JetPack 5 (L4T r35), Jetson AGX Orin: time stamp, mW units, GR3D_FREQ per GPC, offline sensor at -256C.
AGX_ORIN = ("09-26-2023 13:49:48 RAM 13983/62780MB (lfb 424x4MB) SWAP 126/31390MB (cached 0MB) "
            "CPU [90%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,100%@2201,"
            "100%@2201,100%@2201,100%@2201] EMC_FREQ 1%@2133 GR3D_FREQ 14%@[407,407] VIC_FREQ 115 "
            "NVDLA0_FREQ @1600 APE 174 CV0@-256C CPU@77.281C Tboard@62C SOC2@70C Tdiode@62.25C SOC0@69.531C "
            "CV1@72.5C GPU@69.125C tj@77.281C SOC1@68.968C CV2@67.25C VDD_GPU_SOC 3150mW/2971mW "
            "VDD_CPU_CV 14312mW/12415mW VIN_SYS_5V0 4968mW/5048mW VDDQ_VDD2_1V8AO 1091mW/1091mW")
# JetPack 6 (L4T r36), Jetson Orin Nano: VDD_IN input rail; one avg printed without its unit.
ORIN_NANO = ("12-23-2024 22:54:11 RAM 3162/7620MB (lfb 4x2MB) SWAP 0/3810MB (cached 0MB) "
             "CPU [1%@729,0%@729,0%@729,0%@729,off,off] GR3D_FREQ 1% cpu@62.843C soc2@61.968C soc0@60.625C "
             "gpu@61.687C tj@62.843C soc1@61.687C VDD_IN 3913mW/3922mW VDD_CPU_GPU_CV 598mW/598 "
             "VDD_SOC 1238mW/1237mW")


def test_tx2_jetpack4():
    s = tegrastats.parse_line(TX2)
    assert s["stamp"] is None
    assert (s["ram_used_mb"], s["ram_total_mb"]) == (2344, 7852)
    assert (s["swap_used_mb"], s["swap_total_mb"]) == (0, 3926)
    assert s["cpu"][1] is None and s["cpu"][0] == {"load_pct": 1, "freq_mhz": 345}
    assert (s["gpu_load_pct"], s["gpu_freq_mhz"], s["emc_load_pct"]) == (0, 624, 4)
    assert s["rails_mw"] == {"VDD_SYS_GPU": 152, "VDD_SYS_SOC": 687, "VDD_4V0_WIFI": 0, "VDD_IN": 3056,
                             "VDD_SYS_CPU": 152, "VDD_SYS_DDR": 883}
    assert s["temps_c"]["GPU"] == 35.0 and s["temps_c"]["Tdiode"] == 34.25
    assert tegrastats.total_power(s["rails_mw"]) == (3056.0, "VDD_IN (module input rail)")


def test_nano_jetpack4():
    s = tegrastats.parse_line(NANO)
    assert s["rails_mw"] == {"POM_5V_IN": 2247, "POM_5V_GPU": 78, "POM_5V_CPU": 275}
    assert s["rails_avg_mw"]["POM_5V_IN"] == 2189
    assert "IRAM" not in s["rails_mw"] and "RAM" not in s["rails_mw"]
    assert s["gpu_load_pct"] == 16 and s["gpu_freq_mhz"] == 76
    assert tegrastats.total_power(s["rails_mw"])[0] == 2247.0


def test_xavier_jetpack4_bare_rail_names():
    s = tegrastats.parse_line(XAVIER)
    assert s["rails_mw"] == {"GPU": 0, "CPU": 216, "SOC": 864, "CV": 0, "VDDRQ": 144, "SYS5V": 1889}
    assert s["temps_c"]["GPU"] == 32.0  # GPU@32C is a temperature, `GPU 0/0` a rail
    assert s["gpu_load_pct"] == 0 and s["gpu_freq_mhz"] is None
    assert s["swap_used_mb"] is None
    total, rule = tegrastats.total_power(s["rails_mw"])
    assert total == 216 + 864 + 144 + 1889
    assert rule.startswith("sum of rails")


def test_agx_orin_jetpack5():
    s = tegrastats.parse_line(AGX_ORIN)
    assert s["stamp"] == "09-26-2023 13:49:48"
    assert s["ram_used_mb"] == 13983 and len(s["cpu"]) == 12
    assert (s["gpu_load_pct"], s["gpu_freq_mhz"]) == (14, 407)
    assert s["rails_mw"] == {"VDD_GPU_SOC": 3150, "VDD_CPU_CV": 14312, "VIN_SYS_5V0": 4968,
                             "VDDQ_VDD2_1V8AO": 1091}
    assert s["rails_avg_mw"]["VDD_GPU_SOC"] == 2971
    assert "CV0" not in s["temps_c"] and s["temps_c"]["tj"] == 77.281
    assert tegrastats.total_power(s["rails_mw"])[0] == 3150 + 14312 + 4968 + 1091


def test_orin_nano_jetpack6():
    s = tegrastats.parse_line(ORIN_NANO)
    assert s["rails_mw"] == {"VDD_IN": 3913, "VDD_CPU_GPU_CV": 598, "VDD_SOC": 1238}
    assert s["gpu_load_pct"] == 1
    assert s["emc_load_pct"] is None
    assert tegrastats.total_power(s["rails_mw"])[0] == 3913.0


def test_line_without_rails():
    s = tegrastats.parse_line("RAM 100/200MB CPU [5%@100] GR3D_FREQ 50%")
    assert s["rails_mw"] == {} and s["gpu_load_pct"] == 50
    assert tegrastats.total_power(s["rails_mw"])[0] is None
    out = tegrastats.summarize([s])
    assert out["available"] is False and "root" in out["reason"]
    assert out["gpu_load_pct"] == {"mean": 50.0, "max": 50}


def test_summarize_mean_power_and_energy_per_image():
    lines = [TX2.replace("VDD_IN 3056/3056", f"VDD_IN {mw}/3056") for mw in (3000, 5000)]
    out = tegrastats.summarize([tegrastats.parse_line(line) for line in lines], duration_s=2.0, images=400)
    assert out["available"] and out["samples"] == 2
    assert out["total_mw"] == 4000.0
    assert out["rails_mw"]["VDD_IN"] == 4000.0
    # 4 W for 2 s over 400 images = 20 mJ per image
    assert out["energy_mj_per_image"] == pytest.approx(20.0)
    assert out["ram_used_mb"]["max"] == 2344 and out["ram_used_mb"]["total"] == 7852


def test_select_window():
    timed = [(0.1, "a"), (0.2, "b"), (0.3, "c"), (0.4, "d")]
    assert tegrastats.select_window(timed, 0.14, 0.31, 0.1) == ["b", "c"]
    assert tegrastats.select_window(timed, None, None, 0.1) == ["a", "b", "c", "d"]
    # a run shorter than one interval still gets the closest line
    assert tegrastats.select_window(timed, 0.251, 0.252, 0.1) == ["c"]
    assert tegrastats.select_window([], 0.0, 1.0, 0.1) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses a POSIX shell script as fake tegrastats")
def test_sampler_and_monitor_with_a_fake_tegrastats(tmp_path):
    fake = tmp_path / "tegrastats"
    fake.write_text(f"#!/bin/sh\nwhile true; do echo '{TX2}'; sleep 0.02; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    sampler = tegrastats.TegrastatsSampler(interval_ms=20, exe=str(fake))
    monitor = power.PowerMonitor(sampler, "tegrastats").start()
    t0 = time.monotonic()
    time.sleep(0.15)
    t1 = time.monotonic()
    monitor.mark(t0, t1)
    monitor.stop()
    out = monitor.summary(images=30)
    assert out["available"] and out["source"] == "tegrastats"
    assert out["samples"] >= 1
    assert out["total_mw"] == 3056.0
    assert out["energy_mj_per_image"] == pytest.approx(3056.0 * (t1 - t0) / 30)
    assert sampler._proc is None  # the process is gone


def test_open_power_monitor_off_jetson(monkeypatch):
    monkeypatch.setattr(tegrastats, "find_tegrastats", lambda: None)
    monkeypatch.setattr(power.JtopSampler, "open", classmethod(lambda cls, ms: None))
    monitor, reason = power.open_power_monitor()
    assert monitor is None and "not a Jetson" in reason
    monitor, reason = power.open_power_monitor(enabled=False)
    assert monitor is None and "--no-power" in reason


def test_find_tegrastats_uses_path(tmp_path, monkeypatch):
    fake = tmp_path / "tegrastats"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    assert tegrastats.find_tegrastats() == str(fake)
