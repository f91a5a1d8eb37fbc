"""Names every object carries: the standard app.kubernetes.io labels (plus the user's) and metadata."""

from __future__ import annotations

from typing import Any

from engine import __version__
from engine.config import K8sConfig


def labels(k: K8sConfig, component: str = "training") -> dict:
    return {
        **dict(k.labels),
        "app.kubernetes.io/name": "ct3d",
        "app.kubernetes.io/instance": k.name,
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "ct3d-render",
    }


def metadata(k: K8sConfig, name: str, component: str, annotations: dict | None = None) -> dict:
    meta: dict[str, Any] = {"name": name, "namespace": k.namespace, "labels": labels(k, component)}
    if annotations:
        meta["annotations"] = annotations
    return meta
