"""The commands of `python -m engine.run` once the config is valid: each one's entry from the whole config,
in this process or (train) on every rank under torchrun. engine.run imports this module only after the config
checks, so a config error or --help never waits for torch and MONAI."""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta

import ignite.distributed as idist

from engine.config.schema import Config
from engine.data import prepare
from engine.data.prepare import disk_dir, load_splits
from engine.data.sharing import parse_shard
from engine.experiments import cv, sweep
from engine.serving import commands as serving
from engine.training import embeddings, workflow
from engine.training.build import make_network, resolve_amp, resolve_device, setup_logging, setup_torch
from engine.training.ranks import init_process_group
from engine.utils.errors import EXIT_USER_ERROR, CT3DError, Transient


def dispatch(args: argparse.Namespace, cfg: Config) -> int:
    """Runs `args.command` in this process; its exit code."""
    if args.command == "train":
        workflow.train(cfg)  # sets up logging per rank
        return 0
    setup_logging()
    if args.command in ("cv", "sweep"):
        {"cv": cv.cv, "sweep": sweep.sweep}[args.command](cfg)
        return 0
    if args.quick and args.command != "check":
        raise CT3DError(f"--quick is for the check command, not {args.command}")
    if args.shard is not None and args.command not in ("cache", "embed"):
        raise CT3DError(f"--shard is for the cache and embed commands, not {args.command}")
    if args.command == "check":
        if args.quick:
            prepare.check_lists(cfg.data, cfg.cache, cfg.output.dir)
            return 0
        return 1 if prepare.check(cfg.data, cfg.preprocess, cfg.cache, cfg.output.dir) else 0
    if args.command == "cache":
        counts = prepare.fill_cache(cfg.data, cfg.preprocess, cfg.cache, verify=args.verify,
                                    shard_of=parse_shard(args.shard))
        return EXIT_USER_ERROR if counts["problems"] else 0  # bad volumes stay bad: a retry would not help
    if args.command == "embed":
        counts = embed(cfg, parse_shard(args.shard))
        print(f"ct3d embed: {counts['extracted']} volume(s) extracted, {counts['cached']} already cached, of "
              f"{counts['owned']} this shard owns ({counts['volumes']} listed) -> {counts['folder']}"
              + "".join(f"\n  {p}" for p in counts["problems"]))
        return EXIT_USER_ERROR if counts["problems"] else 0  # bad volumes stay bad: a retry would not help
    {"evaluate": serving.evaluate, "predict": serving.predict, "export": serving.export}[args.command](cfg)
    return 0


def embed(cfg: Config, shard: tuple[int, int] = (0, 1)) -> dict:
    """`embed [--shard I/N]`, ahead of training a probe: the frozen encoder's embedding of every training and
    validation volume this shard owns and the cache lacks; returns counts, each bad volume a Problem."""
    if not embeddings.applies(cfg.model, cfg.augment, cfg.cache):
        raise CT3DError("config error: embed: for the run that reads embeddings: model.name=merlin|ctfm, "
                        "model.freeze=true, augment.enabled=false, cache.embeddings=true")
    setup_torch(cfg.train)
    device = resolve_device(cfg.train.device)
    problems: list = []
    train_items, val_items, labels = load_splits(cfg.data, problems)  # bad rows: counted below
    net = make_network(cfg.model, len(labels), cfg.preprocess.spatial_size, device)
    precision = resolve_amp(cfg.train.amp, device)
    store = embeddings.open_cache(net, str(cfg.model.name), cfg.preprocess, cfg.cache, precision)
    counts = embeddings.extract(net.encoder, store, train_items + val_items, cfg.preprocess, disk_dir(cfg.cache),
                                device, precision, cfg.loader.val_batch_size or cfg.loader.batch_size,
                                cfg.cache.workers, shard, progress=sys.stderr.isatty())
    return {**counts, "folder": str(store.folder), "problems": problems + counts["problems"]}


def run_distributed(command: str, cfg: Config) -> int:
    """Under torchrun: one process group (NCCL on GPUs, gloo otherwise) with `train.dist_timeout_minutes`
    as its collectives' timeout, then `train` on every rank. This module's imports (seconds of MONAI) came
    before the group's first barrier, so a rank importing slower than another (a busy node) is not taken for
    one that fell behind."""
    if command != "train":
        raise CT3DError(f"{command} runs in one process; start it without torchrun")
    # the device before the group: a node without the GPU its pod asked for stops here (NodeFault, exit 151)
    # instead of joining with gloo while the other ranks use NCCL (a hang until the collectives' timeout)
    backend = "nccl" if resolve_device(cfg.train.device).type == "cuda" else "gloo"
    init_process_group(backend, timedelta(minutes=cfg.train.dist_timeout_minutes))
    try:
        workflow.train(cfg)
        return 0
    except RuntimeError as exc:  # a collective that waited longer than the timeout
        if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
            raise
        raise Transient(f"rank {idist.get_rank()}: waited more than train.dist_timeout_minutes="
                        f"{cfg.train.dist_timeout_minutes:g} for the other ranks ({str(exc).splitlines()[0]}). "
                        f"A rank was slower by that much (a cold cache on one node?): fill the cache first "
                        f"(`python -m engine.run cache --shard I/N`), or raise the timeout") from None
    finally:
        idist.finalize()
