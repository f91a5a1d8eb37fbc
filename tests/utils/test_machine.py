"""CPUs and memory a container may use, read from cgroup files (v2 and v1) written here."""

import math
import os

from engine.utils.machine import available_cpus, cpu_quota, memory_limit


def test_a_cgroup_v2_quota_caps_the_cpus_and_max_means_none(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(str(tmp_path)) == 1.5
    mine = len(os.sched_getaffinity(0))
    assert available_cpus(str(tmp_path)) == min(mine, 2)  # 1.5 CPUs of quota: two threads may run
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(str(tmp_path)) == math.inf and available_cpus(str(tmp_path)) == mine


def test_cgroup_v1_quota_and_memory_limits(tmp_path):
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(str(tmp_path)) == math.inf
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    assert cpu_quota(str(tmp_path)) == 0.5 and available_cpus(str(tmp_path)) == 1
    assert memory_limit(str(tmp_path)) == math.inf
    (tmp_path / "memory.max").write_text("max\n")
    assert memory_limit(str(tmp_path)) == math.inf
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("1073741824\n")
    assert memory_limit(str(tmp_path)) == 2**30
