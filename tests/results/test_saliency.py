"""Grad-CAM maps and the choice of volumes the report shows."""

import pytest
import torch

from engine.config.schema import ModelConfig
from engine.results.saliency import cases, grad_cam, peak, supports, unit_range
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
    assert cases(probs, labels, 0, threshold=0.5) == [(0, "true positive"), (2, "true positive"),
                                                      (3, "false positive")]
    assert cases(probs, labels, 0, threshold=0.99) == []


def test_peak_of_a_flat_map_is_the_centre():
    heat = torch.zeros(1, 8, 10, 12)
    assert peak(heat) == (4, 5, 6)
    heat[0, 1, 2, 3] = 1.0
    assert peak(heat) == (1, 2, 3)


def test_one_grad_cam_per_network_so_hooks_do_not_pile_up():
    config = ModelConfig(name="resnet3d", variant="10", widen_factor=0.25)
    net = create_model(config, 2, [16, 16, 16])
    for label in (0, 1, 0):
        grad_cam(net, config, torch.randn(1, 1, 16, 16, 16), label)
    assert len(net.layer1._forward_hooks) == 1


def test_maps_read_hottest_where_the_evidence_is_strongest():
    """MONAI's default normaliser maps (min, max) to (1, 0); ours keeps the hottest voxel at 1."""
    maps = torch.zeros(2, 1, 4, 4, 4)
    maps[0, 0, 1, 2, 3] = 5.0
    maps[0, 0, 0, 0, 0] = -1.0
    scaled = unit_range(maps)
    assert float(scaled[0, 0, 1, 2, 3]) == 1.0 and float(scaled[0, 0, 0, 0, 0]) == 0.0
    assert torch.equal(scaled[1], torch.zeros(1, 4, 4, 4))  # a flat map stays flat, no division by zero
