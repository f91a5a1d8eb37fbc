"""`python -m engine.run [train|evaluate|predict] [--config FILE] [key=value ...]`

Config errors are reported before MONAI or torch is imported, so they come back in well under 2 s."""

from __future__ import annotations

import argparse
import os
import sys

from engine.config import DEFAULT_CONFIG, describe_sections, load_config
from engine.errors import CT3DError

COMMANDS = ("train", "evaluate", "predict", "export", "check", "cache")


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
    except CT3DError as exc:
        print(f"ct3d: error: {exc}", file=sys.stderr)
        return 2


def dispatch(args: argparse.Namespace, cfg) -> int:
    from engine import export, inference, prepare, workflow
    from engine.build import setup_logging

    if args.command == "train":
        workflow.train(cfg)  # sets up logging per rank
        return 0
    setup_logging()
    if args.command == "check":
        return 1 if prepare.check(cfg) else 0
    if args.command == "cache":
        return 1 if prepare.cache(cfg, verify=args.verify)["problems"] else 0
    {"evaluate": inference.evaluate, "predict": inference.predict, "export": export.export}[args.command](cfg)
    return 0


def run_distributed(args: argparse.Namespace, cfg) -> int:
    import ignite.distributed as idist
    import torch

    if args.command != "train":
        raise CT3DError(f"{args.command} runs in one process; start it without torchrun")
    result = {}
    with idist.Parallel(backend="nccl" if torch.cuda.is_available() else "gloo") as parallel:
        parallel.run(lambda local_rank: result.update(rc=dispatch(args, cfg)))
    return result.get("rc", 0)


if __name__ == "__main__":
    sys.exit(main())
