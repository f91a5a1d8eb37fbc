"""`bench gpu`'s write-up: bench/RESULTS-gpu.md's sections (the hand loop's steps, the feeding rows, the engine's
step beside the hand loop, the encoders) and what each row cost against its estimate."""

from __future__ import annotations

from datetime import date

import torch

from bench.encoders import table as encoder_table
from bench.gpu_feeding import table as feeding_table
from bench.gpu_peaks import peak_source, peak_tflops

PLAIN = ("18", False, False, False)  # ResNet-18, default layout, cudnn.benchmark on, no compile: the steps' order key


def not_measured(f: dict) -> str | None:
    """`failed: ...` or `dropped (...)` for a row without figures; None for one with."""
    if "failed" in f:
        return f"failed: {f['failed']}"
    return f"dropped ({f['dropped']})" if "dropped" in f else None


def percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def steps_table(rows, peak: float | None) -> str:
    lines = []
    for r in sorted(rows, key=lambda r: r.order):
        f, batch = r.figures, r.order[-1]
        if (missing := not_measured(f)) is not None:
            lines.append(f"| {r.label} | {batch} | {missing} | | | | |")
            continue
        share = f"{100 * f['tflops'] / peak:.0f}% of {peak:g}" if peak else "peak unknown"
        memory = f"{f['peak_memory_gib']:.1f}" if f["peak_memory_gib"] is not None else "-"
        lines.append(f"| {r.label} | {batch} | {f['samples_per_s']:.1f} | {percent(f['busy'])} "
                     f"| {f['tflops']:.1f} ({share}) | {memory} | {f['warmup_seconds']:.1f} |")
    return "\n".join(lines)


def engine_table(rows, resident: dict) -> str:
    lines = []
    for r in sorted(rows, key=lambda r: r.order):
        batch, f = r.order[0], r.figures
        if (missing := not_measured(f)) is not None:
            lines.append(f"| {batch} | {missing} | | | |")
            continue
        hand = resident.get(batch)
        ratio = f"{f['samples_per_s'] / hand:.2f}" if hand else "-"
        lines.append(f"| {batch} | {f['samples_per_s']:.1f} | {f'{hand:.1f}' if hand else '-'} | {ratio} "
                     f"| {percent(f['busy'])} |")
    return "\n".join(lines)


def markdown(result: dict, device_name: str, cuda: bool) -> str:
    """The results file; `device_name` as torch.cuda.get_device_name gives it (`cuda`), or the CPU run's."""
    rows, peak = result["rows"], peak_tflops(device_name) if cuda else None
    of = {group: [r for r in rows if r.group == group] for group in ("steps", "feeding", "engine", "encoders")}
    resident = {r.order[-1]: r.figures["samples_per_s"] for r in of["steps"]
                if r.order[:4] == PLAIN and "samples_per_s" in r.figures}
    feeding = of["feeding"][0].figures if of["feeding"] else {}
    encoders = of["encoders"][0].figures if of["encoders"] else {"dropped": "not in this run"}
    dropped = [r.name for r in rows if "dropped" in r.figures]
    costs = "\n".join(f"| {r.name} | {r.estimate:.0f} | {'dropped' if 'dropped' in r.figures else f'{r.seconds:.0f}'} |"
                      for r in rows)
    size = "x".join(map(str, result["size"]))
    peak_line = peak_source(device_name) if cuda else "none (no GPU: no % of peak)"
    return f"""# GPU benchmark results

`python -m bench gpu` (`make bench-gpu`; on a cluster the bench Job, docs/benchmarks.md) rewrites this file on a CUDA
machine.

- Date: {date.today().isoformat()}; the rows took {result['seconds']:.0f} s
- GPU: {device_name}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}
- bf16 peak: {f'{peak:g} TFLOP/s dense, ' if peak else ''}{peak_line}
- Shape: the CT-RATE config's {size} voxels, batch {result['batch']} unless a row says, 18 outputs, bf16 autocast,
  fused AdamW
- Dropped for time (least important first): {', '.join(dropped) or 'none'}

Training steps on data already on the GPU (the hand loop; median of the timed steps). GPU busy: torch.profiler's
CUDA kernel time (the union of kernel intervals) per step over the median unprofiled step's wall time; FLOPs
counted by torch.utils.flop_counter on the uncompiled step:

| configuration | batch | volumes/s | GPU busy | achieved TFLOP/s (of bf16 peak) | peak memory (GiB) | warm-up (s) |
|---|---|---|---|---|---|---|
{steps_table(of["steps"], peak)}

Feeding: the engine's loaders at this shape, alone and feeding ResNet-18's step (default layout, cudnn.benchmark on,
no compile), against the same step on resident data (the first row above). The disk cache's files are dropped from
the page cache before each epoch. fed / resident below 1: the GPU waits for the loader:

| loader | batch | alone (volumes/s) | step, resident data (volumes/s) | step, fed (volumes/s) | fed / resident |
|---|---|---|---|---|---|
{feeding_table(feeding, resident.get(result['batch']))}

The engine's own training step (`engine.training.train` with configs/ct-rate.yaml's model and augmentation: MONAI's
SupervisedTrainer, the RAM cache's loader, device augmentation, its handlers; epoch 2's steady state) beside the hand
loop's step at the same batch; GPU busy from the profiler's kernel time over 3 iterations of epoch 1:

| batch | engine step (volumes/s) | hand loop (volumes/s) | engine / hand loop | GPU busy |
|---|---|---|---|---|
{engine_table(of["engine"], resident)}

The pretrained CT encoders (bench/encoders.py) at their native inputs, bf16 autocast: extraction, a fine-tune step,
and a head epoch from a 47,000 x D float16 embedding table against a frozen-encoder epoch over the same volumes:

{encoder_table(encoders) if not_measured(encoders) is None else not_measured(encoders)}

What each row cost, in the order they ran (estimates for one H100; the budget drops a row whose estimate no longer
fits):

| row | estimated (s) | took (s) |
|---|---|---|
{costs}
"""
