"""The wiring: the one module that holds the whole config; everything it calls takes plain arguments or the
config section it needs. Read `train` top to bottom to follow a run: config -> datalists -> cached
preprocessing -> loaders -> model, loss, optimizer -> MONAI trainer and evaluator with handlers -> checkpoints,
metrics.csv; then `close_run`: summary.json, the report and the test set's figures."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ignite.distributed as idist
import torch
import yaml
from ignite.engine import Engine, Events
from monai.handlers import LrScheduleHandler

from engine.config.loading import plain, to_yaml
from engine.config.schema import Config
from engine.data.cache import build_dataset, release_ram
from engine.data.datalist import label_frequencies
from engine.data.loaders import make_datasets, make_loader
from engine.data.prepare import Splits, disk_dir, writable_folders, write_skipped
from engine.data.run_split import check_same_run, split_rows, write_split
from engine.results.report import draw_panels, report_title, write_report
from engine.results.saliency import report_panels
from engine.training import embeddings
from engine.training.augment import DeviceAugmentation
from engine.training.build import (
    attach_validation,
    check_checkpoint_space,
    checkpoint_meta,
    encoder_record,
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
from engine.training.checkpoint import Checkpoints, Resume, load_checkpoint, resume_checkpoint
from engine.training.encoders import check_same_encoder
from engine.training.handlers import History, MetricsTable, Progress, SyncBuffers
from engine.training.models import FreezeBackbone
from engine.training.outputs import (
    best_statistics,
    best_thresholds,
    in_gathered_order,
    macro_keep,
    ranked_outputs,
    summary_table,
    test_block,
    timed_call,
)
from engine.training.ranks import on_rank_0, prepare_data_in_shares
from engine.training.state import RandomState, ScalerState, TrainerState
from engine.training.steps import StepLog, early_stopping, run_to_end, share_stop
from engine.training.tracking import WandbTracker
from engine.utils.io import write_json, write_text

log = logging.getLogger("ct3d")


@dataclass
class Parts:
    """A run's built parts, as the handlers and the closing need them."""
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainer: Engine
    evaluator: Engine
    table: MetricsTable
    history: History
    steps: StepLog
    to_save: dict
    scheduler: object
    datasets: tuple
    device: torch.device
    embeddings: dict | None = None  # where the head's training features came from (a frozen encoder's cache)
    tracker: WandbTracker | None = None
    checkpoints: Checkpoints | None = None


def train(cfg: Config, attach=None) -> Path:
    """Trains per `cfg`; returns the run folder. `attach(trainer, evaluator)` adds handlers of a caller's
    own after ours (a sweep's pruning)."""
    start, rank = time.time(), idist.get_rank()
    main = rank == 0  # only rank 0 writes files, logs progress, talks to W&B
    setup_logging(main)
    setup_torch(cfg.train, rank)
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    probe = embeddings.applies(cfg.model, cfg.augment, cfg.cache)  # the head alone, on cached encoder features
    writable_folders(cfg.cache, cfg.output.dir, probe)  # before any volume is read, not at the first checkpoint
    check_checkpoint_space(cfg.model, cfg.preprocess.spatial_size, cfg.output.dir)
    planned = embeddings.planned_cache(cfg.model, cfg.preprocess, cfg.cache, amp_dtype) if probe else None
    data = prepare_data_in_shares(cfg.data, cfg.preprocess, cfg.cache, cfg.train.dist_timeout_minutes, main,
                                  planned.holds if planned else None)  # embedded volumes need no second look
    keep = macro_keep(data.val, data.labels, cfg.data.patient_pattern, cfg.metrics)  # refused before training
    folder = run_folder(cfg.output, cfg.model)
    # every rank loads the file rank 0 chose (rank 0 may be writing), once, memory-mapped: the check reads the
    # metadata, the resume the rest
    resume_path = on_rank_0(lambda: resume_checkpoint(cfg.train.resume, folder / "checkpoints"))
    resume_state = None if resume_path is None else load_checkpoint(resume_path, mmap=True)
    if resume_state is not None:
        check_same_run(resume_state, resume_path, folder, data, str(cfg.data.task), cfg.preprocess,
                       cfg.data.patient_pattern, plain(cfg.model), plain(cfg.train), cfg.metrics.min_positive_patients)
    if main:  # the config as resolved, split.csv, skipped.csv
        write_run_start(folder, cfg, data)
    net = make_network(cfg.model, len(data.labels), cfg.preprocess.spatial_size, device)  # saved without DDP
    if resume_state is not None:
        check_same_encoder(resume_state, net, probe)
    trained, bars, embedded = net, main and sys.stderr.isatty(), None  # progress bars: terminals only
    if probe:
        trained, (train_ds, val_ds, embedded) = net.head, embeddings.head_datasets(
            net, str(cfg.model.name), data.train, data.val, cfg.preprocess, cfg.cache, device, amp_dtype,
            cfg.loader.val_batch_size or cfg.loader.batch_size, cfg.train.seed, bars)
    else:
        train_ds, val_ds = make_datasets(data.train, data.val, cfg.preprocess, cfg.cache, cfg.train.seed, bars)
    per_rank = math.ceil(len(data.train) / idist.get_world_size())
    train_loader = make_loader(train_ds, cfg.loader, device, shuffle_seed=cfg.train.seed, per_rank=per_rank)
    model, optimizer, scheduler = make_optimization(trained, cfg.train, len(train_loader), cfg.model.encoder_lr)
    task, frequencies = str(cfg.data.task), label_frequencies(data.train)
    trainer = make_trainer(model, optimizer, make_loss(cfg.train, task, frequencies), train_loader, device,
                           amp_dtype, cfg.train)
    # The plain network: ranks validate different numbers of batches, and DDP's forward is a collective.
    evaluator, validation = make_evaluator(trained, make_loader(val_ds, cfg.loader, device), device, amp_dtype,
                                           cfg.metrics, data.labels, task, make_loss(cfg.train, task, frequencies),
                                           keep=keep)
    history, steps = History(optimizer), StepLog(cfg.train.log_every, stop_on_nan=amp_dtype != torch.float16)
    table = MetricsTable(folder / "metrics.csv", cfg.metrics.key, history, data.labels, validation,
                         str(cfg.metrics.mode), cfg.metrics.beta, write=main)
    to_save = {"model": net, "optimizer": optimizer, "scheduler": scheduler, "scaler": ScalerState(trainer),
               "trainer": TrainerState(trainer), "metrics_table": table, "history": history, "rng": RandomState(),
               "calibration": validation, "steps": steps}
    parts = Parts(net, optimizer, trainer, evaluator, table, history, steps, to_save, scheduler,
                  (train_ds, val_ds), device, embedded)
    resume = Resume(resume_path, to_save, resume_state)
    resume.attach(trainer)
    total_steps = cfg.train.epochs * len(train_loader)  # a raised train.epochs extends a resumed schedule
    trainer.add_event_handler(Events.STARTED, lambda _: setattr(scheduler, "t_total", total_steps))
    attach_handlers(cfg, parts, folder, data, rank)
    if attach is not None:
        attach(trainer, evaluator)
    share_stop(trainer, evaluator)  # last: whatever stops the run (early stopping, a sweep's pruner), rank 0 decides
    log.info("training %s%s on %s for %d epochs (%d iterations each)%s", cfg.model.name, cfg.model.variant, device,
             cfg.train.epochs, len(train_loader), f", autocast {amp_dtype}" if amp_dtype else "")
    clock = [start, time.time()]  # the phases summary.json times: start-up, training, closing
    finish_checkpoints = run_to_end(trainer, parts.checkpoints, table, resume, folder, steps)
    clock.append(history.epoch_ended_at or time.time())  # closing: from the last validation on
    close_run(cfg, parts, folder, data, clock, finish_checkpoints)
    return folder


def attach_handlers(cfg: Config, parts: Parts, folder: Path, data: Splits, rank: int) -> None:
    """Our handlers, in the order they run on each event: backbone freezing, device augmentation, the LR
    schedule, step log, progress, validation, metrics.csv, history, early stopping, W&B and checkpoints."""
    trainer, evaluator, to_save, main = parts.trainer, parts.evaluator, parts.to_save, rank == 0
    if cfg.train.freeze_epochs:
        FreezeBackbone(parts.net, cfg.model, cfg.train.freeze_epochs).attach(trainer)
    if cfg.augment.enabled:
        voxel = cfg.preprocess.spacing if cfg.preprocess.resize == "crop_pad" else None  # resize: voxels vary
        DeviceAugmentation(cfg.augment, parts.device, cfg.train.seed + 1000 * rank, voxel).attach(trainer)
    LrScheduleHandler(parts.scheduler, epoch_level=False, print_lr=False).attach(trainer)
    parts.steps.attach(trainer)
    if main:
        Progress(parts.history, parts.steps).attach(trainer)
    SyncBuffers(parts.net).attach(trainer)
    attach_validation(trainer, evaluator, cfg.train.val_every)
    parts.table.attach(trainer, evaluator)
    parts.history.attach(trainer)  # after validation, before checkpoints: see History
    if cfg.train.early_stopping_patience:
        patience, delta, key = cfg.train.early_stopping_patience, cfg.train.early_stopping_min_delta, cfg.metrics.key
        to_save["early_stopping"] = early_stopping(trainer, evaluator, key, str(cfg.metrics.mode), patience, delta)
    if main and cfg.tracking.wandb.mode != "disabled":  # W&B logs the config as saved, secrets blanked
        parts.tracker = WandbTracker(cfg.tracking.wandb, folder, yaml.safe_load(to_yaml(cfg)), folder.name)
        parts.tracker.attach(trainer, evaluator, parts.optimizer, parts.steps)
        to_save["tracking"] = parts.tracker
    meta = {**checkpoint_meta(data.labels, str(cfg.data.task), cfg.model, cfg.preprocess, cfg.metrics.threshold,
                              parts.net), "probe": parts.embeddings is not None}
    parts.checkpoints = Checkpoints(folder / "checkpoints", to_save, meta, main, cfg.train.checkpoint_minutes)
    parts.checkpoints.attach(trainer, parts.table, parts.steps)


def write_run_start(folder: Path, cfg: Config, data: Splits) -> None:
    write_text(folder / "config.yaml", to_yaml(cfg))
    write_split(folder, split_rows(data, cfg.data.patient_pattern))
    if data.skipped:
        write_skipped(folder, data.skipped)
        log.warning("left out %d bad volume(s) or row(s), listed in %s", len(data.skipped), folder / "skipped.csv")
    log.info("run folder %s; %d train / %d validation volumes; labels: %s", folder, len(data.train), len(data.val),
             ", ".join(data.labels))


def close_run(cfg: Config, parts: Parts, folder: Path, data: Splits, clock: list[float], finish_checkpoints) -> None:
    """After the last epoch. Training is over: the closing needs the memory, not the gradients, the RAM cache or
    (once a checkpoint holds it: the last epoch's copy is being written) the optimizer's state, so its peak stays
    below training's. Under torchrun the other ranks leave once the last checkpoint is written."""
    optimizer, table, trainer = parts.optimizer, parts.table, parts.trainer
    optimizer.zero_grad(set_to_none=True)
    for dataset in parts.datasets:
        release_ram(dataset)
    timing = {"after the last epoch": round(time.time() - clock[2], 3)}  # the closing's parts, each timed

    def finish() -> None:  # the last epoch's write, final.pt; then the optimizer's state can go
        finish_checkpoints()
        optimizer.state.clear()

    if idist.get_world_size() > 1:
        timed_call(timing, "checkpoints", finish)
        idist.barrier()  # the last checkpoint is written: the other ranks leave, their GPUs (pods) free
        if idist.get_rank() != 0:
            return
        use_every_cpu()
        finish = None
    elif parts.checkpoints.holds_current():  # one process: the write overlaps the closing's first parts
        optimizer.state.clear()
    summary = {
        "run": str(folder), "labels": data.labels, "task": str(cfg.data.task), "device": str(parts.device),
        "train_volumes": len(data.train), "val_volumes": len(data.val), "test_volumes": len(data.test),
        "skipped": len(data.skipped),
        "selection_set": "validation: the best epoch, thresholds and calibration were chosen on it, so its figures "
                         "(best, bootstrap) are optimistic; publish the test block's",
        "key_metric": cfg.metrics.key, "best_epoch": table.best["epoch"], "best": table.best,
        "final": table.rows[-1], "stopped_early": bool(trainer.should_terminate),
        "epoch_seconds": parts.history.epoch_seconds, **encoder_record(parts.net),
        **({"embeddings": parts.embeddings} if parts.embeddings else {}),
    }
    write_outputs(cfg, parts, folder, data, summary, clock, timing, finish)


def write_outputs(cfg: Config, parts: Parts, folder: Path, data: Splits, summary: dict, clock: list[float],
                  timing: dict[str, float], finish_checkpoints=None) -> None:
    """Rank 0's closing work: the best validation's statistics and the report's panels (with one process, while
    the last epoch's checkpoint is written: `finish_checkpoints` waits for it, writes final.pt), the best model's
    Grad-CAM panels and held-out test scores, the report, the W&B run's end, summary.json (phase times: `clock`
    holds the run's, training's and the closing's starts; `timing` the closing's parts) and the printed table."""
    table, best, task, labels = parts.table, parts.table.best_outputs, str(cfg.data.task), data.labels
    sections, panels, page = [], [], b""
    try:
        summary.update(timed_call(timing, "statistics", best_statistics, best, data.val, labels, task,
                                  cfg.data.patient_pattern, cfg.metrics))
        summary["wall_seconds"] = round(time.time() - clock[0], 1)  # so far, for the report; summary.json: all
        if best and cfg.report.panels:
            panels, page = timed_call(timing, "report panels", draw_panels, table.rows, parts.history.lr_history,
                                      best["probs"], best["labels"], labels, task,
                                      list(summary["thresholds"].values()), cfg.metrics.beta, summary["best"],
                                      summary["calibration"]["bins"], report_title(summary),
                                      ranked=ranked_outputs(best, task))
    finally:
        if finish_checkpoints is not None:
            timed_call(timing, "checkpoints", finish_checkpoints)
    report_png = None
    if best:
        # The network holds the best weights when the last epoch was the best: best.pt need not be read.
        # (Before the panels, beside the checkpoint write, both took longer: two cores, measured.)
        if summary["best_epoch"] != summary["final"]["epoch"]:
            parts.net.load_state_dict(load_checkpoint(folder / "checkpoints" / "best.pt", mmap=True)["model"])
        sections = timed_call(timing, "saliency", saliency_panels, cfg, parts.net, data, best)
        if data.test:  # the net holds the best epoch's weights now
            summary["test"] = timed_call(timing, "test set", score_test_set, cfg, parts.net, data, best)
        report_png, _ = timed_call(timing, "report", write_report, folder, panels, page, summary, to_yaml(cfg),
                                   sections)
    if parts.tracker is not None:
        timed_call(timing, "tracking", parts.tracker.finish, report_png, folder / "checkpoints" / "best.pt", summary)
    end = time.time()
    summary["phases"] = {"start_up": round(clock[1] - clock[0], 2), "training": round(clock[2] - clock[1], 2),
                         "closing": round(end - clock[2], 2), "closing_parts": timing,
                         "clock": [clock[0], clock[1], clock[2], end]}
    summary["wall_seconds"] = round(end - clock[0], 1)
    write_json(folder / "summary.json", summary)
    log.info("closing took %.1f s (%s)", end - clock[2], ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()))
    print(f"\nct3d run {folder} finished in {summary['wall_seconds']:.0f} s\n{summary_table(summary, labels)}")


def saliency_panels(cfg: Config, net: torch.nn.Module, data: Splits, best: dict) -> list:
    """The report's Grad-CAM panels of the best epoch's network on the training device, from the disk cache
    (rank 0 holds only its share in RAM), each chosen volume read once."""
    dataset = build_dataset(in_gathered_order(data.val, best, idist.get_world_size()), cfg.preprocess,
                            disk_dir(cfg.cache), 0.0, cfg.cache.workers)
    return report_panels(net, cfg.model, dataset, data.labels, best["probs"], best["labels"],
                         best_thresholds(best, data.labels, cfg.metrics.threshold), cfg.report.saliency_positives,
                         cfg.report.saliency_negatives, volumes_per_pass=cfg.loader.batch_size)


def score_test_set(cfg: Config, net: torch.nn.Module, data: Splits, best: dict) -> dict:
    """The held-out test set's block of summary.json (the figures to publish)."""
    dataset = build_dataset(data.test, cfg.preprocess, disk_dir(cfg.cache), 0.0, cfg.cache.workers)
    device = next(net.parameters()).device
    return test_block(net, dataset, data.test, data.labels, str(cfg.data.task), best,
                      cfg.loader.val_batch_size or cfg.loader.batch_size, resolve_amp(cfg.train.amp, device),
                      cfg.data.patient_pattern, cfg.metrics)
