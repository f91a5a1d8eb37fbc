"""Fault classes end with their own exit codes (engine.utils.errors; docs/kubernetes.md has the table): a node
without the GPU its pod asked for is a node fault (151, retried elsewhere), not a config error; SIGTERM during
start-up ends the run in seconds (143); bad volumes make `cache` a user error (2), not a retry."""

import signal
import subprocess
import time

import pytest
import torch

from engine.utils.errors import EXIT_INTERRUPTED, EXIT_NODE_FAULT, EXIT_USER_ERROR
from helpers import ENV, ROOT, TEXT, cli, command, make_csv, tiny_overrides


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_pod_that_asked_for_a_gpu_on_a_node_without_cuda_is_a_node_fault(tmp_path, tiny_demo):
    overrides = tiny_overrides(tmp_path, tiny_demo)
    node = cli(*overrides, env={**ENV, "CT3D_EXPECT_GPU": "1", "NODE_NAME": "gpu-node-7"})
    assert node.returncode == EXIT_NODE_FAULT, node.stderr[-2000:]
    assert "gpu-node-7" in node.stderr and "Traceback" not in node.stderr
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()  # stopped before any work
    config = cli(*overrides, "train.device=cuda")  # on a machine nobody promised a GPU: the config's error
    assert config.returncode == EXIT_USER_ERROR and "train.device" in config.stderr


def sigterm_caught(pid: int) -> bool:
    """The process has a handler for SIGTERM (bit 15 of /proc's SigCgt mask)."""
    mask = next(line for line in open(f"/proc/{pid}/status") if line.startswith("SigCgt:")).split()[1]
    return bool(int(mask, 16) >> (signal.SIGTERM - 1) & 1)


def test_sigterm_during_start_up_ends_the_run_within_seconds(tmp_path, tiny_demo):
    """A fresh interpreter (as a pod's PID 1 starts) told to stop while it imports torch and MONAI: no
    training loop holds the signal yet, so the process ends at once with 143 instead of holding its GPU for the
    pod's grace period."""
    proc = subprocess.Popen(command(*tiny_overrides(tmp_path, tiny_demo)), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **TEXT)
    deadline = time.time() + 30
    while not sigterm_caught(proc.pid):  # the handler is in place (the first thing engine.run's main does)
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    assert proc.poll() is None  # still starting: torch and MONAI take seconds to import
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert time.time() - signalled < 5 and "outside the training loop" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_bad_volume_makes_cache_a_user_error_not_a_retry(tmp_path):
    datalist = make_csv(tmp_path, ["train_1_a_1.nii.gz,1,0", "train_2_a_1.nii.gz,0,1"])  # not NIfTI inside
    proc = cli("cache", *tiny_overrides(tmp_path, datalist))
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-2000:]
    assert "train_1_a_1.nii.gz" in proc.stdout + proc.stderr
