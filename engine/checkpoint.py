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
