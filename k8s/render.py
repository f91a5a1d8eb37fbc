"""Kubernetes objects for one training run, from the `k8s` section of a ct3d config.

Plain dicts rendered to YAML: the objects are small and fixed, so a template engine would add a
dependency without removing code; the Helm chart in charts/ct3d renders the same objects (a
property-based test compares them whole)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from typing import Any

import yaml
from omegaconf import OmegaConf

from engine import __version__
from engine.config import SECRET_KEYS, load_config, plain, to_yaml
from engine.errors import CT3DError
from engine.schema import Config, K8sConfig, VolumeClaimConfig

CONFIG_DIR, CACHE_DIR, OUTPUT_DIR, DATA_DIR = "/etc/ct3d", "/cache", "/output", "/data"
CONFIG = f"{CONFIG_DIR}/config.yaml"
KEEP = {"helm.sh/resource-policy": "keep"}  # `helm uninstall` leaves the claim (and its data) alone
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE: torchrun's c10d handler otherwise keeps round 0's worker store address,
# so a survivor of a lost pod never publishes a new one and its replacement waits forever (torch 2.13: tested).
FIXED_ENV = {"WANDB_DIR": OUTPUT_DIR, "PYTHONUNBUFFERED": "1", "CT3D_CACHE": CACHE_DIR, "CT3D_OUTPUT": OUTPUT_DIR,
             "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
JOIN_SECONDS = 1800  # c10d rendezvous join timeout: a lost node's replacement may take this long to start
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


# ------------------------------------------------------------------ config as the pods see it
def pod_environment(k: K8sConfig) -> dict[str, str]:
    """The environment every ct3d container has (besides the W&B key): what `${oc.env:...}` in a config
    resolves to inside a pod."""
    return {**FIXED_ENV, **dict(sorted(k.env.items()))}


@contextmanager
def _environment(values: dict[str, str]):
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def load_pod_config(path, overrides: list[str]) -> Config:
    """The config with every `${oc.env:...}` resolved as in a pod (the pod's environment, not this
    machine's), so no local path or value reaches the ConfigMap."""
    k = load_config(path, overrides).k8s
    with _environment({"PATH": os.environ.get("PATH", ""), **pod_environment(k)}):
        return load_config(path, overrides)


def training_config(cfg: Config) -> str:
    """The run's config as the pods see it: caches and outputs on the claims, a fixed run folder and
    resume=auto, so a restarted pod continues from the last checkpoint; cuda where the pods have GPUs, so
    a node without its driver fails loudly instead of training on the CPU."""
    pod = OmegaConf.create(plain(cfg))
    pod.cache.dir = CACHE_DIR
    pod.output.dir = OUTPUT_DIR
    pod.output.name = cfg.k8s.name
    pod.train.resume = "auto"
    if cfg.k8s.gpus > 0 and pod.train.device == "auto":
        pod.train.device = "cuda"
    if pod.data.demo.enabled:
        pod.data.demo.dir = f"{CACHE_DIR}/demo"
    del pod["k8s"]
    return to_yaml(pod)


# ------------------------------------------------------------------ checks
def _data_paths(cfg: Config) -> list[tuple[str, str]]:
    d = cfg.data
    return [(f"data.{key}", str(value)) for key, value in (("train", d.train), ("val", d.val),
                                                         ("image_root", d.image_root)) if value]


def _check(cfg: Config) -> None:
    """What the schema's per-field limits cannot say (engine/config.py checks the rest at load)."""
    k = cfg.k8s
    if len(k.name) > 46:  # pods are named <job>-cache-<index>-<random>: keep them within 63
        raise CT3DError(f"config error: k8s.name: {k.name!r} is longer than 46 characters")
    if k.sweep_workers and (k.nodes > 1 or k.gpus > 1):
        raise CT3DError("config error: k8s.sweep_workers: each sweep worker trains its trials in one process on "
                        "at most one GPU; set k8s.nodes=1 and k8s.gpus=1 (or 0), and more workers instead")
    for role in ("cache", "output"):
        access_mode(k, role)
    for key in k.env:
        if key in (*FIXED_ENV, "WANDB_API_KEY", "JOB_COMPLETION_INDEX", "JOB_COMPLETIONS"):
            raise CT3DError(f"config error: k8s.env.{key}: set by ct3d in every pod; leave it out")
        if any(s in key.lower() for s in (*SECRET_KEYS, "secret")):
            raise CT3DError(f"config error: k8s.env.{key}: looks like a secret; manifests are not the place for "
                            f"one: put it in a Kubernetes Secret")
    if not cfg.data.demo.enabled:
        outside = [(key, path) for key, path in _data_paths(cfg) if not re.match(r"^[a-z][a-z0-9+.-]*://", path)
                   and not (path == DATA_DIR or path.startswith(DATA_DIR + "/"))]
        if not k.data_claim:
            raise CT3DError("config error: k8s.data_claim: the pods read the data set from a claim mounted at "
                            f"{DATA_DIR}; name the claim that holds it (k8s.data_claim=NAME)")
        if outside:
            key, path = outside[0]
            raise CT3DError(f"config error: {key}: {path!r} is not under {DATA_DIR}, where the pods mount "
                            f"k8s.data_claim; give the path as the pods see it")


def access_mode(k: K8sConfig, role: str) -> str:
    """The claim's access mode: auto picks ReadWriteOnce when one node mounts it, ReadWriteMany when pods on
    several nodes do; a one-node mode where several nodes need it is an error."""
    shared = k.nodes > 1 or k.sweep_workers > 1 or (role == "cache" and k.cache_pods > 1)
    mode = str(_volume(k, role).access_mode)
    if mode == "auto":
        return "ReadWriteMany" if shared else "ReadWriteOnce"
    if shared and mode != "ReadWriteMany" and not _volume(k, role).existing:
        why = (f"{k.nodes} nodes" if k.nodes > 1 else f"{k.sweep_workers} sweep workers" if k.sweep_workers > 1
               else f"{k.cache_pods} cache pods")
        raise CT3DError(f"config error: k8s.{role}.access_mode: {mode} lets one node mount the claim, but {why} "
                        f"share it: use ReadWriteMany (a StorageClass that offers it: EFS, Filestore, FSx for "
                        f"Lustre, CephFS, NFS) or auto")
    return mode


# ------------------------------------------------------------------ names and metadata
def labels(k: K8sConfig, component: str = "training") -> dict:
    return {
        **dict(k.labels),
        "app.kubernetes.io/name": "ct3d",
        "app.kubernetes.io/instance": k.name,
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "ct3d-render",
    }


def data_key(cfg: Config) -> str:
    """Ten hex digits naming the data set and its preprocessing, and the claim's access mode and storage
    class (which a claim cannot change): runs that share all of them share a cache claim."""
    d = cfg.data
    data = {"train": d.train, "val": d.val, "image_root": d.image_root, "layout": str(d.layout),
            "demo": plain(d.demo) if d.demo.enabled else None, "metadata": d.metadata}
    storage = {"access_mode": access_mode(cfg.k8s, "cache"), "storage_class": cfg.k8s.storage_class}
    text = json.dumps({"data": data, "preprocess": plain(cfg.preprocess), "storage": storage}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def claim_name(cfg: Config, role: str) -> str:
    k = cfg.k8s
    if _volume(k, role).name:
        return _volume(k, role).name
    return f"ct3d-cache-{data_key(cfg)}" if role == "cache" else f"{k.name}-output"


def _volume(k: K8sConfig, role: str) -> VolumeClaimConfig:
    return k.cache if role == "cache" else k.output


def _metadata(k: K8sConfig, name: str, component: str, annotations: dict | None = None) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": k.namespace, "labels": labels(k, component)}
    if annotations:
        meta["annotations"] = annotations
    return meta


# ------------------------------------------------------------------ resources
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_bytes(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text).groups()
    return float(number) * _UNITS[unit]


def _mebibytes(n: float) -> str:
    mib = int(-(-n // 2**20))
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def pod_resources(k: K8sConfig) -> tuple[dict, str]:
    """(container resources, /dev/shm size): CPU and memory per GPU unless set; the memory-backed /dev/shm
    counts against the memory limit, so the default memory adds it."""
    per = max(1, k.gpus)
    shm = k.shm_size or f"{k.shm_per_gpu * per}Gi"
    memory = k.memory or _mebibytes(k.memory_per_gpu * per * 2**30 + quantity_bytes(shm))
    amounts: dict[str, Any] = {"cpu": k.cpu or str(k.cpu_per_gpu * per), "memory": memory}
    if k.gpus > 0:
        amounts["nvidia.com/gpu"] = k.gpus
    return {"requests": dict(amounts), "limits": dict(amounts)}, shm


# ------------------------------------------------------------------ pods
def container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _env(k: K8sConfig, indexed: bool) -> list[dict]:
    env = [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": k.wandb_secret, "key": "api-key",
                                                                     "optional": True}}}]
    env += [{"name": name, "value": value} for name, value in pod_environment(k).items()]
    if indexed:
        env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": INDEX_ANNOTATION}}})
    return env


def _container(k: K8sConfig, name: str, command: list[str], env: list[dict], mounts: list[dict],
               resources: dict | None = None) -> dict:
    c: dict[str, Any] = {"name": name, "image": k.image, "imagePullPolicy": str(k.image_pull_policy),
                         "command": command, "env": env}
    if resources:
        c["resources"] = resources
    c.update(volumeMounts=mounts, securityContext=container_security())
    return c


def _mounts(k: K8sConfig, output: bool = True, shm: bool = True) -> list[dict]:
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, {"name": "cache", "mountPath": CACHE_DIR}]
    if output:
        mounts.append({"name": "output", "mountPath": OUTPUT_DIR})
    if shm:
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    if k.data_claim:
        mounts.append({"name": "data", "mountPath": DATA_DIR, "readOnly": True})
    return mounts


def _volumes(cfg: Config, shm_size: str | None, output: bool = True) -> list[dict]:
    k = cfg.k8s
    volumes = [{"name": "config", "configMap": {"name": f"{k.name}-config"}},
               {"name": "cache", "persistentVolumeClaim": {"claimName": claim_name(cfg, "cache")}}]
    if output:
        volumes.append({"name": "output", "persistentVolumeClaim": {"claimName": claim_name(cfg, "output")}})
    if shm_size:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}})
    if k.data_claim:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": k.data_claim, "readOnly": True}})
    return volumes


def _pod(k: K8sConfig, containers: list[dict], volumes: list[dict], init: list[dict] | None = None,
         restart: str = "Never") -> dict:
    pod: dict[str, Any] = {"restartPolicy": restart, "terminationGracePeriodSeconds": k.termination_grace_seconds}
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    if k.priority_class:
        pod["priorityClassName"] = k.priority_class
    if k.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in k.image_pull_secrets]
    pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": k.run_as_user, "runAsGroup": k.run_as_user,
                              "fsGroup": k.run_as_user, "fsGroupChangePolicy": "OnRootMismatch",
                              "seccompProfile": {"type": "RuntimeDefault"}}
    if k.node_selector:
        pod["nodeSelector"] = dict(k.node_selector)
    if k.affinity:
        pod["affinity"] = plain_dict(k.affinity)
    if k.tolerations:
        pod["tolerations"] = [plain_dict(t) for t in k.tolerations]
    if init:
        pod["initContainers"] = init
    pod["containers"] = containers
    pod["volumes"] = volumes
    return pod


def plain_dict(node: Any) -> Any:
    """A deep copy of plain data (dicts, lists, scalars), so no two objects share a node."""
    return json.loads(json.dumps(node))


def _template(k: K8sConfig, component: str, pod: dict) -> dict:
    meta: dict[str, Any] = {"labels": labels(k, component)}
    if k.annotations:
        meta["annotations"] = dict(k.annotations)
    return {"metadata": meta, "spec": pod}


def _job_metadata(k: K8sConfig, name: str, component: str) -> dict:
    meta = _metadata(k, name, component, dict(k.annotations) or None)
    if k.queue:
        meta["labels"][QUEUE_LABEL] = k.queue
    return meta


def _indexed(k: K8sConfig, pods: int, max_failed: int = 0) -> dict:
    """An Indexed Job's spec head: a failed pod is replaced at its index (k.backoff_limit times per index)."""
    return {"completionMode": "Indexed", "completions": pods, "parallelism": pods,
            "backoffLimitPerIndex": k.backoff_limit, "maxFailedIndexes": max_failed}


def _batch_job(k: K8sConfig, name: str, component: str, head: dict, pod: dict, checked: tuple[str, ...],
               deadline: bool = True) -> dict:
    """A batch/v1 Job: `head` (completions or backoff), the TTL, the deadline (unless `deadline` is off),
    the failure policy naming the `checked` containers, and the pod template."""
    spec: dict[str, Any] = {**head, "ttlSecondsAfterFinished": k.ttl_seconds_after_finished}
    if deadline and k.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = k.active_deadline_seconds
    spec["podFailurePolicy"] = _failure_policy(*checked)
    spec["template"] = _template(k, component, pod)
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": _job_metadata(k, name, component), "spec": spec}


def _failure_policy(*containers: str) -> dict:
    """Node disruptions (preemption, drain) do not count; a user error (exit 2: config or data) in any of
    `containers` fails the Job at once instead of being retried."""
    rules: list[dict] = [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    rules += [{"action": "FailJob", "onExitCodes": {"containerName": c, "operator": "In", "values": [2]}}
              for c in containers]
    return {"rules": rules}


def check_container(k: K8sConfig) -> dict:
    """Validates the config and the datalists (every volume listed, readable labels, files present) before
    any GPU work: exit 2 on a user error, which the Job's FailJob rule names."""
    return _container(k, "check", ["python", "-m", "engine.run", "check", "--quick", "--config", CONFIG],
                      _env(k, False), _mounts(k, output=False, shm=False),
                      {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}})


# ------------------------------------------------------------------ workloads
def train_command(k: K8sConfig) -> list[str]:
    """Plain python for one process; torchrun for several GPUs or nodes (c10d rendezvous at pod 0 for
    several nodes, so a replaced pod rejoins and the group restarts from the last checkpoint)."""
    train = ["-m", "engine.run", "train", "--config", CONFIG]
    if k.nodes == 1 and k.gpus <= 1:
        return ["python", *train]
    per_node = str(max(1, k.gpus))
    restarts = f"--max-restarts={k.max_restarts}"
    if k.nodes == 1:
        return ["torchrun", "--standalone", "--nnodes=1", f"--nproc-per-node={per_node}", restarts, *train]
    # Through sh: pod 0 is told it hosts the rendezvous store (torch would otherwise decide by resolving
    # the endpoint, which a replacement pod 0 may do before its DNS record exists), and the join timeout
    # covers a replacement node's start and image pull.
    endpoint = f"{k.name}-0.{k.name}.{k.namespace}.svc:{k.master_port}"
    host = '$(test "$JOB_COMPLETION_INDEX" = 0 && echo 1 || echo 0)'
    return ["sh", "-c", " ".join([
        "exec torchrun", f"--nnodes={k.nodes}", f"--nproc-per-node={per_node}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}", f"--rdzv-id={k.name}", f"--rdzv-conf=is_host={host},join_timeout={JOIN_SECONDS}",
        restarts, *train])]


def _training_job(cfg: Config) -> dict:
    k = cfg.k8s
    resources, shm = pod_resources(k)
    indexed = k.nodes > 1
    train = _container(k, "train", train_command(k), _env(k, indexed), _mounts(k), resources)
    if indexed:
        train["ports"] = [{"name": "rendezvous", "containerPort": k.master_port}]
    pod = _pod(k, [train], _volumes(cfg, shm), init=[check_container(k)])
    if indexed:
        pod["subdomain"] = k.name  # pods resolve as <job>-<index>.<service>
    # several nodes: a replaced pod rejoins the rendezvous; any index failing for good ends the Job
    head = _indexed(k, k.nodes) if indexed else {"backoffLimit": k.backoff_limit}
    return _batch_job(k, k.name, "training", head, pod, ("check", "train"))


def _pytorch_job(cfg: Config) -> dict:
    """Kubeflow Training Operator's PyTorchJob: Worker replicas under an elastic policy (c10d rendezvous the
    operator wires through PET_* variables); exit codes 1-127 are permanent (ExitCode), so a user error
    (the check's exit 2) fails it at once, a killed pod (128+) is restarted."""
    k = cfg.k8s
    resources, shm = pod_resources(k)
    # The check runs first in the same container: the operator reads only this container's exit code, and
    # treats a failed init container as retryable (it would recreate the pod forever).
    command = ["sh", "-c", f"python -m engine.run check --quick --config {CONFIG} && "
                           f"exec torchrun -m engine.run train --config {CONFIG}"]
    container = _container(k, "pytorch", command, _env(k, False), _mounts(k), resources)
    pod = _pod(k, [container], _volumes(cfg, shm), restart="OnFailure")
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": k.backoff_limit,
                                  "ttlSecondsAfterFinished": k.ttl_seconds_after_finished}
    if k.active_deadline_seconds:
        run_policy["activeDeadlineSeconds"] = k.active_deadline_seconds
    if k.queue:
        run_policy["schedulingPolicy"] = {"queue": k.queue}
    spec = {
        "runPolicy": run_policy,
        "elasticPolicy": {"rdzvBackend": "c10d", "minReplicas": k.nodes, "maxReplicas": k.nodes,
                          "maxRestarts": k.max_restarts, "nProcPerNode": max(1, k.gpus)},
        "pytorchReplicaSpecs": {"Worker": {"replicas": k.nodes, "restartPolicy": "ExitCode",
                                           "template": _template(k, "training", pod)}},
    }
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob",
            "metadata": _job_metadata(k, k.name, "training"), "spec": spec}


def _cache_job(cfg: Config) -> dict:
    """k8s.cache_pods pods, each filling its share of the disk cache (`engine.run cache`: the share from
    JOB_COMPLETION_INDEX / JOB_COMPLETIONS), before the training starts on a warm cache."""
    k = cfg.k8s
    workers = max(1, cfg.cache.workers)
    amounts = {"cpu": str(workers), "memory": f"{4 * workers}Gi"}
    env = [*_env(k, True), {"name": "JOB_COMPLETIONS", "value": str(k.cache_pods)}]
    container = _container(k, "cache", ["python", "-m", "engine.run", "cache", "--config", CONFIG], env,
                           _mounts(k, output=False, shm=False), {"requests": amounts, "limits": dict(amounts)})
    pod = _pod(k, [container], _volumes(cfg, None, output=False))
    # no deadline: k8s.active_deadline_seconds bounds the training, and a fill of 50k volumes takes its time
    return _batch_job(k, f"{k.name}-cache", "cache-fill", _indexed(k, k.cache_pods), pod, ("cache",), deadline=False)


def _sweep_job(cfg: Config) -> dict:
    """k8s.sweep_workers pods, each one `sweep` worker (an Indexed Job: JOB_COMPLETION_INDEX seeds its
    sampler) on the study in the output claim; a pod that is replaced picks the study up again."""
    k = cfg.k8s
    resources, shm = pod_resources(k)
    command = ["python", "-m", "engine.run", "sweep", "--config", CONFIG, "sweep.workers=1"]
    container = _container(k, "sweep", command, _env(k, True), _mounts(k), resources)
    pod = _pod(k, [container], _volumes(cfg, shm), init=[check_container(k)])
    head = _indexed(k, k.sweep_workers, max_failed=k.sweep_workers - 1)  # the study goes on without a lost worker
    return _batch_job(k, f"{k.name}-sweep", "sweep", head, pod, ("check", "sweep"))


def _claim(cfg: Config, role: str) -> dict:
    k = cfg.k8s
    c = _volume(k, role)
    spec: dict[str, Any] = {"accessModes": [access_mode(k, role)], "resources": {"requests": {"storage": c.size}}}
    if k.storage_class:
        spec["storageClassName"] = k.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _metadata(k, claim_name(cfg, role), role, dict(KEEP)), "spec": spec}


def _service(k: K8sConfig) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(k, k.name, "rendezvous"),
            "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                     "selector": {"app.kubernetes.io/instance": k.name, "app.kubernetes.io/component": "training"},
                     "ports": [{"name": "rendezvous", "port": k.master_port, "targetPort": k.master_port}]}}


def render_objects(cfg: Config, part: str = "all") -> list[dict]:
    """`part`: claims (the PVCs, kept when a run is deleted), cache (the ConfigMap and the cache-fill Job),
    train (the ConfigMap, a headless Service for several nodes and the training workload, or with
    k8s.sweep_workers the sweep Job), or all of them in that order."""
    k = cfg.k8s
    _check(cfg)
    if k.sweep_workers:
        from engine.sweep import check_space

        check_space(cfg)  # an empty or bad search space fails here, not in every pod
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(k, f"{k.name}-config", "config"),
                  "data": {"config.yaml": training_config(cfg)}}
    claims = [_claim(cfg, role) for role in ("cache", "output") if not _volume(k, role).existing]
    cache = [_cache_job(cfg)] if cfg.cache.disk else []
    if k.sweep_workers:
        train = [_sweep_job(cfg)]
    elif k.kind == "pytorchjob":
        train = [_pytorch_job(cfg)]
    else:
        train = ([_service(k)] if k.nodes > 1 else []) + [_training_job(cfg)]
    parts = {"claims": claims, "cache": [config_map, *cache], "train": [config_map, *train],
             "all": [*claims, config_map, *cache, *train]}
    return parts[part]


def render(cfg: Config, part: str = "all") -> str:
    return yaml.safe_dump_all(render_objects(cfg, part), sort_keys=False)


def helm_values(cfg: Config) -> str:
    """Values for charts/ct3d that describe the same run as `render(cfg)`."""
    k = cfg.k8s
    _check(cfg)

    def claim(role: str) -> dict:
        c = _volume(k, role)
        return {"name": claim_name(cfg, role), "existing": c.existing, "size": c.size,
                "accessMode": access_mode(k, role)}

    resources, shm = pod_resources(k)
    values = {
        "name": k.name, "kind": str(k.kind), "image": k.image, "imagePullPolicy": str(k.image_pull_policy),
        "imagePullSecrets": list(k.image_pull_secrets), "serviceAccountName": k.service_account,
        "nodes": k.nodes, "gpus": k.gpus, "cpu": resources["limits"]["cpu"], "memory": resources["limits"]["memory"],
        "shmSize": shm, "labels": dict(k.labels), "annotations": dict(k.annotations), "queue": k.queue,
        "priorityClassName": k.priority_class, "nodeSelector": dict(k.node_selector),
        "affinity": plain_dict(k.affinity), "tolerations": [plain_dict(t) for t in k.tolerations],
        "env": dict(k.env), "storageClass": k.storage_class, "cache": claim("cache"), "output": claim("output"),
        "dataClaim": k.data_claim, "cacheFill": cfg.cache.disk, "cachePods": k.cache_pods,
        "cacheWorkers": max(1, cfg.cache.workers), "wandbSecret": k.wandb_secret, "backoffLimit": k.backoff_limit,
        "maxRestarts": k.max_restarts, "terminationGracePeriodSeconds": k.termination_grace_seconds,
        "activeDeadlineSeconds": k.active_deadline_seconds, "ttlSecondsAfterFinished": k.ttl_seconds_after_finished,
        "runAsUser": k.run_as_user, "masterPort": k.master_port, "sweepWorkers": k.sweep_workers,
        "trainingConfig": training_config(cfg),
    }
    return yaml.dump(values, Dumper=_QuotingDumper, sort_keys=False)


_YAML11_WORDS = re.compile(r"^(y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF)$")


def _quoted(dumper, text: str):
    """Several lines as a block; a word YAML 1.1 reads as a boolean (Helm reads a bare y, on or no so,
    PyYAML leaves y bare) quoted."""
    style = "|" if "\n" in text else '"' if _YAML11_WORDS.match(text) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


class _QuotingDumper(yaml.SafeDumper):
    pass


_QuotingDumper.add_representer(str, _quoted)
