"""Each rank's data: its shares of the training and validation sets (cached on disk and, within the
node's RAM budget, in RAM), the sampler and loaders over them, and the order gathered outputs come in."""

from __future__ import annotations

import logging
import math
import os
import time

import ignite.distributed as idist
import psutil
import torch
from monai.data import ThreadDataLoader
from monai.data.thread_buffer import ThreadBuffer

from engine.config.schema import CacheConfig, LoaderConfig, PreprocessConfig
from engine.data.batches import RingCollate, ready
from engine.data.cache import build_dataset, cached_share, in_ram
from engine.data.items import LABEL
from engine.data.sharing import ShareSampler, deal, shard
from engine.utils.errors import CT3DError
from engine.utils.machine import available_cpus, memory_limit

log = logging.getLogger("ct3d")


def volume_bytes(preprocess: PreprocessConfig) -> int:
    """One preprocessed volume in the caches: spatial_size voxels of preprocess.dtype."""
    return math.prod(preprocess.spatial_size) * (2 if preprocess.dtype == "float16" else 4)


def ram_budget(memory_rate: float, volumes: int, preprocess: PreprocessConfig) -> float:
    """The RAM cache rate that fits: every rank on this node (LOCAL_WORLD_SIZE) caches its share; above 80%
    of the memory available the rate is lowered (and the log says so), the rest read from the disk cache."""
    per_volume = volume_bytes(preprocess)
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need, available = volumes * per_volume * memory_rate * ranks, 0.8 * min(psutil.virtual_memory().available,
                                                                          memory_limit())
    if need <= available:
        return memory_rate
    rate = memory_rate * available / need
    log.warning("RAM cache: %d volumes x %.1f MB x %d rank(s) on this node need %.1f GB, more than 80%% of the "
                "%.1f GB available: caching %.0f%% of them in RAM (cache.memory_rate %.2f), the rest from disk; "
                "%.1f GB more for this pod would hold them all", volumes, per_volume / 1e6, ranks, need / 1e9,
                available / 0.8 / 1e9, 100 * rate, rate, (need - available) / 0.8 / 1e9)
    return rate


def shortfall(rate: float, memory_rate: float, train_volumes: int, preprocess: PreprocessConfig) -> str | None:
    """The run-wide line when the RAM cache holds less than 98% of what cache.memory_rate asked for: how many
    training volumes each epoch reads from the disk cache instead, and how much that is (the claim's bandwidth
    every epoch, worker processes' CPU); None when it holds (nearly) all."""
    if memory_rate <= 0 or rate >= 0.98 * memory_rate:
        return None
    per_volume = volume_bytes(preprocess)
    uncached = round(train_volumes * (1 - rate))
    return (f"RAM cache holds {rate:.0%} of the data set ({train_volumes - uncached} of {train_volumes} training "
            f"volumes): every epoch reads {uncached} volumes, {uncached * per_volume / 1e9:.1f} GB, from the disk "
            f"cache (reader threads). More pod memory (the warning above says how much) or fewer ranks per "
            f"node keeps the whole share in RAM (docs/training.md, Caches)")


def make_datasets(train_items: list[dict], val_items: list[dict], preprocess: PreprocessConfig, cache: CacheConfig,
                  seed: int, progress: bool):
    """This rank's shares of the training set (sharing.deal: a seeded permutation dealt in turn; the dataset's
    `rows` and `total` say which rows of all, for its sampler) and of the validation set (every world-th item
    from its rank: sharing.gathered_order), each cached on disk and, within the RAM budget, in RAM: a node holds
    about one copy of the data set, whatever its number of ranks. The budget is read by every rank at one moment
    (after a barrier, before any fills) and the lowest rate taken, so ranks that start filling early do not
    shrink a later one's."""
    world = idist.get_world_size()
    rows, *shares = rank_shares(train_items, val_items, seed)
    if world > 1:  # every rank measures the node's memory at one moment, before any of them fills its cache
        idist.barrier()
    rate = ram_budget(cache.memory_rate, sum(map(len, shares)), preprocess)
    if world > 1:  # and all take the lowest rate: one budget for the run, whatever each rank read
        rate = float(idist.all_reduce(float(rate), op="MIN"))
    short = shortfall(rate, cache.memory_rate, len(train_items), preprocess)
    if short and idist.get_rank() == 0:
        log.warning(short)
    disk, start = cache.dir if cache.disk else None, time.monotonic()
    train_ds, val_ds = (build_dataset(items, preprocess, disk, rate, cache.workers, progress)
                        for items in shares)
    if rate > 0:  # a restarted pod pays this again before its first step
        log.info("RAM cache: this rank's %d volumes filled in %.0f s", sum(map(len, shares)), time.monotonic() - start)
    train_ds.rows, train_ds.total = rows, len(train_items)
    return train_ds, val_ds


def rank_shares(train_items: list[dict], val_items: list[dict], seed: int) -> tuple[list[int], list[dict], list[dict]]:
    """This rank's training rows (of all), its training items and its validation items (see make_datasets)."""
    rank, world = idist.get_rank(), idist.get_world_size()
    if len(train_items) < world:  # every rank decides alike: none is left waiting for the others
        raise CT3DError(f"{len(train_items)} training volume(s) for {world} ranks: each rank needs at least one; "
                        f"lower --nproc-per-node")
    val_share = shard(val_items, rank, world)
    if not val_share:  # fewer validation volumes than ranks: validate a stand-in the metrics leave out
        val_share = [{**val_items[0], LABEL: [float("nan")] * len(val_items[0][LABEL])}]
    rows = deal(len(train_items), world, seed)[rank]
    return rows, [train_items[i] for i in rows], val_share


def make_loader(dataset, loader: LoaderConfig, device: torch.device, shuffle_seed: int | None = None,
                per_rank: int | None = None):
    """Training (`shuffle_seed` given): a ShareSampler over this rank's share (the dataset's `rows` of `total`;
    without them, the whole of it), `per_rank` samples an epoch.
    Validation: the share in order, unpadded, so gathered metrics count each sample once."""
    shuffle = shuffle_seed is not None
    if shuffle:
        rows = getattr(dataset, "rows", None)
        rows, total = (list(range(len(dataset))), len(dataset)) if rows is None else (rows, dataset.total)
        sampler = ShareSampler(dataset, rows, total, per_rank or len(dataset), shuffle_seed)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    batch_size = loader.batch_size if shuffle else loader.val_batch_size or loader.batch_size
    # A last training batch of one sample breaks BatchNorm: drop it (the sampler reshuffles each epoch).
    drop_last = shuffle and len(sampler) % batch_size == 1 and len(sampler) > 1
    workers = loader_workers(loader, dataset)
    if loader.num_workers is None and workers == 0 and not in_ram(dataset):  # partly in RAM: reader threads
        dataset.readers = spare_cpus()
    kwargs = dict(batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=drop_last,
                  pin_memory=loader.pin_memory and device.type == "cuda", persistent_workers=workers > 0,
                  worker_init_fn=own_process_group if workers > 0 else None)
    if loader.num_workers is None and workers == 0:  # collated into a ring of buffers (batches.py), pinned on CUDA
        kwargs.update(collate_fn=RingCollate(device, slots=2 + 3), pin_memory=False)  # queue of 2, see RingCollate
        return thread_loader_class()(dataset, buffer_size=2, **kwargs)
    return torch.utils.data.DataLoader(dataset, **kwargs)


def own_process_group(worker_id: int) -> None:
    """A loader worker process leaves its rank's process group: torchrun signals each rank's whole group with
    SIGTERM, and a worker dying of it kills the rank (its SIGCHLD handler raises) before the interruption
    checkpoint. Out of the group, only its rank ends it (a signal to its pid: multiprocessing's terminate at exit
    still works, which ignoring SIGTERM would turn into a hang), or notices its rank is gone and leaves."""
    os.setpgid(0, 0)


def thread_loader_class():
    """MONAI's ThreadDataLoader (a thread prefetches batches) that raises what went wrong in its thread: our
    own part because MONAI's ThreadBuffer drops the exception and the epoch just ends early."""

    class Buffer(ThreadBuffer):
        error: BaseException | None = None

        def enqueue_values(self):
            try:
                super().enqueue_values()
            except BaseException as exc:  # noqa: BLE001 - raised again in the training loop
                self.error = exc

        def __iter__(self):
            yield from super().__iter__()
            if self.error is not None:
                raise self.error

    class ThreadLoader(ThreadDataLoader):
        def __iter__(self):
            for batch in Buffer(torch.utils.data.DataLoader.__iter__(self), self.buffer_size, self.buffer_timeout):
                yield ready(batch)  # a batch copied to the GPU on the loader's stream: the step's stream waits

    return ThreadLoader


def loader_workers(loader: LoaderConfig, dataset) -> int:
    """`loader.num_workers`, or when unset: 0 for a dataset wholly or partly in the RAM cache (worker processes
    would only copy it: 2 workers took +0.9 GB peak PSS and 1.43x the epoch time on a 48-volume ResNet-18 run,
    bench/RESULTS.md; what is not in RAM is read by threads, see Labelled.__getitems__), else one per spare CPU of
    this rank, at most 4, to read and decode the disk cache while the model trains."""
    if loader.num_workers is not None:
        return loader.num_workers
    if in_ram(dataset) or cached_share(dataset) > 0:  # partly: the thread path, its rest read by threads
        return 0
    return spare_cpus()


def spare_cpus() -> int:
    """One per CPU of this rank's share of the pod but one (the training loop's), at least 1, at most 4."""
    cpus = available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(4, cpus - 1))
