"""One driver per run: a lease object beside the run in storage.

Two drivers on one run id (two ``bireal run pretrain``, a retried job beside a live one) would share
Ray's run folder and the MLflow run, each publishing the same names. The first driver holds a lease,
``<storage>/<run>.lease.json`` = {holder, since, expires, token}; a second one finds it live and
stops at once, naming the holder (``LeaseHeld``). The holder renews it every third of its
time-to-live from a background thread; a holder that died stops renewing, and once ``expires`` has
passed the next driver takes the run over (at once where the holder was a process of the same
machine, same boot, that no longer exists: a driver killed and run again in place).

Every change is a compare-and-swap against the version read, so two drivers racing for a free or
lapsed lease end with one holder:
- object storage (``s3://``): PutObject with ``If-None-Match: *`` to create, ``If-Match: <ETag>``
  to renew or take over (S3 and S3-compatible stores that support conditional writes; moto does);
- a local folder: the read and the write under an exclusive ``flock`` of ``<lease>.lock``, the
  record written to a temporary file and renamed.
``expires`` is the holder's wall clock: clocks apart by more than the time-to-live would let a
lease be taken early, so keep the time-to-live well above the cluster's clock skew.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from . import storage

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another live driver holds the run."""


class LeaseLost(RuntimeError):
    """This driver's lease was taken over (it could not renew it in time)."""


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _boot_id() -> str:
    """This machine's current boot and PID namespace (Linux): where a holder's pid can be looked up
    (two pods on one node share the boot, not the namespace); "" where unknown, which never matches."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class _LocalRecord:
    """The lease file in a local folder: compare-and-swap under an exclusive flock."""

    def __init__(self, path: str):
        self.path = Path(path.removeprefix("file://"))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> tuple[dict | None, str | None]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None, None
        return json.loads(data), hashlib.sha256(data).hexdigest()

    def read(self) -> tuple[dict | None, str | None]:
        with self._locked():
            return self._read()

    def swap(self, version: str | None, record: dict) -> str | None:
        """Write ``record`` if the lease is still at ``version`` (None: absent); -> the new version or None."""
        data = json.dumps(record).encode()
        with self._locked():
            if self._read()[1] != version:
                return None
            tmp = self.path.with_name(f".{self.path.name}.{record['token']}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        return hashlib.sha256(data).hexdigest()

    def delete(self, version: str) -> None:
        with self._locked():
            if self._read()[1] == version:
                self.path.unlink()


class _ObjectRecord:
    """The lease object in an S3 store: conditional PutObject (If-None-Match / If-Match on the ETag)."""

    def __init__(self, location: str):
        self.fs, self.path = storage.filesystem(location)

    def read(self) -> tuple[dict | None, str | None]:
        try:
            etag = self.fs.info(self.path, refresh=True)["ETag"]
            return json.loads(self.fs.cat_file(self.path)), etag  # newer than etag: the swap then fails
        except FileNotFoundError:
            return None, None

    def swap(self, version: str | None, record: dict) -> str | None:
        condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            out = self.fs.pipe_file(self.path, json.dumps(record).encode(), **condition)
        except (FileExistsError, FileNotFoundError):
            return None
        except OSError as e:
            if "pre-condition" in str(e) or "PreconditionFailed" in repr(e.__cause__):
                return None
            raise
        return out["ETag"]

    def delete(self, version: str) -> None:
        if self.read()[1] == version:
            self.fs.rm_file(self.path)


class RunLease:
    """The lease on run ``name`` in ``storage_path``; ``with RunLease(...)`` holds it (renewed in the
    background) and releases it on exit."""

    def __init__(self, storage_path: str, name: str, ttl_s: float = 60.0):
        location = storage.join(storage_path, f"{name}.lease.json")
        self.record = _ObjectRecord(location) if storage.is_url(location) else _LocalRecord(location)
        self.name, self.location, self.ttl_s = name, location, ttl_s
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()}/{os.getpid()}"
        self.since = time.time()
        self.version: str | None = None
        self.lost = False
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _mine(self) -> dict:
        now = time.time()
        return {
            "holder": self.holder,
            "since": _iso(self.since),
            "expires": now + self.ttl_s,
            "token": self.token,
            "run": self.name,
            "boot_id": _boot_id(),
            "pid": os.getpid(),
        }

    def _lapsed(self, current: dict) -> bool:
        """Past its ``expires``, or held by a process of this very machine (same boot and PID
        namespace) that is gone: a driver killed here is taken over at once, not a time-to-live later."""
        if current["expires"] <= time.time():
            return True
        same_boot = current.get("boot_id") and current.get("boot_id") == _boot_id()
        return bool(same_boot) and not _alive(int(current.get("pid", -1)))

    def acquire(self) -> None:
        """Take the lease, or raise ``LeaseHeld`` naming its live holder."""
        for _ in range(3):  # a lost race re-reads: the winner is then a live holder
            current, version = self.record.read()
            if current is not None and current.get("token") != self.token and not self._lapsed(current):
                left = current["expires"] - time.time()
                raise LeaseHeld(
                    f"run {self.name} held by {current['holder']} since {current['since']} (its lease, "
                    f"{self.location}, is renewed while it runs; it lapses {left:.0f} s after the holder stops): "
                    "wait for that run, or stop it; a holder that died is taken over once its lease lapses"
                )
            if current is not None and current.get("token") != self.token:
                log.warning("run %s: taking over the lapsed lease of %s", self.name, current["holder"])
            self.version = self.record.swap(version, self._mine())
            if self.version is not None:
                return
        raise LeaseHeld(f"run {self.name}: another driver keeps taking the lease at {self.location}")

    def renew(self) -> None:
        """Push ``expires`` on; a lease changed under us means another driver took over."""
        version = self.record.swap(self.version, self._mine())
        if version is None:
            self.lost = True
            log.error("run %s: lease lost to another driver (%s); this driver must stop", self.name, self.location)
            return
        self.version = version

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except OSError as e:  # the store is unreachable: try again next beat, before the lease lapses
                log.warning("run %s: lease renewal failed (%s); retrying", self.name, e)
            if self.lost:
                return

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"run {self.name}: another driver took over the lease at {self.location}")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.version is not None and not self.lost:
            try:
                self.record.delete(self.version)
            except OSError as e:  # it lapses by itself
                log.warning("run %s: could not release the lease (%s); it lapses in %.0f s", self.name, e, self.ttl_s)
        self.version = None

    def __enter__(self) -> RunLease:
        self.acquire()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease-{self.name}", daemon=True)
        self._beat.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        lost = self.lost
        self.release()
        if lost and exc_type is None:  # the stage ran on while another driver held its run
            self.check()
