"""The pod every workload runs: standard labels, resources per GPU (with the memory-backed /dev/shm
counted), containers under the "restricted" Pod Security Standard, the env, mounts and volumes of the
claims, scheduling knobs, and the `check` container that fails a run on a user error before any GPU work."""

from __future__ import annotations

import json
import re
from typing import Any

from engine.config import Config, K8sConfig
from k8s.meta import labels
from k8s.settings import CACHE_DIR, CONFIG, CONFIG_DIR, DATA_DIR, OUTPUT_DIR, pod_environment
from k8s.storage import claim_name

INDEX_ANNOTATION = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity_bytes(text: str) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text).groups()
    return float(number) * _UNITS[unit]


def mebibytes(n: float) -> str:
    mib = int(-(-n // 2**20))
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def pod_resources(k: K8sConfig, gpus: int | None = None) -> tuple[dict, str]:
    """(container resources, /dev/shm size): CPU and memory per GPU unless set; the memory-backed /dev/shm
    counts against the memory limit, so the default memory adds it. `gpus`: a pod of that many GPUs (an embed
    pod's one), not a training pod: k.cpu, memory and shm_size size a pod of k.gpus, so they apply only where
    the counts agree, and NCCL's extra_resources never (one process talks to no other)."""
    count = k.gpus if gpus is None else gpus
    fixed = count == k.gpus
    per = max(1, count)
    shm = (k.shm_size if fixed else "") or f"{k.shm_per_gpu * per}Gi"
    memory = (k.memory if fixed else "") or mebibytes(k.memory_per_gpu * per * 2**30 + quantity_bytes(shm))
    amounts: dict[str, Any] = {"cpu": (k.cpu if fixed else "") or str(k.cpu_per_gpu * per), "memory": memory}
    if count > 0:
        amounts["nvidia.com/gpu"] = count
    if gpus is None:
        amounts.update(sorted(k.extra_resources.items()))  # RDMA / EFA devices for NCCL
    return {"requests": dict(amounts), "limits": dict(amounts)}, shm

def container_security() -> dict:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"}}


def rank_threads(k: K8sConfig, gpus: int | None = None) -> int:
    """OMP_NUM_THREADS of a container that trains: its pod's CPU (pod_resources; `gpus` as there) per rank, one rank
    per GPU, at least 1. Torch and OpenMP in a container count the node's CPUs, not the pod's CPU limit: 8 ranks on
    a 192-CPU node would each start 192 threads on a 48-CPU share and thrash; and torchrun, unset, gives each
    worker 1."""
    ranks = max(1, k.gpus if gpus is None else gpus)
    return max(1, int(quantity_bytes(pod_resources(k, gpus)[0]["limits"]["cpu"]) // ranks))


def container_env(k: K8sConfig, indexed: bool, trains: bool = False, gpus: int | None = None) -> list[dict]:
    """The W&B key from its Secret, the fixed and the user's env, the node's name (a node fault, exit 151, names
    it), and for the container that holds the pod's GPUs (`trains`; `gpus` of them where not k.gpus)
    CT3D_EXPECT_GPU: CUDA missing there is the node's fault (retried elsewhere), not a config error, and
    OMP_NUM_THREADS (rank_threads) unless k8s.env sets it; the pod index when `indexed`."""
    env = [{"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": k.wandb_secret, "key": "api-key",
                                                                     "optional": True}}}]
    env += [{"name": name, "value": value} for name, value in pod_environment(k).items()]
    env.append({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    if trains and (k.gpus if gpus is None else gpus) > 0:
        env.append({"name": "CT3D_EXPECT_GPU", "value": "1"})
    if trains and "OMP_NUM_THREADS" not in k.env:
        env.append({"name": "OMP_NUM_THREADS", "value": str(rank_threads(k, gpus))})
    if indexed:
        env.append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {"fieldPath": INDEX_ANNOTATION}}})
    return env


def container_spec(k: K8sConfig, name: str, command: list[str], env: list[dict], mounts: list[dict],
               resources: dict | None = None) -> dict:
    c: dict[str, Any] = {"name": name, "image": k.image, "imagePullPolicy": str(k.image_pull_policy),
                         "command": command, "env": env}
    if resources:
        c["resources"] = resources
    c.update(volumeMounts=mounts, securityContext=container_security())
    return c


def mounts(k: K8sConfig, output: bool = True, shm: bool = True) -> list[dict]:
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}, {"name": "cache", "mountPath": CACHE_DIR}]
    if output:
        mounts.append({"name": "output", "mountPath": OUTPUT_DIR})
    if shm:
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    if k.data_claim:
        mounts.append({"name": "data", "mountPath": DATA_DIR, "readOnly": True})
    return mounts


def volumes(cfg: Config, shm_size: str | None, output: bool = True) -> list[dict]:
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


def pod_spec(k: K8sConfig, containers: list[dict], volumes: list[dict], init: list[dict] | None = None,
             restart: str = "Never", gpu_pod: bool = True) -> dict:
    """The pod: a GPU pod (training, sweep, embed) takes the GPU placement (priority, runtime class, node selector,
    affinity, tolerations); the cache fill's CPU pods take theirs (k8s.cache_node_selector, cache_tolerations)."""
    pod: dict[str, Any] = {"restartPolicy": restart, "terminationGracePeriodSeconds": k.termination_grace_seconds}
    if k.service_account:
        pod["serviceAccountName"] = k.service_account
    if gpu_pod and k.priority_class:
        pod["priorityClassName"] = k.priority_class
    if gpu_pod and k.runtime_class:
        pod["runtimeClassName"] = k.runtime_class
    if k.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in k.image_pull_secrets]
    pod["securityContext"] = {"runAsNonRoot": True, "runAsUser": k.run_as_user, "runAsGroup": k.run_as_user,
                              "fsGroup": k.run_as_user, "fsGroupChangePolicy": "OnRootMismatch",
                              "seccompProfile": {"type": "RuntimeDefault"}}
    selector, tolerations = ((k.node_selector, k.tolerations) if gpu_pod
                             else (k.cache_node_selector, k.cache_tolerations))
    if selector:
        pod["nodeSelector"] = dict(selector)
    if gpu_pod and k.affinity:
        pod["affinity"] = plain_dict(k.affinity)
    if tolerations:
        pod["tolerations"] = [plain_dict(t) for t in tolerations]
    if init:
        pod["initContainers"] = init
    pod["containers"] = containers
    pod["volumes"] = volumes
    return pod


def plain_dict(node: Any) -> Any:
    """A deep copy of plain data (dicts, lists, scalars), so no two objects share a node."""
    return json.loads(json.dumps(node))


def template(k: K8sConfig, component: str, pod: dict) -> dict:
    meta: dict[str, Any] = {"labels": labels(k, component)}
    if k.annotations:
        meta["annotations"] = dict(k.annotations)
    return {"metadata": meta, "spec": pod}


def check_container(k: K8sConfig) -> dict:
    """Validates the config and the datalists (every volume listed, readable labels, files present) and that
    /cache and /output take files, before any GPU work: exit 2 on a user error, which the Job's FailJob rule
    names."""
    return container_spec(k, "check", ["python", "-m", "engine.run", "check", "--quick", "--config", CONFIG],
                      container_env(k, False), mounts(k, output=True, shm=False),
                      {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}})
