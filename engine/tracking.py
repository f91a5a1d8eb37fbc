"""W&B tracking as an Ignite handler: config, training loss and LR per iteration, validation metrics,
and at the end the report image (and the best checkpoint as an artifact when online).
The API key is read by wandb from WANDB_API_KEY; it is never passed, logged or saved by us."""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path

from ignite.engine import Engine, Events

from engine.errors import CT3DError


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


class WandbTracker:
    def __init__(self, mode: str, project: str, entity: str, tags: list[str], folder: Path, config: dict,
                 run_id: str, name: str):
        if mode not in ("offline", "online"):
            raise ValueError(f"mode: expected 'offline' or 'online', got {mode!r}")
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            raise CT3DError("config error: tracking.wandb.mode: online needs WANDB_API_KEY in the environment "
                            "(or a Kubernetes Secret); use offline or disabled otherwise")
        import wandb

        self.wandb, self.mode, self.run_id = wandb, mode, run_id
        self.run = wandb.init(project=project, entity=entity or None, tags=list(tags) or None, dir=str(folder),
                              config=config, id=run_id, name=name, resume="allow", mode=mode,
                              settings=wandb.Settings(console="off", silent=True))

    def attach(self, trainer: Engine, evaluator: Engine, lr_of) -> None:
        def log_iteration(engine: Engine) -> None:
            self.run.log({"train/loss": float(engine.state.output["loss"].detach()), "train/lr": lr_of()},
                         step=engine.state.iteration)

        def log_validation(_: Engine) -> None:
            values = {f"val/{k}": v for k, v in evaluator.state.metrics.items()
                      if isinstance(v, float) and not math.isnan(v)}
            self.run.log({**values, "epoch": trainer.state.epoch}, step=trainer.state.iteration)

        trainer.add_event_handler(Events.ITERATION_COMPLETED, log_iteration)
        evaluator.add_event_handler(Events.COMPLETED, log_validation)

    def finish(self, report_png: Path | None, best_checkpoint: Path | None, summary: dict) -> None:
        if report_png is not None and report_png.is_file():
            self.run.log({"report": self.wandb.Image(str(report_png))})
        for key in ("best_epoch", "wall_seconds"):
            self.run.summary[key] = summary[key]
        if self.mode == "online" and best_checkpoint is not None and best_checkpoint.is_file():
            artifact = self.wandb.Artifact(f"model-{self.run_id}", type="model")
            artifact.add_file(str(best_checkpoint))
            self.run.log_artifact(artifact)
        self.run.finish()
