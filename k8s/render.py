"""Kubernetes objects for one training run, from the `k8s` section of a ct3d config.

Plain dicts rendered to YAML: the objects are small and fixed, so a template engine would add a
dependency without removing code; the Helm chart in charts/ct3d renders the same objects."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from engine import __version__
from engine.config import plain, to_yaml
from engine.errors import CT3DError
from engine.schema import Config, K8sConfig, VolumeClaimConfig

CONFIG_DIR, CACHE_DIR, OUTPUT_DIR, DATA_DIR = "/etc/ct3d", "/cache", "/output", "/data"


def _check(k: K8sConfig) -> None:
    """What the schema's per-field limits cannot say (engine/config.py checks the rest at load)."""
    if len(k.name) > 52:  # Job pods are named <job>-<index>-<random>: keep them within 63
        raise CT3DError(f"config error: k8s.name: {k.name!r} is longer than 52 characters")
    if k.sweep_workers and (k.nodes > 1 or k.gpus > 1):
        raise CT3DError("config error: k8s.sweep_workers: each sweep worker trains its trials in one process on "
                        "at most one GPU; set k8s.nodes=1 and k8s.gpus=1 (or 0), and more workers instead")
    if k.sweep_workers and len(k.name) > 46:
        raise CT3DError(f"config error: k8s.name: {k.name!r} is longer than 46 characters (the sweep Job adds -sweep)")


def labels(k: K8sConfig, component: str = "training") -> dict:
    return {
        "app.kubernetes.io/name": "ct3d",
        "app.kubernetes.io/instance": k.name,
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "ct3d-render",
    }


def claim_name(k: K8sConfig, role: str) -> str:
    return _volume(k, role).name or f"{k.name}-{role}"


def _volume(k: K8sConfig, role: str) -> VolumeClaimConfig:
    return k.cache if role == "cache" else k.output


def training_config(cfg: Config) -> str:
    """The run's config as the pods see it: caches and outputs on the claims, a fixed run folder and
    resume=auto, so a restarted pod continues from the last checkpoint."""
    pod = OmegaConf.create(plain(cfg))
    pod.cache.dir = CACHE_DIR
    pod.output.dir = OUTPUT_DIR
    pod.output.name = cfg.k8s.name
    pod.train.resume = "auto"
    if pod.data.demo.enabled:
        pod.data.demo.dir = f"{CACHE_DIR}/demo"
    del pod["k8s"]
    return to_yaml(pod)


def _claim(k: K8sConfig, role: str) -> dict:
    c = _volume(k, role)
    spec: dict[str, Any] = {"accessModes": [str(c.access_mode)], "resources": {"requests": {"storage": c.size}}}
    if k.storage_class:
        spec["storageClassName"] = k.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim_name(k, role), "namespace": k.namespace, "labels": labels(k, role)},
            "spec": spec}


def command(k: K8sConfig) -> list[str]:
    """The container command: plain python for one process, torchrun for several GPUs or nodes."""
    train = ["-m", "engine.run", "train", "--config", f"{CONFIG_DIR}/config.yaml"]
    if k.nodes == 1 and k.gpus <= 1:
        return ["python", *train]
    per_node = str(max(1, k.gpus))
    if k.nodes == 1:
        return ["torchrun", "--standalone", "--nnodes=1", f"--nproc-per-node={per_node}", *train]
    master = f"{k.name}-0.{k.name}.{k.namespace}.svc"
    return ["torchrun", f"--nnodes={k.nodes}", f"--nproc-per-node={per_node}",
            "--node-rank=$(JOB_COMPLETION_INDEX)", f"--master-addr={master}", f"--master-port={k.master_port}",
            *train]


def container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _job(k: K8sConfig) -> dict:
    resources: dict[str, Any] = {"requests": {"cpu": str(k.cpu), "memory": k.memory},
                                 "limits": {"cpu": str(k.cpu), "memory": k.memory}}
    if k.gpus > 0:
        resources["requests"]["nvidia.com/gpu"] = k.gpus
        resources["limits"]["nvidia.com/gpu"] = k.gpus
    env = [
        {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": k.wandb_secret, "key": "api-key",
                                                                  "optional": True}}},
        {"name": "WANDB_DIR", "value": OUTPUT_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if k.nodes > 1:
        env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}})
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "cache", "mountPath": CACHE_DIR}, {"name": "output", "mountPath": OUTPUT_DIR},
              {"name": "shm", "mountPath": "/dev/shm"}]
    volumes = [{"name": "config", "configMap": {"name": f"{k.name}-config"}},
               {"name": "cache", "persistentVolumeClaim": {"claimName": claim_name(k, "cache")}},
               {"name": "output", "persistentVolumeClaim": {"claimName": claim_name(k, "output")}},
               {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": k.shm_size}}]
    if k.data_claim:
        mounts.append({"name": "data", "mountPath": DATA_DIR, "readOnly": True})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": k.data_claim, "readOnly": True}})
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "runAsUser": k.run_as_user, "runAsGroup": k.run_as_user,
                            "fsGroup": k.run_as_user, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "train", "image": k.image, "imagePullPolicy": str(k.image_pull_policy),
            "command": command(k), "env": env, "resources": resources, "volumeMounts": mounts,
            "securityContext": container_security(),
            "ports": [{"name": "rendezvous", "containerPort": k.master_port}] if k.nodes > 1 else [],
        }],
        "volumes": volumes,
    }
    if not pod["containers"][0]["ports"]:
        del pod["containers"][0]["ports"]
    if k.node_selector:
        pod["nodeSelector"] = dict(k.node_selector)
    if k.tolerations:
        pod["tolerations"] = [dict(t) for t in k.tolerations]
    if k.nodes > 1:
        pod["subdomain"] = k.name  # pods resolve as <job>-<index>.<service>
    spec: dict[str, Any] = {
        "backoffLimit": k.backoff_limit,
        "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
        "podFailurePolicy": {"rules": [
            # preemption, drain: not the job's fault
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
            {"action": "FailJob", "onExitCodes": {"containerName": "train", "operator": "In", "values": [2]}},
        ]},
        "template": {"metadata": {"labels": labels(k)}, "spec": pod},
    }
    if k.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = k.active_deadline_seconds
    if k.nodes > 1:
        spec.update(completionMode="Indexed", completions=k.nodes, parallelism=k.nodes)
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": k.name, "namespace": k.namespace, "labels": labels(k)}, "spec": spec}


def _sweep_job(k: K8sConfig) -> dict:
    """k8s.sweep_workers pods, each one `sweep` worker (an Indexed Job: JOB_COMPLETION_INDEX seeds its
    sampler) on the study in the output claim; a pod that is replaced picks the study up again."""
    job = _job(k)
    job["metadata"].update(name=f"{k.name}-sweep", labels=labels(k, "sweep"))
    spec = job["spec"]
    spec.update(completionMode="Indexed", completions=k.sweep_workers, parallelism=k.sweep_workers)
    spec["template"]["metadata"]["labels"] = labels(k, "sweep")
    spec["podFailurePolicy"]["rules"][1]["onExitCodes"]["containerName"] = "sweep"
    container = spec["template"]["spec"]["containers"][0]
    container.update(name="sweep", command=["python", "-m", "engine.run", "sweep", "--config",
                                            f"{CONFIG_DIR}/config.yaml", "sweep.workers=1"])
    return job


def _service(k: K8sConfig) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": k.name, "namespace": k.namespace, "labels": labels(k, "rendezvous")},
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {"app.kubernetes.io/instance": k.name, "app.kubernetes.io/component": "training"},
                     "ports": [{"name": "rendezvous", "port": k.master_port, "targetPort": k.master_port}]}}


def render_objects(cfg: Config) -> list[dict]:
    """PVCs (unless existing), the ConfigMap, a headless Service for several nodes, and the Job (with
    k8s.sweep_workers, the sweep Job in its place)."""
    k = cfg.k8s
    _check(k)
    if k.sweep_workers:
        from engine.sweep import check_space

        check_space(cfg)  # an empty or bad search space fails here, not in every pod
    objects = [_claim(k, role) for role in ("cache", "output") if not _volume(k, role).existing]
    objects.append({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": f"{k.name}-config", "namespace": k.namespace, "labels": labels(k, "config")},
                    "data": {"config.yaml": training_config(cfg)}})
    if k.sweep_workers:
        return [*objects, _sweep_job(k)]
    if k.nodes > 1:
        objects.append(_service(k))
    objects.append(_job(k))
    return objects


def render(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump_all(render_objects(cfg), sort_keys=False)


def helm_values(cfg: Config) -> str:
    """Values for charts/ct3d that describe the same run as `render(cfg)`."""
    import yaml

    k = cfg.k8s
    _check(k)

    def claim(role: str) -> dict:
        c = _volume(k, role)
        return {"name": claim_name(k, role), "existing": c.existing, "size": c.size, "accessMode": str(c.access_mode)}

    values = {
        "name": k.name, "image": k.image, "imagePullPolicy": str(k.image_pull_policy), "nodes": k.nodes, "gpus": k.gpus,
        "cpu": str(k.cpu), "memory": k.memory, "shmSize": k.shm_size, "nodeSelector": dict(k.node_selector),
        "tolerations": [dict(t) for t in k.tolerations], "storageClass": k.storage_class,
        "cache": claim("cache"), "output": claim("output"), "dataClaim": k.data_claim,
        "wandbSecret": k.wandb_secret, "backoffLimit": k.backoff_limit,
        "activeDeadlineSeconds": k.active_deadline_seconds, "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
        "runAsUser": k.run_as_user, "masterPort": k.master_port, "sweepWorkers": k.sweep_workers,
        "trainingConfig": training_config(cfg),
    }
    return yaml.safe_dump(values, sort_keys=False)
