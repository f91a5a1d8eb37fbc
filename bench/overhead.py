"""Engine overhead: the engine's epoch against a hand-written loop doing the same work like for like (layout,
loaders, data; checkpoints outside the timed span on both sides), and the training step with channels-last 3D
weights against PyTorch's default layout."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from bench.common import ROOT, demo_training
from bench.rows import Row, band, ratio_row, row
from engine.config import LoaderConfig, load_config
from engine.data import build_dataset, label_frequencies, load_splits, make_loader
from engine.results import classification_metrics
from engine.training import create_model, make_loss, save_checkpoint, to_device, train


def hand_loop_epochs(dataset, val_dataset, names, model_config, outputs: int, size, pos_weight, lr, epochs: int,
                     folder: Path) -> list[float]:
    """The loop people write by hand, doing the engine's work like for like: the same model in the same memory
    layout (the engine's to_device: channels-last on the CPU), the same data through the same loaders (the
    engine's make_loader: its sampler and MONAI's thread loader over the RAM cache), batch size, optimizer and
    loss; each epoch validates and computes the same metrics. Each epoch also writes the same checkpoint
    (atomically), outside the timed span as the engine's epoch time leaves out its checkpoint handler."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = to_device(create_model(model_config, outputs, size), cpu)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
    loader = make_loader(dataset, LoaderConfig(batch_size=8), cpu, shuffle_seed=0, per_rank=len(dataset))
    val_loader = make_loader(val_dataset, LoaderConfig(batch_size=8), cpu)
    times = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        start = time.perf_counter()
        model.train()
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(batch["image"].float()), batch["label"].float())
            loss.backward()
            optimizer.step()
        model.eval()
        logits, labels = [], []
        with torch.no_grad():
            for batch in val_loader:
                logits.append(model(batch["image"].float()))
                labels.append(batch["label"].float())
        logits, labels = torch.cat(logits), torch.cat(labels)
        classification_metrics(torch.sigmoid(logits), labels, names, "multilabel")
        float(loss_fn(logits, labels))
        times.append(time.perf_counter() - start)
        save_checkpoint(folder / "last.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    return times[1:]  # the first epoch warms allocators, as the engine's first epoch is excluded too


def bench_engine(cfg: dict, work: Path) -> dict:
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


def bench_layout(cfg: dict) -> dict:
    """Seconds per training step of the demo's network (configs/default.yaml's model: ResNet-10, half width,
    3^3 stem; batch 8 at the demo's 48^3) with its 3D weights channels-last (the engine's CPU default,
    build.to_device) and in PyTorch's default layout, alternating, after one warm-up step of each."""
    size = cfg["layout_size"]
    model = create_model(load_config(ROOT / "configs" / "default.yaml").model, 4, [size] * 3)
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


def rows(f: dict) -> list[Row]:
    """The engine's epoch against the hand-written loop (with and without W&B), and the step's memory layout."""
    rows = []
    if "engine_ratio" in f:
        spread = f.get("engine_ratio_all", [f["engine_ratio"]])
        rows.append(ratio_row("engine epoch (training, validation, metrics, W&B offline) vs a hand-written loop doing "
                              "the same like for like (the engine's layout and loaders, same data; both write a "
                              "checkpoint each epoch outside the timed span)", f["engine_ratio"],
                              (min(spread), max(spread)), 1.03, True))
        spread = f.get("engine_ratio_no_wandb_all", [f["engine_ratio_no_wandb"]])
        rows.append(row("engine epoch without W&B vs the same hand-written loop",
                        f"{f['engine_ratio_no_wandb']:.3f}x (spread {min(spread):.3f}-{max(spread):.3f})"))
    if "step_seconds_default_all" in f:
        last, default = f["step_seconds_channels_last_all"], f["step_seconds_default_all"]
        rows.append(ratio_row(f"demo network's training step (ResNet-10, half width, batch 8 at {f['layout_size']}^3): "
                              f"channels-last 3D weights (the engine's CPU default) vs PyTorch's default layout",
                              statistics.median(last) / statistics.median(default), band(last, default), 1.0, True))
    return rows


def notes(f: dict) -> str:
    """What this run measured about the figures that most often move: the engine overhead's parts."""
    if "engine_epoch" not in f:
        return ""
    wandb_share = (f["engine_epoch"] - f["engine_epoch_no_wandb"]) / f["hand_epoch"]
    return (f"Every timed engine epoch trains, validates (metrics, calibration, thresholds) and logs to W&B "
            f"offline; its checkpoint (last.pt, best.pt when it improved) is written after the epoch's timer stops. "
            f"The hand-written loop trains the same network in the same layout from the same loaders, validates and "
            f"computes the same metrics, and writes the same kind of checkpoint after its timer stops. W&B alone cost "
            f"{100 * wandb_share:+.1f}% of an epoch in this run.")
