"""k8s.kind=pytorchjob: Kubeflow Training Operator's PyTorchJob, for clusters that run the operator."""

from __future__ import annotations

from typing import Any

from engine.config import Config, K8sConfig
from k8s.pod import container_env, container_spec, mounts, pod_resources, pod_spec, template, volumes
from k8s.settings import JOIN_SECONDS, OUTPUT_DIR
from k8s.workloads.batch import job_metadata
from k8s.workloads.torchrun import checked_launch


def attempts_env(k: K8sConfig) -> list[dict]:
    """Each pod's starts, counted by its first step (`engine.run check`) in a file of its own on the output claim
    (engine.launch.count_attempt): with restartPolicy ExitCode the operator deletes a failed pod and recreates it
    under the same name, so runPolicy.backoffLimit never counts (operator v1.9.4; kubeflow/trainer#2045); after
    backoff_limit + 1 starts the check exits 3, which ExitCode does not retry."""
    return [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "CT3D_ATTEMPTS_FILE", "value": f"{OUTPUT_DIR}/{k.name}/.attempts/$(POD_NAME)"},
            {"name": "CT3D_MAX_ATTEMPTS", "value": str(k.backoff_limit + 1)}]


def pytorch_job(cfg: Config) -> dict:
    """Kubeflow Training Operator's PyTorchJob: Worker replicas under an elastic policy (c10d rendezvous the
    operator wires through PET_* variables, with the store-connection and join timeouts of the Job kind).
    restartPolicy ExitCode: 1-127 permanent, 128-255 retried; engine.launch ends a worker's user error with 2
    (the check's too: it runs first, in the same container), a pod's last allowed start with 3 (attempts_env),
    SIGTERM with 143, a node fault with 151 and any other failure (a store it could not reach, restarts used up)
    with 150, so a drained node is retried, a config error is not, and retries end. cleanPodPolicy Running: once
    the job has failed no surviving pod holds its GPUs (Kueue has released their quota).
    Kueue admits it by the queue label alone (runPolicy.schedulingPolicy.queue is the gang scheduler's field)."""
    k = cfg.k8s
    resources, shm = pod_resources(k)
    # The check runs first in the same container: the operator reads only this container's exit code, and
    # treats a failed init container as retryable (it would recreate the pod forever).
    command = checked_launch(k, k.max_restarts)
    env = [*container_env(k, False, trains=True), *attempts_env(k)]
    container = container_spec(k, "pytorch", command, env, mounts(k), resources)
    pod = pod_spec(k, [container], volumes(cfg, shm), restart="Never")  # what the operator sets for ExitCode
    run_policy: dict[str, Any] = {"cleanPodPolicy": "Running", "backoffLimit": k.backoff_limit,
                                  "ttlSecondsAfterFinished": k.ttl_seconds_after_finished}
    if k.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = k.active_deadline_seconds
    timeouts = [{"key": key, "value": str(JOIN_SECONDS)} for key in ("join_timeout", "read_timeout")]
    spec = {
        "runPolicy": run_policy,
        "nprocPerNode": str(max(1, k.gpus)),
        "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": k.nodes, "maxReplicas": k.nodes,
                          "maxRestarts": k.max_restarts, "rdzvConf": timeouts},
        "pytorchReplicaSpecs": {"Worker": {"replicas": k.nodes, "restartPolicy": "ExitCode",
                                           "template": template(k, "training", pod)}},
    }
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": job_metadata(k, k.name, "training"), "spec": spec}


def objects(cfg: Config) -> list[dict]:
    return [pytorch_job(cfg)]
