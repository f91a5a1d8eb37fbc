"""The training container's command under torchrun, for every kind: `python -m engine.launch` (torchrun as
its child, the pod's exit code the worker's: 2 on a user error, 143 on SIGTERM, 150 otherwise) with the
flags that match the pod's life: `--shutdown-timeout` from the grace period (the workers' time to
checkpoint after SIGTERM), and with a c10d rendezvous a store-connection timeout (`read_timeout`) as long as
the join timeout, so a pod that starts before pod 0 (an image pull, a node from the autoscaler) waits for it."""

from __future__ import annotations

from engine.config import K8sConfig
from k8s.settings import CONFIG, JOIN_SECONDS

TRAIN = ["-m", "engine.run", "train", "--config", CONFIG]


def shutdown_seconds(k: K8sConfig) -> int:
    """torchrun's wait between passing SIGTERM to the workers and killing them: the grace period less 30 s (half
    of it below a minute), so torchrun, not the kubelet's SIGKILL, ends the pod and its exit code is read."""
    grace = k.termination_grace_seconds
    return grace - 30 if grace >= 60 else grace // 2


def launch(k: K8sConfig, restarts: int) -> list[str]:
    """`engine.launch`'s flags shared by every kind: processes per node, restarts, the shutdown timeout."""
    return [f"--nproc-per-node={max(1, k.gpus)}", f"--max-restarts={restarts}",
            f"--shutdown-timeout={shutdown_seconds(k)}"]


def rendezvous_command(k: K8sConfig, host: str, restarts: int) -> list[str]:
    """Several nodes meeting at `host` (pod 0's DNS name), pod 0 told it hosts the store (torch would otherwise
    decide by resolving the endpoint, which a replacement pod 0 may do before its DNS record exists); through
    sh for that test of JOB_COMPLETION_INDEX."""
    is_host = '$(test "$JOB_COMPLETION_INDEX" = 0 && echo 1 || echo 0)'
    conf = f"is_host={is_host},join_timeout={JOIN_SECONDS},read_timeout={JOIN_SECONDS}"
    return ["sh", "-c", " ".join([
        "exec python -m engine.launch", f"--nnodes={k.nodes}", *launch(k, restarts)[:1], "--rdzv-backend=c10d",
        f"--rdzv-endpoint={host}:{k.master_port}", f"--rdzv-id={k.name}", f"--rdzv-conf={conf}",
        *launch(k, restarts)[1:], *TRAIN])]


def standalone_command(k: K8sConfig, restarts: int) -> list[str]:
    """One node, several GPUs."""
    return ["python", "-m", "engine.launch", "--standalone", "--nnodes=1", *launch(k, restarts), *TRAIN]


def train_command(k: K8sConfig, host: str, restarts: int) -> list[str]:
    """The Job's and JobSet's training container: plain python for one process; torchrun through engine.launch
    for several GPUs, or several nodes meeting at `host` (pod 0's DNS name)."""
    if k.nodes == 1 and k.gpus <= 1:
        return ["python", *TRAIN]
    if k.nodes == 1:
        return standalone_command(k, restarts)
    return rendezvous_command(k, host, restarts)


def checked_launch(k: K8sConfig, restarts: int, *extra: str) -> list[str]:
    """The check, then torchrun through engine.launch, in one container (the operators' kinds: a failed init
    container would be recreated forever); `extra`: torchrun flags of that kind."""
    run = " ".join(["exec python -m engine.launch", *launch(k, restarts), *extra, *TRAIN])
    return ["sh", "-c", f"python -m engine.run check --quick --config {CONFIG} && {run}"]
