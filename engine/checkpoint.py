"""Checkpoint files: written atomically, read with weights_only=True (never full pickle)."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from engine.errors import CT3DError
from engine.io import atomic_write


def save_checkpoint(path: str | Path, state: dict) -> None:
    with atomic_write(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's dict; refuses anything that needs more than tensors and plain containers."""
    path = Path(path)
    if not path.is_file():
        raise CT3DError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CT3DError(f"checkpoint {path}: refused, it needs full pickle to load (only tensors and plain "
                        f"containers are accepted): {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise CT3DError(f"checkpoint {path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CT3DError(f"checkpoint {path}: not a ct3d checkpoint (no 'model' entry)")
    return state


CHECKPOINT_NAMES = ("final.pt", "last.pt", "best.pt")


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


def rng_state() -> dict:
    """Python, NumPy, torch and CUDA generator states, as tensors and plain containers."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": list(random.getstate()[1]), "python_version": random.getstate()[0],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate((state["python_version"], tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
