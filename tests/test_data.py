import gzip
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.data import (
    DiskCacheDataset,
    build_dataset,
    cache_folder,
    cache_key,
    preprocessing_transform,
    source_hash,
    volume_problems,
)
from engine.errors import CT3DError
from engine.prepare import cache, load_splits
from engine.schema import PreprocessConfig
from helpers import ENV, ROOT, TEXT, command, tiny_overrides
from volumes import write_dicom_series, write_itk, write_nifti

SMALL = PreprocessConfig(spatial_size=[16, 16, 16])


def hu_volume(shape=(20, 24, 28)) -> np.ndarray:
    vol = np.full(shape, -1000, dtype=np.int16)
    vol[4:-4, 4:-4, 4:-4] = 40
    return vol


def items_for(*paths: Path) -> list[dict]:
    return [{"image": str(p), "label": [1.0], "name": p.name} for p in paths]


def cache_entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_cache_key_depends_on_settings_our_code_and_monai_alone(monkeypatch):
    """The same settings, code and MONAI give the same folder (these keys: MONAI 1.6.1, as locked);
    a new MONAI or a change to our preprocessing code gives a new one, never a stale entry."""
    import monai

    from engine import data

    ct_rate = PreprocessConfig(spacing=[0.75, 0.75, 1.5], orientation="LPS", spatial_size=[256, 256, 128])
    keys = cache_key(PreprocessConfig()), cache_key(ct_rate)
    assert keys == ("2edf620dd71075e8", "b3e3c1b39bc68f6a")
    monkeypatch.setattr(monai, "__version__", "9.9.9")
    assert cache_key(PreprocessConfig()) not in keys
    monkeypatch.undo()
    monkeypatch.setattr(data, "PREPROCESSING_VERSION", data.PREPROCESSING_VERSION + 1)
    assert cache_key(PreprocessConfig()) not in keys


def test_cache_key_changes_with_every_preprocessing_setting():
    base = PreprocessConfig()
    variants = [PreprocessConfig(spacing=[1.0, 1.0, 2.0]), PreprocessConfig(hu_window=[-500.0, 500.0]),
                PreprocessConfig(spatial_size=[32, 32, 32]), PreprocessConfig(orientation="LPS"),
                PreprocessConfig(resize="crop_pad"), PreprocessConfig(dtype="float32"),
                PreprocessConfig(scale_range=[0.0, 1.0]), PreprocessConfig(anti_aliasing=False)]
    keys = {cache_key(base)} | {cache_key(v) for v in variants}
    assert len(keys) == len(variants) + 1
    assert cache_key(PreprocessConfig()) == cache_key(base)
    assert cache_folder("/c", base) != cache_folder("/c", variants[0])


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", "dicom"])
def test_every_format_preprocesses_to_target(tmp_path, suffix):
    vol = hu_volume()
    if suffix == "dicom":
        path = write_dicom_series(tmp_path / "series", vol)
    elif suffix.startswith(".nii"):
        path = write_nifti(tmp_path / f"v{suffix}", vol)
    else:
        path = write_itk(tmp_path / f"v{suffix}", vol)
    sample = build_dataset(items_for(path), SMALL, None, 0.0, 1)[0]
    image = sample["image"]
    assert image.shape == (1, 16, 16, 16) and image.dtype == torch.float16
    assert float(image.min()) == pytest.approx(-1.0) and float(image.max()) == pytest.approx(0.04, abs=0.01)
    assert sample["label"].tolist() == [1.0]


def test_disk_cache_is_written_once_and_reused(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", hu_volume())
    build_dataset(items_for(path), SMALL, tmp_path / "cache", 1.0, 1)
    entries = cache_entries(tmp_path / "cache")
    assert len(entries) == 1 and entries[0].parent.name == cache_key(SMALL)
    mtime = entries[0].stat().st_mtime_ns
    again = build_dataset(items_for(path), SMALL, tmp_path / "cache", 1.0, 1)[0]["image"]
    assert cache_entries(tmp_path / "cache") == entries and entries[0].stat().st_mtime_ns == mtime
    assert again.shape == (1, 16, 16, 16)
    other = PreprocessConfig(spatial_size=[8, 8, 8])
    build_dataset(items_for(path), other, tmp_path / "cache", 0.0, 1)[0]
    assert {p.parent.name for p in cache_entries(tmp_path / "cache")} == {cache_key(SMALL), cache_key(other)}


def test_changed_source_file_gets_a_new_entry(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", hu_volume())
    first = build_dataset(items_for(path), SMALL, tmp_path / "cache", 0.0, 1)[0]["image"]
    vol = hu_volume()
    vol[vol > 0] = 1000
    write_nifti(path, vol)
    os.utime(path, ns=(1, 1))
    second = build_dataset(items_for(path), SMALL, tmp_path / "cache", 0.0, 1)[0]["image"]
    assert len(cache_entries(tmp_path / "cache")) == 2 and not torch.equal(first, second)


def test_truncated_volume_names_file_and_leaves_no_cache_entry(tmp_path):
    good = write_nifti(tmp_path / "good.nii.gz", hu_volume())
    bad = tmp_path / "cut.nii.gz"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(CT3DError) as info:
        build_dataset(items_for(good, bad), SMALL, tmp_path / "cache", 1.0, 1)
    assert str(bad) in str(info.value)
    names = [p.name for p in cache_entries(tmp_path / "cache")]
    assert len(names) <= 1 and not any(n.startswith(".tmp-") for n in names)


def test_garbage_file_names_file(tmp_path):
    bad = tmp_path / "noise.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti at all" * 10))
    with pytest.raises(CT3DError, match="noise.nii.gz"):
        build_dataset(items_for(bad), SMALL, None, 1.0, 1)


def test_2d_image_is_refused(tmp_path):
    import nibabel as nib

    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16), dtype=np.int16), np.eye(4)), str(path))
    with pytest.raises(CT3DError, match="flat.nii.gz"):
        build_dataset(items_for(path), SMALL, None, 1.0, 1)


def test_crop_pad_keeps_spacing_and_pads_with_air(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", hu_volume((10, 10, 10)))
    p = PreprocessConfig(spatial_size=[16, 16, 16], resize="crop_pad")
    image = build_dataset(items_for(path), p, None, 0, 1)[0]["image"]
    assert image.shape == (1, 16, 16, 16) and float(image[0, 0, 0, 0]) == -1.0


def test_spacing_resamples(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", hu_volume((20, 20, 10)), spacing=(1.0, 1.0, 4.0))
    p = PreprocessConfig(spacing=[2.0, 2.0, 2.0], spatial_size=[10, 10, 20], resize="crop_pad")
    image = build_dataset(items_for(path), p, None, 0, 1)[0]["image"]
    # 20 x 1 mm -> 10 x 2 mm; 10 x 4 mm -> ~20 x 2 mm: the body fills the middle, air at the edges
    assert image.shape == (1, 10, 10, 20) and float(image[0, 5, 5, 10]) > 0 and float(image[0, 0, 0, 0]) == -1.0


def test_crash_inside_cache_write_leaves_no_entry(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "v.nii.gz", np.where(np.indices((16, 16, 16)).sum(0) > 20, 40, -1000))
    p = PreprocessConfig(spatial_size=[8, 8, 8])
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

@pytest.mark.slow
def test_two_processes_filling_one_cache_leave_every_entry_valid(tmp_path, tiny_demo):
    overrides = [*tiny_overrides(tmp_path, tiny_demo), "cache.workers=2"]
    procs = [subprocess.Popen(command("cache", *overrides), cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, **TEXT) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    folder = cache_folder(tmp_path / "cache", PreprocessConfig(spatial_size=[32, 32, 32]))
    entries = list(folder.glob("*.pt"))
    assert len(entries) == 24 and not list(folder.glob(".tmp-*"))
    for entry in entries:
        assert torch.load(entry, weights_only=True)["image"].shape == (1, 32, 32, 32)

def test_warm_cache_check_reads_no_entry(tmp_path, tiny_demo, monkeypatch):
    cfg = load_config(None, tiny_overrides(tmp_path, tiny_demo), command="cache")
    cache(cfg)
    train_items, val_items, _ = load_splits(cfg.data)

    def no_load(*args, **kwargs):
        raise AssertionError("a warm cache entry was read")

    monkeypatch.setattr(torch, "load", no_load)
    assert volume_problems(train_items + val_items, PreprocessConfig(spatial_size=[32, 32, 32]), cfg.cache.dir, 2) == []


def test_downsizing_smooths_first_unless_turned_off(tmp_path):
    """Stripes of 0.3 cycles per voxel shrunk 4x: without smoothing they alias into a coarse pattern of
    high contrast (a structure that is not there); smoothed first they are the flat grey they average to."""
    x = np.indices((64, 64, 64))[0]
    board = np.round(500 * np.cos(2 * np.pi * 0.3 * x)).astype(np.int16)
    board[0, 0, 0] = -1000  # one voxel of air: a CT in HU has values below 0
    path = write_nifti(tmp_path / "board.nii.gz", board, spacing=(1.0, 1.0, 1.0))

    def shrunk(anti_aliasing: bool) -> torch.Tensor:
        p = PreprocessConfig(spatial_size=[16, 16, 16], anti_aliasing=anti_aliasing, dtype="float32")
        return preprocessing_transform(p)({"image": str(path), "name": "board"})["image"][0, 2:-2, 2:-2, 2:-2]

    assert float(shrunk(True).std()) < 0.25 * float(shrunk(False).std())
    assert abs(float(shrunk(True).mean())) < 0.05
