"""`bench gpu`'s feeding rows: the engine's loaders at the benchmark's shape (the RAM cache through its thread loader,
which collates into pinned buffers and copies them to the GPU on a side stream; the disk cache through worker
processes, its files dropped from the page cache before each epoch), alone and feeding ResNet-18's step, against
the same step on resident data (the first model row). They run right after that row and are never dropped for time:
whether the loaders keep the GPU fed is the first thing the benchmark has to say."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from bench.gpu_steps import resident_step, sync
from engine.config import LoaderConfig, PreprocessConfig
from engine.data import SOURCE, build_dataset, cache_folder, loader_workers, make_loader, source_hash
from engine.utils import save_tensors


def write_entries(work: Path, n: int, size: list[int]) -> list[dict]:
    """n disk-cache entries at `size` (float16, as the engine's disk cache writes them) and their items."""
    folder = cache_folder(work / "cache", PreprocessConfig(spatial_size=list(size)))
    folder.mkdir(parents=True, exist_ok=True)
    items = [{"image": str(work / f"v{i}.nii.gz"), "name": f"v{i}", "label": [float(i % 2)] * 18} for i in range(n)]
    for item in items:  # random values: torch.load does not care what it reads
        entry = {"image": torch.randn(1, *size).to(torch.float16), SOURCE: [item["image"]]}
        save_tensors(entry, folder / f"{source_hash({'image': item['image'], 'name': item['name']}).decode()}.pt")
    return items


def drop_page_cache(folder: Path) -> None:
    """Asks the kernel to forget the files' pages (no root needed for files of our own): reads come from disk."""
    for path in folder.rglob("*.pt"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def epoch_rate(loader, device: torch.device, step=None) -> float:
    """Volumes per second through one epoch of `loader`, each batch given to `step` when there is one."""
    volumes, start = 0, time.perf_counter()
    for batch in loader:
        image = batch["image"].to(device, non_blocking=True)
        volumes += len(image)
        if step is not None:
            step(image)
    sync(device)
    return volumes / (time.perf_counter() - start)


def loader_figures(work: Path, size: list[int], batch: int, device: torch.device, cfg: dict) -> dict:
    """Per cache kind (ram, disk): the loader's worker processes, its volumes/s alone and feeding ResNet-18's bf16
    step (medians over cfg['loader_epochs'] epochs each, alternating)."""
    items = write_entries(work, cfg["loader_volumes"], size)
    preprocess = PreprocessConfig(spatial_size=list(size))
    step = resident_step(size, device, cfg["widen"])
    step(torch.zeros(batch, 1, *size, device=device, dtype=torch.float16))  # cuDNN's autotuning, outside the timing
    sync(device)
    figures: dict = {"batch": batch, "volumes": len(items)}
    for kind, rate in (("ram", 1.0), ("disk", 0.0)):
        dataset = build_dataset(items, preprocess, work / "cache", rate, 4)
        loader = make_loader(dataset, LoaderConfig(batch_size=batch), device, shuffle_seed=0)
        figures[f"{kind}_workers"] = loader_workers(LoaderConfig(batch_size=batch), dataset)
        alone, fed = [], []
        for epoch in range(cfg["loader_epochs"]):
            loader.sampler.set_epoch(epoch)
            for into, work_fn in ((alone, None), (fed, step)):
                if kind == "disk":
                    drop_page_cache(work / "cache")
                into.append(epoch_rate(loader, device, work_fn))
        figures[f"{kind}_alone_samples_per_s"] = statistics.median(alone)
        figures[f"{kind}_fed_samples_per_s"] = statistics.median(fed)
        del dataset, loader
    return figures


def table(f: dict, resident: float | None) -> str:
    """The feeding rows; `resident`: the first model row's volumes/s (the same step on data already on the GPU)."""
    if "ram_workers" not in f:
        return f"| not measured: {f.get('failed', 'no figures')} | | | | | |"
    lines = []
    for kind in ("ram", "disk"):
        fed = f[f"{kind}_fed_samples_per_s"]
        share = f"{fed / resident:.2f}" if resident else "-"
        lines.append(f"| {kind} cache ({f[f'{kind}_workers']} worker processes) | {f['batch']} "
                     f"| {f[f'{kind}_alone_samples_per_s']:.1f} | {resident or 0:.1f} | {fed:.1f} | {share} |")
    return "\n".join(lines)
