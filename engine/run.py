"""`python -m engine.run [train|evaluate|predict|export|check|cache|embed|cv|sweep] [--config FILE] [key=value ...]`

Config errors are reported before MONAI or torch is imported, so they come back in well under 2 s."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from engine.config.loading import DEFAULT_CONFIG, load_config
from engine.config.reference import help_text
from engine.launch import USER_ERROR_FILE, count_attempt
from engine.utils.errors import (
    EXIT_INTERRUPTED,
    EXIT_NODE_FAULT,
    EXIT_RETRIES_SPENT,
    EXIT_RETRYABLE,
    EXIT_USER_ERROR,
    CT3DError,
    Interrupted,
    NodeFault,
    Transient,
)

COMMANDS = ("train", "evaluate", "predict", "export", "check", "cache", "embed", "cv", "sweep")


def key_help(argv: list[str]) -> str | None:
    """`--help PREFIX` (or -h PREFIX): the reference of the keys under PREFIX; None for any other command line."""
    for flag in ("--help", "-h"):
        if flag in argv and argv.index(flag) + 1 < len(argv) and not argv[argv.index(flag) + 1].startswith("-"):
            prefix = argv[argv.index(flag) + 1]
            text = help_text(prefix)
            if not text:
                raise CT3DError(f"--help {prefix}: no config key is or starts with {prefix!r}; `--help` lists them")
            return f"{prefix}: each key (type, default; accepted values) and its meaning\n{text}"
    return None


class Parser(argparse.ArgumentParser):
    """The key reference (it reads the schema's source) is put in the epilog only when help is printed, not on
    every start."""

    def format_help(self) -> str:
        self.epilog = ("Override any key as section.key=value (e.g. train.epochs=3 model.name=densenet3d "
                       "output.dir=/some/where). `--help PREFIX` shows the keys under PREFIX (e.g. --help model). "
                       "Keys (type, default; accepted values), each with its meaning:\n" + help_text())
        return super().format_help()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = Parser(
        prog="python -m engine.run",
        description="Train, evaluate or apply a 3D CT classifier. With no arguments: trains the demo model "
                    "on generated chest-CT phantoms.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML config (default: configs/default.yaml, the demo)")
    parser.add_argument("--verify", action="store_true", help="cache: also find and rebuild corrupt or stale entries")
    parser.add_argument("--shard", metavar="I/N", help="cache, embed: fill the I-th of N disjoint shares (0-based); "
                        "default from JOB_COMPLETION_INDEX and JOB_COMPLETIONS when set (a Kubernetes Indexed Job), "
                        "else 0/1")
    parser.add_argument("--quick", action="store_true", help="check: the config, the datalists and that every "
                        "volume is present, without reading volumes (exit 2 on a user error: a pod's first step)")
    parser.add_argument("words", nargs="*", metavar="[command] key=value",
                        help=f"command, one of {', '.join(COMMANDS)} (default train), then overrides")
    args = parser.parse_intermixed_args(argv)  # `evaluate --config F key=value`: words on both sides
    args.command = args.words.pop(0) if args.words and args.words[0] in COMMANDS else "train"
    args.overrides = args.words
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # not under torchrun: a rank keeps the default action (it dies at once, in a C++ wait too; the launcher says 143)
    if threading.current_thread() is threading.main_thread() and "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
        try:
            return run_command(argv)
        finally:
            signal.signal(signal.SIGTERM, previous)
    return run_command(argv)


def run_command(argv: list[str]) -> int:
    """The command line's work, its exit code."""
    try:
        text = key_help(argv)
    except CT3DError as exc:
        print(f"ct3d: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    if text is not None:
        print(text)
        return 0
    args = parse_args(argv)
    try:
        if args.command == "check":  # a pod's first step counts the pod's start (PyTorchJob: see engine.launch)
            spent = count_attempt(dict(os.environ))
            if spent is not None:
                print(spent, file=sys.stderr)
                return EXIT_RETRIES_SPENT
        cfg = load_config(args.config or DEFAULT_CONFIG, args.overrides, args.command)
        # After the config is valid: MONAI and torch take ~6 s to import (a config error or --help: 0.1 s).
        from engine import commands

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: ignite.distributed sets up the group
            return commands.run_distributed(args.command, cfg)
        return commands.dispatch(args, cfg)
    except Interrupted as exc:
        print(f"ct3d: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED  # 128 + SIGTERM, as a process ended by the signal reports
    except CT3DError as exc:
        print(f"ct3d: error: {exc}", file=sys.stderr)
        # a node fault and a transient failure are retried by every kind; a user error is the same every time
        code = EXIT_NODE_FAULT if isinstance(exc, NodeFault) else EXIT_RETRYABLE if isinstance(
            exc, Transient) else EXIT_USER_ERROR
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # under torchrun: say why, for engine.launch's exit code
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler  # torch: see above

            ErrorHandler().record_exception(exc)
        if code == EXIT_USER_ERROR and os.environ.get(USER_ERROR_FILE):  # engine.launch stops torchrun at once
            with open(os.environ[USER_ERROR_FILE], "a") as f:
                f.write(f"{exc}\n")
        return code


def stop_on_sigterm(signum, frame) -> None:
    """SIGTERM outside the training loop (the loop notes it and checkpoints: checkpoint.Checkpoints): leave now,
    exit 143. Installed first, so a pod preempted during start-up frees its GPU in seconds, and a Python process
    that is a pod's PID 1 (which the kernel spares the signal's default action) stops at all. os._exit, not an
    exception: one raised here can land inside an import (numpy left half-initialised: seen) or a library's
    callback; every file we write is written atomically, so leaving loses nothing but the work in progress."""
    os.write(2, b"ct3d: stopped by SIGTERM outside the training loop (during start-up, or in the closing after "
                b"the last checkpoint): run again to continue\n")  # not sys.stderr: it may be mid-write
    os._exit(EXIT_INTERRUPTED)


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


if __name__ == "__main__":
    console()
