"""Memory: peak PSS with the RAM cache against without, two ranks holding one copy of the data set, and the
default loader (threads over the RAM cache) against worker processes."""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path

import psutil

from bench.common import ROOT, demo_training, training_pss
from bench.pipeline import make_sources, run_child
from bench.rows import Row, band, median_spread, ratio_row, row
from engine.config import load_config
from engine.training import train


def bench_memory(cfg: dict, work: Path) -> dict:
    items = make_sources(work / "sources", cfg["volumes"], cfg["source"])
    base = {"items": items, "target": list(cfg["source"]), "epochs": 2, "workers": 2, "mode": "memory",
            "cache": str(work / "cache-memory")}
    here = cfg.get("in_process", False)
    run_child({**base, "rate": 0.0}, in_process=here)  # fill the disk cache first, so both runs below do the same work
    figures: dict = {}
    for _ in range(cfg.get("memory_repeats", 1)):  # alternating, so a drift hits both alike
        without = run_child({**base, "rate": 0.0}, sample_memory=True, in_process=here)
        with_cache = run_child({**base, "rate": 1.0}, sample_memory=True, in_process=here)
        figures.setdefault("baseline_pss_all", []).append(without["peak_pss"])
        figures.setdefault("cached_pss_all", []).append(with_cache["peak_pss"])
        figures.setdefault("cache_built_pss_all", []).append(with_cache["built_pss"])
        figures["cache_bytes"] = with_cache["cache_bytes"]
    return {"baseline_pss": statistics.median(figures["baseline_pss_all"]),
            "cached_pss": statistics.median(figures["cached_pss_all"]), **figures}


def bench_ranks(cfg: dict, work: Path) -> dict:
    """Peak PSS of a 2-rank torchrun training with the RAM cache on and off: the difference is what the
    node holds of the cached data set (each rank caches its own share)."""
    n, size, ranks = cfg["rank_volumes"], cfg["rank_size"], cfg["ranks"]
    overrides = [*demo_training(work, "ranks", n, size), "train.epochs=1", "tracking.wandb.mode=disabled",
                 "model.widen_factor=0.25", "loader.batch_size=4",
                 "train.threads=1", "data.val_fraction=0.25"]
    peaks: dict[float, list[int]] = {0.0: [], 1.0: []}
    runs = ([0.0] if cfg["rank_fill"] else []) + [1.0, 0.0] * cfg["rank_pairs"]  # a first run fills the disk cache
    for i, rate in enumerate(runs):
        peak = training_pss([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc-per-node={ranks}", "-m", "engine.run", "train", *overrides,
                             f"cache.memory_rate={rate}", f"output.name=rate{rate}-{i}"], f"{ranks}-rank",
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, every=cfg.get("pss_every", 0.02))
        if i or not cfg["rank_fill"]:
            peaks[rate].append(peak)
    return {"ranks_pss_cached_all": peaks[1.0], "ranks_pss_uncached_all": peaks[0.0],
            "ranks_pss_cached": statistics.median(peaks[1.0]), "ranks_pss_uncached": statistics.median(peaks[0.0]),
            "ranks_cache_bytes": n * size**3 * 2, "ranks_count": ranks}


def bench_loaders(cfg: dict, work: Path) -> dict:
    """A CT-RATE-style training (ResNet-18, batch 4) whose data sits wholly in the RAM cache, with the
    default loader (no worker processes: MONAI's ThreadDataLoader) and with 2 worker processes: peak PSS
    of the process tree and the median epoch time (after the first), runs alternating."""
    n, size = cfg["loader_volumes"], cfg["loader_size"]
    overrides = [*demo_training(work, "loader", n, size), f"train.epochs={cfg['loader_epochs']}",
                 "tracking.wandb.mode=disabled", *cfg["loader_model"],
                 "loader.batch_size=4", "data.val_fraction=0.25", "metrics.bootstrap=0",
                 "cache.memory_rate=1.0"]
    figures: dict = {"loader_volumes": n, "loader_size": size}
    for repeat in range(cfg["loader_repeats"]):
        for mode, extra in (("threads", []), ("workers", ["loader.num_workers=2"])):
            name = f"{mode}{repeat}"
            if cfg.get("in_process", False):  # the smoke run: this process's PSS afterwards
                train(load_config(ROOT / "configs" / "default.yaml", [*overrides, *extra, f"output.name={name}"]))
                pss = psutil.Process().memory_full_info().pss
            else:
                pss = training_pss([sys.executable, "-m", "engine.run", "train", *overrides, *extra,
                                    f"output.name={name}"], mode, every=cfg.get("pss_every", 0.02))
            seconds = json.loads((work / "loader-runs" / name / "summary.json").read_text())["epoch_seconds"]
            figures.setdefault(f"loader_{mode}_pss_all", []).append(pss)
            figures.setdefault(f"loader_{mode}_epoch_all", []).append(statistics.median(seconds[1:]))
    return figures


def rows(f: dict) -> list[Row]:
    """Two-sided memory rows (a cache holding nothing, or a second copy, fails them), then the default loader
    against worker processes."""
    rows = []
    if "cached_pss" in f:
        base, cached = f.get("baseline_pss_all", [f["baseline_pss"]]), f.get("cached_pss_all", [f["cached_pss"]])
        totals = [c / (b + f["cache_bytes"]) for b, c in zip(base, cached)]
        empty = max(b / (b + f["cache_bytes"]) for b in base)  # a cache holding nothing peaks as the baseline does
        rows.append(row("peak PSS, RAM cache + 2 workers vs baseline + cache bytes (a cache holding nothing would "
                        f"read baseline / (baseline + cache bytes) = {empty:.2f}x)", median_spread(totals),
                        f"> {empty:.2f}x, <= 1.15x", min(totals) > empty and max(totals) <= 1.15))
        if "cache_built_pss_all" in f:  # the PSS building the cache added, in the process that holds it
            held = [b / f["cache_bytes"] for b in f["cache_built_pss_all"]]
            rows.append(row("RAM cache: PSS its building added vs the cached bytes (an empty cache would read ~0, a "
                            "second copy ~2)", median_spread(held), "0.9x-1.3x", 0.9 <= min(held) and max(held) <= 1.3))
    if "ranks_pss_cached" in f:
        pairs = zip(f.get("ranks_pss_cached_all", [f["ranks_pss_cached"]]),
                    f.get("ranks_pss_uncached_all", [f["ranks_pss_uncached"]]))
        node = [(c - u) / f["ranks_cache_bytes"] for c, u in pairs]
        rows.append(row(f"{f.get('ranks_count', 2)}-rank run: RAM cache's share of peak PSS vs one copy of the "
                        "cached bytes (a node holds one copy, not one per rank; an empty cache would read ~0)",
                        median_spread(node, ".2f"), "0.7x-1.3x", 0.7 <= min(node) and max(node) <= 1.3))
    if "loader_threads_pss_all" in f:
        what = f"RAM cache holding {f['loader_volumes']} volumes of {f['loader_size']}^3, ResNet-18 training"
        pss_t, pss_w = f["loader_threads_pss_all"], f["loader_workers_pss_all"]
        rows.append(ratio_row(f"{what}: default loader (threads) vs 2 worker processes, peak PSS",
                              statistics.median(pss_t) / statistics.median(pss_w), band(pss_t, pss_w), 0.9, True))
        sec_t, sec_w = f["loader_threads_epoch_all"], f["loader_workers_epoch_all"]
        rows.append(ratio_row(f"{what}: default loader (threads) vs 2 worker processes, epoch time",
                              statistics.median(sec_t) / statistics.median(sec_w), band(sec_t, sec_w), 1.1, True))
    return rows


def notes(f: dict) -> str:
    if "cached_pss" not in f:
        return ""
    return ("The peak-PSS figure is below 1 because the no-cache baseline keeps volumes in flight in the loader "
            "workers (and its allocator keeps what they freed), so its peak minus the baseline's undercounts the "
            "cache: what the cache itself holds is the row measured as it is built.")
