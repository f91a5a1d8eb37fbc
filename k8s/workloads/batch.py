"""What the batch/v1 workloads share: Job metadata with the Kueue queue label, the Indexed head (a failed pod
replaced at its index), the failure policy (node disruptions ignored, a user error's exit 2 or engine.launch's
spent attempts, exit 3, fail the Job at once; 143, 150 and 151 count against the pod's retries) and the Job
around a pod template."""

from __future__ import annotations

from typing import Any

from engine.config import K8sConfig
from engine.utils import EXIT_RETRIES_SPENT, EXIT_USER_ERROR
from k8s.meta import metadata
from k8s.pod import template

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PERMANENT = [EXIT_USER_ERROR, EXIT_RETRIES_SPENT]  # the same on every attempt: never retried, by any kind


def job_metadata(k: K8sConfig, name: str, component: str, queue: str | None = None) -> dict:
    """The workload's metadata; Kueue's queue label (k8s.queue unless `queue` is given) on the object Kueue admits."""
    meta = metadata(k, name, component, dict(k.annotations) or None)
    queue = k.queue if queue is None else queue
    if queue:
        meta["labels"][QUEUE_LABEL] = queue
    return meta


def indexed_head(k: K8sConfig, pods: int, max_failed: int = 0) -> dict:
    """An Indexed Job's spec head: a failed pod is replaced at its index (k.backoff_limit times per index)."""
    return {"completionMode": "Indexed", "completions": pods, "parallelism": pods,
            "backoffLimitPerIndex": k.backoff_limit, "maxFailedIndexes": max_failed}


def batch_job(k: K8sConfig, name: str, component: str, head: dict, pod: dict, checked: tuple[str, ...],
              deadline: bool = True, queue: str | None = None) -> dict:
    """A batch/v1 Job: `head` (completions or backoff), the TTL, the deadline (unless `deadline` is off),
    the failure policy naming the `checked` containers, and the pod template."""
    spec: dict[str, Any] = {**head, "ttlSecondsAfterFinished": k.ttl_seconds_after_finished}
    if deadline and k.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = k.active_deadline_seconds
    spec["podFailurePolicy"] = failure_policy(*checked)
    spec["template"] = template(k, component, pod)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_metadata(k, name, component, queue),
            "spec": spec}


def failure_policy(*containers: str, ignore_disruptions: bool = True) -> dict:
    """Node disruptions (preemption, drain) do not count (unless `ignore_disruptions` is off); a permanent exit
    (2: config or data; 3: attempts used up) in any of `containers` fails the Job at once instead of being
    retried; any other exit (143, 150, 151, a crash) counts against the Job's backoff limit."""
    disruption = {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    rules: list[dict] = [disruption] if ignore_disruptions else []
    rules += [{"action": "FailJob", "onExitCodes": {"containerName": c, "operator": "In", "values": list(PERMANENT)}}
              for c in containers]
    return {"rules": rules}
