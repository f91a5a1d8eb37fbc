"""The one exception type for errors a user can cause and fix."""


class CT3DError(Exception):
    """A bad config, datalist, volume or checkpoint: the message names the key, file or row."""
