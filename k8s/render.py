"""Kubernetes objects for one training run, from the `k8s` section of a ct3d config.

Plain dicts rendered to YAML: the objects are small and fixed, so a template engine would add a
dependency without removing code; the Helm chart in charts/ct3d renders the same objects (a
property-based test compares them whole). A workload kind is one module in k8s/workloads/ with an
`objects(cfg)` function, named in WORKLOADS."""

from __future__ import annotations

import yaml

from engine.config import Config
from k8s.settings import validate, volume_of
from k8s.storage import claim, config_map
from k8s.workloads import bench, cache_fill, embed, job, jobset, pytorchjob, sweep, trainjob

WORKLOADS = {"job": job.objects, "jobset": jobset.objects, "trainjob": trainjob.objects,  # by k8s.kind
             "pytorchjob": pytorchjob.objects}


def render_objects(cfg: Config, part: str = "all") -> list[dict]:
    """`part`: claims (the PVCs, kept when a run is deleted), cache (the ConfigMap and the cache-fill Job),
    embed (the ConfigMap and, with k8s.embed_pods, the embed Job), train (the ConfigMap, a headless Service for
    several nodes and the training workload, or with k8s.sweep_workers the sweep Job), or all of them in that
    order; or bench (the one-GPU `bench gpu` Job, never part of all)."""
    k = cfg.k8s
    validate(cfg)
    claims = [claim(cfg, role) for role in ("cache", "output") if not volume_of(k, role).existing]
    settings = config_map(cfg)
    cache = [cache_fill.cache_job(cfg)] if cfg.cache.disk else []
    embedding = [embed.embed_job(cfg)] if k.embed_pods else []  # validate: only where training reads them
    train = sweep.objects(cfg) if k.sweep_workers else WORKLOADS[str(k.kind)](cfg)
    parts = {"claims": claims, "cache": [settings, *cache], "embed": [settings, *embedding],
             "train": [settings, *train], "all": [*claims, settings, *cache, *embedding, *train],
             "bench": [bench.bench_job(cfg)]}
    return parts[part]


def render(cfg: Config, part: str = "all") -> str:
    return yaml.safe_dump_all(render_objects(cfg, part), sort_keys=False)
