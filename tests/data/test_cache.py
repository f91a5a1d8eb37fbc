"""The disk cache: its key, entries written once and atomically, stale entries, concurrent fills."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config.loading import load_config
from engine.config.schema import PreprocessConfig
from engine.data import prepare
from engine.data.cache import DiskCacheDataset, build_dataset, cache_folder, cache_key, source_hash, volume_problems
from engine.data.prepare import load_splits
from engine.data.preprocess import preprocessing_transform
from helpers import start, tiny_overrides
from volumes import cache_entries, hu_volume, items_for, write_nifti

SMALL = PreprocessConfig(spatial_size=[16, 16, 16])

def cache(cfg, **options) -> dict:
    """The `cache` command on a loaded config."""
    return prepare.fill_cache(cfg.data, cfg.preprocess, cfg.cache, **options)



def test_cache_key_depends_on_settings_our_code_and_monai_alone(monkeypatch):
    """The same settings, code and MONAI give the same folder (these keys: MONAI 1.6.1, as locked);
    a new MONAI or a change to our preprocessing code gives a new one, never a stale entry."""
    import hashlib
    import json

    import monai

    from engine.data import cache_keys as cache

    ct_rate = PreprocessConfig(spacing=[1.4, 1.4, 2.8], orientation="LPS", spatial_size=[256, 256, 128])
    keys = cache_key(PreprocessConfig()), cache_key(ct_rate)
    written = {"orientation": "LPS", "spacing": [1.4, 1.4, 2.8], "hu_window": [-1000.0, 1000.0],
               "scale_range": [-1.0, 1.0], "spatial_size": [256, 256, 128], "resize": "resize", "anti_aliasing": True,
               "air_check": True, "dtype": "float16", "format": 2, "code": 3, "monai": "1.6.1"}
    assert keys[1] == hashlib.sha256(json.dumps(written, sort_keys=True).encode()).hexdigest()[:16]
    monkeypatch.setattr(monai, "__version__", "9.9.9")
    assert cache_key(PreprocessConfig()) not in keys
    monkeypatch.undo()
    monkeypatch.setattr(cache, "PREPROCESSING_VERSION", cache.PREPROCESSING_VERSION + 1)
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
    vol[vol > 0] = 300  # soft tissue made denser (not bone-dense: most of it at 1000 HU would read as raw values)
    write_nifti(path, vol)
    os.utime(path, ns=(1, 1))
    second = build_dataset(items_for(path), SMALL, tmp_path / "cache", 0.0, 1)[0]["image"]
    assert len(cache_entries(tmp_path / "cache")) == 2 and not torch.equal(first, second)


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
    procs = [start("cache", *overrides) for _ in range(2)]
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


def copied_demo(tiny_demo, folder):
    """The demo's volumes and datalist under `folder`, modification times kept (as `rsync -a` or `cp -p`)."""
    import shutil

    shutil.copytree(tiny_demo.parent, folder, copy_function=shutil.copy2)
    return folder / tiny_demo.name


def test_entries_are_hit_where_the_data_is_mounted_elsewhere(tmp_path, tiny_demo):
    """A cache filled with the data at one path (the cache-fill Job's mount) is hit, not rebuilt, and not judged
    stale by verify, when training mounts the same files elsewhere: entries go by the path under image_root."""


    filled = copied_demo(tiny_demo, tmp_path / "fill-mount")
    base = [*tiny_overrides(tmp_path, filled), f"data.image_root={filled.parent}"]
    assert cache(load_config(None, base, command="cache"))["problems"] == 0
    moved = tmp_path / "train-mount"
    filled.parent.rename(moved)  # the same files (same size and mtime) at another path
    again = [*tiny_overrides(tmp_path, moved / tiny_demo.name), f"data.image_root={moved}"]
    counts = cache(load_config(None, again, command="cache"), verify=True)
    assert (counts["checked"], counts["stale"], counts["built"], counts["problems"]) == (24, 0, 0, 0)
    folder = cache_folder(tmp_path / "cache", PreprocessConfig(spatial_size=[32, 32, 32]))
    assert len(list(folder.glob("*.pt"))) == 24


def test_two_verify_shards_at_once_split_the_entries_and_spare_a_live_writers_temp_file(tmp_path, tiny_demo):
    """`cache --verify --shard 0/2` and `1/2` side by side: every entry judged once, the damaged one rebuilt once,
    an abandoned temporary file removed once, and a live writer's temporary file left for its rename."""
    import threading

    from engine.data.cache import shard_of_entry, verify_cache

    cfg = load_config(None, tiny_overrides(tmp_path, tiny_demo), command="cache")
    cache(cfg)
    folder = cache_folder(cfg.cache.dir, cfg.preprocess)
    entries = sorted(folder.glob("*.pt"))
    entries[0].write_bytes(b"damaged")
    live = folder / f".tmp-1-live-{entries[1].name}"
    live.write_bytes(entries[1].read_bytes())
    dead = folder / f".tmp-2-dead-{entries[2].name}"
    dead.write_bytes(b"interrupted")
    os.utime(dead, (0, 0))
    assert {shard_of_entry(p.name, 2) for p in entries} == {0, 1}  # both shards own entries
    train_items, val_items, _ = load_splits(cfg.data)
    results, errors = {}, []

    def verify(index):
        try:
            results[index] = verify_cache(train_items + val_items, cfg.preprocess, cfg.cache.dir, 1, shard=(index, 2))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=verify, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    total = {key: results[0][key] + results[1][key] for key in ("checked", "corrupt", "temp_files", "built")}
    assert total == {"checked": 24, "corrupt": 1, "temp_files": 1, "built": 1}
    owner = results[shard_of_entry(entries[0].name, 2)]
    assert owner["corrupt"] == 1 and owner["built"] == 1  # removed and rebuilt by the same shard
    os.replace(live, entries[1])  # the live writer finishes: its file was not taken away
    assert not dead.exists() and len(list(folder.glob("*.pt"))) == 24


def test_verify_keeps_an_entry_the_storage_did_not_answer_for(tmp_path, tiny_demo, monkeypatch):
    """`cache --verify` deletes entries it cannot load (corrupt); one whose read met EIO may be fine: it is kept,
    and the command stops to be retried (exit 150)."""
    import errno

    from engine.data import cache as cache_module
    from engine.utils.errors import Transient

    cfg = load_config(None, tiny_overrides(tmp_path, tiny_demo), command="cache")
    train_items, val_items, _ = load_splits(cfg.data)
    items = (train_items + val_items)[:2]
    cache_module.volume_problems(items, cfg.preprocess, cfg.cache.dir, 1)  # fills two entries
    folder = cache_module.cache_folder(cfg.cache.dir, cfg.preprocess)
    entries = sorted(p.name for p in folder.iterdir())
    assert len(entries) == 2

    def eio(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cache_module.torch, "load", eio)
    with pytest.raises(Transient, match="could not be read"):
        cache_module.verify_cache(items, cfg.preprocess, cfg.cache.dir, 1)
    assert sorted(p.name for p in folder.iterdir()) == entries  # nothing deleted

