"""Reading shards safely: every shard checked against the byte count and sha256 its manifest records.

What a damaged shard would do without these checks: a shard cut at a 512-byte boundary ends early
and silently, so its rank runs short of the plan's steps while the others wait in a collective (a
DDP hang); a shard cut inside a member, or with flipped bytes, trains on garbage or crash-loops the
stage with an error that does not name the shard. So:
- ``check_sizes``: at the start of every stage attempt, each shard's size from one listing of the
  folder against the manifest; a truncated or missing shard stops the stage before a step.
- ``open_shard``: a shard's size is checked when it is opened (a local file's, an fsspec object's)
  and its sha256 as it streams, compared when its last byte has been read (``VerifiedStream.verify``).
- ``stage``: with ``storage.shard_cache`` set, a remote shard is downloaded whole into the node's
  cache under its sha256 (a temporary name, checked, then renamed), so the cache is keyed by the
  manifest: a re-sharded prefix has new digests and is read anew, and a stale copy is never served.
  One process per node downloads each shard (a lock file); the others wait for its copy, at most
  ``storage.stage_wait_s``. No fsspec file cache: it is not safe across processes.
Every mismatch raises ``ShardIntegrityError`` naming the shard's URL.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

from . import storage


class ShardIntegrityError(OSError):
    """A shard differs from its manifest (missing, truncated, or other bytes)."""


@dataclass(frozen=True)
class ShardRecord:
    bytes: int  # the shard file's size (compressed, for .tar.gz)
    sha256: str


def read_manifest(location: str) -> dict:
    """``location`` is the shard folder (path, URL or ``pipe:`` command prefix) holding manifest.json:
    -> the manifest, its parts checked (``check_manifest``)."""
    url = location.rstrip("/") + "/manifest.json"
    try:
        manifest = json.loads(storage.read_text(url))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{url}: no manifest; run `bireal shard` first") from e
    except ValueError as e:
        raise ValueError(f"{url}: not a bireal manifest ({e})") from e
    return check_manifest(manifest, url)


def check_manifest(manifest: Any, where: str) -> dict:
    """What every reader of a manifest relies on: a ``classes`` list and ``splits``, each split's
    ``shards`` a list of records with a ``name`` and a sample ``count`` -> the manifest; else a
    ValueError naming ``where`` and the first part that is missing."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: not a bireal manifest (a JSON object with classes and splits)")
    for key, kind in (("classes", list), ("splits", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(f"{where}: not a bireal manifest: no {key} ({kind.__name__})")
    for split, info in manifest["splits"].items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list):
            raise ValueError(f"{where}: not a bireal manifest: splits.{split} has no shards list")
        for i, rec in enumerate(shards):
            if not (isinstance(rec, dict) and isinstance(rec.get("name"), str) and isinstance(rec.get("count"), int)):
                raise ValueError(f"{where}: not a bireal manifest: splits.{split}.shards[{i}] needs a name and a count")
    return manifest


def shard_records(manifest: dict, location: str) -> dict[str, ShardRecord]:
    """{shard URL: its record} over every split of the manifest (URLs as ``split_shards`` builds them)."""
    base = location.rstrip("/")
    return {
        f"{base}/{rec['name']}": ShardRecord(rec["bytes"], rec["sha256"])
        for info in manifest["splits"].values()
        for rec in info["shards"]
        if "bytes" in rec and "sha256" in rec
    }


def _mismatch(url: str, got: str, record: ShardRecord) -> ShardIntegrityError:
    return ShardIntegrityError(
        f"{url}: size/sha256 mismatch: {got}; the manifest says {record.bytes} bytes, sha256 {record.sha256[:16]}... "
        "(the shard was changed or damaged after sharding: re-shard it, or restore it from the manifest's run)"
    )


def check_sizes(manifest: dict, location: str, splits: list[str] | None = None) -> None:
    """Every shard of ``splits`` (default: all) present at its manifest size, from one listing of the
    shard folder; ``pipe:`` folders cannot be listed and are checked as they stream."""
    if location.startswith("pipe:"):
        return
    names = manifest["splits"] if splits is None else splits
    wanted = [rec for split in names for rec in manifest["splits"][split]["shards"] if "bytes" in rec]
    fs, root = storage.filesystem(location)
    sizes = {Path(info["name"]).name: info.get("size") for info in fs.ls(root, detail=True)}
    base = location.rstrip("/")
    problems = []
    for rec in wanted:
        url, size = f"{base}/{rec['name']}", sizes.get(rec["name"])
        if size is None:
            problems.append(f"{url}: missing (the manifest lists it)")
        elif size != rec["bytes"]:
            problems.append(str(_mismatch(url, f"{size} bytes", ShardRecord(rec["bytes"], rec["sha256"]))))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ShardIntegrityError("; ".join(problems[:5]) + more)


class VerifiedStream:
    """A shard's byte stream that hashes and counts what is read; ``verify`` reads what is left and
    compares with the record (no record: nothing to compare, the stream passes through)."""

    def __init__(self, raw: IO[bytes], url: str, record: ShardRecord | None):
        self.raw, self.url, self.record = raw, url, record
        self.sha, self.count = hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.count += len(data)
        return data

    def verify(self) -> None:
        if self.record is None:
            return
        while self.read(1 << 20):
            pass
        if self.count != self.record.bytes or self.sha.hexdigest() != self.record.sha256:
            raise _mismatch(self.url, f"{self.count} bytes, sha256 {self.sha.hexdigest()[:16]}...", self.record)

    def close(self) -> None:
        self.raw.close()

    def __enter__(self) -> VerifiedStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_shard(url: str, record: ShardRecord | None) -> VerifiedStream:
    """A shard's stream, staged through the node cache when one is set (``$BIREAL_SHARD_CACHE``) and
    the shard has a record; its size checked now where the store knows it, its sha256 on ``verify``."""
    cache_dir = os.environ.get(storage.CACHE_ENV, "")
    if storage.is_url(url) and cache_dir and record is not None:
        return VerifiedStream(open(stage(url, record, cache_dir), "rb"), url, None)  # checked when staged
    raw = storage.open_read(url)
    size = _known_size(raw)
    if record is not None and size is not None and size != record.bytes:
        raw.close()
        raise _mismatch(url, f"{size} bytes", record)
    return VerifiedStream(raw, url, record)


def _known_size(raw) -> int | None:
    """A regular file's size, or an fsspec object's; None for a pipe."""
    try:
        st = os.fstat(raw.fileno())
        if stat.S_ISREG(st.st_mode):
            return st.st_size
    except (AttributeError, OSError, ValueError):  # no file descriptor: an fsspec file
        pass
    size = getattr(raw, "size", None)
    return size if isinstance(size, int) else None


class ShardStageTimeout(TimeoutError):
    """Another process of this node held a shard's download longer than ``storage.stage_wait_s``."""


def stage(url: str, record: ShardRecord, cache_dir: str, wait_s: float | None = None) -> Path:
    """The node-local copy of a remote shard, named by its sha256; downloaded and checked if absent.

    One process per node downloads a shard: whoever needs it first takes the shard's lock file
    (``flock``, released by the kernel if that process dies) and the node's other ranks, loader
    workers and trials that need it wait on the lock, at most ``wait_s`` (``storage.stage_wait_s``,
    below the process group's timeout so a stuck download names its shard instead of hanging a
    collective), then read the copy it wrote."""
    suffix = ".tar.gz" if url.endswith(".gz") else ".tar"
    path = Path(cache_dir) / f"{record.sha256}{suffix}"
    if _staged(path, record):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _stage_lock(path, url, storage.stage_wait_s() if wait_s is None else wait_s):
        if not _staged(path, record):  # not staged by another process while this one waited
            for stale in path.parent.glob(f".{record.sha256[:16]}.*.partial"):  # left by a killed downloader
                stale.unlink(missing_ok=True)
            _download(url, record, path)
    return path


def _staged(path: Path, record: ShardRecord) -> bool:
    return path.is_file() and path.stat().st_size == record.bytes


@contextmanager
def _stage_lock(path: Path, url: str, wait_s: float) -> Iterator[None]:
    """The shard's lock, polled until ``wait_s``; then ``ShardStageTimeout`` naming the shard."""
    lock = path.parent / f".{path.name}.lock"
    with open(lock, "a+b") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ShardStageTimeout(
                        f"{url}: another process of this node has been staging it into {path.parent} for "
                        f"over {wait_s:.0f} s (storage.stage_wait_s); its lock is {lock}"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(url: str, record: ShardRecord, path: Path) -> None:
    """``url`` to ``path`` through a temporary name, checked against ``record`` before the rename."""
    # the partial's name is one stage() cleans up after a kill
    with storage.replacing(path, prefix=f".{record.sha256[:16]}.") as tmp:
        with open(tmp, "wb") as out, storage.open_read(url) as src:
            stream = VerifiedStream(src, url, record)
            for block in iter(lambda: stream.read(1 << 20), b""):
                out.write(block)
            stream.verify()
