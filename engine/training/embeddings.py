"""The embedding cache: a frozen pretrained encoder (model.freeze, merlin / ctfm) runs once per volume and its
features are kept, so its head then trains in seconds an epoch on the same workflow (metrics, calibration,
early stopping, checkpoints, report). Our own code because MONAI's PersistentDataset caches a transform's output
per item, one file each, named by the transforms alone: here 47,000 rows of 4 KB keyed by the network's weights.

A folder under cache.dir/embeddings per (preprocessing and its code version, the encoder, its weights' digest,
the pooling, the stored dtype and the precision it ran in): `manifest.json` says what it holds, in words; each
`shard-*.safetensors` holds up to PER_SHARD embeddings and the volumes' cache-entry names (the source's path,
size, time and metadata, as the disk cache names them), written atomically. A killed extraction leaves whole
shards only and the next one computes the missing volumes; `embed --shard I/N` (and each torchrun rank) takes
the volumes whose names `shard_of_entry` gives it, so shards never write the same volume. An unreadable shard
(a foreign or damaged file) is removed and its volumes are done again."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from pathlib import Path

import ignite.distributed as idist
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from engine.config.loading import plain
from engine.config.schema import ENCODER_PREPROCESSING, AugmentConfig, CacheConfig, ModelConfig, PreprocessConfig
from engine.data.cache import collate_readable, read_volumes
from engine.data.cache_keys import cache_key, shard_of_entry, source_hash
from engine.data.items import IMAGE, LABEL, NAME, WHERE, Problem
from engine.data.loaders import own_process_group, rank_shares
from engine.data.prepare import disk_dir
from engine.data.preprocess import source_of
from engine.training.encoders import CtfmEncoder, MerlinEncoder, ctfm_config, sha256, weights_file
from engine.utils.errors import CT3DError, Transient
from engine.utils.io import TRANSIENT_ERRNOS, atomic_write, write_json
from engine.utils.progress import tracked

log = logging.getLogger("ct3d")
EMBEDDINGS_FORMAT = 1  # bump when what a shard holds changes
PER_SHARD = 256  # embeddings per shard file (2048-d float16: 1 MB); a kill loses at most one shard's work
SHARD_SECONDS = 120.0  # or a shard at least this often, whatever its size
POOLING = {"merlin": "global average of layer4", "ctfm": "global average of the last level"}
EMBEDDINGS = "embeddings"


def applies(model: ModelConfig, augment: AugmentConfig, cache: CacheConfig) -> bool:
    """Whether the head trains from cached embeddings: a frozen pretrained encoder sees every volume the same way
    each epoch only when nothing augments it."""
    return str(model.name) in ENCODER_PREPROCESSING and model.freeze and not augment.enabled and cache.embeddings


def entry_name(item: dict) -> str:
    """A volume's name in the cache: its disk-cache entry's (the source file's path under data.image_root, size
    and time, and the metadata applied to it), so an edited volume is a new embedding."""
    return source_hash(source_of(item)).decode()


def weights_digest(encoder: torch.nn.Module, record: dict) -> str:
    """The encoder's weights by their file's SHA-256; randomly initialised (no model.weights: tests, smoke runs)
    by the SHA-256 of its tensors."""
    if record.get("sha256"):
        return record["sha256"]
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def manifest_for(name: str, digest: str, features: int, network: dict | None, p: PreprocessConfig, dtype: str,
                 precision: torch.dtype | None, file: str = "(random weights)") -> dict:
    """What one embedding folder holds; every key that changes an embedding, so its hash names the folder."""
    return {"format": EMBEDDINGS_FORMAT, "encoder": name, "weights_sha256": digest, "weights_file": file,
            "network": network, "pooling": POOLING[name], "features": int(features), "dtype": dtype,
            "precision": str(precision or torch.float32).removeprefix("torch."),
            "volume_cache_key": cache_key(p), "preprocessing": plain(p)}


def open_cache(net: torch.nn.Module, name: str, p: PreprocessConfig, cache: CacheConfig,
               precision: torch.dtype | None) -> EmbeddingCache:
    """The embedding folder of `net`'s encoder (an EncoderClassifier with its weights loaded) under cache.dir."""
    return EmbeddingCache(cache.dir, manifest_for(
        name, weights_digest(net.encoder, net.weights), net.encoder.features, net.weights.get("config"), p,
        str(cache.embedding_dtype), precision, net.weights.get("file", "(random weights)")))


def planned_cache(model: ModelConfig, p: PreprocessConfig, cache: CacheConfig,
                  precision: torch.dtype | None) -> EmbeddingCache | None:
    """The folder a probe of model.weights will read, known before its network is built (None for random
    weights: their digest needs the network), so the start-up's data check can pass over volumes it holds."""
    if not model.weights:
        return None
    name = str(model.name)
    path = weights_file(name, model.weights, model.weights_revision)
    network = ctfm_config(model.weights, model.weights_revision) if name == "ctfm" else None
    features = MerlinEncoder.features if name == "merlin" else CtfmEncoder.width(network)
    return EmbeddingCache(cache.dir, manifest_for(name, sha256(path), features, network, p,
                                                  str(cache.embedding_dtype), precision, str(path)))


class EmbeddingCache:
    """One folder of embeddings (see the module's docstring): which volumes it holds, new shards, the table."""

    def __init__(self, root: str | Path, manifest: dict):
        text = json.dumps({k: v for k, v in manifest.items() if k != "weights_file"}, sort_keys=True)
        self.folder = Path(root) / EMBEDDINGS / hashlib.sha256(text.encode()).hexdigest()[:16]
        self.manifest, self.dtype = manifest, getattr(torch, manifest["dtype"])
        self._where: dict[str, tuple[Path, int]] | None = None

    def open(self) -> EmbeddingCache:
        """Makes the folder and writes its manifest (every writer writes the same; atomically)."""
        if not (self.folder / "manifest.json").is_file():
            write_json(self.folder / "manifest.json", self.manifest)
        return self

    def holds(self, item: dict) -> bool:
        """Whether the volume of `item` has its embedding here (it was read, and readable, when extracted)."""
        return entry_name(item) in self.where()

    def where(self) -> dict[str, tuple[Path, int]]:
        """Each cached volume's shard and row, from the shards' headers; an unreadable shard is removed."""
        if self._where is None:
            self._where = {}
            for path in sorted(self.folder.glob("shard-*.safetensors")):
                try:
                    with safe_open(str(path), "pt") as f:
                        names = json.loads(f.metadata()["names"])
                        rows = f.get_slice(EMBEDDINGS).get_shape()[0]
                    if rows != len(names):
                        raise ValueError(f"{rows} rows for {len(names)} names")
                except OSError as exc:
                    if exc.errno in TRANSIENT_ERRNOS:
                        raise Transient(f"embeddings: {path} could not be read ({exc.strerror or exc})") from None
                    self._drop(path, exc)
                    continue
                except Exception as exc:  # safetensors' own errors: a truncated or foreign file
                    self._drop(path, exc)
                    continue
                self._where.update({name: (path, row) for row, name in enumerate(names)})
        return self._where

    def _drop(self, path: Path, why: Exception) -> None:
        log.warning("embeddings: %s is unreadable (%s): removed, its volumes are extracted again", path, why)
        path.unlink(missing_ok=True)

    def write(self, names: list[str], rows: torch.Tensor, tag: str) -> Path:
        path = self.folder / f"shard-{tag}-{uuid.uuid4().hex[:12]}.safetensors"
        data = save({EMBEDDINGS: rows.to(self.dtype).contiguous()}, metadata={"names": json.dumps(names)})
        with atomic_write(path) as tmp:
            tmp.write_bytes(data)
        if self._where is not None:
            self._where.update({name: (path, row) for row, name in enumerate(names)})
        return path

    def table(self, names: list[str]) -> torch.Tensor:
        """The embeddings of `names` in that order (N, features), in the stored dtype."""
        where, shards = self.where(), {}
        missing = [n for n in names if n not in where]
        if missing:
            raise CT3DError(f"embeddings: {len(missing)} volume(s) missing from {self.folder} (removed while "
                            f"training started?); run `python -m engine.run embed` again")
        out = torch.empty(len(names), self.manifest["features"], dtype=self.dtype)
        for i, name in enumerate(names):
            path, row = where[name]
            if path not in shards:
                shards[path] = load_file(str(path))[EMBEDDINGS]
            out[i] = shards[path][row]
        return out


def extract(encoder: torch.nn.Module, cache: EmbeddingCache, items: list[dict], p: PreprocessConfig,
            disk_dir: str | None, device: torch.device, precision: torch.dtype | None, batch_size: int,
            workers: int, shard: tuple[int, int] = (0, 1), progress: bool = False) -> dict:
    """Runs `encoder` on every volume of `items` that `shard` (I, N) owns and `cache` lacks, writing shards as it
    goes; volumes are read from the disk cache where it holds them, else preprocessed (and not kept). Returns
    counts and the bad volumes (each a Problem naming it)."""
    cache.open()
    index, count = shard
    names = {entry_name(it): it for it in items}
    mine = {n: it for n, it in names.items() if shard_of_entry(n, count) == index}
    todo = [(n, it) for n, it in mine.items() if n not in cache.where()]  # (entry name, item)
    counts = {"volumes": len(names), "owned": len(mine), "cached": len(mine) - len(todo), "extracted": 0,
              "problems": []}
    if not todo:
        return counts
    loader = torch.utils.data.DataLoader(read_volumes([it for _, it in todo], p, disk_dir), batch_size=batch_size,
                                         num_workers=workers, collate_fn=collate_readable,
                                         worker_init_fn=own_process_group if workers else None)
    tag, done, rows, started = f"{index}of{count}", [], [], time.monotonic()
    encoder = encoder.eval()
    with torch.inference_mode():
        for errors, batch in tracked(loader, len(loader), "extracting embeddings") if progress else loader:
            for e in errors:
                item = todo[e["index"]][1]
                counts["problems"].append(Problem(item.get(WHERE, item[NAME]), e["error"], item[NAME]))
            if batch is not None:
                with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
                    rows.append(encoder(batch[IMAGE].to(device).float()).float().cpu())
                done += [todo[i][0] for i in batch["index"]]
            if len(done) >= PER_SHARD or (done and time.monotonic() - started > SHARD_SECONDS):
                cache.write(done, torch.cat(rows), tag)
                counts["extracted"] += len(done)
                done, rows, started = [], [], time.monotonic()
    if done:
        cache.write(done, torch.cat(rows), tag)
        counts["extracted"] += len(done)
    return counts


class Embedded(torch.utils.data.Dataset):
    """Cached embeddings joined with their items' labels, as a volume dataset gives images: {IMAGE, LABEL}.
    Held in RAM whole (47,000 x 2048 float16: 190 MB), so loaders need no worker processes."""

    in_ram = True

    def __init__(self, table: torch.Tensor, items: list[dict]):
        self.table, self.items = table, items
        self.rows: list[int] | None = None  # as Labelled: a rank's training share of `total` rows
        self.total = len(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return {IMAGE: self.table[index], LABEL: torch.tensor(self.items[index][LABEL])}


def head_datasets(net: torch.nn.Module, name: str, train_items: list[dict], val_items: list[dict], p: PreprocessConfig,
                  cache: CacheConfig, device: torch.device, precision: torch.dtype | None, batch_size: int,
                  seed: int, progress: bool = False) -> tuple[Embedded, Embedded, dict]:
    """The head's training and validation sets from cached embeddings of `net`'s frozen encoder: each rank
    extracts the missing ones it owns, then every rank reads its shares (as make_datasets deals volumes) from
    the folder. Returns them and what summary.json records of the cache."""
    rank, world = idist.get_rank(), idist.get_world_size()
    store = open_cache(net, name, p, cache, precision)
    counts = extract(net.encoder, store, train_items + val_items, p, disk_dir(cache), device, precision,
                     batch_size, cache.workers, (rank, world), progress)
    if counts["problems"]:
        raise CT3DError(f"embeddings: {len(counts['problems'])} volume(s) could not be read: "
                        + "; ".join(map(str, counts["problems"][:5])))
    if world > 1:
        extracted = int(idist.all_reduce(counts["extracted"]))
        idist.barrier()
    else:
        extracted = counts["extracted"]
    store._where = None  # the other ranks' shards too
    total = counts["volumes"]
    log.info("embeddings: %s in %s", f"{extracted} of {total} volumes extracted" if extracted else
             f"all {total} volumes cached: no extraction", store.folder)
    rows, train_share, val_share = rank_shares(train_items, val_items, seed)
    train_ds = Embedded(store.table([entry_name(it) for it in train_share]), train_share)
    train_ds.rows, train_ds.total = rows, len(train_items)
    val_ds = Embedded(store.table([entry_name(it) for it in val_share]), val_share)
    return train_ds, val_ds, {"folder": str(store.folder), "volumes": total, "extracted": extracted,
                              "dtype": str(cache.embedding_dtype)}
