"""`bench gpu`'s engine rows: the engine's own training step as `engine.training.train` builds and runs it (MONAI's
SupervisedTrainer, the engine's loader over the RAM cache, device augmentation, bf16 autocast, fused AdamW, the LR
schedule and the step log), with the CT-RATE config's model and augmentation, on demo phantoms padded to the
benchmark's shape (a step's cost depends on the shape, not the voxels), beside the hand loop's step at the same
batch. A handler given to train's `attach` profiles a few iterations of epoch 1 (their kernel time) and times
epoch 2 from the end of its first iteration to the end of its last, with a device sync at each end: the steady
state, the loader's waits included."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import torch
from ignite.engine import Events

from bench.common import ROOT, TIMED_ONLY
from bench.gpu_steps import profiler, sync, trace_kernel_seconds
from engine.config import load_config
from engine.training import train

WARM, PROFILED = 2, 3  # epoch 1: iterations 1-2 warm up (cuDNN's autotuning), 3-5 are profiled
CT_RATE = ROOT / "configs" / "ct-rate.yaml"


class StepClock:
    """Profiles iterations WARM + 1 .. WARM + PROFILED of epoch 1 and times epoch 2 (see the module)."""

    def __init__(self, device: torch.device):
        self.device, self.prof = device, None
        self.profiled_volumes, self.timed_volumes, self.kernel_seconds = 0, 0, None
        self.start = self.seconds = None

    def attach(self, trainer, evaluator) -> None:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        s = engine.state
        local, volumes = (s.iteration - 1) % s.epoch_length + 1, len(s.batch["image"])
        if s.epoch == 1 and local == 1 and s.epoch_length < WARM + PROFILED:
            raise ValueError(f"engine row: {s.epoch_length} iterations an epoch, fewer than the {WARM + PROFILED} "
                             f"it profiles: raise the benchmark's engine_volumes")
        if s.epoch == 1 and local == WARM:
            sync(self.device)
            self.prof = profiler(self.device)
            self.prof.start()
        elif s.epoch == 1 and WARM < local <= WARM + PROFILED:
            self.profiled_volumes += volumes
            if local == WARM + PROFILED:
                sync(self.device)
                self.prof.stop()
                self.kernel_seconds = trace_kernel_seconds(self.prof)
        elif s.epoch == 2:
            if local > 1:
                self.timed_volumes += volumes
            if local == 1 or local == s.epoch_length:
                sync(self.device)
                now = time.perf_counter()
                self.start, self.seconds = (now, None) if local == 1 else (self.start, now - self.start)


def engine_overrides(work: Path, size: list[int], batch: int, device: torch.device, cfg: dict) -> list[str]:
    """configs/ct-rate.yaml's model, augmentation, precision and loader, on cfg['engine_volumes'] demo phantoms a
    quarter of `size` per axis (cheap to make), padded to `size` by crop/pad; two epochs, validated once, no
    W&B, report panels or Grad-CAM (the closing is not timed, only paid for)."""
    labels = list(load_config(CT_RATE).data.label_columns)
    shape = [max(8, n // 4) for n in size]
    return ["data.train=''", "data.val=''", "data.image_root=''", "data.layout=flat", "data.label_columns=[]",
            "data.demo.enabled=true", f"data.demo.dir={work / 'engine-demo'}",
            f"data.demo.num_volumes={cfg['engine_volumes']}", f"data.demo.shape={json.dumps(shape)}",
            f"data.demo.labels={json.dumps(labels)}", "data.val_fraction=0.1", "data.test_fraction=0",
            f"preprocess.spatial_size={json.dumps(size)}", "preprocess.spacing=null", "preprocess.resize=crop_pad",
            f"cache.dir={work / 'engine-cache'}", "cache.memory_rate=1.0", f"output.dir={work / 'engine-runs'}",
            f"output.name=batch{batch}",
            "train.resume=off", f"train.device={device}", "train.epochs=2", "train.val_every=2",
            f"loader.batch_size={batch}", f"model.widen_factor={cfg['widen']}", "tracking.wandb.mode=disabled",
            "metrics.bootstrap=0", "report.panels=false", "report.saliency_positives=0", "report.saliency_negatives=0",
            TIMED_ONLY]


def engine_step_figures(work: Path, size: list[int], batch: int, device: torch.device, cfg: dict) -> dict:
    """The engine's steady-state volumes/s at `batch` and its GPU busy (profiler kernel time per volume over the
    timed wall time per volume; None on the CPU)."""
    clock = StepClock(device)
    config = load_config(CT_RATE, engine_overrides(work, size, batch, device, cfg))
    with contextlib.redirect_stdout(io.StringIO()):  # the run's closing table of metrics: noise here
        train(config, attach=clock.attach)
    if clock.seconds is None:
        raise RuntimeError("engine row: epoch 2 was not timed (the run stopped early?)")
    per_volume = clock.seconds / clock.timed_volumes
    busy = None if clock.kernel_seconds is None else clock.kernel_seconds / clock.profiled_volumes / per_volume
    return {"batch": batch, "samples_per_s": 1 / per_volume, "busy": busy, "timed_volumes": clock.timed_volumes}
