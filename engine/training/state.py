"""The stateful parts of a checkpoint that are not modules or optimizers: the random generators, the
trainer's progress (epoch, iteration, early stop; where a mid-epoch checkpoint resumes) and the AMP
scaler. Each has state_dict / load_state_dict, so `to_save` holds them like any other part."""

from __future__ import annotations

import random

import numpy as np
import torch
from ignite.engine import Engine

from engine.utils.errors import CT3DError


class RandomState:
    """Python, NumPy, torch and CUDA generator states, as tensors and plain containers: rank 0's at the top
    level and, under torchrun, every rank's in `per_rank` (gathered: state_dict is a collective there), so
    each rank resumes its own dropout masks. A checkpoint of another world size (or of an older version)
    gives every rank rank 0's."""

    def state_dict(self) -> dict:
        import ignite.distributed as idist

        own = self._own()
        world = idist.get_world_size()
        if world == 1:
            return own
        import torch.distributed as dist

        every: list = [None] * world
        dist.all_gather_object(every, own)
        return {**every[0], "per_rank": every}

    def load_state_dict(self, state: dict) -> None:
        import ignite.distributed as idist

        every = state.get("per_rank") or []
        self._restore(every[idist.get_rank()] if len(every) == idist.get_world_size() else state)

    @staticmethod
    def _own() -> dict:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        }

    @staticmethod
    def _restore(state: dict) -> None:
        random.setstate((state["python_version"], tuple(state["python"]), None))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


class TrainerState:
    """The trainer's epoch, iteration, early stop and world size. On load the configured epoch count stays (a
    raised train.epochs extends a finished run), a run that had stopped early stops again at once, and a
    checkpoint taken mid-epoch continues at the next batch: the training sampler skips the batches that
    epoch had already seen (same order: it depends on seed and epoch alone). A mid-epoch checkpoint is
    refused under another world size: the rest of that epoch was dealt to the ranks it had (sharing.deal),
    and no other number of ranks can take exactly it; an epoch's end resumes under any."""

    def __init__(self, trainer: Engine):
        self.trainer = trainer

    def state_dict(self) -> dict:
        s = self.trainer.state
        return {"epoch": s.epoch, "iteration": s.iteration, "epoch_length": s.epoch_length,
                "stopped_early": bool(self.trainer.should_terminate), "world_size": _world(),
                "seed": _sampler_seed(s)}

    def load_state_dict(self, state: dict) -> None:
        s = self.trainer.state
        length, epoch, iteration = s.epoch_length, state["epoch"], state["iteration"]
        saved_length = state.get("epoch_length") or length
        done = iteration - (epoch - 1) * saved_length  # batches of `epoch` behind the checkpoint
        max_epochs = max(s.max_epochs, epoch)
        world = state.get("world_size", _world())  # older checkpoints did not say: taken as this run's
        seed, now = state.get("seed"), _sampler_seed(s)
        if done < saved_length and None not in (seed, now) and seed != now:
            raise CT3DError(f"cannot resume: the checkpoint was taken in epoch {epoch} after {done} of its "
                            f"{saved_length} iterations with train.seed={seed}; this run has {now}, which deals and "
                            f"orders that epoch otherwise: restore train.seed={seed}, or resume from an epoch's end "
                            f"(train.resume=<run>/checkpoints/best.pt)")
        if done < saved_length and world != _world():
            raise CT3DError(f"cannot resume: the checkpoint was taken in epoch {epoch} after {done} of its "
                            f"{saved_length} iterations, with {world} rank(s); this run has {_world()}. The rest of "
                            f"that epoch was dealt to {world} ranks: start with {world} (torchrun --nnodes and "
                            f"--nproc-per-node), or resume from an epoch's end (train.resume=<run>/checkpoints/"
                            f"best.pt)")
        if done < saved_length and saved_length == length:  # taken mid-epoch: continue at the next batch
            self.trainer.load_state_dict({"iteration": iteration, "epoch_length": length, "max_epochs": max_epochs})
            s.dataloader.sampler.skip_next(done * s.dataloader.batch_size)
        else:  # at an epoch's end; or mid-epoch with another batch size: that epoch again
            completed = epoch if done >= saved_length else epoch - 1
            self.trainer.load_state_dict({"epoch": completed, "epoch_length": length, "max_epochs": max_epochs})
        if state["stopped_early"]:
            self.trainer.terminate()


def _sampler_seed(s) -> int | None:
    """The training sampler's seed (train.seed; None for a loader without one): it deals and orders each epoch."""
    return getattr(getattr(s.dataloader, "sampler", None), "seed", None)


def _world() -> int:
    import ignite.distributed as idist

    return idist.get_world_size()


class ScalerState:
    """MONAI's trainer makes its fp16 GradScaler when `run()` starts: read it then, not before."""

    def __init__(self, trainer: Engine):
        self.trainer = trainer

    def state_dict(self) -> dict | None:
        return self.trainer.scaler.state_dict() if self.trainer.scaler is not None else None

    def load_state_dict(self, state: dict | None) -> None:
        if self.trainer.scaler is not None and state is not None:
            self.trainer.scaler.load_state_dict(state)
