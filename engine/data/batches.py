"""Batches from the RAM cache without a fresh allocation each: samples are stacked into a ring of buffers
allocated once (pinned on CUDA) and, on CUDA, copied to the device on a side stream by the loader's thread while
the current step computes. Our own because PyTorch's default_collate allocates every batch anew: at CT-RATE's
256 x 256 x 128 a batch of 4 float16 volumes is 67 MB, above glibc's mmap threshold, so each one is mmapped,
faulted in page by page (4,096 faults a volume: 9-14 ms of CPU) and unmapped, then copied again into pinned
memory by DataLoader's pin_memory thread (bench/RESULTS.md, "Feeding")."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import default_collate

from engine.data.items import IMAGE, LABEL

READY = "ready"  # a batch's key for the CUDA event its device copy completes on (the consumer waits on it)


@dataclass
class _Slot:
    buffer: torch.Tensor
    copied: object = None  # the CUDA event after which the device copy has read the buffer


@dataclass
class _Ring:
    slots: list[_Slot] = field(default_factory=list)
    turn: int = 0


class RingCollate:
    """A DataLoader's collate_fn for loaders that collate in a thread of this process (not worker processes: the
    ring cannot be shared with them). `slots` buffers per batch shape, allocated as first used: the loader's
    prefetched batches, the one the step holds and the one being collated must never share one (the thread
    loader's queue of 2: 5 slots). A slot is written again only after the copy that read it has completed (CUDA: its
    event; the CPU: the step converts the batch to float32, a copy, or is done with it before the loader can come
    round to its slot again)."""

    def __init__(self, device: torch.device, slots: int = 5):
        if slots < 2:
            raise ValueError(f"slots: at least 2 (one collated while one is used), got {slots}")
        self.device, self.slots, self.rings = torch.device(device), slots, {}
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # the rank's device, whatever thread collates
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None

    def buffer(self, shape: tuple, dtype: torch.dtype) -> _Slot:
        """The next slot for batches of `shape`, safe to overwrite."""
        ring = self.rings.setdefault((shape, dtype), _Ring())
        index = ring.turn % self.slots
        ring.turn += 1
        if index == len(ring.slots):
            ring.slots.append(_Slot(torch.empty(shape, dtype=dtype, pin_memory=self.cuda)))
        slot = ring.slots[index]
        if slot.copied is not None:
            slot.copied.synchronize()  # this loader thread waits, not the training loop
        return slot

    def __call__(self, samples: list[dict]) -> dict:
        images = [torch.as_tensor(s[IMAGE]) for s in samples]
        labels = default_collate([s[LABEL] for s in samples])
        slot = self.buffer((len(images), *images[0].shape), images[0].dtype)
        for row, image in zip(slot.buffer, images):  # NumPy's copy: one thread, no OpenMP team spinning after it
            np.copyto(row.numpy(), image.numpy())  # (torch.stack(out=) cost 2-4x the copy on a busy 2-core node)
        if not self.cuda:
            return {IMAGE: slot.buffer, LABEL: labels}
        torch.cuda.set_device(self.device)  # the loader's thread: else leaving the stream context makes GPU 0 current
        with torch.cuda.stream(self.stream):  # overlaps the step computing on the default stream
            batch = {IMAGE: slot.buffer.to(self.device, non_blocking=True),
                     LABEL: labels.pin_memory().to(self.device, non_blocking=True)}
            slot.copied = torch.cuda.Event()
            slot.copied.record(self.stream)
        batch[READY] = slot.copied
        return batch


def ready(batch: dict) -> dict:
    """In the consuming thread: a side-stream batch made safe for the current stream (it waits for the copy, on the
    device, not the host; the caching allocator is told the tensors are used there)."""
    event = batch.pop(READY, None) if isinstance(batch, dict) else None
    if event is not None:
        stream = torch.cuda.current_stream(batch[IMAGE].device)
        stream.wait_event(event)
        for tensor in (batch[IMAGE], batch[LABEL]):
            tensor.record_stream(stream)
    return batch
