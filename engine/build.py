"""Builders: each turns a config section into one part of a run (device, precision, loss, loaders,
optimizer and schedule, MONAI trainer and evaluator, run folder). The wiring in workflow.py calls them."""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from pathlib import Path

import torch

from engine.datalist import IMAGE, LABEL
from engine.errors import CT3DError
from engine.schema import (
    Config,
    LoaderConfig,
    MetricsConfig,
    ModelConfig,
    OutputConfig,
    PreprocessConfig,
    TrainConfig,
)

log = logging.getLogger("ct3d")


def setup_logging(main: bool = True) -> None:
    """INFO lines on rank 0; other ranks only warn."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    log.setLevel(logging.INFO if main else logging.WARNING)
    for noisy in ("ignite", "monai"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def setup_torch(train: TrainConfig, rank: int = 0) -> None:
    """Threads; seeds from (seed, rank), so ranks draw different dropout masks; cuDNN autotuning for speed,
    or with train.deterministic deterministic kernels where they exist: on CUDA, ops that have none (3D
    max-pool backward, for one) warn instead of stopping the run."""
    import os

    from monai.utils import set_determinism

    if train.threads:
        torch.set_num_threads(train.threads)
    set_determinism(seed=train.seed + 1_000_003 * rank)  # also pins cuDNN to deterministic: set below
    torch.backends.cudnn.deterministic = train.deterministic
    torch.backends.cudnn.benchmark = not train.deterministic
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with it
    torch.use_deterministic_algorithms(train.deterministic, warn_only=True)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
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


class ShareSampler(torch.utils.data.DistributedSampler):
    """A rank's share of the training set (all it holds in RAM), shuffled each epoch from (seed, epoch) as
    torch's DistributedSampler does (with one rank, the very same order) and padded with repeats to
    `per_rank`, so every rank takes as many steps. `skip_next` skips the first samples of the next epoch
    once: a run resumed mid-epoch sees exactly the batches it had not seen yet."""

    def __init__(self, share, per_rank: int, seed: int):
        super().__init__(share, num_replicas=1, rank=0, shuffle=True, seed=seed)
        self.per_rank, self._skip = per_rank, 0

    def __len__(self) -> int:
        return self.per_rank

    def skip_next(self, samples: int) -> None:
        self._skip = samples

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        order = (order * (self.per_rank // max(1, len(order)) + 1))[: self.per_rank]
        indices, self._skip = order[self._skip:], 0
        return iter(indices)


def _cgroup_limit() -> float:
    """The container's memory limit (cgroup v2 or v1), what a Kubernetes pod may use; infinite if none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            return float(text)
    return float("inf")


def ram_budget(memory_rate: float, volumes: int, preprocess: PreprocessConfig) -> float:
    """The RAM cache rate that fits: every rank on this node (LOCAL_WORLD_SIZE) caches its share; above 80%
    of the memory available the rate is lowered (and the log says so), the rest read from the disk cache."""
    import math
    import os

    import psutil

    per_volume = math.prod(preprocess.spatial_size) * (2 if preprocess.dtype == "float16" else 4)
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need, available = volumes * per_volume * memory_rate * ranks, 0.8 * min(psutil.virtual_memory().available,
                                                                          _cgroup_limit())
    if need <= available:
        return memory_rate
    rate = memory_rate * available / need
    log.warning("RAM cache: %d volumes x %.1f MB x %d rank(s) on this node need %.1f GB, more than 80%% of the "
                "%.1f GB available: caching %.0f%% of them in RAM (cache.memory_rate %.2f), the rest from disk",
                volumes, per_volume / 1e6, ranks, need / 1e9, available / 0.8 / 1e9, 100 * rate, rate)
    return rate


def make_datasets(cfg: Config, train_items: list[dict], val_items: list[dict], progress: bool):
    """This rank's shares of the training and validation sets (every world-th item from its rank), each
    cached on disk and, within the RAM budget, in RAM: a node holds about one copy of the data set,
    whatever its number of ranks."""
    import ignite.distributed as idist

    from engine.data import build_dataset
    from engine.prepare import shard

    rank, world = idist.get_rank(), idist.get_world_size()
    if len(train_items) < world:  # every rank decides alike: none is left waiting for the others
        raise CT3DError(f"{len(train_items)} training volume(s) for {world} ranks: each rank needs at least one; "
                        f"lower --nproc-per-node")
    val_share = shard(val_items, rank, world)
    if not val_share:  # fewer validation volumes than ranks: validate a stand-in the metrics leave out
        val_share = [{**val_items[0], LABEL: [float("nan")] * len(val_items[0][LABEL])}]
    shares = shard(train_items, rank, world), val_share
    rate = ram_budget(cfg.cache.memory_rate, sum(map(len, shares)), cfg.preprocess)
    disk = cfg.cache.dir if cfg.cache.disk else None
    return tuple(build_dataset(items, cfg.preprocess, disk, rate, cfg.cache.workers, progress) for items in shares)


def make_loader(dataset, loader: LoaderConfig, device: torch.device, shuffle_seed: int | None = None,
                per_rank: int | None = None):
    """Training (`shuffle_seed` given): a ShareSampler over this rank's share, `per_rank` samples an epoch.
    Validation: the share in order, unpadded, so gathered metrics count each sample once."""
    shuffle = shuffle_seed is not None
    if shuffle:
        sampler = ShareSampler(dataset, per_rank or len(dataset), shuffle_seed)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    batch_size = loader.batch_size if shuffle else loader.val_batch_size or loader.batch_size
    # A last training batch of one sample breaks BatchNorm: drop it (the sampler reshuffles each epoch).
    drop_last = shuffle and len(sampler) % batch_size == 1 and len(sampler) > 1
    workers = loader_workers(loader, dataset)
    kwargs = dict(batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                  pin_memory=loader.pin_memory and device.type == "cuda", persistent_workers=workers > 0)
    if loader.num_workers is None and workers == 0:
        return thread_loader_class()(dataset, buffer_size=2, **kwargs)
    return torch.utils.data.DataLoader(dataset, **kwargs)


def thread_loader_class():
    """MONAI's ThreadDataLoader (a thread prefetches batches) that raises what went wrong in its thread: our
    own part because MONAI's ThreadBuffer drops the exception and the epoch just ends early."""
    from monai.data import ThreadDataLoader
    from monai.data.thread_buffer import ThreadBuffer

    class Buffer(ThreadBuffer):
        error: BaseException | None = None

        def enqueue_values(self):
            try:
                super().enqueue_values()
            except BaseException as exc:  # noqa: BLE001 - raised again in the training loop
                self.error = exc

        def __iter__(self):
            yield from super().__iter__()
            if self.error is not None:
                raise self.error

    class ThreadLoader(ThreadDataLoader):
        def __iter__(self):
            yield from Buffer(torch.utils.data.DataLoader.__iter__(self), self.buffer_size, self.buffer_timeout)

    return ThreadLoader


def loader_workers(loader: LoaderConfig, dataset) -> int:
    """`loader.num_workers`, or when unset: 0 for a dataset wholly in the RAM cache (worker processes would
    only copy it: 2 workers took +0.9 GB peak PSS and 1.45x the epoch time on a 48-volume ResNet-18 run,
    bench/RESULTS.md), else one per spare CPU of this rank, at most 4, to read and decode the disk cache
    while the model trains."""
    import os

    from engine.data import in_ram

    if loader.num_workers is not None:
        return loader.num_workers
    if in_ram(dataset):
        return 0
    available = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cpus = len(available) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, cpus - 1))


def make_network(model: ModelConfig, outputs: int, spatial_size: list[int], device: torch.device) -> torch.nn.Module:
    """MONAI's network for `model`, started from `model.pretrained` when given (a resumed run's checkpoint
    then overrides it), on `device`."""
    from engine.models import create_model, load_pretrained

    net = create_model(model, outputs, spatial_size)
    if model.pretrained:
        load_pretrained(net, model.pretrained)
    return to_device(net, device)


def to_device(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`net` on `device`; on the CPU with its 3D convolution weights channels-last, which oneDNN runs 11-15%
    faster (a ResNet-10 training step at 64^3, batch 8, AVX2 and AVX-512 alike, measured 2026-11-26; the demo
    went from ~170 s to 134 s with AVX2 kernels). Values, state dicts and checkpoints are the same either way;
    GPUs keep PyTorch's default layout (not measured there)."""
    net = net.to(device)
    return net.to(memory_format=torch.channels_last_3d) if device.type == "cpu" else net


def gathered_order(n: int, world: int) -> list[int]:
    """Dataset rows in the order validation outputs are gathered: each rank's share (every world-th row,
    from its rank, as make_datasets gives it) in rank order."""
    return [i for rank in range(world) for i in range(rank, n, world)]


def make_optimization(net: torch.nn.Module, train: TrainConfig, steps_per_epoch: int):
    """The model to train (DDP-wrapped under torchrun), AdamW and a warmup-cosine schedule per iteration."""
    import ignite.distributed as idist
    from monai.optimizers import WarmupCosineSchedule

    distributed = idist.get_world_size() > 1
    if train.sync_bn and distributed:
        if next(net.parameters()).device.type != "cuda":
            raise CT3DError("config error: train.sync_bn: PyTorch's SyncBatchNorm runs on CUDA devices only")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)  # in place below the root: same state dict
    # a frozen backbone leaves parameters without gradients, which DDP must be told to expect
    model = idist.auto_model(net, find_unused_parameters=train.freeze_epochs > 0) if distributed else net
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    if distributed:
        optimizer = idist.auto_optim(optimizer)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=round(train.warmup_epochs * steps_per_epoch),
                                     t_total=train.epochs * steps_per_epoch)
    return model, optimizer, scheduler


def _iteration(engine, batch):
    """MONAI's training iteration; on gradient-accumulation micro-steps (no optimizer step follows, by
    MONAI's own rule) under DDP's no_sync(), so gradients are all-reduced once per step, not per batch."""
    import contextlib

    from engine.preemption import steps_optimizer

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
        decollate=False, accumulation_steps=train.accumulation_steps,
        optim_set_to_none=True,  # as a hand-written loop does: no memset of every gradient each step
        **_amp_arguments(amp_dtype),
    )


def make_evaluator(network, loader, device: torch.device, amp_dtype: torch.dtype | None, metrics: MetricsConfig,
                   labels: list[str], task: str, loss_fn, thresholds: list[float] | None = None,
                   temperature: list[float] | None = None, inferer=None):
    """A MONAI SupervisedEvaluator under the training's autocast, with every metric attached (the loss on
    the CPU, where the gathered outputs are: give it its own loss module, not the trainer's). Given
    `thresholds` (evaluate: the checkpoint's, and its `temperature`), it uses them; without, each validation
    fits its own."""
    from monai.engines import SupervisedEvaluator

    from engine.handlers import ValidationMetrics

    evaluator = SupervisedEvaluator(device=device, val_data_loader=loader, network=network,
                                    prepare_batch=prepare_batch, inferer=inferer or make_inferer(device, amp_dtype),
                                    decollate=False, **_amp_arguments(amp_dtype))
    validation = ValidationMetrics(labels, task, loss_fn, metrics.threshold, metrics.beta, str(metrics.threshold_rule),
                                   metrics.calibrate, metrics.calibration_bins, fit=thresholds is None,
                                   thresholds=thresholds, temperature=temperature)
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
