"""Typed config schema, loaded with OmegaConf from YAML plus `key=value` overrides.

Imports only the standard library and OmegaConf, so `--help` and config errors stay fast.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from engine.errors import CT3DError

TASKS = ("multilabel", "multiclass", "binary")
MODEL_VARIANTS = {
    "resnet3d": ("10", "18", "34", "50"),
    "densenet3d": ("121", "169", "201"),
    "vit3d": ("tiny", "small", "base"),
}
# The key metric picks best.pt and drives early stopping; metrics.mode=auto: min for val_loss, else max.
KEY_METRICS = ("auc_macro", "auc_micro", "fbeta_macro", "fbeta_micro", "accuracy", "val_loss")
SECRET_KEYS = ("api_key", "password", "token", "secret")


@dataclass
class DemoConfig:
    enabled: bool = False  # generate the phantom data set and train on it
    dir: str = ".ct3d/demo"  # where the NIfTI files and datalist.csv are written once
    num_volumes: int = 200
    shape: List[int] = field(default_factory=lambda: [64, 64, 64])  # voxels x, y, z
    seed: int = 0


@dataclass
class DataConfig:
    train: str = ""  # datalist: CSV (CT-RATE style) or MONAI JSON datalist
    val: str = ""  # separate validation datalist; empty: a seeded split of `train`
    val_fraction: float = 0.2
    split_seed: int = 0
    image_root: str = ""  # relative image paths resolve here; empty: the datalist's folder
    layout: str = "flat"  # flat: <root>/<name>; ct-rate: <root>/train_1/train_1_a/<name>
    image_column: str = "VolumeName"  # CSV column (JSON datalists use "image")
    label_columns: List[str] = field(default_factory=list)  # empty: every other CSV column
    task: str = "multilabel"
    num_classes: int = 0  # multiclass only: labels are class indices 0..num_classes-1
    patient_column: str = ""  # CSV column with the patient id; empty: patient_pattern on the volume name
    patient_pattern: str = r"^([A-Za-z]+_\d+)_"  # first group is the patient (CT-RATE: train_123_a_1 -> train_123)
    on_error: str = "raise"  # raise: stop on any bad row or volume; skip: leave them out, listed in the run
    json_train_key: str = "training"
    json_val_key: str = "validation"
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass
class PreprocessConfig:
    orientation: str = "RAS"
    spacing: Optional[List[float]] = None  # mm per voxel (x, y, z); null keeps the source spacing
    hu_window: List[float] = field(default_factory=lambda: [-1000.0, 1000.0])
    scale_range: List[float] = field(default_factory=lambda: [-1.0, 1.0])
    spatial_size: List[int] = field(default_factory=lambda: [64, 64, 64])  # x, y, z after orientation
    resize: str = "resize"  # resize: interpolate to spatial_size; crop_pad: centre crop or pad
    dtype: str = "float16"  # dtype kept in the caches; the model always sees float32


@dataclass
class CacheConfig:
    disk: bool = True  # MONAI PersistentDataset under dir/<hash of preprocess settings>
    dir: str = ".ct3d/cache"
    memory_rate: float = 1.0  # fraction of each split kept in RAM (CacheDataset); 0 disables
    workers: int = 2  # threads that fill the caches


@dataclass
class LoaderConfig:
    batch_size: int = 8
    val_batch_size: int = 0  # 0: same as batch_size
    num_workers: int = 0
    pin_memory: bool = True  # only used when training on CUDA


@dataclass
class ModelConfig:
    name: str = "resnet3d"
    variant: str = ""  # resnet3d: 10/18/34/50, densenet3d: 121/169/201, vit3d: tiny/small/base; empty: the smallest
    in_channels: int = 1
    first_conv_stride: int = 2  # resnet3d: MONAI's default of 1 is ~4x slower on CT volumes
    widen_factor: float = 1.0  # resnet3d channel multiplier
    patch_size: int = 16  # vit3d
    dropout: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    accumulation_steps: int = 1
    amp: str = "auto"  # auto: bf16 on CUDA when supported, else off; bf16 | fp16 | off
    loss: str = "bce"  # bce (with pos_weight) | focal
    pos_weight_cap: float = 10.0  # 0 disables pos_weight
    focal_gamma: float = 2.0
    val_every: int = 1  # validate every N epochs (and always after the last)
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    log_every: int = 10  # iterations between plain log lines when not on a terminal
    resume: str = "auto"  # auto: continue from the run folder's latest checkpoint if any; off; or a path
    early_stopping_patience: int = 0  # validations without improvement before stopping; 0 disables
    early_stopping_min_delta: float = 0.0


@dataclass
class AugmentConfig:
    """Random transforms applied per sample on the training device, after the caches."""

    enabled: bool = True
    flip_prob: float = 0.5  # per spatial axis
    affine_prob: float = 0.3
    rotate_degrees: List[float] = field(default_factory=lambda: [5.0, 5.0, 15.0])  # about x, y, z
    scale_range: List[float] = field(default_factory=lambda: [0.9, 1.1])
    smooth_prob: float = 0.1
    contrast_prob: float = 0.2
    noise_prob: float = 0.2
    noise_std: float = 0.02  # in scaled intensity units
    shift_prob: float = 0.2
    shift: float = 0.05


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline (no network), online (key from WANDB_API_KEY), disabled
    project: str = "ct3d"
    entity: str = ""
    tags: List[str] = field(default_factory=list)


@dataclass
class TrackingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class MetricsConfig:
    key: str = "auc_macro"
    mode: str = "auto"  # max | min | auto (min for val_loss)
    threshold: float = 0.5
    beta: float = 1.0


@dataclass
class OutputConfig:
    dir: str = "runs"
    name: str = ""  # empty: <model>-<variant>-<start time>


@dataclass
class VolumeClaimConfig:
    name: str = ""  # claim name; empty: <job name>-<role>
    existing: bool = False  # true: mount a claim that already exists, render none
    size: str = "100Gi"
    access_mode: str = "ReadWriteMany"  # several pods (nodes) share it; ReadWriteOnce for one node


@dataclass
class K8sConfig:
    """`python -m k8s render` turns this section (and the rest of the config) into Kubernetes objects."""

    name: str = "ct3d-train"  # Job name (DNS-1123 label); also the run folder name on the output claim
    namespace: str = "default"
    image: str = "ghcr.io/ct3d/ct3d:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    nodes: int = 1  # pods; more than 1: an Indexed Job, torchrun rendezvous at pod 0
    gpus: int = 1  # GPUs per pod, also torchrun's --nproc-per-node
    cpu: str = "8"
    memory: str = "64Gi"
    shm_size: str = "16Gi"  # memory-backed /dev/shm for DataLoader workers
    node_selector: Dict[str, str] = field(default_factory=dict)
    tolerations: List[Dict[str, str]] = field(default_factory=list)
    storage_class: str = ""  # empty: the cluster's default
    cache: VolumeClaimConfig = field(default_factory=lambda: VolumeClaimConfig(size="500Gi"))
    output: VolumeClaimConfig = field(default_factory=lambda: VolumeClaimConfig(size="50Gi"))
    data_claim: str = ""  # an existing claim holding the data set, mounted read-only at /data
    wandb_secret: str = "wandb"  # Secret with key `api-key`; optional: the job runs without it
    backoff_limit: int = 3  # pod failures (not node disruptions) before the Job fails
    active_deadline_seconds: int = 0  # 0: no deadline
    ttl_seconds_after_finished: int = 604800
    run_as_user: int = 1000
    master_port: int = 29500


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)
    checkpoint: str = ""  # evaluate / predict: the checkpoint to load
    input: str = ""  # predict: a datalist, one volume, or a folder of volumes


CHOICES = {
    "data.task": TASKS,
    "data.layout": ("flat", "ct-rate"),
    "data.on_error": ("raise", "skip"),
    "model.name": tuple(MODEL_VARIANTS),
    "preprocess.resize": ("resize", "crop_pad"),
    "preprocess.dtype": ("float16", "float32"),
    "train.amp": ("auto", "bf16", "fp16", "off"),
    "train.loss": ("bce", "focal"),
    "metrics.key": KEY_METRICS,
    "metrics.mode": ("auto", "max", "min"),
    "tracking.wandb.mode": ("offline", "online", "disabled"),
}


def _error(key: str, message: str) -> CT3DError:
    return CT3DError(f"config error: {key}: {message}")


def _section_keys(node: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []


def _accepted_keys(full_key: str) -> str:
    """The keys valid beside `full_key`, for the error message."""
    node: Any = Config
    for part in full_key.split(".")[:-1]:
        fields = {f.name: f for f in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
        if part not in fields:
            break
        node = fields[part].type if not isinstance(fields[part].type, str) else globals().get(fields[part].type)
    keys = _section_keys(node)
    return ", ".join(keys) if keys else "no such section"


def _translate(exc: OmegaConfBaseException) -> CT3DError:
    full_key = getattr(exc, "full_key", "") or "?"
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "not in" in first_line or "Key '" in first_line and "not" in first_line:
        return _error(full_key, f"unknown key; accepted here: {_accepted_keys(full_key)}")
    return _error(full_key, first_line)


def _check(cfg: DictConfig, command: str) -> None:
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise _error(key, f"{value!r} is not one of: {', '.join(choices)}")
    name = cfg.model.name
    if not cfg.model.variant:
        cfg.model.variant = MODEL_VARIANTS[name][0]
    variant = str(cfg.model.variant)
    if variant not in MODEL_VARIANTS[name]:
        raise _error("model.variant", f"{variant!r} is not one of {name}'s: {', '.join(MODEL_VARIANTS[name])}")
    positive_ints = ("train.epochs", "train.accumulation_steps", "train.val_every", "loader.batch_size",
                     "model.in_channels", "model.first_conv_stride", "model.patch_size", "train.log_every")
    for key in positive_ints:
        if OmegaConf.select(cfg, key) < 1:
            raise _error(key, f"must be >= 1, got {OmegaConf.select(cfg, key)}")
    for key in ("loader.num_workers", "loader.val_batch_size", "cache.workers", "train.threads",
                "train.early_stopping_patience"):
        if OmegaConf.select(cfg, key) < 0:
            raise _error(key, f"must be >= 0, got {OmegaConf.select(cfg, key)}")
    for key in ("cache.memory_rate", "data.val_fraction", "metrics.threshold", "augment.flip_prob",
                "augment.affine_prob", "augment.smooth_prob", "augment.contrast_prob", "augment.noise_prob",
                "augment.shift_prob"):
        if not 0.0 <= OmegaConf.select(cfg, key) <= 1.0:
            raise _error(key, f"must be between 0 and 1, got {OmegaConf.select(cfg, key)}")
    for key, length in (("preprocess.hu_window", 2), ("preprocess.scale_range", 2),
                        ("preprocess.spatial_size", 3), ("data.demo.shape", 3), ("augment.rotate_degrees", 3),
                        ("augment.scale_range", 2)):
        if len(OmegaConf.select(cfg, key)) != length:
            raise _error(key, f"needs {length} values, got {list(OmegaConf.select(cfg, key))}")
    if cfg.preprocess.spacing is not None and (len(cfg.preprocess.spacing) != 3 or min(cfg.preprocess.spacing) <= 0):
        raise _error("preprocess.spacing", "needs 3 positive values (mm for x, y, z) or null")
    if min(cfg.preprocess.spatial_size) < 1:
        raise _error("preprocess.spatial_size", "every size must be >= 1")
    if cfg.preprocess.hu_window[0] >= cfg.preprocess.hu_window[1]:
        raise _error("preprocess.hu_window", "needs [low, high] with low < high")
    if cfg.data.task == "multiclass" and cfg.data.num_classes < 2:
        raise _error("data.num_classes", "multiclass needs num_classes >= 2")
    if cfg.data.task == "binary" and len(cfg.data.label_columns) > 1:
        raise _error("data.label_columns", "binary takes one label column")
    if str(cfg.train.resume).lower() in ("false", "off", "no", "none", ""):  # YAML reads `off` as false
        cfg.train.resume = "off"
    elif str(cfg.train.resume).lower() == "true":
        cfg.train.resume = "auto"
    if cfg.metrics.mode == "auto":
        cfg.metrics.mode = "min" if cfg.metrics.key == "val_loss" else "max"
    if cfg.metrics.beta <= 0:
        raise _error("metrics.beta", f"must be > 0, got {cfg.metrics.beta}")
    try:
        re.compile(cfg.data.patient_pattern)
    except re.error as exc:
        raise _error("data.patient_pattern", f"not a regular expression ({exc})") from None
    if command != "predict" and not (cfg.data.train or cfg.data.demo.enabled):
        raise _error("data.train", "no datalist: set data.train=PATH or data.demo.enabled=true")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                command: str = "train") -> DictConfig:
    """Schema <- YAML file <- `key=value` overrides, checked for `command`; raises CT3DError naming the key."""
    cfg = OmegaConf.structured(Config)
    try:
        if path is not None:
            if not Path(path).is_file():
                raise CT3DError(f"config error: --config {path}: no such file")
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise CT3DError(f"config error: {item!r}: overrides are key=value (e.g. train.epochs=3)")
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise _translate(exc) from None
    _check(cfg, command)
    if command in ("evaluate", "predict") and not cfg.checkpoint:
        raise _error("checkpoint", f"{command} needs checkpoint=PATH (e.g. runs/<run>/checkpoints/best.pt)")
    if command == "predict" and not cfg.input:
        raise _error("input", "predict needs input=PATH: a datalist, one volume, or a folder of volumes")
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, with any secret-looking value blanked."""
    plain = OmegaConf.to_container(cfg, resolve=True)

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: ("<redacted>" if any(s in str(k).lower() for s in SECRET_KEYS) and v else scrub(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return OmegaConf.to_yaml(OmegaConf.create(scrub(plain)))


def describe_sections() -> str:
    """One line per section with its keys, for `--help`."""
    lines = []
    for f in dataclasses.fields(Config):
        node = f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
        keys = _section_keys(node)
        lines.append(f"  {f.name:<11} {', '.join(keys)}" if keys else f"  {f.name:<11} (top-level value)")
    return "\n".join(lines)

