"""Builders: precision, inferer, loaders, validation schedule, torch set-up."""

import os

import pytest
import torch

from engine.build import make_inferer, resolve_amp


def test_mixed_precision_only_on_cuda():
    cpu = torch.device("cpu")
    assert resolve_amp("bf16", cpu) is None and resolve_amp("auto", cpu) is None
    net = torch.nn.Linear(2, 1)
    out = make_inferer(cpu, None)(torch.ones(1, 2), net)
    assert out.dtype == torch.float32


def test_bf16_inferer_autocasts_the_forward_pass():
    net = torch.nn.Linear(2, 1)
    assert make_inferer(torch.device("cpu"), torch.bfloat16)(torch.ones(1, 2), net).dtype == torch.bfloat16


def test_ranks_hold_disjoint_shares_and_take_equal_steps_over_every_sample(monkeypatch):
    import ignite.distributed as idist

    from engine.build import ShareSampler, make_datasets, make_loader
    from engine.config import load_config

    items = [{"image": f"v{i}", "label": [0.0], "name": f"v{i}"} for i in range(7)]
    cfg = load_config(None, ["data.demo.enabled=true", "cache.memory_rate=0", "cache.disk=false"])
    shares, steps = [], []
    for rank in range(3):
        monkeypatch.setattr(idist, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(idist, "get_world_size", lambda: 3)
        train_ds, val_ds = make_datasets(cfg, items, items, progress=False)
        shares.append([it["name"] for it in train_ds.items])
        sampler = make_loader(train_ds, cfg.loader, torch.device("cpu"), shuffle_seed=0, per_rank=3).sampler
        sampler.set_epoch(1)
        steps.append(list(sampler))
        assert [it["name"] for it in val_ds.items] == shares[-1]  # validation: the same share, unpadded
    assert sorted(sum(shares, [])) == sorted(it["name"] for it in items)  # disjoint, and together everything
    assert [len(s) for s in steps] == [3, 3, 3]  # the share of 2 repeats one sample
    one_rank = ShareSampler(list(range(7)), 7, seed=5)
    one_rank.set_epoch(2)
    reference = torch.utils.data.DistributedSampler(list(range(7)), num_replicas=1, rank=0, shuffle=True, seed=5)
    reference.set_epoch(2)
    assert list(one_rank) == list(reference)  # one process: torch's order, so older runs resume the same


def test_ram_cache_rate_is_lowered_to_fit_the_node(monkeypatch, caplog):
    from types import SimpleNamespace

    import psutil

    from engine.build import ram_budget
    from engine.schema import PreprocessConfig

    p = PreprocessConfig(spatial_size=[100, 100, 100])  # 2 MB a volume in float16
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=100e6))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert ram_budget(1.0, 10, p) == 1.0  # 2 ranks x 10 x 2 MB = 40 MB fits in 80 MB
    rate = ram_budget(1.0, 40, p)  # 160 MB does not
    assert rate == pytest.approx(0.5) and "caching 50% of them in RAM" in caplog.text


def test_trainer_reshuffles_each_epoch_through_monai_and_the_order_depends_on_seed_and_epoch():
    from ignite.engine import Events

    from engine.build import make_loader, make_trainer
    from engine.schema import LoaderConfig, TrainConfig

    dataset = [{"image": torch.full((1, 2), float(i)), "label": torch.zeros(1)} for i in range(8)]

    def orders(seed: int) -> list[list[int]]:
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 1))
        loader = make_loader(dataset, LoaderConfig(batch_size=8), torch.device("cpu"), shuffle_seed=seed)
        trainer = make_trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.nn.BCEWithLogitsLoss(), loader,
                               torch.device("cpu"), None, TrainConfig(epochs=2))
        seen = []
        trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                  lambda e: seen.append([int(v) for v in e.state.batch["image"][:, 0, 0]]))
        trainer.run()
        return seen

    first = orders(0)
    assert first[0] != first[1] and sorted(first[0]) == list(range(8))  # MONAI sets the sampler's epoch
    assert orders(0) == first and orders(1) != first


def test_cudnn_autotunes_unless_deterministic_and_missing_kernels_only_warn(monkeypatch):
    from engine.build import setup_torch
    from engine.schema import TrainConfig

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        setup_torch(TrainConfig(deterministic=False))
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
        setup_torch(TrainConfig(deterministic=True))
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, False


def test_each_rank_draws_its_own_random_numbers():
    from engine.build import setup_torch
    from engine.schema import TrainConfig

    draws = []
    for rank in (0, 1, 0):
        setup_torch(TrainConfig(seed=3), rank)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


def test_accumulation_micro_steps_run_under_no_sync():
    import contextlib

    from ignite.engine import Events

    from engine.build import make_loader, make_trainer
    from engine.schema import LoaderConfig, TrainConfig

    class Counting(torch.nn.Sequential):  # as DDP: no_sync() skips the gradient all-reduce
        quiet: list = []

        @contextlib.contextmanager
        def no_sync(self):
            self.quiet.append(True)
            yield

    net = Counting(torch.nn.Flatten(), torch.nn.Linear(2, 1))
    dataset = [{"image": torch.full((1, 2), float(i)), "label": torch.zeros(1)} for i in range(5)]
    loader = make_loader(dataset, LoaderConfig(batch_size=1), torch.device("cpu"), shuffle_seed=0)
    trainer = make_trainer(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.nn.BCEWithLogitsLoss(), loader,
                           torch.device("cpu"), None, TrainConfig(epochs=1, accumulation_steps=2))
    quiet_at = []
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: Counting.quiet.clear())
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: quiet_at.append(bool(Counting.quiet)))
    trainer.run()
    assert quiet_at == [True, False, True, False, False]  # the epoch's last batch steps: never quiet


def test_sync_batchnorm_needs_cuda_under_torchrun(monkeypatch):
    import ignite.distributed as idist
    import pytest

    from engine.build import make_optimization
    from engine.errors import CT3DError
    from engine.schema import TrainConfig

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    make_optimization(net, TrainConfig(sync_bn=True), 4)  # one process: plain BatchNorm, nothing to sync
    monkeypatch.setattr(idist, "get_world_size", lambda: 2)
    with pytest.raises(CT3DError, match="train.sync_bn"):
        make_optimization(net, TrainConfig(sync_bn=True), 4)


def test_fewer_volumes_than_ranks_training_refused_validation_stands_in(monkeypatch):
    import math

    import ignite.distributed as idist

    from engine.build import make_datasets
    from engine.config import load_config
    from engine.errors import CT3DError

    items = [{"image": f"v{i}", "label": [0.0], "name": f"v{i}"} for i in range(3)]
    cfg = load_config(None, ["data.demo.enabled=true", "cache.memory_rate=0", "cache.disk=false"])
    monkeypatch.setattr(idist, "get_world_size", lambda: 4)
    monkeypatch.setattr(idist, "get_rank", lambda: 3)
    with pytest.raises(CT3DError, match="3 training volume.*4 ranks"):
        make_datasets(cfg, items, items, progress=False)
    _, val = make_datasets(cfg, items * 2, items, progress=False)  # rank 3 has no validation volume
    assert len(val.items) == 1 and math.isnan(val.items[0]["label"][0])  # a stand-in the metrics drop


def test_loader_threads_when_the_ram_cache_holds_the_share_and_workers_when_it_does_not():
    from monai.data import CacheDataset, ThreadDataLoader

    from engine.build import make_loader
    from engine.data import Labelled
    from engine.schema import LoaderConfig

    items = [{"image": f"v{i}", "label": [float(i % 2)], "name": f"v{i}"} for i in range(6)]
    images = [{"image": torch.full((1, 2, 2, 2), float(i))} for i in range(6)]
    cpu, auto = torch.device("cpu"), LoaderConfig(batch_size=2)

    def dataset(rate: float):
        return Labelled(CacheDataset(images, transform=None, cache_rate=rate, progress=False), items)

    loader = make_loader(dataset(1.0), auto, cpu, shuffle_seed=0)
    assert isinstance(loader, ThreadDataLoader) and loader.num_workers == 0
    seen = sorted(float(v) for batch in loader for v in batch["image"][:, 0, 0, 0, 0])
    assert seen == [0, 1, 2, 3, 4, 5]  # every sample once, through the prefetch thread
    partly = make_loader(dataset(0.5), auto, cpu, shuffle_seed=0)
    assert not isinstance(partly, ThreadDataLoader) and 1 <= partly.num_workers <= 4
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
