"""The one exception type for errors a user can cause and fix."""


class CT3DError(Exception):
    """A bad config, datalist, volume or checkpoint: the message names the key, file or row."""


class Interrupted(CT3DError):
    """Training stopped by a signal after saving its state: run again to continue (exit status 143)."""
