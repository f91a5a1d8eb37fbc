import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine

from bench.counting import Counts
from engine.config.schema import AugmentConfig
from engine.training import augment
from engine.training.augment import (
    DeviceAugmentation,
    _affine,
    _gaussian_blur,
    _rotations,
    affine_theta,
    draw,
    grid_extent,
)

ALWAYS = AugmentConfig(flip_prob=0.5, affine_prob=1.0, smooth_prob=0.0, contrast_prob=1.0, noise_prob=1.0,
                       shift_prob=1.0)
OFF = dict(flip_prob=0.0, affine_prob=0.0, smooth_prob=0.0, contrast_prob=0.0, noise_prob=0.0, shift_prob=0.0)
HALF = AugmentConfig(flip_prob=0.5, affine_prob=0.5, smooth_prob=0.5, contrast_prob=0.5, noise_prob=0.5,
                     shift_prob=0.5, rotate_degrees=[10.0, 20.0, 30.0])


def run_one_batch(aug, images, labels, epoch=1):
    seen = {}
    engine = Engine(lambda e, batch: seen.update(batch))
    aug.attach(engine)
    engine.run([{"image": images, "label": labels}], max_epochs=epoch)
    return seen


def test_each_sample_gets_its_own_draw_and_labels_are_untouched():
    images = torch.linspace(-1, 1, 16 ** 3).reshape(1, 1, 16, 16, 16).repeat(4, 1, 1, 1, 1).half()
    labels = torch.tensor([[1.0, 0.0]] * 4)
    seen = run_one_batch(DeviceAugmentation(ALWAYS, "cpu", seed=0), images.clone(), labels.clone())
    out = seen["image"]
    assert out.shape == images.shape and out.dtype == torch.float32 and out.device.type == "cpu"
    assert all(not torch.equal(out[0], out[i]) for i in range(1, 4))
    assert not torch.allclose(out[0], images[0].float())
    assert torch.equal(seen["label"], labels)


def test_channel_axis_is_never_flipped():
    images = torch.zeros(2, 2, 8, 8, 8)
    images[:, 1] = 1.0  # channel 1 all ones, channel 0 all zeros
    aug = DeviceAugmentation(AugmentConfig(**{**OFF, "flip_prob": 1.0}), "cpu", seed=0)
    out = run_one_batch(aug, images, torch.zeros(2, 1))["image"]
    assert torch.all(out[:, 0] == 0) and torch.all(out[:, 1] == 1)


def test_same_seed_and_epoch_same_draws_other_epoch_differs():
    images = torch.randn(2, 1, 12, 12, 12)
    a = run_one_batch(DeviceAugmentation(ALWAYS, "cpu", 7), images.clone(), torch.zeros(2, 1))["image"]
    b = run_one_batch(DeviceAugmentation(ALWAYS, "cpu", 7), images.clone(), torch.zeros(2, 1))["image"]
    c = run_one_batch(DeviceAugmentation(ALWAYS, "cpu", 7), images.clone(), torch.zeros(2, 1), epoch=2)["image"]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_spec_is_checked():
    with pytest.raises(TypeError, match="spec"):
        DeviceAugmentation({"flip_prob": 1}, "cpu", 0)


def test_a_batch_reproduces_from_seed_epoch_and_batch_alone_as_a_resumed_run_needs():
    images = torch.randn(4, 1, 12, 12, 12)
    before = images.clone()
    aug = DeviceAugmentation(HALF, "cpu", 3)
    a = aug.apply(images, 2, 5)
    assert a.device == images.device and a.dtype == torch.float32
    assert torch.equal(images, before)  # augmented in place, but never the caller's tensor
    assert torch.equal(a, aug.apply(images, 2, 5))  # twice on one instance
    assert torch.equal(a, DeviceAugmentation(HALF, "cpu", 3).apply(images, 2, 5))  # a fresh one: a restart
    assert not torch.equal(a, aug.apply(images, 2, 6))  # the next batch draws anew
    assert not torch.equal(a, DeviceAugmentation(HALF, "cpu", 4).apply(images, 2, 5))  # another seed


def test_host_draws_do_not_depend_on_the_device():
    """What a GPU run would draw is what a CPU run draws: the generator is on the host whatever the device."""
    fields = ("flips", "affine", "angles", "scales", "smooth", "sigmas", "contrast", "gammas", "noise", "shift")
    on_cpu = draw(HALF, 6, DeviceAugmentation(HALF, "cpu", 9).generator(3, 4))
    for device in ("cuda", "meta"):  # no CUDA needed: drawing never touches the device
        generator = DeviceAugmentation(HALF, device, 9).generator(3, 4)
        assert generator.device.type == "cpu"
        drawn = draw(HALF, 6, generator)
        assert all(torch.equal(getattr(drawn, f), getattr(on_cpu, f)) for f in fields), device
        assert all(getattr(drawn, f).device.type == "cpu" for f in fields)


def test_draw_rates_and_ranges_match_the_spec():
    spec = AugmentConfig(flip_prob=0.5, affine_prob=0.3, smooth_prob=0.1, contrast_prob=0.2, noise_prob=0.2,
                         shift_prob=0.2, shift=0.05, rotate_degrees=[5.0, 10.0, 15.0], scale_range=[0.9, 1.1])
    d = draw(spec, 20_000, torch.Generator().manual_seed(0))  # rates within ~5 standard errors
    for rate, prob in [*((f.float().mean(), 0.5) for f in d.flips), (d.affine.float().mean(), 0.3),
                       (d.smooth.float().mean(), 0.1), (d.contrast.float().mean(), 0.2),
                       (d.noise.float().mean(), 0.2), ((d.shift != 0).float().mean(), 0.2)]:
        assert abs(float(rate) - prob) < 5 * math.sqrt(prob * (1 - prob) / 20_000), (rate, prob)
    assert not torch.equal(d.flips[0], d.flips[1])  # each axis its own draw
    limits = torch.tensor([math.radians(a) for a in (5.0, 10.0, 15.0)])
    assert torch.all(d.angles.abs() <= limits) and torch.all(d.angles.abs().amax(0) > 0.99 * limits)
    assert torch.all((d.scales >= 0.9) & (d.scales <= 1.1))
    assert torch.all((d.sigmas >= 0.5) & (d.sigmas <= 1.0)) and torch.all((d.gammas >= 0.8) & (d.gammas <= 1.25))
    assert torch.all(d.shift.abs() <= 0.05) and d.shift.abs().max() > 0.049


def test_flips_in_the_output_happen_at_the_flip_rate_on_each_axis():
    volume = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 1, 4, 5, 6)  # no symmetry: flips tell
    aug = DeviceAugmentation(AugmentConfig(**{**OFF, "flip_prob": 0.5}), "cpu", 1)
    out = torch.cat([aug.apply(volume.repeat(100, 1, 1, 1, 1), 1, batch) for batch in range(10)])
    for axis in range(3):  # axis flipped or not, whatever the others did: compare along a line on the axis
        line = out.movedim(2 + axis, -1).flatten(1, -2)[:, 0]
        flipped = (line[:, 0] > line[:, -1]).float().mean()
        assert abs(float(flipped) - 0.5) < 0.08, (axis, flipped)


def reference(images, spec, d, noise_generator, extent):
    """Every transform computed for every sample, the chosen ones kept: the GPU path this module replaced."""
    def keep(mask):
        return mask.view(-1, 1, 1, 1, 1)
    x = images.clone()
    for axis in range(3):
        x = torch.where(keep(d.flips[axis]), x.flip(2 + axis), x)
    x = torch.where(keep(d.affine), _affine(x, affine_theta(_rotations(d.angles) / d.scales[:, None], extent)), x)
    x = torch.where(keep(d.smooth), _gaussian_blur(x, d.sigmas), x)
    low = x.flatten(1).min(1).values.view(-1, 1, 1, 1, 1)
    span = x.flatten(1).max(1).values.view(-1, 1, 1, 1, 1) - low + 1e-7
    x = torch.where(keep(d.contrast), ((x - low) / span).clamp_min(0) ** d.gammas.view(-1, 1, 1, 1, 1) * span + low, x)
    noise = torch.zeros_like(x)  # the noise generator's volumes go to the chosen samples, in batch order
    noise[d.noise] = torch.randn((int(d.noise.sum()), *x.shape[1:]), generator=noise_generator)
    x = torch.where(keep(d.noise), x + spec.noise_std * noise, x)
    return x + d.shift.view(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("batch", [0, 1, 2])
def test_computing_only_the_chosen_samples_equals_computing_all_and_keeping_the_chosen(batch):
    shape, voxel = (12, 10, 8), (1.0, 1.0, 2.0)
    images = torch.randn(8, 2, *shape, generator=torch.Generator().manual_seed(batch))
    aug = DeviceAugmentation(HALF, "cpu", 11, voxel)
    d = draw(HALF, 8, aug.generator(1, batch))
    for mask in (*d.flips, d.affine, d.smooth, d.contrast, d.noise, d.shift != 0):
        assert 0 < int(mask.sum()) < 8, "pick a batch where some but not all samples are chosen"
    expected = reference(images, HALF, d, aug.noise_generator(1, batch), grid_extent(shape, voxel))
    assert not torch.allclose(expected, images, atol=1e-3)
    assert torch.allclose(aug.apply(images, 1, batch), expected, atol=1e-6, rtol=0)


def test_affine_blur_contrast_and_noise_run_only_on_the_chosen_samples(monkeypatch):
    sizes, images = {"affine": [], "blur": [], "contrast": [], "noise": []}, torch.randn(8, 1, 8, 8, 8)
    for name, key in (("_affine", "affine"), ("_gaussian_blur", "blur"), ("_contrast", "contrast")):
        original = getattr(augment, name)
        monkeypatch.setattr(augment, name, lambda x, *a, _o=original, _k=key: sizes[_k].append(len(x)) or _o(x, *a))
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda shape, **kw: sizes["noise"].append(shape[0]) or randn(shape, **kw))
    aug = DeviceAugmentation(HALF, "cpu", 11)
    aug.apply(images, 1, 0)
    d = draw(HALF, 8, aug.generator(1, 0))
    assert sizes == {"affine": [int(d.affine.sum())], "blur": [int(d.smooth.sum())],
                     "contrast": [int(d.contrast.sum())], "noise": [int(d.noise.sum())]}
    assert all(0 < n[0] < 8 for n in sizes.values())


def test_augmenting_reads_nothing_back_from_the_device():
    aug, images = DeviceAugmentation(HALF, "cpu", 0), torch.randn(8, 1, 8, 8, 8)
    counts = Counts().install()
    try:
        aug.apply(images, 1, 0)
    finally:
        counts.remove()
    assert counts.reads == 0


def test_each_transform_does_what_it_says():
    volume = torch.linspace(0, 1, 8 ** 3).reshape(1, 1, 8, 8, 8)

    def apply(**on):
        return DeviceAugmentation(AugmentConfig(**{**OFF, **on}), "cpu", 0).apply(volume, 1, 0)
    assert torch.equal(apply(), volume)  # nothing on: untouched
    assert torch.equal(apply(flip_prob=1.0), volume.flip(2).flip(3).flip(4))
    offset = apply(shift_prob=1.0, shift=0.1) - volume
    assert torch.allclose(offset, offset.flatten()[0]) and 0 < abs(float(offset.flatten()[0])) <= 0.1
    smoothed = apply(smooth_prob=1.0)
    assert smoothed.std() < volume.std() and abs(float(smoothed.mean() - volume.mean())) < 0.02
    noisy = apply(noise_prob=1.0, noise_std=0.1) - volume
    assert 0.08 < float(noisy.std()) < 0.12 and abs(float(noisy.mean())) < 0.02
    turned = apply(affine_prob=1.0, rotate_degrees=[0.0, 0.0, 90.0], scale_range=[1.0, 1.0])
    assert turned.shape == volume.shape and not torch.allclose(turned, volume)


@pytest.mark.parametrize("shape, voxel", [((128, 128, 64), None), ((48, 48, 24), (1.0, 1.0, 2.0))])
def test_rotation_is_rigid_on_a_grid_that_is_not_a_cube(shape, voxel):
    """A blob off the centre, rotated 30 degrees about x (mixing y and z, whose extents differ) and about z:
    its centroid lands where the rigid rotation puts it, within half a voxel."""
    mm = torch.ones(3) if voxel is None else torch.tensor(voxel)
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"))
    physical = (grid - torch.tensor([(n - 1) / 2 for n in shape])[:, None, None, None]) * mm[:, None, None, None]
    source = torch.tensor([12.0, -10.0, 8.0])  # mm from the centre
    blob = torch.exp(-((physical - source[:, None, None, None]) ** 2).sum(0) / (2 * 3.0**2))[None, None]
    rotation = _rotations(torch.tensor([[math.radians(30), 0.0, math.radians(20)]]))
    theta = affine_theta(rotation, grid_extent(shape, voxel))
    out = F.grid_sample(blob, F.affine_grid(theta, list(blob.shape), align_corners=False), mode="bilinear",
                        align_corners=False)[0, 0]
    centroid = (physical * out).flatten(1).sum(1) / out.sum()
    expected = rotation[0].T @ source  # output(p) = input(R p): the blob moves to R^T p
    assert torch.all((centroid - expected).abs() <= 0.5 * mm), (centroid, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_no_host_sync_and_the_cpu_result(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the blur's convolutions in full float32
    spec = dataclasses.replace(HALF, noise_prob=0.0)  # noise: another generator on each device
    images = torch.randn(8, 1, 16, 16, 8).half().pin_memory()  # as the loader hands it over
    aug = DeviceAugmentation(spec, "cuda", 0, (1.0, 1.0, 2.0))
    aug.apply(images, 1, 0)  # first call: pinned pool, cuDNN plans
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = aug.apply(images, 1, 1)
        DeviceAugmentation(HALF, "cuda", 0).apply(images, 1, 2)  # with noise
    finally:
        torch.cuda.set_sync_debug_mode(0)
    expected = DeviceAugmentation(spec, "cpu", 0, (1.0, 1.0, 2.0)).apply(images, 1, 1)
    assert torch.allclose(out.cpu(), expected, atol=1e-4)
