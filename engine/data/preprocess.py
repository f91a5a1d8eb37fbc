"""Deterministic preprocessing as MONAI dict transforms: load (the reader a volume's kind calls for), channel
first, per-volume metadata (rescale, spacing), checks, orientation, spacing, HU window, resize or crop/pad,
dtype. The cache (cache.py) stores what this computes."""

from __future__ import annotations

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
from engine.data.datalist import IMAGE, NAME
from engine.utils.errors import CT3DError

PREPROCESSING_VERSION = 2  # bump when preprocessing_transform changes what it computes
# What checkpoints written before a preprocessing setting existed ran with (they lack the key).
LEGACY_PREPROCESSING = {"anti_aliasing": False}
RESCALE, PIXDIM = "rescale", "pixdim"  # per-volume metadata (data.metadata): [slope, intercept], [x, y, z] mm


def source_of(item: dict) -> dict:
    """What preprocessing reads of an item (never its label, so a label edit keeps the cache entry)."""
    return {k: item[k] for k in (IMAGE, NAME, RESCALE, PIXDIM) if k in item}


class LoadVolumed(MapTransform):
    """Loads each key's volume as MONAI's LoadImaged(image_only=True) would, with the reader its kind
    calls for (engine/sources.py: DICOM found by content, one series of a folder by name)."""

    def __call__(self, data):
        from engine.data.sources import read_volume, to_meta_tensor

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


class CheckVolumed(MapTransform):
    """Fails with the file's name when a loaded image is not one 3D volume, holds NaN, or is constant; and,
    when the HU window starts below 0, when it has no value below 0 (no air: raw scanner values, not HU).

    `hu_low`: the window's lower end."""

    def __init__(self, keys, hu_low: float = -1000.0):
        super().__init__(keys)
        self.hu_low = hu_low

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image, name = d[key], d.get(NAME, "?")
            shape = tuple(image.shape)
            if len(shape) != 4 or shape[0] != 1:
                raise CT3DError(f"{name}: expected one 3D volume, got array of shape {shape[1:]}")
            if torch.isnan(image).any():
                raise CT3DError(f"{name}: volume holds NaN voxels")
            low = float(image.min())
            if low == float(image.max()):
                raise CT3DError(f"{name}: every voxel has the same value ({low})")
            if self.hu_low < 0 <= low:
                raise CT3DError(
                    f"{name}: no voxel below 0 (lowest {low:g}) while preprocess.hu_window starts at {self.hu_low:g}: "
                    f"these look like raw scanner values, not Hounsfield units (air is -1000 HU). CT-RATE's first "
                    f"release stores raw values: give its metadata CSV as data.metadata to apply the rescale; its "
                    f"second release stores HU (do not rescale it again)")
        return d


def preprocessing_transform(p: PreprocessConfig, keep_meta: bool = False) -> Compose:
    """The deterministic preprocessing. `keep_meta` keeps MONAI's MetaTensor (affine and the operations
    applied), so `Compose.inverse` can carry a map on the result back to the input's grid."""
    steps = [
        LoadVolumed(IMAGE),
        EnsureChannelFirstd(IMAGE),
        ApplyMetadatad(IMAGE),
        CheckVolumed(IMAGE, hu_low=p.hu_window[0]),
        Orientationd(IMAGE, axcodes=p.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
    ]
    if p.spacing is not None:
        steps.append(Spacingd(IMAGE, pixdim=p.spacing, mode="bilinear"))
    steps.append(ScaleIntensityRanged(IMAGE, *p.hu_window, *p.scale_range, clip=True))
    if p.resize == "resize":
        steps.append(Resized(IMAGE, spatial_size=p.spatial_size, mode="trilinear", anti_aliasing=p.anti_aliasing))
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
    """Runs `transform` on one item; any failure becomes a CT3DError naming the volume."""
    try:
        return transform(item)
    except Exception as exc:  # MONAI wraps reader errors in RuntimeError chains
        root = _root_error(exc)
        if isinstance(root, CT3DError):
            raise root from None
        raise CT3DError(f"cannot read volume {item[IMAGE]}: {type(root).__name__}: {root}") from None
