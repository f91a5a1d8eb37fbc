"""Grad-CAM maps and the choice of volumes the report shows."""

import pytest
import torch

from engine.config.schema import ModelConfig
from engine.results.saliency import TARGET_LAYERS, cases, grad_cam, grad_cams, peak, supports, unit_range
from engine.training.models import create_model


@pytest.mark.parametrize("name,variant", [("resnet3d", "10"), ("densenet3d", "121")])
def test_maps_cover_the_input_grid_in_zero_to_one(name, variant):
    config = ModelConfig(name=name, variant=variant, widen_factor=0.25)
    net = create_model(config, 3, [32, 32, 32])
    heat = grad_cam(net, config, torch.randn(2, 1, 32, 32, 32), label=1)
    assert heat.shape == (2, 1, 32, 32, 32) and float(heat.min()) >= 0 and float(heat.max()) <= 1 + 1e-6
    assert not supports(ModelConfig(name="vit3d"))


def test_cases_are_the_top_true_positives_and_the_worst_false_positives():
    probs = torch.tensor([[0.9], [0.2], [0.8], [0.95], [0.7], [0.6]])
    labels = torch.tensor([[1.0], [1.0], [1.0], [0.0], [0.0], [1.0]])
    assert cases(probs, labels, 0, threshold=0.5, positives=2) == [(0, "true positive"), (2, "true positive"),
                                                      (3, "false positive")]
    assert cases(probs, labels, 0, threshold=0.5) == [(0, "true positive"), (3, "false positive")]  # the default
    assert cases(probs, labels, 0, threshold=0.99) == []


def test_peak_of_a_flat_map_is_the_centre():
    heat = torch.zeros(1, 8, 10, 12)
    assert peak(heat) == (4, 5, 6)
    heat[0, 1, 2, 3] = 1.0
    assert peak(heat) == (1, 2, 3)


@pytest.mark.parametrize("name,variant", [("resnet3d", "10"), ("densenet3d", "121")])
def test_batched_maps_equal_monais_grad_cam_pair_by_pair_and_leave_the_network_as_it_was(name, variant):
    """The reference is MONAI's GradCAM, one label and one volume per call (with our [0, 1] scaling)."""
    from monai.visualize import GradCAM

    config = ModelConfig(name=name, variant=variant, widen_factor=0.25)
    torch.manual_seed(0)
    net = create_model(config, 3, [32, 32, 32])
    net.train()
    images = torch.randn(4, 1, 32, 32, 32)
    pairs = [(2, 0), (0, 1), (2, 2), (3, 1), (0, 0)]
    maps = grad_cams(net, config, images, pairs, chunk=2)
    assert net.training and all(p.requires_grad for p in net.parameters()) and all(p.grad is None for p in
                                                                                   net.parameters())
    assert not net.layer1._forward_hooks if name == "resnet3d" else True
    reference = GradCAM(nn_module=net, target_layers=TARGET_LAYERS[name], postprocessing=unit_range)
    for (row, label), got in zip(pairs, maps):
        want = reference(x=images[row:row + 1], class_idx=label)[0]
        assert torch.allclose(got, want, atol=1e-5), (row, label, float((got - want).abs().max()))
    assert grad_cams(net, config, images, []).shape == (0, 1, 32, 32, 32)


def test_maps_read_hottest_where_the_evidence_is_strongest():
    """MONAI's default normaliser maps (min, max) to (1, 0); ours keeps the hottest voxel at 1."""
    maps = torch.zeros(2, 1, 4, 4, 4)
    maps[0, 0, 1, 2, 3] = 5.0
    maps[0, 0, 0, 0, 0] = -1.0
    scaled = unit_range(maps)
    assert float(scaled[0, 0, 1, 2, 3]) == 1.0 and float(scaled[0, 0, 0, 0, 0]) == 0.0
    assert torch.equal(scaled[1], torch.zeros(1, 4, 4, 4))  # a flat map stays flat, no division by zero


def test_fast_maps_in_bfloat16_find_the_same_peaks_and_are_exact_without_native_bfloat16():
    from engine.results.saliency import native_bf16

    config = ModelConfig(name="resnet3d", variant="10", widen_factor=0.5)
    torch.manual_seed(1)
    net = create_model(config, 3, [32, 32, 32])
    images = torch.randn(3, 1, 32, 32, 32)
    pairs = [(0, 0), (1, 2), (2, 1)]
    exact, fast = grad_cams(net, config, images, pairs), grad_cams(net, config, images, pairs, fast=True)
    if not native_bf16(torch.device("cpu")):
        assert torch.equal(exact, fast)
        return
    assert (exact - fast).abs().max() < 0.1  # maps in [0, 1]
    for e, f in zip(exact, fast):
        assert max(abs(a - b) for a, b in zip(peak(e), peak(f))) <= 2, (peak(e), peak(f))  # a 4-voxel grid


def test_maps_share_one_scale_per_volume_and_keep_the_metadata_spacing(tmp_path):
    """A label whose evidence is a hundredth of another's reads about 0.01 (every map of a volume is scaled by
    the volume's strongest), not 1 as a map scaled alone would; and the maps go back to the grid data.metadata
    gave the volume (its spacing), not the file header's."""
    import numpy as np

    from engine.config.schema import PreprocessConfig
    from engine.data.preprocess import preprocessing_transform
    from engine.results.saliency import input_space_maps
    from volumes import hu_volume, write_nifti

    config = ModelConfig(name="resnet3d", variant="10", widen_factor=0.25)
    net = create_model(config, 2, [16, 16, 16])
    with torch.no_grad():
        net.fc.weight[1] = 0.01 * net.fc.weight[0]
        net.fc.bias.zero_()
    path = write_nifti(tmp_path / "raw.nii.gz", hu_volume((20, 24, 28)) + 1024, spacing=(1.0, 1.0, 1.0))
    item = {"image": str(path), "name": "raw.nii.gz", "rescale": [1.0, -1024.0], "pixdim": [0.75, 0.75, 1.5]}
    transform = preprocessing_transform(PreprocessConfig(spatial_size=[16, 16, 16]), keep_meta=True)
    maps, affine = input_space_maps(net, config, transform, item, 2)
    assert maps.shape == (20, 24, 28, 2) and 0.9 <= maps[..., 0].max() <= 1 + 1e-6  # peaks at 1 before resampling
    assert maps[..., 1].max() / maps[..., 0].max() == pytest.approx(0.01, rel=0.05)
    assert np.allclose(np.abs(np.diag(affine))[:3], [0.75, 0.75, 1.5], atol=1e-4)


@pytest.mark.parametrize("name", ["merlin", "ctfm"])
def test_encoder_maps_are_grad_cam_of_the_encoders_block_on_the_inputs_own_axes(name):
    """Grad-CAM written out (the block's activations weighted by the label's mean gradient, ReLU, upsampled) on a
    volume whose three sides differ: Merlin's block sees (z, x, y), so its map is put back to (x, y, z) first."""
    from engine.training.encoders import CtfmEncoder, EncoderClassifier, MerlinEncoder

    torch.manual_seed(0)
    small = {"spatial_dims": 3, "in_channels": 1, "init_filters": 4, "blocks_down": [1, 1, 2]}
    encoder = MerlinEncoder() if name == "merlin" else CtfmEncoder(small)
    net = EncoderClassifier(encoder, 3, "linear", 0.0, freeze=True).eval()
    block = encoder.i3_resnet.layer3 if name == "merlin" else encoder.encoder.layers[1]["blocks"]
    images = torch.randn(2, 1, 40, 32, 24)
    kept = {}
    handle = block.register_forward_hook(lambda _m, _a, out: kept.update(acts=out))
    logits = net(images.requires_grad_(True))
    handle.remove()
    grads, = torch.autograd.grad(logits[1, 2], kept["acts"])
    cam = torch.relu((grads[1:2].mean(dim=(2, 3, 4), keepdim=True) * kept["acts"][1:2]).sum(1, keepdim=True))
    if name == "merlin":
        cam = cam.permute(0, 1, 3, 4, 2)  # (z, x, y) -> (x, y, z)
    want = unit_range(torch.nn.functional.interpolate(cam, size=(40, 32, 24), mode="trilinear", align_corners=False))
    got = grad_cams(net, ModelConfig(name=name), images.detach(), [(1, 2)])
    assert got.shape == (1, 1, 40, 32, 24) and supports(ModelConfig(name=name))
    assert torch.allclose(got, want.detach(), atol=1e-5), float((got - want).abs().max())
