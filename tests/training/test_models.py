import pytest
import torch

from engine.config.schema import ModelConfig
from engine.training.models import create_model
from engine.utils.errors import CT3DError


@pytest.mark.parametrize("name,variant", [("resnet3d", "10"), ("resnet3d", "50"), ("densenet3d", "121"),
                                          ("vit3d", "tiny")])
def test_factory_maps_volume_to_logits(name, variant):
    model = create_model(ModelConfig(name=name, variant=variant, widen_factor=0.25), 5, [32, 32, 32]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32, 32))
    assert out.shape == (2, 5)


def test_vit_head_has_no_tanh():
    model = create_model(ModelConfig(name="vit3d", variant="tiny"), 3, [32, 32, 32])
    assert not any(isinstance(m, torch.nn.Tanh) for m in model.modules())


def test_resnet_first_conv_stride_is_exposed():
    for stride in (1, 2):
        model = create_model(ModelConfig(name="resnet3d", variant="18", first_conv_stride=stride), 1, [64, 64, 64])
        assert model.conv1.stride == (stride,) * 3


def test_resnet_first_conv_size_is_the_stems_kernel_and_keeps_the_grid():
    x = torch.zeros(1, 1, 64, 64, 64)
    for size in (3, 7):
        model = create_model(ModelConfig(name="resnet3d", variant="10", first_conv_size=size), 1, [64, 64, 64])
        assert model.conv1.kernel_size == (size,) * 3
        assert model.conv1(x).shape[2:] == (32, 32, 32)  # stride 2, padded: the same grid whatever the kernel


def test_vit_patch_must_divide_volume():
    with pytest.raises(CT3DError, match="model.patch_size"):
        create_model(ModelConfig(name="vit3d", variant="tiny", patch_size=16), 1, [40, 32, 32])


def test_unknown_model_is_refused():
    with pytest.raises(CT3DError, match="model.name"):
        create_model(ModelConfig(name="unet"), 1, [32, 32, 32])


@pytest.mark.parametrize("name, variant", [("resnet3d", "10"), ("densenet3d", "121"), ("vit3d", "tiny")])
def test_logits_are_float32_under_bfloat16_autocast_from_a_float32_head(name, variant):
    """Validation logits in bfloat16 tie (8 bits of mantissa): the head runs in float32 on the features autocast
    made, whatever the network; outside autocast nothing changes."""
    from engine.training.models import HEADS

    torch.manual_seed(0)
    net = create_model(ModelConfig(name=name, variant=variant, widen_factor=0.25, patch_size=8), 3, [32, 32, 32])
    net.eval()
    head, seen = net.get_submodule(HEADS[name]), {}
    head.register_forward_pre_hook(lambda _m, args: seen.update(features=args[0]))
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(x)
        assert torch.is_autocast_enabled("cpu")  # the head gave autocast back
    assert logits.dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(logits, head(seen["features"].float()), atol=1e-6)  # float32 math on the features
        assert torch.equal(net(x), net(x)) and net(x).dtype == torch.float32
