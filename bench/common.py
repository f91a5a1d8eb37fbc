"""What the benchmark families share: the repository root, peak PSS of a process tree, and a demo training's
overrides and memory."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def pss_samples(proc: subprocess.Popen, every: float = 0.02) -> list[tuple[float, int]]:
    """(wall clock, PSS of `proc` and its children) every `every` seconds until it ends. Each sample walks
    the tree's page tables: at 20 ms against a 1.6 GB training it slowed the epochs by half."""
    samples, parent = [], psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            samples.append((time.time(), sum(p.memory_full_info().pss for p in tree)))
        except psutil.Error:
            pass
        time.sleep(every)
    return samples


def peak_pss(proc: subprocess.Popen, every: float = 0.02) -> int:
    """The peak PSS of `proc` and its children, sampled every `every` seconds until it ends."""
    return max((pss for _, pss in pss_samples(proc, every)), default=0)


def demo_training(work: Path, tag: str, volumes: int, size: int) -> list[str]:
    """Overrides for a training on `volumes` generated phantoms of size^3, its data, cache and runs under
    work/<tag>-*."""
    return [f"data.demo.dir={work / f'{tag}-demo'}", f"data.demo.num_volumes={volumes}",
            f"data.demo.shape=[{size},{size},{size}]", f"preprocess.spatial_size=[{size},{size},{size}]",
            f"cache.dir={work / f'{tag}-cache'}", f"output.dir={work / f'{tag}-runs'}", "train.resume=off",
            TIMED_ONLY]


# The benchmarks' trainings are timed, not scored: their small validation sets would be refused by the macro label
# rule (metrics.min_positive_patients, 10), which changes nothing a benchmark measures.
TIMED_ONLY = "metrics.min_positive_patients=1"


def training_pss(command: list[str], what: str, env: dict | None = None, every: float = 0.02) -> int:
    """Peak PSS of a training command's process tree (sampled every `every` s; the smoke's coarser: it checks
    the figure comes out, and a 20 ms walk of a two-rank tree's page tables cost it 20 s of system time); a
    failed training fails the benchmark."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    peak = peak_pss(proc, every)
    if proc.wait() != 0:
        raise RuntimeError(f"benchmark: the {what} training failed")
    return peak
