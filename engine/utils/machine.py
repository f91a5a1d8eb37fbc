"""What this process may use of the machine: CPUs (its affinity, and a container's CPU quota: a pod's `limits.cpu`
is a quota, not an affinity, so os.cpu_count() and sched_getaffinity see the whole node) and memory (the
container's limit). cgroup v2, then v1; none found: the machine's."""

from __future__ import annotations

import math
import os


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_quota(root: str = "/sys/fs/cgroup") -> float:
    """The container's CPU quota in CPUs (cpu.max "200000 100000": 2.0); infinite without one."""
    text = _read(f"{root}/cpu.max")
    if text:
        quota, _, period = text.partition(" ")
        if quota.isdigit() and period.isdigit() and int(period):
            return int(quota) / int(period)
    quota, period = _read(f"{root}/cpu/cpu.cfs_quota_us"), _read(f"{root}/cpu/cpu.cfs_period_us")
    if quota and period and quota.lstrip("-").isdigit() and period.isdigit() and int(quota) > 0 and int(period):
        return int(quota) / int(period)
    return math.inf


def available_cpus(root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may run on: its affinity, capped by the container's quota (rounded up), at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(root)
    return max(1, min(cpus, math.ceil(quota)) if quota != math.inf else cpus)


def memory_limit(root: str = "/sys/fs/cgroup") -> float:
    """The container's memory limit in bytes (what a Kubernetes pod may use); infinite if none."""
    for path in (f"{root}/memory.max", f"{root}/memory/memory.limit_in_bytes"):
        text = _read(path)
        if text and text.isdigit():
            return float(text)
    return math.inf
