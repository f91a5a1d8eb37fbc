"""Each rank's data: shares, the RAM budget, samplers and loaders."""


import pytest
import torch


def test_ranks_hold_disjoint_shares_and_take_equal_steps_over_every_sample(monkeypatch):
    import ignite.distributed as idist

    from engine.config.loading import load_config
    from engine.data.loaders import make_datasets, make_loader
    from engine.data.sharing import ShareSampler

    items = [{"image": f"v{i}", "label": [0.0], "name": f"v{i}"} for i in range(7)]
    cfg = load_config(None, ["data.demo.enabled=true", "cache.memory_rate=0", "cache.disk=false"])
    shares, steps = [], []
    for rank in range(3):
        monkeypatch.setattr(idist, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(idist, "get_world_size", lambda: 3)
        train_ds, val_ds = make_datasets(items, items, cfg.preprocess, cfg.cache, cfg.train.seed, progress=False)
        shares.append([it["name"] for it in train_ds.items])
        sampler = make_loader(train_ds, cfg.loader, torch.device("cpu"), shuffle_seed=0, per_rank=3).sampler
        sampler.set_epoch(1)
        steps.append(list(sampler))
        assert [it["name"] for it in val_ds.items] == [f"v{i}" for i in range(rank, 7, 3)]  # validation: unpadded
        assert [it["name"] for it in train_ds.items] == [f"v{i}" for i in train_ds.rows] and train_ds.total == 7
    assert sorted(sum(shares, [])) == sorted(it["name"] for it in items)  # disjoint, and together everything
    assert [len(s) for s in steps] == [3, 3, 3]  # the share of 2 repeats one sample
    one_rank = ShareSampler(list(range(7)), list(range(7)), 7, 7, seed=5)
    one_rank.set_epoch(2)
    reference = torch.utils.data.DistributedSampler(list(range(7)), num_replicas=1, rank=0, shuffle=True, seed=5)
    reference.set_epoch(2)
    assert list(one_rank) == list(reference)  # one process: torch's order, so older runs resume the same


def test_ram_cache_rate_is_lowered_to_fit_the_node(monkeypatch, caplog):
    from types import SimpleNamespace

    import psutil

    from engine.config.schema import PreprocessConfig
    from engine.data.loaders import ram_budget

    p = PreprocessConfig(spatial_size=[100, 100, 100])  # 2 MB a volume in float16
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=100e6))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert ram_budget(1.0, 10, p) == 1.0  # 2 ranks x 10 x 2 MB = 40 MB fits in 80 MB
    rate = ram_budget(1.0, 40, p)  # 160 MB does not
    assert rate == pytest.approx(0.5) and "caching 50% of them in RAM" in caplog.text


def test_fewer_volumes_than_ranks_training_refused_validation_stands_in(monkeypatch):
    import math

    import ignite.distributed as idist

    from engine.config.loading import load_config
    from engine.data.loaders import make_datasets
    from engine.utils.errors import CT3DError

    items = [{"image": f"v{i}", "label": [0.0], "name": f"v{i}"} for i in range(3)]
    cfg = load_config(None, ["data.demo.enabled=true", "cache.memory_rate=0", "cache.disk=false"])
    monkeypatch.setattr(idist, "get_world_size", lambda: 4)
    monkeypatch.setattr(idist, "get_rank", lambda: 3)
    with pytest.raises(CT3DError, match="3 training volume.*4 ranks"):
        make_datasets(items, items, cfg.preprocess, cfg.cache, cfg.train.seed, progress=False)
    # rank 3 has no validation volume
    _, val = make_datasets(items * 2, items, cfg.preprocess, cfg.cache, cfg.train.seed, progress=False)
    assert len(val.items) == 1 and math.isnan(val.items[0]["label"][0])  # a stand-in the metrics drop


def test_loader_threads_when_the_ram_cache_holds_any_of_the_share_and_workers_when_it_holds_none():
    from monai.data import CacheDataset, ThreadDataLoader

    from engine.config.schema import LoaderConfig
    from engine.data.cache import Labelled
    from engine.data.loaders import make_loader

    items = [{"image": f"v{i}", "label": [float(i % 2)], "name": f"v{i}"} for i in range(6)]
    images = [{"image": torch.full((1, 2, 2, 2), float(i))} for i in range(6)]
    cpu, auto = torch.device("cpu"), LoaderConfig(batch_size=2)

    def dataset(rate: float):
        return Labelled(CacheDataset(images, transform=None, cache_rate=rate, progress=False), items)

    loader = make_loader(dataset(1.0), auto, cpu, shuffle_seed=0)
    assert isinstance(loader, ThreadDataLoader) and loader.num_workers == 0
    seen = sorted(float(v) for batch in loader for v in batch["image"][:, 0, 0, 0, 0])
    assert seen == [0, 1, 2, 3, 4, 5]  # every sample once, through the prefetch thread
    partly = make_loader(dataset(0.5), auto, cpu, shuffle_seed=0)  # the thread path, its rest read by threads
    assert isinstance(partly, ThreadDataLoader) and partly.num_workers == 0 and partly.dataset.readers >= 1
    disk = make_loader(dataset(0.0), auto, cpu, shuffle_seed=0)  # nothing in RAM: worker processes decode
    assert not isinstance(disk, ThreadDataLoader) and 1 <= disk.num_workers <= 4
    fixed = make_loader(dataset(1.0), LoaderConfig(batch_size=2, num_workers=2), cpu, shuffle_seed=0)
    assert not isinstance(fixed, ThreadDataLoader) and fixed.num_workers == 2

    class Broken(Labelled):
        def __getitem__(self, index):
            if index == 3:
                raise RuntimeError("volume v3 is unreadable")
            return super().__getitem__(index)

    broken = make_loader(Broken(dataset(1.0).images, items), auto, cpu)
    with pytest.raises(RuntimeError, match="v3 is unreadable"):  # not an epoch that quietly ends early
        list(broken)


def test_ranks_read_the_ram_budget_at_one_moment_and_share_the_lowest_rate(monkeypatch):
    """Under torchrun every rank measures after a barrier (before any of them fills its RAM cache) and all take
    the lowest rate (an all-reduce MIN): one budget for the node, not one per rank's moment."""
    from types import SimpleNamespace

    import ignite.distributed as idist
    import psutil

    from engine.config.loading import load_config
    from engine.data import cache, loaders

    events, rates = [], []
    monkeypatch.setattr(idist, "get_world_size", lambda: 2)
    monkeypatch.setattr(idist, "get_rank", lambda: 1)
    monkeypatch.setattr(idist, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(psutil, "virtual_memory", lambda: events.append("measure") or SimpleNamespace(available=1e15))
    monkeypatch.setattr(idist, "all_reduce", lambda value, op: events.append(("reduce", op, value)) or 0.25)
    monkeypatch.setattr(loaders, "build_dataset", lambda items, p, disk, rate, *a: rates.append(rate) or cache.Labelled(
        None, items))
    items = [{"image": f"v{i}", "label": [0.0], "name": f"v{i}"} for i in range(4)]
    cfg = load_config(None, ["data.demo.enabled=true", "cache.memory_rate=1"])
    loaders.make_datasets(items, items, cfg.preprocess, cfg.cache, cfg.train.seed, False)
    assert events == ["barrier", "measure", ("reduce", "MIN", 1.0)]
    assert rates == [0.25, 0.25]


def test_loader_workers_leave_the_ranks_process_group_and_still_end_with_it():
    """torchrun signals a rank's process group: its loader workers must be out of it (tests/cli/test_run.py's
    two-rank SIGTERM run shows why), yet end when their process exits with them alive (multiprocessing
    terminates them: a worker ignoring SIGTERM instead would hang the exit)."""
    import subprocess
    import sys
    import time

    import psutil

    from helpers import ENV, ROOT, TEXT

    script = """
import os, torch
from engine.config.schema import LoaderConfig
from engine.data.loaders import make_loader
items = [{"image": torch.zeros(1), "label": torch.zeros(1)} for _ in range(8)]
loader = make_loader(items, LoaderConfig(batch_size=2, num_workers=2), torch.device("cpu"), shuffle_seed=0)
batches = iter(loader)
next(batches), next(batches)  # one from each worker: both started
workers = [w.pid for w in batches._workers]
print(len(workers), sorted({os.getpgid(pid) for pid in workers} & {os.getpgid(0)}), *workers)
"""  # and exits with the iterator and its workers alive
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, **TEXT, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    count, shared, *pids = proc.stdout.split()
    assert (count, shared) == ("2", "[]")  # two workers, none in the parent's process group
    deadline = time.time() + 10
    while any(psutil.pid_exists(int(pid)) and psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE
              for pid in pids):  # ... and gone with their parent
        assert time.time() < deadline, pids
        time.sleep(0.05)


def test_a_run_below_98_percent_of_its_ram_rate_says_what_it_reads_from_disk_each_epoch():
    from engine.config.schema import PreprocessConfig
    from engine.data.loaders import shortfall

    p = PreprocessConfig(spatial_size=[256, 256, 128])  # 16.8 MB a volume in float16
    assert shortfall(1.0, 1.0, 1000, p) is None and shortfall(0.985, 1.0, 1000, p) is None
    assert shortfall(0.5, 0.0, 1000, p) is None  # RAM cache off: nothing asked for
    line = shortfall(0.2, 1.0, 1000, p)
    assert "holds 20% of the data set (200 of 1000 training volumes)" in line
    assert f"reads 800 volumes, {800 * 256 * 256 * 128 * 2 / 1e9:.1f} GB, from the disk cache" in line
