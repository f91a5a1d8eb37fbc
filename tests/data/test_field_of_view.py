"""The CT-RATE config's preprocessing as a CT-RATE volume meets it: the whole chest stays in view, shrinking an
axis smooths first (the spacing step too), and the HU check stops raw values and a double rescale."""

import numpy as np
import pytest
import torch

from engine.config.loading import load_config
from engine.config.schema import PreprocessConfig
from engine.data.preprocess import air_level, gaussian_smooth, preprocess, preprocessing_transform, smoothing_sigmas
from engine.utils.errors import CT3DError
from volumes import chest_volume, write_nifti

CT_RATE = load_config("configs/ct-rate.yaml").preprocess


def run(p: PreprocessConfig, path, **extra) -> torch.Tensor:
    return preprocess(preprocessing_transform(p), {"image": str(path), "name": path.name, **extra})["image"][0].float()


def test_ct_rate_config_keeps_the_whole_chest(tmp_path):
    """512 x 512 x 300 at 0.7 x 0.7 x 1.0 mm, lungs out to 170 mm from the centre: >= 95% of the lung's volume is
    still lung after preprocessing (the old 192 mm cube kept about half)."""
    spacing = (0.7, 0.7, 1.0)
    vol, lungs = chest_volume((512, 512, 300), spacing, lung_reach_mm=170.0)
    path = write_nifti(tmp_path / "chest.nii", vol, spacing=spacing)
    out = run(CT_RATE, path)
    assert tuple(out.shape) == tuple(CT_RATE.spatial_size)
    low, high = CT_RATE.hu_window
    to_scaled = lambda hu: -1 + 2 * (hu - low) / (high - low)  # noqa: E731 - scale_range [-1, 1]
    lung_after = ((out > to_scaled(-925)) & (out < to_scaled(-775))).sum().item() * np.prod(CT_RATE.spacing)
    lung_before = lungs.sum() * np.prod(spacing)
    assert 0.95 <= lung_after / lung_before <= 1.05
    fov = [n * s for n, s in zip(CT_RATE.spatial_size, CT_RATE.spacing)]
    assert min(fov[:2]) >= 340 and fov[2] >= 340


def stripes(tmp_path, period_mm: float, spacing=(0.7, 0.7, 1.0), shape=(200, 40, 40)):
    """A CT whose body, with air at both ends in x, carries +-400 HU stripes along x with the given period."""
    x = np.arange(shape[0])[:, None, None] * spacing[0]
    vol = np.round(40 + 400 * np.cos(2 * np.pi * x / period_mm) * np.ones(shape)).astype(np.int16)
    vol[:20], vol[-20:] = -1000, -1000
    return write_nifti(tmp_path / "stripes.nii", vol, spacing=spacing)


def test_ct_rate_spacing_step_smooths_before_it_shrinks(tmp_path):
    """Stripes of 2.1 mm period: finer than the config's 2 x 1.4 mm can hold. Resampled without smoothing they
    fold back into coarse stripes that keep most of their contrast; smoothed first they fade to the body's mean."""
    from engine.config.loading import with_overrides

    path = stripes(tmp_path, 2.1)
    off = with_overrides(load_config("configs/ct-rate.yaml"), {"preprocess.anti_aliasing": False}).preprocess
    amplitude = 400 / 1000  # HU window [-1000, 1000] to [-1, 1]

    def swing(p):
        out = run(p, path)
        inside = (out > -0.5).nonzero()
        (x0, y0, z0), (x1, y1, z1) = inside.min(0).values + 3, inside.max(0).values - 3  # clear of the body's edges
        body = out[x0:x1, y0:y1, z0:z1]
        return float(body.max() - body.min()) / 2

    assert swing(off) > 0.6 * amplitude  # the pattern the smoothing is there to stop
    assert swing(CT_RATE) < 0.35 * amplitude and CT_RATE.anti_aliasing


def test_smoothing_matches_the_gaussian_it_names():
    """Against a direct 3D Gaussian (the product of three 1D ones, summed over every voxel), away from edges."""
    rng = np.random.default_rng(0)
    volume = torch.tensor(rng.normal(size=(21, 22, 23)), dtype=torch.float32)
    sigmas = [0.8, 0.0, 1.3]
    out = gaussian_smooth(volume, sigmas)
    grid = np.indices(volume.shape)
    centre = (10, 11, 11)
    weights = np.ones(volume.shape)
    for axis, sigma in enumerate(sigmas):
        offset = grid[axis] - centre[axis]
        if sigma == 0:
            weights = weights * (offset == 0)
        else:
            lobe = np.exp(-0.5 * (offset / sigma) ** 2) * (np.abs(offset) <= np.ceil(3 * sigma))
            weights = weights * lobe / lobe.sum(axis=axis, keepdims=True)
    assert float(out[centre]) == pytest.approx(float((weights * volume.numpy()).sum()), abs=1e-5)


def test_sigma_gives_the_new_spacings_width():
    """FWHM of the source voxel (taken as its spacing) combined with the added Gaussian's = the new spacing."""
    old, new = 0.7, 1.4
    (sigma,) = smoothing_sigmas([old], [new])
    fwhm_added = sigma * old * 2 * np.sqrt(2 * np.log(2))
    assert np.hypot(fwhm_added, old) == pytest.approx(new)
    assert smoothing_sigmas([2.0], [1.5]) == [0.0]


def test_air_level_leaves_out_padding_but_not_air():
    vol, _ = chest_volume((64, 64, 20), (6.0, 6.0, 15.0), lung_reach_mm=150.0, padding=-3024)
    assert air_level(torch.tensor(vol)) == -1000
    shifted = torch.tensor(vol.astype(np.float32)) - 1024  # rescaled again: padding -4048, air -2024
    assert air_level(shifted) < -1100


@pytest.mark.parametrize("case", ["raw", "rescaled twice"])
def test_hu_check_stops_raw_values_and_a_double_rescale(tmp_path, case):
    vol, _ = chest_volume((64, 64, 32), (6.0, 6.0, 12.0), lung_reach_mm=150.0, padding=-2048)
    path = write_nifti(tmp_path / "v.nii", vol, spacing=(6.0, 6.0, 12.0))
    p = PreprocessConfig(spatial_size=[32, 32, 32])
    assert run(p, path).shape == (32, 32, 32)  # HU as stored: passes
    if case == "raw":  # stored as raw scanner values (HU + 1024, padding 0), no rescale given
        path = write_nifti(tmp_path / "raw.nii", np.maximum(vol.astype(np.int32) + 1024, 0), spacing=(6.0, 6.0, 12.0))
        extra = {}
    else:  # HU already, rescaled again as if it were raw
        extra = {"rescale": [1.0, -1024.0]}
    with pytest.raises(CT3DError) as info:
        run(p, path, **extra)
    message = str(info.value)
    assert path.name in message and "first release" in message and "second release" in message
    assert ("raw scanner values" if case == "raw" else "rescaled twice") in message
    unchecked = PreprocessConfig(spatial_size=[32, 32, 32], air_check=False)
    if case == "raw":  # without the air check, a window reaching below 0 still needs a value below 0
        with pytest.raises(CT3DError, match="no voxel below 0"):
            run(unchecked, path)
    else:
        assert run(unchecked, path, **extra).shape == (32, 32, 32)
