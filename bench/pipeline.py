"""The data pipeline: epoch times of MONAI's tutorial Dataset (preprocess every epoch) against a cold and a
warm disk cache and the RAM cache, with 0 and 2 workers, each in a fresh process; the memory-copy floor."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from monai.data import Dataset

from bench.common import ROOT, peak_pss
from bench.rows import Row, band, ratio_row, row
from engine.config import PreprocessConfig
from engine.data import Labelled, build_dataset, generate, preprocessing_transform


def make_sources(folder: Path, n: int, shape) -> list[dict]:
    """n phantom CTs in HU (int16 NIfTI) at `shape`, written once."""
    csv_path = generate(folder, num_volumes=n, shape=tuple(shape), seed=0)
    names = [line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]]
    return [{"image": str(folder / name), "label": [0.0], "name": name} for name in names]


def epoch_times(dataset, workers: int, epochs: int) -> list[float]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, persistent_workers=workers > 0)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _batch in loader:
            pass
        times.append(time.perf_counter() - start)
    return times


def child_pipeline(args: dict) -> dict:
    """One pipeline measurement in this (fresh) process."""
    p = PreprocessConfig(spatial_size=list(args["target"]))
    items = args["items"]
    mode, workers, epochs = args["mode"], args["workers"], args["epochs"]
    if mode == "tutorial":  # what a MONAI tutorial does: load and preprocess every epoch
        return {"times": epoch_times(Labelled(Dataset([{"image": i["image"]} for i in items],
                                                      preprocessing_transform(p)), items), workers, epochs)}
    if mode == "cold":  # first epoch over an empty disk cache: it fills the cache as it goes
        return {"times": epoch_times(build_dataset(items, p, args["cache"], 0.0, 1), workers, 1)}
    if mode == "disk":
        return {"times": epoch_times(build_dataset(items, p, args["cache"], 0.0, 1), workers, epochs)}
    if mode == "ram":
        dataset = build_dataset(items, p, args["cache"], 1.0, 2)
        return {"times": epoch_times(dataset, workers, epochs)}
    if mode == "memory":  # for the memory figure: hold the loader busy, report the cache size
        before = psutil.Process().memory_full_info().pss
        dataset = build_dataset(items, p, args["cache"], args["rate"], 2)
        built = psutil.Process().memory_full_info().pss - before  # what building the RAM cache left resident
        cached = sum(dataset[i]["image"].numel() * dataset[i]["image"].element_size() for i in range(len(dataset)))
        epoch_times(dataset, workers, epochs)
        return {"cache_bytes": cached if args["rate"] > 0 else 0, "built_pss": built,
                "torch_threads": torch.get_num_threads()}
    raise ValueError(mode)


def run_child(args: dict, sample_memory: bool = False, in_process: bool = False) -> dict:
    """Runs child_pipeline in a new process; with sample_memory, adds its tree's peak PSS. `in_process`
    (the smoke run): here, with this process's PSS afterwards."""
    if in_process:
        result = json.loads(json.dumps(child_pipeline(args)))
        result["peak_pss"] = psutil.Process().memory_full_info().pss if sample_memory else 0
        return result
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--child", json.dumps(args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = peak_pss(proc) if sample_memory else 0
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args['mode']} failed")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_pss"] = peak
    return result


def memcpy_floor(n: int, target) -> float:
    """Seconds to copy n preprocessed float16 volumes in memory: the floor for any loader."""
    tensors = [torch.zeros(1, *target, dtype=torch.float16) for _ in range(n)]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for t in tensors:
            t.clone()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_pipeline(cfg: dict, work: Path) -> dict:
    items = make_sources(work / "sources", cfg["volumes"], cfg["source"])
    base = {"items": items, "target": list(cfg["target"]), "epochs": cfg["epochs"]}
    figures = {}
    for workers in (0, 2):
        cache = str(work / f"cache-{workers}")
        for mode in ("tutorial", "cold", "disk", "ram"):
            epochs = 3 if mode == "tutorial" else cfg["epochs"]  # the slow baseline: 3 epochs are enough
            times = run_child({**base, "mode": mode, "workers": workers, "cache": cache, "epochs": epochs},
                              in_process=cfg.get("in_process", False))["times"]
            figures[f"{mode}_w{workers}"] = statistics.median(times)
            figures[f"{mode}_w{workers}_all"] = list(times)
    figures["memcpy_floor"] = memcpy_floor(cfg["volumes"], cfg["target"])
    return figures


def rows(f: dict) -> list[Row]:
    """The cache against MONAI's tutorial Dataset, 0 and 2 workers, and the RAM cache against the memory-copy
    floor (none when --only left this family out)."""
    if "tutorial_w0" not in f:
        return []
    rows = []
    for w in (0, 2):
        tutorial, disk, ram = (f.get(f"{m}_w{w}_all", [f[f"{m}_w{w}"]]) for m in ("tutorial", "disk", "ram"))
        rows.append(ratio_row(f"RAM cache vs tutorial Dataset, {w} workers (epoch time)",
                              f[f"tutorial_w{w}"] / f[f"ram_w{w}"], band(tutorial, ram), 20, False))
        rows.append(ratio_row(f"warm disk cache (new process) vs tutorial, {w} workers (epoch time)",
                              f[f"tutorial_w{w}"] / f[f"disk_w{w}"], band(tutorial, disk), 5, False))
    floor = f["memcpy_floor"]
    ram0 = f.get("ram_w0_all", [f["ram_w0"]])
    ram0 = ram0[1:] or ram0  # after the first epoch, which starts the loader and first touches the cache's pages
    rows.append(ratio_row("RAM cache epoch (after the first) vs memory-copy floor, 0 workers",
                          statistics.median(ram0) / floor, (min(ram0) / floor, max(ram0) / floor), 3, True))
    rows.append(row("RAM cache epoch vs memory-copy floor, 2 workers", f"{f['ram_w2'] / floor:.2f}x"))
    return rows
