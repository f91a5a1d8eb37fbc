"""`python -m bench gpu`: the GPU's own figures at CT-RATE's shape (the CT-RATE config's final size and batch).
First ResNet-18's bf16 training step on data already on the GPU (the hand loop, bench/gpu_steps.py), then at once
whether the engine's loaders feed it (bench/gpu_feeding.py), then the engine's own training step (bench/gpu_engine.py)
beside the hand loop at batch 4, 8 and 16, then the other configurations (channels-last 3D, torch.compile,
ResNet-50, the pretrained CT encoders, cudnn.benchmark off). Volumes/s, GPU busy from torch.profiler's kernel time,
achieved TFLOP/s against the GPU's dense bf16 peak (bench/gpu_peaks.py: exact names only) and peak memory.

The run is sized for 8 minutes on one H100 by a time budget: rows run in priority order until one's estimate no
longer fits, and it and every row after it are dropped and named; the first model row and the feeding rows are
never dropped. A row that fails is reported failed. Writes bench/RESULTS-gpu.md (--out elsewhere); without CUDA it
says so and exits 0 (--require-cuda: exits 1, for a pod that asked for a GPU)."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from bench.common import ROOT
from bench.encoders import encoder_figures
from bench.gpu_engine import engine_step_figures
from bench.gpu_feeding import loader_figures
from bench.gpu_report import markdown
from bench.gpu_steps import train_step_figures
from bench.report import write_results
from engine.config import load_config

BUDGET_SECONDS = 420  # for the rows; with start-up (imports, CUDA) and the write-up the run stays within 8 minutes
FULL = dict(size=None, batch=None, batches=(4, 8, 16), warmup=3, steps=12, loader_volumes=64, loader_epochs=2,
            compile=True, variants=("18", "50"), widen=1.0, engine_volumes=112, budget=BUDGET_SECONDS,
            # the encoders at native size (configs/ct-rate-*.yaml), extraction at its loader.val_batch_size
            enc_sizes=None, enc_extract_batch=None, enc_finetune_batch={"merlin": 2, "ctfm": 1}, enc_steps=5,
            enc_repeats=3, enc_rows=47_000)
# widen 0.25 in the smoke: the code path at 1/16 of the weights (bf16 autocast is emulated on a CPU without
# AVX-512: ResNet-18 at full width took ~45 s of the smoke's CPU on an AVX2 EPYC); no budget: every row runs
SMOKE = dict(size=[16, 16, 16], batch=2, batches=(2, 4), warmup=1, steps=1, loader_volumes=4, loader_epochs=1,
             compile=False, variants=("18",), widen=0.25, engine_volumes=24, budget=None,
             enc_sizes={"merlin": (32, 32, 32), "ctfm": (32, 32, 32)}, enc_extract_batch=1,
             enc_finetune_batch={"merlin": 2, "ctfm": 2}, enc_steps=1, enc_repeats=1, enc_rows=4_700)


@dataclass
class Planned:
    """One row (or group of rows) of the benchmark: what it runs, its estimated seconds on one H100 (not yet
    measured on one: the results file lists each row's estimate beside what it took), and whether time may drop it."""
    group: str  # steps, feeding, engine, encoders: the results file's section
    name: str
    run: Callable[[], dict]
    estimate: float
    keep: bool = False
    order: tuple = ()  # its place in its section's table
    label: str = ""  # its name in that table
    figures: dict = field(default_factory=dict)
    seconds: float = 0.0


def step_name(variant: str, channels_last: bool, autotune: bool, compiled: bool) -> str:
    return (f"ResNet-{variant}, {'channels-last 3D' if channels_last else 'default layout'}, cudnn.benchmark "
            f"{'on' if autotune else 'off'}, torch.compile {'on' if compiled else 'off'}")


def plan(cfg: dict, size: list[int], first: int, device: torch.device, work: Path) -> list[Planned]:
    """Every row in priority order (the order time drops them in, from the end)."""
    def steps(variant="18", channels_last=False, autotune=True, compiled=False, batch=first, estimate=20.0,
              keep=False) -> Planned:
        config = (variant, channels_last, autotune, compiled)
        return Planned("steps", f"{step_name(*config)}, batch {batch}",
                       lambda: train_step_figures(*config, size, batch, device, cfg), estimate, keep,
                       (variant, channels_last, not autotune, compiled, batch), step_name(*config))

    def engine(batch: int, estimate: float) -> Planned:
        return Planned("engine", f"the engine's training step, batch {batch}",
                       lambda: engine_step_figures(work / "engine", size, batch, device, cfg), estimate, order=(batch,))

    others = [b for b in cfg["batches"] if b != first]
    rows = [steps(keep=True),
            Planned("feeding", f"the engine's loaders feeding ResNet-18, batch {first}",
                    lambda: loader_figures(work / "feeding", size, first, device, cfg), 60.0, keep=True),
            engine(first, 75.0)]  # the first engine row also makes and caches the phantoms
    for batch in others:
        rows += [steps(batch=batch), engine(batch, 40.0)]
    # then what model.channels_last's auto and train.compile are to be chosen from, then the rest
    rows += [steps(channels_last=True), steps(compiled=True, estimate=90.0), steps("50", estimate=25.0),
             Planned("encoders", "the pretrained CT encoders",
                     lambda: encoder_figures(cfg, str(device), cfg["enc_sizes"], in_process=True), 90.0),
             steps("50", channels_last=True, estimate=25.0), steps(autotune=False),
             steps("50", compiled=True, estimate=120.0), steps(channels_last=True, compiled=True, estimate=90.0)]
    return [r for r in rows if r.group != "steps" or (r.order[0] in cfg["variants"] and
                                                      (cfg["compile"] or not r.order[3]))]


def run_plan(rows: list[Planned], budget: float | None, device: torch.device, clock=time.monotonic) -> list[Planned]:
    """Runs `rows` in order until one that may be dropped (not `keep`) no longer fits what is left of `budget`
    seconds (None: no limit) by its estimate: it and every such row after it are dropped (the least important go
    first, never a cheaper one in their place), and said so on stderr. Returns the rows with figures and seconds."""
    start, spent = clock(), False
    for r in rows:
        left = None if budget is None else budget - (clock() - start)
        spent = spent or (left is not None and not r.keep and r.estimate > left)
        if spent and not r.keep:
            r.figures = {"dropped": f"time budget: ~{r.estimate:.0f} s estimated, {max(0.0, left):.0f} s left"}
            print(f"bench gpu: dropped {r.name} ({r.figures['dropped']})", file=sys.stderr, flush=True)
            continue
        began = clock()
        try:
            r.figures = r.run()
        except Exception as exc:  # noqa: BLE001 - a configuration this GPU or build cannot run is a finding
            r.figures = {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}
        r.seconds = clock() - began
        print(f"bench gpu: {r.name}: {r.seconds:.0f} s (estimated {r.estimate:.0f} s)", file=sys.stderr, flush=True)
        release(device)
    return rows


def release(device: torch.device) -> None:
    """The row's tensors and cached blocks freed, so the next row's peak memory is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(device: torch.device, cfg: dict, work: Path) -> dict:
    shipped = load_config(ROOT / "configs" / "ct-rate.yaml")
    size = cfg["size"] or list(shipped.preprocess.spatial_size)
    first = cfg["batch"] or shipped.loader.batch_size
    start = time.monotonic()
    rows = run_plan(plan(cfg, size, first, device, work), cfg["budget"], device)
    return {"size": size, "batch": first, "rows": rows, "seconds": time.monotonic() - start}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no compile: checks the figures come out")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke: the code path only)")
    parser.add_argument("--out", help="where the results go (default: bench/RESULTS-gpu.md)")
    parser.add_argument("--work", help="folder for the temporary caches (default: the system's temporary folder; a "
                                       "pod: the cache claim, so the disk-cache row reads what training reads)")
    parser.add_argument("--require-cuda", action="store_true", help="exit 1 without CUDA (a pod that asked for a GPU)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench gpu: no CUDA device here (torch {torch.__version__}, built with CUDA {torch.version.cuda}): "
              f"nothing measured, {args.out or 'bench/RESULTS-gpu.md'} left as it is")
        return 1 if args.require_cuda else 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"none (CPU run: {os.cpu_count()} cores)"
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ct3d-bench-gpu-", dir=args.work) as tmp:
        result = measure(device, SMOKE if args.smoke else FULL, Path(tmp))
    text = markdown(result, name, device.type == "cuda")
    out = Path(args.out) if args.out else ROOT / "bench" / "RESULTS-gpu.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    print(write_results(out, text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
