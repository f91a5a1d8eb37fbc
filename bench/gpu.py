"""`python -m bench gpu`: the GPU's own figures at CT-RATE's shape (the CT-RATE config's final size and batch):
training samples/s, how busy the GPU is, achieved TFLOP/s against its bf16 peak and peak memory, for
ResNet-18 and -50 under bf16 autocast with channels-last 3D on and off, cuDNN autotuning on and off and
torch.compile on and off; then whether the engine's loaders feed it (RAM cache with its thread loader, disk
cache with worker processes reading files dropped from the page cache) against the GPU's own step rate; then
the pretrained CT encoders at their native inputs (bench/encoders.py). Writes bench/RESULTS-gpu.md; on a machine
without CUDA it says so and exits 0. Each configuration that fails is reported as failed; configurations left
when the time budget (7 minutes) runs out are reported skipped."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import ROOT
from bench.encoders import encoder_figures
from bench.encoders import table as encoder_table
from bench.report import write_results
from engine.config import LoaderConfig, ModelConfig, PreprocessConfig, load_config
from engine.data import SOURCE, build_dataset, cache_folder, loader_workers, make_loader, source_hash
from engine.training import create_model
from engine.utils import save_tensors

BUDGET_SECONDS = 420
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, by a part of the device's name.
BF16_PEAK = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0, "A100": 312.0,
             "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0}
# (model, channels-last, cudnn.benchmark, torch.compile): the order is the priority when time runs short.
STEPS = [("18", False, True, False), ("18", True, True, False), ("50", False, True, False), ("50", True, True, False),
         ("18", False, False, False), ("18", False, True, True), ("50", False, True, True), ("18", True, True, True)]
FULL = dict(size=None, batch=None, warmup=3, steps=12, loader_volumes=64, loader_epochs=2, compile=True,
            variants=("18", "50"), widen=1.0,
            # the encoders at native size (configs/ct-rate-*.yaml), extraction at its loader.val_batch_size
            enc_sizes=None, enc_extract_batch=None, enc_finetune_batch={"merlin": 2, "ctfm": 1}, enc_steps=5,
            enc_repeats=3, enc_rows=47_000)
# widen 0.25 in the smoke: the code path at 1/16 of the weights (bf16 autocast is emulated on a CPU without
# AVX-512: ResNet-18 at full width took ~45 s of the smoke's CPU on an AVX2 EPYC)
SMOKE = dict(size=[16, 16, 16], batch=2, warmup=1, steps=1, loader_volumes=4, loader_epochs=1, compile=False,
             variants=("18",), widen=0.25, enc_sizes={"merlin": (32, 32, 32), "ctfm": (32, 32, 32)},
             enc_extract_batch=1, enc_finetune_batch={"merlin": 2, "ctfm": 2}, enc_steps=1, enc_repeats=1,
             enc_rows=4_700)


def peak_tflops(name: str) -> float | None:
    return next((peak for part, peak in BF16_PEAK.items() if part in name), None)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step_figures(variant: str, channels_last: bool, autotune: bool, compiled: bool, size: list[int],
                       batch: int, device, cfg: dict) -> dict:
    """One configuration's training steps on device-resident data: seconds per step (median of cfg['steps']),
    samples/s, GPU-busy share (CUDA event time over wall time), FLOPs per step, peak memory."""
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
    _sync(device)
    warmup = time.perf_counter() - start
    with FlopCounterMode(display=False) as counter:
        with amp:  # the FLOPs of the same step, counted uncompiled
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).float(), y)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    walls, busy = [], []
    for _ in range(cfg["steps"]):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            end.record()
        _sync(device)
        walls.append(time.perf_counter() - start)
        busy.append(begin.elapsed_time(end) / 1000 if device.type == "cuda" else walls[-1])
    seconds = statistics.median(walls)
    return {"seconds_per_step_all": walls, "samples_per_s": batch / seconds, "busy": sum(busy) / sum(walls),
            "flops_per_step": counter.get_total_flops(), "tflops": counter.get_total_flops() / seconds / 1e12,
            "warmup_seconds": warmup,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def _entries(work: Path, n: int, size: list[int]) -> list[dict]:
    """n disk-cache entries at `size` (float16, as the engine's disk cache writes them) and their items."""
    folder = cache_folder(work / "cache", PreprocessConfig(spatial_size=list(size)))
    folder.mkdir(parents=True, exist_ok=True)
    items = [{"image": str(work / f"v{i}.nii.gz"), "name": f"v{i}", "label": [float(i % 2)] * 18} for i in range(n)]
    for item in items:  # random values: torch.load does not care what it reads
        entry = {"image": torch.randn(1, *size).to(torch.float16), SOURCE: [item["image"]]}
        save_tensors(entry, folder / f"{source_hash({'image': item['image'], 'name': item['name']}).decode()}.pt")
    return items


def _drop_page_cache(folder: Path) -> None:
    """Asks the kernel to forget the files' pages (no root needed for files of our own): reads come from disk."""
    for path in folder.rglob("*.pt"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def loader_figures(work: Path, size: list[int], batch: int, device, cfg: dict, gpu_step_seconds: float) -> dict:
    """The engine's loaders at this shape: RAM cache (thread loader) and disk cache (worker processes, files out
    of the page cache), alone and feeding ResNet-18's bf16 step, against the GPU's step on resident data."""
    items = _entries(work, cfg["loader_volumes"], size)
    p = PreprocessConfig(spatial_size=list(size))
    figures = {}
    for kind, rate in (("ram", 1.0), ("disk", 0.0)):
        dataset = build_dataset(items, p, work / "cache", rate, 4)
        loader = make_loader(dataset, LoaderConfig(batch_size=batch), device, shuffle_seed=0)
        figures[f"{kind}_workers"] = loader_workers(LoaderConfig(batch_size=batch), dataset)
        alone, fed = [], []
        step = _fed_step(size, device, cfg["widen"])
        for epoch in range(cfg["loader_epochs"]):
            loader.sampler.set_epoch(epoch)
            for into, work_fn in ((alone, None), (fed, step)):
                if kind == "disk":
                    _drop_page_cache(work / "cache")
                start = time.perf_counter()
                for batch_data in loader:
                    image = batch_data["image"].to(device, non_blocking=True)
                    if work_fn is not None:
                        work_fn(image)
                _sync(device)
                into.append(len(loader) * batch / (time.perf_counter() - start))
        figures[f"{kind}_alone_samples_per_s"] = statistics.median(alone)
        figures[f"{kind}_fed_samples_per_s"] = statistics.median(fed)
        figures[f"{kind}_fed_busy"] = figures[f"{kind}_fed_samples_per_s"] * gpu_step_seconds / batch
        del dataset, loader
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return figures


def _fed_step(size: list[int], device, widen: float):
    """ResNet-18's bf16 training step on a loader's batch (default layout, as the engine trains on GPUs)."""
    net = create_model(ModelConfig(variant="18", widen_factor=widen), 18, size).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step(image) -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = net(image.float())
        target = torch.zeros_like(logits, dtype=torch.float32)
        torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target).backward()
        optimizer.step()

    return step


def measure(device, cfg: dict, work: Path) -> dict:
    """Every configuration within the time budget; one that fails is reported failed, not fatal."""
    shipped = load_config(ROOT / "configs" / "ct-rate.yaml")
    size = cfg["size"] or list(shipped.preprocess.spatial_size)
    batch = cfg["batch"] or shipped.loader.batch_size
    start, rows = time.time(), []
    for variant, channels_last, autotune, compiled in STEPS:
        name = (f"ResNet-{variant}, {'channels-last 3D' if channels_last else 'default layout'}, cudnn.benchmark "
                f"{'on' if autotune else 'off'}, torch.compile {'on' if compiled else 'off'}")
        if (compiled and not cfg["compile"]) or variant not in cfg["variants"]:
            continue
        if time.time() - start > BUDGET_SECONDS:
            rows.append((name, {"skipped": "time budget spent"}))
            continue
        try:
            rows.append((name, train_step_figures(variant, channels_last, autotune, compiled, size, batch, device,
                                                  cfg)))
        except Exception as exc:  # noqa: BLE001 - a configuration this GPU or build cannot run is a finding
            rows.append((name, {"failed": f"{type(exc).__name__}: {str(exc)[:200]}"}))
    plain = next((f for n, f in rows if n.startswith("ResNet-18, default layout, cudnn.benchmark on, "
                                                     "torch.compile off") and "samples_per_s" in f), None)
    loaders = {}
    if plain is not None and time.time() - start < BUDGET_SECONDS + 60:
        loaders = loader_figures(work, size, batch, device, cfg, statistics.median(plain["seconds_per_step_all"]))
    encoder_rows = encoder_figures(cfg, str(device), cfg["enc_sizes"], in_process=True)
    return {"size": size, "batch": batch, "rows": rows, "loaders": loaders, "encoders": encoder_rows,
            "seconds": time.time() - start}


def markdown(result: dict, device_name: str, peak: float | None) -> str:
    lines = []
    for name, f in result["rows"]:
        if "samples_per_s" not in f:
            lines.append(f"| {name} | {f.get('failed') or f.get('skipped')} | | | | |")
            continue
        share = f"{100 * f['tflops'] / peak:.0f}% of {peak:g}" if peak else "peak unknown"
        memory = f"{f['peak_memory_gib']:.1f}" if f["peak_memory_gib"] is not None else "-"
        lines.append(f"| {name} | {f['samples_per_s']:.1f} | {100 * f['busy']:.0f}% | {f['tflops']:.1f} ({share}) "
                     f"| {memory} | {f['warmup_seconds']:.1f} |")
    loaders = result["loaders"]
    feed = "\n".join(
        f"| {kind} cache ({loaders[f'{kind}_workers']} worker processes) "
        f"| {loaders[f'{kind}_alone_samples_per_s']:.1f} | {loaders[f'{kind}_fed_samples_per_s']:.1f} "
        f"| {100 * loaders[f'{kind}_fed_busy']:.0f}% |"
        for kind in ("ram", "disk") if f"{kind}_workers" in loaders) or "| not measured | | | |"
    size = "x".join(map(str, result["size"]))
    return f"""# GPU benchmark results

`python -m bench gpu` (`make bench-gpu`) rewrites this file on a CUDA machine.

- Date: {date.today().isoformat()}; took {result['seconds']:.0f} s
- GPU: {device_name}; torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}
- Shape: the CT-RATE config's {size} voxels, batch {result['batch']}, 18 outputs, bf16 autocast, AdamW

Training steps on data already on the GPU (median of the timed steps; GPU busy = CUDA event time over wall time;
FLOPs counted by torch.utils.flop_counter on the uncompiled step):

| configuration | samples/s | GPU busy | achieved TFLOP/s (of bf16 peak) | peak memory (GiB) | warm-up (s) |
|---|---|---|---|---|---|
{chr(10).join(lines)}

The engine's loaders at this shape, alone and feeding ResNet-18's step (default layout, cudnn.benchmark on,
no compile); GPU busy = fed samples/s over the GPU's own rate on resident data. The disk cache's files are
dropped from the page cache before each epoch:

| loader | alone (samples/s) | feeding the GPU (samples/s) | GPU busy |
|---|---|---|---|
{feed}

The pretrained CT encoders (bench/encoders.py) at their native inputs, bf16 autocast: extraction, a fine-tune step,
and a head epoch from a 47,000 x D float16 embedding table against a frozen-encoder epoch over the same volumes:

{encoder_table(result["encoders"])}
"""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no compile: checks the figures come out")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke: the code path only)")
    parser.add_argument("--out", help="where the results go (default: bench/RESULTS-gpu.md)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"bench gpu: no CUDA device here (torch {torch.__version__}, built with CUDA {torch.version.cuda}): "
              f"nothing measured, bench/RESULTS-gpu.md left as it is")
        return 0
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"none (CPU run: {os.cpu_count()} cores)"
    with tempfile.TemporaryDirectory(prefix="ct3d-bench-gpu-") as tmp:
        result = measure(device, SMOKE if args.smoke else FULL, Path(tmp))
    text = markdown(result, name, peak_tflops(name) if device.type == "cuda" else None)
    print(write_results(Path(args.out) if args.out else ROOT / "bench" / "RESULTS-gpu.md", text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
