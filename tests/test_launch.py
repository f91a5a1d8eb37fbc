"""engine.launch: the pod's exit code from torchrun's, the signal and the failed worker's error file (the
end-to-end runs are in tests/kubernetes: a worker's exit 2, SIGTERM's 143)."""

import json

from engine.launch import RETRYABLE, exit_code, worker_exit_code


def test_the_exit_code_says_why_the_pod_ended():
    assert exit_code(0, None, None) == 0
    assert exit_code(0, 15, None) == 0  # finished before the signal mattered
    assert exit_code(1, 15, 2) == 143  # told to stop: 128 + SIGTERM, whatever the workers did on the way out
    assert exit_code(1, None, 2) == 2  # a worker's user error: FailJob / FailJobSet, not a retry
    assert exit_code(1, None, 1) == exit_code(1, None, None) == RETRYABLE == 150  # retried by every kind
    assert 128 <= RETRYABLE <= 255  # restartPolicy ExitCode retries 128-255


def test_the_failed_workers_code_comes_from_torchruns_copy_of_its_error_file(tmp_path):
    path = tmp_path / "error.json"
    assert worker_exit_code(str(path)) is None  # no worker left one (a crash, a signal)
    path.write_text(json.dumps({"message": {"message": "CT3DError: x", "errorCode": 2}}))
    assert worker_exit_code(str(path)) == 2
    path.write_text(json.dumps({"message": "a new format"}))
    assert worker_exit_code(str(path)) is None
    path.write_text("not json")
    assert worker_exit_code(str(path)) is None


def test_a_workers_user_error_file_stops_torchrun_at_once(tmp_path):
    """A worker's user error is the same on every attempt: once a worker left the file, torchrun (here a process
    that would run a minute) gets SIGTERM instead of restarting it, and the pod's code is 2 whatever torchrun's."""
    import subprocess
    import sys
    import threading
    import time

    from engine.launch import wait

    flag = tmp_path / "user-error"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    threading.Timer(0.3, flag.write_text, ["config error: x\n"]).start()
    started = time.time()
    assert wait(proc, str(flag)) is None and proc.returncode == -15  # SIGTERM
    assert time.time() - started < 10
    done = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert wait(done, str(tmp_path / "none")) == 3  # no file: torchrun's own code


def test_a_node_fault_passes_through_and_every_code_sits_in_its_class():
    from engine.utils.errors import EXIT_NODE_FAULT, EXIT_RETRIES_SPENT, EXIT_USER_ERROR

    assert exit_code(1, None, EXIT_NODE_FAULT) == EXIT_NODE_FAULT == 151  # retried, told apart from a crash
    assert 128 <= EXIT_NODE_FAULT <= 255 and EXIT_NODE_FAULT != RETRYABLE
    assert 1 <= EXIT_RETRIES_SPENT <= 127 and 1 <= EXIT_USER_ERROR <= 127  # ExitCode policy: permanent


def test_a_pod_recreated_past_its_attempts_stops_at_its_first_step(tmp_path, monkeypatch):
    """PyTorchJob's controller recreates a failed pod without counting it: the pod's first step (`check`, before
    the launcher) counts each start on the output claim, and the start after CT3D_MAX_ATTEMPTS ends with 3
    (permanent) before the check or training run again, whatever step failed before."""
    from engine import launch, run

    counter = tmp_path / "claim" / ".attempts" / "worker-0"
    monkeypatch.setenv("CT3D_ATTEMPTS_FILE", str(counter))
    monkeypatch.setenv("CT3D_MAX_ATTEMPTS", "3")
    bad = ["check", "--quick", "model.name=nope"]  # each attempt fails (here: its config)
    for attempt in (1, 2, 3):
        assert run.main(bad) == 2 and counter.read_text() == f"{attempt}\n"
    assert run.main(bad) == 3 and counter.read_text() == "4\n"  # the fourth start: spent, nothing else ran
    assert run.main(["model.name=nope"]) == 2 and counter.read_text() == "4\n"  # only the first step counts
    monkeypatch.delenv("CT3D_MAX_ATTEMPTS")
    assert launch.count_attempt(dict(__import__("os").environ)) is None  # without a limit nothing is counted
