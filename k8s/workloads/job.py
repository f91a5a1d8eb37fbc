"""k8s.kind=job: the training as a batch/v1 Job. One node runs python (or torchrun --standalone for several
GPUs); several nodes are an Indexed Job plus a headless Service, each pod running torchrun with a c10d
rendezvous hosted by pod 0."""

from __future__ import annotations

from engine.config import Config, K8sConfig
from k8s.meta import metadata
from k8s.pod import check_container, container_env, container_spec, mounts, pod_resources, pod_spec, volumes
from k8s.workloads.batch import batch_job, indexed_head
from k8s.workloads.torchrun import train_command


def training_job(cfg: Config) -> dict:
    k = cfg.k8s
    resources, shm = pod_resources(k)
    indexed = k.nodes > 1
    # several nodes: c10d rendezvous at pod 0, so a replaced pod rejoins and the group restarts from the checkpoint
    command = train_command(k, f"{k.name}-0.{k.name}.{k.namespace}.svc", k.max_restarts)
    train = container_spec(k, "train", command, container_env(k, indexed, trains=True), mounts(k), resources)
    if indexed:
        train["ports"] = [{"name": "rendezvous", "containerPort": k.master_port}]
    pod = pod_spec(k, [train], volumes(cfg, shm), init=[check_container(k)])
    if indexed:
        pod["subdomain"] = k.name  # pods resolve as <job>-<index>.<service>
    # several nodes: a replaced pod rejoins the rendezvous; any index failing for good ends the Job
    head = indexed_head(k, k.nodes) if indexed else {"backoffLimit": k.backoff_limit}
    return batch_job(k, k.name, "training", head, pod, ("check", "train"))


def service(k: K8sConfig) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(k, k.name, "rendezvous"),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {"app.kubernetes.io/instance": k.name, "app.kubernetes.io/component": "training"},
                     "ports": [{"name": "rendezvous", "port": k.master_port, "targetPort": k.master_port}]}}


def objects(cfg: Config) -> list[dict]:
    """A headless Service (several nodes: pods resolve as <job>-<index>.<service>) and the Job."""
    return ([service(cfg.k8s)] if cfg.k8s.nodes > 1 else []) + [training_job(cfg)]
