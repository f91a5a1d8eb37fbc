"""How the data is dealt out: each rank's share of a split and the sampler over it, the order gathered
validation outputs come back in, and the shards of a cache fill (`cache --shard I/N`, a Kubernetes Indexed
Job's pods). Small and pure, so mutation testing covers it (docs/testing.md)."""

from __future__ import annotations

import os

import torch

from engine.utils.errors import CT3DError


def deal(n: int, world: int, seed: int) -> list[list[int]]:
    """Each rank's share of `n` training rows (indices, in datalist order): a seeded permutation dealt in
    turn, so shares differ by at most one row and neighbouring rows (a scan's reconstructions) meet on a rank
    no more often than any two rows. Fixed for a run (seed and world size): each rank caches its share in RAM.
    With one rank: every row."""
    generator = torch.Generator()
    generator.manual_seed(DEAL_SEED + seed)
    order = torch.randperm(n, generator=generator)
    return [sorted(order[rank::world].tolist()) for rank in range(world)]


DEAL_SEED = 7_919_000_017  # shares come from another stream than the epochs' orders (seed + epoch)


class ShareSampler(torch.utils.data.DistributedSampler):
    """A rank's share of the training set (`share`: its rows' indices among all `total`, all it holds in RAM),
    in the order of the epoch's one permutation of the whole training set from (seed, epoch): every rank takes
    its own rows in that order, so which rows share a global batch changes every epoch (with one rank: torch's
    DistributedSampler's order). Padded with repeats to `per_rank`, so every rank takes as many steps.
    `skip_next` skips the first samples of the next epoch once: a run resumed mid-epoch sees exactly the
    batches it had not seen yet."""

    def __init__(self, dataset, share: list[int], total: int, per_rank: int, seed: int):
        if len(share) != len(dataset):
            raise ValueError(f"share: {len(share)} rows for a dataset of {len(dataset)}")
        # the parent's own sampling is replaced below: it keeps the dataset, seed and epoch
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)  # pragma: no mutate
        self.share, self.total, self.per_rank, self._skip = list(share), total, per_rank, 0

    def __len__(self) -> int:
        return self.per_rank

    def skip_next(self, samples: int) -> None:
        self._skip = samples

    def __iter__(self):
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        everything = torch.randperm(self.total, generator=generator)
        local = torch.full((self.total,), -1, dtype=torch.long)
        local[self.share] = torch.arange(len(self.share))
        order = local[everything]
        order = order[order >= 0].tolist()  # this rank's rows, in the epoch's order
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
