"""Batches collated into a ring of buffers: the same values as PyTorch's default_collate, the same few buffers
reused (no allocation per batch), and a batch left intact for as long as the thread loader's prefetching allows."""

import time

import pytest
import torch
from torch.utils.data import default_collate

from engine.config.schema import LoaderConfig
from engine.data.batches import RingCollate
from engine.data.items import IMAGE, LABEL
from engine.data.loaders import make_loader


class Volumes(torch.utils.data.Dataset):
    in_ram = True  # the thread path, as a dataset wholly in the RAM cache takes

    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(0)
        self.images = [torch.randn(1, 6, 5, 4, generator=generator).half() for _ in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {IMAGE: self.images[i], LABEL: torch.tensor([float(i), 1.0])}


def test_batches_equal_default_collate_in_a_few_reused_buffers():
    data, collate = Volumes(9), RingCollate(torch.device("cpu"), slots=3)
    pointers = []
    for start in range(0, 9 * 3, 2):  # 14 batches of 2 and the odd one: a ring of its own
        samples = [data[(start + k) % 9] for k in range(2)]
        batch, expected = collate(samples), default_collate(samples)
        assert torch.equal(batch[IMAGE], expected[IMAGE]) and torch.equal(batch[LABEL], expected[LABEL])
        pointers.append(batch[IMAGE].data_ptr())
    assert len(set(pointers)) == 3 and pointers[:3] == pointers[3:6]  # three buffers, in turn
    assert collate([data[0]])[IMAGE].shape == (1, 1, 6, 5, 4)
    with pytest.raises(ValueError, match="slots"):
        RingCollate(torch.device("cpu"), slots=1)


def test_the_thread_loader_keeps_each_batch_intact_while_the_step_and_the_next_use_it():
    """The loader prefetches two batches and collates a third: with five slots the batch a step holds and the one
    before it are never overwritten, however far ahead the loader's thread runs."""
    data = Volumes(40)
    loader = make_loader(data, LoaderConfig(batch_size=2, num_workers=None), torch.device("cpu"))
    assert isinstance(loader.collate_fn, RingCollate)
    previous = None
    for i, batch in enumerate(loader):
        expected = torch.stack(data.images[2 * i:2 * i + 2])
        assert torch.equal(batch[IMAGE], expected)
        if previous is not None:
            assert torch.equal(previous[0][IMAGE], previous[1]), f"batch {i - 1} overwritten"
        time.sleep(0.002)  # the loader's thread runs ahead meanwhile
        previous = (batch, expected)
    assert len({id(s.buffer) for ring in loader.collate_fn.rings.values() for s in ring.slots}) == 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_batches_reach_the_device_without_a_host_sync_and_intact():
    """The ring's pinned buffers, the side stream's copy and the step stream's wait: no host synchronisation from
    the loader to the trainer's prepare_batch (CUDA's sync debug mode raises on one), the values as collated."""
    from engine.training.build import prepare_batch

    data, device = Volumes(24), torch.device("cuda")
    loader = make_loader(data, LoaderConfig(batch_size=4, num_workers=None), device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        seen = []
        for batch in loader:
            image, label = prepare_batch(batch, device, non_blocking=True)
            seen.append((image * 2).sum(dim=(1, 2, 3, 4)))  # work on the compute stream, read back below
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = [torch.stack(data.images[i:i + 4]).float().mul(2).sum(dim=(1, 2, 3, 4)) for i in range(0, 24, 4)]
    assert all(torch.allclose(s.cpu(), e) for s, e in zip(seen, expected))


def test_a_share_partly_in_ram_stays_on_the_thread_path_and_threads_read_the_rest(tmp_path, tiny_demo, monkeypatch):
    import threading

    from engine.config.loading import load_config
    from engine.data.cache import build_dataset
    from engine.data.loaders import loader_workers
    from engine.data.prepare import load_splits

    monkeypatch.setattr("engine.data.loaders.spare_cpus", lambda: 3)
    cfg = load_config(None, [f"data.train={tiny_demo}", f"cache.dir={tmp_path}", "preprocess.spatial_size=[16,16,16]"])
    items = load_splits(cfg.data)[0][:12]
    dataset = build_dataset(items, cfg.preprocess, tmp_path, 0.5, 1)  # the first 6 in RAM, 6 from the disk cache
    assert loader_workers(LoaderConfig(), dataset) == 0
    expected = torch.stack([dataset[i][IMAGE] for i in range(12)])
    readers = set()
    read = type(dataset.images.data).__getitem__

    def seen(self, index):
        readers.add(threading.current_thread().name)
        return read(self, index)

    monkeypatch.setattr(type(dataset.images.data), "__getitem__", seen)
    loader = make_loader(dataset, LoaderConfig(batch_size=4, num_workers=None), torch.device("cpu"))
    got = torch.cat([batch[IMAGE] for batch in loader])
    assert torch.equal(got, expected)
    assert dataset.readers == 3 and readers and all(name.startswith("ct3d-read") for name in readers)
