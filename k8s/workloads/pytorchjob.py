"""k8s.kind=pytorchjob: Kubeflow Training Operator's PyTorchJob, for clusters that run the operator."""

from __future__ import annotations

from typing import Any

from engine.config.schema import Config
from k8s.pod import container_env, container_spec, mounts, pod_resources, pod_spec, template, volumes
from k8s.settings import CONFIG
from k8s.workloads.batch import job_metadata


def pytorch_job(cfg: Config) -> dict:
    """Kubeflow Training Operator's PyTorchJob: Worker replicas under an elastic policy (c10d rendezvous the
    operator wires through PET_* variables); exit codes 1-127 are permanent (ExitCode), so a user error
    (the check's exit 2) fails it at once, a killed pod (128+) is restarted."""
    k = cfg.k8s
    resources, shm = pod_resources(k)
    # The check runs first in the same container: the operator reads only this container's exit code, and
    # treats a failed init container as retryable (it would recreate the pod forever).
    command = ["sh", "-c", f"python -m engine.run check --quick --config {CONFIG} && "
                           f"exec torchrun -m engine.run train --config {CONFIG}"]
    container = container_spec(k, "pytorch", command, container_env(k, False), mounts(k), resources)
    pod = pod_spec(k, [container], volumes(cfg, shm), restart="OnFailure")
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": k.backoff_limit,
                                  "ttlSecondsAfterFinished": k.ttl_seconds_after_finished}
    if k.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = k.active_deadline_seconds
    if k.queue:
        run_policy["schedulingPolicy"] = {"queue": k.queue}
    spec = {
        "runPolicy": run_policy,
        "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": k.nodes, "maxReplicas": k.nodes,
                          "maxRestarts": k.max_restarts, "nProcPerNode": max(1, k.gpus)},
        "pytorchReplicaSpecs": {"Worker": {"replicas": k.nodes, "restartPolicy": "ExitCode",
                                           "template": template(k, "training", pod)}},
    }
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": job_metadata(k, k.name, "training"), "spec": spec}


def objects(cfg: Config) -> list[dict]:
    return [pytorch_job(cfg)]
