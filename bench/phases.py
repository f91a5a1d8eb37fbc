"""The phases of one run, measured from outside the process: start-up (process start to the first step), the
epochs, the closing (the last validation's end to the process's exit) and the peak PSS of each, with a cold
cache and a warm one. The job is the one the closing phase was first measured on beside a peer trainer:
ResNet-18 with a stride-2 stem at 64^3, batch 4, 36 training and 12 validation phantoms carrying CT-RATE's 18
labels, 2 epochs, the default augmentation. Also: the closing's Grad-CAM at the CT-RATE config's size on
this CPU, per volume and per map."""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import ROOT, TIMED_ONLY, pss_samples
from bench.rows import Row, ratio_row, row, seconds_range
from engine.config import load_config
from engine.data import generate
from engine.results import grad_cams
from engine.training import create_model, to_device


def job_data(work: Path, train: int, val: int, size: int) -> list[str]:
    """`train` + `val` phantoms of size^3 with CT-RATE's 18 label columns, split into train.csv and val.csv
    (first and last rows); overrides that train on them."""
    labels = tuple(load_config(ROOT / "configs" / "ct-rate.yaml").data.label_columns)
    folder = work / "phases-data"
    rows = list(csv.DictReader(open(generate(folder, train + val, (size,) * 3, seed=0, labels=labels))))
    for name, part in (("train.csv", rows[:train]), ("val.csv", rows[train:])):
        with open(folder / name, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(part)
    return [f"data.train={folder / 'train.csv'}", f"data.val={folder / 'val.csv'}", "data.demo.enabled=false",
            f"preprocess.spatial_size=[{size},{size},{size}]", f"cache.dir={work / 'phases-cache'}",
            f"output.dir={work / 'phases-runs'}", "train.resume=off", TIMED_ONLY]


def run_phases(overrides: list[str], name: str, work: Path, memory: bool, every: float = 0.1) -> tuple[dict, dict]:
    """One training in a new process: ({phase}_pss: each phase's peak PSS, sampled every 100 ms, with `memory`;
    else empty}, {each phase's seconds and the closing's parts}). Sampling slows the process (it walks its page
    tables), so the full benchmark takes the seconds from runs without it."""
    command = [sys.executable, "-m", "engine.run", "train", *overrides, f"output.name={name}"]
    os.sync()  # the earlier benchmarks' dirty pages are written now, not during this run's checkpoint writes
    started = time.time()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    samples = pss_samples(proc, every=every) if memory else []
    proc.wait()
    ended = time.time()
    if proc.wait() != 0:
        raise RuntimeError(f"benchmark: the phases training {name} failed: {proc.stderr.read()[-2000:]}")
    summary = json.loads((work / "phases-runs" / name / "summary.json").read_text())
    _, training, validated, _ = summary["phases"]["clock"]
    peaks = {}
    if memory:
        bounds = {"start_up": (started, training), "training": (training, validated), "closing": (validated, ended)}
        peaks = {f"{phase}_pss": max((p for t, p in samples if low <= t < high), default=0)
                 for phase, (low, high) in bounds.items()}
    return peaks, {"start_up": training - started, "epoch": statistics.median(summary["epoch_seconds"]),
            "epochs": validated - training, "closing": ended - validated, "whole": ended - started,
            **{f"part_{part.replace(' ', '_')}": seconds
               for part, seconds in summary["phases"]["closing_parts"].items()}}


def bench_phases(cfg: dict, work: Path) -> dict:
    overrides = [*job_data(work, cfg["phase_train"], cfg["phase_val"], cfg["phase_size"]),
                 f"train.epochs={cfg['phase_epochs']}", "loader.batch_size=4", *cfg["phase_model"]]
    model = " ".join(o.split("=", 1)[1] for o in cfg["phase_model"])
    figures: dict = {"phase_job": f"{cfg['phase_train']}+{cfg['phase_val']} phantoms of {cfg['phase_size']}^3 with "
                                  f"18 labels, {cfg['phase_epochs']} epochs, batch 4, ResNet ({model})"}
    runs = [("cold", False, cfg["phase_cold"]), ("warm", False, cfg["phase_warm"]), ("cold", True, 1),
            ("warm", True, cfg["phase_memory_warm"])]
    if not cfg.get("phase_memory_apart", True):  # the smoke: seconds and memory from the same (sampled) runs
        runs = [("cold", "both", 1), ("warm", "both", 1)]
    for kind, memory, repeats in runs:
        for i in range(repeats):
            if kind == "cold":
                shutil.rmtree(work / "phases-cache", ignore_errors=True)
            peaks, seconds = run_phases(overrides, f"{kind}{'-memory' if memory else ''}{i}", work, bool(memory),
                                        cfg.get("pss_every", 0.1))
            result = {**peaks, **seconds} if memory == "both" else peaks if memory else seconds
            for key, value in result.items():
                figures.setdefault(f"phase_{kind}_{key}_all", []).append(value)
    return figures


def bench_grad_cam(cfg: dict) -> dict:
    """The closing's Grad-CAM (as the report computes it) at the CT-RATE config's size, model and layout, on
    this CPU: seconds for `volumes` volumes with one map each, and for the same volumes with `maps` maps."""
    ct_rate = load_config(ROOT / "configs" / "ct-rate.yaml")
    size = cfg.get("gradcam_size") or list(ct_rate.preprocess.spatial_size)
    net = to_device(create_model(ct_rate.model, 18, size), torch.device("cpu"))
    volumes, maps = cfg["gradcam_volumes"], cfg["gradcam_maps"]
    images = torch.randn(volumes, 1, *size)
    grad_cams(net, ct_rate.model, images[:1], [(0, 0)], fast=True)  # warm-up
    times = {}
    for what, pairs in (("one", [(i, 0) for i in range(volumes)]),
                        ("many", [(i % volumes, j) for i, j in zip(range(maps), range(maps))])):
        start = time.perf_counter()
        grad_cams(net, ct_rate.model, images, pairs, fast=True)
        times[what] = time.perf_counter() - start
    per_map = (times["many"] - times["one"]) / (maps - volumes)
    what = "the CT-RATE config's size" if size == list(ct_rate.preprocess.spatial_size) else "smoke size"
    return {"gradcam_size": f"{'x'.join(map(str, size))} ({what})", "gradcam_volumes": volumes, "gradcam_maps": maps,
            "gradcam_seconds_per_volume": times["one"] / volumes - per_map, "gradcam_seconds_per_map": per_map}


def rows(f: dict) -> list[Row]:
    """Closing vs one epoch, the closing's peak PSS vs training's, and each phase's time and memory, cold and
    warm; the closing's Grad-CAM per volume and per map."""
    rows = []
    if "phase_warm_closing_all" in f:
        what = f"run phases ({f['phase_job']})"
        closing, epoch = f["phase_warm_closing_all"], f["phase_warm_epoch_all"]
        ratios = [c / e for c, e in zip(closing, epoch)]
        rows.append(ratio_row(f"{what}, warm cache: closing (last validation to exit) vs one epoch",
                              statistics.median(ratios), (min(ratios), max(ratios)), 0.3, True))
        peaks = [c / t for c, t in zip(f["phase_warm_closing_pss_all"], f["phase_warm_training_pss_all"])]
        rows.append(ratio_row(f"{what}, warm cache: the closing's peak PSS vs training's",
                              statistics.median(peaks), (min(peaks), max(peaks)), 1.0, True))
        for kind in ("warm", "cold"):
            if f"phase_{kind}_closing_all" not in f:
                continue
            times = ", ".join(f"{phase} {seconds_range(f[f'phase_{kind}_{phase}_all'])}"
                              for phase in ("start_up", "epochs", "closing", "whole"))
            rows.append(row(f"{what}, {kind} cache: seconds per phase (median, min-max)", times))
            memory = ", ".join(f"{phase} {statistics.median(f[f'phase_{kind}_{phase}_pss_all']) / 2**30:.2f}"
                               for phase in ("start_up", "training", "closing"))
            rows.append(row(f"{what}, {kind} cache: peak PSS per phase (GiB, median)", memory))
            parts = ", ".join(f"{key[len(f'phase_{kind}_part_'):-4].replace('_', ' ')} {statistics.median(v):.2f}"
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
