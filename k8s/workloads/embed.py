"""The embed Job: an Indexed Job whose pods run the frozen pretrained encoder (model.freeze, merlin / ctfm) once
per volume, each pod on its shard, and write the embeddings to the cache claim, so the head trains on them from
its first epoch. GPU work (Merlin: ~1.25 TFLOP a volume): the training pods' placement, one GPU each."""

from __future__ import annotations

from engine.config import Config
from k8s.pod import container_env, container_spec, mounts, pod_resources, pod_spec, volumes
from k8s.settings import CONFIG
from k8s.workloads.batch import batch_job, indexed_head


def embed_command(pods: int) -> list[str]:
    """`engine.run embed` on shard I of `pods`, I the pod's index: the kubelet expands $(JOB_COMPLETION_INDEX) from
    the container's env, so no shell runs between it and python."""
    return ["python", "-m", "engine.run", "embed", "--shard", f"$(JOB_COMPLETION_INDEX)/{pods}", "--config", CONFIG]


def embed_job(cfg: Config) -> dict:
    """k8s.embed_pods pods of one GPU each (none where the training has none), with the cache fill's claims (the
    data read-only, the cache claim for the embeddings; no output claim) and /dev/shm for the loader's workers."""
    k = cfg.k8s
    gpus = min(k.gpus, 1)
    resources, shm = pod_resources(k, gpus=gpus)
    container = container_spec(k, "embed", embed_command(k.embed_pods), container_env(k, True, trains=True, gpus=gpus),
                               mounts(k, output=False), resources)
    pod = pod_spec(k, [container], volumes(cfg, shm, output=False))  # GPU pods: the training's placement and queue
    # no deadline, as the cache fill's: k8s.active_deadline_seconds bounds the training
    return batch_job(k, f"{k.name}-embed", "embed", indexed_head(k, k.embed_pods), pod, ("embed",), deadline=False)
