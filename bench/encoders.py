"""Pretrained CT encoders (Merlin, CT-FM) and the embedding cache. Per encoder: parameters and GFLOPs per volume
at its native input (counted on the meta device: no memory, no time), extraction volumes/s (the frozen encoder in
inference mode) and a fine-tune step's time and peak memory (CPU: a reduced size, labelled; `bench gpu`: native);
then the headline: a head epoch from a 47,000 x D float16 embedding table against one frozen-encoder epoch over
the same volumes (the encoder timed on a few volumes and multiplied). The engine's own comparison, a second frozen
CT-FM run on the phantoms that extracts nothing against the same run with cache.embeddings=false, is
encoder_workflow.py."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import ROOT
from bench.rows import Row, row, seconds_range
from engine.config import LoaderConfig, ModelConfig, load_config
from engine.data import make_loader
from engine.training import Embedded, create_model, to_device

ENCODERS = {"merlin": "Merlin", "ctfm": "CT-FM"}
LABELS = 18  # CT-RATE's
TARGET = 100.0  # issue 38: a head epoch on cached embeddings >= 100x faster than an epoch that runs the encoder
MERLIN_TFLOP = 1.25  # issue 38's count for a 224 x 224 x 160 volume


def shipped(name: str):
    """configs/ct-rate-<name>.yaml: the encoder's native input (preprocess.spatial_size), the probe's batch
    (loader.batch_size), the extraction batch (loader.val_batch_size) and AdamW's settings."""
    return load_config(ROOT / "configs" / f"ct-rate-{name}.yaml")


def network(name: str, size, freeze: bool, ctfm: dict | None = None) -> torch.nn.Module:
    """The engine's network for `name` with a linear head (CT-FM's published settings unless `ctfm`), random weights."""
    return create_model(ModelConfig(name=name, freeze=freeze), LABELS, list(size), {"config": ctfm} if ctfm else None)


def counted(name: str, size, ctfm: dict | None = None) -> tuple[int, int]:
    """(encoder parameters, forward FLOPs for one volume at `size`), on the meta device. torch's FlopCounterMode
    counts 2 FLOPs per multiply-add."""
    with torch.device("meta"):
        encoder = network(name, size, True, ctfm).encoder
        x = torch.empty(1, 1, *size)
    with FlopCounterMode(display=False) as counter:
        encoder(x)
    return sum(p.numel() for p in encoder.parameters()), counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(work, device: torch.device) -> float:
    start = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - start


def finetune(name: str, size, batch: int, steps: int, device: torch.device, ctfm: dict | None) -> dict:
    """Seconds per fine-tune step (the whole encoder and its linear head trained: forward, BCE, backward, AdamW;
    bf16 autocast on CUDA, as the engine's amp=auto) after one warm-up step, and the peak memory: CUDA's allocator
    peak; on the CPU the process's RSS high-water mark over its RSS before the network was built (in a fresh
    process, encoder_figures' child: in one that peaked higher before, it reads 0)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    before = psutil.Process().memory_info().rss
    net = to_device(network(name, size, False, ctfm), device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    x, y = torch.randn(batch, 1, *size, device=device), torch.rand(batch, LABELS, device=device).round()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x).float(), y)
        loss.backward()
        optimizer.step()

    _timed(step, device)
    seconds = [_timed(step, device) for _ in range(steps)]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else \
        max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    return {"finetune_seconds_all": seconds, "finetune_peak_bytes": peak}


def head_epoch(head: torch.nn.Module, dataset: Embedded, batch: int, device: torch.device, seed: int,
               adamw: dict) -> tuple:
    """One epoch of the probe's head as training runs it: the engine's loader over the Embedded table (the
    workflow's dataset for cached embeddings), each batch to the device as float, BCE, backward, AdamW.
    Returns (seconds, rows seen, steps)."""
    optimizer = torch.optim.AdamW(head.parameters(), **adamw)
    loader = make_loader(dataset, LoaderConfig(batch_size=batch), device, shuffle_seed=seed, per_rank=len(dataset))
    seen = steps = 0
    start = time.perf_counter()
    for item in loader:
        x, y = item["image"].to(device).float(), item["label"].to(device).float()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.binary_cross_entropy_with_logits(head(x), y).backward()
        optimizer.step()
        seen, steps = seen + len(x), steps + 1
    _sync(device)
    return time.perf_counter() - start, seen, steps


def head_floor(head: torch.nn.Module, table: torch.Tensor, labels: torch.Tensor, batch: int, steps: int,
               device: torch.device, adamw: dict) -> float:
    """The same head steps on the table's rows already on the device, in order, without the loader: what a head
    epoch cannot beat. A measured epoch faster than this skipped work, and its ratio would look too good. (Not one
    batch repeated: the head then overfits it and AdamW's state turns denormal, 10x slower on a CPU.)"""
    optimizer = torch.optim.AdamW(head.parameters(), **adamw)
    table, labels = table.to(device), labels.to(device)
    _sync(device)

    def run() -> None:
        for step in range(steps):
            rows = slice(step * batch, (step + 1) * batch)
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.binary_cross_entropy_with_logits(head(table[rows].float()), labels[rows]).backward()
            optimizer.step()

    return _timed(run, device)


def measure(name: str, size, cfg: dict, device_name: str, ctfm: dict | None = None) -> dict:
    """One encoder at `size` on `device_name`: the fine-tune step first (its peak memory is the process's), then
    alternating, cfg['enc_repeats'] times: the frozen encoder on cfg['enc_extract_batch'] volumes (inference mode,
    after a warm-up batch), a head epoch over a cfg['enc_rows'] x D float16 table and the head's floor."""
    device, config = torch.device(device_name), shipped(name)
    extract_batch = cfg["enc_extract_batch"] or config.loader.val_batch_size
    head_batch, adamw = config.loader.batch_size, {"lr": config.train.lr, "weight_decay": config.train.weight_decay}
    try:
        figures = finetune(name, size, cfg["enc_finetune_batch"][name], cfg["enc_steps"], device, ctfm)
    except torch.cuda.OutOfMemoryError as exc:  # CT-FM's 320^3 on a smaller GPU: a finding; the rest still runs
        figures = {"finetune_failed": f"{type(exc).__name__}: {str(exc)[:160]}"}
        torch.cuda.empty_cache()
    net = to_device(network(name, size, True, ctfm), device)
    encoder, head = net.encoder.eval(), net.head
    x = torch.randn(extract_batch, 1, *size, device=device)

    def extract() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            encoder(x)

    _timed(extract, device)
    torch.manual_seed(0)
    table = torch.randn(cfg["enc_rows"], encoder.features).to(torch.float16)
    labels = torch.rand(cfg["enc_rows"], LABELS).round()
    dataset = Embedded(table, [{"label": label} for label in labels.tolist()])
    for repeat in range(cfg["enc_repeats"]):
        figures.setdefault("extract_seconds_all", []).append(_timed(extract, device) / extract_batch)
        seconds, seen, steps = head_epoch(head, dataset, head_batch, device, repeat, adamw)
        figures.setdefault("head_epoch_all", []).append(seconds)
        floor = head_floor(head, table, labels, head_batch, steps, device, adamw)
        figures.setdefault("head_floor_all", []).append(floor)
        figures.update(head_rows_seen=seen, head_steps=steps)
    return {**figures, "extract_batch": extract_batch, "finetune_batch": cfg["enc_finetune_batch"][name],
            "head_batch": head_batch, "rows": cfg["enc_rows"], "features": int(encoder.features)}


def in_child(name: str, size, cfg: dict) -> dict:
    """`measure` on the CPU in a fresh process: its RSS high-water mark is the fine-tune step's alone."""
    code = "import json, sys; from bench.encoders import measure; print(json.dumps(measure(*json.loads(sys.argv[1]))))"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([name, list(size), cfg, "cpu"])], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark: the {name} encoder's measurement failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def encoder_figures(cfg: dict, device_name: str, sizes: dict | None, in_process: bool) -> dict:
    """Every encoder's counts at its native input and its timings at `sizes` (None: native), as enc_<name>_*."""
    figures: dict = {"enc_device": device_name}
    for name in ENCODERS:
        native = list(shipped(name).preprocess.spatial_size)
        size = (sizes or {}).get(name) or native
        params, flops = counted(name, native)
        figures.update({f"enc_{name}_params": params, f"enc_{name}_native": "x".join(map(str, native)),
                        f"enc_{name}_gflops": flops / 1e9, f"enc_{name}_size": "x".join(map(str, size)),
                        f"enc_{name}_size_gflops": counted(name, size)[1] / 1e9})
        try:
            timed = measure(name, size, cfg, device_name) if in_process else in_child(name, size, cfg)
        except Exception as exc:  # noqa: BLE001 - on a GPU (`bench gpu`), what it cannot run is a finding
            if device_name == "cpu":
                raise
            timed = {"failed": f"{type(exc).__name__}: {str(exc)[:160]}"}
        figures.update({f"enc_{name}_{key}": value for key, value in timed.items()})
        if "head_epoch_all" in timed:  # a frozen-encoder epoch: the rows' volumes through the encoder, and the head
            figures[f"enc_{name}_ratio_all"] = [(timed["rows"] * s + h) / h for s, h in
                                                zip(timed["extract_seconds_all"], timed["head_epoch_all"])]
    return figures


def bench_encoders(cfg: dict, work: Path) -> dict:
    return encoder_figures(cfg, "cpu", cfg["enc_sizes"], cfg.get("in_process", False))


def _where(f: dict, name: str) -> str:
    device = f["enc_device"]
    reduced = f[f"enc_{name}_size"] != f[f"enc_{name}_native"]
    return (f"at {f[f'enc_{name}_size']}{' (reduced: native ' + f[f'enc_{name}_native'] + ')' if reduced else ''} "
            f"on {'this CPU' if device == 'cpu' else 'the GPU'}")


def table(f: dict) -> str:
    """`bench gpu`'s section: the rows as RESULTS.md's table writes them."""
    lines = "\n".join(f"| {name} | {value} | {target} | {status} |" for name, value, target, status in rows(f))
    return f"| figure | measured | target | |\n|---|---|---|---|\n{lines}"


def rows(f: dict) -> list[Row]:
    rows = []
    for name, label in ENCODERS.items():
        if f"enc_{name}_gflops" not in f:
            continue
        gflops, native = f[f"enc_{name}_gflops"], f[f"enc_{name}_native"]
        check = (f"{MERLIN_TFLOP * 1000:,.0f} GFLOP +-5% (issue 38)", abs(gflops / (MERLIN_TFLOP * 1000) - 1) <= 0.05) \
            if name == "merlin" else (None, None)
        rows.append(row(f"{label} encoder, {f[f'enc_{name}_params'] / 1e6:.1f} M parameters: forward GFLOPs per "
                        f"volume at its native {native} (meta-device count; FLOPs = 2 x multiply-adds)",
                        f"{gflops:,.0f} GFLOP ({gflops / 2:,.0f} G multiply-adds)", *check))
        if f"enc_{name}_failed" in f:
            rows.append(row(f"{label} {_where(f, name)}: timings", f"failed: {f[f'enc_{name}_failed']}"))
            continue
        where, size_gflops = _where(f, name), f[f"enc_{name}_size_gflops"]
        per_volume = f[f"enc_{name}_extract_seconds_all"]
        rows.append(row(f"{label} {where}: extraction (frozen encoder, inference mode, batch "
                        f"{f[f'enc_{name}_extract_batch']}; {size_gflops:,.0f} GFLOP per volume)",
                        f"{1 / statistics.median(per_volume):.3g} volumes/s ({seconds_range(per_volume)} per volume; "
                        f"{size_gflops / statistics.median(per_volume):,.0f} GFLOP/s)"))
        memory = "CUDA allocator peak" if f["enc_device"] != "cpu" else \
            "RSS high-water mark over the process before the network"
        rows.append(row(f"{label} {where}: fine-tune step (whole encoder + linear head: forward, backward, AdamW; "
                        f"batch {f[f'enc_{name}_finetune_batch']})",
                        f"failed: {f[f'enc_{name}_finetune_failed']}" if f"enc_{name}_finetune_failed" in f else
                        f"{seconds_range(f[f'enc_{name}_finetune_seconds_all'])} per step, peak memory "
                        f"{f[f'enc_{name}_finetune_peak_bytes'] / 2**30:.2f} GiB ({memory}: weights, gradients, "
                        f"AdamW state, activations)"))
        rows.append(headline(f, name, label, where))
    return rows


def headline(f: dict, name: str, label: str, where: str) -> Row:
    """The head epoch from the table vs a frozen-encoder epoch: >= TARGET over the whole spread; and, where a broken
    measurement would look too good, every row seen and no head epoch under half its floor (the bare steps on
    resident rows, best of the repeats: half, as CPU time shared with other processes moves tiny steps a lot)."""
    n, ratios = f[f"enc_{name}_rows"], f[f"enc_{name}_ratio_all"]
    heads, floors, volumes = f[f"enc_{name}_head_epoch_all"], f[f"enc_{name}_head_floor_all"], \
        f[f"enc_{name}_extract_seconds_all"]
    floor = min(floors) / 2
    bound = max((n * s + floor) / floor for s in volumes)  # the ratio were a head epoch as fast as that
    sane = min(heads) >= floor and f[f"enc_{name}_head_rows_seen"] == n
    epoch = n * statistics.median(volumes)
    return row(f"{label}: head epoch from a {n:,} x {f[f'enc_{name}_features']} float16 embedding table (linear head, "
               f"batch {f[f'enc_{name}_head_batch']} as configs/ct-rate-{name}.yaml trains it, AdamW; the engine's "
               f"Embedded dataset and loader) vs one frozen-encoder epoch over the same {n:,} volumes (the encoder "
               f"{where}, timed per volume on a batch of {f[f'enc_{name}_extract_batch']} per repeat and multiplied "
               f"by {n:,}, plus the head's epoch)",
               f"{statistics.median(ratios):.3g}x (spread {min(ratios):.3g}-{max(ratios):.3g}): head epoch "
               f"{seconds_range(heads)} ({f[f'enc_{name}_head_rows_seen']:,} rows in {f[f'enc_{name}_head_steps']} "
               f"steps; its floor, the same steps on resident rows: {seconds_range(floors)}) vs encoder epoch "
               f"{epoch / 3600:,.1f} h",
               f">= {TARGET:g}x; <= {bound:.3g}x (every row seen, no head epoch under half its floor)",
               min(ratios) >= TARGET and sane)
