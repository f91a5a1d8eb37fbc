"""The objects a run keeps or shares: the cache claim (named by the data set, the preprocessing, its access
mode and storage class, so runs on the same data share it), the output claim, both kept when a run is
deleted, and the ConfigMap with the training config."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from engine.config import Config, plain
from k8s.meta import metadata
from k8s.settings import access_mode, training_config, volume_of

KEEP = {"helm.sh/resource-policy": "keep"}  # `helm uninstall` leaves the claim (and its data) alone


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
    if volume_of(k, role).name:
        return volume_of(k, role).name
    return f"ct3d-cache-{data_key(cfg)}" if role == "cache" else f"{k.name}-output"


def claim(cfg: Config, role: str) -> dict:
    k = cfg.k8s
    c = volume_of(k, role)
    spec: dict[str, Any] = {"accessModes": [access_mode(k, role)], "resources": {"requests": {"storage": c.size}}}
    if k.storage_class:
        spec["storageClassName"] = k.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": metadata(k, claim_name(cfg, role), role, dict(KEEP)), "spec": spec}


def config_map(cfg: Config) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata(cfg.k8s, f"{cfg.k8s.name}-config", "config"),
            "data": {"config.yaml": training_config(cfg)}}
