"""How the data is dealt out: each rank's share of a split and the sampler over it, the order gathered
validation outputs come back in, and the shards of a cache fill (`cache --shard I/N`, a Kubernetes Indexed
Job's pods). Small and pure, so mutation testing covers it (docs/testing.md)."""

from __future__ import annotations

import os

import torch

from engine.utils.errors import CT3DError


class ShareSampler(torch.utils.data.DistributedSampler):
    """A rank's share of the training set (all it holds in RAM), shuffled each epoch from (seed, epoch) as
    torch's DistributedSampler does (with one rank, the very same order) and padded with repeats to
    `per_rank`, so every rank takes as many steps. `skip_next` skips the first samples of the next epoch
    once: a run resumed mid-epoch sees exactly the batches it had not seen yet."""

    def __init__(self, share, per_rank: int, seed: int):
        # the parent's own sampling is replaced below: it keeps the share, seed and epoch
        super().__init__(share, num_replicas=1, rank=0, shuffle=True, seed=seed)  # pragma: no mutate
        self.per_rank, self._skip = per_rank, 0

    def __len__(self) -> int:
        return self.per_rank

    def skip_next(self, samples: int) -> None:
        self._skip = samples

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        order = (order * (self.per_rank // max(1, len(order)) + 1))[: self.per_rank]
        indices, self._skip = order[self._skip:], 0
        return iter(indices)


def parse_shard(text: str | None) -> tuple[int, int]:
    """`I/N` (0 <= I < N); without it JOB_COMPLETION_INDEX / JOB_COMPLETIONS (a Kubernetes Indexed Job's pod
    index, and the completions the manifest passes), else the whole list (0/1)."""
    if text is None:
        index, count = os.environ.get("JOB_COMPLETION_INDEX"), os.environ.get("JOB_COMPLETIONS")
        text = f"{index}/{count}" if index is not None and count is not None else "0/1"
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise CT3DError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= index < count:
        raise CT3DError(f"--shard {text!r}: needs 0 <= I < N")
    return index, count


def shard(items: list, index: int, count: int) -> list:
    """Every count-th item from `index`: disjoint shares that together are the whole list."""
    return items[index::count]


def gathered_order(n: int, world: int) -> list[int]:
    """Dataset rows in the order validation outputs are gathered: each rank's share (every world-th row,
    from its rank, as make_datasets gives it) in rank order."""
    return [i for rank in range(world) for i in range(rank, n, world)]
