"""Deterministic preprocessing as MONAI dict transforms: load (the reader a volume's kind calls for), channel
first, per-volume metadata (rescale, spacing), checks (the HU check among them), orientation, spacing (smoothed
first where it shrinks an axis), HU window, resize (smoothed first likewise) or crop/pad, dtype. The cache (cache.py)
stores what this computes."""

from __future__ import annotations

import math

import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    MapTransform,
    Orientationd,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    Spacingd,
)

from engine.config.schema import PreprocessConfig
from engine.data.items import IMAGE, NAME, PIXDIM, RELATIVE, RESCALE
from engine.data.sources import read_volume, to_meta_tensor
from engine.utils.errors import CT3DError, Transient
from engine.utils.io import TRANSIENT_ERRNOS

PREPROCESSING_VERSION = 3  # bump when preprocessing_transform changes what it computes
# What checkpoints written before a preprocessing setting existed ran with (they lack the key).
LEGACY_PREPROCESSING = {"anti_aliasing": False, "air_check": False}
AIR_HU = (-1100.0, -900.0)  # where a CT's air (its 1st percentile of values, padding left out) must sit
FWHM_PER_SIGMA = 2 * math.sqrt(2 * math.log(2))


def source_of(item: dict) -> dict:
    """What preprocessing reads of an item (never its label, so a label edit keeps the cache entry), and the
    path under data.image_root that names its cache entry."""
    return {k: item[k] for k in (IMAGE, NAME, RESCALE, PIXDIM, RELATIVE) if k in item}


class LoadVolumed(MapTransform):
    """Loads each key's volume as MONAI's LoadImaged(image_only=True) would, with the reader its kind
    calls for (engine/sources.py: DICOM found by content, one series of a folder by name)."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = to_meta_tensor(*read_volume(str(d[key])), str(d[key]))
        return d


class ApplyMetadatad(MapTransform):
    """data.metadata: raw scanner values to HU (value * slope + intercept) and the voxel spacing, from the
    item's RESCALE and PIXDIM entries (the direction of the volume's own affine is kept)."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if RESCALE in d:
                slope, intercept = d[RESCALE]
                image = image.float() * slope + intercept
            if PIXDIM in d:
                affine = image.affine.clone().double()
                direction = affine[:3, :3] / affine[:3, :3].norm(dim=0, keepdim=True)
                affine[:3, :3] = direction * torch.tensor(d[PIXDIM], dtype=torch.float64)
                image.affine = affine
            d[key] = image
        return d


PADDING_SHARE = 0.01  # one value filling this share of a volume's lowest voxels is its 1st percentile on its own
RAW_TISSUE = (824.0, 1224.0)  # soft tissue (-200 to 200 HU) as raw scanner values (HU + 1024); in HU: dense bone
RAW_TISSUE_SHARE = 0.2  # raw values put every soft tissue there (a third or more of a CT); HU a few % of bone
# ... or a twentieth, when the rest's own 1st percentile sits where raw values put air and nothing else lies at an
# air-like level (a slim patient in a wide field of view: air around the body, little tissue); a CT in HU whose air
# is clipped at -1024 has its unclipped air noise just above it
RAW_AIR = (AIR_HU[0] + 1024.0, AIR_HU[1] + 1024.0)
RAW_TISSUE_SHARE_WITH_AIR = 0.05


def _first_percentile(values: torch.Tensor) -> float:
    return float(values.kthvalue(max(1, int(0.01 * values.numel()))).values)


def air_level(image: torch.Tensor, samples: int = 2_000_000) -> float:
    """The 1st percentile of a volume's values (from an even sample of at most `samples` voxels), where a CT's
    air sits, leaving out padding: the lowest value when it lies below AIR_HU and fills over 0.1% of the voxels
    (scanners pad the region outside the reconstructed circle with -2048 or -3024 HU, or a raw equivalent).

    One value at an air-like level filling over 1% is either air clipped there (scanners clip at -1024 HU) or
    padding there (-1024 stored beside raw values, whose air is near 0 and soft tissue near 1024). It is padding,
    and the air the other values' 1st percentile, when over a fifth of the others sit in RAW_TISSUE, or over a
    twentieth with that percentile itself where raw values put air (RAW_AIR) and no other value air-like."""
    flat = image.reshape(-1)
    values = flat[:: max(1, flat.numel() // samples)].float()
    lowest = values.min()
    if lowest < AIR_HU[0]:
        padding = values == lowest
        if padding.float().mean() > 1e-3 and not padding.all():
            values = values[~padding]
    air = _first_percentile(values)
    one_value = values == air
    if AIR_HU[0] <= air <= AIR_HU[1] and one_value.float().mean() > PADDING_SHARE and not one_value.all():
        others = values[~one_value]
        tissue = float(((others >= RAW_TISSUE[0]) & (others <= RAW_TISSUE[1])).float().mean())
        rest = _first_percentile(others)
        lone = float(((others >= AIR_HU[0]) & (others <= AIR_HU[1])).float().mean()) < 1e-3
        raw_air = lone and RAW_AIR[0] <= rest <= RAW_AIR[1]
        if tissue > RAW_TISSUE_SHARE or (tissue > RAW_TISSUE_SHARE_WITH_AIR and raw_air):
            return rest
    return air


def _release_hint(rescaled: bool) -> str:
    done = "after data.metadata's rescale" if rescaled else "as stored, no data.metadata given"
    return (f" ({done}). CT-RATE's first release stores raw scanner values: give its metadata CSV as data.metadata "
            f"to rescale them; its second release stores HU already: leave data.metadata out (a second rescale "
            f"turns soft tissue into air). Volumes in HU with no air in view: preprocess.air_check=false")


VOXEL_MM = (0.05, 20.0)  # plausible CT voxel sizes (a micro-CT's to a thick slab's); others are header units


class CheckVolumed(MapTransform):
    """Fails with the file's name when a loaded image is not one 3D volume, holds NaN, or is constant; and,
    when `air_check` (the HU window reaches air, at or below AIR_HU's top), when its air (air_level) is not
    near -1000 HU: raw scanner values sit above, a rescale applied twice below. A window starting below 0
    without the air check still needs some value below 0.

    `hu_low`: the window's lower end."""

    def __init__(self, keys, hu_low: float = -1000.0, air_check: bool = True):
        super().__init__(keys)
        self.hu_low, self.air_check = hu_low, air_check and hu_low <= AIR_HU[1]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image, name = d[key], d.get(NAME, "?")
            shape = tuple(image.shape)
            if len(shape) != 4 or shape[0] != 1:
                raise CT3DError(f"{name}: expected one 3D volume, got array of shape {shape[1:]}")
            if not torch.isfinite(image).all():
                bad = int((~torch.isfinite(image)).sum())
                raise CT3DError(f"{name}: volume holds {bad} NaN or infinite voxel(s)")
            affine = getattr(image, "affine", None)
            if affine is not None:  # a spacing in metres (0.002) would be resampled to one voxel's value
                voxel = [float(v) for v in torch.as_tensor(affine, dtype=torch.float64)[:3, :3].norm(dim=0)]
                if not all(VOXEL_MM[0] <= v <= VOXEL_MM[1] for v in voxel):
                    raise CT3DError(f"{name}: voxel size {' x '.join(f'{v:g}' for v in voxel)} mm is outside "
                                    f"{VOXEL_MM[0]:g}-{VOXEL_MM[1]:g} mm: a header in other units (metres?) or "
                                    f"without spacing; fix the header, or give the spacing in data.metadata")
            low = float(image.min())
            if low == float(image.max()):
                raise CT3DError(f"{name}: every voxel has the same value ({low})")
            if self.air_check:
                air = air_level(image)
                if not AIR_HU[0] <= air <= AIR_HU[1]:
                    kind = "raw scanner values, not Hounsfield units" if air > AIR_HU[1] else \
                        "Hounsfield units rescaled twice"
                    raise CT3DError(f"{name}: its air (1st percentile of its values, padding left out) is at {air:g}, "
                                    f"not near -1000 HU ({AIR_HU[0]:g} to {AIR_HU[1]:g}): these look like {kind}"
                                    + _release_hint(RESCALE in d))
            elif self.hu_low < 0 <= low:
                raise CT3DError(
                    f"{name}: no voxel below 0 (lowest {low:g}) while preprocess.hu_window starts at {self.hu_low:g}: "
                    f"these look like raw scanner values, not Hounsfield units (air is -1000 HU)"
                    + _release_hint(RESCALE in d))
        return d


SINGLE_TAP_SIGMA = 0.05  # voxels: below a twentieth of a voxel a Gaussian kernel is a single tap


def smoothing_sigmas(current: list[float], target: list[float]) -> list[float]:
    """Per axis, in voxels of `current` spacing: the Gaussian that, on top of the source's own resolution, gives
    the new spacing's (FWHM = new spacing: sqrt(new^2 - old^2) / 2.355 mm); 0 where an axis is not shrunk."""
    return [math.sqrt(max(new * new - old * old, 0.0)) / FWHM_PER_SIGMA / old for old, new in zip(current, target)]


def gaussian_smooth(volume: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """A (x, y, z) volume smoothed by a separable Gaussian (sigma per axis in voxels, 3 sigma each side, edges
    replicated), as a sum of shifted copies: 1 s on a 512 x 512 x 300 CT on 2 cores where MONAI's GaussianSmooth
    (a convolution per axis) took 20 s. On a C-ordered copy: a NIfTI volume arrives in Fortran order (nibabel), and
    adding the padded copy (C order) into an output of the input's order took 50 s at one thread (2026-12-01)."""
    import torch.nn.functional as F

    volume = volume.contiguous()
    for axis, sigma in enumerate(sigmas):
        if sigma <= SINGLE_TAP_SIGMA:
            continue
        radius = max(1, math.ceil(3 * sigma))
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
        taps /= taps.sum()
        pad = [0, 0] * 3
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        padded = F.pad(volume[None, None], pad, mode="replicate")[0, 0]
        out = torch.zeros_like(volume)
        for offset, weight in enumerate(taps.tolist()):
            out.add_(padded.narrow(axis, offset, volume.shape[axis]), alpha=weight)
        volume = out
    return volume


class AntiAliasd(MapTransform):
    """Anti-aliasing for a step that shrinks axes: smooths each axis that going to `pixdim` (mm) or to
    `spatial_size` (voxels) will shrink, by smoothing_sigmas, so detail finer than the new voxels fades instead
    of folding back as false patterns. Ours because MONAI's Spacingd does not smooth at all and its Resized
    smooths with zero padding, which pulls a [-1, 1]-scaled CT's border towards 0 (air at the volume's faces
    turned into lung-like values: bench/RESULTS.md, CT-RATE preprocessing)."""

    def __init__(self, keys, pixdim=None, spatial_size=None):
        super().__init__(keys)
        self.pixdim, self.spatial_size = pixdim, spatial_size

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if self.pixdim is not None:
                current = [float(v) for v in image.affine[:3, :3].double().norm(dim=0)]
                target = [float(v) for v in self.pixdim]
            else:  # in voxels: the new voxel spans in/out of the old
                current, target = [1.0] * 3, [n / m for n, m in zip(image.shape[1:], self.spatial_size)]
            sigmas = smoothing_sigmas(current, target)
            if max(sigmas) > SINGLE_TAP_SIGMA:
                from monai.data import MetaTensor

                smoothed = gaussian_smooth(torch.as_tensor(image)[0].float(), sigmas)[None]
                if isinstance(image, MetaTensor):
                    smoothed = MetaTensor(smoothed, meta=image.meta, applied_operations=image.applied_operations)
                d[key] = smoothed
        return d


def preprocessing_transform(p: PreprocessConfig, keep_meta: bool = False) -> Compose:
    """The deterministic preprocessing. `keep_meta` keeps MONAI's MetaTensor (affine and the operations
    applied), so `Compose.inverse` can carry a map on the result back to the input's grid."""
    steps = [
        LoadVolumed(IMAGE),
        EnsureChannelFirstd(IMAGE),
        ApplyMetadatad(IMAGE),
        CheckVolumed(IMAGE, hu_low=p.hu_window[0], air_check=p.air_check),
        Orientationd(IMAGE, axcodes=p.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if p.spacing is not None:
        if p.anti_aliasing:
            steps.append(AntiAliasd(IMAGE, pixdim=p.spacing))
        steps.append(Spacingd(IMAGE, pixdim=p.spacing, mode="bilinear"))
    steps.append(ScaleIntensityRanged(IMAGE, *p.hu_window, *p.scale_range, clip=True))
    if p.resize == "resize":
        if p.anti_aliasing:
            steps.append(AntiAliasd(IMAGE, spatial_size=p.spatial_size))
        steps.append(Resized(IMAGE, spatial_size=p.spatial_size, mode="trilinear", anti_aliasing=False))
    else:
        steps.append(ResizeWithPadOrCropd(IMAGE, spatial_size=p.spatial_size, constant_values=p.scale_range[0]))
    # Plain tensors, no MetaTensor: smaller cache entries that load with weights_only=True.
    steps.append(EnsureTyped(IMAGE, dtype=getattr(torch, p.dtype), track_meta=keep_meta))
    return Compose(steps)


def _root_error(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def preprocess(transform: Compose, item: dict) -> dict:
    """Runs `transform` on one item; any failure becomes a CT3DError naming the volume. What is cached is checked
    too: a tensor with a NaN or infinite voxel (resampling spreads one inf over hundreds of voxels) or constant
    after the transforms (a header spacing in metres resampled to one voxel's value) is refused."""
    try:
        out = transform(item)
    except Exception as exc:  # MONAI wraps reader errors in RuntimeError chains
        root = _root_error(exc)
        if isinstance(root, CT3DError):
            raise root from None
        if isinstance(root, OSError) and root.errno in TRANSIENT_ERRNOS:  # the storage, not the volume: retried
            raise Transient(f"reading volume {item[IMAGE]}: the storage did not answer ({root})") from None
        raise CT3DError(f"cannot read volume {item[IMAGE]}: {type(root).__name__}: {root}") from None
    image = torch.as_tensor(out[IMAGE])
    if not torch.isfinite(image).all():
        raise CT3DError(f"volume {item[IMAGE]}: {int((~torch.isfinite(image)).sum())} NaN or infinite voxel(s) after "
                        f"preprocessing (an inf or NaN in the file); fix or leave out the volume")
    if image.numel() and float(image.amin()) == float(image.amax()):
        raise CT3DError(f"volume {item[IMAGE]}: every voxel is {float(image.amin()):g} after preprocessing (a header "
                        f"spacing in metres, or a field of view outside the volume?)")
    return out
