"""Builders: each turns a config section into one part of a run (device, precision, loss, network,
optimizer and schedule, MONAI trainer and evaluator, run folder); each rank's data and loaders are in
loaders.py. The wiring in workflow.py calls them."""

from __future__ import annotations

import logging
import os
import sys
from datetime import datetime
from pathlib import Path

import torch

from engine.config.loading import plain
from engine.config.schema import MetricsConfig, ModelConfig, OutputConfig, TrainConfig
from engine.data.items import IMAGE, LABEL
from engine.training.encoders import load_weights
from engine.training.handlers import ValidationMetrics
from engine.training.models import HEADS, create_model, load_pretrained
from engine.training.preemption import steps_optimizer
from engine.utils.errors import CT3DError, NodeFault
from engine.utils.machine import available_cpus

log = logging.getLogger("ct3d")
EXPECT_GPU = "CT3D_EXPECT_GPU"  # "1" where the manifest requested GPUs for this pod


def setup_logging(main: bool = True) -> None:
    """INFO lines on rank 0; other ranks only warn, but for the `ct3d.ranks` lines (where a rank waits)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    log.setLevel(logging.INFO if main else logging.WARNING)
    logging.getLogger("ct3d.ranks").setLevel(logging.INFO)  # the few lines every rank's (pod's) log needs
    for noisy in ("ignite", "monai"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def setup_torch(train: TrainConfig, rank: int = 0) -> None:
    """Threads; seeds from (seed, rank), so ranks draw different dropout masks; cuDNN autotuning for speed,
    or with train.deterministic deterministic kernels where they exist: on CUDA, ops that have none (3D
    max-pool backward, for one) warn instead of stopping the run."""

    from monai.utils import set_determinism

    if train.threads:
        torch.set_num_threads(train.threads)
    elif available_cpus() < torch.get_num_threads():  # a pod's CPU quota, which torch's default does not see
        torch.set_num_threads(available_cpus())
    set_determinism(seed=train.seed + 1_000_003 * rank)  # also pins cuDNN to deterministic: set below
    torch.backends.cudnn.deterministic = train.deterministic
    torch.backends.cudnn.benchmark = not train.deterministic
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it
    torch.use_deterministic_algorithms(train.deterministic, warn_only=True)


def use_every_cpu() -> None:
    """Rank 0's closing work alone, after the others left: each rank ran with its share of the CPUs (torchrun's
    OMP_NUM_THREADS=1, or the pod's CPU per GPU the manifests set); now the bootstrap and Grad-CAM may use every CPU
    this process may run on."""
    cpus = available_cpus()
    if cpus > torch.get_num_threads():
        torch.set_num_threads(cpus)
        log.info("closing work on rank 0 alone: %d CPU threads", cpus)


def resolve_device(name: str) -> torch.device:
    """The training device. Where the pod asked for a GPU (CT3D_EXPECT_GPU=1, set by the manifests) and CUDA is
    not there, the node is at fault, not the config: NodeFault (exit 151, retried), naming the node; under
    torchrun this rank would otherwise pick gloo while the others pick NCCL and the group would hang."""
    available = torch.cuda.is_available()
    if not available and (name.startswith("cuda") or name == "auto") and os.environ.get(EXPECT_GPU) == "1":
        raise NodeFault(f"node {os.environ.get('NODE_NAME', '(NODE_NAME not set)')}: the pod asked for a GPU but "
                        f"CUDA is not available here (driver or device plugin fault?); retry on another node")
    if name == "auto":
        return torch.device("cuda" if available else "cpu")
    if name.startswith("cuda") and not available:
        raise CT3DError(f"config error: train.device: {name!r} asked for, but no CUDA device is available")
    return torch.device(name)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full precision. Mixed precision runs on CUDA only."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def prepare_batch(batch, device=None, non_blocking=False, **kwargs):
    """Cache dtype (float16 by default, half the RAM and disk) to float32 on the device."""
    image = batch[IMAGE].to(device, non_blocking=non_blocking).float()
    return image, batch[LABEL].to(device, non_blocking=non_blocking).float()


def make_inferer(device: torch.device, amp_dtype: torch.dtype | None):
    """bf16 autocast around the forward pass. MONAI's own `amp` flag always adds a GradScaler,
    which bf16 does not need, so only fp16 goes through it."""
    from monai.inferers import SimpleInferer

    if amp_dtype != torch.bfloat16:
        return SimpleInferer()

    class AutocastInferer(SimpleInferer):
        def __call__(self, inputs, network, *args, **kwargs):
            with torch.autocast(device.type, dtype=amp_dtype):
                return network(inputs, *args, **kwargs)

    return AutocastInferer()


def _amp_arguments(amp_dtype: torch.dtype | None) -> dict:
    fp16 = amp_dtype == torch.float16
    return {"amp": fp16, "amp_kwargs": {"dtype": torch.float16} if fp16 else None}


def make_loss(train: TrainConfig, task: str, frequencies: list[float]) -> torch.nn.Module:
    """BCE with logits and a capped pos_weight, cross entropy for multiclass, or focal loss."""
    if train.loss == "focal":
        from monai.losses import FocalLoss

        return FocalLoss(gamma=train.focal_gamma, use_softmax=task == "multiclass")
    if task == "multiclass":
        return torch.nn.CrossEntropyLoss()
    cap = train.pos_weight_cap
    if cap <= 0:
        return torch.nn.BCEWithLogitsLoss()
    pos_weight = [min(cap, (1 - f) / f) if f > 0 else cap for f in frequencies]
    return torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))


def make_network(model: ModelConfig, outputs: int, spatial_size: list[int], device: torch.device) -> torch.nn.Module:
    """MONAI's network for `model`, started from `model.pretrained` when given (a resumed run's checkpoint
    then overrides it), on `device`."""
    net = create_model(model, outputs, spatial_size)
    if model.weights and model.name in ("merlin", "ctfm"):
        load_weights(net, model)
    if model.pretrained:
        load_pretrained(net, model.pretrained, HEADS[str(model.name)], model.pretrained_min_loaded)
    return to_device(net, device, str(model.channels_last))


def check_checkpoint_space(model: ModelConfig, spatial_size: list[int], output_dir: str) -> None:
    """Room in output.dir for a checkpoint of this network (weights and AdamW's two moments, float32) while the
    previous one is kept (written beside it, then renamed): refused before any volume is read, not hours in.
    The network is built on the meta device: no memory, no time."""
    import shutil

    with torch.device("meta"):
        params = sum(p.numel() for p in create_model(model, 1, spatial_size).parameters())
    need, folder = 3 * 4 * params, Path(output_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < 2 * need:
        raise CT3DError(f"output.dir: {output_dir} has {free / 2**30:.2f} GiB free; a checkpoint of this "
                        f"{model.name} ({params / 1e6:.1f} M parameters, with AdamW's state) takes "
                        f"{need / 2**30:.2f} GiB and one is written beside the last: free space or use another folder")


def encoder_record(net: torch.nn.Module) -> dict:
    """{"encoder": where a pretrained encoder's weights came from (file, SHA-256)} for summary.json; {} else."""
    record = getattr(net, "weights", None)
    return {"encoder": record} if record else {}


def checkpoint_meta(labels: list[str], task: str, model: ModelConfig, preprocess, threshold: float,
                    net: torch.nn.Module) -> dict:
    """What every checkpoint carries beside the weights: how to rebuild, preprocess and read the network."""
    return {"labels": labels, "task": task, "model_config": plain(model), "preprocessing": plain(preprocess),
            "threshold": threshold, **encoder_record(net)}


def to_device(net: torch.nn.Module, device: torch.device, channels_last: str = "auto") -> torch.nn.Module:
    """`net` on `device`; on the CPU with its 3D convolution weights channels-last, which oneDNN runs 11-15%
    faster (a ResNet-10 training step at 64^3, batch 8, AVX2 and AVX-512 alike, measured 2026-11-26; the demo
    went from ~170 s to 134 s with AVX2 kernels). Values, state dicts and checkpoints are the same either way;
    GPUs keep PyTorch's default layout unless model.channels_last=on (not measured there)."""
    net = net.to(device)
    wanted = device.type == "cpu" if channels_last == "auto" else channels_last == "on"  # model.channels_last
    return net.to(memory_format=torch.channels_last_3d) if wanted else net


def make_optimization(net: torch.nn.Module, train: TrainConfig, steps_per_epoch: int, encoder_lr: float = 0.0):
    """The model to train (DDP-wrapped under torchrun), AdamW and a warmup-cosine schedule per iteration; a
    pretrained encoder's parameters at `encoder_lr` where given (the schedule scales every group alike)."""
    import ignite.distributed as idist
    from monai.optimizers import WarmupCosineSchedule

    distributed = idist.get_world_size() > 1
    if train.sync_bn and distributed:
        if next(net.parameters()).device.type != "cuda":
            raise CT3DError("config error: train.sync_bn: PyTorch's SyncBatchNorm runs on CUDA devices only")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # in place below the root: same state dict
    # a frozen backbone leaves parameters without gradients, which DDP must be told to expect
    model = idist.auto_model(net, find_unused_parameters=train.freeze_epochs > 0) if distributed else net
    encoder = getattr(net, "encoder", None) if encoder_lr else None
    groups = model.parameters() if encoder is None else [
        {"params": [p for n, p in net.named_parameters() if not n.startswith("encoder.")]},
        {"params": list(encoder.parameters()), "lr": encoder_lr}]
    cuda = next(net.parameters()).device.type == "cuda"  # fused: one kernel per step, no .item() per parameter
    optimizer = torch.optim.AdamW(groups, lr=train.lr, weight_decay=train.weight_decay, fused=cuda or None)
    if distributed:
        optimizer = idist.auto_optim(optimizer)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=round(train.warmup_epochs * steps_per_epoch),
                                     t_total=train.epochs * steps_per_epoch)
    return model, optimizer, scheduler


def _iteration(engine, batch):
    """MONAI's training iteration; on gradient-accumulation micro-steps (no optimizer step follows, by
    MONAI's own rule) under DDP's no_sync(), so gradients are all-reduced once per step, not per batch."""
    import contextlib

    quiet = engine.accumulation_steps > 1 and not steps_optimizer(engine) and hasattr(engine.network, "no_sync")
    with engine.network.no_sync() if quiet else contextlib.nullcontext():
        return engine._iteration(engine, batch)


def make_trainer(model, optimizer, loss_fn, loader, device: torch.device, amp_dtype: torch.dtype | None,
                 train: TrainConfig):
    from monai.engines import SupervisedTrainer

    return SupervisedTrainer(
        iteration_update=_iteration,
        device=device, max_epochs=train.epochs, train_data_loader=loader, network=model, optimizer=optimizer,
        loss_function=loss_fn.to(device), prepare_batch=prepare_batch, inferer=make_inferer(device, amp_dtype),
        decollate=False, accumulation_steps=train.accumulation_steps, non_blocking=True,  # no host sync per copy
        optim_set_to_none=True,  # as a hand-written loop does: no memset of every gradient each step
        compile=train.compile,  # the network forward (and so backward) compiled by torch.compile
        **_amp_arguments(amp_dtype),
    )


def make_evaluator(network, loader, device: torch.device, amp_dtype: torch.dtype | None, metrics: MetricsConfig,
                   labels: list[str], task: str, loss_fn, thresholds: list[float] | None = None,
                   calibration: dict | None = None, inferer=None, keep: torch.Tensor | None = None,
                   paired: bool = False):
    """A MONAI SupervisedEvaluator under the training's autocast, with every metric attached (the loss on
    the CPU, where the gathered outputs are: give it its own loss module, not the trainer's). Given
    `thresholds` (evaluate: the checkpoint's, and its `calibration`), it uses them; without, each validation
    fits its own. `keep`: the labels the macro figures average (outputs.macro_keep); all with both classes without.
    `paired`: the inferer returns ranked and decided logits side by side (inference.with_tta(ranked=True))."""
    from monai.engines import SupervisedEvaluator

    evaluator = SupervisedEvaluator(device=device, val_data_loader=loader, network=network,
                                    prepare_batch=prepare_batch, inferer=inferer or make_inferer(device, amp_dtype),
                                    decollate=False, non_blocking=True, **_amp_arguments(amp_dtype))
    validation = ValidationMetrics(labels, task, loss_fn, metrics.threshold, metrics.beta, str(metrics.threshold_rule),
                                   metrics.calibrate, metrics.calibration_bins, fit=thresholds is None,
                                   thresholds=thresholds, calibration=calibration, keep=keep, paired=paired)
    validation.attach(evaluator)
    return evaluator, validation


def attach_validation(trainer, evaluator, every: int) -> None:
    """MONAI's ValidationHandler every `every` epochs and after the last one."""
    from ignite.engine import Events
    from monai.handlers import ValidationHandler

    def due(engine, epoch: int) -> bool:
        return epoch % every == 0 or epoch == engine.state.max_epochs

    trainer.add_event_handler(Events.EPOCH_COMPLETED(event_filter=due),
                              ValidationHandler(interval=every, validator=evaluator, epoch_level=True))


def run_folder(output: OutputConfig, model: ModelConfig) -> Path:
    """output.dir/<output.name or model-start time>; every rank gets rank 0's name, only rank 0 makes it."""
    import ignite.distributed as idist

    name = output.name or f"{model.name}{model.variant}-{datetime.now():%Y%m%d-%H%M%S}"
    if idist.get_world_size() > 1:
        name = idist.broadcast(name if idist.get_rank() == 0 else None, src=0, safe_mode=True)
    folder = Path(output.dir) / name
    if idist.get_rank() == 0:
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    return folder
