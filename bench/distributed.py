"""Two ranks (gloo, this machine): what a training step adds to DDP's own traffic (bench/counting.py, run by
bench/sync_worker.py under torchrun), and the start-up of a restart. Each is measured for this tree and, where
git has it, for BEFORE (the commit before #23's changes) in a temporary worktree: the same data, settings and
measurement on both sides."""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from bench.common import ROOT, demo_training
from bench.counting import classify
from bench.rows import Row, row, seconds_range

BEFORE = "88b5574"  # main before #23: per-step all-reduces, every rank reading the datalists and the checkpoint twice


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(tree: Path, program: list[str], overrides: list[str], env: dict | None = None, ranks: int = 2
             ) -> subprocess.CompletedProcess:
    """`ranks` ranks (two; the smoke's one) on this machine, with the engine of `tree` (PYTHONPATH and working
    directory)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc-per-node={ranks}",
           "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{_port()}", *program, *overrides]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(env or {})}
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark: two-rank run in {tree} failed:\n{proc.stderr[-3000:]}")
    return proc


@contextmanager
def before_tree(enabled: bool):
    """A worktree of BEFORE (None when off, or when this checkout lacks git or the commit)."""
    if not enabled:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ct3d-before-") as tmp:
        tree = Path(tmp) / "tree"
        made = subprocess.run(["git", "worktree", "add", "--detach", str(tree), BEFORE], cwd=ROOT,
                              capture_output=True, text=True)
        try:
            yield tree if made.returncode == 0 else None
        finally:
            if made.returncode == 0:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, capture_output=True)


def step_counts(tree: Path, work: Path, tag: str, cfg: dict) -> dict:
    n, log_every, batch = cfg["steps_volumes"], 5, 2
    counts = work / f"{tag}-counts.json"
    overrides = ["data.demo.enabled=true", *demo_training(work, "steps", n, 16), f"output.name={tag}",
                 "train.epochs=2", f"train.log_every={log_every}", f"loader.batch_size={batch}",
                 "augment.enabled=false", "model.widen_factor=0.25", "train.threads=1", "data.val_fraction=0.2"]
    torchrun(tree, [str(ROOT / "bench" / "sync_worker.py")], overrides, {"CT3D_COUNTS": str(counts)},
             cfg["ranks"])
    per_iteration = json.loads(counts.read_text())
    summary = json.loads((work / "steps-runs" / tag / "summary.json").read_text())
    epoch_length = len(per_iteration) // summary["final"]["epoch"]
    return {**classify(per_iteration, epoch_length, log_every), "log_every": log_every, "ranks": cfg["ranks"]}


def bench_steps(cfg: dict, work: Path) -> dict:
    """Host reads and collectives per training step, 2 ranks: this tree's and BEFORE's."""
    figures = {f"steps_{k}": v for k, v in step_counts(ROOT, work, "now", cfg).items()}
    with before_tree(cfg["steps_before"]) as tree:
        if tree is not None:
            figures.update({f"steps_before_{k}": v for k, v in step_counts(tree, work, "before", cfg).items()})
            figures["steps_before_commit"] = BEFORE
    return figures


def restart_seconds(tree: Path, overrides: list[str], ranks: int = 2) -> float:
    """A two-rank start of a finished run (resume: the run is found finished): its start-up phase, from train()'s
    start to the trainer's (datalists, file checks, the checkpoint's reads, data sets, network), as rank 0's
    summary.json records it."""
    torchrun(tree, ["-m", "engine.run", "train"], overrides, ranks=ranks)
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("output.name="))
    folder = next(o.split("=", 1)[1] for o in overrides if o.startswith("output.dir="))
    return json.loads((Path(folder) / name / "summary.json").read_text())["phases"]["start_up"]


def bench_restart(cfg: dict, work: Path) -> dict:
    """Start-up of a 2-rank restart on `restart_volumes` phantoms (16^3, warm disk cache, no RAM cache so the
    figure is the start-up's own work) with the checkpoint of `restart_model` (ResNet-18 at full size: weights and
    AdamW state): this tree vs BEFORE, alternating, `restart_repeats` times each, after a first run that is not
    measured (`restart_warm`; the smoke measures that first run: it checks the figures come out, not their size)."""
    n, ranks = cfg["restart_volumes"], cfg["ranks"]
    base = ["data.demo.enabled=true", *demo_training(work, "restart", n, 16), "train.epochs=1", "train.resume=auto",
            "loader.batch_size=8", "cache.memory_rate=0", *cfg["restart_model"],
            "augment.enabled=false", "tracking.wandb.mode=disabled", "report.saliency_positives=0",
            "report.saliency_negatives=0", "train.threads=1"]
    figures: dict = {"restart_volumes": n, "restart_ranks": ranks}
    with before_tree(cfg["restart_before"]) as tree:
        sides = {"now": ROOT, **({"before": tree} if tree is not None else {})}
        if tree is not None:
            figures["restart_before_commit"] = BEFORE
        if cfg["restart_warm"]:  # the first run trains the epoch (and fills the cache): not measured
            for tag, where in sides.items():
                restart_seconds(where, [*base, f"output.name={tag}"], ranks)
        for _ in range(cfg["restart_repeats"]):
            for tag, where in sides.items():
                seconds = restart_seconds(where, [*base, f"output.name={tag}"], ranks)
                figures.setdefault(f"restart_{tag}_all", []).append(seconds)
        checkpoint = work / "restart-runs" / "now" / "checkpoints" / "last.pt"
        figures["restart_checkpoint_mb"] = checkpoint.stat().st_size / 1e6
    for key in [k for k in figures if k.endswith("_all")]:
        figures[key.replace("_all", "_median")] = statistics.median(figures[key])
    return figures


def rows(f: dict) -> list[Row]:
    """What a training step adds to DDP's traffic, and a restart's start-up."""
    rows = []
    if "steps_plain_steps" in f:
        every = f["steps_log_every"]

        def per(prefix: str) -> tuple[float, float, float, float]:
            plain, logging = f[f"{prefix}plain_steps"], f[f"{prefix}logging_steps"]
            return (f[f"{prefix}plain_collectives"] / plain, f[f"{prefix}logging_collectives"] / logging,
                    f[f"{prefix}plain_reads"] / plain, f[f"{prefix}logging_reads"] / logging)

        collectives, logging_collectives, reads, logging_reads = per("steps_")
        before = per("steps_before_") if "steps_before_plain_steps" in f else None
        was = f"; before ({f.get('steps_before_commit')}): " if before else ""
        what = (f"{f.get('steps_ranks', 2)} ranks (gloo), train.log_every={every}, per step outside logging steps "
                f"and per logging step (every "
                f"{every}th and each epoch's last): ")
        # two-sided: a counter that saw nothing would read 0 everywhere, so the logging step must show its one
        rows.append(row(what + "collectives besides DDP's", f"{collectives:.2f}, {logging_collectives:.2f}"
                        + (f"{was}{before[0]:.2f}, {before[1]:.2f}" if before else ""),
                        "0 outside logging steps; exactly 1 on one", collectives == 0 and logging_collectives == 1))
        rows.append(row(what + "host reads of a tensor (item, tolist, bool, float, int, numpy)",
                        f"{reads:.2f}, {logging_reads:.2f}"
                        + (f"{was}{before[2]:.2f}, {before[3]:.2f}" if before else ""),
                        "0 outside logging steps; >= 1 on one", reads == 0 and logging_reads >= 1))
    if "restart_now_all" in f:
        now = f["restart_now_all"]
        what = (f"{f.get('restart_ranks', 2)}-rank restart of a finished run on {f['restart_volumes']} volumes "
                f"(warm disk cache, "
                f"{f['restart_checkpoint_mb']:.0f} MB checkpoint): start-up (datalists, file checks, checkpoint reads, "
                f"data sets, network)")
        if "restart_before_all" in f:
            before = f["restart_before_all"]
            ratio = statistics.median(now) / statistics.median(before)
            rows.append(row(f"{what}, now vs before ({f.get('restart_before_commit', 'BEFORE')})",
                            f"{seconds_range(now)} vs {seconds_range(before)} ({ratio:.2f}x)"))
        else:
            rows.append(row(what, seconds_range(now)))
    return rows
