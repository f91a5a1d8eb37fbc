"""The embed stage (k8s/workloads/embed.py, charts/ct3d/templates/embed-job.yaml): an Indexed Job of one-GPU pods,
each running `engine.run embed --shard I/N` on the cache fill's claims with the training pods' placement, rendered
only where the training reads the embeddings, and applied after the cache fill and before the training. Its exit
codes' fates, the strict schemas and the chart's parity are in test_k8s.py's tables."""

import re
import subprocess
import sys

import pytest
import yaml
from test_k8s import EMBED, KUBE_VERSIONS, MULTI, QUEUE, assert_restricted, helm, needs_helm, objects, validate

from engine.utils.errors import CT3DError
from helpers import ENV, ROOT, TEXT


def embed_job(objs: list[dict]) -> dict:
    return next(o for o in objs if o["kind"] == "Job" and o["metadata"]["labels"]["app.kubernetes.io/component"]
                == "embed")


def kubelet_expanded(args: list[str], env: dict[str, str]) -> list[str]:
    """The kubelet's $(VAR) expansion of a container's command from its env (an unknown name stays as written)."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


def test_embed_pods_each_run_their_own_shard_of_the_volumes():
    from engine.data.sharing import parse_shard, shard

    job = embed_job(objects(*MULTI, *EMBED))
    spec = job["spec"]
    assert job["metadata"]["name"] == "ctrate-r18-embed"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert (spec["backoffLimitPerIndex"], spec["maxFailedIndexes"]) == (3, 0)  # every shard must be done
    assert "activeDeadlineSeconds" not in spec  # k8s.active_deadline_seconds bounds the training only
    container, = spec["template"]["spec"]["containers"]
    assert container["command"][:6] == ["python", "-m", "engine.run", "embed", "--shard", "$(JOB_COMPLETION_INDEX)/3"]
    assert container["command"][6:] == ["--config", "/etc/ct3d/config.yaml"]  # the training's config
    env = {e["name"]: e for e in container["env"]}
    assert "job-completion-index" in env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    volumes = list(range(20))
    shares = []
    for index in range(3):
        command = kubelet_expanded(container["command"], {"JOB_COMPLETION_INDEX": str(index)})
        assert command[4:6] == ["--shard", f"{index}/3"]
        shares.append(shard(volumes, *parse_shard(command[5])))  # the engine reads it as shard I of N
    assert sorted(v for share in shares for v in share) == volumes  # disjoint, and together every volume


def test_embed_pods_take_one_gpu_and_the_training_pods_placement_and_the_cache_fills_claims():
    objs = objects(*MULTI, *EMBED, "k8s.runtime_class=nvidia", "k8s.extra_resources={vpc.amazonaws.com/efa: 4}",
                   "k8s.cache_node_selector={zone: a}", "k8s.cache_queue=cpu")
    job = embed_job(objs)
    pod = job["spec"]["template"]["spec"]
    jobs = {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objs if o["kind"] == "Job"}
    training, cache = jobs["ctrate-r18"], jobs["ctrate-r18-cache"]
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "runtimeClassName",
                "serviceAccountName", "imagePullSecrets", "securityContext"):
        assert pod[key] == training[key], key
    assert job["metadata"]["labels"][QUEUE] == "team-a"  # the GPU queue, not the cache fill's
    assert job["metadata"]["labels"]["app.kubernetes.io/instance"] == "ctrate-r18"
    container, = pod["containers"]
    # one GPU's share of the 8-GPU training pod (6 CPU, 22 Gi plus 4 Gi of /dev/shm), no NCCL devices
    assert container["resources"]["limits"] == container["resources"]["requests"] == {
        "cpu": "6", "memory": "26Gi", "nvidia.com/gpu": 1}
    assert next(v for v in pod["volumes"] if v["name"] == "shm")["emptyDir"]["sizeLimit"] == "4Gi"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert set(mounts) == {m["mountPath"] for m in cache["containers"][0]["volumeMounts"]} | {"/dev/shm"}
    assert "/output" not in mounts and mounts["/data"]["readOnly"] and "readOnly" not in mounts["/cache"]
    assert {v["name"]: v for v in pod["volumes"]}["cache"] == {v["name"]: v for v in cache["volumes"]}["cache"]
    assert_restricted(pod)
    single = embed_job(objects(*EMBED, "k8s.gpus=1", "k8s.cpu=7", "k8s.memory=30Gi"))  # a 1-GPU pod's own amounts
    assert single["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "7", "memory": "30Gi", "nvidia.com/gpu": 1}
    cpu_only = embed_job(objects(*EMBED, "k8s.gpus=0"))["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_only["resources"]["limits"]
    assert "CT3D_EXPECT_GPU" not in {e["name"] for e in cpu_only["env"]}


def test_the_embed_stage_comes_after_the_cache_fill_and_before_the_training_and_only_when_asked():
    names = [o["metadata"]["name"] for o in objects(*EMBED) if o["kind"] != "PersistentVolumeClaim"]
    assert names == ["ct3d-train-config", "ct3d-train-cache", "ct3d-train-embed", "ct3d-train"]
    assert not any(o["metadata"]["name"].endswith("-embed") for o in objects(*EMBED[:-1]))  # k8s.embed_pods=0
    fill_off = objects(*EMBED, "cache.disk=false")
    assert [o["metadata"]["name"] for o in fill_off if o["kind"] == "Job"] == ["ct3d-train-embed", "ct3d-train"]


@pytest.mark.parametrize("override,why", [
    ("model.name=resnet3d", "model.name=resnet3d is not a pretrained encoder"),
    ("model.freeze=false", "model.freeze=false: training runs"),
    ("augment.enabled=true", "augment.enabled=true: each epoch augments"),
    ("cache.embeddings=false", "cache.embeddings=false"),
])
def test_an_embed_stage_whose_embeddings_training_would_not_read_is_refused(override, why):
    overrides = [o for o in EMBED if o != "model.freeze=true" or override != "model.name=resnet3d"]
    with pytest.raises(CT3DError, match=f"k8s.embed_pods: .*{re.escape(why)}"):
        objects(*overrides, override)
    proc = subprocess.run([sys.executable, "-m", "k8s", "values", *overrides, override], cwd=ROOT,
                          capture_output=True, **TEXT)
    assert proc.returncode == 2 and proc.stdout == "" and "k8s.embed_pods" in proc.stderr


def test_several_embed_pods_share_the_cache_claim_read_write_many():
    claims = [o for o in objects(*EMBED) if o["metadata"]["name"].startswith("ct3d-cache-")]
    assert claims[0]["spec"]["accessModes"] == ["ReadWriteMany"]
    one = [o for o in objects(*EMBED, "k8s.embed_pods=1") if o["metadata"]["name"].startswith("ct3d-cache-")]
    assert one[0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    with pytest.raises(CT3DError, match="k8s.cache.access_mode: ReadWriteOnce .* 3 embed pods"):
        objects(*EMBED, "k8s.cache.access_mode=ReadWriteOnce")


def test_the_stage_is_refused_exactly_where_the_engine_would_not_read_embeddings():
    """k8s may not import the training code: its own test (settings.unread_embeddings) agrees with the engine's
    (embeddings.applies) on every combination that decides it."""
    from itertools import product
    from types import SimpleNamespace as Section

    from engine.training.embeddings import applies
    from k8s.settings import unread_embeddings

    for name, freeze, augment, cached in product(("merlin", "ctfm", "resnet3d", "vit3d"), *[(True, False)] * 3):
        cfg = Section(model=Section(name=name, freeze=freeze), augment=Section(enabled=augment),
                      cache=Section(embeddings=cached))
        assert (unread_embeddings(cfg) == "") == applies(cfg.model, cfg.augment, cfg.cache), (name, freeze, augment)


def test_script_waits_for_the_cache_fill_then_the_embed_job_then_trains():
    proc = subprocess.run([sys.executable, "-m", "k8s", "script", "k8s.name=run-1", *EMBED], cwd=ROOT,
                          capture_output=True, **TEXT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    applies = [i for i, line in enumerate(lines) if line.startswith("kubectl apply")]
    waits = [i for i, line in enumerate(lines) if line.startswith("until state=")]
    assert len(applies) == 4 and len(waits) == 2
    assert applies[1] < waits[0] < applies[2] < waits[1] < applies[3]
    assert "job/run-1-cache" in lines[waits[0]] and "job/run-1-embed" in lines[waits[1]]
    assert "*Failed*" in lines[waits[1]] and "exit 1" in lines[waits[1]]  # a failed embed Job stops the script
    embed = yaml.safe_load_all("\n".join(lines[applies[2] + 1:waits[1] - 2]))
    assert [o["metadata"]["name"] for o in embed] == ["run-1-config", "run-1-embed"]
    plain = subprocess.run([sys.executable, "-m", "k8s", "script", "k8s.name=run-1"], cwd=ROOT, capture_output=True,
                           **TEXT).stdout
    assert "run-1-embed" not in plain


@pytest.mark.skipif("embed" not in __import__("engine.run", fromlist=["COMMANDS"]).COMMANDS,
                    reason="engine.run has no embed command yet")
def test_a_config_error_in_an_embed_pod_exits_2_from_the_container_the_fail_job_rule_names(tmp_path):
    """The rendered command, run here on a pod config with a typo: exit 2, which the Job's FailJob rule names."""
    objs = objects(*EMBED, "k8s.gpus=0")
    job, config_map = embed_job(objs), next(o for o in objs if o["kind"] == "ConfigMap")
    container, = job["spec"]["template"]["spec"]["containers"]
    named = {r["onExitCodes"]["containerName"] for r in job["spec"]["podFailurePolicy"]["rules"][1:]
             if r["action"] == "FailJob" and 2 in r["onExitCodes"]["values"]}
    assert container["name"] in named
    config = tmp_path / "config.yaml"
    config.write_text(config_map["data"]["config.yaml"].replace("  epochs: ", "  epohcs: "))
    command = [sys.executable if a == "python" else str(config) if a == "/etc/ct3d/config.yaml" else a
               for a in kubelet_expanded(container["command"], {"JOB_COMPLETION_INDEX": "1"})]
    proc = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, **TEXT, timeout=120)
    assert proc.returncode == 2 and "train.epohcs" in proc.stderr, proc.stderr[-2000:]


TINY = ["data.demo.num_volumes=12", "data.demo.shape=[32,32,32]", "preprocess.spatial_size=[32,32,32]",
        "cache.workers=1", "train.threads=1", "k8s.gpus=0", "k8s.embed_pods=2"]
COUNTS = re.compile(r"(\d+) volume\(s\) extracted, (\d+) already cached, of (\d+) this shard owns \((\d+) listed\)")


@pytest.mark.slow
def test_the_rendered_embed_pods_together_embed_every_volume_once_and_a_pod_run_again_embeds_none(tmp_path):
    """Both pods of a rendered 2-pod embed Job, run here one after the other (the claims are folders under
    tmp_path; the first writes the demo data) with Merlin's random weights: together they embed every listed
    volume once, and pod 0 started again (a replaced pod) finds its shard done."""
    objs = objects(*EMBED, *TINY)
    container, = embed_job(objs)["spec"]["template"]["spec"]["containers"]
    config = tmp_path / "config.yaml"
    text = next(o for o in objs if o["kind"] == "ConfigMap")["data"]["config.yaml"]
    config.write_text(text.replace(": /cache", f": {tmp_path / 'cache'}").replace(": /output", f": {tmp_path}/out"))

    def pod(index: int) -> subprocess.Popen:
        command = [sys.executable if a == "python" else str(config) if a == "/etc/ct3d/config.yaml" else a
                   for a in kubelet_expanded(container["command"], {"JOB_COMPLETION_INDEX": str(index)})]
        return subprocess.Popen(command, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, **TEXT)

    def counts(proc: subprocess.Popen) -> tuple[int, ...]:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return tuple(int(n) for n in COUNTS.search(out).groups())

    first = counts(pod(0))
    second = counts(pod(1))
    assert first[0] == first[2] and second[0] == second[2]  # each embedded its whole shard
    assert first[2] + second[2] == first[3] == 12  # disjoint shards, together every volume
    assert counts(pod(0)) == (0, first[2], first[2], 12)


CHART_EMBED = """embedPods: 2
trainingConfig: |
  model: {name: ctfm, freeze: true}
  augment: {enabled: false}
"""


@needs_helm
def test_chart_renders_the_embed_job_only_for_a_frozen_encoder_and_valid_manifests():
    proc = helm("template", "ct3d-train", "charts/ct3d", "-f", "-", values=CHART_EMBED)
    assert proc.returncode == 0, proc.stderr
    objs = [o for o in yaml.safe_load_all(proc.stdout) if o]
    job = embed_job(objs)
    assert job["spec"]["template"]["spec"]["containers"][0]["command"][5] == "$(JOB_COMPLETION_INDEX)/2"
    assert_restricted(job["spec"]["template"]["spec"])
    for version in KUBE_VERSIONS:
        result = validate(proc.stdout, version)
        assert result.returncode == 0, result.stdout + result.stderr
    for config, why in (("model: {name: resnet3d}", "model.name=resnet3d"),
                        ("model: {name: merlin, freeze: true}", "augment.enabled=true"),  # the engine's default
                        ("model: {name: merlin}\naugment: {enabled: false}", "model.freeze=false")):
        values = "embedPods: 1\ntrainingConfig: |\n" + "".join(f"  {line}\n" for line in config.splitlines())
        proc = helm("template", "x", "charts/ct3d", "-f", "-", values=values)
        assert proc.returncode != 0 and "embedPods" in proc.stderr and why in proc.stderr, (config, proc.stderr)
