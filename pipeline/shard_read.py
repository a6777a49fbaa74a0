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
  manifest: a re-sharded prefix has new digests and is read anew, a stale copy is never served, and
  two processes staging one shard each write their own temporary file.
Every mismatch raises ``ShardIntegrityError`` naming the shard's URL.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from . import storage


class ShardIntegrityError(OSError):
    """A shard differs from its manifest (missing, truncated, or other bytes)."""


@dataclass(frozen=True)
class ShardRecord:
    bytes: int  # the shard file's size (compressed, for .tar.gz)
    sha256: str


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


def stage(url: str, record: ShardRecord, cache_dir: str) -> Path:
    """The node-local copy of a remote shard, named by its sha256; downloaded and checked if absent."""
    suffix = ".tar.gz" if url.endswith(".gz") else ".tar"
    path = Path(cache_dir) / f"{record.sha256}{suffix}"
    if path.is_file() and path.stat().st_size == record.bytes:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{record.sha256[:16]}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as out, storage.open_read(url) as src:
            stream = VerifiedStream(src, url, record)
            for block in iter(lambda: stream.read(1 << 20), b""):
                out.write(block)
            stream.verify()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
