"""k8s.kind=jobset: the training as a JobSet (kubernetes-sigs/jobset; Kueue admits it as one workload). One
replicated Job of `nodes` Indexed pods, DNS hostnames on (JobSet makes the headless Service), and a failure
policy for the gang: any pod lost, preempted or failed recreates every pod together (RestartJobSet: a fresh
rendezvous, no index failing for good while pod 0 is away; `k8s.max_restarts` of them, preemptions included),
while a permanent exit (2: a user error from the check container or a worker, engine.launch; 3: attempts used
up) fails it at once. ct3d's ClusterTrainingRuntime (runtime.py) runs TrainJobs under the same policy."""

from __future__ import annotations

from typing import Any

from engine.config import Config, K8sConfig
from k8s.pod import check_container, container_env, container_spec, mounts, pod_resources, pod_spec, template, volumes
from k8s.workloads.batch import failure_policy, job_metadata
from k8s.workloads.torchrun import train_command

WORKERS = "workers"  # the replicated Job; pod hostnames <jobset>-workers-<job index>-<pod index>


def gang_failure_policy(k: K8sConfig) -> dict:
    """The JobSet's failurePolicy: a Job failed by its podFailurePolicy (a permanent exit) or by its deadline
    fails the JobSet; any other Job failure (backoffLimit 0: one failed or disrupted pod) restarts every pod,
    `k8s.max_restarts` times."""
    return {"maxRestarts": k.max_restarts, "restartStrategy": "Recreate",
            "rules": [{"name": "userError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
                      # a Job's activeDeadlineSeconds runs per attempt (a restart recreates the Job, and its
                      # clock): an attempt that overruns it ends the run instead of starting another
                      {"name": "deadline", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]}]}


def gang_job_policy(*containers: str) -> dict:
    """The replicated Job's podFailurePolicy: a permanent exit in `containers` fails the Job with reason
    PodFailurePolicy (which gang_failure_policy turns into FailJobSet); a disruption is not ignored: it fails the
    Job (backoffLimit 0, BackoffLimitExceeded) and the gang restarts."""
    return failure_policy(*containers, ignore_disruptions=False)


def job_set(cfg: Config) -> dict:
    k = cfg.k8s
    resources, shm = pod_resources(k)
    command = train_command(k, f"{k.name}-{WORKERS}-0-0.{k.name}", 0)  # torchrun restarts nothing: the JobSet does
    train = container_spec(k, "train", command, container_env(k, True, trains=True), mounts(k), resources)
    if k.nodes > 1:
        train["ports"] = [{"name": "rendezvous", "containerPort": k.master_port}]
    pod = pod_spec(k, [train], volumes(cfg, shm), init=[check_container(k)])
    job: dict[str, Any] = {"completionMode": "Indexed", "completions": k.nodes, "parallelism": k.nodes,
                           "backoffLimit": 0}  # a failed pod fails its Job, and the JobSet restarts the gang
    if k.active_deadline_seconds:
        job["activeDeadlineSeconds"] = k.active_deadline_seconds
    job["podFailurePolicy"] = gang_job_policy("check", "train")
    job["template"] = template(k, "training", pod)
    spec = {
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "successPolicy": {"operator": "All", "targetReplicatedJobs": [WORKERS]},
        "failurePolicy": gang_failure_policy(k),
        "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
        "replicatedJobs": [{"name": WORKERS, "replicas": 1,
                            "template": {"metadata": {"labels": template(k, "training", {})["metadata"]["labels"]},
                                         "spec": job}}],
    }
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": job_metadata(k, k.name, "training"), "spec": spec}


def objects(cfg: Config) -> list[dict]:
    return [job_set(cfg)]
