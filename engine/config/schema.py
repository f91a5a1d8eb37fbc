"""The config schema: every setting declared once, here, with its default, its limits beside it and
its meaning in a comment. Choices are Enums, which OmegaConf validates itself; code takes the section
objects (`cfg.augment`, `cfg.preprocess`, ...) as they are, so no setting is copied into a second
class. `engine/config.py` loads and checks a config against it. Standard library only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from engine.config.cluster import K8sConfig
from engine.config.fields import PROBABILITY, choice, setting
from engine.config.scoring import InferConfig, MetricsConfig, ReportConfig, SweepConfig

Task = choice("Task", "multilabel", "multiclass", "binary")
Layout = choice("Layout", "flat", "ct-rate")
OnError = choice("OnError", "raise", "skip")
Resize = choice("Resize", "resize", "crop_pad")
Dtype = choice("Dtype", "float16", "float32")
ModelName = choice("ModelName", "resnet3d", "densenet3d", "vit3d", "merlin", "ctfm")
Head = choice("Head", "linear", "mlp")
Switch = choice("Switch", "auto", "on", "off")
Amp = choice("Amp", "auto", "bf16", "fp16", "off")
Loss = choice("Loss", "bce", "focal")
WandbMode = choice("WandbMode", "offline", "online", "disabled")
ExportFormat = choice("ExportFormat", "onnx", "torchscript")

MODEL_VARIANTS = {"resnet3d": ("10", "18", "34", "50"), "densenet3d": ("121", "169", "201"),
                  "vit3d": ("tiny", "small", "base"), "merlin": ("resnet152",), "ctfm": ("segresencoder",)}
# What each pretrained CT encoder was trained on (encoders.py builds them): preprocess keys and their values. A
# config that differs is refused (model.preprocess_check=false allows it, and the run records that).
ENCODER_PREPROCESSING = {
    "merlin": {"orientation": "RAS", "spacing": [1.5, 1.5, 3.0], "hu_window": [-1000.0, 1000.0],
               "scale_range": [0.0, 1.0], "spatial_size": [224, 224, 160], "resize": "crop_pad",
               "anti_aliasing": False},
    "ctfm": {"orientation": "SPL", "spacing": [1.0, 1.0, 1.0], "hu_window": [-1024.0, 2048.0],
             "scale_range": [0.0, 1.0], "spatial_size": [320, 320, 320], "resize": "crop_pad",
             "anti_aliasing": False},
}


@dataclass
class DemoConfig:
    enabled: bool = False  # generate the phantom data set and train on it
    dir: str = ".ct3d/demo"  # where the NIfTI files and datalist.csv are written once
    num_volumes: int = setting(200, ge=4)  # phantoms to generate
    shape: List[int] = setting([64, 64, 64], length=3, ge=8)  # voxels x, y, z
    seed: int = 0  # seeds the phantoms' anatomy, findings and labels
    # Label columns to write: [] for the four findings the phantoms show; any other name (all four must be in
    # the list) gets a random label with no evidence in the image, e.g. CT-RATE's 18 for a CT-RATE-shaped task.
    labels: List[str] = setting([])


@dataclass
class DataConfig:
    train: str = ""  # datalist: CSV (CT-RATE style) or MONAI JSON datalist
    val: str = ""  # separate validation datalist; empty: a seeded split of `train`
    # share of data.train's patients validated on when data.val is empty
    val_fraction: float = setting(0.2, **PROBABILITY)
    # held-out test set, never looked at in training, scored once at the end (the figures to publish): a datalist
    # (CSV, or a JSON datalist's "test" list), or a fraction of data.train's patients (test_fraction)
    test: str = ""
    # share of data.train's patients held out as the test set (with data.test empty)
    test_fraction: float = setting(0.0, ge=0.0, le=0.9)
    split_seed: int = 0  # a patient's side depends on (patient id, split_seed) alone: new rows move no one
    stratify: bool = False  # move a few patients so each label has positives on both sides where it can
    folds: int = setting(0, ge=0)  # K > 1: patient-wise cross-validation folds (val_fraction unused); 0: one split
    fold: int = setting(0, ge=0)  # with folds: the fold validated on, 0..folds-1 (`cv` runs them all)
    image_root: str = ""  # relative image paths resolve here; empty: the datalist's folder
    layout: Layout = Layout.flat  # flat: <root>/<name>; ct-rate: <root>/train/train_1/train_1_a/<name>
    image_column: str = "VolumeName"  # CSV column (JSON datalists use "image")
    label_columns: List[str] = setting([])  # empty: every other CSV column
    task: Task = Task.multilabel  # multilabel: 0/1 per label column; binary: one column; multiclass: one class index
    num_classes: int = setting(0, ge=0)  # multiclass only: labels are class indices 0..num_classes-1
    patient_column: str = ""  # CSV column with the patient id; empty: patient_pattern on the volume name
    patient_pattern: str = r"^([A-Za-z]+_\d+)_"  # first group is the patient (CT-RATE: train_123_a_1 -> train_123)
    on_error: OnError = OnError["raise"]  # raise: stop on any bad row or volume; skip: leave them out, listed
    json_train_key: str = "training"  # JSON datalist: the list trained on
    json_val_key: str = "validation"  # JSON datalist: the list validated on (if present)
    # CSVs per volume (CT-RATE's metadata: VolumeName, RescaleSlope, RescaleIntercept, XYSpacing, ZSpacing), e.g.
    # the training and the validation file (one path also works): a volume's row is looked up in all of them.
    # Applied before the HU window. Only for data stored as raw scanner values (CT-RATE's first release).
    metadata: List[str] = setting([])
    demo: DemoConfig = setting(DemoConfig())


@dataclass
class PreprocessConfig:
    """Deterministic preprocessing; every field is part of the disk cache's key."""

    orientation: str = "RAS"  # axis codes the volume is reoriented to (MONAI Orientationd)
    spacing: Optional[List[float]] = setting(None, length=3, gt=0)  # mm per voxel (x, y, z); null keeps the source's
    hu_window: List[float] = setting([-1000.0, 1000.0], length=2)  # Hounsfield units clipped to [low, high]
    scale_range: List[float] = setting([-1.0, 1.0], length=2)  # the HU window maps linearly onto [low, high]
    spatial_size: List[int] = setting([64, 64, 64], length=3, ge=1)  # x, y, z after orientation
    resize: Resize = Resize.resize  # resize: interpolate to spatial_size; crop_pad: centre crop or pad
    anti_aliasing: bool = True  # Gaussian before shrinking an axis (spacing and resize) to the new voxel's width
    # with a window reaching air (hu_window starts at or below -900): the volume's air must sit near -1000 HU, which
    # stops raw scanner values and a double rescale; false for volumes with no air in view
    air_check: bool = True
    dtype: Dtype = Dtype.float16  # dtype kept in the caches; the model always sees float32


@dataclass
class CacheConfig:
    disk: bool = True  # MONAI PersistentDataset under dir/<hash of preprocess settings>
    dir: str = ".ct3d/cache"  # the disk cache's root (a persistent volume on Kubernetes)
    memory_rate: float = setting(1.0, **PROBABILITY)  # fraction of each split kept in RAM (CacheDataset); 0: off
    workers: int = setting(2, ge=0)  # threads that fill the caches
    # a frozen merlin / ctfm encoder, augment off: run once per volume, its head trained on dir/embeddings
    embeddings: bool = True
    embedding_dtype: Dtype = Dtype.float16  # how cached embeddings are stored (float32: bit-equal to the encoder's)


@dataclass
class LoaderConfig:
    batch_size: int = setting(8, ge=1)  # volumes per training step and rank
    val_batch_size: int = setting(0, ge=0)  # 0: same as batch_size
    # null: none when the RAM cache holds any of this rank's share (a thread collates batches, MONAI's
    # ThreadDataLoader; threads read what RAM lacks), else worker processes (up to 4 per rank) read the disk cache
    num_workers: Optional[int] = setting(None, ge=0)
    pin_memory: bool = True  # only used when training on CUDA


@dataclass
class ModelConfig:
    # MONAI network: resnet3d, densenet3d, vit3d; or a pretrained CT encoder with a head: merlin (Stanford's Merlin
    # image encoder, a 3D ResNet-152, 2048-d), ctfm (CT-FM's SegResEncoder, 512-d), weights from model.weights
    name: ModelName = ModelName.resnet3d
    variant: str = ""  # resnet3d: 10/18/34/50, densenet3d: 121/169/201, vit3d: tiny/small/base; empty: the smallest
    in_channels: int = setting(1, ge=1)  # input channels (1 for CT)
    first_conv_stride: int = setting(2, ge=1)  # resnet3d: the stem's stride (MONAI's 1 is ~4x slower on CT volumes)
    first_conv_size: int = setting(7, ge=1)  # resnet3d: the stem's kernel (MONAI's 7, as pretrained MedicalNet's)
    widen_factor: float = setting(1.0, gt=0)  # resnet3d channel multiplier
    patch_size: int = setting(16, ge=1)  # vit3d: a patch's edge in voxels
    dropout: float = setting(0.0, ge=0.0, le=0.99)  # dropout before the classifier
    pretrained: str = ""  # weights to start from: a ct3d checkpoint or a state dict (e.g. MedicalNet's)
    # the share of the backbone's tensors (all but the head) model.pretrained must fill by name and shape; fewer is
    # an error naming the counts (a file for another network would otherwise train from scratch, silently)
    pretrained_min_loaded: float = setting(0.9, **PROBABILITY)
    # merlin / ctfm: the encoder's weights as published: a file (Merlin's .pt; CT-FM's model.safetensors beside its
    # config.json), the folder holding them, or a Hugging Face hub id (stanfordmimi/Merlin,
    # project-lighter/ct_fm_feature_extractor: from the HF cache, offline with HF_HUB_OFFLINE=1); empty: random
    # weights (tests, smoke runs). Its SHA-256, hub commit and licence are recorded
    weights: str = ""
    # merlin / ctfm: refuse a preprocess section other than the encoder was trained on (false: allow, recorded)
    preprocess_check: bool = True
    freeze: bool = False  # merlin / ctfm: the encoder stays as loaded (eval mode, no gradients): a probe of its head
    head: Head = Head.linear  # merlin / ctfm: linear, or mlp (one hidden layer of 512, GELU, dropout)
    weights_revision: str = ""  # model.weights a hub id: its commit, branch or tag (empty: main); commit recorded
    train_stages: int = setting(0, ge=0)  # merlin / ctfm unfrozen: train the last N stages, the rest as loaded; 0: all
    encoder_lr: float = setting(0.0, ge=0)  # merlin / ctfm: the encoder's learning rate where it trains; 0: the head's
    channels_last: Switch = Switch.auto  # 3D conv weights channels-last; auto: on CPUs (oneDNN: 11-15% faster)


@dataclass
class TrainConfig:
    epochs: int = setting(10, ge=1)  # training epochs (raise it to extend a resumed run)
    lr: float = setting(1e-3, gt=0)  # peak learning rate of AdamW (linear warmup, then cosine decay)
    weight_decay: float = setting(1e-4, ge=0)  # AdamW weight decay
    warmup_epochs: float = setting(1.0, ge=0)  # epochs of linear learning-rate warmup
    accumulation_steps: int = setting(1, ge=1)  # batches whose gradients are summed per optimizer step
    amp: Amp = Amp.auto  # auto: bf16 on CUDA when supported, else off
    loss: Loss = Loss.bce  # bce (with pos_weight; cross entropy for multiclass) | focal
    pos_weight_cap: float = setting(10.0, ge=0)  # 0 disables pos_weight
    focal_gamma: float = setting(2.0, ge=0)  # loss=focal: the focusing exponent
    val_every: int = setting(1, ge=1)  # validate every N epochs (and always after the last)
    seed: int = 0  # seeds weights, shuffling and augmentation (per rank: seed and rank)
    deterministic: bool = False  # deterministic kernels where they exist (slower; cuDNN autotuning off)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = setting(0, ge=0)  # torch intra-op threads; 0 keeps torch's default
    log_every: int = setting(10, ge=1)  # iterations between plain log lines when not on a terminal
    resume: str = "auto"  # auto: continue from the run folder's latest checkpoint if any; off; or a path
    early_stopping_patience: int = setting(0, ge=0)  # validations without improvement before stopping; 0: off
    early_stopping_min_delta: float = setting(0.0, ge=0)  # smallest change of metrics.key that counts as improvement
    dist_timeout_minutes: float = setting(30.0, gt=0)  # torchrun: how long a rank waits in a collective
    checkpoint_minutes: float = setting(10.0, ge=0)  # also write last.pt mid-epoch this often; 0: epoch ends only
    sync_bn: bool = False  # torchrun on GPUs: BatchNorm statistics over every rank's batch (2-4 volumes per GPU)
    freeze_epochs: int = setting(0, ge=0)  # train the head alone (backbone and its BatchNorm statistics frozen)
    compile: bool = False  # torch.compile the trained network (MONAI's trainer does it; needs a C compiler)


@dataclass
class AugmentConfig:
    """Random transforms applied per sample on the training device, after the caches."""

    enabled: bool = True  # augment training volumes at all
    flip_prob: float = setting(0.5, **PROBABILITY)  # per spatial axis
    affine_prob: float = setting(0.3, **PROBABILITY)  # chance of a random rotation and scaling
    rotate_degrees: List[float] = setting([5.0, 5.0, 15.0], length=3, ge=0)  # about x, y, z
    scale_range: List[float] = setting([0.9, 1.1], length=2, gt=0)  # the affine's zoom range
    smooth_prob: float = setting(0.1, **PROBABILITY)  # chance of a Gaussian blur
    contrast_prob: float = setting(0.2, **PROBABILITY)  # chance of a random gamma contrast change
    noise_prob: float = setting(0.2, **PROBABILITY)  # chance of added Gaussian noise
    noise_std: float = setting(0.02, ge=0)  # in scaled intensity units
    shift_prob: float = setting(0.2, **PROBABILITY)  # chance of an intensity shift
    shift: float = setting(0.05, ge=0)  # largest intensity shift, in scaled intensity units


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline  # offline (no network), online (key from WANDB_API_KEY), disabled
    project: str = "ct3d"  # W&B project
    entity: str = ""  # W&B team or user; empty: the key's default
    tags: List[str] = setting([])  # W&B run tags
    # upload a weights-only copy of best.pt (no per-volume outputs) as a W&B artifact
    upload_checkpoint: bool = False


@dataclass
class TrackingConfig:
    wandb: WandbConfig = setting(WandbConfig())


@dataclass
class OutputConfig:
    dir: str = "runs"  # where run folders are written
    name: str = ""  # empty: <model><variant>-<start time>


@dataclass
class Config:
    data: DataConfig = setting(DataConfig())
    preprocess: PreprocessConfig = setting(PreprocessConfig())
    cache: CacheConfig = setting(CacheConfig())
    loader: LoaderConfig = setting(LoaderConfig())
    model: ModelConfig = setting(ModelConfig())
    train: TrainConfig = setting(TrainConfig())
    augment: AugmentConfig = setting(AugmentConfig())
    tracking: TrackingConfig = setting(TrackingConfig())
    metrics: MetricsConfig = setting(MetricsConfig())
    report: ReportConfig = setting(ReportConfig())
    infer: InferConfig = setting(InferConfig())
    sweep: SweepConfig = setting(SweepConfig())
    output: OutputConfig = setting(OutputConfig())
    k8s: K8sConfig = setting(K8sConfig())
    checkpoint: str = ""  # evaluate / predict / export: the checkpoint to load
    # predict: an ensemble (probabilities averaged); give checkpoint= several times, or checkpoints=GLOB
    checkpoints: List[str] = setting([])
    input: str = ""  # predict: a datalist, one volume, or a folder of volumes
    saliency: bool = False  # predict: also write a Grad-CAM heat map per volume (NIfTI, in the input's space)
    format: ExportFormat = ExportFormat.onnx  # export: onnx (onnxruntime and others) or torchscript
