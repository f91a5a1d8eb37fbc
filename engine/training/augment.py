"""Random augmentation of each training batch on the training device, after the caches: one batched
operation per transform, each sample with its own draw (a flip mask, an affine matrix, a blur width, a
gamma, an offset, noise). The draws come from a torch generator on the device seeded from (seed,
epoch, batch), so a run resumed anywhere, even mid-epoch and on every rank, draws what an
uninterrupted one would. Our own: MONAI's array transforms take one sample at a time (a Python loop
per batch, noise drawn with NumPy on the CPU and copied over)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from engine.config.schema import AugmentConfig
from engine.data.items import IMAGE


def _rotations(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotation matrices from (B, 3) angles (radians) about x, y and z, applied in that order."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def affine_theta(matrices: torch.Tensor, shape, voxel_mm=None) -> torch.Tensor:
    """(B, 3, 4) `affine_grid` thetas for (B, 3, 3) output -> input matrices meant in physical space (x, y, z),
    on a (X, Y, Z) grid of `voxel_mm` voxels (None: cubic voxels): E^-1 M E, E the grid's half-extents, so a
    rotation stays rigid on a grid that is not a cube (in normalised coordinates a 128 x 128 x 64 grid would
    turn it into a stretch and a skew)."""
    voxel = torch.ones(3) if voxel_mm is None else torch.as_tensor(voxel_mm, dtype=torch.float32)
    extent = (torch.tensor([float(n) for n in shape]) * voxel).to(matrices.device, matrices.dtype)
    normalised = matrices * extent[None, None, :] / extent[None, :, None]  # E^-1 M E, E = diag(extent / 2)
    zyx = normalised.flip(1).flip(2)  # grid_sample's coordinates run (z, y, x) for a (X, Y, Z) volume
    return torch.cat([zyx, torch.zeros(len(zyx), 3, 1, device=matrices.device, dtype=matrices.dtype)], 2)


def _gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Each sample blurred with its own sigma (voxels), by three grouped 1D convolutions."""
    b, c = images.shape[:2]
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets[None] / sigmas[:, None]) ** 2)
    kernels = (kernels / kernels.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 2r+1)
    out = images.reshape(1, b * c, *images.shape[2:])
    for axis in range(3):
        shape = [b * c, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(F.pad(out, [p for p in reversed(padding) for _ in (0, 1)], mode="replicate"),
                       kernels.view(shape), groups=b * c)
    return out.view_as(images)


def _affine(images: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor, voxel_mm) -> torch.Tensor:
    """Each sample rotated by its (3,) angles and scaled by its (3,) factors about the grid's centre."""
    matrices = _rotations(angles) / scales[:, None, :]  # output -> input: shrink to zoom in
    theta = affine_theta(matrices, images.shape[2:], voxel_mm)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_batch(images: torch.Tensor, spec: AugmentConfig, generator: torch.Generator,
                  voxel_mm=None, select: bool | None = None) -> torch.Tensor:
    """`images` (B, C, X, Y, Z) float on any device, augmented sample by sample in batched operations;
    rotations and scaling are rigid in physical space on voxels of `voxel_mm` (None: cubic voxels)."""
    b, dev = images.shape[0], images.device

    def chosen(prob: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device=dev) < prob

    def uniform(low, high, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=generator, device=dev)

    for axis in range(3):
        flip = chosen(spec.flip_prob).view(b, 1, 1, 1, 1)
        images = torch.where(flip, images.flip(2 + axis), images)
    affine = chosen(spec.affine_prob)
    unit = uniform(-1.0, 1.0, 3)  # scaled by Python numbers: no host-to-device copy of the limits
    angles = torch.stack([unit[:, axis] * math.radians(d) for axis, d in enumerate(spec.rotate_degrees)], 1)
    scales = uniform(spec.scale_range[0], spec.scale_range[1], 3)
    smooth, sigmas = chosen(spec.smooth_prob), uniform(0.5, 1.0)
    if dev.type == "cpu" if select is None else select:  # only the chosen samples: no device to wait for
        if affine.any():
            images = images.clone()
            images[affine] = _affine(images[affine], angles[affine], scales[affine], voxel_mm)
        if smooth.any():
            images = images.clone()
            images[smooth] = _gaussian_blur(images[smooth], sigmas[smooth])
    else:  # every sample, the chosen ones kept: deciding on the device, with no host sync (a bool or a mask)
        keep = affine.view(b, 1, 1, 1, 1)
        images = torch.where(keep, _affine(images, angles, scales, voxel_mm), images)
        images = torch.where(smooth.view(b, 1, 1, 1, 1), _gaussian_blur(images, sigmas), images)
    contrast, gammas = chosen(spec.contrast_prob), uniform(0.8, 1.25)
    low = images.amin(dim=(1, 2, 3, 4), keepdim=True)
    span = images.amax(dim=(1, 2, 3, 4), keepdim=True) - low + 1e-7
    adjusted = ((images - low) / span).clamp_min(0) ** gammas.view(b, 1, 1, 1, 1) * span + low
    images = torch.where(contrast.view(b, 1, 1, 1, 1), adjusted, images)
    noise = chosen(spec.noise_prob).view(b, 1, 1, 1, 1)
    images = images + noise * spec.noise_std * torch.randn(images.shape, generator=generator, device=dev)
    shift = chosen(spec.shift_prob) * uniform(-spec.shift, spec.shift)
    return images + shift.view(b, 1, 1, 1, 1)


class DeviceAugmentation:
    """Moves each training batch's images to `device` (as float32) and augments them there; labels are
    left alone. `voxel_mm`: the batch's voxel size (preprocess.spacing with crop/pad; None: cubic voxels)."""

    def __init__(self, spec: AugmentConfig, device: torch.device | str, seed: int, voxel_mm=None):
        if not isinstance(spec, AugmentConfig):
            raise TypeError(f"spec: expected an AugmentConfig (the config's augment section), "
                            f"got {type(spec).__name__}")
        self.spec, self.device, self.seed, self.voxel_mm = spec, torch.device(device), int(seed), voxel_mm

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self)

    def generator(self, epoch: int, batch: int) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed((self.seed * 100_003 + epoch * 10_007 + batch) % (2**63))
        return generator

    def __call__(self, engine: Engine) -> None:
        s = engine.state
        batch = (s.iteration - 1) % s.epoch_length if s.epoch_length else s.iteration
        s.batch[IMAGE] = self.apply(s.batch[IMAGE], self.generator(s.epoch, batch))

    def apply(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return augment_batch(images.to(self.device, non_blocking=True).float(), self.spec, generator, self.voxel_mm)
