"""The ranks under torchrun: the process group (joined once every rank has started) and rank 0 deciding for all.
Our own where torch and Ignite fall short: each says why."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from datetime import timedelta
from typing import Callable

import ignite.distributed as idist
import torch
import torch.distributed as dist

from engine.config.schema import CacheConfig, DataConfig, PreprocessConfig
from engine.data.items import Problem
from engine.data.prepare import Splits, prepare_data
from engine.utils.errors import CT3DError


def init_process_group(backend: str, timeout: timedelta) -> None:
    """The process group, then ignite.distributed on it. Our own: after a worker died, torchrun's c10d
    rendezvous hands the restarted workers the agent's shared store, which still holds the dead group's
    addresses, so each attempt (TORCHELASTIC_RESTART_COUNT) gets keys of its own. Without that sharing
    (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as our pods run) rank 0 hosts a new store each round and the
    attempt counts may differ (a replaced pod's agent starts from 0): no prefix then. The ranks meet on the store
    (under a start-up timeout of at least 10 minutes) before the group exists, so one rank starting seconds after
    another (imports on a busy node) does not count against the collectives' timeout."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        idist.initialize(backend, timeout=timeout)
        return
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not hosted_by_agent, timeout=max(timeout, timedelta(minutes=10)))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    prefix = f"ct3d/attempt_{attempt}" if hosted_by_agent else "ct3d"
    meeting = dist.PrefixStore(f"{prefix}/started", store)
    if meeting.add("ranks", 1) == world:
        meeting.set("all", "1")
    meeting.wait(["all"])
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank,
                            world_size=world, timeout=timeout)
    idist.sync()


def on_rank_0(fn):
    """fn() on rank 0, its result (or the error it raised: the same CT3DError, or a RuntimeError saying what
    rank 0 met) on every rank; with one process, fn()."""
    if idist.get_world_size() == 1:
        return fn()
    shared: list = [None]
    caught: BaseException | None = None
    if idist.get_rank() == 0:
        try:
            shared[0] = (fn(), None, False)
        except Exception as exc:  # noqa: BLE001 - every rank must leave the broadcast, then each raises
            caught, shared[0] = exc, (None, str(exc), isinstance(exc, CT3DError))
    dist.broadcast_object_list(shared, src=0)
    result, error, ours = shared[0]
    if caught is not None:
        raise caught
    if error is not None:
        raise CT3DError(error) if ours else RuntimeError(f"rank 0 failed: {error}")
    return result


def prepare_data_in_shares(data: DataConfig, preprocess: PreprocessConfig, cache: CacheConfig, timeout: float,
                           progress: bool, known: Callable[[dict], bool] | None = None) -> Splits:
    """Under torchrun rank 0 reads the datalists (and writes the demo's phantoms) once, the others receive the items;
    each rank checks and caches its own share of the volumes; the ranks then pool what they found."""
    rank, world = idist.get_rank(), idist.get_world_size()
    if world == 1:
        return prepare_data(data, preprocess, cache, progress, known=known)

    def pool(mine: list) -> list:
        # Where a cold cache makes ranks wait on the slowest: said in every pod's log before the wait, for NCCL's
        # watchdog ends a timed-out collective with its own words (docs/architecture.md, "Timeouts").
        logging.getLogger("ct3d.ranks").info(
            "rank %d: checked (and cached) its share of the volumes; waiting for the other ranks at most "
            "train.dist_timeout_minutes=%g: a rank still filling the cache by then ends the run. Fill the cache "
            "first (python -m engine.run cache --shard I/N) or raise the timeout", rank, timeout)
        every = idist.all_gather(json.dumps([asdict(p) for p in mine]))
        return [Problem(**p) for text in every for p in json.loads(text)]

    return prepare_data(data, preprocess, cache, progress, share=(rank, world), pool=pool,
                        once=on_rank_0, known=known)
