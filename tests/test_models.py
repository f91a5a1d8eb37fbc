import pytest
import torch

from engine.errors import CT3DError
from engine.models import ModelSpec, create_model


@pytest.mark.parametrize("name,variant", [("resnet3d", "10"), ("resnet3d", "50"), ("densenet3d", "121"),
                                          ("vit3d", "tiny")])
def test_factory_maps_volume_to_logits(name, variant):
    spec = ModelSpec(name=name, variant=variant, num_outputs=5, spatial_size=(32, 32, 32), widen_factor=0.25)
    model = create_model(spec).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 32, 32, 32))
    assert out.shape == (2, 5)


def test_vit_head_has_no_tanh():
    model = create_model(ModelSpec(name="vit3d", variant="tiny", num_outputs=3, spatial_size=(32, 32, 32)))
    assert not any(isinstance(m, torch.nn.Tanh) for m in model.modules())


def test_resnet_first_conv_stride_is_exposed():
    for stride in (1, 2):
        model = create_model(ModelSpec(name="resnet3d", variant="18", first_conv_stride=stride))
        assert model.conv1.stride == (stride,) * 3


def test_vit_patch_must_divide_volume():
    with pytest.raises(CT3DError, match="model.patch_size"):
        create_model(ModelSpec(name="vit3d", variant="tiny", spatial_size=(40, 32, 32), patch_size=16))


def test_unknown_model_is_refused():
    with pytest.raises(CT3DError, match="model.name"):
        create_model(ModelSpec(name="unet"))
