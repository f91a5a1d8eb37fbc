"""W&B tracking through Ignite's WandBLogger and its output handlers: training loss (the step log's mean over
train.log_every iterations) and LR at that cadence, every validation metric, and at the end the report image
and summary (and, with tracking.wandb.upload_checkpoint, a weights-only copy of best.pt as an artifact: never
the per-volume validation outputs best.pt carries for the report). Ours only around it: the W&B run starts
when the trainer starts, after a resume restored the run id, so a resumed run continues its W&B run.
The API key is read by wandb from WANDB_API_KEY; it is never passed, logged or saved by us."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from engine.config.schema import WandbConfig
from engine.training.checkpoint import write_weights_only
from engine.utils.errors import CT3DError


class WandbTracker:
    def __init__(self, settings: WandbConfig, folder: Path, config: dict, name: str):
        if settings.mode not in ("offline", "online"):
            raise ValueError(f"settings.mode: expected 'offline' or 'online', got {settings.mode!r}")
        if settings.mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise CT3DError("config error: tracking.wandb.mode: online needs WANDB_API_KEY in the environment "
                            "(or a Kubernetes Secret); use offline or disabled otherwise")
        self.settings, self.folder, self.config, self.name = settings, folder, config, name
        self.run_id = uuid.uuid4().hex[:12]
        self.logger = None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state["run_id"]

    def attach(self, trainer: Engine, evaluator: Engine, optimizer: torch.optim.Optimizer, steps) -> None:
        """`steps`: the run's handlers.StepLog; training's loss and LR are logged when it has reduced (every
        train.log_every iterations and at each epoch's end), never reading the device's loss in between."""
        trainer.add_event_handler(Events.STARTED, self._start, evaluator, optimizer, steps)

    def _start(self, trainer: Engine, evaluator: Engine, optimizer: torch.optim.Optimizer, steps) -> None:
        import wandb
        from ignite.handlers.wandb_logger import WandBLogger

        s = self.settings
        self.logger = WandBLogger(project=s.project, entity=s.entity or None, tags=list(s.tags) or None,
                                  dir=str(self.folder), config=self.config, id=self.run_id, name=self.name,
                                  resume="allow", mode=str(s.mode), settings=wandb.Settings(console="off", silent=True))
        logged = Events.ITERATION_COMPLETED(event_filter=lambda engine, _: steps.reduced_now)
        self.logger.attach_output_handler(trainer, logged, tag="train",
                                          output_transform=lambda _: {"loss": steps.running_loss})
        self.logger.attach_opt_params_handler(trainer, logged, optimizer, tag="train")
        # validation at the trainer's iteration: W&B steps only go forward
        self.logger.attach_output_handler(evaluator, Events.COMPLETED, tag="val", metric_names="all",
                                          global_step_transform=lambda *_: trainer.state.iteration)

    def finish(self, report_png: Path | None, best_checkpoint: Path | None, summary: dict) -> None:
        if self.logger is None:
            return
        if report_png is not None and report_png.is_file():
            self.logger.log({"report": self.logger.Image(str(report_png))})
        for key in ("best_epoch", "wall_seconds"):
            self.logger.run.summary[key] = summary[key]
        if self.settings.upload_checkpoint and best_checkpoint is not None and best_checkpoint.is_file():
            weights = write_weights_only(best_checkpoint, best_checkpoint.with_name("best-weights.pt"))
            artifact = self.logger.Artifact(f"model-{self.run_id}", type="model")
            artifact.add_file(str(weights))
            self.logger.run.log_artifact(artifact)
        self.logger.close()
