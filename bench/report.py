"""The benchmark's write-up: the figures as rows with targets, and RESULTS.md."""

from __future__ import annotations

import os
import platform
from datetime import date
from pathlib import Path
from statistics import median

from bench.rows import MET, MISSED, REPORTED, row, seconds_range  # noqa: F401 - the table's pieces, shared


def ratio_row(figure: str, median: float, spread: tuple[float, float], target: float, lower_is_better: bool,
              unit: str = "x") -> tuple[str, str, str, str]:
    """A ratio with its spread over the repeats; met only when the whole spread is on the target's right
    side (a target inside the noise band is not met)."""
    low, high = spread
    ok = high <= target if lower_is_better else low >= target
    return row(figure, f"{median:.3g}{unit} (spread {low:.3g}-{high:.3g})", f"{'<=' if lower_is_better else '>='} "
               f"{target:g}{unit}", ok)


def _spread(values: list[float], digits: str = ".3g") -> str:
    """A figure's median over the repeats and its spread (min-max), as the two-sided rows print them."""
    return f"{median(values):{digits}}x (spread {min(values):{digits}}-{max(values):{digits}})"


def _band(numerators: list[float], denominators: list[float]) -> tuple[float, float]:
    return min(numerators) / max(denominators), max(numerators) / min(denominators)


def results(f: dict) -> list[tuple[str, str, str, str]]:
    """(figure, measured, target, status) rows."""
    from bench.distributed import distributed_rows

    return ((_pipeline(f) if "tutorial_w0" in f else []) + _engine_and_memory(f) + _others(f)  # --only: a subset
            + _phases(f) + _field_of_view(f) + distributed_rows(f))


def _pipeline(f: dict) -> list:
    rows = []
    for w in (0, 2):
        tutorial, disk, ram = (f.get(f"{m}_w{w}_all", [f[f"{m}_w{w}"]]) for m in ("tutorial", "disk", "ram"))
        rows.append(ratio_row(f"RAM cache vs tutorial Dataset, {w} workers (epoch time)",
                              f[f"tutorial_w{w}"] / f[f"ram_w{w}"], _band(tutorial, ram), 20, False))
        rows.append(ratio_row(f"warm disk cache (new process) vs tutorial, {w} workers (epoch time)",
                              f[f"tutorial_w{w}"] / f[f"disk_w{w}"], _band(tutorial, disk), 5, False))
    floor = f["memcpy_floor"]
    ram0 = f.get("ram_w0_all", [f["ram_w0"]])
    ram0 = ram0[1:] or ram0  # after the first epoch, which starts the loader and first touches the cache's pages
    rows.append(ratio_row("RAM cache epoch (after the first) vs memory-copy floor, 0 workers", median(ram0) / floor,
                          (min(ram0) / floor, max(ram0) / floor), 3, True))
    rows.append(row("RAM cache epoch vs memory-copy floor, 2 workers", f"{f['ram_w2'] / floor:.2f}x"))
    return rows


def _engine_and_memory(f: dict) -> list:
    rows = []
    if "engine_ratio" not in f:
        return _memory(f)
    spread = f.get("engine_ratio_all", [f["engine_ratio"]])
    rows.append(ratio_row("engine epoch (training, validation, metrics, W&B offline) vs a hand-written loop doing "
                          "the same like for like (the engine's layout and loaders, same data; both write a "
                          "checkpoint each epoch outside the timed span)", f["engine_ratio"],
                          (min(spread), max(spread)), 1.03, True))
    spread = f.get("engine_ratio_no_wandb_all", [f["engine_ratio_no_wandb"]])
    rows.append(row("engine epoch without W&B vs the same hand-written loop",
                    f"{f['engine_ratio_no_wandb']:.3f}x (spread {min(spread):.3f}-{max(spread):.3f})"))
    return rows + _memory(f)


def _memory(f: dict) -> list:
    rows = []
    if "cached_pss" not in f:
        return rows
    base, cached = f.get("baseline_pss_all", [f["baseline_pss"]]), f.get("cached_pss_all", [f["cached_pss"]])
    totals = [c / (b + f["cache_bytes"]) for b, c in zip(base, cached)]
    empty = max(b / (b + f["cache_bytes"]) for b in base)  # a cache holding nothing peaks as the baseline does
    rows.append(row("peak PSS, RAM cache + 2 workers vs baseline + cache bytes (a cache holding nothing would read "
                    f"baseline / (baseline + cache bytes) = {empty:.2f}x)", _spread(totals),
                    f"> {empty:.2f}x, <= 1.15x", min(totals) > empty and max(totals) <= 1.15))
    if "cache_built_pss_all" in f:  # the PSS building the cache added, in the process that holds it
        held = [b / f["cache_bytes"] for b in f["cache_built_pss_all"]]
        rows.append(row("RAM cache: PSS its building added vs the cached bytes (an empty cache would read ~0, a "
                        "second copy ~2)", _spread(held), "0.9x-1.3x", 0.9 <= min(held) and max(held) <= 1.3))
    if "ranks_pss_cached" not in f:
        return rows
    pairs = zip(f.get("ranks_pss_cached_all", [f["ranks_pss_cached"]]),
                f.get("ranks_pss_uncached_all", [f["ranks_pss_uncached"]]))
    node = [(c - u) / f["ranks_cache_bytes"] for c, u in pairs]
    rows.append(row(f"{f.get('ranks_count', 2)}-rank run: RAM cache's share of peak PSS vs one copy of the cached "
                    "bytes (a node holds one "
                    "copy, not one per rank; an empty cache would read ~0)", _spread(node, ".2f"), "0.7x-1.3x",
                    0.7 <= min(node) and max(node) <= 1.3))
    return rows


def _others(f: dict) -> list:
    rows = []
    for name in ("64", "ctrate"):
        if f"augment_{name}_batched_samples_per_s" in f:
            batched, loop = f[f"augment_{name}_batched_samples_per_s"], f[f"augment_{name}_loop_samples_per_s"]
            shape = "64^3" if name == "64" else "128x256x256"
            rows.append(row(f"device augmentation, batch 8 at {shape}: batched vs per-sample MONAI chain (CPU)",
                            f"{batched:.1f} vs {loop:.1f} samples/s ({batched / loop:.1f}x)"))
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
    if "step_seconds_default_all" in f:
        last, default = f["step_seconds_channels_last_all"], f["step_seconds_default_all"]
        rows.append(ratio_row(f"demo network's training step (ResNet-10, half width, batch 8 at {f['layout_size']}^3): "
                              f"channels-last 3D weights (the engine's CPU default) vs PyTorch's default layout",
                              median(last) / median(default), _band(last, default), 1.0, True))
    if "loader_threads_pss_all" in f:
        what = f"RAM cache holding {f['loader_volumes']} volumes of {f['loader_size']}^3, ResNet-18 training"
        pss_t, pss_w = f["loader_threads_pss_all"], f["loader_workers_pss_all"]
        rows.append(ratio_row(f"{what}: default loader (threads) vs 2 worker processes, peak PSS",
                              median(pss_t) / median(pss_w), _band(pss_t, pss_w), 0.9, True))
        sec_t, sec_w = f["loader_threads_epoch_all"], f["loader_workers_epoch_all"]
        rows.append(ratio_row(f"{what}: default loader (threads) vs 2 worker processes, epoch time",
                              median(sec_t) / median(sec_w), _band(sec_t, sec_w), 1.1, True))
    if "help_seconds" in f:
        rows.append(row("`python -m engine.run --help` (exit 0, prints usage)", f"{f['help_seconds']:.2f} s", "< 2 s",
                        f["help_seconds"] < 2 and f.get("help_ok", False)))
        rows.append(row("config error `model.name=nope` (exit 2, names the key)",
                        f"{f['config_error_seconds']:.2f} s", "< 2 s",
                        f["config_error_seconds"] < 2 and f.get("config_error_ok", False)))
    return rows


def _phases(f: dict) -> list:
    """The run's phases (bench/phases.py): closing vs one epoch, the closing's peak PSS vs training's, and
    each phase's time and memory, cold and warm."""
    rows = []
    if "phase_warm_closing_all" in f:
        what = f"run phases ({f['phase_job']})"
        closing, epoch = f["phase_warm_closing_all"], f["phase_warm_epoch_all"]
        ratios = [c / e for c, e in zip(closing, epoch)]
        rows.append(ratio_row(f"{what}, warm cache: closing (last validation to exit) vs one epoch",
                              median(ratios), (min(ratios), max(ratios)), 0.3, True))
        peaks = [c / t for c, t in zip(f["phase_warm_closing_pss_all"], f["phase_warm_training_pss_all"])]
        rows.append(ratio_row(f"{what}, warm cache: the closing's peak PSS vs training's",
                              median(peaks), (min(peaks), max(peaks)), 1.0, True))
        for kind in ("warm", "cold"):
            if f"phase_{kind}_closing_all" not in f:
                continue
            times = ", ".join(f"{phase} {seconds_range(f[f'phase_{kind}_{phase}_all'])}"
                              for phase in ("start_up", "epochs", "closing", "whole"))
            rows.append(row(f"{what}, {kind} cache: seconds per phase (median, min-max)", times))
            memory = ", ".join(f"{phase} {median(f[f'phase_{kind}_{phase}_pss_all']) / 2**30:.2f}"
                               for phase in ("start_up", "training", "closing"))
            rows.append(row(f"{what}, {kind} cache: peak PSS per phase (GiB, median)", memory))
            parts = ", ".join(f"{key[len(f'phase_{kind}_part_'):-4].replace('_', ' ')} {median(v):.2f}"
                              for key, v in f.items() if key.startswith(f"phase_{kind}_part_"))
            rows.append(row(f"{what}, {kind} cache: the closing's parts (s, median; saliency = Grad-CAM panels, "
                            f"checkpoints = waiting for the last epoch's write)", parts))
    if "gradcam_seconds_per_map" in f:
        rows.append(row(f"closing Grad-CAM at {f['gradcam_size']}, ResNet-18, on this CPU: the target layer's "
                        f"pass per volume, and the rest per map",
                        f"{f['gradcam_seconds_per_volume']:.2f} s per volume + {f['gradcam_seconds_per_map']:.2f} s "
                        f"per map: the default panels (18 labels x 1 true + 1 false positive: <= 36 maps of <= 36 "
                        f"volumes) <= {36 * (f['gradcam_seconds_per_volume'] + f['gradcam_seconds_per_map']):.0f} s"))
    return rows


def _field_of_view(f: dict) -> list:
    """CT-RATE's preprocessing choice (bench/field_of_view.py)."""
    if "fov_straight_lungs_kept" not in f:
        return []
    what = f"CT-RATE preprocessing, a {f['fov_shape']} chest phantom at {f['fov_spacing']} mm"
    straight, two = f["fov_straight_seconds_all"], f["fov_two_step_seconds_all"]
    return [
        row(f"{what}: the config's straight anti-aliased resample to {f['fov_mm']} mm vs "
            f"{f['fov_two_step_size']} at 0.75x0.75x1.5 mm then an anti-aliased resize (s per volume)",
            f"{seconds_range(straight)} vs {seconds_range(two)} ({f['fov_seconds_ratio']:.2f}x)"),
        row(f"{what}: lungs kept (voxels in the lungs' HU band x voxel volume, vs the source's)",
            f"straight {f['fov_straight_lungs_kept']:.3f}, two-step {f['fov_two_step_lungs_kept']:.3f} (with MONAI's "
            f"Resized anti-aliasing: {f['fov_two_step_monai_lungs_kept']:.3f}), the old 192 mm crop "
            f"{f['fov_old_crop_lungs_kept']:.3f}", "0.95-1.05 (straight)",
            0.95 <= f["fov_straight_lungs_kept"] <= 1.05),
        row(f"{what}: straight vs two-step output, |difference| in HU", f"mean {f['fov_paths_mean_abs_hu']:.1f}, "
            f"99th percentile {f['fov_paths_p99_abs_hu']:.1f}"),
    ]


def machine() -> str:
    import monai
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} cores, {cpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"MONAI {monai.__version__}, {torch.get_num_threads()} torch threads")


def notes(f: dict) -> str:
    """What this run measured about the figures that most often move: the engine overhead's parts."""
    if "engine_epoch" not in f:
        return ""
    wandb_share = (f["engine_epoch"] - f["engine_epoch_no_wandb"]) / f["hand_epoch"]
    return (f"Notes: every timed engine epoch trains, validates (metrics, calibration, thresholds) and logs to W&B "
            f"offline; its checkpoint (last.pt, best.pt when it improved) is written after the epoch's timer stops. "
            f"The hand-written loop trains the same network in the same layout from the same loaders, validates and "
            f"computes the same metrics, and writes the same kind of checkpoint after its timer stops. W&B alone cost "
            f"{100 * wandb_share:+.1f}% of an epoch in this run. Ratios are medians of alternating runs; the spread "
            f"is their min-max (for the pipeline rows: slowest over fastest epoch and back), and a row is met only "
            f"when the whole spread is on the target's side. Rows without a target are reported, never met. The "
            f"peak-PSS figure is below 1 because the no-cache baseline keeps volumes in flight in the loader workers "
            f"(and its allocator keeps what they freed), so its peak minus the baseline's undercounts the cache: "
            f"what the cache itself holds is the row measured as it is built.")


def markdown(f: dict, cfg: dict, smoke: bool, seconds: float) -> str:
    table = "\n".join(f"| {name} | {value} | {target} | {status} |" for name, value, target, status in results(f))

    def fmt(v) -> str:
        if isinstance(v, list):
            return ", ".join(f"{x:.4g}" for x in v)
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    raw = "\n".join(f"| {k} | {fmt(v)} |" for k, v in f.items())
    source = "x".join(map(str, cfg["source"]))
    sizes = (f"pipeline: {cfg['volumes']} volumes of {source} int16 NIfTI in HU, preprocessed to "
             f"{'x'.join(map(str, cfg['target']))} float16; memory: the same volumes kept at {source} float16; "
             f"engine: {cfg['train_volumes']} volumes of {cfg['train_size']}^3, batch 8; {cfg['ranks']} ranks: "
             f"{cfg['rank_volumes']} volumes of {cfg['rank_size']}^3 float16")
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
