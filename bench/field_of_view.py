"""CT-RATE's preprocessing choice: how the whole chest gets to the network's 256 x 256 x 128. The shipped config
resamples straight to 1.4 x 1.4 x 2.8 mm (smoothed first) and crops/pads; the alternative published CT-RATE
pipelines suggest keeps 480 x 480 x 240 at 0.75 x 0.75 x 1.5 mm and then resizes (anti-aliased, ours; and
MONAI's Resized anti-aliasing, whose zero padding shows at the borders). Both see the same ~360 mm; this
measures the time per volume, the lungs each keeps and how far apart their outputs are, and the lungs the
old 192 mm crop kept."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench.common import ROOT


def _chest(work: Path, shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Path:
    """The demo's chest phantom (engine/data/demo.py) at a CT's size and spacing, as a NIfTI file."""
    import nibabel as nib
    import numpy as np

    from engine.data.demo import phantom

    volume = phantom(np.random.default_rng(0), shape, (1, 1, 0, 0))
    path = work / "chest.nii"
    nib.save(nib.Nifti1Image(volume.astype(np.int16), np.diag([*spacing, 1.0])), str(path))
    return path


def _lung_voxels(image, spacing) -> float:
    """The volume (mm^3) of voxels in the lungs' HU band (-950 to -750) of a preprocessed [-1, 1] image."""
    import math

    return float(((image > -0.95) & (image < -0.75)).sum()) * math.prod(spacing)


def bench_field_of_view(cfg: dict, work: Path) -> dict:
    import torch
    from monai.transforms import Compose, Resized

    from engine.config.loading import load_config
    from engine.config.schema import PreprocessConfig
    from engine.data.preprocess import AntiAliasd, preprocess, preprocessing_transform

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
    paths = {"straight": lambda item: preprocess(preprocessing_transform(shipped), item),
             "two_step": lambda item: ours(preprocess(preprocessing_transform(two_step_first), item)),
             "old_crop": lambda item: preprocess(preprocessing_transform(old), item),
             "two_step_monai": lambda item: monai_resize(preprocess(preprocessing_transform(two_step_first), item))}
    figures = {"fov_shape": "x".join(map(str, shape)), "fov_spacing": "x".join(map(str, spacing)),
               "fov_mm": "x".join(map(str, fov)), "fov_two_step_size": "x".join(map(str, big))}
    item = {"image": str(path), "name": path.name}
    source = _lung_voxels(torch.as_tensor(preprocess(preprocessing_transform(
        PreprocessConfig(**base, spacing=None, spatial_size=list(shape), resize="crop_pad")), item)["image"]).float(),
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
