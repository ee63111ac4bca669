import os

from rsedge.runtime.jetson import conditions

JP4 = ("# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t186ref, EABI: aarch64, "
       "DATE: Sat Feb 19 17:05:08 UTC 2022")
JP5 = ("# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, "
       "DATE: Tue Aug  1 19:57:35 UTC 2023")
JP6 = ("# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, "
       "DATE: Fri Jul 19 23:24:25 UTC 2024")


def test_l4t_release_and_jetpack():
    assert conditions.parse_l4t_release(JP4) == "32.7.1"
    assert conditions.parse_l4t_release(JP5) == "35.4.1"
    assert conditions.parse_l4t_release(JP6) == "36.3.0"
    assert conditions.parse_l4t_release("garbage") is None
    assert conditions.jetpack_for_l4t("32.7.1") == "4.6.x"
    assert conditions.jetpack_for_l4t("35.4.1") == "5.1.x"
    assert conditions.jetpack_for_l4t("36.3.0") == "6.0"
    assert conditions.jetpack_for_l4t(None) is None


def test_nvpmodel_query():
    assert conditions.parse_nvpmodel("NV Power Mode: MAXN\n0\n") == {"name": "MAXN", "id": 0}
    assert conditions.parse_nvpmodel("NVPM WARN: fan mode is not set!\nNV Power Mode: MODE_15W\n2\n") == {
        "name": "MODE_15W", "id": 2}
    assert conditions.parse_nvpmodel(None) is None


def make_sysfs(root, cpu_min, cpu_max, gpu_min, gpu_max):
    for i in range(2):
        d = root / f"sys/devices/system/cpu/cpu{i}/cpufreq"
        d.mkdir(parents=True)
        (d / "scaling_governor").write_text("schedutil\n")
        (d / "scaling_min_freq").write_text(f"{cpu_min}\n")
        (d / "scaling_max_freq").write_text(f"{cpu_max}\n")
        (d / "scaling_cur_freq").write_text(f"{cpu_max}\n")
    g = root / "sys/class/devfreq/17000000.gp10b"
    g.mkdir(parents=True)
    (g / "min_freq").write_text(f"{gpu_min}\n")
    (g / "max_freq").write_text(f"{gpu_max}\n")
    (g / "cur_freq").write_text(f"{gpu_max}\n")
    (root / "sys/class/devfreq/other-device").mkdir()


def test_clocks_locked_from_sysfs(tmp_path):
    make_sysfs(tmp_path, 2035200, 2035200, 1300500000, 1300500000)
    cpus, gpus = conditions.cpu_clocks(str(tmp_path)), conditions.gpu_clocks(str(tmp_path))
    assert [c["cpu"] for c in cpus] == ["cpu0", "cpu1"] and [g["name"] for g in gpus] == ["17000000.gp10b"]
    assert conditions.clocks_locked(cpus, gpus)[0] is True
    gpus[0]["min"] = 114750000
    locked, detail = conditions.clocks_locked(cpus, gpus)
    assert locked is False and "GPU" in detail
    assert conditions.clocks_locked([], [])[0] is None


def test_collect_conditions_on_a_fake_jetson(tmp_path, monkeypatch):
    make_sysfs(tmp_path, 345600, 2035200, 114750000, 1300500000)
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson TX2\x00")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text(JP4 + "\n")
    monkeypatch.setattr(conditions, "run_command", lambda cmd, timeout=5: "NV Power Mode: MAXN\n0\n"
                        if cmd[0] == "nvpmodel" else None)
    c = conditions.collect_conditions(threads=2, root=str(tmp_path))
    assert c["jetson"] and c["board"] == "NVIDIA Jetson TX2" and c["l4t"] == "32.7.1" and c["jetpack"] == "4.6.x"
    assert c["nvpmodel"] == {"name": "MAXN", "id": 0}
    assert c["clocks_locked"] is False and any("jetson_clocks" in w for w in c["warnings"])
    assert c["threads"] == 2 and c["gpu"] == "integrated (NVIDIA Jetson TX2)"
    assert "python" in c["versions"] and "numpy" in c["versions"]
    assert c["date"].endswith("Z")


def test_collect_conditions_here():
    c = conditions.collect_conditions()
    board = (conditions.board_model("/") or "").lower()
    assert c["jetson"] is (os.path.isfile("/etc/nv_tegra_release") or "jetson" in board)
    assert c["cpu_count"] >= 1 and c["threads"] == "library default"
