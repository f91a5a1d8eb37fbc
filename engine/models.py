"""One factory for the 3D classifiers, all MONAI networks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.errors import CT3DError

VIT_SIZES = {  # hidden size, MLP size, layers, heads (the ViT-Ti/S/B shapes)
    "tiny": (192, 768, 12, 3),
    "small": (384, 1536, 12, 6),
    "base": (768, 3072, 12, 12),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str = "resnet3d"
    variant: str = "10"
    in_channels: int = 1
    num_outputs: int = 1
    spatial_size: tuple[int, int, int] = (64, 64, 64)
    first_conv_stride: int = 2
    widen_factor: float = 1.0
    patch_size: int = 16
    dropout: float = 0.0


class _FirstOutput(nn.Module):
    """MONAI's ViT returns (logits, hidden states); the trainer wants the logits alone."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]


def create_model(spec: ModelSpec) -> nn.Module:
    """A network that maps (B, in_channels, *spatial_size) to (B, num_outputs) logits."""
    from monai.networks import nets

    if spec.name == "resnet3d":
        net = getattr(nets, f"resnet{spec.variant}")(
            spatial_dims=3, n_input_channels=spec.in_channels, num_classes=spec.num_outputs,
            conv1_t_stride=spec.first_conv_stride, widen_factor=spec.widen_factor,
        )
        if spec.dropout > 0:
            net.fc = nn.Sequential(nn.Dropout(spec.dropout), net.fc)
        return net
    if spec.name == "densenet3d":
        return getattr(nets, f"DenseNet{spec.variant}")(
            spatial_dims=3, in_channels=spec.in_channels, out_channels=spec.num_outputs, dropout_prob=spec.dropout,
        )
    if spec.name == "vit3d":
        hidden, mlp, layers, heads = VIT_SIZES[spec.variant]
        bad = [s for s in spec.spatial_size if s % spec.patch_size]
        if bad:
            raise CT3DError(f"config error: model.patch_size: {spec.patch_size} must divide every "
                            f"preprocess.spatial_size value, got {list(spec.spatial_size)}")
        return _FirstOutput(nets.ViT(
            in_channels=spec.in_channels, img_size=spec.spatial_size, patch_size=spec.patch_size,
            hidden_size=hidden, mlp_dim=mlp, num_layers=layers, num_heads=heads, classification=True,
            num_classes=spec.num_outputs, dropout_rate=spec.dropout, post_activation=None, spatial_dims=3,
        ))
    raise CT3DError(f"config error: model.name: unknown model {spec.name!r}")
