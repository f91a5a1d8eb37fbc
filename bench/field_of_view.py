"""CT-RATE's preprocessing choice: how the whole chest gets to the network's 256 x 256 x 128. The shipped config
resamples straight to 1.4 x 1.4 x 2.8 mm (smoothed first) and crops/pads; the alternative published CT-RATE
pipelines suggest keeps 480 x 480 x 240 at 0.75 x 0.75 x 1.5 mm and then resizes (anti-aliased, ours; and
MONAI's Resized anti-aliasing, whose zero padding shows at the borders). Both see the same ~360 mm; this
measures the time per volume, the lungs each keeps and how far apart their outputs are, and the lungs the
old 192 mm crop kept."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Compose, Resized

from bench.common import ROOT
from bench.rows import Row, row, seconds_range
from engine.config import PreprocessConfig, load_config
from engine.data import AntiAliasd, phantom, preprocessing_transform


def _chest(work: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    """The demo's chest phantom (engine/data/demo.py) at a CT's size and spacing, as a NIfTI file."""
    volume = phantom(np.random.default_rng(0), shape, (1, 1, 0, 0))
    path = work / "chest.nii"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), np.diag([*spacing, 1.0])), str(path))
    return path


def _lung_voxels(image, spacing) -> float:
    """The volume (mm^3) of voxels in the lungs' HU band (-950 to -750) of a preprocessed [-1, 1] image."""
    return float(((image > -0.95) & (image < -0.75)).sum()) * math.prod(spacing)


def bench_field_of_view(cfg: dict, work: Path) -> dict:
    shape, spacing = cfg["fov_shape"], cfg["fov_spacing"]
    path = _chest(work, shape, spacing)
    shipped = load_config(ROOT / "configs" / "ct-rate.yaml").preprocess
    shrink = cfg.get("fov_shrink", 1)  # the smoke: the same field of view on a grid `shrink` times coarser
    shipped.spatial_size = [n // shrink for n in shipped.spatial_size]
    shipped.spacing = [s * shrink for s in shipped.spacing]
    size = list(shipped.spatial_size)
    fov = [round(n * s) for n, s in zip(size, shipped.spacing)]
    fine = [0.75 * shrink, 0.75 * shrink, 1.5 * shrink]
    big = [round(f / s) for f, s in zip(fov, fine)]  # the same field of view at the finer spacing
    base = {k: getattr(shipped, k) for k in ("orientation", "hu_window", "scale_range", "dtype", "air_check")}
    two_step_first = PreprocessConfig(**base, spacing=fine, spatial_size=big, resize="crop_pad")
    old = PreprocessConfig(**base, spacing=fine, spatial_size=size, resize="crop_pad")
    ours = Compose([AntiAliasd("image", spatial_size=size), Resized("image", spatial_size=size, mode="trilinear")])
    monai_resize = Resized("image", spatial_size=size, mode="trilinear", anti_aliasing=True)  # zero-padded smoothing
    paths = {"straight": lambda item: preprocessing_transform(shipped)(item),
             "two_step": lambda item: ours(preprocessing_transform(two_step_first)(item)),
             "old_crop": lambda item: preprocessing_transform(old)(item),
             "two_step_monai": lambda item: monai_resize(preprocessing_transform(two_step_first)(item))}
    figures = {"fov_shape": "x".join(map(str, shape)), "fov_spacing": "x".join(map(str, spacing)),
               "fov_mm": "x".join(map(str, fov)), "fov_two_step_size": "x".join(map(str, big))}
    item = {"image": str(path), "name": path.name}
    source = _lung_voxels(torch.as_tensor(preprocessing_transform(
        PreprocessConfig(**base, spacing=None, spatial_size=list(shape), resize="crop_pad"))(item)["image"]).float(),
        spacing)
    outputs = {}
    for name, run in paths.items():
        times = []
        for _ in range(1 if name == "two_step_monai" else cfg["fov_repeats"]):
            start = time.perf_counter()
            outputs[name] = torch.as_tensor(run(dict(item))["image"]).float()
            times.append(time.perf_counter() - start)
        figures[f"fov_{name}_seconds_all"] = times
        out_spacing = fine if name == "old_crop" else [f / n for f, n in zip(fov, size)]
        figures[f"fov_{name}_lungs_kept"] = _lung_voxels(outputs[name], out_spacing) / source
    gap = (outputs["straight"] - outputs["two_step"]).abs() * 1000  # [-1, 1] over a 2000 HU window: x1000 is HU
    figures["fov_paths_mean_abs_hu"] = float(gap.mean())
    figures["fov_paths_p99_abs_hu"] = float(gap.flatten()[:: max(1, gap.numel() // 1_000_000)].quantile(0.99))
    figures["fov_seconds_ratio"] = statistics.median(figures["fov_straight_seconds_all"]) / statistics.median(
        figures["fov_two_step_seconds_all"])
    return figures


def rows(f: dict) -> list[Row]:
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
