"""k8s.kind=trainjob: Kubeflow Trainer v2's TrainJob on a ClusterTrainingRuntime (k8s.trainjob_runtime,
torch-distributed by default), which runs it as a JobSet. Our image and command (the check, then torchrun
through engine.launch; the runtime's PET_* variables give torchrun the nodes, rank and master), numNodes,
resourcesPerNode and the env; the claims, /dev/shm, security context and placement as a runtime patch of the
runtime's `node` pods. The failure policy is the runtime's (a cluster admin's): engine.launch's exit codes
(2 user error, 143 SIGTERM, 150 retryable) are what a podFailurePolicy there can tell apart."""

from __future__ import annotations

from typing import Any

from engine.config import Config
from k8s.meta import labels
from k8s.pod import container_env, container_security, mounts, pod_resources, pod_spec, volumes
from k8s.settings import JOIN_SECONDS
from k8s.workloads.batch import job_metadata
from k8s.workloads.torchrun import checked_launch

NODE = "node"  # the torch runtimes' replicated Job and container


def train_job(cfg: Config) -> dict:
    k = cfg.k8s
    resources, shm = pod_resources(k)
    pod = pod_spec(k, [], volumes(cfg, shm))
    patch: dict[str, Any] = {key: pod[key] for key in ("serviceAccountName", "imagePullSecrets", "securityContext",
                                                          "nodeSelector", "affinity", "tolerations",
                                                          "terminationGracePeriodSeconds", "volumes") if key in pod}
    patch["containers"] = [{"name": NODE, "volumeMounts": mounts(k), "securityContext": container_security()}]
    pod_template = {"metadata": {"labels": labels(k, "training")}, "spec": patch}  # the runtime's pods: ours too
    runtime_spec = {"template": {"spec": {"replicatedJobs": [
        {"name": NODE, "template": {"spec": {"template": pod_template}}}]}}}
    spec: dict[str, Any] = {
        "runtimeRef": {"name": k.trainjob_runtime, "kind": "ClusterTrainingRuntime",
                       "apiGroup": "trainer.kubeflow.org"},
        # the check, then torchrun: nodes, rank and master from the runtime's PET_* variables (a static rendezvous
        # waiting as long as a c10d join would); restarts by the JobSet, not torchrun
        "trainer": {"image": k.image, "command": checked_launch(k, 0, f"--rdzv-conf=timeout={JOIN_SECONDS}"),
                    "numNodes": k.nodes,
                    "numProcPerNode": max(1, k.gpus), "resourcesPerNode": resources, "env": container_env(k, False)},
        "runtimePatches": [{"manager": "ct3d", "trainingRuntimeSpec": runtime_spec}],
    }
    if k.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = k.active_deadline_seconds
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": job_metadata(k, k.name, "training"), "spec": spec}


def objects(cfg: Config) -> list[dict]:
    return [train_job(cfg)]
