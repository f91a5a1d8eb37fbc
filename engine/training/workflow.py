"""The wiring: the one place that knows every part. Read `train` top to bottom to follow a run:
config -> datalists -> cached preprocessing -> loaders -> model, loss, optimizer -> MONAI trainer and
evaluator with handlers -> checkpoints, metrics.csv, summary.json and the report."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import torch

from engine.config.loading import plain, to_yaml
from engine.config.schema import Config
from engine.data.cache import release_ram
from engine.data.datalist import label_frequencies
from engine.data.loaders import make_datasets, make_loader
from engine.data.prepare import Splits, prepare_data, write_skipped
from engine.data.run_split import check_same_run, split_rows, write_split
from engine.training.augment import DeviceAugmentation
from engine.training.build import (
    attach_validation,
    make_evaluator,
    make_loss,
    make_network,
    make_optimization,
    make_trainer,
    resolve_amp,
    resolve_device,
    run_folder,
    setup_logging,
    setup_torch,
    use_every_cpu,
)
from engine.training.checkpoint import (
    Checkpoints,
    Resume,
    load_checkpoint,
    resume_checkpoint,
)
from engine.training.handlers import History, MetricsTable, Progress, SyncBuffers
from engine.training.models import FreezeBackbone
from engine.training.outputs import timed_call, write_outputs
from engine.training.state import RandomState, ScalerState, TrainerState
from engine.training.steps import StepLog, share_stop
from engine.utils.errors import CT3DError, Interrupted
from engine.utils.io import write_text

log = logging.getLogger("ct3d")


def train(cfg: Config, attach=None) -> Path:
    """Trains per `cfg`; returns the run folder. `attach(trainer, evaluator)` adds handlers of a caller's
    own after ours (a sweep's pruning)."""
    import ignite.distributed as idist
    from ignite.engine import Events
    from monai.handlers import LrScheduleHandler

    start, rank = time.time(), idist.get_rank()
    main = rank == 0  # only rank 0 writes files, logs progress, talks to W&B
    setup_logging(main)
    setup_torch(cfg.train, rank)
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    data = prepare_data_in_shares(cfg, progress=main)
    folder = run_folder(cfg.output, cfg.model)
    resume_path = resume_from(cfg, folder)
    resume_state = None
    if resume_path is not None:  # read once, memory-mapped: the check reads the metadata, the resume the rest
        resume_state = load_checkpoint(resume_path, mmap=True)
        check_same_run(resume_state, resume_path, folder, cfg, data)
    if main:
        write_run_start(folder, cfg, data)

    train_ds, val_ds = make_datasets(cfg, data.train, data.val, main and sys.stderr.isatty())  # bars: terminals
    per_rank = math.ceil(len(data.train) / idist.get_world_size())
    train_loader = make_loader(train_ds, cfg.loader, device, shuffle_seed=cfg.train.seed, per_rank=per_rank)
    net = make_network(cfg.model, len(data.labels), cfg.preprocess.spatial_size, device)  # saved without DDP
    model, optimizer, scheduler = make_optimization(net, cfg.train, len(train_loader))
    task, frequencies = str(cfg.data.task), label_frequencies(data.train)
    trainer = make_trainer(model, optimizer, make_loss(cfg.train, task, frequencies), train_loader, device,
                           amp_dtype, cfg.train)
    # The plain network: ranks validate different numbers of batches, and DDP's forward is a collective.
    evaluator, validation = make_evaluator(net, make_loader(val_ds, cfg.loader, device), device, amp_dtype,
                                           cfg.metrics, data.labels, task, make_loss(cfg.train, task, frequencies))
    history, steps = History(optimizer), StepLog(cfg.train.log_every, stop_on_nan=amp_dtype != torch.float16)
    table = MetricsTable(folder / "metrics.csv", str(cfg.metrics.key), history, data.labels, validation,
                         str(cfg.metrics.mode), cfg.metrics.beta, write=main)
    to_save = {"model": net, "optimizer": optimizer, "scheduler": scheduler, "scaler": ScalerState(trainer),
               "trainer": TrainerState(trainer), "metrics_table": table, "history": history, "rng": RandomState(),
               "calibration": validation, "steps": steps}

    # Handlers, in the order they run on each event.
    resume = Resume(resume_path, to_save, resume_state)
    resume.attach(trainer)
    total_steps = cfg.train.epochs * len(train_loader)  # a raised train.epochs extends a resumed schedule
    trainer.add_event_handler(Events.STARTED, lambda _: setattr(scheduler, "t_total", total_steps))
    if cfg.train.freeze_epochs:
        FreezeBackbone(net, cfg.model, cfg.train.freeze_epochs).attach(trainer)
    if cfg.augment.enabled:
        voxel = cfg.preprocess.spacing if cfg.preprocess.resize == "crop_pad" else None  # resize: voxels vary
        DeviceAugmentation(cfg.augment, device, cfg.train.seed + 1000 * rank, voxel).attach(trainer)
    LrScheduleHandler(scheduler, epoch_level=False, print_lr=False).attach(trainer)
    steps.attach(trainer)
    if main:
        Progress(history, steps).attach(trainer)
    SyncBuffers(net).attach(trainer)
    attach_validation(trainer, evaluator, cfg.train.val_every)
    table.attach(trainer, evaluator)
    history.attach(trainer)  # after validation, before checkpoints: see History
    if cfg.train.early_stopping_patience:
        to_save["early_stopping"] = early_stopping(cfg, trainer, evaluator)
    tracker = tracking(cfg, folder, trainer, evaluator, optimizer, steps) if main else None
    if tracker is not None:
        to_save["tracking"] = tracker
    meta = {"labels": data.labels, "task": task, "model_config": plain(cfg.model),
            "preprocessing": plain(cfg.preprocess), "threshold": cfg.metrics.threshold}
    checkpoints = Checkpoints(folder / "checkpoints", to_save, meta, main, cfg.train.checkpoint_minutes)
    checkpoints.attach(trainer, table, steps)
    if attach is not None:
        attach(trainer, evaluator)
    share_stop(trainer, evaluator)  # last: whatever stops the run (early stopping, a sweep's pruner), rank 0 decides

    log.info("training %s%s on %s for %d epochs (%d iterations each)%s", cfg.model.name, cfg.model.variant, device,
             cfg.train.epochs, len(train_loader), f", autocast {amp_dtype}" if amp_dtype else "")
    clock = [start, time.time()]  # the phases summary.json times: start-up, training, closing
    finish_checkpoints = run_to_end(trainer, checkpoints, table, resume, folder, steps)
    clock.append(history.epoch_ended_at or time.time())  # closing: from the last validation on
    # Training is over: the closing needs the memory, not the gradients, the RAM cache or (once a checkpoint holds
    # it: the last epoch's copy is being written) the optimizer's state, so its peak stays below training's.
    optimizer.zero_grad(set_to_none=True)
    for dataset in (train_ds, val_ds):
        release_ram(dataset)
    parts = {"after the last epoch": round(time.time() - clock[2], 3)}  # the closing's parts, each timed

    def finish() -> None:  # the last epoch's write, final.pt; then the optimizer's state can go
        finish_checkpoints()
        optimizer.state.clear()

    if idist.get_world_size() > 1:
        timed_call(parts, "checkpoints", finish)
        idist.barrier()  # the last checkpoint is written: the other ranks leave, their GPUs (pods) free
        if not main:
            return folder
        use_every_cpu()
        finish = None
    elif checkpoints.holds_current():  # one process: the write overlaps the closing's first parts
        optimizer.state.clear()
    summary = {
        "run": str(folder), "labels": data.labels, "task": task, "device": str(device),
        "train_volumes": len(data.train), "val_volumes": len(data.val), "test_volumes": len(data.test),
        "skipped": len(data.skipped),
        "selection_set": "validation: the best epoch, thresholds and calibration were chosen on it, so its figures "
                         "(best, bootstrap) are optimistic; publish the test block's",
        "key_metric": str(cfg.metrics.key), "best_epoch": table.best["epoch"], "best": table.best,
        "final": table.rows[-1], "stopped_early": bool(trainer.should_terminate),
        "epoch_seconds": history.epoch_seconds,
    }
    write_outputs(folder, summary, table, history, cfg, tracker, net, data, clock, parts, finish)
    return folder


def prepare_data_in_shares(cfg: Config, progress: bool) -> Splits:
    """Under torchrun rank 0 reads the datalists (and writes the demo's phantoms) and looks up every row's file,
    once, and the other ranks receive the items; every rank then checks, and fills the disk cache with, its own
    share of the volumes, so a rank waits for the slowest share, never for one rank to read the whole data
    set; the ranks then pool what they found."""
    import json
    from dataclasses import asdict

    import ignite.distributed as idist

    from engine.data.datalist import Problem

    rank, world = idist.get_rank(), idist.get_world_size()
    if world == 1:
        return prepare_data(cfg, progress)

    def pool(mine: list) -> list:
        # Where a cold cache makes ranks wait on the slowest: said in every pod's log before the wait, for NCCL's
        # watchdog ends a timed-out collective with its own words (docs/architecture.md, "Timeouts").
        logging.getLogger("ct3d.ranks").info(
            "rank %d: checked (and cached) its share of the volumes; waiting for the other ranks at most "
            "train.dist_timeout_minutes=%g: a rank still filling the cache by then ends the run. Fill the cache "
            "first (python -m engine.run cache --shard I/N) or raise the timeout", rank, cfg.train.dist_timeout_minutes)
        every = idist.all_gather(json.dumps([asdict(p) for p in mine]))
        return [Problem(**p) for text in every for p in json.loads(text)]

    return prepare_data(cfg, progress, share=(rank, world), pool=pool, once=on_rank_0)


def on_rank_0(fn):
    """fn() on rank 0, its result (or the error it raised: the same CT3DError, or a RuntimeError saying what
    rank 0 met) on every rank; with one process, fn()."""
    import ignite.distributed as idist

    if idist.get_world_size() == 1:
        return fn()
    import torch.distributed as dist

    shared: list = [None]
    caught: BaseException | None = None
    if idist.get_rank() == 0:
        try:
            shared[0] = (fn(), None, False)
        except Exception as exc:  # noqa: BLE001 - every rank must leave the broadcast, then each raises
            caught, shared[0] = exc, (None, str(exc), isinstance(exc, CT3DError))
    dist.broadcast_object_list(shared, src=0)
    result, error, ours = shared[0]
    if caught is not None:
        raise caught
    if error is not None:
        raise CT3DError(error) if ours else RuntimeError(f"rank 0 failed: {error}")
    return result


def write_run_start(folder: Path, cfg: Config, data: Splits) -> None:
    write_text(folder / "config.yaml", to_yaml(cfg))
    write_split(folder, split_rows(data, cfg.data.patient_pattern))
    if data.skipped:
        write_skipped(folder, data.skipped)
        log.warning("left out %d bad volume(s) or row(s), listed in %s", len(data.skipped), folder / "skipped.csv")
    log.info("run folder %s; %d train / %d validation volumes; labels: %s", folder, len(data.train), len(data.val),
             ", ".join(data.labels))


def tracking(cfg: Config, folder: Path, trainer, evaluator, optimizer, steps: StepLog):
    """The W&B tracker, attached (None when tracking is off); it logs the config as saved, secrets blanked."""
    import yaml

    from engine.training.tracking import WandbTracker

    if cfg.tracking.wandb.mode == "disabled":
        return None
    tracker = WandbTracker(cfg.tracking.wandb, folder, yaml.safe_load(to_yaml(cfg)), folder.name)
    tracker.attach(trainer, evaluator, optimizer, steps)
    return tracker


def resume_from(cfg: Config, folder: Path) -> Path | None:
    """The checkpoint to resume from; every rank loads the file rank 0 chose (rank 0 may be writing)."""
    return on_rank_0(lambda: resume_checkpoint(cfg.train.resume, folder / "checkpoints"))


def early_stopping(cfg: Config, trainer, evaluator):
    """Ignite's EarlyStopping on the key metric after each validation (NaN counts as no improvement)."""
    from ignite.engine import Events
    from ignite.handlers import EarlyStopping

    sign, key = (1.0 if cfg.metrics.mode == "max" else -1.0), str(cfg.metrics.key)

    def score(engine) -> float:
        value = engine.state.metrics[key]
        return -math.inf if value is None or math.isnan(value) else sign * value

    stopper = EarlyStopping(cfg.train.early_stopping_patience, score, trainer,
                            min_delta=cfg.train.early_stopping_min_delta)
    evaluator.add_event_handler(Events.COMPLETED, stopper)
    return stopper


def run_to_end(trainer, checkpoints: Checkpoints, table: MetricsTable, resume: Resume, folder: Path, steps: StepLog):
    """Runs the trainer. A diverged loss (the step log saw a NaN or infinite loss on some rank: every rank
    stopped at the same iteration) is a clear error on every rank, and no final.pt with NaN weights is written:
    last.pt holds the last good state. Returns what completes the checkpoints (waits for the last epoch's
    write, then final.pt unless this start found the run finished and final.pt there)."""
    try:
        trainer.run()
    except BaseException:
        checkpoints.wait()
        raise
    finally:
        checkpoints.on_signal.restore()
    if checkpoints.stopped:
        checkpoints.wait()
        raise Interrupted(f"stopped by SIGTERM at iteration {trainer.state.iteration}; "
                          f"{folder / 'checkpoints' / 'last.pt'} holds it: run again to continue")
    if steps.diverged:
        checkpoints.wait()
        raise CT3DError(f"training stopped at epoch {trainer.state.epoch}, iteration {trainer.state.iteration}: "
                        f"the loss became NaN or infinite (mean of the last reduce: {steps.running_loss:g}). The last "
                        f"good state is {folder / 'checkpoints' / 'last.pt'}; try a lower train.lr, train.amp=off, "
                        f"or check the data")
    if not table.rows:
        checkpoints.wait()
        raise CT3DError(f"run {folder}: no validation was recorded; nothing to summarise")
    # every rank takes the same branch (save_final gathers from all): rank 0's view of the disk decides
    final = folder / "checkpoints" / "final.pt"
    finished = trainer.state.epoch == resume.epoch and on_rank_0(final.is_file)
    return checkpoints.wait if finished else checkpoints.save_final
