import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine.config import load_config
from engine.errors import CT3DError
from helpers import ROOT, TEXT
from k8s.render import render, render_objects

KUBE_VERSION = "1.30.0"
MULTI = ["k8s.nodes=4", "k8s.gpus=8", "k8s.name=ctrate-r18", "k8s.namespace=ml",
         "k8s.node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}",
         "k8s.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]", "k8s.data_claim=ctrate"]


def helm_binary() -> str | None:
    for candidate in (os.environ.get("CT3D_HELM"), str(ROOT / ".tools" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


HELM = helm_binary()
needs_helm = pytest.mark.skipif(HELM is None and not os.environ.get("CI"), reason="helm not installed: make tools")


def objects(*overrides: str, config=ROOT / "configs" / "default.yaml") -> list[dict]:
    return render_objects(load_config(config, list(overrides)))


def validate(text: str) -> subprocess.CompletedProcess:
    tool = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run([str(tool), "--strict", "-k", KUBE_VERSION, "-"], input=text, capture_output=True, **TEXT)


SWEEP = ["k8s.sweep_workers=3", "sweep.space={train.lr: {type: log, low: 0.0001, high: 0.01}}"]


@pytest.mark.parametrize("overrides", [[], MULTI, ["k8s.gpus=4"], ["k8s.gpus=0", "k8s.cache.existing=true"], SWEEP])
def test_rendered_manifests_pass_strict_schema(overrides):
    proc = validate(render(load_config(ROOT / "configs" / "default.yaml", overrides)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERROR" not in proc.stdout + proc.stderr


def pods_of(objs: list[dict]) -> list[dict]:
    return [o["spec"]["template"]["spec"] for o in objs if o["kind"] == "Job"]


def assert_restricted(pod: dict) -> None:
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert not any("hostPath" in v for v in pod["volumes"])


def test_sweep_renders_an_indexed_job_of_workers_in_place_of_training():
    objs = objects(*SWEEP)
    assert [o["kind"] for o in objs] == ["PersistentVolumeClaim", "PersistentVolumeClaim", "ConfigMap", "Job"]
    job = objs[-1]
    assert job["metadata"]["name"] == "ct3d-train-sweep"
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 3, 3)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-3:] == ["--config", "/etc/ct3d/config.yaml", "sweep.workers=1"]
    assert job["spec"]["podFailurePolicy"]["rules"][1]["onExitCodes"]["containerName"] == container["name"]
    with pytest.raises(CT3DError, match="sweep.space: empty"):
        objects("k8s.sweep_workers=2")
    with pytest.raises(CT3DError, match="k8s.sweep_workers: each sweep worker"):
        objects(*SWEEP, "k8s.gpus=2")


@pytest.mark.parametrize("overrides", [[], MULTI, SWEEP])
def test_every_container_meets_restricted_pod_security(overrides):
    for pod in pods_of(objects(*overrides)):
        assert_restricted(pod)


def test_single_node_job():
    objs = objects()
    assert [o["kind"] for o in objs] == ["PersistentVolumeClaim", "PersistentVolumeClaim", "ConfigMap", "Job"]
    job = objs[-1]
    assert "completionMode" not in job["spec"] and job["spec"]["backoffLimit"] == 3
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "engine.run"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/etc/ct3d": "config", "/cache": "cache", "/output": "output", "/dev/shm": "shm"}
    shm = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert job["metadata"]["labels"]["app.kubernetes.io/name"] == "ct3d"
    assert set(job["metadata"]["labels"]) >= {f"app.kubernetes.io/{k}" for k in
                                              ("name", "instance", "version", "component", "managed-by")}


def test_four_nodes_of_eight_gpus_is_an_indexed_job_with_rendezvous_at_pod_0():
    objs = objects(*MULTI)
    kinds = [o["kind"] for o in objs]
    assert kinds == ["PersistentVolumeClaim", "PersistentVolumeClaim", "ConfigMap", "Service", "Job"]
    service, job = objs[3], objs[4]
    assert service["spec"]["clusterIP"] == "None" and service["metadata"]["name"] == "ctrate-r18"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "ctrate-r18"
    command = pod["containers"][0]["command"]
    assert command[:3] == ["torchrun", "--nnodes=4", "--nproc-per-node=8"]
    assert "--node-rank=$(JOB_COMPLETION_INDEX)" in command
    assert "--master-addr=ctrate-r18-0.ctrate-r18.ml.svc" in command
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "ctrate" for v in pod["volumes"])


def test_wandb_key_comes_from_a_secret_never_inline(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "inline-secret-value-123")
    text = render(load_config(ROOT / "configs" / "default.yaml", ["k8s.wandb_secret=team-wandb"]))
    assert "inline-secret-value-123" not in text
    env = pods_of(list(yaml.safe_load_all(text)))[0]["containers"][0]["env"]
    key = next(e for e in env if e["name"] == "WANDB_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "team-wandb", "key": "api-key", "optional": True}


def test_pods_resume_from_the_output_claim(tmp_path):
    config_map = next(o for o in objects("k8s.name=run-7") if o["kind"] == "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(config_map["data"]["config.yaml"])
    pod_cfg = load_config(path)
    assert pod_cfg.train.resume == "auto" and pod_cfg.output.name == "run-7"
    assert pod_cfg.output.dir == "/output" and pod_cfg.cache.dir == "/cache"


@pytest.mark.parametrize("override,key", [("k8s.nodes=0", "k8s.nodes"), ("k8s.gpus=1.5", "k8s.gpus"),
                                          ("k8s.name=Bad_Name", "k8s.name"), ("k8s.namespace=ml.team", "k8s.namespace"),
                                          ("k8s.memory=lots", "k8s.memory"), ("k8s.nodse=2", "k8s.nodse")])
def test_bad_values_name_the_key_and_print_nothing(override, key):
    proc = subprocess.run([sys.executable, "-m", "k8s", "render", override], cwd=ROOT, capture_output=True, **TEXT)
    assert proc.returncode != 0 and proc.stdout == ""
    assert key in proc.stderr


# ------------------------------------------------------------------ Helm
def helm(*args: str, values: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], input=values, capture_output=True, **TEXT, cwd=ROOT)


def chart_objects(*overrides: str, namespace: str = "default") -> list[dict]:
    values = subprocess.run([sys.executable, "-m", "k8s", "values", *overrides], cwd=ROOT, capture_output=True,
                            **TEXT, check=True).stdout
    name = load_config(ROOT / "configs" / "default.yaml", list(overrides)).k8s.name
    proc = helm("template", name, "charts/ct3d", "--namespace", namespace, "-f", "-", values=values)
    assert proc.returncode == 0, proc.stderr
    return [o for o in yaml.safe_load_all(proc.stdout) if o]


@needs_helm
def test_chart_lints_strict_and_renders_valid_manifests():
    proc = helm("lint", "--strict", "charts/ct3d")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for overrides in ([], MULTI):
        sets = ["--set", "nodes=4", "--set", "gpus=8"] if overrides else []
        proc = helm("template", "ct3d-train", "charts/ct3d", *sets)
        assert proc.returncode == 0, proc.stderr
        result = validate(proc.stdout)
        assert result.returncode == 0, result.stdout + result.stderr
        for obj in yaml.safe_load_all(proc.stdout):
            if obj and obj["kind"] == "Job":
                assert_restricted(obj["spec"]["template"]["spec"])


@needs_helm
def test_chart_schema_rejects_typos_and_wrong_types():
    for bad in ("nodse=4", "nodes=0", "gpus=two", "cache.size=big"):
        proc = helm("template", "x", "charts/ct3d", "--set", bad)
        assert proc.returncode != 0, bad


def essentials(obj: dict) -> dict:
    """The fields that must agree between the chart and the renderer."""
    out = {"kind": obj["kind"], "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"]}
    labels = {k: v for k, v in obj["metadata"]["labels"].items()
              if k.startswith("app.kubernetes.io/") and not k.endswith("managed-by")}
    out["labels"] = labels
    if obj["kind"] == "Job":
        spec = obj["spec"]
        pod = spec["template"]["spec"]
        c = pod["containers"][0]
        out.update({k: spec.get(k) for k in ("completionMode", "completions", "parallelism", "backoffLimit",
                                              "ttlSecondsAfterFinished", "activeDeadlineSeconds", "podFailurePolicy")})
        out.update({k: pod.get(k) for k in ("restartPolicy", "securityContext", "volumes", "nodeSelector",
                                             "tolerations", "subdomain")})
        out.update({k: c.get(k) for k in ("image", "command", "env", "resources", "volumeMounts", "securityContext",
                                           "ports")})
    elif obj["kind"] == "ConfigMap":
        out["data"] = obj["data"]
    else:
        out["spec"] = obj["spec"]
    return out


@needs_helm
@pytest.mark.parametrize("overrides", [[], MULTI, ["k8s.gpus=2", "k8s.output.existing=true",
                                                   "k8s.output.name=shared-runs", "k8s.active_deadline_seconds=3600"],
                                       SWEEP])
def test_chart_and_renderer_render_the_same_objects(overrides):
    namespace = load_config(ROOT / "configs" / "default.yaml", list(overrides)).k8s.namespace
    ours = sorted((essentials(o) for o in objects(*overrides)), key=lambda o: (o["kind"], o["name"]))
    theirs = sorted((essentials(o) for o in chart_objects(*overrides, namespace=namespace)),
                    key=lambda o: (o["kind"], o["name"]))
    assert [(o["kind"], o["name"]) for o in ours] == [(o["kind"], o["name"]) for o in theirs]
    for a, b in zip(ours, theirs):
        assert a == b, a["kind"]


def test_dockerfile_is_pinned_non_root_and_runs_the_engine():
    text = (ROOT / "k8s" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    bases = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases)
    for line in lines:
        if line.upper().startswith("COPY ") and "--from" not in line:
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source
    user = [ln for ln in lines if ln.upper().startswith("USER ")][-1].split()[1]
    assert user not in ("root", "0") and not user.startswith("0:")
    assert 'ENTRYPOINT ["python", "-m", "engine.run"]' in lines
    assert any("requirements.lock" in ln and "pip install" in ln for ln in lines)
    proc = subprocess.run([sys.executable, "-m", "engine.run", "--help"], cwd=ROOT, capture_output=True, **TEXT)
    assert proc.returncode == 0 and "Sections and keys" in proc.stdout
