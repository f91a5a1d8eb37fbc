"""The bench Job (k8s/workloads/bench.py, charts/ct3d/templates/bench-job.yaml): one pod of one GPU running `python -m
bench gpu` from the image, its results on the output claim; and OMP_NUM_THREADS in every container that trains (the
pod's CPU per rank: torch in a container counts the node's CPUs). The rest of the chart's parity, with the OMP env in
it, is test_k8s.py's property test."""

import subprocess
import sys

import pytest
import yaml
from test_k8s import (
    EMBED,
    JOBSET,
    KUBE_VERSIONS,
    MULTI,
    PYTORCHJOB,
    QUEUE,
    SWEEP,
    TRAINJOB,
    assert_restricted,
    comparable,
    helm,
    needs_helm,
    objects,
    pods_of,
    validate,
)

from engine.config.loading import load_config
from helpers import ROOT, TEXT
from k8s.render import render, render_objects
from k8s.values import helm_values

STANDARD = ("name", "instance", "version", "component", "managed-by")


def bench_job(*overrides: str) -> dict:
    job, = render_objects(load_config(ROOT / "configs" / "default.yaml", list(overrides)), "bench")
    return job


def test_bench_job_runs_bench_gpu_on_one_gpu_with_the_training_pods_placement_and_claims():
    job, training = bench_job(*JOBSET), next(o for o in objects(*JOBSET) if o["kind"] == "JobSet")
    train_pod = training["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (job["kind"], job["metadata"]["name"], job["metadata"]["namespace"]) == ("Job", "ctrate-r18-bench", "ml")
    for meta in (job["metadata"], spec["template"]["metadata"]):
        assert all(f"app.kubernetes.io/{key}" in meta["labels"] for key in STANDARD)
        assert meta["labels"]["app.kubernetes.io/component"] == "bench"
    assert job["metadata"]["labels"][QUEUE] == "team-a"  # a GPU workload: admitted by Kueue like the training
    assert (spec["backoffLimit"], spec["activeDeadlineSeconds"]) == (0, 1800)
    container, = pod["containers"]
    assert "initContainers" not in pod
    assert container["command"] == ["python", "-m", "bench", "gpu", "--require-cuda", "--work", "/cache", "--out",
                                    "/output/bench/ctrate-r18/RESULTS-gpu.md"]
    limits = container["resources"]["limits"]
    assert limits == container["resources"]["requests"] and limits["nvidia.com/gpu"] == 1  # of the 8 training's
    assert "vpc.amazonaws.com/efa" not in limits  # NCCL's devices: one process talks to no other
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]} == {
        "cache": "/cache", "output": "/output", "shm": "/dev/shm"}
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in train_pod["volumes"]
              if "persistentVolumeClaim" in v}
    assert {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
            if "persistentVolumeClaim" in v} == {role: claims[role] for role in ("cache", "output")}
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "runtimeClassName",
                "serviceAccountName", "imagePullSecrets", "securityContext"):
        assert pod[key] == train_pod[key], key
    assert_restricted(pod)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert (env["CT3D_EXPECT_GPU"], env["OMP_NUM_THREADS"]) == ("1", "6")  # one GPU's share of CPU: 6


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("overrides", [[], MULTI, JOBSET, ["k8s.gpus=0", "k8s.cache.existing=true"],
                                       ["k8s.cpu=500m", "k8s.gpus=1"]])
def test_bench_job_passes_the_strict_schemas(overrides, version):
    proc = validate(render(load_config(ROOT / "configs" / "default.yaml", overrides), "bench"), version)
    assert proc.returncode == 0 and "ERROR" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_bench_is_rendered_on_its_own_never_with_the_run():
    assert all(o["metadata"]["labels"]["app.kubernetes.io/component"] != "bench" for o in objects(*MULTI))
    proc = subprocess.run([sys.executable, "-m", "k8s", "render", "--part", "bench", "k8s.name=probe"], cwd=ROOT,
                          capture_output=True, **TEXT)
    assert proc.returncode == 0, proc.stderr
    assert [o["metadata"]["name"] for o in yaml.safe_load_all(proc.stdout) if o] == ["probe-bench"]


def test_the_image_ships_bench_and_a_c_compiler_for_torch_compile():
    text = (ROOT / "k8s" / "Dockerfile").read_text()
    assert "COPY --chown=1000:1000 bench /app/bench" in text
    assert "apt-get install -y --no-install-recommends gcc libc6-dev" in text
    assert "!bench/" in (ROOT / ".dockerignore").read_text().splitlines()


def containers_that_train(objs: list[dict]) -> list[tuple[str, dict]]:
    """(name, container) of every container that holds a pod's GPUs or would (a pod of none): training, sweep,
    embed, the operators' workers, a TrainJob's trainer; and the check and cache-fill containers, which do not."""
    pods = pods_of(objs) + [rj["template"]["spec"]["template"]["spec"] for o in objs if o["kind"] == "JobSet"
                            for rj in o["spec"]["replicatedJobs"]]
    found = [(c["name"], c) for pod in pods for c in pod.get("initContainers", []) + pod["containers"]]
    return found + [("node", o["spec"]["trainer"]) for o in objs if o["kind"] == "TrainJob"]


@pytest.mark.parametrize("overrides,threads", [
    ([], 6),  # 1 GPU, 6 CPU
    (MULTI, 6),  # 8 GPUs, 48 CPU: 8 ranks of 6
    ([*JOBSET, "k8s.cpu=90"], 11),  # 90 CPU over 8 ranks, rounded down
    (["k8s.gpus=4", "k8s.cpu=500m"], 1),  # at least 1
    (["k8s.gpus=0"], 6),  # one process on the pod's CPU
    (PYTORCHJOB, 6), (TRAINJOB, 6), (SWEEP, 6),
    ([*MULTI, *EMBED, "k8s.cpu=90"], None),  # the training's 11, an embed pod's (one GPU's share) 6
])
def test_containers_that_train_get_omp_threads_of_their_pods_cpu_per_rank(overrides, threads):
    seen = set()
    for name, container in containers_that_train(objects(*overrides)):
        env = {e["name"]: e.get("value") for e in container["env"]}
        if name in ("check", "cache"):
            assert "OMP_NUM_THREADS" not in env, name
            continue
        expected = threads or {"train": 11, "embed": 6}[name]
        assert env["OMP_NUM_THREADS"] == str(expected), (name, env.get("OMP_NUM_THREADS"))
        seen.add(name)
    assert seen


def test_a_users_omp_num_threads_is_kept_and_set_once():
    for name, container in containers_that_train(objects(*MULTI, "k8s.env={OMP_NUM_THREADS: '2'}")):
        values = [e["value"] for e in container["env"] if e["name"] == "OMP_NUM_THREADS"]
        assert values == ["2"], (name, values)


@needs_helm
@pytest.mark.parametrize("overrides", [[], [*JOBSET, "k8s.cpu=90"], ["k8s.gpus=0", "k8s.cpu=500m"],
                                       [*MULTI, *EMBED, "k8s.env={OMP_NUM_THREADS: '2'}"], TRAINJOB])
def test_the_charts_bench_job_and_omp_threads_are_the_renderers(overrides):
    """With bench: true the chart renders the bench Job beside the run's objects; all of them equal the renderer's
    (the run's and `--part bench`'s), and the chart's bench Job passes the strict schemas."""
    cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
    proc = helm("template", cfg.k8s.name, "charts/ct3d", "--namespace", cfg.k8s.namespace, "-f", "-",
                "--set", "bench=true", values=helm_values(cfg))
    assert proc.returncode == 0, proc.stderr
    theirs = [o for o in yaml.safe_load_all(proc.stdout) if o]
    assert comparable(theirs) == comparable(render_objects(cfg) + render_objects(cfg, "bench"))
    bench, = [o for o in theirs if o["metadata"]["labels"]["app.kubernetes.io/component"] == "bench"]
    for version in KUBE_VERSIONS:
        result = validate(yaml.safe_dump(bench), version)
        assert result.returncode == 0, result.stdout + result.stderr
