"""The HU check on volumes whose air is one value: air clipped at -1024 HU (real, passes) against raw scanner
values padded at -1024 or -2048 (refused by name), each built from known HU with scanner-like noise."""

import numpy as np
import pytest
import torch

from engine.config.schema import PreprocessConfig
from engine.data.preprocess import AIR_HU, air_level, preprocess, preprocessing_transform
from engine.utils.errors import CT3DError
from volumes import chest_volume, write_nifti

SPACING = (6.0, 6.0, 12.0)
CLIP = -1024  # where scanners clip air, in HU


def noisy_chest(padding: int | None = -2048, masked: bool = False, seed: int = 0) -> np.ndarray:
    """chest_volume in HU with noise: air N(-1010, 20) clipped at -1024 (a quarter of the air at exactly -1024),
    lungs N(-850, 30), body N(40, 20); `padding` outside the reconstructed circle (None: air there too).
    `masked`: every voxel outside the body set to -1024 exactly (a body-masked data set)."""
    rng = np.random.default_rng(seed)
    vol, _ = chest_volume((64, 64, 32), SPACING, lung_reach_mm=150.0, padding=-2048)
    out = np.empty(vol.shape, dtype=np.float32)
    for level, mean, sd in ((-1000, -1010, 20), (-850, -850, 30), (40, 40, 20), (-2048, -1010, 20)):
        region = vol == level
        out[region] = rng.normal(mean, sd, int(region.sum()))
    out = np.maximum(np.round(out), CLIP)
    if masked:
        out[(vol == -1000) | (vol == -2048)] = CLIP
    if padding is not None:
        out[vol == -2048] = padding
    return out.astype(np.int16)


def run(path, **extra) -> torch.Tensor:
    p = PreprocessConfig(spatial_size=[32, 32, 32])
    return preprocess(preprocessing_transform(p), {"image": str(path), "name": path.name, **extra})["image"]


@pytest.mark.parametrize("padding", [-2048, CLIP, None])
def test_real_ct_with_air_clipped_at_one_value_passes(tmp_path, padding):
    vol = noisy_chest(padding)
    assert (vol == CLIP).mean() > 0.05  # the clipped air alone fills over 5% of the voxels
    assert AIR_HU[0] <= air_level(torch.tensor(vol)) <= AIR_HU[1]
    assert run(write_nifti(tmp_path / "clipped.nii", vol, spacing=SPACING)).shape == (1, 32, 32, 32)


def test_body_masked_ct_passes(tmp_path):
    """Air outside the body all -1024: the other values' 1st percentile is lung, but their soft tissue is at 40."""
    vol = noisy_chest(masked=True)
    assert air_level(torch.tensor(vol)) == CLIP
    assert run(write_nifti(tmp_path / "masked.nii", vol, spacing=SPACING)).shape == (1, 32, 32, 32)


@pytest.mark.parametrize("padding", [-1024, -2048])
def test_raw_values_padded_at_a_negative_level_are_refused(tmp_path, padding):
    """Raw values (HU + 1024: air 0 to ~60, lungs ~174, body ~1064) padded at `padding` outside the circle
    (a fifth of the voxels). -1024 padding is the 1st percentile and sits in AIR_HU: before this check it
    passed as air."""
    hu = noisy_chest(padding=None)
    raw = hu.astype(np.int32) + 1024
    raw[noisy_chest(padding=-2048) == -2048] = padding
    assert (raw == padding).mean() > 0.2 and raw[raw != padding].min() >= 0
    assert air_level(torch.tensor(raw)) >= 0  # the air as stored, padding left out
    path = write_nifti(tmp_path / f"raw{-padding}.nii", raw.astype(np.int16), spacing=SPACING)
    with pytest.raises(CT3DError) as info:
        run(path)
    message = str(info.value)
    assert path.name in message and "raw scanner values, not Hounsfield units" in message
    rescaled = run(path, rescale=[1.0, -1024.0])  # the metadata's rescale makes them HU: padding below -2000
    assert rescaled.shape == (1, 32, 32, 32)


def _mixture(parts: list[tuple[float, float, float, float | None]], seed: int = 0) -> torch.Tensor:
    """A (64, 64, 32) volume of shuffled voxels: (share, mean, sd, clip below) per tissue; sd 0 is one value."""
    rng = np.random.default_rng(seed)
    n = 64 * 64 * 32
    values = []
    for share, mean, sd, clip in parts:
        v = rng.normal(mean, sd, int(share * n)) if sd else np.full(int(share * n), mean)
        values.append(np.maximum(v, clip) if clip is not None else v)
    flat = np.round(np.concatenate(values))
    flat = np.concatenate([flat, np.full(n - flat.size, flat[-1])])
    return torch.tensor(rng.permutation(flat).reshape(64, 64, 32).astype(np.float32))


def test_raw_values_of_a_slim_patient_padded_at_minus_1024_are_caught():
    """Raw values (HU + 1024) with little tissue: a fifth padding at -1024, half air (0 to ~60), 15% lung, 15% soft
    tissue (under a fifth of the rest): the tissue share alone would pass it as HU."""
    raw = _mixture([(0.2, -1024, 0, None), (0.5, 14, 20, 0), (0.15, 174, 30, None), (0.15, 1064, 20, None)])
    assert air_level(raw) > AIR_HU[1] + 500  # its air as stored: refused as raw values
    # the same patient in HU, air clipped at -1024 (its noise above it), padding at -2048: passes
    hu = _mixture([(0.2, -2048, 0, None), (0.5, -1010, 20, -1024), (0.15, -850, 30, None), (0.15, 40, 20, None)])
    assert AIR_HU[0] <= air_level(hu) <= AIR_HU[1]
    # a head CT in HU: air clipped at -1024, fat, brain, a tenth dense bone: passes
    head = _mixture([(0.4, -1010, 20, -1024), (0.08, -100, 20, None), (0.42, 30, 10, None), (0.1, 1000, 150, None)])
    assert AIR_HU[0] <= air_level(head) <= AIR_HU[1]
