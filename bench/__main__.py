"""`python -m bench [--smoke] [--out FILE]`: data pipeline, engine overhead, memory and start-up,
measured as ratios within one run on this machine; prints a table and rewrites bench/RESULTS.md."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FULL = dict(volumes=24, source=(256, 256, 128), target=(96, 96, 96), epochs=5, train_volumes=64, train_size=64,
            engine_epochs=5, engine_repeats=3, startup_runs=5, rank_volumes=64, rank_size=128,
            rank_runs=(0.0, 1.0, 0.0),  # the first run fills the disk cache: not measured
            augment_shapes=(("64", (64, 64, 64), 5), ("ctrate", (128, 256, 256), 1)),
            data_path_shape=(128, 256, 256), data_path_volumes=32, matmul_size=2048, roofline_size=64,
            roofline_steps=3, loader_volumes=48, loader_size=64, loader_epochs=3, loader_repeats=2, layout_size=64,
            layout_steps=5,
            loader_model=("model.variant=18", "model.widen_factor=1.0"))
SMOKE = dict(volumes=4, source=(32, 32, 16), target=(16, 16, 16), epochs=2, train_volumes=8, train_size=16,
             engine_epochs=3, engine_repeats=1, startup_runs=1, rank_volumes=8, rank_size=16,
             rank_runs=(1.0, 0.0), augment_shapes=(("64", (16, 16, 16), 1),),
             data_path_shape=(16, 32, 32), data_path_volumes=8, matmul_size=256, roofline_size=16, roofline_steps=1,
             loader_volumes=8, loader_size=16, loader_epochs=2, loader_repeats=1, layout_size=16, layout_steps=1,
             loader_model=("model.variant=10", "model.widen_factor=0.25"),
             in_process=True)  # pipeline and memory children run in this process: the smoke checks the figures,
#                                not what a new process costs (each costs seconds of imports)


# ---------------------------------------------------------------- data pipeline
def make_sources(folder: Path, n: int, shape) -> list[dict]:
    """n phantom CTs in HU (int16 NIfTI) at `shape`, written once."""
    from engine.demo import generate

    csv_path = generate(folder, num_volumes=n, shape=tuple(shape), seed=0)
    names = [line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]]
    return [{"image": str(folder / name), "label": [0.0], "name": name} for name in names]


def epoch_times(dataset, workers: int, epochs: int) -> list[float]:
    import torch

    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, persistent_workers=workers > 0)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        for _batch in loader:
            pass
        times.append(time.perf_counter() - start)
    return times


def child_pipeline(args: dict) -> dict:
    """One pipeline measurement in this (fresh) process."""
    from monai.data import Dataset

    from engine.data import build_dataset, preprocessing_transform
    from engine.schema import PreprocessConfig

    p = PreprocessConfig(spatial_size=list(args["target"]))
    items = args["items"]
    mode, workers, epochs = args["mode"], args["workers"], args["epochs"]
    if mode == "tutorial":  # what a MONAI tutorial does: load and preprocess every epoch
        from engine.data import Labelled

        return {"times": epoch_times(Labelled(Dataset([{"image": i["image"]} for i in items],
                                                      preprocessing_transform(p)), items), workers, epochs)}
    if mode == "cold":  # first epoch over an empty disk cache: it fills the cache as it goes
        return {"times": epoch_times(build_dataset(items, p, args["cache"], 0.0, 1), workers, 1)}
    if mode == "disk":
        return {"times": epoch_times(build_dataset(items, p, args["cache"], 0.0, 1), workers, epochs)}
    if mode == "ram":
        dataset = build_dataset(items, p, args["cache"], 1.0, 2)
        return {"times": epoch_times(dataset, workers, epochs)}
    if mode == "memory":  # for the memory figure: hold the loader busy, report the cache size
        import torch

        dataset = build_dataset(items, p, args["cache"], args["rate"], 2)
        cached = sum(dataset[i]["image"].numel() * dataset[i]["image"].element_size() for i in range(len(dataset)))
        epoch_times(dataset, workers, epochs)
        return {"cache_bytes": cached if args["rate"] > 0 else 0, "torch_threads": torch.get_num_threads()}
    raise ValueError(mode)


def peak_pss(proc: subprocess.Popen) -> int:
    """The peak PSS of `proc` and its children, sampled until it ends."""
    import psutil

    peak, parent = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [parent, *parent.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in tree))
        except psutil.Error:
            pass
        time.sleep(0.02)
    return peak


def run_child(args: dict, sample_memory: bool = False, in_process: bool = False) -> dict:
    """Runs child_pipeline in a new process; with sample_memory, adds its tree's peak PSS. `in_process`
    (the smoke run): here, with this process's PSS afterwards."""
    if in_process:
        import psutil

        result = json.loads(json.dumps(child_pipeline(args)))
        result["peak_pss"] = psutil.Process().memory_full_info().pss if sample_memory else 0
        return result
    proc = subprocess.Popen([sys.executable, "-m", "bench", "--child", json.dumps(args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = peak_pss(proc) if sample_memory else 0
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args['mode']} failed")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_pss"] = peak
    return result


def memcpy_floor(n: int, target) -> float:
    """Seconds to copy n preprocessed float16 volumes in memory: the floor for any loader."""
    import torch

    tensors = [torch.zeros(1, *target, dtype=torch.float16) for _ in range(n)]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for t in tensors:
            t.clone()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_pipeline(cfg: dict, work: Path) -> dict:
    items = make_sources(work / "sources", cfg["volumes"], cfg["source"])
    base = {"items": items, "target": list(cfg["target"]), "epochs": cfg["epochs"]}
    figures = {}
    for workers in (0, 2):
        cache = str(work / f"cache-{workers}")
        for mode in ("tutorial", "cold", "disk", "ram"):
            epochs = 3 if mode == "tutorial" else cfg["epochs"]  # the slow baseline: 3 epochs are enough
            times = run_child({**base, "mode": mode, "workers": workers, "cache": cache, "epochs": epochs},
                              in_process=cfg.get("in_process", False))["times"]
            figures[f"{mode}_w{workers}"] = statistics.median(times)
            figures[f"{mode}_w{workers}_all"] = list(times)
    figures["memcpy_floor"] = memcpy_floor(cfg["volumes"], cfg["target"])
    return figures


def demo_training(work: Path, tag: str, volumes: int, size: int) -> list[str]:
    """Overrides for a training on `volumes` generated phantoms of size^3, its data, cache and runs under
    work/<tag>-*."""
    return [f"data.demo.dir={work / f'{tag}-demo'}", f"data.demo.num_volumes={volumes}",
            f"data.demo.shape=[{size},{size},{size}]", f"preprocess.spatial_size=[{size},{size},{size}]",
            f"cache.dir={work / f'{tag}-cache'}", f"output.dir={work / f'{tag}-runs'}", "train.resume=off"]


def training_pss(command: list[str], what: str, env: dict | None = None) -> int:
    """Peak PSS of a training command's process tree; a failed training fails the benchmark."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    peak = peak_pss(proc)
    if proc.wait() != 0:
        raise RuntimeError(f"benchmark: the {what} training failed")
    return peak


# ---------------------------------------------------------------- engine overhead
def hand_loop_epochs(dataset, val_dataset, names, model_config, outputs: int, size, pos_weight, lr, epochs: int,
                     folder: Path) -> list[float]:
    """The loop people write by hand, doing the engine's work: same model, data, batch size, optimizer and
    loss; each epoch validates, computes the same metrics and writes the same checkpoint (atomically)."""
    import torch

    from engine.checkpoint import save_checkpoint
    from engine.metrics import classification_metrics
    from engine.models import create_model

    torch.manual_seed(0)
    model = create_model(model_config, outputs, size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler)
    times = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        start = time.perf_counter()
        model.train()
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch["image"].float()), batch["label"].float())
            loss.backward()
            optimizer.step()
        model.eval()
        logits, labels = [], []
        with torch.no_grad():
            for batch in torch.utils.data.DataLoader(val_dataset, batch_size=8):
                logits.append(model(batch["image"].float()))
                labels.append(batch["label"].float())
        logits, labels = torch.cat(logits), torch.cat(labels)
        classification_metrics(torch.sigmoid(logits), labels, names, "multilabel")
        float(loss_fn(logits, labels))
        save_checkpoint(folder / "last.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
        times.append(time.perf_counter() - start)
    return times[1:]  # the first epoch warms allocators, as the engine's first epoch is excluded too


def bench_engine(cfg: dict, work: Path) -> dict:
    from engine.build import make_loss
    from engine.config import load_config
    from engine.data import build_dataset
    from engine.datalist import label_frequencies
    from engine.prepare import load_splits
    from engine.workflow import train

    size = cfg["train_size"]
    overrides = [
        *demo_training(work, "engine", cfg["train_volumes"], size),
        f"train.epochs={cfg['engine_epochs']}", "train.val_every=1", "data.val_fraction=0.1", "metrics.bootstrap=0",
        "augment.enabled=false", "loader.batch_size=8", "model.widen_factor=0.5",
    ]
    config = load_config(ROOT / "configs" / "default.yaml", overrides)
    train_items, val_items, labels = load_splits(config.data)
    dataset = build_dataset(train_items, config.preprocess, config.cache.dir, 1.0, 2)
    val_dataset = build_dataset(val_items, config.preprocess, config.cache.dir, 1.0, 2)
    pos_weight = make_loss(config.train, "multilabel", label_frequencies(train_items)).pos_weight.tolist()
    ours, bare, hand = [], [], []  # per-run medians; runs alternate so slow drifts hit all three alike

    def engine_run(name: str, *extra: str) -> float:
        folder = train(load_config(ROOT / "configs" / "default.yaml", [*overrides, f"output.name={name}", *extra]))
        seconds = json.loads((folder / "summary.json").read_text())["epoch_seconds"]
        return statistics.median(seconds[1:])  # every epoch validates and checkpoints; the first warms up

    for repeat in range(cfg["engine_repeats"]):
        ours.append(engine_run(f"r{repeat}"))
        hand_dir = work / f"hand{repeat}"
        hand_dir.mkdir(exist_ok=True)
        hand.append(statistics.median(hand_loop_epochs(dataset, val_dataset, labels, config.model, len(labels),
                                                       config.preprocess.spatial_size, pos_weight, config.train.lr,
                                                       cfg["engine_epochs"], hand_dir)))
        bare.append(engine_run(f"bare{repeat}", "tracking.wandb.mode=disabled"))
    ratios = [o / h for o, h in zip(ours, hand)]
    ratios_bare = [b / h for b, h in zip(bare, hand)]
    return {"engine_epoch": statistics.median(ours), "engine_epoch_no_wandb": statistics.median(bare),
            "hand_epoch": statistics.median(hand), "engine_ratio": statistics.median(ratios),
            "engine_ratio_all": ratios, "engine_ratio_no_wandb": statistics.median(ratios_bare),
            "engine_ratio_no_wandb_all": ratios_bare}


# ---------------------------------------------------------------- memory
def bench_memory(cfg: dict, work: Path) -> dict:
    items = make_sources(work / "sources", cfg["volumes"], cfg["source"])
    base = {"items": items, "target": list(cfg["source"]), "epochs": 2, "workers": 2, "mode": "memory",
            "cache": str(work / "cache-memory")}
    here = cfg.get("in_process", False)
    run_child({**base, "rate": 0.0}, in_process=here)  # fill the disk cache first, so both runs below do the same work
    without = run_child({**base, "rate": 0.0}, sample_memory=True, in_process=here)
    with_cache = run_child({**base, "rate": 1.0}, sample_memory=True, in_process=here)
    return {"baseline_pss": without["peak_pss"], "cached_pss": with_cache["peak_pss"],
            "cache_bytes": with_cache["cache_bytes"]}


# ---------------------------------------------------------------- two ranks, one copy
def bench_ranks(cfg: dict, work: Path) -> dict:
    """Peak PSS of a 2-rank torchrun training with the RAM cache on and off: the difference is what the
    node holds of the cached data set (each rank caches its own share)."""
    n, size = cfg["rank_volumes"], cfg["rank_size"]
    overrides = [*demo_training(work, "ranks", n, size), "train.epochs=1", "tracking.wandb.mode=disabled",
                 "model.widen_factor=0.25", "loader.batch_size=4",
                 "train.threads=1", "data.val_fraction=0.25"]
    peaks = {}
    for rate in cfg["rank_runs"]:
        peaks[rate] = training_pss([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc-per-node=2", "-m", "engine.run", "train", *overrides,
                                    f"cache.memory_rate={rate}", f"output.name=rate{rate}"], "2-rank",
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {"ranks_pss_cached": peaks[1.0], "ranks_pss_uncached": peaks[0.0], "ranks_cache_bytes": n * size**3 * 2}


# ---------------------------------------------------------------- loader default with the RAM cache
def bench_loaders(cfg: dict, work: Path) -> dict:
    """A CT-RATE-style training (ResNet-18, batch 4) whose data sits wholly in the RAM cache, with the
    default loader (no worker processes: MONAI's ThreadDataLoader) and with 2 worker processes: peak PSS
    of the process tree and the median epoch time (after the first), runs alternating."""
    n, size = cfg["loader_volumes"], cfg["loader_size"]
    overrides = [*demo_training(work, "loader", n, size), f"train.epochs={cfg['loader_epochs']}",
                 "tracking.wandb.mode=disabled", *cfg["loader_model"],
                 "loader.batch_size=4", "data.val_fraction=0.25", "metrics.bootstrap=0",
                 "cache.memory_rate=1.0"]
    figures: dict = {"loader_volumes": n, "loader_size": size}
    for repeat in range(cfg["loader_repeats"]):
        for mode, extra in (("threads", []), ("workers", ["loader.num_workers=2"])):
            name = f"{mode}{repeat}"
            if cfg.get("in_process", False):  # the smoke run: this process's PSS afterwards
                import psutil

                from engine.config import load_config
                from engine.workflow import train

                train(load_config(ROOT / "configs" / "default.yaml", [*overrides, *extra, f"output.name={name}"]))
                pss = psutil.Process().memory_full_info().pss
            else:
                pss = training_pss([sys.executable, "-m", "engine.run", "train", *overrides, *extra,
                                    f"output.name={name}"], mode)
            seconds = json.loads((work / "loader-runs" / name / "summary.json").read_text())["epoch_seconds"]
            figures.setdefault(f"loader_{mode}_pss_all", []).append(pss)
            figures.setdefault(f"loader_{mode}_epoch_all", []).append(statistics.median(seconds[1:]))
    return figures


# ---------------------------------------------------------------- start-up
def timed_command(args: list[str], expect_code: int, expect_text: str, runs: int) -> tuple[float, bool]:
    """Median seconds of `args` over `runs`, and whether every run exited with `expect_code` and printed
    `expect_text` (a command that crashes at once must not pass a start-up row)."""
    times, ok = [], True
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - start)
        ok = ok and proc.returncode == expect_code and expect_text in proc.stdout + proc.stderr
    return statistics.median(times), ok


def bench_startup(cfg: dict) -> dict:
    engine = [sys.executable, "-m", "engine.run"]
    help_s, help_ok = timed_command([*engine, "--help"], 0, "usage:", cfg["startup_runs"])
    error_s, error_ok = timed_command([*engine, "model.name=nope"], 2, "model.name", cfg["startup_runs"])
    return {"help_seconds": help_s, "help_ok": help_ok, "config_error_seconds": error_s, "config_error_ok": error_ok}


# ---------------------------------------------------------------- data path and roofline
def bench_data_path(cfg: dict, work: Path) -> dict:
    """Samples/s reading CT-RATE-shaped cache entries (128x256x256 float16, as the disk cache stores them)
    through a DataLoader with 0 and 2 workers, against `cat` of the same files (the raw read floor), from a
    warm page cache."""
    import torch

    folder = work / "data-path"
    folder.mkdir()
    shape, n = cfg["data_path_shape"], cfg["data_path_volumes"]
    paths = []
    for i in range(n):
        paths.append(folder / f"{i:03d}.pt")
        torch.save({"image": torch.randn(1, *shape).to(torch.float16)}, paths[-1])

    class Entries(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return torch.load(paths[i], weights_only=True)["image"]

    figures = {}
    for workers in (0, 2):
        times = []
        for _ in range(3):
            loader = torch.utils.data.DataLoader(Entries(), batch_size=4, num_workers=workers)
            start = time.perf_counter()
            for _batch in loader:
                pass
            times.append(time.perf_counter() - start)
        figures[f"data_path_w{workers}_samples_per_s"] = n / statistics.median(times)
    figures["data_path_shape"] = "x".join(map(str, shape))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(["cat", *map(str, paths)], stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    figures["data_path_cat_samples_per_s"] = n / statistics.median(times)
    return figures


def bench_roofline(cfg: dict) -> dict:
    """The training step's achieved GFLOP/s (FLOPs counted by torch.utils.flop_counter) against a large fp32
    matmul's on this machine: how much of the CPU's arithmetic the 3D network's step turns into work."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from engine.build import to_device
    from engine.models import create_model
    from engine.schema import ModelConfig

    n = cfg["matmul_size"]
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    matmul = 3 * 2 * n**3 / (time.perf_counter() - start) / 1e9
    size = cfg["roofline_size"]
    model = to_device(create_model(ModelConfig(variant="18"), 18, [size] * 3), torch.device("cpu"))  # as trained
    optimizer = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(4, 1, size, size, size), torch.rand(4, 18).round()

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    times = []
    for _ in range(cfg["roofline_steps"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"matmul_gflops": matmul, "step_gflops": counter.get_total_flops() / statistics.median(times) / 1e9,
            "roofline_size": size, "matmul_size": n}


def bench_layout(cfg: dict) -> dict:
    """Seconds per training step of the demo's network (ResNet-10, half width, batch 8 at 64^3) with its
    3D weights channels-last (the engine's CPU default, build.to_device) and in PyTorch's default layout,
    alternating, after one warm-up step of each."""
    import torch

    from engine.models import create_model
    from engine.schema import ModelConfig

    size = cfg["layout_size"]
    model = create_model(ModelConfig(variant="10", widen_factor=0.5), 4, [size] * 3)
    optimizer = torch.optim.AdamW(model.parameters())
    x, y = torch.randn(8, 1, size, size, size), torch.rand(8, 4).round()
    layouts = (("channels_last", torch.channels_last_3d), ("default", torch.contiguous_format))
    times: dict[str, list[float]] = {name: [] for name, _ in layouts}
    for repeat in range(cfg["layout_steps"] + 1):
        for name, memory_format in layouts:
            model.to(memory_format=memory_format)
            start = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
            optimizer.step()
            if repeat:  # the first of each warms up
                times[name].append(time.perf_counter() - start)
    return {"layout_size": size, **{f"step_seconds_{name}_all": t for name, t in times.items()}}



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks every figure is produced")
    parser.add_argument("--out", default=str(ROOT / "bench" / "RESULTS.md"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child_pipeline(json.loads(args.child))))
        return 0
    os.environ.setdefault("WANDB_MODE", "offline")
    cfg = SMOKE if args.smoke else FULL
    start = time.time()
    from bench.augment import augment_figures

    with tempfile.TemporaryDirectory(prefix="ct3d-bench-") as tmp:
        work = Path(tmp)
        figures = {**bench_pipeline(cfg, work), **bench_engine(cfg, work), **bench_memory(cfg, work),
                   **bench_ranks(cfg, work), **augment_figures(cfg), **bench_data_path(cfg, work),
                   **bench_roofline(cfg), **bench_layout(cfg), **bench_loaders(cfg, work), **bench_startup(cfg)}
    from bench.report import markdown

    text = markdown(figures, cfg, args.smoke, time.time() - start)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
