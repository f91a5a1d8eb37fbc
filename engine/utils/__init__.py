"""What every layer uses: the user-error type (CT3DError), atomic writes, progress reporting.
May import: nothing of engine's (the standard library and third-party packages only)."""

from engine.utils.errors import CT3DError
from engine.utils.io import save_tensors

__all__ = ["CT3DError", "save_tensors"]
