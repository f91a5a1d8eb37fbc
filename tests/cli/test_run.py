"""The command line (`python -m engine.run`) and training under torchrun."""

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.config.loading import load_config
from engine.serving.commands import evaluate
from helpers import ENV, ROOT, SCHEMA_DEFAULTS, TEXT, cli, command, tiny_overrides


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "engine.run", *args], cwd=ROOT, capture_output=True, **TEXT,
                          timeout=60)
    return proc, time.time() - start


def test_cli_bad_model_fails_fast_naming_the_key():
    proc, seconds = run_cli("model.name=nope")
    assert proc.returncode != 0
    assert "model.name" in proc.stderr and "resnet3d" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert seconds < 2.0 * 3  # the 2 s budget is measured in bench/; here only a gross regression fails


def test_cli_config_error_imports_neither_torch_nor_monai():
    code = ("import sys; from engine.run import main; rc = main(['model.name=nope']); "
            "print(rc, 'torch' in sys.modules, 'monai' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, **TEXT, timeout=60)
    assert proc.stdout.split() == ["2", "False", "False"]


def test_cli_help_lists_every_sections_keys():
    proc, _ = run_cli("--help")
    assert proc.returncode == 0
    for section in ("data", "preprocess", "cache", "model", "train", "metrics", "output", "k8s"):
        assert f"\n  {section}." in proc.stdout


def test_cli_takes_command_config_and_overrides_in_any_order():
    proc, _ = run_cli("evaluate", "--config", str(ROOT / "configs" / "default.yaml"), "model.name=nope")
    assert proc.returncode != 0 and "model.name" in proc.stderr
    proc, _ = run_cli("predict", "--config", str(ROOT / "configs" / "default.yaml"), "checkpoint=x.pt")
    assert "input" in proc.stderr


@pytest.mark.slow
def test_cache_stage_in_two_shards_then_torchrun_under_a_timeout_shorter_than_the_fill(tmp_path, tiny_demo):
    """`cache --shard 0/2` fills half the cache (1 voxel in 1 mm: slow on purpose); two ranks then train with a
    process-group timeout shorter than rank 1's half of the fill: rank 0 waits for it, times out and says which
    setting and which stage, as its log said before the wait. `cache --shard 1/2` completes the
    cache, `--verify` finds every entry valid and none missing, and two ranks train under a timeout shorter than
    the whole fill would take."""
    overrides = tiny_overrides(tmp_path, tiny_demo, "preprocess.spacing=[1.0,1.0,1.0]", "cache.workers=1",
                               "train.dist_timeout_minutes=0.1", "tracking.wandb.mode=disabled",
                               "data.val_fraction=0.04")  # one validation volume: rank 1 validates a stand-in

    def fill(shard: int) -> float:
        out = cli("cache", f"--shard={shard}/2", *overrides)
        assert out.returncode == 0, out.stderr[-2000:]
        counts = dict(part.rsplit(" ", 1) for part in out.stdout.strip().splitlines()[-1].split(": ", 1)[1].split(", "))
        assert counts["volumes"] == "12" and counts["problems"] == "0"
        return float(counts["volumes_per_second"])

    rate = fill(0)
    print(f"fill: {24 / rate:.1f} s for the whole cache in one process")
    assert 12 / rate > 2 * 1.2  # rank 1's half outlasts the 1.2 s timeout below
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *command("train", *overrides, "train.dist_timeout_minutes=0.02")[1:]], cwd=ROOT, env=env,
                          capture_output=True, **TEXT, timeout=600)
    assert proc.returncode != 0
    assert "rank 0: waited more than train.dist_timeout_minutes=0.02 for the other ranks" in proc.stderr
    assert "fill the cache first (`python -m engine.run cache --shard I/N`)" in proc.stderr
    # said before the wait (torchrun stopped rank 1 mid-fill), so in the waiting pod's log even when NCCL's
    # watchdog, not our handler, ends the process
    assert "rank 0: checked (and cached) its share of the volumes; waiting for the other ranks at most " \
           "train.dist_timeout_minutes=0.02" in proc.stderr
    fill(1)
    assert 24 / rate > 6  # the whole fill, in one process, would outlast the 6 s timeout of the run below
    verified = cli("cache", "--verify", *overrides)
    assert verified.returncode == 0, verified.stderr[-2000:]
    assert "checked 24, corrupt 0, stale 0, temp_files 0, built 0, problems 0" in verified.stdout
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *command("train", *overrides)[1:]], cwd=ROOT, env=env, capture_output=True, **TEXT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "runs" / "run" / "checkpoints" / "final.pt").is_file()
    summary = json.loads((tmp_path / "runs" / "run" / "summary.json").read_text())
    assert summary["val_volumes"] == 1 and summary["best"]["val_loss"] is not None


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    """torchrun with the c10d rendezvous (as a Kubernetes Job's pods meet), two workers on this machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--max-restarts={restarts}", *command(*args)[1:]]


def two_rank_overrides(tmp_path, demo: Path, name: str) -> list[str]:
    """A 3-epoch deterministic two-rank training on the demo's phantoms (24 of 32^3 in `demo`: rank 0 writes them
    the first time, and the later runs find them)."""
    return [f"data.demo.dir={demo}", "data.demo.enabled=true", "data.demo.num_volumes=24", "data.demo.shape=[32,32,32]",
            "data.val_fraction=0.15",  # 3 validation volumes: unequal shares
            *[o for o in tiny_overrides(tmp_path, Path("unused"), "train.deterministic=true", "train.epochs=3",
                                        "train.log_every=1", "augment.affine_prob=0.5",
                                        "train.checkpoint_minutes=0.0001", "loader.batch_size=2", f"output.name={name}")
              if not o.startswith(("data.train=", "data.demo.enabled="))]]  # the demo's phantoms instead


@pytest.fixture(scope="module")
def two_rank_whole(tmp_path_factory) -> dict:
    """The uninterrupted two-rank run every interrupted one must end equal to (its final weights, "model"), with
    W&B offline and the report's panels (as a user's run): its folder, output and the demo's phantoms it wrote."""
    import torch

    tmp = tmp_path_factory.mktemp("two_ranks")
    whole = subprocess.run(torchrun("train", *two_rank_overrides(tmp, tmp / "demo", "whole"),
                                    "tracking.wandb.mode=offline", "report.panels=true"), cwd=ROOT,
                           env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, **TEXT, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    folder = tmp / "runs" / "whole"
    return {"model": torch.load(folder / "checkpoints" / "final.pt", weights_only=True)["model"], "folder": folder,
            "stdout": whole.stdout, "demo": tmp / "demo", "overrides": two_rank_overrides(tmp, tmp / "demo", "whole")}


@pytest.mark.slow
def test_two_ranks_write_one_run_and_its_best_checkpoint_evaluates_to_its_summary(two_rank_whole):
    """Rank 0 alone writes the demo's phantoms, the run folder, the closing summary and W&B's offline run; the
    validation set is split unequally between the ranks (3 volumes for 2) and the metrics gathered from both equal
    a one-process evaluation of the best checkpoint."""
    folder = two_rank_whole["folder"]
    assert two_rank_whole["stdout"].count("ct3d run ") == 1  # the closing summary: rank 0 only
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoints", "config.yaml", "metrics.csv", "report.html",
                                                        "report.png", "split.csv", "summary.json", "wandb"]
    assert len(list((folder / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["best.pt", "final.pt", "last.pt"]
    assert len(list(two_rank_whole["demo"].glob("*.nii.gz"))) == 24
    summary = json.loads((folder / "summary.json").read_text())
    validation = [r for r in csv.DictReader(open(folder / "split.csv")) if r["split"] == "validation"]
    assert summary["val_volumes"] == len(validation) and len(validation) % 2 == 1  # unequal shares

    best = folder / "checkpoints" / "best.pt"
    cfg = load_config(SCHEMA_DEFAULTS, [*two_rank_whole["overrides"], f"checkpoint={best}", "output.name=eval"],
                      command="evaluate")
    metrics = evaluate(cfg)
    for key in ("auc_macro", "auc_micro", "fbeta_macro", "accuracy"):
        assert metrics[key] == pytest.approx(summary["best"][key], abs=1e-6), key


def start_watched(cmd: list[str]) -> tuple[subprocess.Popen, list[str]]:
    import threading

    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, **TEXT)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def wait_for_line(proc: subprocess.Popen, lines: list[str], text: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while text not in "".join(lines):
        assert proc.poll() is None and time.time() < deadline, "".join(lines)[-3000:]
        time.sleep(0.01)


def workers_of(proc: subprocess.Popen) -> dict:
    """{rank: psutil.Process} of torchrun's training workers."""
    import psutil

    found = {}
    for p in psutil.Process(proc.pid).children(recursive=True):
        try:  # a rank's loader workers are its children, with its command line and RANK: a rank's parent has none
            if "engine.run" in " ".join(p.cmdline()) and "RANK" not in p.parent().environ():
                found[int(p.environ()["RANK"])] = p
        except (psutil.Error, KeyError):
            continue
    return found


@pytest.mark.slow
def test_two_ranks_survive_a_killed_worker_then_sigterm_and_end_with_an_uninterrupted_runs_weights(tmp_path,
                                                                                                  two_rank_whole):
    """A worker killed mid-epoch 1 (a lost node: no SIGTERM, no last words): torchrun's elastic agent restarts the
    group and both ranks resume from the last checkpoint (written mid-epoch). Then SIGTERM to torchrun (PID 1 in a
    pod: what the kubelet signals) early in epoch 2: both ranks stop at one iteration after rank 0 wrote last.pt holding
    both ranks' random states. The run resumed from it ends with the uninterrupted run's weights, and in it rank 1
    leaves at the final barrier, before rank 0's closing work ends. (One run through both interruptions: each
    two-rank start costs seconds of imports per rank.) The RAM cache is off and each rank reads the disk cache
    through two loader worker processes, which torchrun's SIGTERM reaches too (it signals each worker's process
    group): they must not die of it before their rank's interruption checkpoint."""
    import torch

    from engine.training.checkpoint import load_checkpoint

    overrides = [*two_rank_overrides(tmp_path, two_rank_whole["demo"], "term"), "cache.memory_rate=0",
                 "loader.num_workers=2"]
    proc, lines = start_watched(torchrun("train", *overrides, restarts=2))
    wait_for_line(proc, lines, "epoch 1/3 iteration 3/")
    workers_of(proc)[1].kill()  # a lost node
    wait_for_line(proc, lines, "resumed from")  # the agent restarted both workers; they found the checkpoint
    wait_for_line(proc, lines, "epoch 2/3 iteration 1/")  # early in the epoch: a busy machine's signal may lag
    loader_workers = [c for rank in workers_of(proc).values() for c in rank.children()]
    assert len(loader_workers) >= 4  # two per rank (the validation loader's may have started too)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    text = "".join(lines)
    assert text.count("stopped by SIGTERM at iteration") >= 1, text[-3000:]
    last = load_checkpoint(tmp_path / "runs" / "term" / "checkpoints" / "last.pt")
    progress = last["trainer"]
    assert progress["epoch"] == 2 and 0 < progress["iteration"] - progress["epoch_length"] < progress["epoch_length"]
    assert progress["world_size"] == 2 and len(last["rng"]["per_rank"]) == 2
    assert not torch.equal(last["rng"]["per_rank"][0]["torch"], last["rng"]["per_rank"][1]["torch"])
    assert not (tmp_path / "runs" / "term" / "checkpoints" / "final.pt").exists()

    proc, lines = start_watched(torchrun("train", *overrides, "report.panels=true"))  # a closing of a user's length
    ended: dict[int, float] = {}
    while proc.poll() is None:
        for rank in workers_of(proc):
            ended.setdefault(rank, 0.0)
        for rank in ended:
            if not ended[rank] and rank not in workers_of(proc):
                ended[rank] = time.time()
        time.sleep(0.02)
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert f"at iteration {progress['iteration']}" in "".join(lines)
    got = torch.load(tmp_path / "runs" / "term" / "checkpoints" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(whole[k], got[k]) for whole in [two_rank_whole["model"]] for k in whole)
    clock = json.loads((tmp_path / "runs" / "term" / "summary.json").read_text())["phases"]["clock"]
    assert ended.get(1) and ended[1] < clock[3] - 0.5, (ended, clock)  # rank 1 left; rank 0 went on closing
