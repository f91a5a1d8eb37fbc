"""k8s.sweep_workers=N: in place of the training workload, an Indexed Job of N `sweep` workers on one study
in the output claim."""

from __future__ import annotations

from engine.config import Config, check_space
from k8s.pod import check_container, container_env, container_spec, mounts, pod_resources, pod_spec, volumes
from k8s.settings import CONFIG
from k8s.workloads.batch import batch_job, indexed_head


def sweep_job(cfg: Config) -> dict:
    """k8s.sweep_workers pods, each one `sweep` worker (an Indexed Job: JOB_COMPLETION_INDEX seeds its
    sampler) on the study in the output claim; a pod that is replaced picks the study up again."""
    k = cfg.k8s
    resources, shm = pod_resources(k)
    command = ["python", "-m", "engine.run", "sweep", "--config", CONFIG, "sweep.workers=1"]
    container = container_spec(k, "sweep", command, container_env(k, True, trains=True), mounts(k), resources)
    pod = pod_spec(k, [container], volumes(cfg, shm), init=[check_container(k)])
    head = indexed_head(k, k.sweep_workers, max_failed=k.sweep_workers - 1)  # the study goes on without a lost worker
    return batch_job(k, f"{k.name}-sweep", "sweep", head, pod, ("check", "sweep"))


def objects(cfg: Config) -> list[dict]:
    check_space(cfg)  # an empty or bad search space fails here, not in every pod
    return [sweep_job(cfg)]
