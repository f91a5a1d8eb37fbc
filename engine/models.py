"""One factory for the 3D classifiers, all MONAI networks."""

from __future__ import annotations

import torch
from torch import nn

from engine.errors import CT3DError
from engine.schema import ModelConfig

VIT_SIZES = {  # hidden size, MLP size, layers, heads (the ViT-Ti/S/B shapes)
    "tiny": (192, 768, 12, 3),
    "small": (384, 1536, 12, 6),
    "base": (768, 3072, 12, 12),
}


class _FirstOutput(nn.Module):
    """MONAI's ViT returns (logits, hidden states); the trainer wants the logits alone."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def create_model(model: ModelConfig, num_outputs: int, spatial_size: list[int] | tuple[int, ...]) -> nn.Module:
    """A network that maps (B, in_channels, *spatial_size) to (B, num_outputs) logits."""
    from monai.networks import nets

    if model.name == "resnet3d":
        net = getattr(nets, f"resnet{model.variant}")(
            spatial_dims=3, n_input_channels=model.in_channels, num_classes=num_outputs,
            conv1_t_stride=model.first_conv_stride, widen_factor=model.widen_factor,
        )
        if model.dropout > 0:
            net.fc = nn.Sequential(nn.Dropout(model.dropout), net.fc)
        return net
    if model.name == "densenet3d":
        return getattr(nets, f"DenseNet{model.variant}")(
            spatial_dims=3, in_channels=model.in_channels, out_channels=num_outputs, dropout_prob=model.dropout,
        )
    if model.name == "vit3d":
        hidden, mlp, layers, heads = VIT_SIZES[model.variant]
        bad = [s for s in spatial_size if s % model.patch_size]
        if bad:
            raise CT3DError(f"config error: model.patch_size: {model.patch_size} must divide every "
                            f"preprocess.spatial_size value, got {list(spatial_size)}")
        return _FirstOutput(nets.ViT(
            in_channels=model.in_channels, img_size=tuple(spatial_size), patch_size=model.patch_size,
            hidden_size=hidden, mlp_dim=mlp, num_layers=layers, num_heads=heads, classification=True,
            num_classes=num_outputs, dropout_rate=model.dropout, post_activation=None, spatial_dims=3,
        ))
    raise CT3DError(f"config error: model.name: unknown model {model.name!r}")
