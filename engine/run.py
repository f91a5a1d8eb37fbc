"""`python -m engine.run [train|evaluate|predict|export|check|cache|cv|sweep] [--config FILE] [key=value ...]`

Config errors are reported before MONAI or torch is imported, so they come back in well under 2 s."""

from __future__ import annotations

import argparse
import os
import sys

from engine.config.loading import DEFAULT_CONFIG, describe_sections, load_config
from engine.utils.errors import CT3DError, Interrupted, Transient

COMMANDS = ("train", "evaluate", "predict", "export", "check", "cache", "cv", "sweep")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m engine.run",
        description="Train, evaluate or apply a 3D CT classifier. With no arguments: trains the demo model "
                    "on generated chest-CT phantoms.",
        epilog="Override any key as section.key=value (e.g. train.epochs=3 model.name=densenet3d "
               "output.dir=/some/where). Sections and keys:\n" + describe_sections(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml, the demo)")
    parser.add_argument("--verify", action="store_true", help="cache: also find and rebuild corrupt or stale entries")
    parser.add_argument("--shard", metavar="I/N", help="cache: fill the I-th of N disjoint shares (0-based); default "
                        "from JOB_COMPLETION_INDEX and JOB_COMPLETIONS when set (a Kubernetes Indexed Job), else 0/1")
    parser.add_argument("--quick", action="store_true", help="check: the config, the datalists and that every "
                        "volume is present, without reading volumes (exit 2 on a user error: a pod's first step)")
    parser.add_argument("words", nargs="*", metavar="[command] key=value",
                        help=f"command, one of {', '.join(COMMANDS)} (default train), then overrides")
    args = parser.parse_intermixed_args(argv)  # `evaluate --config F key=value`: words on both sides
    args.command = args.words.pop(0) if args.words and args.words[0] in COMMANDS else "train"
    args.overrides = args.words
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides, args.command)
        # heavy imports (torch, MONAI) only after the config is valid: dispatch imports the workflow
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: ignite.distributed sets up the group
            return run_distributed(args, cfg)
        return dispatch(args, cfg)
    except Interrupted as exc:
        print(f"ct3d: {exc}", file=sys.stderr)
        return 143  # 128 + SIGTERM, as a process ended by the signal reports
    except Transient as exc:
        print(f"ct3d: error: {exc}", file=sys.stderr)
        return 1  # not a user error: a Job, JobSet or PyTorchJob retries it
    except CT3DError as exc:
        print(f"ct3d: error: {exc}", file=sys.stderr)
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # under torchrun: say why, for engine.launch (exit 2)
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(exc)
        from engine.launch import USER_ERROR_FILE

        if os.environ.get(USER_ERROR_FILE):  # engine.launch stops torchrun: no restart repeats a user error
            with open(os.environ[USER_ERROR_FILE], "a") as f:
                f.write(f"{exc}\n")
        return 2


def leave(code: int) -> int:
    """The process ends here once a command is done, skipping the interpreter's teardown (W&B's service is
    stopped first): tearing torch's and MONAI's modules down took 1.1 s after every run (2026-11-30, 2-core
    EPYC), and under torchrun gloo's threads sometimes aborted the process there ("terminate called without
    an active exception", exit -6) after a clean run, failing the whole job (seen 3 times in ~20 two-rank
    runs on 2026-11-26). Every file is written (atomically, fsynced) and every thread joined by now."""
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def console() -> None:
    """The `ct3d` script and `python -m engine.run`: main(), then leave()."""
    leave(main())


def dispatch(args: argparse.Namespace, cfg) -> int:
    from engine.data import prepare
    from engine.data.sharing import parse_shard
    from engine.serving import evaluation, export, inference
    from engine.training import workflow
    from engine.training.build import setup_logging

    if args.command == "train":
        workflow.train(cfg)  # sets up logging per rank
        return 0
    setup_logging()
    if args.command in ("cv", "sweep"):
        from engine.experiments import cv, sweep

        {"cv": cv.cv, "sweep": sweep.sweep}[args.command](cfg)
        return 0
    if args.quick and args.command != "check":
        raise CT3DError(f"--quick is for the check command, not {args.command}")
    if args.shard is not None and args.command != "cache":
        raise CT3DError(f"--shard is for the cache command, not {args.command}")
    if args.command == "check":
        if args.quick:
            prepare.check_lists(cfg)
            return 0
        return 1 if prepare.check(cfg) else 0
    if args.command == "cache":
        counts = prepare.cache(cfg, verify=args.verify, shard_of=parse_shard(args.shard))
        return 1 if counts["problems"] else 0
    {"evaluate": evaluation.evaluate, "predict": inference.predict, "export": export.export}[args.command](cfg)
    return 0


def init_process_group(backend: str, timeout) -> None:
    """The process group, then ignite.distributed on it. Our own: after a worker died, torchrun's c10d
    rendezvous hands the restarted workers the agent's shared store, which still holds the dead group's
    addresses, so each attempt (TORCHELASTIC_RESTART_COUNT) gets keys of its own. Without that sharing
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as our pods run) rank 0 hosts a new store each round and the
    attempt counts may differ (a replaced pod's agent starts from 0): no prefix then. The ranks meet on the store
    (under a start-up timeout of at least 10 minutes) before the group exists, so one rank starting seconds after
    another (imports on a busy node) does not count against the collectives' timeout."""
    from datetime import timedelta

    import ignite.distributed as idist
    import torch
    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        idist.initialize(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not hosted_by_agent, timeout=max(timeout, timedelta(minutes=10)))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    prefix = f"ct3d/attempt_{attempt}" if hosted_by_agent else "ct3d"
    meeting = dist.PrefixStore(f"{prefix}/started", store)
    if meeting.add("ranks", 1) == world:
        meeting.set("all", "1")
    meeting.wait(["all"])
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank,
                            world_size=world, timeout=timeout)
    idist.sync()


def run_distributed(args: argparse.Namespace, cfg) -> int:
    """Under torchrun: one process group (NCCL on GPUs, gloo otherwise) with `train.dist_timeout_minutes`
    as its collectives' timeout, then `train` on every rank."""
    from datetime import timedelta

    import ignite.distributed as idist
    import torch

    if args.command != "train":
        raise CT3DError(f"{args.command} runs in one process; start it without torchrun")
    # dispatch's imports (seconds of MONAI) before the group's first barrier, not between it and the first
    # collective: a rank importing slower than another (a busy node) is not taken for one that fell behind
    from engine.training import workflow  # noqa: F401

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    init_process_group(backend, timedelta(minutes=cfg.train.dist_timeout_minutes))
    try:
        return dispatch(args, cfg)
    except RuntimeError as exc:  # a collective that waited longer than the timeout
        if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
            raise
        raise Transient(f"rank {idist.get_rank()}: waited more than train.dist_timeout_minutes="
                        f"{cfg.train.dist_timeout_minutes:g} for the other ranks ({str(exc).splitlines()[0]}). "
                        f"A rank was slower by that much (a cold cache on one node?): fill the cache first "
                        f"(`python -m engine.run cache --shard I/N`), or raise the timeout") from None
    finally:
        idist.finalize()


if __name__ == "__main__":
    console()
