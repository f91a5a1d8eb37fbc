"""k8s.kind=pytorchjob: Kubeflow Training Operator's PyTorchJob, for clusters that run the operator."""

from __future__ import annotations

from typing import Any

from engine.config import Config
from k8s.pod import container_env, container_spec, mounts, pod_resources, pod_spec, template, volumes
from k8s.settings import JOIN_SECONDS
from k8s.workloads.batch import job_metadata
from k8s.workloads.torchrun import checked_launch


def pytorch_job(cfg: Config) -> dict:
    """Kubeflow Training Operator's PyTorchJob: Worker replicas under an elastic policy (c10d rendezvous the
    operator wires through PET_* variables, with the store-connection and join timeouts of the Job kind).
    restartPolicy ExitCode: 1-127 permanent, 128-255 retried; engine.launch ends a worker's user error with 2
    (the check's too: it runs first, in the same container), SIGTERM with 143 and any other failure (a store it
    could not reach, restarts used up) with 150, so a drained node is retried and a config error is not.
    Kueue admits it by the queue label alone (runPolicy.schedulingPolicy.queue is the gang scheduler's field)."""
    k = cfg.k8s
    resources, shm = pod_resources(k)
    # The check runs first in the same container: the operator reads only this container's exit code, and
    # treats a failed init container as retryable (it would recreate the pod forever).
    command = checked_launch(k, k.max_restarts)
    container = container_spec(k, "pytorch", command, container_env(k, False), mounts(k), resources)
    pod = pod_spec(k, [container], volumes(cfg, shm), restart="OnFailure")
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": k.backoff_limit,
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
