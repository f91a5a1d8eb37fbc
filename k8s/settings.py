"""The config as the pods see it, checked before anything is rendered: the fixed paths and environment of
every ct3d container, `${oc.env:...}` resolved with the pod's environment (never this machine's), the
training config the ConfigMap carries, and what the schema's per-field limits cannot say (names, data on
the data claim, access modes, secrets kept out, an embed stage only where training reads its embeddings)."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

from omegaconf import OmegaConf

from engine.config import SECRET_KEYS, Config, K8sConfig, VolumeClaimConfig, load_config, plain, to_yaml
from engine.utils import CT3DError

CONFIG_DIR, CACHE_DIR, OUTPUT_DIR, DATA_DIR = "/etc/ct3d", "/cache", "/output", "/data"
CONFIG = f"{CONFIG_DIR}/config.yaml"
KEEP = {"helm.sh/resource-policy": "keep"}  # `helm uninstall` leaves the claim (and its data) alone
# TORCH_DISABLE_SHARE_RDZV_TCP_STORE: torchrun's c10d handler otherwise keeps round 0's worker store address,
# so a survivor of a lost pod never publishes a new one and its replacement waits forever (torch 2.13: tested).
FIXED_ENV = {"WANDB_DIR": OUTPUT_DIR, "PYTHONUNBUFFERED": "1", "CT3D_CACHE": CACHE_DIR, "CT3D_OUTPUT": OUTPUT_DIR,
             "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# set by ct3d per pod or per kind (the node's and pod's names, the GPU promise, the attempts counter, the index)
POD_ENV = ("WANDB_API_KEY", "NODE_NAME", "CT3D_EXPECT_GPU", "POD_NAME", "CT3D_ATTEMPTS_FILE", "CT3D_MAX_ATTEMPTS",
           "JOB_COMPLETION_INDEX", "JOB_COMPLETIONS")
JOIN_SECONDS = 1800  # c10d rendezvous join timeout: a lost node's replacement may take this long to start
# the pretrained encoders model.freeze keeps frozen (unread_embeddings mirrors engine.training's embeddings.applies,
# which k8s may not import; tests/kubernetes/test_embed.py keeps the two in step)
ENCODERS = ("merlin", "ctfm")


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

def unread_embeddings(cfg: Config) -> str:
    """Why this run's training would not read cached embeddings, or "" when it would: only a frozen pretrained
    encoder, on volumes that are not augmented, trains its head on them."""
    name = str(cfg.model.name)
    if name not in ENCODERS:
        return f"model.name={name} is not a pretrained encoder ({', '.join(ENCODERS)})"
    if not cfg.model.freeze:
        return "model.freeze=false: training runs (and fine-tunes) the encoder on every volume"
    if cfg.augment.enabled:
        return "augment.enabled=true: each epoch augments the volumes anew, so training runs the encoder every time"
    if not cfg.cache.embeddings:
        return "cache.embeddings=false: training runs the encoder every epoch"
    return ""


def _data_paths(cfg: Config) -> list[tuple[str, str]]:
    d = cfg.data
    return [(f"data.{key}", str(value)) for key, value in (("train", d.train), ("val", d.val),
                                                         ("image_root", d.image_root)) if value]


def validate(cfg: Config) -> None:
    """What the schema's per-field limits cannot say (engine/config.py checks the rest at load)."""
    k = cfg.k8s
    if len(k.name) > 46:  # pods are named <job>-cache-<index>-<random>: keep them within 63
        raise CT3DError(f"config error: k8s.name: {k.name!r} is longer than 46 characters")
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", k.name):  # a Service's, JobSet's or PyTorchJob's name
        raise CT3DError(f"config error: k8s.name: {k.name!r} must start with a letter (a DNS-1035 label: the "
                        f"Service, JobSet, TrainJob and PyTorchJob it names refuse a leading digit)")
    if str(k.kind) == "trainjob" and k.trainjob_runtime:
        for key, value in (("priority_class", k.priority_class), ("runtime_class", k.runtime_class)):
            if value:
                raise CT3DError(f"config error: k8s.{key}: a TrainJob cannot set it on its pods (the "
                                f"ClusterTrainingRuntime {k.trainjob_runtime!r} does); set it there, leave "
                                f"k8s.trainjob_runtime empty (ct3d's own runtime sets it), or use k8s.kind=jobset")
    for name, count in k.extra_resources.items():
        if not re.fullmatch(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?", name) or \
                count < 1:
            raise CT3DError(f"config error: k8s.extra_resources.{name}: expected a resource name (e.g. "
                            f"vpc.amazonaws.com/efa, rdma/ib) and a count of at least 1, got {count!r}")
    if k.sweep_workers and (k.nodes > 1 or k.gpus > 1):
        raise CT3DError("config error: k8s.sweep_workers: each sweep worker trains its trials in one process on "
                        "at most one GPU; set k8s.nodes=1 and k8s.gpus=1 (or 0), and more workers instead")
    if k.embed_pods and unread_embeddings(cfg):
        raise CT3DError(f"config error: k8s.embed_pods: the embed stage fills the embeddings a frozen encoder's head "
                        f"trains on, but {unread_embeddings(cfg)}; set k8s.embed_pods=0, or model.name=merlin or "
                        f"ctfm with model.freeze=true and augment.enabled=false")
    for role in ("cache", "output"):
        access_mode(k, role)
    for key in k.env:
        if key in (*FIXED_ENV, *POD_ENV):
            raise CT3DError(f"config error: k8s.env.{key}: set by ct3d in its pods; leave it out")
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
    shared = k.nodes > 1 or k.sweep_workers > 1 or (role == "cache" and max(k.cache_pods, k.embed_pods) > 1)
    mode = str(volume_of(k, role).access_mode)
    if mode == "auto":
        return "ReadWriteMany" if shared else "ReadWriteOnce"
    if shared and mode != "ReadWriteMany" and not volume_of(k, role).existing:
        why = (f"{k.nodes} nodes" if k.nodes > 1 else f"{k.sweep_workers} sweep workers" if k.sweep_workers > 1
               else f"{k.cache_pods} cache pods" if k.cache_pods > 1 else f"{k.embed_pods} embed pods")
        raise CT3DError(f"config error: k8s.{role}.access_mode: {mode} lets one node mount the claim, but {why} "
                        f"share it: use ReadWriteMany (a StorageClass that offers it: EFS, Filestore, FSx for "
                        f"Lustre, CephFS, NFS) or auto")
    return mode


def volume_of(k: K8sConfig, role: str) -> VolumeClaimConfig:
    return k.cache if role == "cache" else k.output
