"""Pretrained CT encoders as backbones, built from MONAI's networks (no merlin-vlm or lighter-zoo: both
architectures are plain MONAI networks) and loaded from their published files:

- merlin: Stanford's Merlin image encoder (HF stanfordmimi/Merlin, MIT code): MONAI's 3D ResNet-152 with a
  (3, 7, 7) stem of stride (1, 2, 2), no downsample bias and no classifier, on the volume permuted to (z, x, y)
  as Merlin's I3ResNet does; its 2048-d average-pooled features. The published .pt holds the whole CLIP model:
  the keys under `encode_image.i3_resnet.` are the encoder's, the text side and heads are dropped, and conv1's
  three copies of the grey channel are summed into one (Merlin feeds the volume three times).
- ctfm: CT-FM (HF project-lighter/ct_fm_feature_extractor, Apache-2.0): MONAI's SegResEncoder built from the
  folder's config.json, weights from model.safetensors loaded strictly; the last level's features after global
  average pooling (512-d).

The weights file's SHA-256 is recorded in every checkpoint and summary.json. Loading is strict: a file that does
not fill the encoder is an error naming what is missing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from monai.networks.nets import resnet152
from monai.networks.nets.segresnet_ds import SegResEncoder
from safetensors.torch import load_file
from torch import nn

from engine.config.schema import ModelConfig
from engine.utils.errors import CT3DError

MERLIN_PREFIX = "encode_image.i3_resnet."
MERLIN_FILE = "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"
CTFM_FILES = ("config.json", "model.safetensors")
CTFM_CONFIG = {"spatial_dims": 3, "in_channels": 1, "init_filters": 32, "blocks_down": [1, 2, 2, 4, 4]}


class MerlinEncoder(nn.Module):
    """(B, 1, x, y, z) -> (B, 2048)."""

    features = 2048

    def __init__(self):
        super().__init__()
        self.i3_resnet = resnet152(spatial_dims=3, n_input_channels=1, conv1_t_size=(3, 7, 7),
                                   conv1_t_stride=(1, 2, 2), bias_downsample=False, feed_forward=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.i3_resnet(x.permute(0, 1, 4, 2, 3))


class CtfmEncoder(nn.Module):
    """(B, 1, *size) -> (B, channels of the last level)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.encoder = SegResEncoder(**config)
        # SegResEncoder's own defaults where config.json leaves them out: 32 filters, 4 levels
        self.features = int(config.get("init_filters", 32)) * 2 ** (len(config.get("blocks_down", (1, 2, 2, 4))) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1].mean(dim=(2, 3, 4))


class EncoderClassifier(nn.Module):
    """A pretrained encoder and a head of ours; `freeze` keeps the encoder as loaded (eval mode: its BatchNorm
    statistics untouched, no gradients)."""

    def __init__(self, encoder: nn.Module, outputs: int, head: str, dropout: float, freeze: bool):
        super().__init__()
        self.encoder, self.frozen = encoder, freeze
        width = encoder.features
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, outputs)) if head == "linear" else \
            nn.Sequential(nn.Linear(width, 512), nn.GELU(), nn.Dropout(dropout), nn.Linear(512, outputs))
        if freeze:
            self.encoder.requires_grad_(False)
        self.weights: dict = {}  # where the encoder's weights came from: file, sha256 (checkpoints record it)

    def train(self, mode: bool = True) -> EncoderClassifier:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_file(name: str, weights: str) -> Path:
    """model.weights as a file: the path itself, or the encoder's published file in that folder."""
    path = Path(weights)
    if path.is_dir():
        path = path / (MERLIN_FILE if name == "merlin" else CTFM_FILES[1])
    if not path.is_file():
        published = MERLIN_FILE if name == "merlin" else " and ".join(CTFM_FILES)
        hub = "stanfordmimi/Merlin" if name == "merlin" else "project-lighter/ct_fm_feature_extractor"
        raise CT3DError(f"config error: model.weights: {weights!r} is neither a file nor a folder holding "
                        f"{published}; on a connected machine: hf download {hub} --local-dir DIR, then "
                        f"model.weights=DIR")
    return path


def ctfm_config(weights: str) -> dict:
    """CT-FM's SegResEncoder settings: config.json beside its weights; the published ones without weights."""
    if not weights:
        return dict(CTFM_CONFIG)
    folder = Path(weights) if Path(weights).is_dir() else Path(weights).parent
    try:
        config = json.loads((folder / CTFM_FILES[0]).read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        return config
    except (OSError, ValueError) as exc:
        raise CT3DError(f"config error: model.weights: {folder / CTFM_FILES[0]} (CT-FM's network settings) cannot "
                        f"be read ({exc})") from None


def merlin_state(path: Path) -> dict[str, torch.Tensor]:
    """The encoder's tensors of Merlin's published file, renamed to MerlinEncoder's."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CT3DError(f"config error: model.weights: cannot read {path} as Merlin's weights ({exc})") from None
    saved = saved.get("state_dict", saved) if isinstance(saved, dict) else {}
    heads = tuple(MERLIN_PREFIX + h for h in ("classifier.", "contrastive_head.", "fc."))  # the CLIP model's heads
    state = {"i3_resnet." + k.removeprefix(MERLIN_PREFIX): v for k, v in saved.items()
             if k.startswith(MERLIN_PREFIX) and not k.startswith(heads) and isinstance(v, torch.Tensor)}
    conv1 = "i3_resnet.conv1.weight"
    if conv1 in state and state[conv1].shape[1] == 3:  # three copies of the grey channel in: one, summed
        state[conv1] = state[conv1].sum(dim=1, keepdim=True)
    return state


def load_encoder(encoder: nn.Module, name: str, path: Path) -> None:
    """Loads the published weights at `path` into `encoder`, strictly: a missing or unexpected tensor stops."""
    if name == "merlin":
        state = merlin_state(path)
    else:
        try:
            state = {f"encoder.{k}": v for k, v in load_file(str(path)).items()}
        except Exception as exc:  # safetensors' own error type: a truncated file, or not safetensors at all
            raise CT3DError(f"config error: model.weights: cannot read {path} as CT-FM's model.safetensors "
                            f"({exc})") from None
    own = encoder.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise CT3DError(f"config error: model.weights: {path} does not fit the {name} encoder: "
                        f"{len(own) - len(missing)} of its {len(own)} tensors found"
                        + "".join(f"; {what}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
                                  for what, keys in (("missing", missing), ("not ours", unexpected),
                                                     ("other shapes", shapes)) if keys))
    encoder.load_state_dict(state, strict=True)


def create_encoder_model(model: ModelConfig, outputs: int, config: dict | None = None) -> EncoderClassifier:
    """The encoder named by model.name, randomly initialised, with its head; CT-FM's network settings from
    `config` (a checkpoint's record) or else from model.weights' config.json."""
    name = str(model.name)
    try:
        encoder = MerlinEncoder() if name == "merlin" else CtfmEncoder(config or ctfm_config(model.weights))
    except (TypeError, ValueError) as exc:  # config.json with keys or values SegResEncoder does not take
        raise CT3DError(f"config error: model.weights: CT-FM's config.json does not describe a SegResEncoder "
                        f"({exc})") from None
    return EncoderClassifier(encoder, outputs, str(model.head), model.dropout, model.freeze)


def load_weights(net: EncoderClassifier, model: ModelConfig) -> dict:
    """model.weights into `net`'s encoder; returns (and keeps in net.weights) what a checkpoint records: the
    encoder, the file, its SHA-256 and CT-FM's network settings."""
    name = str(model.name)
    path = weights_file(name, model.weights)
    load_encoder(net.encoder, name, path)
    net.weights = {"encoder": name, "file": str(path), "sha256": sha256(path),
                   **({"config": net.encoder.config} if name == "ctfm" else {})}
    return net.weights
