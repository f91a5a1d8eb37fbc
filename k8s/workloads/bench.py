"""The bench Job (`render --part bench`): one pod of one GPU, with the training pods' image, placement and queue,
running `python -m bench gpu` (the image ships bench/): its temporary caches on the cache claim, so the disk-cache
row reads what training reads, and RESULTS-gpu.md written to the output claim (bench/<name>/). Not part of `all`:
apply it on its own (after the claims), e.g. before the first training on a new kind of node."""

from __future__ import annotations

from engine.config import Config, K8sConfig
from k8s.pod import container_env, container_spec, mounts, pod_resources, pod_spec, volumes
from k8s.settings import CACHE_DIR, OUTPUT_DIR
from k8s.workloads.batch import batch_job

DEADLINE_SECONDS = 1800  # the rows fit 8 minutes on one H100: this leaves an image pull and a slow node, not a hang
CLAIMS_AND_SHM = ("cache", "output", "shm")  # no config (the benchmark reads the image's configs/) and no data


def results_path(k: K8sConfig) -> str:
    return f"{OUTPUT_DIR}/bench/{k.name}/RESULTS-gpu.md"


def bench_command(k: K8sConfig) -> list[str]:
    """`bench gpu`, failing (exit 1) where CUDA is missing: the pod asked for a GPU."""
    return ["python", "-m", "bench", "gpu", "--require-cuda", "--work", CACHE_DIR, "--out", results_path(k)]


def bench_job(cfg: Config) -> dict:
    """A one-pod Job, not retried (backoffLimit 0: a benchmark that fails says why in its log; a node disruption
    is not counted), under its own deadline."""
    k = cfg.k8s
    resources, shm = pod_resources(k, gpus=1)
    container = container_spec(k, "bench", bench_command(k), container_env(k, False, trains=True, gpus=1),
                               [m for m in mounts(k) if m["name"] in CLAIMS_AND_SHM], resources)
    pod = pod_spec(k, [container], [v for v in volumes(cfg, shm) if v["name"] in CLAIMS_AND_SHM])
    job = batch_job(k, f"{k.name}-bench", "bench", {"backoffLimit": 0}, pod, ("bench",), deadline=False)
    job["spec"]["activeDeadlineSeconds"] = DEADLINE_SECONDS
    return job
