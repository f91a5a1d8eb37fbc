"""How data is dealt out, against the rules written here: shares, padding, the resumed epoch's skip, the order
gathered outputs come in, and the cache-fill shard a pod takes."""

import pytest
import torch

from engine.data.sharing import ShareSampler, gathered_order, parse_shard, shard
from engine.utils.errors import CT3DError


def test_gathered_order_is_each_ranks_share_in_rank_order():
    n, world = 7, 3
    shares = [shard(list(range(n)), rank, world) for rank in range(world)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert gathered_order(n, world) == [0, 3, 6, 1, 4, 2, 5] == sum(shares, [])
    assert gathered_order(4, 1) == [0, 1, 2, 3]


def test_a_share_is_padded_with_its_own_samples_to_the_steps_every_rank_takes():
    for size, per_rank in ((1, 3), (2, 5), (3, 3)):
        sampler = ShareSampler(list(range(size)), per_rank, seed=1)
        order = list(sampler)
        assert len(order) == len(sampler) == per_rank and set(order) == set(range(size))
        counts = [order.count(i) for i in range(size)]
        assert max(counts) - min(counts) <= 1  # padding repeats the shuffled share in turn
    assert len(list(ShareSampler(list(range(4)), 2, seed=1))) == 2


def test_a_resumed_epoch_skips_what_it_had_seen_once_and_the_next_is_whole():
    sampler = ShareSampler(list(range(6)), 6, seed=3)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.skip_next(2)
    assert list(sampler) == whole[2:]
    assert list(sampler) == whole  # the skip applies once
    reference = torch.utils.data.DistributedSampler(list(range(6)), num_replicas=1, rank=0, shuffle=True, seed=3)
    reference.set_epoch(4)
    assert whole == list(reference)


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
