"""k8s.kind=jobset: the training as a JobSet (kubernetes-sigs/jobset; Kueue admits it as one workload). One
replicated Job of `nodes` Indexed pods, DNS hostnames on (JobSet makes the headless Service), and a failure
policy for the gang: any pod lost, preempted or failed recreates every pod together (RestartJobSet: a fresh
rendezvous, no index failing for good while pod 0 is away; `k8s.max_restarts` of them, preemptions included),
while a user error (exit 2 from the check container or a worker, engine.launch) fails it at once."""

from __future__ import annotations

from typing import Any

from engine.config import Config
from k8s.pod import check_container, container_env, container_spec, mounts, pod_resources, pod_spec, template, volumes
from k8s.workloads.batch import failure_policy, job_metadata
from k8s.workloads.torchrun import train_command

WORKERS = "workers"  # the replicated Job; pod hostnames <jobset>-workers-<job index>-<pod index>


def job_set(cfg: Config) -> dict:
    k = cfg.k8s
    resources, shm = pod_resources(k)
    command = train_command(k, f"{k.name}-{WORKERS}-0-0.{k.name}", 0)  # torchrun restarts nothing: the JobSet does
    train = container_spec(k, "train", command, container_env(k, True), mounts(k), resources)
    if k.nodes > 1:
        train["ports"] = [{"name": "rendezvous", "containerPort": k.master_port}]
    pod = pod_spec(k, [train], volumes(cfg, shm), init=[check_container(k)])
    job: dict[str, Any] = {"completionMode": "Indexed", "completions": k.nodes, "parallelism": k.nodes,
                           "backoffLimit": 0}  # a failed pod fails its Job, and the JobSet restarts the gang
    if k.active_deadline_seconds:
        job["activeDeadlineSeconds"] = k.active_deadline_seconds
    # exit 2 fails the Job with reason PodFailurePolicy, which the JobSet's first rule turns into FailJobSet;
    # a disruption is not ignored here: it fails the Job (BackoffLimitExceeded) and the gang restarts
    job["podFailurePolicy"] = {"rules": failure_policy("check", "train")["rules"][1:]}
    job["template"] = template(k, "training", pod)
    spec = {
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "successPolicy": {"operator": "All", "targetReplicatedJobs": [WORKERS]},
        "failurePolicy": {"maxRestarts": k.max_restarts, "restartStrategy": "Recreate",
                          "rules": [{"name": "userError", "action": "FailJobSet",
                                     "onJobFailureReasons": ["PodFailurePolicy"]},
                                    # k8s.active_deadline_seconds bounds the run, not each restart of it
                                    {"name": "deadline", "action": "FailJobSet",
                                     "onJobFailureReasons": ["DeadlineExceeded"]}]},
        "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
        "replicatedJobs": [{"name": WORKERS, "replicas": 1,
                            "template": {"metadata": {"labels": template(k, "training", {})["metadata"]["labels"]},
                                         "spec": job}}],
    }
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet",
            "metadata": job_metadata(k, k.name, "training"), "spec": spec}


def objects(cfg: Config) -> list[dict]:
    return [job_set(cfg)]
