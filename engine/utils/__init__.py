"""What every layer uses: the user-error type (CT3DError), atomic writes, progress reporting.
May import: nothing of engine's (the standard library and third-party packages only)."""

from engine.utils.errors import (
    EXIT_INTERRUPTED,
    EXIT_NODE_FAULT,
    EXIT_RETRIES_SPENT,
    EXIT_RETRYABLE,
    EXIT_USER_ERROR,
    CT3DError,
)
from engine.utils.io import save_tensors

__all__ = ["CT3DError", "EXIT_INTERRUPTED", "EXIT_NODE_FAULT", "EXIT_RETRIES_SPENT", "EXIT_RETRYABLE",
           "EXIT_USER_ERROR", "save_tensors"]
