"""How data is dealt out, against the rules written here: shares, padding, the resumed epoch's skip, the order
gathered outputs come in, and the cache-fill shard a pod takes."""

import pytest
import torch

from engine.data.sharing import ShareSampler, deal, gathered_order, parse_shard, shard
from engine.utils.errors import CT3DError


def test_gathered_order_is_each_ranks_share_in_rank_order():
    n, world = 7, 3
    shares = [shard(list(range(n)), rank, world) for rank in range(world)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert gathered_order(n, world) == [0, 3, 6, 1, 4, 2, 5] == sum(shares, [])
    assert gathered_order(4, 1) == [0, 1, 2, 3]


def test_a_share_is_padded_with_its_own_samples_to_the_steps_every_rank_takes():
    for size, per_rank in ((1, 3), (2, 5), (3, 3)):
        sampler = ShareSampler(list(range(size)), list(range(size)), size, per_rank, seed=1)
        order = list(sampler)
        assert len(order) == len(sampler) == per_rank and set(order) == set(range(size))
        counts = [order.count(i) for i in range(size)]
        assert max(counts) - min(counts) <= 1  # padding repeats the shuffled share in turn
    assert len(list(ShareSampler(list(range(4)), list(range(4)), 4, 2, seed=1))) == 2


def test_a_resumed_epoch_skips_what_it_had_seen_once_and_the_next_is_whole():
    sampler = ShareSampler(list(range(6)), list(range(6)), 6, 6, seed=3)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.skip_next(2)
    assert list(sampler) == whole[2:]
    assert list(sampler) == whole  # the skip applies once
    reference = torch.utils.data.DistributedSampler(list(range(6)), num_replicas=1, rank=0, shuffle=True, seed=3)
    reference.set_epoch(4)
    assert whole == list(reference)


def test_shares_are_dealt_from_a_seeded_permutation_in_turn():
    n, world = 11, 3
    shares = deal(n, world, seed=4)
    generator = torch.Generator()
    generator.manual_seed(7_919_000_017 + 4)
    order = torch.randperm(n, generator=generator).tolist()
    assert shares == [sorted(order[r::world]) for r in range(world)]  # dealt in turn: sizes 4, 4, 3
    assert sorted(sum(shares, [])) == list(range(n)) and [len(s) for s in shares] == [4, 4, 3]
    assert deal(5, 1, seed=9) == [[0, 1, 2, 3, 4]]
    assert deal(n, world, seed=5) != shares  # the seed decides


def global_batches(n: int, world: int, batch: int, epoch: int, seed: int = 0) -> list[set[int]]:
    """The rows in each global batch (every rank's batch of one step) of an epoch."""
    per_rank = -(-n // world)
    orders = []
    for rows in deal(n, world, seed):
        sampler = ShareSampler(rows, rows, n, per_rank, seed)
        sampler.set_epoch(epoch)
        orders.append([rows[i] for i in sampler])
    return [{row for order in orders for row in order[step * batch:(step + 1) * batch]}
            for step in range(per_rank // batch)]


def test_one_rank_takes_the_epochs_permutation_of_every_row():
    n = 9
    sampler = ShareSampler(list(range(n)), list(range(n)), n, n, seed=2)
    sampler.set_epoch(3)
    generator = torch.Generator()
    generator.manual_seed(2 + 3)
    assert list(sampler) == torch.randperm(n, generator=generator).tolist()
    rows = [1, 4, 6]  # a share takes its own rows in the order of the epoch's permutation of all
    share = ShareSampler(rows, rows, n, 3, seed=2)
    share.set_epoch(3)
    everything = torch.randperm(n, generator=generator.manual_seed(5)).tolist()
    assert [rows[i] for i in share] == [row for row in everything if row in rows]


def test_neighbouring_rows_share_a_global_batch_no_more_often_than_chance():
    """W=4 ranks, 2 samples each per step, 3 epochs. Chance, for a uniformly random global batch of G=8 rows out of
    N: (G-1)/(N-1) per pair and epoch. Before, each rank shuffled items[rank::W] with one seed: every global batch
    was blocks of W neighbouring rows, every epoch (the control below)."""
    n, world, batch, epochs = 400, 4, 2, 3
    pairs = [(i, i + 1) for i in range(n - 1)]
    together = {pair: 0 for pair in pairs}
    for epoch in range(1, epochs + 1):
        batches = global_batches(n, world, batch, epoch)
        assert sorted(row for b in batches for row in b) == list(range(n))  # every row once an epoch
        for b in batches:
            for i in b:
                if i + 1 in b:
                    together[(i, i + 1)] += 1
    chance = (world * batch - 1) / (n - 1)
    expected, spread = len(pairs) * epochs * chance, (len(pairs) * epochs * chance * (1 - chance)) ** 0.5
    observed = sum(together.values())
    assert observed <= expected + 4 * spread, (observed, expected)
    assert max(together.values()) < epochs  # no pair together in every epoch
    assert global_batches(n, world, batch, 1) != global_batches(n, world, batch, 2)

    def old_batches(epoch: int) -> list[set[int]]:  # the control: the old dealing fails the same count
        orders = []
        for rank in range(world):
            sampler = torch.utils.data.DistributedSampler(list(range(rank, n, world)), num_replicas=1, rank=0,
                                                          shuffle=True, seed=0)
            sampler.set_epoch(epoch)
            orders.append([rank + world * i for i in sampler])
        return [{row for order in orders for row in order[s * batch:(s + 1) * batch]}
                for s in range(n // world // batch)]

    old = sum(1 for epoch in range(1, epochs + 1) for b in old_batches(epoch) for i in b if i + 1 in b)
    assert old > expected + 4 * spread


def test_the_shard_of_a_cache_fill_comes_from_the_flag_or_both_indexed_job_variables(monkeypatch):
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    monkeypatch.delenv("JOB_COMPLETIONS", raising=False)
    assert parse_shard(None) == (0, 1) and parse_shard("1/3") == (1, 3)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert parse_shard(None) == (0, 1)  # the index without the count is not a shard
    monkeypatch.setenv("JOB_COMPLETIONS", "4")
    assert parse_shard(None) == (2, 4)
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    assert parse_shard(None) == (0, 1)
    for bad in ("3/3", "x/2", "-1/2"):
        with pytest.raises(CT3DError, match="--shard"):
            parse_shard(bad)
