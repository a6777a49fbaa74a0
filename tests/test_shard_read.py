"""Shards checked against their manifest on the training path (pipeline/shard_read.py): a truncated
or altered shard stops the loader with an error naming its URL, a damaged image inside a good shard
is replaced without changing any rank's step count, and the node cache is keyed by the manifest's
sha256 so a re-sharded prefix is read anew."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import fsspec
import pytest
from imagegen import image_folder, rewrite_first_shard

from pipeline import storage
from pipeline.data import iter_shard, make_loader, plan_epoch, read_manifest, split_shards
from pipeline.shard import ShardParams, shard_dataset, write_shard
from pipeline.shard_read import (
    ShardIntegrityError,
    ShardRecord,
    ShardStageTimeout,
    check_sizes,
    open_shard,
    shard_records,
    stage,
)
from pipeline.train import TrainConfig, train_loop

INPUT = {"size": 32, "resize": 32, "mean": [0.5] * 3, "std": [0.25] * 3, "augment": "small"}


@pytest.fixture
def shards(tmp_path) -> Path:
    """A small shard folder: 3 classes, 4 samples a shard."""
    src = image_folder(tmp_path / "src", per_class=(6, 4), classes=3)
    out = tmp_path / "shards"
    shard_dataset(str(src), str(out), ShardParams(processes=1, samples_per_shard=4), progress_bar=False)
    return out


def _first_shard(out: Path, split: str) -> Path:
    return out / read_manifest(str(out))["splits"][split]["shards"][0]["name"]


def _eval_keys(out: Path, split: str = "val") -> list[str]:
    batches, _ = make_loader(str(out), split, INPUT, 4, train=False, workers=0, with_keys=True)
    return [k for _, _, keys in batches for k in keys]


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: "not json", "not a bireal manifest (Expecting value"),
        (lambda m: {**m, "classes": None}, "not a bireal manifest: no classes (list)"),
        (lambda m: {k: v for k, v in m.items() if k != "splits"}, "not a bireal manifest: no splits (dict)"),
        (lambda m: {**m, "splits": {"val": {"count": 3}}}, "not a bireal manifest: splits.val has no shards list"),
        (
            lambda m: {**m, "splits": {"val": {"shards": [{"name": "val-000000.tar"}]}}},
            "not a bireal manifest: splits.val.shards[0] needs a name and a count",
        ),
    ],
)
def test_a_damaged_manifest_is_named_by_every_reader(shards, damage, message):
    """The loaders' read (read_manifest) and `bireal shard --verify` name the manifest and the part
    that is missing, before any shard is opened."""
    from pipeline.cli import main

    path = shards / "manifest.json"
    damaged = damage(json.loads(path.read_text()))
    path.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged))
    with pytest.raises(ValueError) as e:
        read_manifest(str(shards))
    assert str(e.value).startswith(f"{path}: {message}")
    assert main(["shard", "--verify", str(shards)]) == 2


def test_a_shard_cut_at_a_block_boundary_stops_the_loader_naming_it(shards):
    path = _first_shard(shards, "val")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 // 512 * 512])  # whole members, then nothing: no tar error
    # the shard is opened and refused before a sample of it is used (without the check it ended
    # early and silently: this rank would run short of the plan's steps)
    with pytest.raises(ShardIntegrityError, match=f"{path}: size/sha256 mismatch"):
        _eval_keys(shards)
    with pytest.raises(ShardIntegrityError, match=f"{path}: size/sha256 mismatch: {len(data) // 2 // 512 * 512} bytes"):
        check_sizes(read_manifest(str(shards)), str(shards))
    check_sizes(read_manifest(str(shards)), str(shards), ["train"])  # the train split is whole
    path.unlink()
    with pytest.raises(ShardIntegrityError, match=f"{path}: missing"):
        check_sizes(read_manifest(str(shards)), str(shards))


def test_a_flipped_byte_is_caught_when_the_shard_has_been_read(shards):
    path = _first_shard(shards, "val")
    data = bytearray(path.read_bytes())
    good = _eval_keys(shards)
    data[1536] ^= 0x40  # inside the first JPEG: it still decodes, to other pixels
    path.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError, match=f"{path}: size/sha256 mismatch: {len(data)} bytes, sha256"):
        _eval_keys(shards)
    # what the check replaces: without the manifest's record the altered shard reads "fine"
    assert len(list(iter_shard(str(path)))) == 4 and len(good) == 12


def _damage_one_image(out: Path, split: str) -> tuple[str, str]:
    """Rewrite ``split``'s first shard with its second image's bytes cut short (a shard that matches
    its manifest, holding a damaged image); -> (shard URL, damaged key)."""
    url, samples = rewrite_first_shard(out, split, {1: lambda jpg: jpg[:200]})
    return url, samples[1]["__key__"]


def test_a_damaged_image_is_replaced_and_every_rank_keeps_its_steps(shards, caplog):
    url, key = _damage_one_image(shards, "train")
    manifest = read_manifest(str(shards))
    caplog.set_level(logging.WARNING, logger="pipeline.data")
    for rank in (0, 1):  # two ranks, as DDP would run them: each must yield the plan's steps
        batches, plan = make_loader(
            str(shards), "train", INPUT, 2, train=True, rank=rank, world_size=2, workers=0, shuffle_buffer=0
        )
        assert sum(1 for _ in batches) == plan.steps >= 4  # 18 samples over 2 ranks in batches of 2
    damaged = [r for r in caplog.records if "damaged sample" in r.getMessage()]
    assert len(damaged) == 1 and key in damaged[0].getMessage() and url in damaged[0].getMessage()
    # evaluation: every sample position still yields one, the damaged one by its successor
    seen = 0
    for rank in (0, 1):
        batches, _ = make_loader(str(shards), "train", INPUT, 4, train=False, rank=rank, world_size=2, workers=0)
        seen += sum(len(labels) for _, labels in batches)
    assert seen == manifest["splits"]["train"]["count"] == 18


def test_a_shard_damaged_mid_stage_stops_it_with_no_later_checkpoint(tmp_path, demo_shards):
    """After epoch 0's checkpoint a train shard the next epoch reads first is cut short: the stage
    stops in epoch 1 naming the shard, and epoch 0's checkpoint stays the latest."""
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    config = TrainConfig(
        shards=str(shards),
        out=str(tmp_path / "out"),
        arch="bireal18",
        stem="small",
        width=0.25,
        batch_size=32,
        loader_workers=1,
        stage="pretrain",
        phase_epochs=[3, 0, 0],
        max_steps_per_epoch=2,
    )
    manifest = read_manifest(str(shards))
    plan = plan_epoch(split_shards(manifest, str(shards), "train"), 1, 1, 32, True, config.seed, epoch=1)
    victim = Path(plan.readers[0][0])
    epochs = []

    def cut_after_epoch0(metrics):
        epochs.append(metrics["epoch"])
        if metrics["epoch"] == 0:
            victim.write_bytes(victim.read_bytes()[:2048])

    with pytest.raises(ShardIntegrityError, match=f"{victim}: size/sha256 mismatch: 2048 bytes"):
        train_loop(config, on_epoch=cut_after_epoch0)
    assert epochs == [0]
    states = sorted(p.name for p in (tmp_path / "out" / ".train_state").iterdir())
    assert states == ["pretrain-epoch000"]
    # a new attempt stops before its first step, at the size check
    with pytest.raises(ShardIntegrityError, match=f"{victim}: size/sha256 mismatch"):
        train_loop(config)


def test_the_node_cache_is_keyed_by_the_manifest_sha256(tmp_path, monkeypatch, shards):
    """Remote shards (fsspec's memory store here) are staged whole into the cache under their
    sha256: read once, then from the node; a re-sharded prefix is read anew; a damaged object never
    enters the cache."""
    memory = fsspec.filesystem("memory")
    url, path = "memory://bucket/shards/train-000000.tar", "/bucket/shards/train-000000.tar"
    samples = [(s["__key__"], s["jpg"], int(s["cls"]), "n0") for s in iter_shard(str(_first_shard(shards, "train")))]
    first = write_shard(memory, path, samples, False)
    cache = tmp_path / "cache"
    monkeypatch.setenv(storage.CACHE_ENV, str(cache))

    def keys(record: dict) -> list[str]:
        return [s["__key__"] for s in iter_shard(url, ShardRecord(record["bytes"], record["sha256"]))]

    assert keys(first) == [s[0] for s in samples]
    assert [p.name for p in cache.glob("*.tar")] == [f"{first['sha256']}.tar"]  # (and each shard's 0-byte lock file)
    mask = os.umask(0)
    os.umask(mask)  # the staged copy is readable by whom any file of this process is: not tempfile's 0600
    assert stat.S_IMODE((cache / f"{first['sha256']}.tar").stat().st_mode) == 0o666 & ~mask
    memory.rm(path)  # gone from the store: the node still has it
    assert keys(first) == [s[0] for s in samples]
    second = write_shard(memory, path, samples[:2], False)  # re-sharded under the same name
    assert keys(second) == [s[0] for s in samples[:2]]  # not the cached 4-sample copy
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(f"{r['sha256']}.tar" for r in (first, second))
    check_sizes({"splits": {"train": {"shards": [second]}}}, "memory://bucket/shards")
    stale = ShardRecord(first["bytes"], "0" * 64)  # the store's bytes are not what this manifest wrote
    with pytest.raises(ShardIntegrityError, match=f"{url}: size/sha256 mismatch"):
        open_shard(url, stale)
    assert not list(cache.glob(".*partial")) and not (cache / f"{'0' * 64}.tar").exists()
    assert shard_records({"splits": {"train": {"shards": [second]}}}, "memory://bucket/shards") == {
        url: ShardRecord(second["bytes"], second["sha256"])
    }


class ShardServer:
    """Serves one shard over HTTP on 127.0.0.1 (HEAD and ranged GETs, each GET held ``delay_s`` so
    concurrent readers overlap) and counts the body bytes it sent: one download = the shard's size."""

    def __init__(self, data: bytes, delay_s: float = 0.0):
        self.data, self.delay_s, self.sent = data, delay_s, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.data)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()

            def do_GET(self):
                time.sleep(server.delay_s)
                start, end = 0, len(server.data) - 1
                if self.headers.get("Range"):  # bytes=a-b
                    first, last = self.headers["Range"].removeprefix("bytes=").split("-")
                    start, end = int(first), min(int(last or end), end)
                body = server.data[start : end + 1]
                self.send_response(206 if self.headers.get("Range") else 200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(server.data)}")
                self.end_headers()
                server.sent += len(body)  # before the write: a reader may have it all and return first
                self.wfile.write(body)

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/shards/train-000000.tar"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()


STAGER = """
import sys, time
from pipeline.shard_read import ShardRecord, stage
url, size, sha, cache, hold = sys.argv[1:]
while time.time() < float(hold):  # start together
    time.sleep(0.005)
print(stage(url, ShardRecord(int(size), sha), cache, wait_s=60))
"""


@pytest.fixture
def served(shards):
    """A shard of the fixture behind a slow HTTP server, and its record."""
    path = _first_shard(shards, "train")
    server = ShardServer(path.read_bytes(), delay_s=0.5)
    yield server, ShardRecord(path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    server.http.shutdown()


def test_one_process_per_node_downloads_a_shard_the_others_wait(tmp_path, served):
    """Four processes need one remote shard at the same moment: the server sends its bytes once,
    and all four read the same checked copy from the node's cache."""
    server, record = served
    cache, start = tmp_path / "cache", time.time() + 2.0
    args = [server.url, str(record.bytes), record.sha256, str(cache), str(start)]
    command = [sys.executable, "-c", STAGER, *args]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    assert set(outs) == {str(cache / f"{record.sha256}.tar")}
    assert server.sent == record.bytes  # one download, not four
    assert sorted(p.name for p in cache.iterdir()) == [f".{record.sha256}.tar.lock", f"{record.sha256}.tar"]


def test_a_held_stage_lock_times_out_naming_the_shard_and_a_killed_holder_frees_it(tmp_path, served):
    """While another process of the node holds the shard's lock, a rank waits ``stage_wait_s`` and
    then fails naming the shard; when that process is killed mid-download (its partial file left
    behind), the kernel frees the lock and the next rank downloads the shard and clears the debris."""
    server, record = served
    cache = tmp_path / "cache"
    cache.mkdir()
    lock = cache / f".{record.sha256}.tar.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl,sys,time; f=open({str(lock)!r},'a+b'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    debris = cache / f".{record.sha256[:16]}.killed.partial"
    debris.write_bytes(b"half a shard")
    began = time.monotonic()
    held = f"{server.url}: another process .* over 1 s \\(storage.stage_wait_s\\)"
    with pytest.raises(ShardStageTimeout, match=held):
        stage(server.url, record, str(cache), wait_s=1.0)
    assert time.monotonic() - began >= 1.0 and server.sent == 0  # it waited, and downloaded nothing
    holder.kill()
    holder.wait()
    path = stage(server.url, record, str(cache), wait_s=30.0)
    assert path.stat().st_size == record.bytes and server.sent == record.bytes
    assert not debris.exists()
