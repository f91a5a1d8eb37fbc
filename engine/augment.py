"""Random augmentation of each training batch on the training device, after the caches.

MONAI's array transforms take one sample (channel first) and no batch axis (`RandFlip(spatial_axis=0)`
on a batch would flip channels), so each sample of the batch gets its own draw, on the device."""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine, Events

from engine.datalist import IMAGE
from engine.schema import AugmentConfig


def augmentation(spec: AugmentConfig, device: torch.device):
    from monai.transforms import (
        Compose,
        RandAdjustContrast,
        RandAffine,
        RandFlip,
        RandGaussianNoise,
        RandGaussianSmooth,
        RandShiftIntensity,
    )

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


class DeviceAugmentation:
    """Moves each training batch's images to `device` and augments every sample with its own random
    draw; labels are left alone. The draws of each batch are seeded from (seed, epoch, batch), so a run
    resumed anywhere, even mid-epoch and on every rank, draws exactly what an uninterrupted one would."""

    def __init__(self, spec: AugmentConfig, device: torch.device | str, seed: int):
        if not isinstance(spec, AugmentConfig):
            raise TypeError(f"spec: expected an AugmentConfig (the config's augment section), "
                            f"got {type(spec).__name__}")
        self.device, self.seed = torch.device(device), int(seed)
        self.transform = augmentation(spec, self.device)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self)

    def reseed(self, engine: Engine) -> None:
        s = engine.state
        batch = (s.iteration - 1) % s.epoch_length if s.epoch_length else s.iteration
        self.transform.set_random_state(seed=(self.seed * 100_003 + s.epoch * 10_007 + batch) % (2**32))

    def __call__(self, engine: Engine) -> None:
        self.reseed(engine)
        batch = engine.state.batch
        batch[IMAGE] = self.apply(batch[IMAGE])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        out = [torch.as_tensor(self.transform(sample)) for sample in images]
        return torch.stack([o.as_tensor() if hasattr(o, "as_tensor") else o for o in out])
