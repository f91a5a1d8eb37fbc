"""The benchmark's write-up: the figures as rows with targets, and RESULTS.md."""

from __future__ import annotations

import os
import platform
from datetime import date
from pathlib import Path


def results(f: dict) -> list[tuple[str, str, str, bool]]:
    """(figure, measured, target, met) rows."""
    rows = []
    for w in (0, 2):
        a, c, d = f[f"tutorial_w{w}"], f[f"disk_w{w}"], f[f"ram_w{w}"]
        rows.append((f"RAM cache vs tutorial Dataset, {w} workers", f"{a / d:.1f}x faster", ">= 20x", a / d >= 20))
        rows.append((f"warm disk cache (new process) vs tutorial, {w} workers", f"{a / c:.1f}x faster", ">= 5x",
                     a / c >= 5))
    floor = f["memcpy_floor"]
    rows.append(("RAM cache epoch vs memory-copy floor, 0 workers", f"{f['ram_w0'] / floor:.2f}x", "<= 3x",
                 f["ram_w0"] / floor <= 3))
    rows.append(("RAM cache epoch vs memory-copy floor, 2 workers", f"{f['ram_w2'] / floor:.2f}x", "(reported)", True))
    ratio = f["engine_ratio"]
    rows.append(("engine epoch (all default handlers, W&B offline) vs hand-written loop", f"{ratio:.3f}x",
                 "<= 1.03x", ratio <= 1.03))
    rows.append(("engine epoch without W&B vs hand-written loop", f"{f['engine_ratio_no_wandb']:.3f}x",
                 "(reported)", True))
    mem = f["cached_pss"] / (f["baseline_pss"] + f["cache_bytes"])
    rows.append(("peak PSS, RAM cache + 2 workers vs baseline + cache bytes", f"{mem:.3f}x", "<= 1.15x", mem <= 1.15))
    node = (f["ranks_pss_cached"] - f["ranks_pss_uncached"]) / f["ranks_cache_bytes"]
    rows.append(("2-rank run: RAM cache's share of peak PSS vs one copy of the cached bytes", f"{node:.2f}x",
                 "<= 1.3x", node <= 1.3))
    for name in ("64", "ctrate"):
        if f"augment_{name}_batched_samples_per_s" in f:
            batched, loop = f[f"augment_{name}_batched_samples_per_s"], f[f"augment_{name}_loop_samples_per_s"]
            shape = "64^3" if name == "64" else "128x256x256"
            rows.append((f"device augmentation, batch 8 at {shape}: batched vs per-sample MONAI chain (CPU)",
                         f"{batched:.1f} vs {loop:.1f} samples/s ({batched / loop:.1f}x)", "(reported)", True))
    rows.append(("`python -m engine.run --help`", f"{f['help_seconds']:.2f} s", "< 2 s", f["help_seconds"] < 2))
    rows.append(("config error (`model.name=nope`)", f"{f['config_error_seconds']:.2f} s", "< 2 s",
                 f["config_error_seconds"] < 2))
    return rows


def machine() -> str:
    import monai
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"MONAI {monai.__version__}, {torch.get_num_threads()} torch threads")


def notes(f: dict) -> str:
    """What this run measured about the figures that most often move: the engine overhead's parts."""
    wandb_share = (f["engine_epoch"] - f["engine_epoch_no_wandb"]) / f["hand_epoch"]
    return (f"Notes: the engine's epoch includes a background checkpoint write (last.pt) and the per-iteration "
            f"W&B offline log; W&B alone cost {100 * wandb_share:+.1f}% of an epoch in this run "
            f"(engine without W&B: {f['engine_ratio_no_wandb']:.3f}x). Run-to-run noise on this shared 2-core "
            f"machine is a few per cent, so the ratios are medians of alternating runs. The memory figure is "
            f"below 1 because the no-cache baseline keeps volumes in flight in the loader workers.")


def markdown(f: dict, cfg: dict, smoke: bool, seconds: float) -> str:
    table = "\n".join(f"| {name} | {value} | {target} | {'met' if ok else 'MISSED'} |"
                      for name, value, target, ok in results(f))
    raw = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in f.items())
    sizes = (f"{cfg['volumes']} volumes of {'x'.join(map(str, cfg['source']))} int16 NIfTI in HU, preprocessed "
             f"to {'x'.join(map(str, cfg['target']))} float16; engine: {cfg['train_volumes']} volumes of "
             f"{cfg['train_size']}^3, batch 8; 2 ranks: {cfg['rank_volumes']} volumes of {cfg['rank_size']}^3 float16")
    return f"""# Benchmark results{' (smoke sizes)' if smoke else ''}

`make bench` (`python -m bench`) rewrites this file. Figures are ratios measured in one run.

- Date: {date.today().isoformat()}; took {seconds:.0f} s
- Machine: {machine()}
- Sizes: {sizes}

| figure | measured | target | |
|---|---|---|---|
{table}

{notes(f)}

Raw figures (seconds per epoch, bytes):

| name | value |
|---|---|
{raw}
"""
