"""The cache-fill Job: an Indexed Job whose pods fill disjoint shares of the disk cache, so training starts on
a warm cache."""

from __future__ import annotations

from engine.config import Config
from k8s.pod import container_env, container_spec, mounts, pod_spec, volumes
from k8s.settings import CONFIG
from k8s.workloads.batch import batch_job, indexed_head


def cache_job(cfg: Config) -> dict:
    """k8s.cache_pods pods, each filling its share of the disk cache (`engine.run cache`: the share from
    JOB_COMPLETION_INDEX / JOB_COMPLETIONS), before the training starts on a warm cache. CPU pods: none of the
    GPU pods' tolerations, priority or queue (k8s.cache_node_selector, cache_tolerations, cache_queue instead)."""
    k = cfg.k8s
    workers = max(1, cfg.cache.workers)
    amounts = {"cpu": str(workers), "memory": f"{4 * workers}Gi"}
    env = [*container_env(k, True), {"name": "JOB_COMPLETIONS", "value": str(k.cache_pods)}]
    container = container_spec(k, "cache", ["python", "-m", "engine.run", "cache", "--config", CONFIG], env,
                           mounts(k, output=False, shm=False), {"requests": amounts, "limits": dict(amounts)})
    pod = pod_spec(k, [container], volumes(cfg, None, output=False), gpu_pod=False)  # CPU work: its own placement
    # no deadline: k8s.active_deadline_seconds bounds the training, and a fill of 50k volumes takes its time
    return batch_job(k, f"{k.name}-cache", "cache-fill", indexed_head(k, k.cache_pods), pod, ("cache",),
                     deadline=False, queue=k.cache_queue)
