"""The exception types for errors a user can cause and fix, the failures a retry may fix, and the exit codes
every command and pod ends with: one table (docs/kubernetes.md, "Faults and exit codes") that the manifests'
failure rules read."""

EXIT_USER_ERROR = 2  # a bad config, datalist, volume or checkpoint: the same on every attempt, never retried
EXIT_RETRIES_SPENT = 3  # engine.launch: this pod's attempts (CT3D_MAX_ATTEMPTS) are used up: never retried
EXIT_INTERRUPTED = 143  # 128 + SIGTERM: stopped (preempted, drained) after saving what there was to save
EXIT_RETRYABLE = 150  # transient: storage that did not answer, a collective timed out, a crashed worker
EXIT_NODE_FAULT = 151  # this node's GPU or driver is broken: retried (on another node), the node named in the log


class CT3DError(Exception):
    """A bad config, datalist, volume or checkpoint: the message names the key, file or row (exit 2)."""


class Transient(CT3DError):
    """A failure a retry may not meet again (a collective timed out on a cold cache, storage that did not
    answer): said like a user error, but not one (exit 150, retried)."""


class NodeFault(Transient):
    """This node cannot run the work the pod asked for (no CUDA where the pod requested a GPU, a driver error):
    exit 151, retried, with the node's name in the message."""


class Interrupted(CT3DError):
    """Stopped by a signal after saving its state (or before there was any): run again to continue (exit 143)."""
