"""The data path and the roofline: reading CT-RATE-shaped cache entries against `cat` of the same files, and
the training step's achieved GFLOP/s against a large matmul's."""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.rows import Row, row
from engine.config import ModelConfig
from engine.training import create_model, to_device


def bench_data_path(cfg: dict, work: Path) -> dict:
    """Samples/s reading CT-RATE-shaped cache entries (128x256x256 float16, as the disk cache stores them)
    through a DataLoader with 0 and 2 workers, against `cat` of the same files (the raw read floor), from a
    warm page cache."""
    folder = work / "data-path"
    folder.mkdir()
    shape, n = cfg["data_path_shape"], cfg["data_path_volumes"]
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:03d}.pt")
        torch.save({"image": torch.randn(1, *shape).to(torch.float16)}, paths[-1])

    class Entries(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return torch.load(paths[i], weights_only=True)["image"]

    figures = {}
    for workers in (0, 2):
        times = []
        for _ in range(3):
            loader = torch.utils.data.DataLoader(Entries(), batch_size=4, num_workers=workers)
            start = time.perf_counter()
            for _batch in loader:
                pass
            times.append(time.perf_counter() - start)
        figures[f"data_path_w{workers}_samples_per_s"] = n / statistics.median(times)
    figures["data_path_shape"] = "x".join(map(str, shape))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    figures["data_path_cat_samples_per_s"] = n / statistics.median(times)
    return figures


def bench_roofline(cfg: dict) -> dict:
    """The training step's achieved GFLOP/s (FLOPs counted by torch.utils.flop_counter) against a large fp32
    matmul's on this machine: how much of the CPU's arithmetic the 3D network's step turns into work."""
    n = cfg["matmul_size"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    matmul = 3 * 2 * n**3 / (time.perf_counter() - start) / 1e9
    size = cfg["roofline_size"]
    model = to_device(create_model(ModelConfig(variant="18"), 18, [size] * 3), torch.device("cpu"))  # as trained
    optimizer = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(4, 1, size, size, size), torch.rand(4, 18).round()

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    times = []
    for _ in range(cfg["roofline_steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"matmul_gflops": matmul, "step_gflops": counter.get_total_flops() / statistics.median(times) / 1e9,
            "roofline_size": size, "matmul_size": n}


def rows(f: dict) -> list[Row]:
    rows = []
    if "data_path_cat_samples_per_s" in f:
        cat = f["data_path_cat_samples_per_s"]
        for w in (0, 2):
            got = f[f"data_path_w{w}_samples_per_s"]
            rows.append(row(f"data path: disk-cache entries at {f['data_path_shape']} float16, {w} workers vs `cat` "
                            f"of the same files", f"{got:.1f} vs {cat:.1f} samples/s ({got / cat:.2f}x of the floor)"))
    if "matmul_gflops" in f:
        rows.append(row(f"roofline: ResNet-18 training step at {f['roofline_size']}^3, batch 4 (fp32) vs a "
                        f"{f['matmul_size']}^2 fp32 matmul",
                        f"{f['step_gflops']:.1f} vs {f['matmul_gflops']:.1f} GFLOP/s "
                        f"({f['step_gflops'] / f['matmul_gflops']:.2f}x)"))
    return rows
