"""Random augmentation of each training batch on the training device, after the caches: one batched
operation per transform, each sample with its own draw (a flip, an affine matrix, a blur width, a gamma, an
offset, noise). Which samples get each transform, and their parameters, are drawn on the host from a CPU
generator seeded from (seed, epoch, batch): so a run resumed anywhere, even mid-epoch, on every rank and on
any device, draws what an uninterrupted one would, and the transforms run only on the chosen samples
without the device ever being asked which they are (a host sync on a GPU). The draws reach the device in
one small asynchronous copy per batch; the noise itself, a full volume per chosen sample, is drawn on the
device from a device generator seeded from the same triple. Our own: MONAI's array transforms take one
sample at a time (a Python loop per batch, noise drawn with NumPy on the CPU and copied over)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from engine.config.schema import AugmentConfig
from engine.data.items import IMAGE

NOISE_STREAM = 0x5DEECE66D  # offsets the noise generator's seed, so on a CPU noise never replays the draws


def _rotations(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) rotation matrices from (B, 3) angles (radians) about x, y and z, applied in that order."""
    c, s = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
    rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1).view(-1, 3, 3)
    ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1).view(-1, 3, 3)
    rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1).view(-1, 3, 3)
    return rz @ ry @ rx


def grid_extent(shape, voxel_mm=None) -> torch.Tensor:
    """(3,) physical extent of a (X, Y, Z) grid of `voxel_mm` voxels (None: cubic voxels), on the host."""
    voxel = torch.ones(3) if voxel_mm is None else torch.as_tensor(voxel_mm, dtype=torch.float32)
    return torch.tensor([float(n) for n in shape]) * voxel


def affine_theta(matrices: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """(B, 3, 4) `affine_grid` thetas for (B, 3, 3) output -> input matrices meant in physical space (x, y, z),
    on a grid of physical `extent` (grid_extent): E^-1 M E, E the grid's half-extents, so a rotation stays
    rigid on a grid that is not a cube (in normalised coordinates a 128 x 128 x 64 grid would turn it into a
    stretch and a skew)."""
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


def _affine(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Each sample resampled through its (3, 4) theta (affine_theta). Float32: in bf16 the grid's coordinates
    are off by up to 0.25 voxel at 128 voxels (0.5 at 256) and the output by ~10% of the range (measured)."""
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _contrast(images: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """Each sample's intensities raised to its gamma within its own range."""
    low = images.amin(dim=(1, 2, 3, 4), keepdim=True)
    span = images.amax(dim=(1, 2, 3, 4), keepdim=True) - low + 1e-7
    return ((images - low) / span).clamp_min(0) ** gammas.view(-1, 1, 1, 1, 1) * span + low


@dataclass(frozen=True)
class Draws:
    """One batch's decisions (bool, which samples get a transform) and parameters, as CPU tensors."""

    flips: torch.Tensor  # (3, B): flip along spatial axis 0, 1, 2
    affine: torch.Tensor  # (B,)
    angles: torch.Tensor  # (B, 3) radians about x, y, z
    scales: torch.Tensor  # (B, 3)
    smooth: torch.Tensor  # (B,)
    sigmas: torch.Tensor  # (B,) voxels
    contrast: torch.Tensor  # (B,)
    gammas: torch.Tensor  # (B,)
    noise: torch.Tensor  # (B,)
    shift: torch.Tensor  # (B,) intensity offsets, 0 where not chosen


def draw(spec: AugmentConfig, batch_size: int, generator: torch.Generator) -> Draws:
    """A batch's Draws from a CPU `generator`: the same whatever device the batch is augmented on."""
    b = batch_size

    def chosen(prob: float) -> torch.Tensor:
        return torch.rand(b, generator=generator) < prob

    def uniform(low, high, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, *shape, generator=generator)

    flips = torch.stack([chosen(spec.flip_prob) for _ in range(3)])
    affine, unit = chosen(spec.affine_prob), uniform(-1.0, 1.0, 3)
    angles = unit * torch.tensor([math.radians(d) for d in spec.rotate_degrees])
    scales = uniform(spec.scale_range[0], spec.scale_range[1], 3)
    smooth, sigmas = chosen(spec.smooth_prob), uniform(0.5, 1.0)
    contrast, gammas = chosen(spec.contrast_prob), uniform(0.8, 1.25)
    noise = chosen(spec.noise_prob)
    shift = chosen(spec.shift_prob) * uniform(-spec.shift, spec.shift)
    return Draws(flips, affine, angles, scales, smooth, sigmas, contrast, gammas, noise, shift)


def _to_device(draws: Draws, extent: torch.Tensor, device: torch.device) -> dict:
    """What the device needs of `draws` (chosen samples' indices, thetas, sigmas, gammas; every shift), packed
    on the host and copied in one float32 tensor, pinned on CUDA so the copy does not wait (floats hold
    indices exactly up to 2^24)."""
    masks = {**{f"flip{axis}": draws.flips[axis] for axis in range(3)}, "affine": draws.affine,
             "smooth": draws.smooth, "contrast": draws.contrast, "noise": draws.noise}
    index = {name: torch.nonzero(mask).flatten() for name, mask in masks.items()}  # host tensors: no sync
    a = index["affine"]
    theta = affine_theta(_rotations(draws.angles[a]) / draws.scales[a][:, None, :], extent)  # shrink: zoom in
    values = {"theta": theta, "sigmas": draws.sigmas[index["smooth"]],
              "gammas": draws.gammas[index["contrast"]], "shift": draws.shift}
    parts = [*index.values(), *values.values()]
    host = torch.cat([p.flatten().float() for p in parts])
    host = host.pin_memory() if device.type == "cuda" else host
    on_device = host.to(device, non_blocking=True)
    n_index = sum(len(i) for i in index.values())
    indices = on_device[:n_index].long().split([len(i) for i in index.values()])
    rest = on_device[n_index:].split([p.numel() for p in values.values()])
    return {**dict(zip(index, indices)), **{name: r.view(v.shape) for (name, v), r in zip(values.items(), rest)}}


def _on_chosen(images: torch.Tensor, index: torch.Tensor, transform) -> None:
    """`transform` applied, in place, to the samples at `index` (a device tensor whose length the host knows)."""
    if len(index):
        images.index_copy_(0, index, transform(images.index_select(0, index)))


def augment_batch(images: torch.Tensor, spec: AugmentConfig, draws: Draws, noise_generator: torch.Generator,
                  extent: torch.Tensor) -> torch.Tensor:
    """`images` (B, C, X, Y, Z) float on any device, augmented in place as `draws` says, each transform
    computed only for its chosen samples; rotations and scaling rigid on a grid of physical `extent`."""
    d = _to_device(draws, extent, images.device)
    for axis in range(3):
        _on_chosen(images, d[f"flip{axis}"], lambda x, axis=axis: x.flip(2 + axis))
    _on_chosen(images, d["affine"], lambda x: _affine(x, d["theta"]))
    _on_chosen(images, d["smooth"], lambda x: _gaussian_blur(x, d["sigmas"]))
    _on_chosen(images, d["contrast"], lambda x: _contrast(x, d["gammas"]))
    _on_chosen(images, d["noise"], lambda x: x + spec.noise_std * torch.randn(
        x.shape, generator=noise_generator, device=x.device))
    return images.add_(d["shift"].view(-1, 1, 1, 1, 1))


class DeviceAugmentation:
    """Moves each training batch's images to `device` (as float32) and augments them there; labels are
    left alone. `voxel_mm`: the batch's voxel size (preprocess.spacing with crop/pad; None: cubic voxels)."""

    def __init__(self, spec: AugmentConfig, device: torch.device | str, seed: int, voxel_mm=None):
        if not isinstance(spec, AugmentConfig):
            raise TypeError(f"spec: expected an AugmentConfig (the config's augment section), "
                            f"got {type(spec).__name__}")
        self.spec, self.device, self.seed, self.voxel_mm = spec, torch.device(device), int(seed), voxel_mm
        self._extents: dict[tuple, torch.Tensor] = {}  # per grid shape: built once, not every batch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self)

    def _seed(self, epoch: int, batch: int) -> int:
        return (self.seed * 100_003 + epoch * 10_007 + batch) % (2**63)

    def generator(self, epoch: int, batch: int) -> torch.Generator:
        """The host generator of a batch's Draws: on the CPU whatever the device, so the draws are too."""
        return torch.Generator().manual_seed(self._seed(epoch, batch))

    def noise_generator(self, epoch: int, batch: int) -> torch.Generator:
        """The device generator of a batch's noise (full volumes, too big to draw on the host and copy)."""
        generator = torch.Generator(device=self.device)
        return generator.manual_seed((self._seed(epoch, batch) + NOISE_STREAM) % (2**63))

    def extent(self, shape) -> torch.Tensor:
        shape = tuple(int(n) for n in shape)
        if shape not in self._extents:
            self._extents[shape] = grid_extent(shape, self.voxel_mm)
        return self._extents[shape]

    def __call__(self, engine: Engine) -> None:
        s = engine.state
        batch = (s.iteration - 1) % s.epoch_length if s.epoch_length else s.iteration
        s.batch[IMAGE] = self.apply(s.batch[IMAGE], s.epoch, batch)

    def apply(self, images: torch.Tensor, epoch: int, batch: int) -> torch.Tensor:
        """`images` augmented with batch `batch` of epoch `epoch`'s draws, on the device, as float32."""
        moved = images.to(self.device, non_blocking=True).float()
        images = moved.clone() if moved is images else moved  # augmented in place: never the caller's tensor
        draws = draw(self.spec, len(images), self.generator(epoch, batch))
        return augment_batch(images, self.spec, draws, self.noise_generator(epoch, batch),
                             self.extent(images.shape[2:]))
