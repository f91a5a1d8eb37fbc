"""`bench gpu`'s hand loop: training steps on data already on the device (no loader), and how busy they keep
the GPU, measured by torch.profiler: the time in which some CUDA kernel ran (the union of kernel intervals, as
kernels on two streams overlap) over the wall time of unprofiled steps. CUDA events around a step would time the
same span as the wall clock and read ~100% by construction."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.config import ModelConfig
from engine.training import create_model

PROFILED_STEPS = 3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_seconds(trace: dict) -> float | None:
    """Seconds in which at least one CUDA kernel ran, from a Chrome trace torch.profiler exported (events of
    category "kernel", microseconds); None without kernel events (a CPU run)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace.get("traceEvents", [])
                   if e.get("cat") == "kernel" and "dur" in e)
    if not spans:
        return None
    total, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:
            total, start = total + end - start, s
        end = max(end, e)
    return (total + end - start) / 1e6


def profiler(device: torch.device):
    """torch.profiler recording CUDA kernels on a GPU (host ops only on the CPU: the code path, no figure)."""
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))


def trace_kernel_seconds(prof) -> float | None:
    """kernel_seconds of a stopped profiler's trace."""
    with tempfile.TemporaryDirectory(prefix="ct3d-trace-") as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        return kernel_seconds(json.loads(path.read_text()))


def profiled_kernel_seconds(work: Callable[[], None], device: torch.device) -> float | None:
    """Kernel seconds of `work` run once under the profiler (the device idle before and after)."""
    sync(device)
    with profiler(device) as prof:
        work()
        sync(device)
    return trace_kernel_seconds(prof)


def train_step_figures(variant: str, channels_last: bool, autotune: bool, compiled: bool, size: list[int],
                       batch: int, device: torch.device, cfg: dict) -> dict:
    """One configuration's bf16 training steps on device-resident data: seconds per step (median of cfg['steps']),
    volumes/s, GPU busy (profiler kernel time per step over the median unprofiled step), FLOPs per step (counted
    uncompiled), warm-up seconds and peak memory."""
    torch.backends.cudnn.benchmark = autotune
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    net = create_model(ModelConfig(variant=variant, widen_factor=cfg["widen"]), 18, size)
    net = net.to(device).to(memory_format=layout)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    forward = torch.compile(net) if compiled else net
    x = torch.randn(batch, 1, *size, device=device).to(memory_format=layout)
    y = torch.rand(batch, 18, device=device).round()
    amp = torch.autocast(device.type, dtype=torch.bfloat16)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with amp:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(forward(x).float(), y)
        loss.backward()
        optimizer.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(cfg["warmup"]):
        step()
    sync(device)
    warmup = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        with amp:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).float(), y)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    walls = []
    for _ in range(cfg["steps"]):
        start = time.perf_counter()
        step()
        sync(device)
        walls.append(time.perf_counter() - start)
    seconds = statistics.median(walls)
    kernels = profiled_kernel_seconds(lambda: [step() for _ in range(PROFILED_STEPS)], device)
    flops = counter.get_total_flops()
    return {"seconds_per_step_all": walls, "samples_per_s": batch / seconds, "batch": batch,
            "busy": None if kernels is None else kernels / PROFILED_STEPS / seconds,
            "flops_per_step": flops, "tflops": flops / seconds / 1e12, "warmup_seconds": warmup,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def resident_step(size: list[int], device: torch.device, widen: float):
    """ResNet-18's bf16 training step (default layout, as the engine trains on GPUs; fused AdamW on CUDA) on a
    batch a loader gives."""
    net = create_model(ModelConfig(variant="18", widen_factor=widen), 18, size).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step(image: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = net(image.float())
        target = torch.zeros_like(logits, dtype=torch.float32)
        torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target).backward()
        optimizer.step()

    return step
