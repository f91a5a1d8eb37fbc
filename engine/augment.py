"""Random augmentation of each training batch on the training device, after the caches.

MONAI's array transforms take one sample (channel first) and no batch axis (`RandFlip(spatial_axis=0)`
on a batch would flip channels), so each sample of the batch gets its own draw, on the device."""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine, Events

from engine.checkpoint import numpy_state, numpy_state_back
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
    draw; labels are left alone. Reseeded from (seed, epoch) at each epoch, so a resumed run draws
    exactly what an uninterrupted one would."""

    def __init__(self, spec: AugmentConfig, device: torch.device | str, seed: int):
        if not isinstance(spec, AugmentConfig):
            raise TypeError(f"spec: expected an AugmentConfig (the config's augment section), "
                            f"got {type(spec).__name__}")
        self.device, self.seed = torch.device(device), int(seed)
        self.transform = augmentation(spec, self.device)
        self._epoch, self._restored = 0, None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reseed)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self)

    def reseed(self, engine: Engine) -> None:
        """Seeds every random transform from (seed, epoch); the epoch a mid-epoch checkpoint was taken in
        continues from the generators' saved states instead."""
        self._epoch = engine.state.epoch
        if self._restored is not None and self._restored["epoch"] == self._epoch:
            for generator, saved in zip(self._generators(), self._restored["states"]):
                generator.set_state(numpy_state_back(saved))
        else:
            self.transform.set_random_state(seed=(self.seed * 100_003 + self._epoch) % (2**32))
        self._restored = None

    def _generators(self) -> list:
        """The NumPy generator of every random transform (RandAffine's grid has one of its own)."""
        parts = [*self.transform.transforms, *(getattr(t, "rand_affine_grid", None) for t in self.transform.transforms)]
        return [p.R for p in parts if p is not None and hasattr(p, "R")]

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "states": [numpy_state(g.get_state()) for g in self._generators()]}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch
        batch[IMAGE] = self.apply(batch[IMAGE])

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True).float()
        out = [torch.as_tensor(self.transform(sample)) for sample in images]
        return torch.stack([o.as_tensor() if hasattr(o, "as_tensor") else o for o in out])
