"""The wiring: the one place that knows every part. Read `train` top to bottom to follow a run:
config -> datalists -> cached preprocessing -> loaders -> model, loss, optimizer -> MONAI trainer
and evaluator with handlers -> checkpoints, metrics.csv, summary.json."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from engine.config import to_yaml
from engine.data import Preprocessing, build_dataset
from engine.datalist import (
    IMAGE,
    LABEL,
    NAME,
    DatalistSpec,
    Problem,
    format_problems,
    label_frequencies,
    load_datalist,
    split,
)
from engine.errors import CT3DError
from engine.augment import AugmentSpec, DeviceAugmentation
from engine.checkpoint import find_latest_checkpoint, load_checkpoint, rng_state, set_rng_state
from engine.handlers import Checkpoints, MetricsTable, Progress, SyncBuffers, TrainStats, ValidationMetrics
from engine.io import write_text
from engine.models import ModelSpec, create_model
from engine.tracking import WandbTracker, new_run_id

log = logging.getLogger("ct3d")


def setup_logging(main: bool = True) -> None:
    """INFO lines on rank 0; other ranks only warn."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    log.setLevel(logging.INFO if main else logging.WARNING)
    for noisy in ("ignite", "monai"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


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


def make_evaluator(network, loader, device: torch.device, amp_dtype: torch.dtype | None, cfg: DictConfig,
                   labels: list[str], task: str, frequencies: list[float]):
    """A MONAI SupervisedEvaluator under the training's autocast, with every metric attached."""
    from monai.engines import SupervisedEvaluator

    fp16 = amp_dtype == torch.float16
    evaluator = SupervisedEvaluator(device=device, val_data_loader=loader, network=network,
                                    prepare_batch=prepare_batch, inferer=make_inferer(device, amp_dtype), amp=fp16,
                                    amp_kwargs={"dtype": torch.float16} if fp16 else None, decollate=False)
    validation = ValidationMetrics(labels, task, make_loss(cfg, task, frequencies), cfg.metrics.threshold,
                                   cfg.metrics.beta)
    validation.attach(evaluator)
    return evaluator, validation


def make_loss(cfg: DictConfig, task: str, frequencies: list[float]) -> torch.nn.Module:
    """BCE with logits and a capped pos_weight, cross entropy for multiclass, or focal loss."""
    if cfg.train.loss == "focal":
        from monai.losses import FocalLoss

        return FocalLoss(gamma=cfg.train.focal_gamma, use_softmax=task == "multiclass")
    if task == "multiclass":
        return torch.nn.CrossEntropyLoss()
    cap = cfg.train.pos_weight_cap
    if cap <= 0:
        return torch.nn.BCEWithLogitsLoss()
    pos_weight = [min(cap, (1 - f) / f) if f > 0 else cap for f in frequencies]
    return torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))


def datalist_spec(cfg: DictConfig, json_key: str) -> DatalistSpec:
    d = cfg.data
    return DatalistSpec(image_column=d.image_column, label_columns=tuple(d.label_columns), task=d.task,
                        num_classes=d.num_classes, image_root=d.image_root, layout=d.layout, json_key=json_key,
                        patient_column=d.patient_column)


def load_splits(cfg: DictConfig, problems: list[Problem] | None = None) -> tuple[list[dict], list[dict], list[str]]:
    """Train and validation items and the label names, from the demo, two datalists or a patient-wise
    split. Bad rows raise, or go to `problems` when given."""
    from engine.check import patient_of

    d = cfg.data
    train_path = d.train
    if d.demo.enabled:
        from engine.demo import generate

        train_path = str(generate(d.demo.dir, d.demo.num_volumes, tuple(d.demo.shape), d.demo.seed))
    train = load_datalist(train_path, datalist_spec(cfg, d.json_train_key), problems)
    val_path = d.val
    if not val_path and train_path.endswith(".json") and d.json_val_key in json.loads(Path(train_path).read_text()):
        val_path = train_path
    if val_path:
        val = load_datalist(val_path, datalist_spec(cfg, d.json_val_key), problems)
        if val.labels != train.labels:
            raise CT3DError(f"datalist {val_path}: labels {val.labels} differ from {train_path}'s {train.labels}")
        return train.items, val.items, train.labels
    train_items, val_items = split(train.items, d.val_fraction, d.split_seed,
                                   lambda item: patient_of(item, d.patient_pattern))
    return train_items, val_items, train.labels


def prepare_data(cfg: DictConfig, progress: bool = False,
                 strict: bool = True) -> tuple[list[dict], list[dict], list[str], list[Problem]]:
    """Every check before training, every problem at once: datalist rows, split (empty, patient in both),
    and every volume not yet in the disk cache read once (filling it). With data.on_error=skip, bad rows
    and volumes are returned as problems and left out; split problems always stop the run. With
    strict=False nothing raises: every problem, split ones included, is returned."""
    from engine.check import split_problems, volume_problems

    problems: list[Problem] = []
    train_items, val_items, labels = load_splits(cfg, problems)
    fatal = split_problems(train_items, val_items, cfg.data.patient_pattern)
    disk = cfg.cache.dir if cfg.cache.disk else None
    unreadable = volume_problems(train_items + val_items, preprocessing_of(cfg), disk, cfg.cache.workers, progress)
    problems += unreadable
    if not strict:
        problems = fatal + problems
    elif fatal or (problems and cfg.data.on_error == "raise"):
        hint = "" if fatal or not problems else "\n(data.on_error=skip leaves bad volumes out and lists them)"
        raise CT3DError(f"{len(fatal + problems)} problem(s) in the data:\n  {format_problems(fatal + problems, 50)}{hint}")
    bad = {p.name for p in unreadable}  # bad datalist rows were never made items
    return ([it for it in train_items if it[NAME] not in bad], [it for it in val_items if it[NAME] not in bad],
            labels, problems)


def write_skipped(folder: Path, problems: list[Problem]) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["volume", "where", "problem"])
    writer.writerows([p.name, p.where, p.message] for p in problems)
    write_text(folder / "skipped.csv", buf.getvalue())


def preprocessing_of(cfg: DictConfig) -> Preprocessing:
    p = cfg.preprocess
    return Preprocessing(orientation=p.orientation, spacing=tuple(p.spacing) if p.spacing is not None else None,
                         hu_window=tuple(p.hu_window), scale_range=tuple(p.scale_range),
                         spatial_size=tuple(p.spatial_size), resize=p.resize, dtype=p.dtype)


def model_spec_of(cfg: DictConfig, num_outputs: int) -> ModelSpec:
    m = cfg.model
    return ModelSpec(name=m.name, variant=str(m.variant), in_channels=m.in_channels, num_outputs=num_outputs,
                     spatial_size=tuple(cfg.preprocess.spatial_size), first_conv_stride=m.first_conv_stride,
                     widen_factor=m.widen_factor, patch_size=m.patch_size, dropout=m.dropout)


def make_loader(dataset, batch_size: int, shuffle: bool, cfg: DictConfig, device: torch.device, seed: int):
    """Training shuffles through a DistributedSampler (one replica when not distributed) whose order
    depends on (seed, epoch) alone, so a resumed run sees the batches an uninterrupted one would.
    Validation gives each rank every world-th sample, unpadded, so gathered metrics count each once."""
    import ignite.distributed as idist

    rank, world = idist.get_rank(), idist.get_world_size()
    sampler = None
    if shuffle:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    elif world > 1:
        dataset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world))
    workers = cfg.loader.num_workers
    share = len(sampler) if sampler is not None else len(dataset)
    # A last training batch of one sample breaks BatchNorm: drop it (the sampler reshuffles each epoch).
    drop_last = shuffle and share % batch_size == 1 and share > 1
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
        pin_memory=cfg.loader.pin_memory and device.type == "cuda", persistent_workers=workers > 0,
    )


def run_folder(cfg: DictConfig) -> Path:
    """output.dir/<output.name or model-start time>; every rank gets rank 0's name, only rank 0 makes it."""
    import ignite.distributed as idist

    name = cfg.output.name or f"{cfg.model.name}{cfg.model.variant}-{datetime.now():%Y%m%d-%H%M%S}"
    if idist.get_world_size() > 1:
        name = idist.broadcast(name if idist.get_rank() == 0 else None, src=0, safe_mode=True)
    folder = Path(cfg.output.dir) / name
    if idist.get_rank() == 0:
        (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    return folder


def summary_table(summary: dict, labels: list[str]) -> str:
    best, final = summary["best"], summary["final"]
    rows = [("", "best", "final"), ("epoch", str(best["epoch"]), str(final["epoch"]))]
    keys = ["val_loss", "auc_macro", "auc_micro", "fbeta_macro", "fbeta_micro", "precision", "recall",
            "specificity", "accuracy"] + [f"auc/{n}" for n in labels]
    rows += [(k, f"{best[k]:.4f}", f"{final[k]:.4f}") for k in keys if k in best]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>8}  {c:>8}" for a, b, c in rows)


def train(cfg: DictConfig) -> Path:
    """Trains per `cfg`; returns the run folder."""
    from monai.engines import SupervisedTrainer
    from monai.handlers import LrScheduleHandler, ValidationHandler
    from monai.optimizers import WarmupCosineSchedule
    from monai.utils import set_determinism
    from ignite.engine import Events
    import ignite.distributed as idist

    rank, world = idist.get_rank(), idist.get_world_size()
    main = rank == 0  # only rank 0 writes files, logs progress and talks to W&B
    setup_logging(main)
    start = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    set_determinism(seed=cfg.train.seed, use_deterministic_algorithms=cfg.train.deterministic or None)
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    task = cfg.data.task

    progress = sys.stderr.isatty() and main
    t0 = time.time()
    if not main:
        idist.barrier()  # rank 0 generates the demo and fills the disk cache first
    train_items, val_items, labels, skipped = prepare_data(cfg, progress)
    if main and world > 1:
        idist.barrier()
    folder = run_folder(cfg)
    if main:
        write_text(folder / "config.yaml", to_yaml(cfg))
    if skipped and main:
        write_skipped(folder, skipped)
        log.warning("left out %d bad volume(s) or row(s), listed in %s", len(skipped), folder / "skipped.csv")
    log.info("run folder %s; %d train / %d validation volumes; labels: %s", folder, len(train_items),
             len(val_items), ", ".join(labels))

    preprocessing = preprocessing_of(cfg)
    disk = cfg.cache.dir if cfg.cache.disk else None
    train_ds = build_dataset(train_items, preprocessing, disk, cfg.cache.memory_rate, cfg.cache.workers, progress)
    val_ds = build_dataset(val_items, preprocessing, disk, cfg.cache.memory_rate, cfg.cache.workers, progress)
    log.info("data ready in %.1f s (disk cache %s, RAM cache rate %.2f)", time.time() - t0,
             "on" if disk else "off", cfg.cache.memory_rate)
    train_loader = make_loader(train_ds, cfg.loader.batch_size, True, cfg, device, cfg.train.seed)
    val_loader = make_loader(val_ds, cfg.loader.val_batch_size or cfg.loader.batch_size, False, cfg, device, 0)

    spec = model_spec_of(cfg, len(labels) if task != "binary" else 1)
    net = create_model(spec).to(device)  # checkpoints hold this one's weights, without DDP's prefix
    model = idist.auto_model(net) if world > 1 else net
    frequencies = label_frequencies(train_items)
    loss_fn = make_loss(cfg, task, frequencies)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    if world > 1:
        optimizer = idist.auto_optim(optimizer)
    steps_per_epoch = len(train_loader)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=round(cfg.train.warmup_epochs * steps_per_epoch),
                                     t_total=cfg.train.epochs * steps_per_epoch)
    inferer = make_inferer(device, amp_dtype)
    fp16 = amp_dtype == torch.float16
    amp_kwargs = {"dtype": torch.float16} if fp16 else None

    # The plain network: ranks validate different numbers of batches, and DDP's forward is a collective.
    evaluator, validation = make_evaluator(net, val_loader, device, amp_dtype, cfg, labels, task, frequencies)
    best_outputs: dict = {}

    trainer = SupervisedTrainer(
        device=device, max_epochs=cfg.train.epochs, train_data_loader=train_loader, network=model,
        optimizer=optimizer, loss_function=loss_fn.to(device), prepare_batch=prepare_batch, inferer=inferer,
        amp=fp16, amp_kwargs=amp_kwargs, decollate=False, accumulation_steps=cfg.train.accumulation_steps,
        optim_set_to_none=True,  # as a hand-written loop does: no memset of every gradient each step
        train_handlers=[
            SyncBuffers(net),
            LrScheduleHandler(scheduler, epoch_level=False, print_lr=False),
            ValidationHandler(interval=cfg.train.val_every, validator=evaluator, epoch_level=True),
        ],
    )
    sampler = train_loader.sampler
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda engine: sampler.set_epoch(engine.state.epoch))
    if cfg.augment.enabled:
        a = cfg.augment
        spec_aug = AugmentSpec(a.flip_prob, a.affine_prob, tuple(a.rotate_degrees), tuple(a.scale_range), a.smooth_prob,
                               a.contrast_prob, a.noise_prob, a.noise_std, a.shift_prob, a.shift)
        DeviceAugmentation(spec_aug, device, cfg.train.seed + 1000 * rank).attach(trainer)
    stats = TrainStats(optimizer)
    stats.attach(trainer)
    if main:
        Progress(stats, cfg.train.log_every).attach(trainer)
    table = MetricsTable(folder / "metrics.csv", cfg.metrics.key, stats, labels, cfg.metrics.mode, write=main)
    stopper = None
    if cfg.train.early_stopping_patience > 0:
        from ignite.handlers import EarlyStopping

        sign = 1.0 if cfg.metrics.mode == "max" else -1.0
        key = cfg.metrics.key
        stopper = EarlyStopping(cfg.train.early_stopping_patience, lambda e: _score(sign, e.state.metrics[key]),
                                trainer, min_delta=cfg.train.early_stopping_min_delta)
        evaluator.add_event_handler(Events.COMPLETED, stopper)
    validated_at = {"epoch": 0}
    evaluator.add_event_handler(Events.STARTED, lambda _: log.info("validating epoch %d", trainer.state.epoch))
    evaluator.add_event_handler(Events.COMPLETED, lambda _: validated_at.update(epoch=trainer.state.epoch))

    def checkpoint_state() -> dict:
        return {
            "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
            "trainer": {"epoch": trainer.state.epoch, "iteration": trainer.state.iteration},
            "metrics_table": table.state_dict(), "labels": labels, "task": task,
            "model_spec": asdict(spec), "preprocessing": asdict(preprocessing),
            "threshold": cfg.metrics.threshold, "rng": rng_state(),
            "early_stopping": stopper.state_dict() if stopper is not None else None,
            "stopped_early": bool(trainer.should_terminate), "train_stats": stats.state_dict(),
            "best_outputs": best_outputs, "wandb_id": wandb_id,
        }

    checkpoints = Checkpoints(folder / "checkpoints", checkpoint_state, write=main)

    @trainer.on(Events.EPOCH_COMPLETED)
    def after_epoch(engine) -> None:
        epoch, improved = engine.state.epoch, False
        if validated_at["epoch"] != epoch and epoch == engine.state.max_epochs:
            evaluator.run(epoch)  # the last epoch is always validated
        if validated_at["epoch"] == epoch:
            improved = table.record(engine, evaluator)
            m = evaluator.state.metrics
            log.info("epoch %d validation: loss %.4f, AUC macro %.4f, F%g macro %.4f%s", epoch, m["val_loss"],
                     m["auc_macro"], cfg.metrics.beta, m["fbeta_macro"], " (best)" if improved else "")
            if improved:
                best_outputs.update(probs=validation.last_probs, labels=validation.last_labels)
        checkpoints.save(*(["best"] if improved else []), "last")

    resume_from = resume_checkpoint(cfg.train.resume, folder / "checkpoints")
    if world > 1:  # rank 0 may be writing: every rank loads the file rank 0 chose
        chosen = idist.broadcast(str(resume_from or "") if main else None, src=0, safe_mode=True)
        resume_from = Path(chosen) if chosen else None
    done, state = False, None
    if resume_from is not None:
        state = load_checkpoint(resume_from, map_location=device)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scheduler.t_total = cfg.train.epochs * steps_per_epoch  # a raised train.epochs extends the schedule
        if trainer.scaler is not None and state["scaler"] is not None:
            trainer.scaler.load_state_dict(state["scaler"])
        if stopper is not None and state["early_stopping"] is not None:
            stopper.load_state_dict(state["early_stopping"])
        table.load_state_dict(state["metrics_table"])
        stats.load_state_dict(state["train_stats"])
        best_outputs.update(state["best_outputs"])
        set_rng_state(state["rng"])
        epoch = state["trainer"]["epoch"]
        done = state["stopped_early"] or epoch >= cfg.train.epochs
        trainer.load_state_dict({"epoch": epoch, "max_epochs": max(epoch, cfg.train.epochs),
                                 "epoch_length": steps_per_epoch})
        log.info("resumed from %s at epoch %d%s", resume_from, epoch, " (already finished)" if done else "")
    wandb_id = (state or {}).get("wandb_id") or new_run_id()  # a resumed run continues its W&B run
    tracker = None
    if cfg.tracking.wandb.mode != "disabled" and main:
        w = cfg.tracking.wandb
        tracker = WandbTracker(w.mode, w.project, w.entity, list(w.tags), folder,
                               OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))), wandb_id, folder.name)
        tracker.attach(trainer, evaluator, lambda: stats.lr)
    if not done:
        log.info("training %s%s on %s for %d epochs (%d iterations each)%s", spec.name, spec.variant, device,
                 cfg.train.epochs, steps_per_epoch, f", autocast {amp_dtype}" if amp_dtype else "")
        try:
            trainer.run()
        finally:
            checkpoints.wait()
        checkpoints.save("final", background=False)
    if not table.rows:
        raise CT3DError(f"run {folder}: no validation was recorded; nothing to summarise")

    summary = {
        "run": str(folder), "labels": labels, "task": task, "device": str(device),
        "train_volumes": len(train_items), "val_volumes": len(val_items), "skipped": len(skipped),
        "key_metric": cfg.metrics.key,
        "best_epoch": table.best["epoch"], "best": table.best, "final": table.rows[-1],
        "stopped_early": bool(trainer.should_terminate or (state and state["stopped_early"])),
        "wall_seconds": round(time.time() - start, 1), "epoch_seconds": stats.epoch_seconds,
    }
    if main:
        write_outputs(folder, summary, table, stats, best_outputs, labels, task, cfg, tracker)
    if world > 1:
        idist.barrier()  # every rank leaves together: tearing down the group under a busy peer aborts
    return folder


def write_outputs(folder: Path, summary: dict, table: MetricsTable, stats: TrainStats, best_outputs: dict,
                  labels: list[str], task: str, cfg: DictConfig, tracker) -> None:
    """Rank 0's closing files: summary.json, the report, the W&B run's end, the printed table."""
    write_text(folder / "summary.json", json.dumps(_finite(summary), indent=2))
    report_png = None
    if best_outputs:
        from engine.report import write_report

        report_png, _ = write_report(folder, table.rows, stats.lr_history, best_outputs["probs"],
                                     best_outputs["labels"], labels, task, cfg.metrics.threshold, cfg.metrics.beta,
                                     summary, to_yaml(cfg))
    if tracker is not None:
        tracker.finish(report_png, folder / "checkpoints" / "best.pt", summary)
    print(f"\nct3d run {folder} finished in {summary['wall_seconds']:.0f} s\n{summary_table(summary, labels)}")


def check(cfg: DictConfig) -> int:
    """`check`: every data problem at once; returns the number of problems found (0: all good)."""
    setup_logging()
    train_items, val_items, _, problems = prepare_data(cfg, sys.stderr.isatty(), strict=False)
    if problems:
        print(f"ct3d check: {len(problems)} problem(s):\n  {format_problems(problems, 10_000)}")
        return len(problems)
    print(f"ct3d check: {len(train_items)} train and {len(val_items)} validation volumes, no problems")
    return 0


def cache(cfg: DictConfig, verify: bool = False) -> dict:
    """`cache`: fill the disk cache ahead of training; with verify, also remove corrupt and stale entries."""
    from engine.check import verify_cache

    setup_logging()
    if not cfg.cache.disk:
        raise CT3DError("config error: cache.disk: the disk cache is off; nothing to fill")
    problems: list[Problem] = []
    train_items, val_items, _ = load_splits(cfg, problems)
    items, progress = train_items + val_items, sys.stderr.isatty()
    if verify:
        counts = verify_cache(items, preprocessing_of(cfg), cfg.cache.dir, cfg.cache.workers, progress)
    else:
        from engine.check import volume_problems

        bad = volume_problems(items, preprocessing_of(cfg), cfg.cache.dir, cfg.cache.workers, progress)
        counts = {"volumes": len(items), "problems": len(bad), "problem_list": [str(b) for b in bad]}
    counts["problems"] += len(problems)  # bad datalist rows count too (the exit code says so)
    counts["problem_list"] = [str(p) for p in problems] + counts["problem_list"]
    listed = "".join(f"\n  {p}" for p in counts["problem_list"])
    print(f"ct3d cache {cfg.cache.dir}: " + ", ".join(f"{k} {v}" for k, v in counts.items() if k != "problem_list")
          + listed)
    return counts


def load_trained_model(path: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The network of a ct3d checkpoint, in eval mode, and the checkpoint's dict."""
    if not path:
        raise CT3DError("config error: checkpoint: give the checkpoint to load, e.g. checkpoint=runs/x/checkpoints/best.pt")
    state = load_checkpoint(path)
    spec = _from_saved(ModelSpec, state["model_spec"])
    model = create_model(spec)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def _checkpoint_preprocessing(state: dict) -> Preprocessing:
    return _from_saved(Preprocessing, state["preprocessing"])


def _from_saved(cls, fields: dict):
    """A frozen dataclass back from a checkpoint, where its tuples were saved as lists."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def evaluate(cfg: DictConfig) -> dict:
    """Every validation metric of a checkpoint on the config's validation datalist (or split)."""
    setup_logging()
    device = resolve_device(cfg.train.device)
    model, state = load_trained_model(cfg.checkpoint, device)
    train_items, val_items, labels = load_splits(cfg)
    if labels != state["labels"]:
        raise CT3DError(f"datalist labels {labels} differ from the checkpoint's {state['labels']}")
    preprocessing = _checkpoint_preprocessing(state)
    dataset = build_dataset(val_items, preprocessing, cfg.cache.dir if cfg.cache.disk else None,
                            cfg.cache.memory_rate, cfg.cache.workers, sys.stderr.isatty())
    loader = make_loader(dataset, cfg.loader.val_batch_size or cfg.loader.batch_size, False, cfg, device, 0)
    amp_dtype = resolve_amp(cfg.train.amp, device)
    evaluator, _ = make_evaluator(model, loader, device, amp_dtype, cfg, labels, state["task"],
                                  label_frequencies(train_items))
    evaluator.run()
    metrics = dict(evaluator.state.metrics)
    folder = Path(cfg.output.dir) / (cfg.output.name or f"evaluate-{datetime.now():%Y%m%d-%H%M%S}")
    result = {"checkpoint": str(cfg.checkpoint), "epoch": state["trainer"]["epoch"], "volumes": len(val_items),
              "labels": labels, "metrics": metrics}
    write_text(folder / "evaluation.json", json.dumps(_finite(result), indent=2))
    width = max(len(k) for k in metrics)
    print(f"\nct3d evaluate {cfg.checkpoint} on {len(val_items)} volumes -> {folder}")
    print("\n".join(f"{k:<{width}}  {v:.4f}" for k, v in metrics.items()))
    return metrics


VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")


def list_volumes(source: str, cfg: DictConfig) -> list[dict]:
    """Items {"image", "name"} from a datalist, one volume, or a folder of volumes and DICOM series folders."""
    from engine.datalist import resolve_image

    path = Path(source)
    if not source or not path.exists():
        raise CT3DError(f"config error: input: {source!r} does not exist (a datalist, a volume or a folder)")
    if path.is_file() and path.suffix.lower() in (".csv", ".json"):
        if path.suffix.lower() == ".json":
            names = [str(e["image"]) for e in json.loads(path.read_text()).get(cfg.data.json_train_key, [])]
        else:
            import csv

            with open(path, newline="") as f:
                names = [row[cfg.data.image_column] for row in csv.DictReader(f)]
        root = Path(cfg.data.image_root) if cfg.data.image_root else path.parent
        items = [{IMAGE: str(resolve_image(n, root, cfg.data.layout)), "name": n} for n in names]
        missing = [it[IMAGE] for it in items if not Path(it[IMAGE]).exists()]
        if missing:
            raise CT3DError(f"datalist {path}: {len(missing)} volume(s) missing, e.g. {missing[0]}")
        return items
    if path.is_file() or any(p.suffix.lower() == ".dcm" for p in path.iterdir()):
        return [{IMAGE: str(path), "name": path.name}]
    items = []
    for entry in sorted(path.iterdir()):
        is_volume = entry.is_file() and entry.name.lower().endswith(VOLUME_SUFFIXES) and entry.suffix != ".dcm"
        is_series = entry.is_dir() and any(p.suffix.lower() == ".dcm" for p in entry.iterdir())
        if is_volume or is_series:
            items.append({IMAGE: str(entry), "name": entry.name})
    if not items:
        raise CT3DError(f"input {path}: no volumes (NIfTI, NRRD, MHA files or DICOM series folders) found")
    return items


def predict(cfg: DictConfig) -> Path:
    """predictions.csv: one row per volume, one probability column per label of the checkpoint."""
    import csv
    import io

    from engine.metrics import probabilities

    setup_logging()
    device = resolve_device(cfg.train.device)
    model, state = load_trained_model(cfg.checkpoint, device)
    items = list_volumes(cfg.input, cfg)
    for it in items:
        it[LABEL] = [0.0]  # Labelled wants a label; predictions ignore it
    dataset = build_dataset(items, _checkpoint_preprocessing(state), None, 0.0, cfg.cache.workers)
    loader = make_loader(dataset, cfg.loader.val_batch_size or cfg.loader.batch_size, False, cfg, device, 0)
    inferer = make_inferer(device, resolve_amp(cfg.train.amp, device))
    rows = []
    with torch.no_grad():
        for batch in loader:
            image, _ = prepare_batch(batch, device)
            rows.extend(probabilities(inferer(image, model), state["task"]).cpu().tolist())
    labels = state["labels"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["VolumeName", *labels])
    for it, probs in zip(items, rows):
        writer.writerow([it["name"], *(f"{p:.6f}" for p in probs)])
    folder = Path(cfg.output.dir) / (cfg.output.name or f"predict-{datetime.now():%Y%m%d-%H%M%S}")
    write_text(folder / "predictions.csv", buf.getvalue())
    print(f"ct3d predict: {len(items)} volume(s) -> {folder / 'predictions.csv'}")
    return folder / "predictions.csv"


def _score(sign: float, value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else sign * value


def resume_checkpoint(resume: str, folder: Path) -> Path | None:
    """train.resume: auto (latest readable checkpoint in the run folder, if any), off, or a path."""
    if resume == "off":
        return None
    if resume == "auto":
        return find_latest_checkpoint(folder)
    if not Path(resume).is_file():
        raise CT3DError(f"config error: train.resume: {resume!r} is not auto, off or an existing checkpoint")
    return Path(resume)


def _finite(value):
    """JSON has no NaN: NaN becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
