"""`python -m engine.launch TORCHRUN_ARGS...`: torchrun as a pod's main process (PID 1) needs it. It runs
`python -m torch.distributed.run TORCHRUN_ARGS` as its child and ends with the exit code Kubernetes' failure
rules can read:

- 0 when training finished; 143 (128 + SIGTERM) when the pod was told to stop (the signal is passed to
  torchrun, which passes it to the workers and, with `--shutdown-timeout` from the pod's grace period, gives
  them time to write their checkpoint);
- 2 when a worker stopped on a user error (config or data): the worker writes torch elastic's error file
  (engine.run), torchrun copies the first failure's into ours with its exit code, and a Job's FailJob rule on
  exit 2 or a JobSet's FailJobSet fires instead of a retry. A user error is the same on every attempt, so the
  worker also leaves a file at CT3D_USER_ERROR_FILE (set here) and torchrun is stopped at once: its
  `--max-restarts` would otherwise start the failing workers again that many times (each a start-up of minutes
  on a cluster's data) before the pod could say 2;
- 151 (NODE_FAULT) when a worker found this node unable to run it (no CUDA where the pod asked for a GPU):
  retried, the node named in the worker's log;
- 150 (RETRYABLE) for any other failure (a store it could not reach, restarts used up, a crashed worker), which
  every kind retries: restartPolicy ExitCode treats 128-255 as retryable;
- 3 (RETRIES_SPENT), from the pod's first step (`engine.run check`, before this launcher), when the pod has been
  started more than CT3D_MAX_ATTEMPTS times: each start adds one to the count in CT3D_ATTEMPTS_FILE (on the
  output claim, one per replica; count_attempt), so a kind whose controller recreates failed pods without
  counting them (PyTorchJob's restartPolicy ExitCode) still stops, whatever step failed.

Our own: torchrun exits 1 on every failure, on SIGTERM too, so a pod's exit code says nothing of why; and no
controller counts a PyTorchJob's recreated pods."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.utils.errors import EXIT_NODE_FAULT as NODE_FAULT
from engine.utils.errors import EXIT_RETRYABLE as RETRYABLE
from engine.utils.errors import EXIT_USER_ERROR as USER_ERROR
from engine.utils.errors import CT3DError, Transient
from engine.utils.io import TRANSIENT_ERRNOS, write_text

ATTEMPTS_FILE, MAX_ATTEMPTS = "CT3D_ATTEMPTS_FILE", "CT3D_MAX_ATTEMPTS"
USER_ERROR_FILE = "CT3D_USER_ERROR_FILE"  # where a worker under this launcher says it stopped on a user error


def worker_exit_code(error_file: str) -> int | None:
    """The exit code torchrun recorded for the first failed worker that left an error file, if any."""
    try:
        with open(error_file) as f:
            message = json.load(f).get("message")
    except (OSError, ValueError):
        return None
    code = message.get("errorCode") if isinstance(message, dict) else None
    return int(code) if code is not None else None


def exit_code(returncode: int, signalled: int | None, worker: int | None) -> int:
    """The pod's exit code from torchrun's, the signal the pod got (if any) and the failed worker's."""
    if returncode == 0:
        return 0
    if signalled is not None:
        return 128 + signalled
    if worker in (USER_ERROR, NODE_FAULT):
        return worker
    return RETRYABLE


def count_attempt(environ: dict) -> str | None:
    """Adds this start to CT3D_ATTEMPTS_FILE's count (atomically); a message when the count passes
    CT3D_MAX_ATTEMPTS (the pod must not start training again), None otherwise or without the two variables."""
    path, limit = environ.get(ATTEMPTS_FILE), environ.get(MAX_ATTEMPTS)
    if not path or not limit:
        return None
    try:
        done = int(Path(path).read_text().strip() or 0)
    except FileNotFoundError:
        done = 0
    except OSError as exc:  # storage that did not answer must not reset the count (the limit would never trip)
        if exc.errno in TRANSIENT_ERRNOS:
            raise Transient(f"{ATTEMPTS_FILE}: {path} did not answer ({exc.strerror or exc})") from None
        done = 0
    except ValueError:  # unparsable: count from here, never block a run on the counter itself
        done = 0
    try:
        write_text(Path(path), f"{done + 1}\n")
    except OSError as exc:  # the claim: one that did not answer is retried (150), one that refused is the user's
        if exc.errno in TRANSIENT_ERRNOS:
            raise Transient(f"{ATTEMPTS_FILE}: {path} did not answer ({exc.strerror or exc})") from None
        raise CT3DError(f"{ATTEMPTS_FILE}: cannot write {path} ({exc.strerror or exc}): the output claim must be "
                        f"writable by the pod's user") from None
    if done + 1 > int(limit):
        return (f"ct3d launch: this pod was started {done + 1} times, more than {MAX_ATTEMPTS}={limit} "
                f"({path}): not retrying; the logs of the earlier attempts say why they failed")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory(prefix="ct3d-launch-") as tmp:
        error_file, user_error = os.path.join(tmp, "error.json"), os.path.join(tmp, "user-error")
        env = {**os.environ, "TORCHELASTIC_ERROR_FILE": error_file, USER_ERROR_FILE: user_error}
        signalled: list[int] = []
        child: list[subprocess.Popen] = []

        def forward(signum, frame) -> None:  # installed first: a SIGTERM before torchrun started is not lost
            signalled.append(signum)
            if child:
                child[0].send_signal(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, forward)
        child.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *argv], env=env))
        if signalled:
            child[0].send_signal(signalled[0])
        returncode = wait(child[0], user_error)
        if returncode is None:  # a worker's user error: torchrun was stopped before it could restart the workers
            return USER_ERROR
        return exit_code(returncode, signalled[0] if signalled else None, worker_exit_code(error_file))


def wait(torchrun: subprocess.Popen, user_error: str) -> int | None:
    """torchrun's exit code, or None once a worker left `user_error` (torchrun is then stopped with SIGTERM, which
    it passes to the workers, and waited for)."""
    while True:
        try:
            return torchrun.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if os.path.exists(user_error):
                torchrun.send_signal(signal.SIGTERM)
                torchrun.wait()
                return None


if __name__ == "__main__":
    sys.exit(main())
