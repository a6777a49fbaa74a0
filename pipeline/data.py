"""Streaming loaders over the shards: WebDataset readers split by rank and DataLoader worker.

Splitting is by shard, planned from the manifest's per-shard counts, so it is exact and needs no
communication between ranks:
- evaluation: shard i goes to reader i mod (R * W) (reader = rank * W + worker): every sample is
  seen exactly once across all ranks and workers; readers without a shard yield nothing.
- training: each epoch the shards are shuffled (seed, epoch) and dealt largest first, each to the
  rank with the fewest samples so far, then within each rank to its workers the same way. Each
  worker batches its own stream with
  ``drop_last``; a rank has sum over its workers of floor(n_worker / B) full batches, and every rank
  runs the minimum of that over ranks (DDP needs equal step counts, and no rank can then wait for a
  batch that never comes). Each sample is used at most once per epoch; the ones left out are
  counted (``LoaderPlan.left_out``) and logged by the training loop.
Shard URLs may be local paths, ``pipe:`` commands or anything fsspec opens (``pipeline/storage.py``),
so a cluster streams from object storage with the same code.

What crosses from the workers is uint8: each worker decodes (libjpeg-turbo through torchvision),
crops, resizes and flips in torch (``bireal_core.augment.ImageRecipe``: torchvision's draws, torch's
uint8 antialiased resize) and draws the lighting noise; after collation the batch goes to its device
(pinned and non-blocking on a GPU) and is finished there: lighting and normalisation, batched
(``bireal_core.augment.finish``). That moves a quarter of the bytes between processes and the float
work out of the workers, and gives the PIL float path's crops, flips and lighting at a seed, its
pixels within one level (``tests/test_data.py``); ``uint8=False`` runs that float path itself, the
reference. With ``decode="device"`` the workers hand over the JPEG files instead
(``pipeline/decode.py``).
"""

from __future__ import annotations

import functools
import gzip
import itertools
import logging
import multiprocessing
import random
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from bireal_core.augment import ImageRecipe, finish
from bireal_core.preprocess import eval_transform, train_transform

from . import storage
from .decode import (
    DeviceRecipe,
    collate_encoded,
    damaged_sample_errors,
    decode_image,
    decode_rgb,
    device_finished,
    encoded_sample,
    recipe_generator,
)
from .shard_read import ShardIntegrityError, ShardRecord, open_shard, read_manifest, shard_records

log = logging.getLogger(__name__)


DECODES = ("worker", "device")  # where JPEGs are decoded: the loader's processes (PIL) or the training device
HOLDOUT = "holdout"  # the first samples of the train split, held out of training (TrainConfig.holdout)
_SLICE = "#samples="  # a shard URL + "#samples=a:b": only samples a..b-1 of that shard


def split_shards(manifest: dict, location: str, split: str, holdout: int = 0) -> list[tuple[str, int]]:
    """[(url, sample count)] of one split. With ``holdout`` > 0 the train split's first ``holdout``
    samples (in shard order; the sharder shuffled them with its seed, so a fixed random subset) form
    the ``holdout`` split and ``train`` is the rest: a shard cut in two appears as two slices."""
    name = "train" if split == HOLDOUT else split
    if name not in manifest["splits"]:
        raise KeyError(f"split {name!r} not in the manifest (has: {', '.join(manifest['splits'])})")
    base = location.rstrip("/")
    shards = [(f"{base}/{s['name']}", s["count"]) for s in manifest["splits"][name]["shards"]]
    if split == HOLDOUT and holdout <= 0:
        raise ValueError("the holdout split needs holdout > 0 (TrainConfig.holdout)")
    if name != "train" or holdout <= 0:
        return shards
    total = sum(n for _, n in shards)
    if holdout >= total:
        raise ValueError(f"holdout={holdout}: the train split of {location} has only {total} samples")
    held, kept, start = [], [], 0
    for url, n in shards:  # shard covers samples [start, start + n) of the split
        cut = min(max(holdout - start, 0), n)
        if cut:
            held.append((url if cut == n else f"{url}{_SLICE}0:{cut}", cut))
        if cut < n:
            kept.append((url if cut == 0 else f"{url}{_SLICE}{cut}:{n}", n - cut))
        start += n
    return held if split == HOLDOUT else kept


def shard_slice(url: str) -> tuple[str, int, int | None]:
    """``url#samples=a:b`` -> (url, a, b); a plain URL -> (url, 0, None): the whole shard."""
    if _SLICE not in url:
        return url, 0, None
    url, _, bounds = url.rpartition(_SLICE)
    start, stop = bounds.split(":")
    return url, int(start), int(stop)


def eval_split_name(manifest: dict, location: str = "") -> str:
    """The split every stage evaluates on: val, else test; an empty one is refused (a stage would
    train with a top-1 of 0 over no images each epoch, to fail only at ``bireal evaluate``).
    ``location``: the shards' folder, for the message."""
    for name in ("val", "test"):
        if name in manifest["splits"]:
            split = manifest["splits"][name]
            if not split["count"]:
                raise ValueError(
                    f"{location or 'the manifest'}: the {name} split has no images to evaluate "
                    f"({split.get('quarantined', 0)} quarantined: their reasons are under 'quarantine' in "
                    "manifest.json)"
                )
            return name
    raise KeyError(
        f"the manifest has no val or test split (it has: {', '.join(manifest['splits']) or 'none'}); "
        "shard a source with val/<class>/* or test/<class>/* beside train/"
    )


@dataclass
class LoaderPlan:
    readers: list[list[str]]  # shard URLs of reader r * W + w
    steps: int | None  # batches per rank this epoch (training); None for evaluation (every sample)
    left_out: int  # samples of the split that no rank uses this epoch


def plan_epoch(
    shards: list[tuple[str, int]],
    world_size: int,
    workers: int,
    batch_size: int,
    train: bool,
    seed: int = 0,
    epoch: int = 0,
) -> LoaderPlan:
    n_readers = world_size * max(1, workers)
    readers: list[list[str]] = [[] for _ in range(n_readers)]
    counts = [0] * n_readers
    if not train:
        for i, (url, n) in enumerate(shards):
            readers[i % n_readers].append(url)
            counts[i % n_readers] += n
        return LoaderPlan(readers, None, 0)
    order = list(shards)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    order.sort(key=lambda s: -s[1])  # stable: equal sizes keep their shuffled order
    w = max(1, workers)
    rank_shards = _deal(order, world_size)  # balance ranks first, then each rank's workers
    for rank, mine in enumerate(rank_shards):
        for k, worker_shards in enumerate(_deal(mine, w)):
            readers[rank * w + k] = [url for url, _ in worker_shards]
            counts[rank * w + k] = sum(n for _, n in worker_shards)
    per_rank = [sum(counts[rank * w + k] // batch_size for k in range(w)) for rank in range(world_size)]
    steps = min(per_rank)
    total = sum(n for _, n in shards)
    return LoaderPlan(readers, steps, total - steps * batch_size * world_size)


def _deal(shards: list[tuple[str, int]], n: int) -> list[list[tuple[str, int]]]:
    """Largest-first greedy: each shard to the bin with the fewest samples so far."""
    bins: list[list[tuple[str, int]]] = [[] for _ in range(n)]
    totals = [0] * n
    for url, count in shards:
        i = min(range(n), key=lambda j: (totals[j], j))
        bins[i].append((url, count))
        totals[i] += count
    return bins


class SharedEpoch:
    """The epoch number a loader's workers read as each epoch starts. A persistent worker keeps the
    copy of the dataset it got when it started, so the number lives in shared memory: the main
    process sets it before ``iter(loader)``, and the workers read it when that call restarts them."""

    def __init__(self, context: str | None = None):
        self._shared = multiprocessing.get_context(context).RawValue("q", 0)

    @property
    def value(self) -> int:
        return int(self._shared.value)

    @value.setter
    def value(self, epoch: int) -> None:
        self._shared.value = epoch


class ShardStream(IterableDataset):
    """(transform(image), label) from the shards the current epoch's plan gives this rank's worker.

    ``plan_of(epoch)`` is ``plan_epoch`` with everything but the epoch fixed; each iteration reads
    the epoch from ``epoch`` (a ``SharedEpoch``) and plans it, so one set of persistent workers
    serves every epoch. A worker seeds its augmentation from (epoch seed, reader): the same crops at
    the same seed, epoch after epoch, whichever process runs it."""

    def __init__(
        self,
        plan_of,
        epoch: SharedEpoch,
        rank: int,
        workers: int,
        transform,
        shuffle_buffer: int = 0,
        seed: int = 0,
        with_keys: bool = False,
        records: dict[str, ShardRecord] | None = None,
        decode=None,
    ):
        super().__init__()
        self.decode = decode or decode_rgb  # a file's bytes -> what transform takes (the device path: the bytes)
        self.plan_of, self.epoch = plan_of, epoch
        self.rank, self.workers = rank, max(1, workers)
        self.transform, self.shuffle_buffer, self.seed = transform, shuffle_buffer, seed
        self.with_keys = with_keys  # also yield each sample's __key__ (tests check exactly-once)
        self.records = records or {}  # shard URL -> its manifest size and sha256, checked as it streams

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        reader = self.rank * self.workers + (info.id if info is not None else 0)
        epoch = self.epoch.value
        epoch_seed = epoch_seed_of(self.seed, epoch)
        urls = self.plan_of(epoch=epoch).readers[reader]
        if info is not None:  # in a worker process: its own generator, reseeded every epoch
            torch.manual_seed((epoch_seed * 1_000 + reader) % 2**63)
        samples = (s for url in urls for s in iter_shard_slice(url, self.records))
        if self.shuffle_buffer > 0:
            samples = shuffled(samples, self.shuffle_buffer, random.Random(f"{epoch_seed}:{reader}"))
        for image, label, key in decoded_samples(samples, self.decode):
            yield (self.transform(image), label, key) if self.with_keys else (self.transform(image), label)


def decoded_samples(samples: Iterator[dict], decode=None) -> Iterator[tuple]:
    """(``decode``(image bytes): an RGB image by default, label, key) of each sample. A damaged sample
    (its image or label unreadable) is replaced by the next good one, so a reader yields exactly as
    many samples as its shards hold and every rank keeps the plan's steps; each replacement is
    logged with its shard and key."""
    decode = decode or decode_rgb
    pending, last, replaced = 0, None, 0
    for s in samples:
        try:
            good = (decode(s["jpg"]), int(s["cls"]), s["__key__"])
        except damaged_sample_errors() as e:
            pending, replaced = pending + 1, replaced + 1
            log.warning(
                "damaged sample %s in %s replaced by the next good one (%s: %s); %d replaced by this reader",
                s["__key__"], s.get("__url__", "?"), type(e).__name__, e, replaced,
            )  # fmt: skip
            continue
        for _ in range(1 + pending):
            yield good
        pending, last = 0, good
    if pending and last is None:
        raise ValueError(f"every one of this reader's {replaced} samples is damaged (see the warnings above)")
    for _ in range(pending):  # damaged samples at the very end: the last good one stands in
        yield last


def shuffled(items: Iterator, buffer: int, rng: random.Random) -> Iterator:
    """Streaming shuffle: keep ``buffer`` items, emit a random one as each new one arrives."""
    pool = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        pool[i], item = item, pool[i]
        yield item
    rng.shuffle(pool)
    yield from pool


def iter_shard(url: str, record: ShardRecord | None = None) -> Iterator[dict]:
    """Samples of one shard as {"__key__", "__url__", ext: bytes}, grouped by key, read sequentially.

    ``open_shard`` opens the URL (local path, ``file://``, ``pipe:`` command, or anything fsspec
    opens: s3, gs, http, staged through the per-node cache when one is set) and, given the
    manifest's ``record``, checks the shard's size at once and its sha256 after its last sample
    (``pipeline/shard_read.py``). The USTAR records bireal writes are parsed here directly, which
    costs a few microseconds per member instead of tarfile's tens: on 32x32 images that difference
    is the loader's whole overhead over reading loose files."""
    with open_shard(url, record) as raw:
        stream = gzip.GzipFile(fileobj=raw) if url.endswith(".gz") else raw
        key, sample = None, {}
        for name, data in _tar_members(stream, url):
            base = name.rsplit("/", 1)[-1]
            k, _, ext = base.partition(".")
            if k != key:
                if sample:
                    yield sample
                key, sample = k, {"__key__": k, "__url__": url}
            sample[ext] = data
        raw.verify()  # before the last sample: a damaged shard fails before its end is used
        if sample:
            yield sample


def iter_shard_slice(url: str, records: dict[str, ShardRecord] | None = None) -> Iterator[dict]:
    """``iter_shard`` of a plain shard URL, or of the samples a ``split_shards`` slice names; the
    whole shard is read either way, so its sha256 is checked."""
    url, start, stop = shard_slice(url)
    for i, sample in enumerate(iter_shard(url, (records or {}).get(url))):
        if start <= i and (stop is None or i < stop):
            yield sample


def _tar_members(stream, url: str) -> Iterator[tuple[str, bytes]]:
    while True:
        header = stream.read(512)
        if len(header) < 512 or header.count(0) == 512:
            return
        name = header[:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0].decode() if header[257:262] == b"ustar" else ""
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        kind = header[156:157]
        data = stream.read(size)
        if len(data) < size:
            raise ShardIntegrityError(f"{url}: ends inside tar member {name!r} ({len(data)} of {size} bytes)")
        stream.read((512 - size % 512) % 512)
        if kind in (b"0", b"\0"):
            yield (f"{prefix}/{name}" if prefix else name), data
        elif kind not in (b"5", b"g"):  # directories, pax globals: nothing to read
            raise ValueError(
                f"{url}: tar member {name!r} of type {kind!r} is not supported (bireal shards are plain USTAR)"
            )


def epoch_seed_of(seed: int, epoch: int) -> int:
    """One epoch's seed for its sample order and augmentation: the same rule for every loader."""
    return seed * 1_000_003 + epoch


class ShardLoader:
    """One rank's loader of one split for a whole run: its DataLoader's workers start at the first
    epoch and, with ``persistent`` (the training loader), serve every later one, each re-planned
    through a ``SharedEpoch``. ``epoch(e)`` -> (batches of epoch ``e``, its plan); ``close()``
    stops the workers.

    Batches are (images (B, 3, S, S) float32, labels (B,)). Training iterators stop after
    ``plan.steps`` batches on every rank; evaluation iterators yield every sample of this rank's
    shards once (the last batch may be short). ``holdout``: see ``split_shards`` (``split`` may then
    be ``holdout``). ``uint8``: the workers hand over uint8 images, finished on ``device`` (the
    images arrive there; labels stay on the CPU); False: the float path, normalised in the workers
    (the reference, and what ``bireal bench data`` compares). ``decode``: ``worker`` (in the
    loader's processes) or ``device``: the workers hand over the JPEG bytes and ``pipeline.decode``
    decodes and augments the batch on ``device`` (nvJPEG on a GPU)."""

    def __init__(
        self,
        location: str,
        split: str,
        input_config: dict,
        batch_size: int,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        pca_lighting: bool = False,
        manifest: dict | None = None,
        with_keys: bool = False,
        holdout: int = 0,
        uint8: bool = True,
        device: torch.device | str | None = None,
        decode: str = "worker",
        persistent: bool = False,
    ):
        if decode not in DECODES:
            raise ValueError(f"decode={decode!r}: one of {', '.join(DECODES)}")
        manifest = manifest or read_manifest(location)
        shards = split_shards(manifest, location, split, holdout)
        self.plan_of = functools.partial(plan_epoch, shards, world_size, workers, batch_size, train, seed)
        self.train, self.rank, self.seed, self.input_config = train, rank, seed, input_config
        self.pca_lighting, self.uint8, self.on_device = pca_lighting, uint8, decode == "device"
        self.device = torch.device(device or "cpu")
        context = worker_start_method(location, workers)
        if context == "forkserver":
            multiprocessing.set_forkserver_preload(FORKSERVER_PRELOAD)  # (read when the server starts)
        self.shared_epoch = SharedEpoch(context)
        stream = ShardStream(
            self.plan_of,
            self.shared_epoch,
            rank,
            workers,
            _worker_transform(input_config, train, pca_lighting, uint8, self.on_device),
            shuffle_buffer if train else 0,
            seed,
            with_keys,
            shard_records(manifest, location),
            decode=encoded_sample if self.on_device else (decode_image if uint8 else decode_rgb),
        )
        self.loader = DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=workers,
            drop_last=train,
            persistent_workers=persistent and workers > 0,
            pin_memory=self.device.type == "cuda" and not self.on_device,  # JPEG files are decoded from host memory
            collate_fn=collate_encoded if self.on_device else None,
            multiprocessing_context=context,
        )

    def epoch(self, epoch: int = 0) -> tuple[Iterator, LoaderPlan]:
        """Epoch ``epoch``'s batches and plan. Starting an epoch abandons the previous one's batches
        (the workers drop what they had prefetched)."""
        plan = self.plan_of(epoch=epoch)
        self.shared_epoch.value = epoch  # before iter(): that call (re)starts the workers' iteration
        batches = itertools.islice(iter(self.loader), plan.steps) if self.train else iter(self.loader)
        epoch_seed = epoch_seed_of(self.seed, epoch)
        if self.on_device:
            recipe = DeviceRecipe(
                self.input_config, self.train, self.pca_lighting, recipe_generator(epoch_seed, self.rank)
            )
            batches = device_finished(batches, recipe, self.device)
        elif self.uint8:
            lighting = self.train and self.pca_lighting
            batches = finished(batches, self.input_config["mean"], self.input_config["std"], self.device, lighting)
        return batches, plan

    def close(self) -> None:
        """Stop the persistent workers now rather than when the loader is garbage collected."""
        iterator = getattr(self.loader, "_iterator", None)  # torch keeps a persistent loader's iterator here
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


# What a forkserver imports once, before it forks the loader workers: each then starts with torch and
# this module in memory instead of importing them itself.
FORKSERVER_PRELOAD = ["torch", "pipeline.data"]


def worker_start_method(location: str, workers: int) -> str | None:
    """How a loader starts its worker processes: None (fork) or "forkserver", which forks them from
    a single-threaded server process started once per process. Forkserver for remote shards (s3fs's
    event loop breaks in forked workers) and wherever other threads run beside this one (a Ray
    Train worker: Ray's, MLflow's and the metric threads): CPython forks only the calling thread,
    and a fork while another thread holds the interpreter's thread-state lock leaves the child
    waiting for it forever in ``PyOS_AfterFork_Child`` (an evaluation loader hung so in CI)."""
    if workers == 0:
        return None
    if storage.is_url(location) or threading.active_count() > 1:
        return "forkserver"
    return None


def make_loader(location: str, split: str, input_config: dict, batch_size: int, *, epoch: int = 0, **options):
    """One epoch of a ``ShardLoader`` whose workers end with it -> (batches, plan): for evaluation,
    benchmarks and tests. ``options`` are ``ShardLoader``'s."""
    return ShardLoader(location, split, input_config, batch_size, **options).epoch(epoch)


def _worker_transform(input_config: dict, train: bool, pca_lighting: bool, uint8: bool, on_device: bool):
    """What a loader worker applies to each decoded sample (nothing when the device decodes)."""
    if on_device:
        return _as_is
    if uint8:
        return ImageRecipe(input_config, train, pca_lighting)
    return train_transform(input_config, pca_lighting) if train else eval_transform(input_config)


def _as_is(x):
    return x


def finished(batches: Iterator, mean, std, device: torch.device, lighting: bool) -> Iterator[tuple]:
    """Collated ((uint8 images (B, 3, S, S), alpha (B, 3)), labels, [keys]) -> (float32 images on
    ``device``, labels, [keys]): lighting (with the workers' draws) and normalisation, batched."""
    for (images, alpha), labels, *keys in batches:
        images = images.to(device, non_blocking=True)
        alpha = alpha if lighting else None
        yield finish(images, mean, std, alpha), labels, *keys
