"""Killed runs lose nothing, bad data is named before training, caches and checkpoints never corrupt."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_overrides
from engine.checkpoint import CHECKPOINT_NAMES, find_latest_checkpoint, load_checkpoint
from engine.config import load_config
from engine.data import DiskCacheDataset, Preprocessing, cache_folder, preprocessing_transform, source_hash
from engine.errors import CT3DError
from engine.workflow import cache, check, train
from volumes import write_nifti

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


SCHEMA_DEFAULTS = ROOT / "tests" / "schema-defaults.yaml"  # the CLI on the schema's defaults, as load_config(None)


def command(*args) -> list[str]:
    return [sys.executable, "-m", "engine.run", *args[:1], "--config", str(SCHEMA_DEFAULTS), *args[1:]]


def cli(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=kwargs.pop("env", ENV), **kwargs)


# ------------------------------------------------------------------ killed and resumed
KILL_RUN = ("train.deterministic=true", "train.epochs=3", "train.log_every=1", "model.widen_factor=1.0",
            "augment.affine_prob=0.5")


def start_and_kill(overrides: list[str], folder: Path, phase: str, seed: int) -> str:
    """Starts training in a subprocess and SIGKILLs it in `phase` of a seeded random epoch."""
    rng = random.Random(seed)
    epoch = rng.randint(1, 2)
    proc = subprocess.Popen(command("train", *overrides), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    iteration = rng.randint(1, 4)
    deadline = time.time() + 300
    killed_in = ""
    while proc.poll() is None and time.time() < deadline and not killed_in:
        text = "".join(lines)
        if phase == "iteration" and f"epoch {epoch}/3 iteration {iteration}/" in text:
            time.sleep(rng.uniform(0, 0.05))
            killed_in = "iteration"
        elif phase == "validation" and f"validating epoch {epoch}" in text:
            time.sleep(rng.uniform(0, 0.02))
            killed_in = "validation"
        elif phase == "checkpoint" and f"validating epoch {epoch}" in text:
            checkpoints = folder / "checkpoints"
            while proc.poll() is None and not killed_in:
                if any(p.name.startswith(".tmp-") for p in checkpoints.iterdir()):
                    killed_in = "checkpoint"
            break
        time.sleep(0.001)
    if killed_in:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return killed_in


@pytest.mark.slow
def test_sigkill_then_resume_finishes_with_identical_weights(tmp_path, tiny_demo):
    whole = train(load_config(None, tiny_overrides(tmp_path, tiny_demo, *KILL_RUN, "output.name=whole")))
    expected = load_checkpoint(whole / "checkpoints" / "final.pt")["model"]
    for seed, phase in enumerate(("iteration", "validation", "checkpoint")):
        name = f"killed-{phase}"
        overrides = tiny_overrides(tmp_path, tiny_demo, *KILL_RUN, f"output.name={name}")
        folder = tmp_path / "runs" / name
        assert start_and_kill(overrides, folder, phase, seed) == phase, f"never reached {phase}"
        for ckpt in (folder / "checkpoints").glob("*.pt"):
            if not ckpt.name.startswith(".tmp-"):
                load_checkpoint(ckpt)  # every real checkpoint stays readable
        survivor = find_latest_checkpoint(folder / "checkpoints")
        proc = cli("train", *overrides)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert survivor is None or f"resumed from {survivor}" in proc.stderr
        for ckpt in CHECKPOINT_NAMES:
            load_checkpoint(folder / "checkpoints" / ckpt)
        assert not list((folder / "checkpoints").glob(".tmp-*"))  # the restarted run cleared the dead writer's
        got = load_checkpoint(folder / "checkpoints" / "final.pt")["model"]
        assert all(torch.equal(expected[k], got[k]) for k in expected), phase


def test_crash_inside_cache_write_leaves_no_entry(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "v.nii.gz", np.where(np.indices((16, 16, 16)).sum(0) > 20, 40, -1000))
    p = Preprocessing(spatial_size=(8, 8, 8))
    dataset = DiskCacheDataset([], preprocessing_transform(p), cache_dir=cache_folder(tmp_path / "c", p),
                               hash_func=source_hash)

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        dataset.entry({"image": str(path), "name": "v"})
    monkeypatch.undo()
    assert list((tmp_path / "c").rglob("*.*")) == []
    assert dataset.entry({"image": str(path), "name": "v"})["image"].shape == (1, 8, 8, 8)


# ------------------------------------------------------------------ data checked before training
def bad_dataset(tmp_path: Path, tiny_demo: Path) -> tuple[Path, Path, dict]:
    """A copy of the tiny demo with one volume of every kind of trouble, and a validation list that
    shares a patient with training."""
    lines = tiny_demo.read_text().splitlines()
    rows = lines[1:]
    for row in rows:
        name = row.split(",")[0]
        (tmp_path / name).write_bytes((tiny_demo.parent / name).read_bytes())
    names = [r.split(",")[0] for r in rows]
    cut = tmp_path / names[0]
    cut.write_bytes(cut.read_bytes()[: len(cut.read_bytes()) // 3])
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)), str(tmp_path / names[1]))
    write_nifti(tmp_path / names[2], np.full((32, 32, 32), 40))
    nib.save(nib.Nifti1Image(np.full((32, 32, 32), np.nan, np.float32), np.eye(4)), str(tmp_path / names[3]))
    (tmp_path / names[4]).unlink()
    bad_label = rows[5].split(",")
    bad_label[1] = "3"
    train_rows = [*rows[:5], ",".join(bad_label), *rows[6:18], rows[6]]  # rows[6] twice: a duplicate
    val_rows = [*rows[18:], rows[7].replace("_a_1.", "_b_1.")]  # same patient as a training volume
    (tmp_path / rows[7].split(",")[0].replace("_a_1.", "_b_1.")).write_bytes((tmp_path / names[7]).read_bytes())
    (tmp_path / "train.csv").write_text("\n".join([lines[0], *train_rows]) + "\n")
    (tmp_path / "val.csv").write_text("\n".join([lines[0], *val_rows]) + "\n")
    expected = {"truncated": names[0], "not 3D": names[1], "constant": names[2], "NaN": names[3],
                "missing": names[4], "label": names[5], "duplicate": names[6]}
    return tmp_path / "train.csv", tmp_path / "val.csv", expected


def test_check_reports_every_problem_with_file_and_row(tmp_path, tiny_demo, capsys):
    train_csv, val_csv, expected = bad_dataset(tmp_path, tiny_demo)
    cfg = load_config(None, [*tiny_overrides(tmp_path, train_csv), f"data.val={val_csv}"], command="check")
    count = check(cfg)
    out = capsys.readouterr().out
    assert count >= 8
    for problem, name in expected.items():
        assert name in out, problem
    assert "does not exist" in out and "not 0 or 1" in out and "duplicate" in out
    assert "shape" in out and "NaN" in out and "same value" in out and "patient 'train_7'" in out
    assert f"{train_csv} row 2" in out  # file and row of the truncated volume


def test_train_refuses_bad_data_before_training(tmp_path, tiny_demo):
    train_csv, _, expected = bad_dataset(tmp_path, tiny_demo)
    with pytest.raises(CT3DError) as info:
        train(load_config(None, tiny_overrides(tmp_path, train_csv)))
    assert all(name in str(info.value) for name in expected.values())
    assert not (tmp_path / "runs" / "run" / "checkpoints").exists()


def test_on_error_skip_leaves_bad_volumes_out_and_lists_them(tmp_path, tiny_demo):
    train_csv, _, expected = bad_dataset(tmp_path, tiny_demo)
    folder = train(load_config(None, tiny_overrides(tmp_path, train_csv, "data.on_error=skip")))
    skipped = (folder / "skipped.csv").read_text()
    assert all(name in skipped for name in expected.values())
    import json

    summary = json.loads((folder / "summary.json").read_text())
    assert summary["skipped"] == len(skipped.strip().splitlines()) - 1
    assert summary["train_volumes"] + summary["val_volumes"] == 19 - len(expected)


def test_patient_split_keeps_each_patient_on_one_side(tmp_path, tiny_demo):
    lines = tiny_demo.read_text().splitlines()
    rows = []
    for row in lines[1:]:
        name = row.split(",")[0]
        for scan in ("a_1", "a_2", "b_1"):
            other = name.replace("a_1", scan)
            (tmp_path / other).write_bytes((tiny_demo.parent / name).read_bytes())
            rows.append(row.replace(name, other))
    (tmp_path / "list.csv").write_text("\n".join([lines[0], *rows]) + "\n")
    from engine.workflow import load_splits

    train_items, val_items, _ = load_splits(load_config(None, tiny_overrides(tmp_path, tmp_path / "list.csv")))
    patient = lambda item: "_".join(item["name"].split("_")[:2])  # noqa: E731
    assert {patient(i) for i in train_items}.isdisjoint({patient(i) for i in val_items})
    assert len(val_items) % 3 == 0 and val_items


# ------------------------------------------------------------------ caches that never lie
def test_cache_fill_and_verify_repairs_corrupt_and_stale_entries(tmp_path, tiny_demo, capsys):
    cfg = load_config(None, tiny_overrides(tmp_path, tiny_demo), command="cache")
    counts = cache(cfg)
    assert counts["volumes"] == 24 and counts["problems"] == 0
    folder = cache_folder(cfg.cache.dir, Preprocessing(spatial_size=(32, 32, 32)))
    assert len(list(folder.glob("*.pt"))) == 24
    first, second = [tiny_demo.parent / row.split(",")[0] for row in tiny_demo.read_text().splitlines()[1:3]]
    (folder / f"{source_hash({'image': str(first)}).decode()}.pt").write_bytes(b"garbage")
    (folder / ".tmp-99-dead-x.pt").write_bytes(b"interrupted")
    os.utime(second, ns=(10**18, 10**18))  # the source changed: its entry is stale
    counts = cache(cfg, verify=True)
    assert counts["corrupt"] == 1 and counts["stale"] == 1 and counts["temp_files"] == 1
    assert counts["built"] == 2 and counts["problems"] == 0
    assert len(list(folder.glob("*.pt"))) == 24 and not list(folder.glob(".tmp-*"))
    assert cache(cfg, verify=True)["corrupt"] == 0


@pytest.mark.slow
def test_two_processes_filling_one_cache_leave_every_entry_valid(tmp_path, tiny_demo):
    overrides = [*tiny_overrides(tmp_path, tiny_demo), "cache.workers=2"]
    procs = [subprocess.Popen(command("cache", *overrides), cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    folder = cache_folder(tmp_path / "cache", Preprocessing(spatial_size=(32, 32, 32)))
    entries = list(folder.glob("*.pt"))
    assert len(entries) == 24 and not list(folder.glob(".tmp-*"))
    for entry in entries:
        assert torch.load(entry, weights_only=True)["image"].shape == (1, 32, 32, 32)


# ------------------------------------------------------------------ security
@pytest.mark.slow
def test_wandb_key_appears_in_no_file_and_no_output(tmp_path, tiny_demo):
    secret = "ct3d-test-secret-4f2a9c1e0b7d"
    env = {**ENV, "WANDB_API_KEY": secret}
    overrides = [*tiny_overrides(tmp_path, tiny_demo), "tracking.wandb.mode=offline"]
    trained = cli("train", *overrides, env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    predicted = cli("predict", f"checkpoint={tmp_path / 'runs' / 'run' / 'checkpoints' / 'best.pt'}",
                    f"input={tiny_demo.parent}", f"output.dir={tmp_path / 'runs'}", "output.name=pred", env=env)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    for proc in (trained, predicted):
        assert secret not in proc.stdout and secret not in proc.stderr
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


def test_cache_command_counts_bad_datalist_rows(tmp_path, tiny_demo):
    train_csv, _, _ = bad_dataset(tmp_path, tiny_demo)
    counts = cache(load_config(None, tiny_overrides(tmp_path, train_csv), command="cache"))
    assert counts["problems"] >= 7  # missing volume, bad label and duplicate rows as well as bad volumes
    assert any("does not exist" in p for p in counts["problem_list"])


def test_warm_cache_check_reads_no_entry(tmp_path, tiny_demo, monkeypatch):
    from engine.check import volume_problems
    from engine.workflow import load_splits

    cfg = load_config(None, tiny_overrides(tmp_path, tiny_demo), command="cache")
    cache(cfg)
    train_items, val_items, _ = load_splits(cfg)

    def no_load(*args, **kwargs):
        raise AssertionError("a warm cache entry was read")

    monkeypatch.setattr(torch, "load", no_load)
    assert volume_problems(train_items + val_items, Preprocessing(spatial_size=(32, 32, 32)), cfg.cache.dir, 2) == []
