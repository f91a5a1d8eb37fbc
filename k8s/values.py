"""Values for charts/ct3d that describe the same run as `render`: the Helm face of the same objects (a
property-based test renders both and compares them whole)."""

from __future__ import annotations

import re

import yaml

from engine.config import Config
from k8s.pod import plain_dict, pod_resources
from k8s.settings import access_mode, training_config, validate, volume_of
from k8s.storage import claim_name


def helm_values(cfg: Config) -> str:
    """Values for charts/ct3d that describe the same run as `render(cfg)`."""
    k = cfg.k8s
    validate(cfg)

    def claim(role: str) -> dict:
        c = volume_of(k, role)
        return {"name": claim_name(cfg, role), "existing": c.existing, "size": c.size,
                "accessMode": access_mode(k, role)}

    resources, shm = pod_resources(k)
    embed, embed_shm = pod_resources(k, gpus=min(k.gpus, 1))
    bench, bench_shm = pod_resources(k, gpus=1)  # `render --part bench`'s pod; the chart renders it with bench: true
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
        "extraResources": dict(k.extra_resources), "runtimeClassName": k.runtime_class,
        "trainjobRuntime": k.trainjob_runtime, "cacheNodeSelector": dict(k.cache_node_selector),
        "cacheTolerations": [plain_dict(t) for t in k.cache_tolerations], "cacheQueue": k.cache_queue,
        "embedPods": k.embed_pods, "embedCpu": embed["limits"]["cpu"], "embedMemory": embed["limits"]["memory"],
        "embedShmSize": embed_shm, "bench": False, "benchCpu": bench["limits"]["cpu"],
        "benchMemory": bench["limits"]["memory"], "benchShmSize": bench_shm,
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
