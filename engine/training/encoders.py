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

import functools
import hashlib
import json
import logging
from pathlib import Path

import torch
from monai.networks.nets import resnet152
from monai.networks.nets.segresnet_ds import SegResEncoder
from safetensors.torch import load_file
from torch import nn

from engine.config.schema import ModelConfig
from engine.training.hub import card_licence, fetch, is_hub_id
from engine.utils.errors import CT3DError

log = logging.getLogger("ct3d")

MERLIN_PREFIX = "encode_image.i3_resnet."
MERLIN_FILE = "i3_resnet_clinical_longformer_best_clip_04-02-2024_23-21-36_epoch_99.pt"
CTFM_FILES = ("config.json", "model.safetensors")
CTFM_CONFIG = {"spatial_dims": 3, "in_channels": 1, "init_filters": 32, "blocks_down": [1, 2, 2, 4, 4]}
HUB_IDS = {"merlin": "stanfordmimi/Merlin", "ctfm": "project-lighter/ct_fm_feature_extractor"}
# the weights' licence where no model card (README.md beside them) says: Merlin's from the LICENSE of its code
# (github.com/StanfordMIMI/Merlin: MIT), CT-FM's as project-lighter's Hugging Face model card gives it (Apache-2.0)
LICENCES = {"merlin": "MIT", "ctfm": "Apache-2.0"}


class MerlinEncoder(nn.Module):
    """(B, 1, x, y, z) -> (B, 2048)."""

    features = 2048

    def __init__(self):
        super().__init__()
        self.i3_resnet = resnet152(spatial_dims=3, n_input_channels=1, conv1_t_size=(3, 7, 7),
                                   conv1_t_stride=(1, 2, 2), bias_downsample=False, feed_forward=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.i3_resnet(x.permute(0, 1, 4, 2, 3))

    def stages(self) -> list[nn.Module]:
        """The residual layers, first to last (the stem trains only with the whole encoder: train_stages 0)."""
        return [self.i3_resnet.layer1, self.i3_resnet.layer2, self.i3_resnet.layer3, self.i3_resnet.layer4]


class CtfmEncoder(nn.Module):
    """(B, 1, *size) -> (B, channels of the last level)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        self.encoder = SegResEncoder(**config)
        self.features = self.width(config)

    @staticmethod
    def width(config: dict) -> int:
        """The embedding's length: SegResEncoder's own defaults where config.json leaves them out (32, 4 levels)."""
        return int(config.get("init_filters", 32)) * 2 ** (len(config.get("blocks_down", (1, 2, 2, 4))) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)[-1].mean(dim=(2, 3, 4))

    def stages(self) -> list[nn.Module]:
        """The levels, first to last (the first convolution trains only with the whole encoder: train_stages 0)."""
        return list(self.encoder.layers)


class EncoderClassifier(nn.Module):
    """A pretrained encoder and a head of ours. `freeze` keeps the encoder as loaded (eval mode: its BatchNorm
    statistics untouched, no gradients); `train_stages` N > 0 does so for all but its last N stages. A frozen
    encoder loaded from a weights file is not saved: the state dict holds the head alone and checkpoints name
    the encoder by its file's SHA-256 (`weights`), which loading verifies."""

    def __init__(self, encoder: nn.Module, outputs: int, head: str, dropout: float, freeze: bool,
                 train_stages: int = 0):
        super().__init__()
        self.encoder, self.frozen = encoder, freeze
        width = encoder.features
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, outputs)) if head == "linear" else \
            nn.Sequential(nn.Linear(width, 512), nn.GELU(), nn.Dropout(dropout), nn.Linear(512, outputs))
        stages = encoder.stages()
        if train_stages > len(stages):
            raise CT3DError(f"config error: model.train_stages: {train_stages}, but this encoder has "
                            f"{len(stages)} stages")
        self.trained = [] if freeze else stages[len(stages) - train_stages:] if train_stages else [encoder]
        encoder.requires_grad_(False)
        for stage in self.trained:
            stage.requires_grad_(True)
        self.weights: dict = {}  # where the encoder's weights came from: file, sha256 (checkpoints record it)

    def train(self, mode: bool = True) -> EncoderClassifier:
        super().train(mode)
        if self.trained != [self.encoder]:  # the rest of the encoder as loaded: its BatchNorm statistics kept
            self.encoder.eval()
            for stage in self.trained:
                stage.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def references_encoder(self) -> bool:
        """Whether the state dict leaves the encoder out (frozen, and its weights from a file on record)."""
        return self.frozen and bool(self.weights.get("sha256"))

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        if self.references_encoder():
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            for key in [k for k in state if k.startswith(prefix + "encoder.")]:
                del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.references_encoder() and not any(k.startswith("encoder.") for k in state_dict):
            head = {k.removeprefix("head."): v for k, v in state_dict.items()}
            return self.head.load_state_dict(head, strict=strict, assign=assign)
        if not self.references_encoder() and state_dict and not any(k.startswith("encoder.") for k in state_dict):
            raise CT3DError("a head-only checkpoint (its frozen encoder named by SHA-256) needs the encoder's "
                            "weights loaded first: give model.weights")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def sha256(path: Path) -> str:
    """The file's SHA-256, read once per process while its size and time stay (a probe asks twice at start-up)."""
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def published_files(name: str) -> tuple[str, ...]:
    """The files of the encoder's hub repository it loads, the weights last."""
    return (MERLIN_FILE,) if name == "merlin" else CTFM_FILES


def weights_file(name: str, weights: str, revision: str = "") -> Path:
    """model.weights as a file: the path itself, the encoder's published file in that folder, or that file in the
    Hugging Face cache's snapshot of a hub id at `revision` (fetched unless offline)."""
    if is_hub_id(weights):
        return fetch(weights, published_files(name), revision).folder / published_files(name)[-1]
    if revision:
        raise CT3DError(f"config error: model.weights_revision: {revision!r} pins a hub commit, but model.weights "
                        f"{weights!r} is a local path: leave model.weights_revision empty")
    path = Path(weights)
    if path.is_dir():
        path = path / (MERLIN_FILE if name == "merlin" else CTFM_FILES[1])
    if not path.is_file():
        published = MERLIN_FILE if name == "merlin" else " and ".join(CTFM_FILES)
        raise CT3DError(f"config error: model.weights: {weights!r} is neither a file nor a folder holding "
                        f"{published}; on a connected machine: hf download {HUB_IDS[name]} --local-dir DIR, then "
                        f"model.weights=DIR (or model.weights={HUB_IDS[name]} with the Hugging Face cache)")
    return path


def ctfm_config(weights: str, revision: str = "") -> dict:
    """CT-FM's SegResEncoder settings: config.json beside its weights (in a hub id's snapshot at `revision`); the
    published ones without weights."""
    if not weights:
        return dict(CTFM_CONFIG)
    folder = weights_file("ctfm", weights, revision).parent
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
        encoder = MerlinEncoder() if name == "merlin" else \
            CtfmEncoder(config or ctfm_config(model.weights, model.weights_revision))
    except (TypeError, ValueError) as exc:  # config.json with keys or values SegResEncoder does not take
        raise CT3DError(f"config error: model.weights: CT-FM's config.json does not describe a SegResEncoder "
                        f"({exc})") from None
    return EncoderClassifier(encoder, outputs, str(model.head), model.dropout, model.freeze, model.train_stages)


def load_weights(net: EncoderClassifier, model: ModelConfig) -> dict:
    """model.weights into `net`'s encoder; returns (and keeps in net.weights) what a checkpoint records: the
    encoder, model.weights as given (`source`), the hub commit (empty for a local path), the file, its SHA-256,
    the weights' licence and CT-FM's network settings."""
    name = str(model.name)
    path = weights_file(name, model.weights, model.weights_revision)
    load_encoder(net.encoder, name, path)
    revision = path.parent.name if is_hub_id(model.weights) else ""  # the cache names a snapshot by its commit
    licence = card_licence(path.parent) or LICENCES[name]
    net.weights = {"encoder": name, "source": model.weights, "revision": revision, "file": str(path),
                   "sha256": sha256(path), "licence": licence,
                   **({"config": net.encoder.config} if name == "ctfm" else {})}
    log.info("%s encoder weights: %s%s (SHA-256 %s...), licence %s", name, model.weights,
             f" at {revision}" if revision else "", net.weights["sha256"][:16], licence)
    return net.weights


def restore_encoder(net: EncoderClassifier, model: ModelConfig, record: dict, weights: str = "") -> None:
    """A head-only checkpoint's encoder: its weights file loaded again (`weights` where given, else where the
    checkpoint's record says it was), which must be the same file by SHA-256."""
    source = weights or record.get("source") or record.get("file", "")
    if not source:
        raise CT3DError("config error: model.weights: the checkpoint names its frozen encoder by SHA-256 only; "
                        "give model.weights (the encoder's weights file or folder)")
    model.weights = source
    # the commit the checkpoint's encoder came from (not the hub's newest); none for a local file given here
    model.weights_revision = record.get("revision", "") if is_hub_id(source) else ""
    loaded = load_weights(net, model)
    if loaded["sha256"] != record.get("sha256"):
        raise CT3DError(f"config error: model.weights: {loaded['file']} has SHA-256 {loaded['sha256'][:16]}..., "
                        f"the checkpoint's head was trained on an encoder of SHA-256 "
                        f"{str(record.get('sha256'))[:16]}... ({record.get('file')}): give that file")


def check_same_encoder(state: dict, net: nn.Module, probe: bool) -> None:
    """A resumed run's encoder must be its checkpoint's (by SHA-256: a head trained on one encoder must not go on
    training on another), and a probe (head on cached embeddings) must stay one, and the other way round (the
    optimizer's state covers the head alone, or the whole network)."""
    if not isinstance(net, EncoderClassifier):
        return
    then, now = (state.get("encoder") or {}).get("sha256"), net.weights.get("sha256")
    if then != now:
        raise CT3DError(f"cannot resume: the checkpoint's encoder has weights of SHA-256 {str(then)[:16]}..., this "
                        f"start's model.weights {str(now)[:16]}...: give the run's weights, or start a new run")
    if "probe" in state and state["probe"] != probe:
        how = "trained its head on cached embeddings" if state["probe"] else "ran the encoder every epoch"
        raise CT3DError(f"cannot resume: the run {how}; this start would not (model.freeze, augment.enabled and "
                        f"cache.embeddings decide): restore them, or start a new run")
