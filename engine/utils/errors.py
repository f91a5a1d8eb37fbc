"""The one exception type for errors a user can cause and fix."""


class CT3DError(Exception):
    """A bad config, datalist, volume or checkpoint: the message names the key, file or row."""


class Transient(CT3DError):
    """A failure a retry may not meet again (a collective timed out on a cold cache): said like a user error,
    but not one (exit status 1, which engine.launch reports as retryable, not 2)."""


class Interrupted(CT3DError):
    """Training stopped by a signal after saving its state: run again to continue (exit status 143)."""
