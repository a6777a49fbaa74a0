"""``bireal shard``: images -> WebDataset tar shards + ``manifest.json``.

Plain typed function ``shard_dataset`` (the CLI, DVC and Prefect all call it):
1. scan the source (pipeline/sources.py) and shuffle each split with the seed;
2. decode / convert / resize each image in a process pool (order preserved);
3. write shards sequentially, each to ``NAME.tmp`` then renamed, with deterministic tar headers
   (mtime 0, uid/gid 0, no user names, fixed order) and deterministic gzip headers;
4. after every completed shard, record it in ``.shard-progress.json``: a killed run re-run with
   the same parameters keeps the complete shards (a prefix of each split), rewrites the rest and
   ends byte-identical to an uninterrupted run;
5. write ``manifest.json`` and drop the progress file.
Bad images never crash the run: convertible ones are converted to RGB JPEG (and listed under
``converted``), undecodable / truncated / empty ones, and strips too elongated to resize (over
``bireal_core.preprocess.MAX_PIXELS`` with the shorter side at 256), are listed under
``quarantine`` with the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import re
import tarfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from bireal_core.preprocess import rgb_image, too_elongated

from . import storage
from .params import ShardParams
from .progress import image_bar
from .sources import Ref, Sample, Source, first_few, scan_source

MANIFEST = "manifest.json"
PROGRESS = ".shard-progress.json"
MANIFEST_VERSION = 1


class ShardError(RuntimeError):
    pass


# ---------------------------------------------------------------------------- one image


class Encoded(NamedTuple):
    data: bytes | None  # RGB JPEG bytes; None: quarantined
    note: str  # the conversion made ("" for none), or the reason it is quarantined
    size: tuple[int, int] | None = None  # (width, height) as read, before any resize


def encode_image(ref: Ref, resize: int, quality: int) -> Encoded:
    """One source image -> its RGB JPEG for a shard, or the reason to quarantine it."""
    from PIL import Image

    try:
        data = ref.read()
    except OSError as e:
        return Encoded(None, f"unreadable: {e}")
    if not data:
        return Encoded(None, "zero-byte file")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()  # decodes fully: truncated files raise here
    except Exception as e:  # PIL raises many types for broken files
        # PIL names the in-memory buffer ("<_io.BytesIO object at 0x...>"); the path is named already
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        return Encoded(None, f"undecodable: {e.__class__.__name__}: {reason}")
    notes, size = [], im.size
    if im.format != "JPEG":
        notes.append(f"{im.format} data")
    im, conversions = rgb_image(im)  # as `bireal predict` reads the same file
    notes += conversions
    if resize and min(im.size) > resize:
        w, h = im.size
        s = resize / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
        notes.append("resized")
    if notes == []:
        return Encoded(data, "", size)  # an RGB JPEG already at size: kept byte for byte
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=quality)
    return Encoded(out.getvalue(), ", ".join(n for n in notes if n != "resized"), size)


def _encode_job(job: tuple[Ref, int, int]) -> Encoded:
    return encode_image(*job)


# ---------------------------------------------------------------------------- tar writing


def _tar_member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


class _HashingWriter:
    """File-like sink that hashes and counts what passes through."""

    def __init__(self, f):
        self.f, self.sha, self.bytes = f, hashlib.sha256(), 0

    def write(self, b: bytes) -> int:
        self.sha.update(b)
        self.bytes += len(b)
        return self.f.write(b)


def _member_bytes(sizes: Iterable[int]) -> int:
    return sum(512 + (s + 511) // 512 * 512 for s in sizes)


def write_shard(fs, path: str, samples: list[tuple[str, bytes, int, str]], use_gzip: bool) -> dict:
    """Write (key, jpeg, label, wnid) samples to ``path`` via a temporary name; -> shard record."""
    tmp = path + ".tmp"
    with fs.open(tmp, "wb") as raw:
        sink = _HashingWriter(raw)
        stream = gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0) if use_gzip else sink
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for key, jpg, label, wnid in samples:
                for ext, data in (("jpg", jpg), ("cls", str(label).encode()), ("wnid", wnid.encode())):
                    tar.addfile(*_tar_member(f"{key}.{ext}", data))
        if use_gzip:
            stream.close()
    fs.mv(tmp, path)
    return {"name": path.rsplit("/", 1)[-1], "count": len(samples), "bytes": sink.bytes, "sha256": sink.sha.hexdigest()}


# ---------------------------------------------------------------------------- the stage


def _split_order(samples: list[Sample], seed: int, split: str) -> list[Sample]:
    order = list(samples)
    random.Random(f"{seed}:{split}").shuffle(order)
    return order


def _encoded(order: list[Sample], start: int, params: ShardParams, pool) -> Iterator[Encoded]:
    jobs = ((s.ref, params.resize, params.jpeg_quality) for s in order[start:])
    if pool is None:
        return map(_encode_job, jobs)
    return pool.imap(_encode_job, jobs, chunksize=8)


def _load_json(fs, path: str) -> dict | None:
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return json.load(f)


def _save_json(fs, path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with fs.open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    fs.mv(tmp, path)


# Settings that change how shards are made, not their bytes (the pool keeps the samples' order):
# kept out of the identity, so a run with more workers resumes or keeps another run's shards.
OUTPUT_NEUTRAL = ("processes",)


def _identity(source: Source, params: ShardParams) -> dict:
    """What the shards' bytes follow from: the source and the output-changing settings."""
    return {
        "source": {"kind": source.kind, "path": source.path, "fingerprint": source.fingerprint},
        "params": {k: v for k, v in asdict(params).items() if k not in OUTPUT_NEUTRAL},
    }


def _identity_of(record: dict | None) -> dict | None:
    """The identity a manifest or progress file records (older ones list every setting)."""
    if not record:
        return None
    params = {k: v for k, v in (record.get("params") or {}).items() if k not in OUTPUT_NEUTRAL}
    return {"source": record.get("source"), "params": params}


def _identity_changes(previous: dict, identity: dict) -> list[str]:
    """``key=old (now new)`` for each source field and setting that differs."""
    changes = []
    for section in ("source", "params"):
        before, now = previous.get(section) or {}, identity[section]
        for key in sorted(before.keys() | now.keys()):
            if before.get(key) != now.get(key):
                name = f"source.{key}" if section == "source" else key
                changes.append(f"{name}={before.get(key)!r} (now {now.get(key)!r})")
    return changes


def _resume_state(fs, out: str, identity: dict, overwrite: bool, progress: dict | None, manifest: dict | None) -> dict:
    """The progress of an interrupted run with the same source and parameters, or a fresh one
    (``progress``, ``manifest``: the folder's progress and manifest files as read, or None)."""
    previous = _identity_of(progress or manifest)
    if previous and not overwrite and previous != identity:
        raise ShardError(
            f"{out} holds shards made with {', '.join(_identity_changes(previous, identity))}; "
            "choose another --out, or pass --overwrite to replace them"
        )
    if progress and not overwrite:
        for split in progress["splits"].values():  # keep only shards that are really complete
            kept = []
            for rec in split["shards"]:
                p = f"{out}/{rec['name']}"
                if not fs.exists(p) or fs.size(p) != rec["bytes"]:
                    break
                kept.append(rec)
            split["shards"] = kept
            split["next_sample"] = kept[-1]["end"] if kept else 0
            split["quarantine"] = [q for q in split["quarantine"] if q["index"] < split["next_sample"]]
            split["converted"] = [c for c in split["converted"] if c["index"] < split["next_sample"]]
        return progress
    return {**identity, "splits": {}}


def shard_dataset(
    source_path: str,
    out: str,
    params: ShardParams = ShardParams(),
    kind: str = "auto",
    overwrite: bool = False,
    progress_bar: bool = True,
) -> dict:
    """Shard ``source_path`` into ``out`` (a local folder or any fsspec URL); -> the manifest."""
    started = time.time()
    source = scan_source(source_path, kind)
    fs, root = storage.filesystem(out)
    fs.makedirs(root, exist_ok=True)
    identity = _identity(source, params)
    existing = _load_json(fs, f"{root}/{MANIFEST}")
    if existing and not overwrite and _identity_of(existing) == identity and not fs.exists(f"{root}/{PROGRESS}"):
        return existing  # already complete: nothing to do
    with sharding_lease(out, root):  # one sharder per folder: a second stops here
        return _shard_into(fs, root, source, params, identity, overwrite, progress_bar, started)


@contextlib.contextmanager
def sharding_lease(out: str, root: str):
    """One sharder per output folder: two would delete each other's partial shards (``*.tmp``). A
    local folder: an exclusive ``flock`` of the folder itself (nothing written; the kernel drops it
    when the process dies). Object storage: a run lease beside the folder (``pipeline/lease.py``),
    deleted on exit."""
    if storage.is_url(out):
        from .lease import RunLease

        parent, _, name = out.rstrip("/").rpartition("/")
        with RunLease(parent, f"{name}.sharding", ttl_s=60.0):
            yield
        return
    fd = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ShardError(f"{out}: another process is sharding into this folder; wait for it, or stop it") from None
        yield
    finally:
        os.close(fd)  # releases the lock


SHARD_NAME = re.compile(r"\w+-\d{6}\.tar(\.gz)?")  # {split}-{index:06d}.tar[.gz], in the folder itself


def _shard_names(record: dict | None) -> set[str]:
    """The shard files a manifest or progress file lists (names of ours only: nothing with a path)."""
    names = {rec.get("name") for split in (record or {}).get("splits", {}).values() for rec in split.get("shards", [])}
    return {name for name in names if isinstance(name, str) and SHARD_NAME.fullmatch(name)}


def _shard_into(fs, root, source, params, identity, overwrite, progress_bar, started) -> dict:
    # what an earlier run here wrote: its shards that this run does not write again are removed at the
    # end (fewer or gzipped shards, another split), so the folder (and DVC's copy of it) is this run's
    progress, previous = _load_json(fs, f"{root}/{PROGRESS}"), _load_json(fs, f"{root}/{MANIFEST}")
    earlier = _shard_names(progress) | _shard_names(previous)
    state = _resume_state(fs, root, identity, overwrite, progress, previous)
    for stale in fs.glob(f"{root}/*.tmp"):
        fs.rm(stale)
    ext = "tar.gz" if params.gzip else "tar"
    total = sum(len(v) for v in source.splits.values())
    done = sum(s.get("next_sample", 0) for s in state["splits"].values())
    workers = _pool_size(params.processes, total - done)
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    bar = image_bar("shard", total, done, progress_bar)
    try:
        for split, samples in source.splits.items():
            st = state["splits"].setdefault(split, {"shards": [], "next_sample": 0, "quarantine": [], "converted": []})
            _shard_split(
                fs, root, split, ext, _split_order(samples, params.seed, split), source, params, st, state, pool, bar
            )
    finally:
        bar.close()  # also when interrupted: its last line ends before an error's
        if pool is not None:
            pool.terminate()
    manifest = _manifest(source, state, identity)
    _save_json(fs, f"{root}/{MANIFEST}", manifest)
    fs.rm(f"{root}/{PROGRESS}")
    for stale in sorted(earlier - _shard_names(manifest)):  # after the new manifest: never a folder without one
        if fs.exists(f"{root}/{stale}"):
            fs.rm(f"{root}/{stale}")
    manifest["elapsed_seconds"] = round(time.time() - started, 2)  # run-time only, not in the file
    return manifest


def _pool_size(processes: int, images_left: int) -> int:
    """``processes``, but no more than there are images left or CPUs to run them: each worker is a
    spawned interpreter (~40 MB, ~0.1 s to start; 1,000 of them took 124 s for 16 images on 2 CPUs)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if processes > cpus:
        print(f"shard: processes={processes}, but this machine gives this process {cpus} CPUs: using {cpus}")
    return max(1, min(processes, cpus, images_left))


def _shard_split(fs, root, split, ext, order, source, params, st, state, pool, bar) -> None:
    index = st["next_sample"]
    pending: list[tuple[str, bytes, int, str]] = []
    pending_bytes = 0

    def flush(end: int):
        nonlocal pending, pending_bytes
        name = f"{split}-{len(st['shards']):06d}.{ext}"
        rec = write_shard(fs, f"{root}/{name}", pending, params.gzip)
        rec["end"] = end
        st["shards"].append(rec)
        st["next_sample"] = end
        _save_json(fs, f"{root}/{PROGRESS}", state)
        pending, pending_bytes = [], 0

    for jpg, note, size in _encoded(order, index, params, pool):
        sample = order[index]
        reason = note if jpg is None else too_elongated(*size)  # size: (width, height)
        if reason:
            st["quarantine"].append({"index": index, "path": sample.ref.describe(sample.name), "reason": reason})
        else:
            if note:
                st["converted"].append({"index": index, "path": sample.ref.describe(sample.name), "note": note})
            wnid = source.classes[sample.label]["wnid"]
            size = _member_bytes((len(jpg), len(str(sample.label)), len(wnid)))
            if pending and (len(pending) >= params.samples_per_shard or pending_bytes + size > params.max_shard_bytes):
                flush(index)
            pending.append((f"{split}-{index:08d}", jpg, sample.label, wnid))
            pending_bytes += size
        index += 1
        bar.update(1)
    if pending:
        flush(index)
    elif st["next_sample"] < index:  # only quarantined samples after the last shard
        st["next_sample"] = index


def _manifest(source: Source, state: dict, identity: dict) -> dict:
    splits, quarantine, converted = {}, [], []
    for split, st in state["splits"].items():
        shards = [{k: r[k] for k in ("name", "count", "bytes", "sha256")} for r in st["shards"]]
        counts = [0] * len(source.classes)
        skipped = {q["index"] for q in st["quarantine"]}
        order = _split_order(source.splits[split], identity["params"]["seed"], split)
        for i, s in enumerate(order):
            if i not in skipped:
                counts[s.label] += 1
        splits[split] = {
            "count": sum(r["count"] for r in shards),
            "quarantined": len(skipped),
            "per_class": {source.classes[i]["wnid"]: n for i, n in enumerate(counts)},
            "shards": shards,
        }
        quarantine += [{"split": split, "path": q["path"], "reason": q["reason"]} for q in st["quarantine"]]
        converted += [{"split": split, "path": c["path"], "note": c["note"]} for c in st["converted"]]
    return {
        "version": MANIFEST_VERSION,
        **identity,
        "classes": source.classes,
        "splits": splits,
        "quarantine": quarantine,
        "converted": converted,
        "ignored": source.ignored,
    }


# ---------------------------------------------------------------------------- verify


def verify_shards(out: str) -> list[str]:
    """Check every shard against the manifest: present, its bytes and sha256 (the readers' own
    check, ``shard_read.VerifiedStream``) and its sample count: -> one problem per bad shard."""
    from .shard_read import ShardIntegrityError, ShardRecord, VerifiedStream, read_manifest

    try:
        manifest = read_manifest(out)  # the loaders' read, with its checks
    except FileNotFoundError as e:
        if storage.is_local(out) and not Path(out).exists():
            raise ShardError(f"{out}: no such folder") from e
        raise ShardError(f"{out}: no {MANIFEST} (not a shard folder, or sharding did not finish)") from e
    except ValueError as e:
        raise ShardError(str(e)) from e
    problems = []
    for info in manifest["splits"].values():
        for rec in info["shards"]:
            url = storage.join(out, rec["name"])
            if not storage.exists(url):
                problems.append(f"{rec['name']}: missing")
                continue
            with VerifiedStream(storage.open_read(url), url, ShardRecord(rec["bytes"], rec["sha256"])) as stream:
                try:
                    with tarfile.open(fileobj=stream, mode="r|*") as tar:
                        count = sum(1 for m in tar if m.name.endswith(".jpg"))
                except (tarfile.TarError, OSError, EOFError):
                    count = None  # unreadable: the digest below says whether it is damaged
                try:
                    stream.verify()
                except ShardIntegrityError as e:
                    problems.append(str(e))
                    continue
            if count != rec["count"]:
                problems.append(f"{rec['name']}: {count} samples, manifest says {rec['count']}")
    return problems


def summarize(manifest: dict) -> str:
    lines = [
        f"source: {manifest['source']['kind']} {manifest['source']['path']}",
        f"classes: {len(manifest['classes'])}",
    ]
    for split, info in manifest["splits"].items():
        per = list(info["per_class"].values())
        size = sum(r["bytes"] for r in info["shards"])
        lines.append(
            f"{split}: {info['count']:,} samples in {len(info['shards'])} shards "
            f"({size / 1e6:.1f} MB), per class {min(per)}-{max(per)}, quarantined {info['quarantined']}"
        )
    lines.append(f"converted: {len(manifest['converted'])}, quarantined: {len(manifest['quarantine'])}")
    for q in manifest["quarantine"][:10]:
        lines.append(f"  quarantined {q['path']}: {q['reason']}")
    ignored = manifest.get("ignored", [])  # manifests before 2026-12-06 have no list
    if ignored:
        why = "not images by their suffix, outside a class folder, or without a label"
        lines.append(f"ignored: {len(ignored)} left out ({why}): {first_few(ignored)}")
    return "\n".join(lines)
