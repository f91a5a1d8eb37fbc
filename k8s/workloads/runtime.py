"""ct3d's own ClusterTrainingRuntime for k8s.kind=trainjob (with k8s.trainjob_runtime empty): the stock
torch-distributed runtime has no failure policy (a user error was retried 6 times, a lost pod replaced alone
and unable to rejoin, k8s.max_restarts ignored) and a TrainJob's runtimePatches cannot add one. This runtime's
JobSet carries jobset.py's gang policy: a permanent exit (2, 3) fails the run, anything else restarts every pod,
k8s.max_restarts times. Cluster-scoped, so named by the run's namespace and name."""

from __future__ import annotations

from engine.config import K8sConfig
from k8s.meta import labels
from k8s.workloads.jobset import gang_failure_policy, gang_job_policy

NODE = "node"  # the torch runtimes' replicated Job and container, which the Trainer fills from the TrainJob
ANCESTOR = {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}  # how the Trainer finds that Job


def runtime_name(k: K8sConfig) -> str:
    """The runtime the TrainJob names: k8s.trainjob_runtime, or ct3d's own for this run (cluster-scoped: the
    namespace in its name keeps two namespaces' runs of one name apart; dots cannot occur in either part)."""
    return k.trainjob_runtime or f"ct3d.{k.namespace}.{k.name}"


def training_runtime(k: K8sConfig) -> dict:
    """The JobSet every TrainJob on it becomes: one `node` Job (its pod count, image, command, resources and env
    from the TrainJob; claims and placement from its runtime patch), backoffLimit 0 and pods that are not
    restarted in place (restartPolicy Never, which a podFailurePolicy needs), so any failed pod fails the Job
    and the JobSet's policy decides; the priority and runtime class that a runtime patch cannot set."""
    pod: dict = {"restartPolicy": "Never"}
    if k.priority_class:
        pod["priorityClassName"] = k.priority_class
    if k.runtime_class:
        pod["runtimeClassName"] = k.runtime_class
    pod["containers"] = [{"name": NODE, "image": k.image}]
    job = {"backoffLimit": 0, "podFailurePolicy": gang_job_policy(NODE), "template": {"spec": pod}}
    jobset = {"failurePolicy": gang_failure_policy(k),
              "replicatedJobs": [{"name": NODE, "template": {"metadata": {"labels": dict(ANCESTOR)}, "spec": job}}]}
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "ClusterTrainingRuntime",
            "metadata": {"name": runtime_name(k), "labels": labels(k, "training-runtime")},
            "spec": {"mlPolicy": {"numNodes": k.nodes, "torch": {}}, "template": {"spec": jobset}}}
