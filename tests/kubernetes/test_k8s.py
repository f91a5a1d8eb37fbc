import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from engine.config.loading import load_config
from engine.utils.errors import CT3DError
from forked import forked_run
from helpers import ENV, ROOT, TEXT
from k8s.render import render, render_objects
from k8s.values import helm_values

KUBE_VERSIONS = ("1.30.0", "1.33.0")
QUEUE = "kueue.x-k8s.io/queue-name"
MULTI = ["k8s.nodes=4", "k8s.gpus=8", "k8s.name=ctrate-r18", "k8s.namespace=ml",
         "k8s.node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}",
         "k8s.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoExecute, tolerationSeconds: 300}]",
         "k8s.data_claim=ctrate", "k8s.queue=team-a", "k8s.priority_class=high", "k8s.service_account=trainer",
         "k8s.image_pull_secrets=[registry]", "k8s.labels={team: imaging}", "k8s.annotations={owner: ml}",
         "k8s.env={NCCL_IB_DISABLE: '1'}", "k8s.cache_pods=4",
         "k8s.affinity={nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: "
         "[{matchExpressions: [{key: zone, operator: In, values: [a]}]}]}}}"]


def helm_binary() -> str | None:
    for candidate in (os.environ.get("CT3D_HELM"), str(ROOT / ".tools" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


HELM = helm_binary()
needs_helm = pytest.mark.skipif(HELM is None and not os.environ.get("CI"), reason="helm not installed: make tools")


def objects(*overrides: str, config=ROOT / "configs" / "default.yaml") -> list[dict]:
    return render_objects(load_config(config, list(overrides)))


def validate(text: str, version: str = KUBE_VERSIONS[0]) -> subprocess.CompletedProcess:
    """kubernetes-validate --strict on the stream's built-in kinds (the CRDs load into their SDKs' models instead,
    and a JobSet's Job template is validated as a Job: core_parts)."""
    docs = [d for doc in yaml.safe_load_all(text) if doc for d in core_parts(doc)]
    tool = Path(sys.executable).with_name("kubernetes-validate")
    return subprocess.run([str(tool), "--strict", "-k", version, "-"], input=yaml.safe_dump_all(docs),
                          capture_output=True, **TEXT)


SWEEP = ["k8s.sweep_workers=3", "sweep.space={train.lr: {type: log, low: 0.0001, high: 0.01}}"]
PYTORCHJOB = [*MULTI, "k8s.kind=pytorchjob"]
JOBSET = [*MULTI, "k8s.kind=jobset", "k8s.extra_resources={vpc.amazonaws.com/efa: 4}", "k8s.runtime_class=nvidia"]
TRAINJOB = [*[o for o in MULTI if not o.startswith("k8s.priority_class")], "k8s.kind=trainjob"]
CRDS = ("PyTorchJob", "JobSet", "TrainJob", "ClusterTrainingRuntime")
# a frozen encoder's probe on unaugmented volumes (demo-sized: no preprocessing check), with an embed stage of 3 pods
EMBED = ["model.name=merlin", "model.freeze=true", "model.preprocess_check=false", "augment.enabled=false",
         "k8s.embed_pods=3"]


def core_parts(obj: dict) -> list[dict]:
    """The built-in objects in `obj` for the strict schemas: itself, the Job templates of a JobSet or of a
    ClusterTrainingRuntime's JobSet as batch/v1 Jobs, a PyTorchJob's pod templates as PodTemplates (a TrainJob's
    parts are the runtime's to assemble: its SDK model checks them)."""
    if obj["kind"] == "PyTorchJob":
        return [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{obj['metadata']['name']}-{r}"},
                 "template": spec["template"]} for r, spec in obj["spec"]["pytorchReplicaSpecs"].items()]
    if obj["kind"] in ("JobSet", "ClusterTrainingRuntime"):
        jobset = obj["spec"] if obj["kind"] == "JobSet" else obj["spec"]["template"]["spec"]
        return [{"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": obj["metadata"]["name"],
                                                                         **rj["template"].get("metadata", {})},
                 "spec": rj["template"]["spec"]} for rj in jobset["replicatedJobs"]]
    return [] if obj["kind"] in CRDS else [obj]


def load_crd(obj: dict):
    """A PyTorchJob, JobSet, TrainJob or ClusterTrainingRuntime as its SDK's model (kubeflow-training;
    kubeflow-trainer-api for the others), checked to round-trip whole: nothing the model does not know is dropped."""
    if obj["kind"] == "PyTorchJob":
        return load_pytorchjob(obj)
    from kubeflow_trainer_api.models import (
        JobsetV1alpha2JobSet,
        TrainerV1alpha1ClusterTrainingRuntime,
        TrainerV1alpha1TrainJob,
    )

    model = {"JobSet": JobsetV1alpha2JobSet, "TrainJob": TrainerV1alpha1TrainJob,
             "ClusterTrainingRuntime": TrainerV1alpha1ClusterTrainingRuntime}[obj["kind"]]
    loaded = model.from_dict(obj)

    def without_default_protocol(node):  # the model fills a port's protocol with its default, TCP
        if isinstance(node, dict):
            return {k: without_default_protocol(v) for k, v in node.items()
                    if not (k == "protocol" and v == "TCP")}
        return [without_default_protocol(v) for v in node] if isinstance(node, list) else node

    assert without_default_protocol(loaded.to_dict()) == obj
    return loaded


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("overrides", [[], MULTI, ["k8s.gpus=4"], ["k8s.gpus=0", "k8s.cache.existing=true"], SWEEP,
                                       PYTORCHJOB, [*MULTI, *EMBED], [*EMBED, "k8s.gpus=0"]])
def test_rendered_manifests_pass_strict_schema(overrides, version):
    proc = validate(render(load_config(ROOT / "configs" / "default.yaml", overrides)), version)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ERROR" not in proc.stdout + proc.stderr


def pods_of(objs: list[dict]) -> list[dict]:
    pods = [o["spec"]["template"]["spec"] for o in objs if o["kind"] == "Job"]
    return pods + [r["template"]["spec"] for o in objs if o["kind"] == "PyTorchJob"
                   for r in o["spec"]["pytorchReplicaSpecs"].values()]


def assert_restricted(pod: dict) -> None:
    """The restricted Pod Security Standard, as far as our pods could break it."""
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(key), key
    for container in pod["containers"] + pod.get("initContainers", []):
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged")
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert sc["runAsNonRoot"] is True and sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert not any(port.get("hostPort") for port in container.get("ports", [])), container["name"]
    assert not any("hostPath" in v for v in pod["volumes"])


def test_sweep_renders_an_indexed_job_of_workers_in_place_of_training():
    objs = objects(*SWEEP)
    assert [o["kind"] for o in objs] == ["PersistentVolumeClaim", "PersistentVolumeClaim", "ConfigMap", "Job", "Job"]
    job = objs[-1]
    assert job["metadata"]["name"] == "ct3d-train-sweep"
    assert (job["spec"]["completionMode"], job["spec"]["completions"], job["spec"]["parallelism"]) == ("Indexed", 3, 3)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-3:] == ["--config", "/etc/ct3d/config.yaml", "sweep.workers=1"]
    named = [r["onExitCodes"]["containerName"] for r in job["spec"]["podFailurePolicy"]["rules"][1:]]
    assert named == ["check", container["name"]]
    with pytest.raises(CT3DError, match="sweep.space: empty"):
        objects("k8s.sweep_workers=2")
    with pytest.raises(CT3DError, match="k8s.sweep_workers: each sweep worker"):
        objects(*SWEEP, "k8s.gpus=2")


@pytest.mark.parametrize("overrides", [[], MULTI, SWEEP, PYTORCHJOB, [*MULTI, *EMBED]])
def test_every_container_meets_restricted_pod_security(overrides):
    for pod in pods_of(objects(*overrides)):
        assert_restricted(pod)


@pytest.mark.parametrize("mutation", [
    lambda pod: pod.update(hostNetwork=True),
    lambda pod: pod["containers"][0]["securityContext"].update(privileged=True),
    lambda pod: pod["containers"][0].setdefault("ports", []).append({"containerPort": 80, "hostPort": 80}),
    lambda pod: pod["initContainers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
])
def test_pod_security_check_rejects_host_network_privileged_and_host_ports(mutation):
    pod = pods_of(objects(*MULTI))[-1]
    assert_restricted(pod)
    mutation(pod)
    with pytest.raises(AssertionError):
        assert_restricted(pod)


def test_single_node_job_checks_first_and_fails_at_once_on_a_user_error():
    objs = objects()
    assert [o["kind"] for o in objs] == ["PersistentVolumeClaim", "PersistentVolumeClaim", "ConfigMap", "Job", "Job"]
    job = objs[-1]
    assert "completionMode" not in job["spec"] and job["spec"]["backoffLimit"] == 3
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"][:3] == ["python", "-m", "engine.run"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    rules = job["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    names = {c["name"] for c in pod["containers"] + pod["initContainers"]}
    assert {r["onExitCodes"]["containerName"] for r in rules[1:]} == names == {"check", "train"}
    assert pod["initContainers"][0]["command"][3:5] == ["check", "--quick"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/etc/ct3d": "config", "/cache": "cache", "/output": "output", "/dev/shm": "shm"}
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert pod["terminationGracePeriodSeconds"] >= 120  # the interruption checkpoint's time
    assert job["metadata"]["labels"]["app.kubernetes.io/name"] == "ct3d"
    assert set(job["metadata"]["labels"]) >= {f"app.kubernetes.io/{k}" for k in
                                              ("name", "instance", "version", "component", "managed-by")}


def test_four_nodes_meet_at_pod_0_with_c10d_and_a_replaced_pod_rejoins():
    objs = objects(*MULTI)
    kinds = [o["kind"] for o in objs]
    assert kinds == ["PersistentVolumeClaim", "PersistentVolumeClaim", "ConfigMap", "Job", "Service", "Job"]
    service, job = objs[4], objs[5]
    assert service["spec"]["clusterIP"] == "None" and service["metadata"]["name"] == "ctrate-r18"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimitPerIndex"] == 3 and spec["maxFailedIndexes"] == 0 and "backoffLimit" not in spec
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == "ctrate-r18"
    shell, flag, line = pod["containers"][0]["command"]
    command = line.split()
    assert (shell, flag) == ("sh", "-c")
    assert command[:6] == ["exec", "python", "-m", "engine.launch", "--nnodes=4", "--nproc-per-node=8"]
    assert {"--rdzv-backend=c10d", "--rdzv-endpoint=ctrate-r18-0.ctrate-r18.ml.svc:29500", "--rdzv-id=ctrate-r18",
            "--max-restarts=3", "--shutdown-timeout=270"} <= set(command)  # 300 s of grace, less 30
    assert not any(a.startswith(("--node-rank", "--master-addr")) for a in command)  # static rendezvous: gone
    for index, hosts in (("0", "1"), ("3", "0")):  # pod 0 hosts the rendezvous store, by its index not by DNS
        shown = subprocess.run(["sh", "-c", line.replace("exec python -m engine.launch", "echo")],
                               env={"JOB_COMPLETION_INDEX": index}, capture_output=True, **TEXT).stdout
        # the store's connection waits as long as the join: a pod up before pod 0 waits for it
        assert f"--rdzv-conf=is_host={hosts},join_timeout=1800,read_timeout=1800" in shown.split()
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["NCCL_IB_DISABLE"]["value"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["tolerationSeconds"] == 300  # a number, as the API wants
    assert pod["priorityClassName"] == "high" and pod["serviceAccountName"] == "trainer"
    assert pod["imagePullSecrets"] == [{"name": "registry"}]
    assert pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["metadata"]["annotations"] == {"owner": "ml"} == job["spec"]["template"]["metadata"]["annotations"]
    assert all(o["metadata"]["labels"]["team"] == "imaging" for o in objs)
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "ctrate" for v in pod["volumes"])


def test_resources_scale_with_the_gpus_and_shm_counts_against_memory():
    def resources(*overrides):
        pod = pods_of(objects(*overrides))[-1]
        shm = next(v for v in pod["volumes"] if v["name"] == "shm")["emptyDir"]["sizeLimit"]
        return pod["containers"][0]["resources"]["limits"], shm

    limits, shm = resources("k8s.gpus=4")
    assert (limits["cpu"], limits["memory"], limits["nvidia.com/gpu"], shm) == ("24", "104Gi", 4, "16Gi")
    limits, shm = resources("k8s.gpus=1")  # fits an 8 vCPU / 32 GiB node (g5.2xlarge: ~7.9 CPU, ~29 GiB allocatable)
    assert (limits["cpu"], limits["memory"], shm) == ("6", "26Gi", "4Gi")
    limits, shm = resources("k8s.gpus=2", "k8s.cpu=12", "k8s.shm_size=512Mi")
    assert (limits["cpu"], limits["memory"], shm) == ("12", "45568Mi", "512Mi")  # 44 Gi + 512 Mi
    limits, _ = resources("k8s.gpus=8", "k8s.extra_resources={vpc.amazonaws.com/efa: 4}")
    assert limits["vpc.amazonaws.com/efa"] == 4 and limits["nvidia.com/gpu"] == 8


def test_pods_with_gpus_train_on_cuda_so_a_missing_driver_fails_loudly(tmp_path):
    def pod_device(*overrides):
        config_map = next(o for o in objects(*overrides) if o["kind"] == "ConfigMap")
        return yaml.safe_load(config_map["data"]["config.yaml"])["train"]["device"]

    assert pod_device("k8s.gpus=1") == "cuda" and pod_device("k8s.gpus=0") == "auto"
    assert pod_device("k8s.gpus=1", "train.device=cpu") == "cpu"


def test_cache_fill_job_shares_the_cache_between_its_pods():
    from engine.data.sharing import parse_shard

    objs = objects(*MULTI)
    job = next(o for o in objs if o["metadata"]["name"] == "ctrate-r18-cache")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"][3:4] == ["cache"] and "nvidia.com/gpu" not in container["resources"]["limits"]
    assert spec["podFailurePolicy"]["rules"][1]["onExitCodes"]["containerName"] == container["name"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["JOB_COMPLETIONS"] == "4"
    os_env = {"JOB_COMPLETION_INDEX": "2", "JOB_COMPLETIONS": env["JOB_COMPLETIONS"]}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in os_env.items():
            mp.setenv(k, v)
        assert parse_shard(None) == (2, 4)
    with pytest.raises(CT3DError, match="k8s.cache.access_mode: ReadWriteOnce"):
        objects("k8s.cache_pods=2", "k8s.cache.access_mode=ReadWriteOnce")


def test_storage_one_node_read_write_once_several_need_read_write_many_and_claims_are_kept():
    claims = {o["metadata"]["name"]: o for o in objects() if o["kind"] == "PersistentVolumeClaim"}
    assert all(c["spec"]["accessModes"] == ["ReadWriteOnce"] for c in claims.values())
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in claims.values())
    many = [o for o in objects("k8s.nodes=2") if o["kind"] == "PersistentVolumeClaim"]
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in many)
    with pytest.raises(CT3DError, match="k8s.output.access_mode: ReadWriteOnce .* 2 nodes .*ReadWriteMany"):
        objects("k8s.nodes=2", "k8s.output.access_mode=ReadWriteOnce")
    sweep = [o for o in objects(*SWEEP) if o["kind"] == "PersistentVolumeClaim"]  # 3 worker pods mount both
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in sweep)


def test_cache_claim_is_named_by_data_and_preprocessing_and_shared_across_runs():
    def cache_claim(*overrides):
        job = objects(*overrides)[-1]
        return next(v["persistentVolumeClaim"]["claimName"] for v in job["spec"]["template"]["spec"]["volumes"]
                    if v["name"] == "cache")

    first = cache_claim("k8s.name=run-a")
    assert first.startswith("ct3d-cache-") and first == cache_claim("k8s.name=run-b", "train.lr=0.1")
    assert first != cache_claim("k8s.name=run-a", "preprocess.spatial_size=[96,96,96]")
    assert first != cache_claim("k8s.name=run-a", "data.demo.num_volumes=50")
    # a claim's access mode and class cannot change: a several-node run gets a claim of its own
    assert first != cache_claim("k8s.name=run-a", "k8s.nodes=2") != cache_claim("k8s.nodes=2", "k8s.storage_class=efs")


def test_environment_references_resolve_as_in_the_pod_not_on_this_machine(monkeypatch):
    from k8s.settings import load_pod_config

    monkeypatch.setenv("CTRATE_DIR", "/home/me/ct-rate")
    config = ROOT / "configs" / "ct-rate.yaml"
    text = render(load_pod_config(config, ["k8s.data_claim=ctrate"]))
    assert "/home/me" not in text
    config_map = next(o for o in yaml.safe_load_all(text) if o["kind"] == "ConfigMap")
    pod_cfg = yaml.safe_load(config_map["data"]["config.yaml"])
    assert pod_cfg["data"]["image_root"] == "/data/ct-rate/dataset"
    with pytest.raises(CT3DError, match="k8s.data_claim"):
        render(load_pod_config(config, []))
    with pytest.raises(CT3DError, match="data.train: '/elsewhere/train.csv' is not under /data"):
        render(load_pod_config(config, ["k8s.data_claim=ctrate", "data.train=/elsewhere/train.csv"]))


def test_extra_env_holds_no_secrets_and_keeps_ct3d_settings():
    with pytest.raises(CT3DError, match="k8s.env.HF_TOKEN: looks like a secret"):
        objects("k8s.env={HF_TOKEN: abc}")
    with pytest.raises(CT3DError, match="k8s.env.WANDB_DIR"):
        objects("k8s.env={WANDB_DIR: /tmp}")


def load_pytorchjob(job: dict):
    """The object as the kubeflow-training SDK's model, checked to round-trip whole (nothing unknown dropped)."""
    from kubeflow.training import models
    from kubeflow.training.api_client import ApiClient

    class Response:  # ApiClient.deserialize reads a response's .data
        data = json.dumps(job)

    client = ApiClient()
    client.client_side_validation = True
    loaded = client.deserialize(Response(), models.KubeflowOrgV1PyTorchJob)
    assert client.sanitize_for_serialization(loaded) == quantities_as_text(job)  # nothing dropped as unknown
    return loaded


def quantities_as_text(node):
    """`node` with every count under requests/limits as a string, as a model's Quantity holds it."""
    if isinstance(node, dict):
        return {k: ({n: str(v) for n, v in v.items()} if k in ("requests", "limits") else quantities_as_text(v))
                for k, v in node.items()}
    return [quantities_as_text(v) for v in node] if isinstance(node, list) else node


def test_pytorchjob_loads_into_the_kubeflow_training_sdk_models():
    job = next(o for o in objects(*PYTORCHJOB) if o["kind"] == "PyTorchJob")
    loaded = load_pytorchjob(job)
    assert loaded.spec.elastic_policy.rdzv_backend == "c10d" and loaded.spec.elastic_policy.max_replicas == 4
    worker = loaded.spec.pytorch_replica_specs["Worker"]
    assert worker.replicas == 4 and worker.restart_policy == "ExitCode"  # 1-127 permanent: exits 2 and 3 end it
    assert worker.template.spec.restart_policy == "Never"  # what the operator sets for ExitCode anyway
    assert loaded.spec.run_policy.clean_pod_policy == "Running"  # a failed job leaves no pod holding GPUs
    assert worker.template.spec.containers[0].name == "pytorch"
    assert not worker.template.spec.init_containers  # the operator reads the exit code of `pytorch` only
    line = worker.template.spec.containers[0].command[2]
    assert line.startswith("python -m engine.run check --quick") and "&& exec python -m engine.launch " in line
    assert {"--max-restarts=3", "--shutdown-timeout=270"} <= set(line.split())
    # Kueue by its label alone (schedulingPolicy.queue is the gang scheduler's); nprocPerNode at spec level
    assert loaded.spec.run_policy.scheduling_policy is None and job["metadata"]["labels"][QUEUE] == "team-a"
    assert loaded.spec.nproc_per_node == "8" and loaded.spec.elastic_policy.n_proc_per_node is None
    assert {(c.key, c.value) for c in loaded.spec.elastic_policy.rdzv_conf} == {("join_timeout", "1800"),
                                                                             ("read_timeout", "1800")}


def test_script_applies_claims_then_waits_for_the_cache_then_trains():
    proc = subprocess.run([sys.executable, "-m", "k8s", "script", "k8s.name=run-1"], cwd=ROOT, capture_output=True,
                          **TEXT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    applies = [i for i, line in enumerate(lines) if line.startswith("kubectl apply")]
    wait = next(i for i, line in enumerate(lines) if line.startswith("until state="))
    assert "*Failed*" in lines[wait] and "exit 1" in lines[wait]  # a failed cache fill stops the script
    assert len(applies) == 3 and applies[1] < wait < applies[2] and "job/run-1-cache" in lines[wait]
    body = "\n".join(lines[applies[2]:])
    assert "kind: Job" in body and "name: run-1-cache" not in body


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


def chart_objects(cfg) -> list[dict]:
    """`helm template` of charts/ct3d with the values `python -m k8s values` writes for `cfg`."""
    proc = helm("template", cfg.k8s.name, "charts/ct3d", "--namespace", cfg.k8s.namespace, "-f", "-",
                values=helm_values(cfg))
    assert proc.returncode == 0, proc.stderr
    return [o for o in yaml.safe_load_all(proc.stdout) if o]


@needs_helm
def test_chart_lints_strict_and_renders_valid_manifests():
    proc = helm("lint", "--strict", "charts/ct3d")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for sets in ([], ["--set", "nodes=4", "--set", "gpus=8"], ["--set", "kind=pytorchjob", "--set", "nodes=2"],
                 ["--set", "kind=trainjob", "--set", "nodes=2"]):
        proc = helm("template", "ct3d-train", "charts/ct3d", *sets)
        assert proc.returncode == 0, proc.stderr
        for version in KUBE_VERSIONS:
            result = validate(proc.stdout, version)
            assert result.returncode == 0, result.stdout + result.stderr
        for pod in pods_of([o for o in yaml.safe_load_all(proc.stdout) if o]):
            assert_restricted(pod)


@needs_helm
def test_chart_schema_rejects_typos_and_wrong_types():
    for bad in ("nodse=4", "nodes=0", "gpus=two", "cache.size=big", "kind=mpijob", "cache.accessMode=RWX",
                "embedPod=2", "embedPods=-1", "embedMemory=lots"):
        proc = helm("template", "x", "charts/ct3d", "--set", bad)
        assert proc.returncode != 0, bad
    proc = helm("template", "x", "charts/ct3d", "--set", "nodes=2", "--set", "output.accessMode=ReadWriteOnce")
    assert proc.returncode != 0 and "ReadWriteMany" in proc.stderr
    for name in ("HF_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "CT3D_CACHE", "NODE_NAME",
                 "CT3D_MAX_ATTEMPTS"):  # as the renderer refuses
        assert helm("template", "x", "charts/ct3d", "--set-string", f"env.{name}=v").returncode != 0, name


HELM_ONLY_LABELS = ("app.kubernetes.io/managed-by", "helm.sh/chart")  # who rendered it: the one allowed difference


def comparable(objs: list[dict]) -> list[dict]:
    """Whole objects, sorted, without the labels that name the tool that rendered them."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()
                    if not (k in HELM_ONLY_LABELS and isinstance(v, str))}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return sorted((strip(o) for o in objs), key=lambda o: (o["kind"], o["metadata"]["name"]))


def same_objects(ours: list[dict], theirs: list[dict]) -> bool:
    return comparable(ours) == comparable(theirs)


# Not the words a key=value override reads as booleans; y and n stay (Helm's YAML reads those so: the values
# writer must quote them).
DNS = st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True).filter(lambda v: v not in ("on", "off", "yes", "no",
                                                                                    "true", "false", "null"))


@st.composite
def settings(draw) -> list[str]:
    """A k8s section (plus the data and preprocessing that name the cache claim) as overrides."""
    sweep = draw(st.booleans()) and draw(st.integers(0, 3)) == 0
    nodes = 1 if sweep else draw(st.integers(1, 4))
    gpus = draw(st.integers(0, 1)) if sweep else draw(st.integers(0, 8))
    kind = draw(st.sampled_from(["job", "jobset", "trainjob", "pytorchjob"]))
    other_runtime = kind == "trainjob" and draw(st.booleans())  # not ct3d's: it sets no priority or runtime class
    out = [f"k8s.nodes={nodes}", f"k8s.gpus={gpus}", f"k8s.name={draw(DNS)}-run", f"k8s.namespace={draw(DNS)}",
           f"k8s.kind={kind}",
           f"k8s.image_pull_policy={draw(st.sampled_from(['IfNotPresent', 'Always']))}",
           f"data.demo.num_volumes={draw(st.integers(20, 400))}", f"k8s.max_restarts={draw(st.integers(0, 5))}",
           f"k8s.backoff_limit={draw(st.integers(0, 6))}",
           f"k8s.active_deadline_seconds={draw(st.integers(0, 2)) * 3600}",
           f"k8s.termination_grace_seconds={draw(st.integers(30, 900))}", f"cache.disk={draw(st.booleans())}",
           f"cache.workers={draw(st.integers(1, 8))}", f"k8s.run_as_user={draw(st.integers(1, 65000))}",
           f"k8s.master_port={draw(st.integers(1024, 65535))}"]
    if sweep:
        out += [f"k8s.sweep_workers={draw(st.integers(1, 4))}", *SWEEP[1:]]
    if nodes > 1 or draw(st.booleans()):
        out.append(f"k8s.cache_pods={draw(st.integers(1, 4))}")
    optional = {
        "k8s.queue": DNS, "k8s.service_account": DNS, "k8s.data_claim": DNS,
        **({} if other_runtime else {"k8s.priority_class": DNS, "k8s.runtime_class": DNS}),
        "k8s.extra_resources": st.sampled_from(["{vpc.amazonaws.com/efa: 4}", "{rdma/ib: 1, example.com/x: 2}"]),
        "k8s.cache_node_selector": st.dictionaries(DNS, DNS, min_size=1, max_size=2).map(_flow),
        "k8s.cache_tolerations": st.just("[{key: cpu-pool, operator: Exists, effect: NoSchedule}]"),
        "k8s.cache_queue": DNS,
        "k8s.storage_class": DNS, "k8s.cpu": st.sampled_from(["4", "500m", "12"]),
        "k8s.memory": st.sampled_from(["16Gi", "100G"]), "k8s.shm_size": st.sampled_from(["1Gi", "512Mi"]),
        "k8s.image_pull_secrets": st.lists(DNS, min_size=1, max_size=2).map(lambda v: f"[{', '.join(v)}]"),
        "k8s.labels": st.dictionaries(DNS, DNS, min_size=1, max_size=2).map(_flow),
        "k8s.annotations": st.dictionaries(DNS, DNS, min_size=1, max_size=2).map(_flow),
        "k8s.env": st.dictionaries(st.from_regex(r"NCCL_[A-Z]{1,8}", fullmatch=True),
                                   st.sampled_from(["0", "1", "eth0"]), min_size=1, max_size=3).map(_flow),
        "k8s.node_selector": st.dictionaries(DNS, DNS, min_size=1, max_size=2).map(_flow),
        "k8s.tolerations": st.sampled_from([
            "[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
            "[{key: spot, operator: Equal, value: 'true', effect: NoExecute, tolerationSeconds: 60}]"]),
        "k8s.affinity": st.just(MULTI[-1].split("=", 1)[1]),
        "k8s.cache.existing": st.booleans(), "k8s.output.existing": st.booleans(), "k8s.output.name": DNS,
        "k8s.cache.size": st.sampled_from(["1Ti", "200Gi"]),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            out.append(f"{key}={draw(strategy)}")
    if other_runtime:
        out.append(f"k8s.trainjob_runtime={draw(DNS)}")
    if draw(st.booleans()):  # a frozen encoder's probe, with an embed stage
        out += [f"model.name={draw(st.sampled_from(['merlin', 'ctfm']))}", *EMBED[1:-1],
                f"k8s.embed_pods={draw(st.integers(1, 4))}"]
    return out


def _flow(mapping: dict) -> str:
    return "{" + ", ".join(f"{k}: '{v}'" for k, v in mapping.items()) + "}"


@needs_helm
@given(overrides=settings())
@hypothesis_settings(max_examples=30, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_chart_and_renderer_render_the_same_objects(overrides):
    """Whole objects equal, and the chart's pass the strict schemas (1.30, 1.33) or, for the CRDs, load into
    their SDKs' models (a JobSet's Job template passes the schemas too)."""
    import kubernetes_validate

    cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
    ours, theirs = render_objects(cfg), chart_objects(cfg)
    assert comparable(ours) == comparable(theirs)
    for obj in theirs:
        if obj["kind"] in CRDS:
            load_crd(obj)
        for part in core_parts(obj):
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(part, version, strict=True)


PARITY_CASES = [[], MULTI, PYTORCHJOB, JOBSET, TRAINJOB, SWEEP,
                ["k8s.gpus=2", "k8s.output.existing=true", "k8s.output.name=runs"],
                [*TRAINJOB, "k8s.priority_class=high", "k8s.runtime_class=nvidia", "k8s.max_restarts=7"],
                [*TRAINJOB, "k8s.trainjob_runtime=torch-distributed"], [*PYTORCHJOB, "k8s.gpus=0"],
                [*MULTI, *EMBED, "k8s.extra_resources={rdma/ib: 1}", "k8s.runtime_class=nvidia"],
                [*EMBED, "k8s.gpus=0", "k8s.embed_pods=1", "cache.disk=false"], [*JOBSET, *EMBED, "k8s.cpu=90"],
                [*TRAINJOB, "k8s.image_pull_secrets=[n]", "k8s.service_account=y"]]  # YAML 1.1's booleans


@needs_helm
@pytest.mark.parametrize("overrides", PARITY_CASES)
def test_chart_output_is_the_renderers_and_passes_strict_schemas_over_the_parity_cases(overrides):
    cfg = load_config(ROOT / "configs" / "default.yaml", overrides)
    ours, theirs = render_objects(cfg), chart_objects(cfg)
    assert comparable(ours) == comparable(theirs)
    text = yaml.safe_dump_all(theirs)
    for version in KUBE_VERSIONS:
        result = validate(text, version)
        assert result.returncode == 0, result.stdout + result.stderr


def _job(objs, kind="Job"):
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["labels"]["app.kubernetes.io/component"]
                in ("training", "sweep"))


DIVERGENCES = {
    "service selector label": lambda objs: next(o for o in objs if o["kind"] == "Service")["spec"]["selector"].update(
        {"app.kubernetes.io/component": "train"}),
    "storage class ignored": lambda objs: [o["spec"].pop("storageClassName") for o in objs
                                           if o["kind"] == "PersistentVolumeClaim"],
    "container renamed away from the FailJob rule": lambda objs: _job(objs)["spec"]["template"]["spec"]["containers"][0]
    .update(name="trainer"),
    "hostNetwork added": lambda objs: _job(objs)["spec"]["template"]["spec"].update(hostNetwork=True),
    "tolerationSeconds as a string": lambda objs: _job(objs)["spec"]["template"]["spec"]["tolerations"][0].update(
        tolerationSeconds="300"),
    "env order changed": lambda objs: _job(objs)["spec"]["template"]["spec"]["containers"][0]["env"].reverse(),
    "shm no longer counted in memory": lambda objs: _job(objs)["spec"]["template"]["spec"]["containers"][0][
        "resources"]["limits"].update(memory="1536Gi"),
    "a keep annotation dropped": lambda objs: next(o for o in objs if o["kind"] == "PersistentVolumeClaim")[
        "metadata"].pop("annotations"),
    "an extra object": lambda objs: objs.append({"apiVersion": "v1", "kind": "ConfigMap",
                                                 "metadata": {"name": "extra", "labels": {}}}),
}


@needs_helm
@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
def test_parity_comparison_fails_on_any_divergence(divergence):
    """Each deliberate change to the chart's output (the issue's six and more) makes the comparison fail."""
    cfg = load_config(ROOT / "configs" / "default.yaml", [*MULTI, "k8s.storage_class=efs-sc"])
    ours, theirs = render_objects(cfg), chart_objects(cfg)
    assert same_objects(ours, theirs)
    DIVERGENCES[divergence](theirs)
    assert not same_objects(ours, theirs)


def test_a_run_config_renders_again_with_its_secret_name(tmp_path):
    """The saved config keeps k8s.wandb_secret (a Secret's name, not a secret) so it renders the same run."""
    from engine.config.loading import to_yaml

    cfg = load_config(ROOT / "configs" / "default.yaml", ["k8s.wandb_secret=team-wandb", "k8s.name=again"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert render(load_config(tmp_path / "config.yaml")) == render(cfg)


def test_dockerfile_is_pinned_non_root_and_runs_the_engine():
    text = (ROOT / "k8s" / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    bases = [ln.split()[1] for ln in lines if ln.upper().startswith("FROM ")]
    assert bases and all(":" in b and not b.endswith(":latest") for b in bases)
    copies = [ln.split() for ln in lines if ln.upper().startswith("COPY ")]
    for words in copies:
        assert "--chown=1000:1000" in words, words  # files owned by the pods' user, no chown -R layer
        for source in [w for w in words[1:-1] if not w.startswith("--")]:
            assert (ROOT / source).exists(), source
            assert not docker_ignored(source), source
    for path in (".venv", "tests", ".git", "runs", ".ct3d", ".tools", "engine/__pycache__/x.pyc",
                 "bench/__pycache__/x.pyc"):  # bench/ itself ships: the bench Job runs `python -m bench gpu`
        assert docker_ignored(path), path
    user = [ln for ln in lines if ln.upper().startswith("USER ")][-1].split()[1]
    assert user not in ("root", "0") and not user.startswith("0:")
    assert 'ENTRYPOINT ["python", "-m", "engine.run"]' in lines
    assert any("pip install -r /app/requirements.lock" in ln for ln in lines)
    assert "/usr/local/nvidia/lib64" in text  # GKE's managed driver libraries
    runtime = {ln.split("==")[0] for ln in (ROOT / "requirements.lock").read_text().splitlines() if "==" in ln}
    assert not runtime & {"pytest", "hypothesis", "ruff", "kubernetes-validate", "kubeflow-training"}
    proc = subprocess.run([sys.executable, "-m", "engine.run", "--help"], cwd=ROOT, capture_output=True, **TEXT)
    assert proc.returncode == 0 and "each with its meaning" in proc.stdout


def docker_ignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` out of the build context (the last matching pattern decides;
    a pattern also matches everything under a matched folder)."""
    import fnmatch

    ignored = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        hit = any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes)
        if hit:
            ignored = not negate
    return ignored


# ------------------------------------------------------------------ the rendered command, run here
def local_pod(job: dict, config_map: dict, tmp_path: Path, index: int, port: int) -> tuple[list[str], dict]:
    """The training container's command and env from the manifest, as pod `index` runs them, on this machine:
    the claims are folders under tmp_path, the Service's name for pod 0 is 127.0.0.1, python is this Python."""
    mounts = {"/cache": str(tmp_path / "cache"), "/output": str(tmp_path / "output")}
    config = tmp_path / "config.yaml"
    if not config.exists():
        text = config_map["data"]["config.yaml"]
        for pod_path, here in mounts.items():
            text = text.replace(f": {pod_path}", f": {here}")
        config.write_text(text)
    container = job["spec"]["template"]["spec"]["containers"][0]
    if container["command"][0] == "sh":
        shell, flag, line = container["command"]
        endpoint = next(w for w in line.split() if w.startswith("--rdzv-endpoint="))
        line = (line.replace("exec python ", f"exec {sys.executable} ")
                .replace(endpoint, f"--rdzv-endpoint=127.0.0.1:{port}").replace("/etc/ct3d/config.yaml", str(config)))
        command = [shell, flag, line]
    else:
        command = [sys.executable if a == "python" else str(config) if a == "/etc/ct3d/config.yaml" else a
                   for a in container["command"]]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = mounts.get(item["value"], item["value"])
        elif "job-completion-index" in item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", ""):
            env[item["name"]] = str(index)
    return command, env


def test_a_config_error_in_a_pod_exits_2_from_the_container_the_fail_job_rule_names(tmp_path):
    objs = objects("k8s.gpus=0")
    job, config_map = objs[-1], next(o for o in objs if o["kind"] == "ConfigMap")
    pod = job["spec"]["template"]["spec"]
    named = {r["onExitCodes"]["containerName"] for r in job["spec"]["podFailurePolicy"]["rules"][1:]
             if r["action"] == "FailJob" and 2 in r["onExitCodes"]["values"]}
    config = tmp_path / "config.yaml"
    config.write_text(config_map["data"]["config.yaml"].replace("  epochs: ", "  epohcs: "))  # a typo in the pod
    for container in (pod["initContainers"][0], pod["containers"][0]):
        assert container["name"] in named
        command = [sys.executable if a == "python" else str(config) if a == "/etc/ct3d/config.yaml" else a
                   for a in container["command"]]
        proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, **TEXT, timeout=120)
        assert proc.returncode == 2 and "train.epohcs" in proc.stderr, (container["name"], proc.stderr[-2000:])


# ------------------------------------------------------------------ JobSet and TrainJob
def test_jobset_restarts_the_gang_fails_at_once_on_exit_2_and_runs_the_jobs_pod():
    """A JobSet of one replicated Job: DNS hostnames, Kueue's label, a failure policy that fails on a user error
    and restarts every pod otherwise (k8s.max_restarts times), torchrun restarting nothing itself, and the
    Indexed Job's pod template otherwise."""
    objs = objects(*JOBSET)
    assert [o["kind"] for o in objs] == ["PersistentVolumeClaim", "PersistentVolumeClaim", "ConfigMap", "Job",
                                         "JobSet"]  # no Service of ours: the JobSet makes its headless one
    job_set = objs[-1]
    loaded = load_crd(job_set)
    assert job_set["metadata"]["labels"][QUEUE] == "team-a"
    assert loaded.spec.network.enable_dns_hostnames and loaded.spec.failure_policy.max_restarts == 3
    rules = job_set["spec"]["failurePolicy"]["rules"]
    assert rules == [{"name": "userError", "action": "FailJobSet", "onJobFailureReasons": ["PodFailurePolicy"]},
                     {"name": "deadline", "action": "FailJobSet", "onJobFailureReasons": ["DeadlineExceeded"]}]
    job = job_set["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert (job["completionMode"], job["completions"], job["parallelism"], job["backoffLimit"]) == ("Indexed", 4, 4, 0)
    assert [(r["action"], r["onExitCodes"]["containerName"], r["onExitCodes"]["values"])
            for r in job["podFailurePolicy"]["rules"]] == [("FailJob", "check", [2, 3]), ("FailJob", "train", [2, 3])]
    pod = job["template"]["spec"]
    line = pod["containers"][0]["command"][2]
    assert "--rdzv-endpoint=ctrate-r18-workers-0-0.ctrate-r18:29500" in line.split()
    assert {"--max-restarts=0", "--shutdown-timeout=270"} <= set(line.split())  # the JobSet restarts the gang
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["containers"][0]["resources"]["limits"]["vpc.amazonaws.com/efa"] == 4
    indexed = next(o for o in objects(*MULTI, "k8s.extra_resources={vpc.amazonaws.com/efa: 4}",
                                      "k8s.runtime_class=nvidia") if o["kind"] == "Job" and o["metadata"]["name"] ==
                   "ctrate-r18")["spec"]["template"]
    same = lambda p: {**p, "subdomain": None, "containers": [{**c, "command": None} for c in p["containers"]]}  # noqa
    assert same(job["template"]["spec"]) == same(indexed["spec"]) and job["template"]["metadata"] == indexed["metadata"]


def test_trainjob_runs_our_image_and_command_on_the_runtime_with_our_claims_and_placement():
    objs = objects(*TRAINJOB)
    train_job = objs[-1]
    loaded = load_crd(train_job)
    assert train_job["metadata"]["labels"][QUEUE] == "team-a"
    assert (loaded.spec.runtime_ref.name, loaded.spec.runtime_ref.kind) == ("ct3d.ml.ctrate-r18",
                                                                             "ClusterTrainingRuntime")
    trainer = train_job["spec"]["trainer"]
    assert (trainer["numNodes"], trainer["numProcPerNode"], trainer["image"]) == (4, 8, "ghcr.io/ct3d/ct3d:0.1.0")
    line = trainer["command"][2]
    assert line.startswith("python -m engine.run check --quick") and "&& exec python -m engine.launch " in line
    assert {"--max-restarts=0", "--rdzv-conf=timeout=1800"} <= set(line.split())
    indexed = pods_of(objects(*MULTI))[-1]
    assert trainer["resourcesPerNode"] == indexed["containers"][0]["resources"]
    patch = train_job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = patch["template"]["spec"]["template"]["spec"]
    assert patch["name"] == "node" and pod["containers"][0]["name"] == "node"
    assert pod["volumes"] == indexed["volumes"] and pod["containers"][0]["volumeMounts"] == \
        indexed["containers"][0]["volumeMounts"]
    for key in ("securityContext", "tolerations", "nodeSelector", "affinity", "serviceAccountName"):
        assert pod[key] == indexed[key], key
    with pytest.raises(CT3DError, match="k8s.priority_class: a TrainJob cannot set it"):
        objects(*TRAINJOB, "k8s.priority_class=high", "k8s.trainjob_runtime=torch-distributed")


def test_trainjob_runs_on_ct3ds_runtime_a_gang_restarted_max_restarts_times_that_a_user_error_ends():
    """The TrainJob names ct3d's ClusterTrainingRuntime, rendered before it (the Trainer refuses a TrainJob whose
    runtime does not exist): the JobSet policy of kind jobset (maxRestarts = k8s.max_restarts, a Job failed by its
    podFailurePolicy fails the set), its `node` Job with backoffLimit 0 and a FailJob rule on exits 2 and 3, and
    the priority and runtime class a runtime patch cannot carry."""
    objs = objects(*TRAINJOB, "k8s.max_restarts=5", "k8s.priority_class=high", "k8s.runtime_class=nvidia")
    assert [o["kind"] for o in objs][-2:] == ["ClusterTrainingRuntime", "TrainJob"]
    runtime, train_job = objs[-2:]
    loaded = load_crd(runtime)
    assert "namespace" not in runtime["metadata"]  # cluster-scoped: the run's namespace is in its name
    assert train_job["spec"]["runtimeRef"]["name"] == runtime["metadata"]["name"] == "ct3d.ml.ctrate-r18"
    assert loaded.spec.template.spec.failure_policy.max_restarts == 5 and loaded.spec.ml_policy.torch is not None
    jobset = next(o for o in objects(*JOBSET, "k8s.max_restarts=5") if o["kind"] == "JobSet")
    assert runtime["spec"]["template"]["spec"]["failurePolicy"] == jobset["spec"]["failurePolicy"]
    replicated, = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    patched = train_job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert replicated["name"] == patched["name"] == "node"  # the Job the patch places is the runtime's
    assert replicated["template"]["metadata"]["labels"] == {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
    job = replicated["template"]["spec"]
    assert job["backoffLimit"] == 0
    assert job["podFailurePolicy"] == {"rules": [{"action": "FailJob", "onExitCodes": {
        "containerName": "node", "operator": "In", "values": [2, 3]}}]}
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"  # a podFailurePolicy needs it; JobSet's default would be OnFailure
    assert (pod["priorityClassName"], pod["runtimeClassName"]) == ("high", "nvidia")
    assert [c["name"] for c in pod["containers"]] == [patched["template"]["spec"]["template"]["spec"]["containers"][0]
                                                      ["name"]]
    for version in KUBE_VERSIONS:  # its Job template passes the strict schemas
        result = validate(yaml.safe_dump(runtime), version)
        assert result.returncode == 0, result.stdout + result.stderr


def test_trainjob_on_another_runtime_renders_none_of_ours_and_warns_that_its_policy_applies(capsys):
    objs = objects(*TRAINJOB, "k8s.trainjob_runtime=torch-distributed")
    assert "ClusterTrainingRuntime" not in [o["kind"] for o in objs]
    assert objs[-1]["spec"]["runtimeRef"]["name"] == "torch-distributed"
    warning = capsys.readouterr().err
    assert "warning: k8s.trainjob_runtime=torch-distributed" in warning
    assert "k8s.max_restarts" in warning and "exit 2" in warning
    objects(*TRAINJOB)
    assert capsys.readouterr().err == ""


def test_pytorchjob_counts_each_pods_starts_on_the_output_claim_so_its_retries_end():
    """The operator recreates a pod that exited 128-255 under the same name, without counting it: the pod's first
    step (`engine.run check`; tests/test_launch.py runs it) counts each pod's starts in a file of its own (named
    by the pod, through the downward API) in the run folder on the output claim, and ends the pod with exit 3,
    permanent, after backoff_limit + 1 of them."""
    job = next(o for o in objects(*PYTORCHJOB, "k8s.backoff_limit=4") if o["kind"] == "PyTorchJob")
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    names = [e["name"] for e in container["env"]]
    env = {e["name"]: e for e in container["env"]}
    assert env["CT3D_MAX_ATTEMPTS"]["value"] == "5"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert names.index("POD_NAME") < names.index("CT3D_ATTEMPTS_FILE")  # $(VAR) expands only an earlier variable

    def expanded(pod_name: str) -> str:  # the kubelet's $(VAR) expansion
        return re.sub(r"\$\((\w+)\)", lambda m: {"POD_NAME": pod_name}[m.group(1)], env["CT3D_ATTEMPTS_FILE"]["value"])

    first, second = expanded("ctrate-r18-worker-0"), expanded("ctrate-r18-worker-1")
    assert first != second and first.startswith("/output/ctrate-r18/") and "$(" not in first
    assert {"name": "output", "mountPath": "/output"} in container["volumeMounts"]
    assert container["command"][-1].startswith("python -m engine.run check ")  # the first step, which counts


def test_every_container_names_its_node_and_those_holding_gpus_expect_them():
    """NODE_NAME (the node a fault, exit 151, names) in every container; CT3D_EXPECT_GPU=1 exactly where the
    container holds the pod's GPUs (CUDA missing there is the node's fault, not a config error; an embed pod's one
    GPU too): never the check or the cache fill, never without GPUs."""
    def containers(objs: list[dict]) -> list[dict]:
        pods = pods_of(objs) + [rj["template"]["spec"]["template"]["spec"] for o in objs if o["kind"] == "JobSet"
                                for rj in o["spec"]["replicatedJobs"]]
        found = [c for pod in pods for c in pod.get("initContainers", []) + pod["containers"]]
        trainers = [o["spec"]["trainer"] for o in objs if o["kind"] == "TrainJob"]
        return found + [{"name": "node", "env": t["env"], "resources": t["resourcesPerNode"]} for t in trainers]

    expecting = 0
    for overrides in ([], MULTI, SWEEP, PYTORCHJOB, JOBSET, TRAINJOB, ["k8s.gpus=0"], [*PYTORCHJOB, "k8s.gpus=0"],
                      [*TRAINJOB, "k8s.gpus=0"], [*JOBSET, *EMBED], [*EMBED, "k8s.gpus=0"]):
        for c in containers(objects(*overrides)):
            env = {e["name"]: e for e in c["env"]}
            assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, c["name"]
            holds_gpus = "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
            assert ("CT3D_EXPECT_GPU" in env) == holds_gpus, (overrides, c["name"])
            if holds_gpus:
                assert env["CT3D_EXPECT_GPU"]["value"] == "1"
                expecting += 1
    assert expecting >= 8
    with pytest.raises(CT3DError, match="k8s.env.NODE_NAME: set by ct3d"):
        objects("k8s.env={NODE_NAME: here}")


# ------------------------------------------------------------------ faults and exit codes, every kind
EVICTED = "evicted"  # a pod with the DisruptionTarget condition (preemption, drain), its container exiting 143
# What each kind does with a pod that ends so (docs/kubernetes.md, "Faults and exit codes"): a batch Job's
# podFailurePolicy action (Count: against backoffLimit / backoffLimitPerIndex); a JobSet's (kind jobset, and
# trainjob on ct3d's runtime) action on the Job that pod fails; PyTorchJob's restartPolicy ExitCode.
FATES = {
    #         job         cache fill  embed      sweep       jobset           trainjob         pytorchjob
    2:       ("FailJob", "FailJob", "FailJob", "FailJob", "FailJobSet", "FailJobSet", "permanent"),
    3:       ("FailJob", "FailJob", "FailJob", "FailJob", "FailJobSet", "FailJobSet", "permanent"),
    143:     ("Count", "Count", "Count", "Count", "RestartJobSet", "RestartJobSet", "retried"),
    150:     ("Count", "Count", "Count", "Count", "RestartJobSet", "RestartJobSet", "retried"),
    151:     ("Count", "Count", "Count", "Count", "RestartJobSet", "RestartJobSet", "retried"),
    EVICTED: ("Ignore", "Ignore", "Ignore", "Ignore", "RestartJobSet", "RestartJobSet", "retried"),
}
FATE_KINDS = ("job", "cache fill", "embed", "sweep", "jobset", "trainjob", "pytorchjob")
BUDGET = ["k8s.backoff_limit=4", "k8s.max_restarts=2"]


def pod_failure_action(policy: dict, container: str, code: int, disrupted: bool) -> str:
    """Kubernetes' podFailurePolicy on a pod whose `container` exited `code`: the first rule that matches (an exit
    code of that container, or a condition the pod has) decides; none matching: Count."""
    for rule in policy["rules"]:
        on = rule.get("onExitCodes")
        if on and on.get("containerName", container) == container and \
                (code in on["values"]) == (on["operator"] == "In"):
            return rule["action"]
        if disrupted and {"type": "DisruptionTarget", "status": "True"} in rule.get("onPodConditions", []):
            return rule["action"]
    return "Count"


def jobset_action(jobset: dict, job: dict, container: str, code: int, disrupted: bool) -> str:
    """A JobSet's answer to one failed pod of `job`: the Job fails (its podFailurePolicy's FailJob: reason
    PodFailurePolicy; Count with backoffLimit 0: BackoffLimitExceeded), and the first failurePolicy rule whose
    reasons match decides (none: RestartJobSet, counted against maxRestarts)."""
    action = pod_failure_action(job["podFailurePolicy"], container, code, disrupted)
    assert action in ("FailJob", "Count") and job["backoffLimit"] == 0, action  # every failed pod fails the Job
    reason = "PodFailurePolicy" if action == "FailJob" else "BackoffLimitExceeded"
    for rule in jobset["failurePolicy"]["rules"]:
        if not rule.get("onJobFailureReasons") or reason in rule["onJobFailureReasons"]:
            return rule["action"]
    return "RestartJobSet"


def fates_of(kind: str, objs: list[dict], code: int | str) -> set[str]:
    """What `kind` (rendered as `objs`) does when one of its pods' containers (each in turn) ends with `code`, and
    a check that its retries end (the budget: BUDGET's backoff limit or restarts)."""
    exit_code, disrupted = (143, True) if code == EVICTED else (code, False)
    if kind in ("job", "cache fill", "embed", "sweep"):
        component = {"job": "training", "cache fill": "cache-fill", "embed": "embed", "sweep": "sweep"}[kind]
        job = next(o for o in objs if o["kind"] == "Job" and o["metadata"]["labels"]["app.kubernetes.io/component"]
                   == component)["spec"]
        assert job.get("backoffLimitPerIndex", job.get("backoffLimit")) == 4
        pod = job["template"]["spec"]
        return {pod_failure_action(job["podFailurePolicy"], c["name"], exit_code, disrupted)
                for c in pod.get("initContainers", []) + pod["containers"]}
    if kind in ("jobset", "trainjob"):
        jobset = next(o for o in objs if o["kind"] in ("JobSet", "ClusterTrainingRuntime"))["spec"]
        jobset = jobset["template"]["spec"] if kind == "trainjob" else jobset
        assert jobset["failurePolicy"]["maxRestarts"] == 2
        job = jobset["replicatedJobs"][0]["template"]["spec"]
        pod = job["template"]["spec"]
        return {jobset_action(jobset, job, c["name"], exit_code, disrupted)
                for c in pod.get("initContainers", []) + pod["containers"]}
    worker = next(o for o in objs if o["kind"] == "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["restartPolicy"] == "ExitCode"
    env = {e["name"]: e.get("value") for e in worker["template"]["spec"]["containers"][0]["env"]}
    assert env["CT3D_MAX_ATTEMPTS"] == "5"  # retried, until a pod's 5th start exits 3
    return {"permanent" if 1 <= exit_code <= 127 else "retried"}


def test_the_exit_code_table_is_the_engines():
    from engine.utils import EXIT_INTERRUPTED, EXIT_NODE_FAULT, EXIT_RETRIES_SPENT, EXIT_RETRYABLE, EXIT_USER_ERROR

    assert [EXIT_USER_ERROR, EXIT_RETRIES_SPENT, EXIT_INTERRUPTED, EXIT_RETRYABLE, EXIT_NODE_FAULT] == \
        [code for code in FATES if code != EVICTED]


@pytest.mark.parametrize("kind", FATE_KINDS)
def test_every_kind_fails_at_once_on_2_and_3_and_retries_the_rest_within_its_budget(kind):
    runs = {"job": MULTI, "cache fill": MULTI, "embed": [*MULTI, *EMBED], "sweep": SWEEP, "jobset": JOBSET,
            "trainjob": TRAINJOB, "pytorchjob": PYTORCHJOB}
    objs = objects(*runs[kind], *BUDGET)
    for code, fates in FATES.items():
        assert fates_of(kind, objs, code) == {fates[FATE_KINDS.index(kind)]}, (kind, code)


def test_the_fate_check_would_notice_a_rule_lost():
    """The evaluator is not vacuous: without the FailJob rules exit 2 counts, and without the JobSet's userError
    rule it restarts the gang."""
    job = next(o for o in objects(*MULTI) if o["kind"] == "Job" and o["metadata"]["name"] == "ctrate-r18")["spec"]
    assert pod_failure_action({"rules": job["podFailurePolicy"]["rules"][:1]}, "train", 2, False) == "Count"
    jobset = next(o for o in objects(*JOBSET) if o["kind"] == "JobSet")["spec"]
    inner = jobset["replicatedJobs"][0]["template"]["spec"]
    assert jobset_action(jobset, inner, "train", 2, False) == "FailJobSet"
    jobset["failurePolicy"]["rules"] = jobset["failurePolicy"]["rules"][1:]
    assert jobset_action(jobset, inner, "train", 2, False) == "RestartJobSet"


def test_names_that_a_service_or_jobset_refuses_are_refused_before_rendering():
    with pytest.raises(CT3DError, match="k8s.name: '1run' must start with a letter"):
        objects("k8s.name=1run")
    with pytest.raises(CT3DError, match="k8s.extra_resources.bad key"):
        objects("k8s.extra_resources={bad key: 1}")


def test_cache_fill_pods_take_their_own_placement_not_the_gpu_pods():
    objs = objects(*MULTI, "k8s.cache_node_selector={topology.kubernetes.io/zone: us-east-1a}",
                   "k8s.cache_queue=cpu", "k8s.runtime_class=nvidia")
    cache = next(o for o in objs if o["metadata"]["name"].endswith("-cache") and o["kind"] == "Job")
    pod = cache["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"topology.kubernetes.io/zone": "us-east-1a"}
    assert not {"tolerations", "priorityClassName", "affinity", "runtimeClassName"} & set(pod)
    assert cache["metadata"]["labels"][QUEUE] == "cpu"
    bare = next(o for o in objects(*MULTI) if o["metadata"]["name"].endswith("-cache") and o["kind"] == "Job")
    assert QUEUE not in bare["metadata"]["labels"] and "nodeSelector" not in bare["spec"]["template"]["spec"]


# ------------------------------------------------------------------ the pod's life: late pod 0, exit 2, SIGTERM
TINY_POD = ["data.demo.num_volumes=24", "data.demo.shape=[32,32,32]", "preprocess.spatial_size=[32,32,32]",
            "model.widen_factor=0.25", "loader.batch_size=2", "tracking.wandb.mode=disabled", "cache.workers=1",
            "train.threads=1", "train.device=cpu", "report.panels=false", "metrics.min_positive_patients=1"]
EARLY = "test_a_pod_up_150_s_before_pod_0_waits_for_it_then_a_replaced_pod_rejoins_and_training_resumes"


def rendered_pods(tmp_path: Path, overrides: list[str], pods: int, port: int = 0) -> list[tuple[list[str], dict]]:
    """Each pod's training command and env (local_pod), after the init container's check ran (it writes the demo)."""
    objs = objects(*overrides)
    job = next(o for o in objs if o["kind"] == "Job" and o["metadata"]["labels"]["app.kubernetes.io/component"]
               == "training")
    config_map = next(o for o in objs if o["kind"] == "ConfigMap")
    local = [local_pod(job, config_map, tmp_path, i, port) for i in range(pods)]
    init_check(job, tmp_path, local[0][1])
    return local


def init_check(job: dict, tmp_path: Path, env: dict) -> None:
    """The training pod's init container (`check --quick`, which writes the demo data), forked (tests/forked.py)
    on the local copy of the config."""
    check = job["spec"]["template"]["spec"]["initContainers"][0]["command"]
    assert check[:3] == ["python", "-m", "engine.run"]
    first = forked_run([*check[3:-1], str(tmp_path / "config.yaml")], ROOT, env, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]


def start_pod(command: list[str], env: dict) -> tuple[subprocess.Popen, list[str]]:
    import threading

    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **TEXT)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    return proc, log


@pytest.fixture(scope="module", autouse=True)
def early_pod_1(request, tmp_path_factory):
    """Pod 1 of a two-node Job, started as this module starts (only when EARLY runs), so its 150 s wait for pod 0
    overlaps the module's other tests instead of adding to the suite."""
    if not any(item.name == EARLY for item in request.session.items):
        yield None
        return
    import socket

    tmp = tmp_path_factory.mktemp("early")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pods = rendered_pods(tmp, ["k8s.nodes=2", "k8s.gpus=0", "k8s.name=early", *TINY_POD, "train.epochs=3",
                               "train.log_every=1", "train.checkpoint_minutes=0.0001", "train.deterministic=true"],
                         2, port)
    proc, log = start_pod(*pods[1])
    state = {"tmp": tmp, "pods": pods, "pod1": proc, "log1": log, "started": time.time(), "later": []}
    yield state
    for pod in [proc, *state["later"]]:
        if pod.poll() is None:
            pod.kill()


@pytest.mark.slow
def test_a_worker_exiting_2_makes_the_container_exit_2(tmp_path):
    """A config error that only torchrun meets (fewer training volumes than ranks, here 1 for 2): torchrun alone
    exits 1, which the FailJob rule on exit 2 never matches; through engine.launch the container exits 2, after
    one round of workers: torchrun's 3 restarts (the default) would have repeated the error 3 more times."""
    (command, env), = rendered_pods(tmp_path, ["k8s.nodes=1", "k8s.gpus=2", *TINY_POD, "data.demo.num_volumes=4",
                                               "data.val_fraction=0.75"], 1)
    assert command[1:4] == ["-m", "engine.launch", "--standalone"] and "--max-restarts=3" in command
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, **TEXT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = proc.stderr.count("1 training volume(s) for 2 ranks")
    assert 1 <= errors <= 2, proc.stderr[-3000:]  # each rank at most once: no restart


SLOW_SAVE = '''
import builtins, os, sys, time
_flag, _import = os.environ.get("CT3D_TEST_SLOW_SAVE"), builtins.__import__
def _patched(name, *args, **kwargs):
    module = _import(name, *args, **kwargs)
    checkpoint = sys.modules.get("engine.training.checkpoint")
    if _flag and hasattr(checkpoint, "save_checkpoint") and not getattr(checkpoint, "_slow", False):
        checkpoint._slow, save = True, checkpoint.save_checkpoint
        def slow(path, state):
            if os.path.exists(_flag):
                time.sleep(45)  # a checkpoint of a large model to a network disk
            return save(path, state)
        checkpoint.save_checkpoint = slow
    return module
builtins.__import__ = _patched
'''


@pytest.mark.slow
def test_sigterm_with_a_45_s_checkpoint_is_not_killed_at_30_s_and_the_container_exits_143(tmp_path):
    """SIGTERM to the container's main process (what the kubelet signals) mid-epoch; the checkpoint then takes
    45 s (made slow by a sitecustomize here). torchrun's default would SIGKILL the workers after 30 s; the
    rendered --shutdown-timeout (the 300 s grace less 30) lets the write finish, and the container exits 143."""
    from engine.training.checkpoint import load_checkpoint

    (command, env), = rendered_pods(tmp_path, ["k8s.nodes=1", "k8s.gpus=2", *TINY_POD, "train.epochs=30",
                                               "train.log_every=1", "train.checkpoint_minutes=0"], 1)
    assert "--shutdown-timeout=270" in command
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_SAVE)
    flag = tmp_path / "slow-now"
    env = {**env, "PYTHONPATH": f"{hook}{os.pathsep}{env.get('PYTHONPATH', '')}", "CT3D_TEST_SLOW_SAVE": str(flag)}
    proc, log = start_pod(command, env)
    deadline = time.time() + 300
    while "epoch 2/30 iteration 2/" not in "".join(log):
        assert proc.poll() is None and time.time() < deadline, "".join(log)[-3000:]
        time.sleep(0.05)
    flag.touch()
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=200) == 143, "".join(log)[-3000:]
    assert time.time() - signalled >= 45  # the write ran to its end
    assert "stopped by SIGTERM at iteration" in "".join(log)
    last = load_checkpoint(tmp_path / "output" / "ct3d-train" / "checkpoints" / "last.pt")["trainer"]
    assert last["epoch"] == 2 and last["iteration"] > last["epoch_length"]  # mid-epoch 2: written after SIGTERM


@pytest.mark.slow
def test_a_pod_up_150_s_before_pod_0_waits_for_it_then_a_replaced_pod_rejoins_and_training_resumes(early_pod_1):
    """Pod 1 of the rendered two-node Job (an Indexed Job, c10d rendezvous at pod 0, gloo) starts 150 s before
    pod 0 (an image pull, a node from the autoscaler): with c10d's default store timeout (60 s, one retry) its
    torchrun gave up after 121 s; the rendered read_timeout (the join timeout, 1800 s) keeps it waiting, and both
    train once pod 0 is up. Then pod 1 is killed mid-epoch (agent and worker: a lost node) and started again, as
    the Job controller replaces it: the survivor's torchrun restarts its worker, both meet again, and training
    resumes from the checkpoint to the last epoch."""
    import psutil

    state = early_pod_1
    pod1, log1 = state["pod1"], state["log1"]
    while time.time() < state["started"] + 150:
        assert pod1.poll() is None, "".join(log1)[-3000:]  # still waiting for pod 0's store
        time.sleep(1)
    pod0, log0 = start_pod(*state["pods"][0])
    state["later"].append(pod0)
    deadline = time.time() + 300
    while "epoch 2/3 iteration 3/" not in "".join(log0 + log1):
        assert pod0.poll() is None and pod1.poll() is None and time.time() < deadline, "".join(log0)[-3000:]
        time.sleep(0.05)
    for p in [psutil.Process(pod1.pid), *psutil.Process(pod1.pid).children(recursive=True)]:
        p.kill()  # the node is gone: no SIGTERM, no checkpoint on the way out
    pod1.wait()
    replacement, log2 = start_pod(*state["pods"][1])
    state["later"].append(replacement)
    both = lambda: f"pod 0:\n{''.join(log0)[-3000:]}\nreplacement:\n{''.join(log2)[-3000:]}"  # noqa: E731
    assert pod0.wait(timeout=600) == 0, both()
    assert replacement.wait(timeout=600) == 0, both()
    assert "resumed from" in "".join(log0 + log2), both()
    run = state["tmp"] / "output" / "early"
    assert (run / "checkpoints" / "final.pt").is_file()
    epochs = [line.split(",")[0] for line in (run / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs[-1] == "3"
