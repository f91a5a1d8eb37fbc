"""Device augmentation: samples/s of ct3d's batched augmentation against the per-sample MONAI chain it
replaced (kept here as the baseline), on a batch of 8."""

from __future__ import annotations

import math
import statistics
import time

import torch
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandGaussianSmooth,
    RandShiftIntensity,
)

from bench.rows import Row, row
from engine.config import AugmentConfig
from engine.training import DeviceAugmentation


def per_sample_chain(spec, device):
    """The per-sample MONAI chain ct3d used before batched augmentation: the baseline."""
    low, high = spec.scale_range
    return Compose([
        *(RandFlip(prob=spec.flip_prob, spatial_axis=axis) for axis in range(3)),
        RandAffine(prob=spec.affine_prob, rotate_range=[math.radians(d) for d in spec.rotate_degrees],
                   scale_range=[(low - 1, high - 1)] * 3, padding_mode="border", device=device),
        RandGaussianSmooth(prob=spec.smooth_prob, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0)),
        RandAdjustContrast(prob=spec.contrast_prob, gamma=(0.8, 1.25)),
        RandGaussianNoise(prob=spec.noise_prob, std=spec.noise_std),
        RandShiftIntensity(prob=spec.shift_prob, offsets=spec.shift),
    ], lazy=False)


def augment_figures(cfg: dict) -> dict:
    """Samples/s of the default augmentation on a batch of 8, batched vs the per-sample MONAI chain."""
    spec, figures = AugmentConfig(), {}
    for name, shape, repeats in cfg["augment_shapes"]:
        images = torch.randn(8, 1, *shape)
        batched, chain = DeviceAugmentation(spec, "cpu", 0), per_sample_chain(spec, torch.device("cpu"))
        chain.set_random_state(0)
        times = {"batched": [], "loop": []}
        for i in range(repeats):
            start = time.perf_counter()
            batched.apply(images, 1, i)
            times["batched"].append(time.perf_counter() - start)
            start = time.perf_counter()
            torch.stack([torch.as_tensor(chain(sample)) for sample in images])
            times["loop"].append(time.perf_counter() - start)
        for kind, seconds in times.items():
            figures[f"augment_{name}_{kind}_samples_per_s"] = 8 / statistics.median(seconds)
    return figures


def rows(f: dict) -> list[Row]:
    rows = []
    for name in ("64", "ctrate"):
        if f"augment_{name}_batched_samples_per_s" in f:
            batched, loop = f[f"augment_{name}_batched_samples_per_s"], f[f"augment_{name}_loop_samples_per_s"]
            shape = "64^3" if name == "64" else "128x256x256"
            rows.append(row(f"device augmentation, batch 8 at {shape}: batched vs per-sample MONAI chain (CPU)",
                            f"{batched:.1f} vs {loop:.1f} samples/s ({batched / loop:.1f}x)"))
    return rows
