"""Data preparation: every problem named before training, the check and cache commands, the split."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from engine.config.loading import load_config
from engine.config.schema import PreprocessConfig
from engine.data import prepare
from engine.data.cache import cache_folder, source_hash
from engine.data.prepare import load_splits
from engine.training.workflow import train
from engine.utils.errors import CT3DError
from helpers import tiny_overrides
from volumes import write_nifti


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

def check(cfg) -> int:
    """The `check` command on a loaded config."""
    return prepare.check(cfg.data, cfg.preprocess, cfg.cache, cfg.output.dir)


def cache(cfg, **options) -> dict:
    """The `cache` command on a loaded config."""
    return prepare.fill_cache(cfg.data, cfg.preprocess, cfg.cache, **options)



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
    train_items, val_items, _ = load_splits(load_config(None, tiny_overrides(tmp_path, tmp_path / "list.csv")).data)
    patient = lambda item: "_".join(item["name"].split("_")[:2])  # noqa: E731
    assert {patient(i) for i in train_items}.isdisjoint({patient(i) for i in val_items})
    assert len(val_items) % 3 == 0 and val_items

# ------------------------------------------------------------------ caches that never lie
def test_cache_fill_and_verify_repairs_corrupt_and_stale_entries(tmp_path, tiny_demo, capsys):
    cfg = load_config(None, tiny_overrides(tmp_path, tiny_demo), command="cache")
    counts = cache(cfg)
    assert counts["volumes"] == 24 and counts["problems"] == 0
    folder = cache_folder(cfg.cache.dir, PreprocessConfig(spatial_size=[32, 32, 32]))
    assert len(list(folder.glob("*.pt"))) == 24
    first, second = [tiny_demo.parent / row.split(",")[0] for row in tiny_demo.read_text().splitlines()[1:3]]
    (folder / f"{source_hash({'image': str(first)}).decode()}.pt").write_bytes(b"garbage")
    (folder / ".tmp-99-dead-x.pt").write_bytes(b"interrupted")
    os.utime(folder / ".tmp-99-dead-x.pt", (0, 0))  # long abandoned (a young one may be a live writer's)
    os.utime(second, ns=(10**18, 10**18))  # the source changed: its entry is stale
    counts = cache(cfg, verify=True)
    assert counts["corrupt"] == 1 and counts["stale"] == 1 and counts["temp_files"] == 1
    assert counts["built"] == 2 and counts["problems"] == 0
    assert len(list(folder.glob("*.pt"))) == 24 and not list(folder.glob(".tmp-*"))
    assert cache(cfg, verify=True)["corrupt"] == 0


def test_cache_command_counts_bad_datalist_rows(tmp_path, tiny_demo):
    train_csv, _, _ = bad_dataset(tmp_path, tiny_demo)
    counts = cache(load_config(None, tiny_overrides(tmp_path, train_csv), command="cache"))
    assert counts["problems"] >= 7  # missing volume, bad label and duplicate rows as well as bad volumes
    assert any("does not exist" in p for p in counts["problem_list"])


def test_shards_are_disjoint_and_cover_the_list_and_come_from_the_indexed_job(monkeypatch):
    from engine.data.sharing import parse_shard, shard

    items = list(range(11))
    shares = [shard(items, i, 3) for i in range(3)]
    assert sorted(sum(shares, [])) == items and all(shares)
    assert parse_shard("2/4") == (2, 4)
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    assert parse_shard(None) == (0, 1)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    monkeypatch.setenv("JOB_COMPLETIONS", "5")
    assert parse_shard(None) == (3, 5)
    for bad in ("4/4", "x", "1/0"):
        with pytest.raises(CT3DError, match="--shard"):
            parse_shard(bad)


def test_an_infinite_voxel_is_refused_naming_the_volume_and_verify_drops_a_nan_entry(tmp_path, tiny_demo):
    """One inf voxel: resampling (preprocess.spacing) would spread it over hundreds of NaN voxels in the cached
    tensor and training would stop on a NaN loss naming no volume. An entry cached before the check is dropped."""
    import nibabel as nib
    import torch

    from engine.data.cache import cache_folder

    lines = tiny_demo.read_text().splitlines()
    rows = lines[1:]
    name = rows[0].split(",")[0]
    for row in rows:
        (tmp_path / row.split(",")[0]).write_bytes((tiny_demo.parent / row.split(",")[0]).read_bytes())
    volume = nib.load(str(tmp_path / name))
    data = volume.get_fdata().astype(np.float32)
    data[10, 10, 10] = np.inf
    nib.save(nib.Nifti1Image(data, volume.affine), str(tmp_path / name))
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path / "train.csv", "preprocess.spacing=[3.0,3.0,3.0]",
                                           "data.on_error=skip"), command="check")
    assert check(cfg) == 1
    counts = cache(cfg)
    assert counts["problems"] == 1 and name in counts["problem_list"][0] and "infinite" in counts["problem_list"][0]
    folder = cache_folder(cfg.cache.dir, cfg.preprocess)
    entry_path = sorted(folder.glob("*.pt"))[0]
    entry = torch.load(entry_path, weights_only=True)
    entry["image"][0, 0, 0, 0] = float("nan")  # as an older version would have cached it
    torch.save(entry, entry_path)
    verified = cache(cfg, verify=True)
    assert verified["corrupt"] == 1 and verified["built"] == 1  # dropped, then built again from its (good) source


def test_a_header_spacing_in_metres_is_refused_naming_the_volume(tmp_path):
    """0.002 (metres) resampled to 1.5 mm would cache one voxel's value everywhere, a constant volume."""
    from engine.data.preprocess import preprocess, preprocessing_transform

    volume = np.full((32, 32, 32), -1000, np.int16)
    volume[8:24, 8:24, 8:24] = 40
    path = write_nifti(tmp_path / "metres.nii.gz", volume, spacing=(0.002, 0.002, 0.002))
    cfg = load_config(None, ["data.demo.enabled=true", "preprocess.spacing=[1.5,1.5,1.5]"])
    with pytest.raises(CT3DError, match=r"metres.nii.gz: voxel size 0.002 x 0.002 x 0.002 mm is outside 0.05-20 mm"):
        preprocess(preprocessing_transform(cfg.preprocess), {"image": str(path), "name": "metres.nii.gz"})
    ok = write_nifti(tmp_path / "mm.nii.gz", volume, spacing=(2.0, 2.0, 2.0))
    preprocess(preprocessing_transform(cfg.preprocess), {"image": str(ok), "name": "mm.nii.gz"})
