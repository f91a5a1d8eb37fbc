"""The embedding cache through the engine, like with like: a small CT-FM (random weights in CT-FM's published
layout: config.json + model.safetensors) frozen as a probe on the demo phantoms. A first run fills the embedding
cache (not measured); a second frozen run extracts nothing (summary.json says 0 extracted, the log says so) and is
timed against the same run with cache.embeddings=false, whose epochs run the encoder on every volume."""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

from safetensors.torch import save_file

from bench.common import ROOT, demo_training
from bench.encoders import TARGET, counted, network
from bench.rows import Row, band, ratio_row, row
from engine.config import load_config
from engine.training import train


class _Lines(logging.Handler):
    """The engine's log lines about embeddings (it logs to the `ct3d` logger)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("embeddings:"):
            self.lines.append(record.getMessage().split(" in /")[0])  # the folder: a temporary path


def weights_folder(folder: Path, config: dict, size: int) -> Path:
    """Random CT-FM weights for `config` as CT-FM's hub folder holds them (save_pretrained's two files)."""
    folder.mkdir(parents=True, exist_ok=True)
    encoder = network("ctfm", [size] * 3, True, config).encoder.encoder  # SegResEncoder, as upstream names it
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def bench_workflow(cfg: dict, work: Path) -> dict:
    volumes, size, config = cfg["enc_flow_volumes"], cfg["enc_flow_size"], cfg["enc_flow_ctfm"]
    cached_epochs, direct_epochs = cfg["enc_flow_epochs"]
    overrides = [*demo_training(work, "encoders", volumes, size), "model.name=ctfm", "model.preprocess_check=false",
                 f"model.weights={weights_folder(work / 'ctfm-weights', config, size)}", "model.freeze=true",
                 "augment.enabled=false", "tracking.wandb.mode=disabled", "report.panels=false",
                 "metrics.bootstrap=0", "loader.batch_size=8"]
    lines, logger = _Lines(), logging.getLogger("ct3d")
    logger.addHandler(lines)
    try:
        runs = {}
        for name, epochs, extra in (("fill", 1, []), ("cached", cached_epochs, []),
                                    ("direct", direct_epochs, ["cache.embeddings=false"])):
            lines.lines.clear()
            folder = train(load_config(ROOT / "configs" / "default.yaml",
                                       [*overrides, f"train.epochs={epochs}", f"output.name={name}", *extra]))
            runs[name] = {**json.loads((folder / "summary.json").read_text()), "log": list(lines.lines)}
    finally:
        logger.removeHandler(lines)
    extracted = runs["cached"].get("embeddings", {}).get("extracted")
    if extracted != 0 or "embeddings" in runs["direct"]:
        raise RuntimeError(f"benchmark: the second frozen run extracted {extracted} volumes (expected none), or the "
                           f"cache.embeddings=false run read embeddings")
    network_text = ", ".join(f"{k} {v}" for k, v in config.items() if k not in ("spatial_dims", "in_channels"))
    gflops = counted("ctfm", [size] * 3, config)[1] / 1e9
    return {"enc_flow_job": f"{volumes} phantoms of {size}^3, CT-FM ({network_text}; random weights; {gflops:.1f} "
                            f"GFLOP per volume), batch 8",
            "enc_flow_filled": runs["fill"]["embeddings"]["extracted"],
            "enc_flow_log": " / ".join(runs["cached"]["log"]),
            "enc_flow_cached_all": runs["cached"]["epoch_seconds"][1:],  # the first warms up, on both sides
            "enc_flow_direct_all": runs["direct"]["epoch_seconds"][1:]}


def rows(f: dict) -> list[Row]:
    if "enc_flow_cached_all" not in f:
        return []
    cached, direct = f["enc_flow_cached_all"], f["enc_flow_direct_all"]
    ratio = statistics.mean(direct) / statistics.mean(cached)
    return [ratio_row(f"the engine, a frozen CT-FM probe ({f['enc_flow_job']}), on this CPU: epoch of a second run "
                      f"on the cached embeddings (extracts none of {f['enc_flow_filled']} volumes; log: "
                      f"\"{f['enc_flow_log']}\") vs the same run with cache.embeddings=false (the encoder on every "
                      f"volume, every epoch); mean epoch_seconds after the first, each epoch training and validating",
                      ratio, band(direct, cached), TARGET, False),
            row("the same two runs: seconds per epoch (cached embeddings vs the encoder every epoch)",
                f"{statistics.mean(cached):.3f} s vs {statistics.mean(direct):.2f} s")]
