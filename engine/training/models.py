"""One factory for the 3D classifiers, all MONAI networks; starting from pretrained weights; training
the head alone for the first epochs."""

from __future__ import annotations

import logging
import threading

import torch
from monai.networks import nets
from torch import nn

from engine.config.schema import ModelConfig
from engine.training.encoders import create_encoder_model
from engine.utils.errors import CT3DError

log = logging.getLogger("ct3d")
HEADS = {"resnet3d": "fc", "densenet3d": "class_layers", "vit3d": "net.classification_head", "merlin": "head",
         "ctfm": "head"}  # output layers

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


def create_model(model: ModelConfig, num_outputs: int, spatial_size: list[int] | tuple[int, ...],
                 encoder: dict | None = None) -> nn.Module:
    """A network that maps (B, in_channels, *spatial_size) to (B, num_outputs) logits, float32 ones under
    autocast too (fp32_head); `encoder`: a checkpoint's record of a pretrained encoder (CT-FM's settings)."""
    return fp32_head(_network(model, num_outputs, spatial_size, encoder), str(model.name))


def _network(model: ModelConfig, num_outputs: int, spatial_size: list[int] | tuple[int, ...],
             encoder: dict | None = None) -> nn.Module:
    if model.name in ("merlin", "ctfm"):
        return create_encoder_model(model, num_outputs, (encoder or {}).get("config"))
    if model.name == "resnet3d":
        net = getattr(nets, f"resnet{model.variant}")(
            spatial_dims=3, n_input_channels=model.in_channels, num_classes=num_outputs,
            conv1_t_size=model.first_conv_size, conv1_t_stride=model.first_conv_stride,
            widen_factor=model.widen_factor,
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


def fp32_head(net: nn.Module, name: str) -> nn.Module:
    """The output layer computes in float32 under autocast, so logits keep float32's resolution: in bfloat16 (8
    bits of mantissa) validation logits tie, and AUC and fitted thresholds move. Hooks, not a wrapper module:
    the state dict's names stay."""
    head = net.get_submodule(HEADS[name])

    local = threading.local()  # per thread: the autocast contexts this head's calls entered, most recent last

    def before(_module, args):
        device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        local.entered = getattr(local, "entered", [])
        local.entered.append(torch.autocast(device, enabled=False))
        local.entered[-1].__enter__()
        return tuple(a.float() if torch.is_tensor(a) else a for a in args)

    def after(_module, _args, output):
        local.entered.pop().__exit__(None, None, None)
        return output

    head.register_forward_pre_hook(before)
    head.register_forward_hook(after, always_call=True)
    return net


def load_pretrained(net: nn.Module, path: str, head: str = "", min_loaded: float = 0.0) -> dict[str, list[str]]:
    """Copies into `net` every tensor of `path` whose name and shape match: a ct3d checkpoint, a plain state
    dict, or one under "state_dict" with DataParallel's "module." prefix (as MedicalNet ships its 3D
    ResNets). Returns and logs what was loaded, skipped (absent here or another shape) and left new. Fewer than
    `min_loaded` of the backbone's tensors (those not under `head`) filled is a CT3DError naming the counts and
    the first names on each side: a file for another network must not start a run from scratch in silence."""
    from monai.networks.utils import copy_model_state

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CT3DError(f"config error: model.pretrained: cannot read {path!r} as weights "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(saved, dict) and isinstance(saved.get(wrapper), dict):
            saved = saved[wrapper]
    tensors = {k.removeprefix("module."): v for k, v in saved.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CT3DError(f"config error: model.pretrained: {path!r} holds no weights")
    _, loaded, _ = copy_model_state(net, tensors, inplace=True)
    report = {"loaded": loaded, "skipped": [k for k in tensors if k not in loaded],
              "new": [k for k in net.state_dict() if k not in loaded]}
    # counted: parameters and running statistics; a file saved without BatchNorm's step counters is whole
    backbone = [k for k in net.state_dict() if not (head and k.startswith(head)) and "num_batches_tracked" not in k]
    filled = [k for k in backbone if k in set(loaded)]
    if len(filled) < min_loaded * len(backbone):
        raise CT3DError(f"config error: model.pretrained: {path} filled {len(filled)} of the {len(backbone)} "
                        f"backbone tensors of this network by name and shape ({len(filled) / len(backbone):.0%}; "
                        f"model.pretrained_min_loaded={min_loaded:g}): it holds weights for another network. "
                        f"Unfilled here{_some([k for k in backbone if k not in set(filled)])}; unused in the file"
                        f"{_some(report['skipped'])}")
    log.info("pretrained %s: %d tensors loaded, %d skipped (absent here or another shape)%s, %d new%s", path,
             len(report["loaded"]), len(report["skipped"]), _some(report["skipped"]), len(report["new"]),
             _some(report["new"]))
    return report


def _some(names: list[str]) -> str:
    return f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else ""


class FreezeBackbone:
    """For the first `epochs` epochs only the head learns: the backbone's parameters get no gradients
    (AdamW then leaves them, weight decay too) and its BatchNorm layers keep their running statistics."""

    def __init__(self, net: nn.Module, model: ModelConfig, epochs: int):
        head = HEADS[str(model.name)]
        self.epochs = epochs
        # each parameter back to what it was after: an encoder's stages that model.train_stages keeps stay frozen
        self.backbone = [(p, p.requires_grad) for n, p in net.named_parameters() if not n.startswith(head)]
        self.norms = [m for n, m in net.named_modules()
                      if not n.startswith(head) and isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.momentum = [m.momentum for m in self.norms]

    def attach(self, trainer) -> None:
        from ignite.engine import Events

        trainer.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, trainer) -> None:
        frozen = trainer.state.epoch <= self.epochs
        for p, trains in self.backbone:
            p.requires_grad_(trains and not frozen)
        for m, momentum in zip(self.norms, self.momentum):
            m.momentum = 0.0 if frozen else momentum
