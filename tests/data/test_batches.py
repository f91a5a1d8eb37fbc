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
