"""k8s.kind=trainjob: Kubeflow Trainer v2's TrainJob on a ClusterTrainingRuntime: ct3d's own (runtime.py: gang
restarts, a permanent exit fails the run) unless k8s.trainjob_runtime names another, which runs it as a JobSet.
Our image and command (the check, then torchrun through engine.launch; the runtime's PET_* variables give
torchrun the nodes, rank and master), numNodes, resourcesPerNode and the env; the claims, /dev/shm, security
context and placement as a runtime patch of the runtime's `node` pods. On another runtime its failure policy
(a cluster admin's) is what applies: engine.launch's exit codes are what a podFailurePolicy there can tell
apart."""

from __future__ import annotations

import sys
from typing import Any

from engine.config import Config
from k8s.meta import labels
from k8s.pod import container_env, container_security, mounts, pod_resources, pod_spec, volumes
from k8s.settings import JOIN_SECONDS
from k8s.workloads.batch import job_metadata
from k8s.workloads.runtime import NODE, runtime_name, training_runtime
from k8s.workloads.torchrun import checked_launch


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
        "runtimeRef": {"name": runtime_name(k), "kind": "ClusterTrainingRuntime", "apiGroup": "trainer.kubeflow.org"},
        # the check, then torchrun: nodes, rank and master from the runtime's PET_* variables (a static rendezvous
        # waiting as long as a c10d join would); restarts by the JobSet, not torchrun
        "trainer": {"image": k.image, "command": checked_launch(k, 0, f"--rdzv-conf=timeout={JOIN_SECONDS}"),
                    "numNodes": k.nodes, "numProcPerNode": max(1, k.gpus), "resourcesPerNode": resources,
                    "env": container_env(k, False, trains=True)},
        "runtimePatches": [{"manager": "ct3d", "trainingRuntimeSpec": runtime_spec}],
    }
    if k.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = k.active_deadline_seconds
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": job_metadata(k, k.name, "training"), "spec": spec}


def objects(cfg: Config) -> list[dict]:
    """ct3d's runtime (applied first: the Trainer refuses a TrainJob whose runtime does not exist) and the TrainJob;
    on another runtime the TrainJob alone, with a warning."""
    k = cfg.k8s
    if k.trainjob_runtime:
        print(f"ct3d: warning: k8s.trainjob_runtime={k.trainjob_runtime}: that runtime's failure policy applies, "
              f"not ct3d's: k8s.max_restarts (gang restarts) and the fail-fast on a user error (exit 2) do not; "
              f"leave k8s.trainjob_runtime empty for ct3d's own runtime", file=sys.stderr)
        return [train_job(cfg)]
    return [training_runtime(k), train_job(cfg)]
