import pytest
import torch
from ignite.engine import Engine

from engine.config.schema import AugmentConfig
from engine.training.augment import DeviceAugmentation

ALWAYS = AugmentConfig(flip_prob=0.5, affine_prob=1.0, smooth_prob=0.0, contrast_prob=1.0, noise_prob=1.0,
                       shift_prob=1.0)


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
    aug = DeviceAugmentation(AugmentConfig(flip_prob=1.0, affine_prob=0, smooth_prob=0, contrast_prob=0,
                                         noise_prob=0, shift_prob=0), "cpu", seed=0)
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


def test_batched_draws_reproduce_per_seed_epoch_and_batch_and_stay_on_the_device():
    images = torch.randn(4, 1, 12, 12, 12)
    aug = DeviceAugmentation(ALWAYS, "cpu", 3)
    a = aug.apply(images, aug.generator(2, 5))
    assert a.device == images.device and a.dtype == torch.float32
    assert torch.equal(a, aug.apply(images, aug.generator(2, 5)))
    assert not torch.equal(a, aug.apply(images, aug.generator(2, 6)))  # the next batch draws anew
    other = DeviceAugmentation(ALWAYS, "cpu", 4)
    assert not torch.equal(a, other.apply(images, other.generator(2, 5)))  # another seed: other draws


def test_each_transform_does_what_it_says():
    from engine.config.schema import AugmentConfig
    from engine.training.augment import augment_batch

    off = dict(flip_prob=0.0, affine_prob=0.0, smooth_prob=0.0, contrast_prob=0.0, noise_prob=0.0, shift_prob=0.0)
    volume = torch.linspace(0, 1, 8 ** 3).reshape(1, 1, 8, 8, 8)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(augment_batch(volume, AugmentConfig(**off), generator), volume)  # nothing on: untouched
    flipped = augment_batch(volume, AugmentConfig(**{**off, "flip_prob": 1.0}), generator)
    assert torch.equal(flipped, volume.flip(2).flip(3).flip(4))
    shifted = augment_batch(volume, AugmentConfig(**{**off, "shift_prob": 1.0, "shift": 0.1}), generator)
    offset = shifted - volume
    assert torch.allclose(offset, offset.flatten()[0]) and 0 < abs(float(offset.flatten()[0])) <= 0.1
    smoothed = augment_batch(volume, AugmentConfig(**{**off, "smooth_prob": 1.0}), generator)
    assert smoothed.std() < volume.std() and abs(float(smoothed.mean() - volume.mean())) < 0.02
    turned = augment_batch(volume, AugmentConfig(**{**off, "affine_prob": 1.0, "rotate_degrees": [0.0, 0.0, 90.0],
                                                     "scale_range": [1.0, 1.0]}), generator)
    assert turned.shape == volume.shape and not torch.allclose(turned, volume)


@pytest.mark.parametrize("shape, voxel", [((128, 128, 64), None), ((48, 48, 24), (1.0, 1.0, 2.0))])
def test_rotation_is_rigid_on_a_grid_that_is_not_a_cube(shape, voxel):
    """A blob off the centre, rotated 30 degrees about x (mixing y and z, whose extents differ) and about z:
    its centroid lands where the rigid rotation puts it, within half a voxel."""
    import math

    import torch.nn.functional as F

    from engine.training.augment import _rotations, affine_theta

    mm = torch.ones(3) if voxel is None else torch.tensor(voxel)
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij"))
    physical = (grid - torch.tensor([(n - 1) / 2 for n in shape])[:, None, None, None]) * mm[:, None, None, None]
    source = torch.tensor([12.0, -10.0, 8.0])  # mm from the centre
    blob = torch.exp(-((physical - source[:, None, None, None]) ** 2).sum(0) / (2 * 3.0**2))[None, None]
    rotation = _rotations(torch.tensor([[math.radians(30), 0.0, math.radians(20)]]))
    theta = affine_theta(rotation, shape, voxel)
    out = F.grid_sample(blob, F.affine_grid(theta, list(blob.shape), align_corners=False), mode="bilinear",
                        align_corners=False)[0, 0]
    centroid = (physical * out).flatten(1).sum(1) / out.sum()
    expected = rotation[0].T @ source  # output(p) = input(R p): the blob moves to R^T p
    assert torch.all((centroid - expected).abs() <= 0.5 * mm), (centroid, expected)


def test_deciding_on_the_device_gives_what_transforming_only_the_chosen_samples_gives():
    """On a GPU every sample is transformed and the chosen ones kept (no mask read on the host); on the CPU only
    the chosen samples are. Same draws, same result: affine and blur act on each sample alone."""
    from engine.training.augment import augment_batch

    spec = AugmentConfig(affine_prob=0.5, smooth_prob=0.5, rotate_degrees=[10.0, 20.0, 30.0])
    images = torch.randn(8, 1, 12, 12, 10, generator=torch.Generator().manual_seed(1))
    masked = augment_batch(images, spec, torch.Generator().manual_seed(3), (1.0, 1.0, 2.0), select=True)
    every = augment_batch(images, spec, torch.Generator().manual_seed(3), (1.0, 1.0, 2.0), select=False)
    assert torch.allclose(masked, every, atol=1e-6)
    alone = augment_batch(images[:1], spec, torch.Generator().manual_seed(4), select=False)
    assert not torch.allclose(alone, images[:1])  # it does transform
