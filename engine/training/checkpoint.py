"""Checkpoints: one mapping of stateful parts (`to_save`, as in Ignite's `Checkpoint`) is both what a
checkpoint holds and what a resume restores, so no part can be saved and forgotten. Files are written
atomically and read with weights_only=True (never full pickle)."""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from engine.training.preemption import SignalFlag, resumable_here
from engine.utils.errors import CT3DError
from engine.utils.io import TMP_PREFIX, save_tensors, temp_path_for

log = logging.getLogger("ct3d")
CHECKPOINT_NAMES = ("final.pt", "last.pt", "best.pt")
CHECKPOINT_FORMAT = 2  # bump when what a checkpoint holds changes; older files are refused by name


def save_checkpoint(path: str | Path, state: dict) -> None:
    save_tensors(state, path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """A checkpoint's dict; refuses anything that needs more than tensors and plain containers. `mmap`: the
    tensors stay in the file until touched (reading the weights does not read the optimizer's state)."""
    path = Path(path)
    if not path.is_file():
        raise CT3DError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CT3DError(f"checkpoint {path}: refused, it needs full pickle to load (only tensors and plain "
                        f"containers are accepted): {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise CT3DError(f"checkpoint {path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CT3DError(f"checkpoint {path}: not a ct3d checkpoint (no 'model' entry)")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CT3DError(f"checkpoint {path}: written by another ct3d version (checkpoint format "
                        f"{state.get('format', 1)}, this version reads {CHECKPOINT_FORMAT}); start a new run "
                        f"(another output.name, or train.resume=off)")
    return state


SHAREABLE = ("model", "labels", "task", "model_config", "preprocessing", "threshold", "calibration", "format",
             "encoder")  # a probe's head names its encoder by SHA-256: without it the file would not load


def copy_checkpoint(source: Path, path: Path) -> None:
    """`path` holds what `source` holds: a hard link where the filesystem has them (the bytes are written once),
    else a copy; either appears at `path` at once (a temp name, then a rename)."""
    import shutil

    tmp = temp_path_for(path)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def progress_of(state: dict) -> tuple:
    """Where training stood when `state` was taken (epoch and iteration): equal progress, equal state."""
    trainer = state.get("trainer", {})
    return trainer.get("epoch"), trainer.get("iteration")


def write_weights_only(checkpoint: str | Path, path: str | Path) -> Path:
    """A copy of `checkpoint` that holds what inference needs (weights, labels, preprocessing, thresholds,
    calibration) and nothing of the data: no per-volume validation outputs, metrics, optimizer or RNG.
    It loads wherever a checkpoint does (evaluate, predict, export, model.pretrained)."""
    state = load_checkpoint(checkpoint)
    shared = {k: state[k] for k in SHAREABLE if k in state}
    shared["trainer"] = {"epoch": state["trainer"]["epoch"], "iteration": state["trainer"]["iteration"]}
    save_checkpoint(path, shared)
    return Path(path)


def _iteration_of(path: Path) -> int | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state["trainer"]["iteration"])
    except Exception:  # unreadable or foreign: never resume from it
        return None


def find_latest_checkpoint(folder: str | Path) -> Path | None:
    """The readable checkpoint in `folder` with the most training iterations behind it, or None.
    Temp files of interrupted writes (`.tmp-*`) are never candidates."""
    best: tuple[int, Path] | None = None
    for name in CHECKPOINT_NAMES:
        path = Path(folder) / name
        if path.is_file():
            iteration = _iteration_of(path)
            if iteration is not None and (best is None or iteration > best[0]):
                best = (iteration, path)
    return best[1] if best else None


def resume_checkpoint(resume: str, folder: Path) -> Path | None:
    """train.resume: auto (latest readable checkpoint in the run folder, if any), off, or a path."""
    if resume == "off":
        return None
    if resume == "auto":
        found = find_latest_checkpoint(folder)
        present = [name for name in CHECKPOINT_NAMES if (Path(folder) / name).is_file()]
        if found is None and present:  # starting over would replace the run's metrics, summary and report
            raise CT3DError(f"train.resume=auto: {folder} holds {', '.join(present)} but none is readable (damaged, "
                            f"or not a ct3d checkpoint); give train.resume a good checkpoint, or start over with "
                            f"train.resume=off or another output.name")
        return found
    if not Path(resume).is_file():
        raise CT3DError(f"config error: train.resume: {resume!r} is not auto, off or an existing checkpoint")
    return Path(resume)


def _snapshot(value: Any) -> Any:
    """A copy of a checkpoint state that later training steps cannot change (tensors cloned to CPU)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    return value


class Checkpoints:
    """last.pt after every epoch, best.pt when the key metric improved (`table.improved_at`), final.pt by
    `save_final()` (a link to last.pt when training has not moved since). Each holds `state_dict()` of every
    part of `to_save` plus the fixed `meta` (labels, preprocessing, model settings) that inference needs.
    Every rank calls `save` at the same iterations (parts such as the RNG states gather from every rank);
    rank 0 (`write`) writes. Our own: Ignite's Checkpoint cannot overwrite a fixed file name and does not
    fsync. The state is snapshotted at once and written (atomically) by a background thread, so training
    does not wait on the disk; the next save, and `wait()`, wait for the previous write.

    Mid-epoch, without a collective of their own: rank 0's clock (`every_minutes`) and any rank's SIGTERM
    ride on the step log's reduce (StepLog.request); once one is seen, every rank acts at the first
    iteration where a resume is exact (preemption.resumable_here), the step log reducing each iteration
    until then, so no save can hold a loss no reduce has checked."""

    def __init__(self, folder: Path, to_save: dict[str, Any], meta: dict, write: bool = True,
                 every_minutes: float = 0.0):
        self.folder, self.to_save, self.meta, self.write = Path(folder), to_save, meta, write
        self.every_seconds, self._saved_at = 60 * every_minutes, time.monotonic()
        self.on_signal = SignalFlag()
        self.stopped = False  # by SIGTERM, after last.pt was written
        self._stop_pending = self._save_pending = False
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None
        self._saved: tuple[Path | None, tuple] = (None, ())  # the last file saved and the progress it holds
        if write:  # clear temp files left by a killed writer (one process writes a run folder)
            for stale in self.folder.glob(f"{TMP_PREFIX}*"):
                stale.unlink(missing_ok=True)

    def attach(self, trainer: Engine, table: Any, steps: Any) -> None:  # steps: a handlers.StepLog
        """last.pt (and best.pt) after each epoch; mid-epoch, last.pt when `every_minutes` have passed since the
        last save (a lost node costs minutes, not an epoch) and on SIGTERM, then a stop."""
        import ignite.distributed as idist

        stop = steps.request(lambda: self.on_signal.requested)
        clock = steps.request(lambda: self.write and 0 < self.every_seconds <= time.monotonic() - self._saved_at)

        def mid_epoch(engine: Engine) -> None:
            if not steps.reduced_now:
                return
            self._stop_pending |= steps.flags[stop]
            self._save_pending |= steps.flags[clock]
            steps.keep_reducing = self._stop_pending or self._save_pending
            if not steps.keep_reducing or not resumable_here(engine):
                return
            if self._stop_pending:
                self._stop(engine, mid_epoch=True)
            else:
                self.save("last")
                self._save_pending = steps.keep_reducing = False

        def after_epoch(engine: Engine) -> None:
            self.save(*(["best"] if table.improved_at(engine.state.epoch) else []), "last")
            self._save_pending = False
            requested = self._stop_pending or self.on_signal.requested  # one all-reduce an epoch: a SIGTERM
            if idist.get_world_size() > 1:  # that came during validation stops here, not an epoch later
                requested = bool(idist.all_reduce(torch.tensor(float(requested))) > 0)
            if requested:
                self._stop(engine, mid_epoch=False)

        trainer.add_event_handler(Events.STARTED, self.on_signal.install)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, mid_epoch)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, after_epoch)

    def _stop(self, trainer: Engine, mid_epoch: bool) -> None:
        import ignite.distributed as idist

        if mid_epoch:
            self.save("last", background=False)
        self.wait()
        if idist.get_world_size() > 1:
            idist.barrier()  # rank 0 has written before any rank leaves
        self.stopped = True
        log.warning("stopped by SIGTERM at iteration %d; %s holds it: run again to continue",
                    trainer.state.iteration, self.folder / "last.pt")
        trainer.terminate()

    def state(self) -> dict:
        parts = {name: part.state_dict() for name, part in self.to_save.items()}
        return {**parts, **self.meta, "format": CHECKPOINT_FORMAT}

    def save(self, *names: str, background: bool = True) -> list[Path]:
        """Writes the current state to each `name`.pt (in this order: the first written, the others links to
        it, so best.pt and last.pt of one epoch cost one write). Every rank calls it; only `write` writes."""
        state = self.state()  # on every rank: a part may gather from all of them
        paths = [self.folder / f"{name}.pt" for name in names]
        self._saved = (paths[0] if self.write else None, progress_of(state))
        if not self.write:
            return []
        state = _snapshot(state)
        self.wait()
        self._saved_at = time.monotonic()

        def write() -> None:
            try:
                save_checkpoint(paths[0], state)
                for path in paths[1:]:
                    copy_checkpoint(paths[0], path)
            except BaseException as exc:  # re-raised in the training thread by wait()
                self._error = exc

        if background:
            self._writer = threading.Thread(target=write, name="ct3d-checkpoint", daemon=False)
            self._writer.start()
        else:
            write()
            self.wait()
        return paths

    def holds_current(self) -> bool:
        """Whether the last save (written or still being written) holds training as it stands now (the same
        answer on every rank)."""
        _, progress = self._saved
        trainer = self.to_save.get("trainer")
        return progress != () and progress == progress_of({"trainer": trainer.state_dict() if trainer else {}})

    def save_final(self) -> Path | None:
        """final.pt after the last epoch: a link to the file that epoch's own save wrote when training has not
        moved since (the usual end: no second write of the same state), else a save (every rank calls it)."""
        current = self.holds_current()
        self.wait()
        if not current:
            saved = self.save("final", background=False)
            return saved[0] if saved else None
        if not self.write:
            return None
        final = self.folder / "final.pt"
        copy_checkpoint(self._saved[0], final)
        return final

    def wait(self) -> None:
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


class Resume:
    """Restores every part of `to_load` from a checkpoint when the trainer starts (as MONAI's
    CheckpointLoader does: the scaler exists only then). Our own: MONAI's loader refuses a checkpoint
    past `max_epochs` and parts the checkpoint lacks; here a part new to the run (e.g. early stopping
    turned on) starts fresh, and the file is read with our checks."""

    def __init__(self, path: Path | None, to_load: dict[str, Any], state: dict | None = None):
        self.path, self.to_load, self.state = path, to_load, state  # state: the file, already loaded
        self.epoch: int | None = None  # the epoch the checkpoint was taken at, once loaded

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self)

    def __call__(self, trainer: Engine) -> None:
        if self.path is None:
            return
        # On the CPU: the RNG states must be CPU tensors; model and optimizer copy to their own devices.
        state, self.state = self.state or load_checkpoint(self.path, "cpu"), None
        missing = [name for name in self.to_load if name not in state]
        Checkpoint.load_objects({k: v for k, v in self.to_load.items() if k in state}, state)
        self.epoch = trainer.state.epoch
        log.info("resumed from %s at iteration %d (epoch %d done)%s%s", self.path, trainer.state.iteration,
                 trainer.state.epoch,
                 " (already finished)" if trainer.state.epoch >= trainer.state.max_epochs or trainer.should_terminate
                 else "", f"; new since then: {', '.join(missing)}" if missing else "")
