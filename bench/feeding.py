"""Feeding: the CPU the RAM-cache path costs per volume, from the cache to a batch at CT-RATE's shape, through the
engine's own loader (make_loader: MONAI's ThreadDataLoader and the ring of reused buffers) against the same loader
with PyTorch's default_collate (the path before the ring: a fresh batch each time, mmapped and faulted in page by
page); a memory-copy floor below which a figure is broken, not fast; and the CPU cores one H100 needs to be fed."""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from monai.data import CacheDataset
from torch.utils.data import default_collate

from bench.common import ROOT
from bench.rows import Row, row
from engine.config import LoaderConfig
from engine.data import Labelled, make_loader

LABELS = 18  # CT-RATE's
H100_VOLUMES_PER_S = 560  # ResNet-18 at 256x256x128 at 40% of an H100's dense bf16 peak (issue 39)
WAITS = ("default", "passive")  # how OpenMP's threads wait between parallel regions (OMP_WAIT_POLICY)


def cached_dataset(volumes: int, shape) -> Labelled:
    """What build_dataset gives for a share wholly in the RAM cache (a CacheDataset under Labelled), holding
    `volumes` float16 volumes of (1, *shape) with real pages behind them (a zero tensor's could be the shared zero
    page), without preprocessing NIfTI files first."""
    images = [{"image": torch.empty(1, *shape, dtype=torch.float16).uniform_(-1, 1)} for _ in range(volumes)]
    items = [{"image": f"volume{i}", "label": [float(i % 2)] * LABELS} for i in range(volumes)]
    return Labelled(CacheDataset(images, transform=None, cache_rate=1.0, progress=False, copy_cache=False), items)


def epochs_cost(loader, epochs: int, cuda: bool) -> tuple[float, float]:
    """CPU seconds of the whole process (the loader's thread, the consumer, the allocator's unmapping, torch's
    threads) and minor page faults over `epochs` epochs; the consumer holds each batch until the next, as a step
    does."""
    cpu, faults = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(epochs):
        for _batch in loader:
            pass
        if cuda:
            torch.cuda.synchronize()
    return time.process_time() - cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def copy_floor(dataset, repeats: int) -> list[float]:
    """CPU seconds per volume to copy each cached volume once into a warm buffer of its size, by one thread (more
    only add their waits): no loader can do less than this one copy."""
    sources = [dataset[i]["image"] for i in range(len(dataset))]
    target = torch.empty_like(sources[0])
    target.copy_(sources[0])  # first touch of the target's pages: not measured
    threads, times = torch.get_num_threads(), []
    torch.set_num_threads(1)
    for _ in range(repeats):
        cpu = time.process_time()
        for source in sources:
            target.copy_(source)
        times.append((time.process_time() - cpu) / len(sources))
    torch.set_num_threads(threads)
    return times


def measure(cfg: dict) -> dict:
    """Alternating repeats of the engine's loader (the ring) and the old path (the same loader's settings, its
    collate_fn back to default_collate and pin_memory back on where CUDA is), each after warm-up epochs that fill
    the ring (its buffers are first touched in its first `slots` batches, once a run); then the copy floor."""
    shape, n, batch = tuple(cfg["feed_shape"]), cfg["feed_volumes"], cfg["feed_batch"]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dataset = cached_dataset(n, shape)
    settings = LoaderConfig(batch_size=batch)
    new = make_loader(dataset, settings, device, shuffle_seed=0)
    old = make_loader(dataset, settings, device, shuffle_seed=0)
    old.collate_fn, old.pin_memory = default_collate, settings.pin_memory and cuda  # make_loader before the ring
    warm = math.ceil(8 / len(new))  # 8 batches: more than the ring's slots
    volumes = cfg["feed_epochs"] * len(new) * batch
    figures: dict = {"cuda": int(cuda), "torch_threads": torch.get_num_threads()}
    for loader in (new, old):
        epochs_cost(loader, warm, cuda)
    for _ in range(cfg["feed_repeats"]):  # alternating, so a busy moment of the machine hits both alike
        for name, loader in (("new", new), ("old", old)):
            cpu, faults = epochs_cost(loader, cfg["feed_epochs"], cuda)
            figures.setdefault(f"{name}_cpu_ms_all", []).append(1e3 * cpu / volumes)
            figures.setdefault(f"{name}_faults_all", []).append(faults / volumes)
    figures["floor_ms_all"] = [1e3 * s for s in copy_floor(dataset, cfg["feed_repeats"] * 3)]
    return figures


def measured_in_child(cfg: dict, wait: str) -> dict:
    """`measure` in a fresh process whose OpenMP threads wait as `wait` says: "default" is libgomp's (they spin
    after each parallel region: torch.stack's copy in the loader's thread is one), "passive" sleeps at once. The
    policy is read once, when libgomp loads, hence a process each."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if wait == "passive":
        env["OMP_WAIT_POLICY"] = "passive"
    proc = subprocess.run([sys.executable, "-m", "bench.feeding", json.dumps(cfg)], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark: the feeding child ({wait} wait) failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_feeding(cfg: dict, work: Path) -> dict:
    """Both wait policies, each in a process of its own (the smoke: both in this one, to check the figures)."""
    keys = ("feed_shape", "feed_volumes", "feed_batch", "feed_epochs", "feed_repeats")
    shape = tuple(cfg["feed_shape"])
    figures: dict = {"feed_volumes": cfg["feed_volumes"], "feed_batch": cfg["feed_batch"],
                     "feed_shape": "x".join(map(str, shape)), "feed_volume_bytes": math.prod(shape) * 2}
    for wait in WAITS:
        one = (measure(cfg) if cfg.get("in_process", False)
               else measured_in_child({k: cfg[k] for k in keys}, wait))
        figures["feed_cuda"], figures["feed_torch_threads"] = one.pop("cuda"), one.pop("torch_threads")
        for name, values in one.items():
            figures[f"feed_{wait}_{name}"] = values
            figures[f"feed_{wait}_{name.removesuffix('_all')}"] = statistics.median(values)
    return figures


def spread(values: list[float], unit: str = "", scale: float = 1.0) -> str:
    """A median and its spread (min-max) over the repeats, in `unit`."""
    low, mid, high = (scale * v for v in (min(values), statistics.median(values), max(values)))
    return f"{mid:.3g}{unit} (spread {low:.3g}-{high:.3g})"


def rows(f: dict) -> list[Row]:
    """CPU per volume (each wait policy) and page faults per volume, the ring against the old path, each two-sided:
    CPU under the memory-copy floor, or a fault counter that saw nothing on the old path either, is a broken
    measurement, not a fast path; then the floor itself and the cores one H100 needs."""
    if "feed_default_new_cpu_ms_all" not in f:
        return []
    what = (f"RAM cache -> {'pinned ' if f['feed_cuda'] else ''}batch at {f['feed_shape']} float16, batch "
            f"{f['feed_batch']}, the engine's thread loader over {f['feed_volumes']} cached volumes")
    where = ("CUDA: the ring's buffers pinned and copied to the GPU on a side stream; the old path's pin_memory copy "
             "included" if f["feed_cuda"] else "no CUDA here: no pinned buffers, and the old path's pin_memory copy "
             "(~1.6 ms a volume, issue 39) not included")
    rows = []
    for wait, how in (("default", "libgomp's default wait: OpenMP threads spin after each parallel region"),
                      ("passive", "OMP_WAIT_POLICY=passive")):
        new, old, floor = (f[f"feed_{wait}_{name}_all"] for name in ("new_cpu_ms", "old_cpu_ms", "floor_ms"))
        rows.append(row(f"{what}: CPU ms per volume (the process's CPU time), ring vs default_collate, {how} "
                        f"({f['feed_torch_threads']} torch threads; {where})",
                        f"{spread(new, ' ms')}; default_collate {spread(old, ' ms')}",
                        f"<= 2.5 ms, >= the memory-copy floor ({min(floor):.3g} ms)",
                        max(new) <= 2.5 and min(new) >= min(floor)))
    new_faults, old_faults = f["feed_default_new_faults_all"], f["feed_default_old_faults_all"]
    rows.append(row(f"{what}: minor page faults per volume, ring vs default_collate",
                    f"{spread(new_faults)}; default_collate {spread(old_faults)}",
                    "< 10, with default_collate's > 10 (a counter reading nothing fails)",
                    max(new_faults) < 10 and min(old_faults) > 10))  # the old path faults in every page of a batch
    floor = f["feed_default_floor_ms_all"]
    rows.append(row(f"memory-copy floor: one {f['feed_volume_bytes'] / 1e6:.1f} MB volume copied into a warm buffer "
                    "by one thread, CPU ms", spread(floor, " ms")))
    cores = {key: [H100_VOLUMES_PER_S / 1e3 * v for v in f[f"feed_{key}_cpu_ms_all"]]
             for key in ("default_new", "passive_new", "default_old")}
    rows.append(row(f"CPU cores per H100 to feed ResNet-18 at {H100_VOLUMES_PER_S} volumes/s ({H100_VOLUMES_PER_S} x "
                    "the ring's CPU seconds per volume above: the loader's whole thread path)",
                    f"{spread(cores['default_new'])}; with OMP_WAIT_POLICY=passive {spread(cores['passive_new'])}; "
                    f"default_collate {spread(cores['default_old'])}", "<= 2 (libgomp's default wait), above the "
                    "floor's", max(cores["default_new"]) <= 2 and min(f["feed_default_new_cpu_ms_all"]) >= min(floor)))
    return rows


if __name__ == "__main__":  # a child of measured_in_child: its figures as one JSON line
    print(json.dumps(measure(json.loads(sys.argv[1]))))
