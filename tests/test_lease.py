"""One driver per run (pipeline/lease.py): a second driver on a held run stops at once naming the
holder, a killed holder's run is taken over once its lease lapses, a live holder keeps it by
renewing, and racing drivers end with one holder, on a local folder and on an S3 server (moto)
with conditional writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.lease import LeaseHeld, RunLease

HOLD = """
import sys, time
from pipeline.lease import RunLease
lease = RunLease(sys.argv[1], "run-1-pretrain", ttl_s=float(sys.argv[2]))
lease.__enter__()
print("held", flush=True)
time.sleep(600)
"""


def _holder(location: str, ttl: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, location, str(ttl)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory):
    """moto's S3 server on loopback, with one bucket; the store's location and endpoint."""
    from cluster_services import S3, stop

    saved = dict(os.environ)
    s3 = S3(tmp_path_factory.mktemp("moto"), bucket="leases")
    yield "s3://leases/ray", s3.url
    stop(s3.proc)
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path, monkeypatch):
    if request.param == "local":
        return str(tmp_path / "ray_results")
    base, endpoint = request.getfixturevalue("s3_store")
    monkeypatch.setenv("BIREAL_S3_ENDPOINT_URL", endpoint)
    return f"{base}/{tmp_path.name}"


def test_a_killed_holder_is_named_then_its_run_taken_over(location, caplog):
    holder = _holder(location, ttl=3.0)
    try:
        start = time.monotonic()
        with pytest.raises(LeaseHeld, match=rf"run run-1-pretrain held by [^ ]+/{holder.pid} since 20"):
            RunLease(location, "run-1-pretrain", ttl_s=3.0).acquire()
        assert time.monotonic() - start < 10
        time.sleep(4.5)  # over the ttl: a live holder has renewed by now (every ttl / 3)
        with pytest.raises(LeaseHeld, match=f"/{holder.pid} since"):
            RunLease(location, "run-1-pretrain", ttl_s=3.0).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # its lease has not lapsed, but its holder was a process of this machine that is gone: at once
    second = RunLease(location, "run-1-pretrain", ttl_s=30.0)
    second.acquire()
    assert any("taking over the lapsed lease" in r.getMessage() for r in caplog.records)
    with pytest.raises(LeaseHeld, match=f"/{os.getpid()} since"):  # now this process holds it
        RunLease(location, "run-1-pretrain", ttl_s=3.0).acquire()
    second.release()
    with RunLease(location, "run-1-pretrain", ttl_s=3.0):  # released: free at once
        pass


def test_a_holder_elsewhere_is_taken_over_once_its_lease_lapses(location):
    """A holder on another machine (its liveness unknown here) keeps the run until its lease lapses."""
    elsewhere = RunLease(location, "run-3-finetune", ttl_s=3.0)
    record = {**elsewhere._mine(), "holder": "node-7/4242", "boot_id": "another-machine", "pid": 4242}
    assert elsewhere.record.swap(None, record) is not None
    with pytest.raises(LeaseHeld, match="held by node-7/4242"):
        RunLease(location, "run-3-finetune", ttl_s=3.0).acquire()
    deadline = time.monotonic() + 10
    taker = RunLease(location, "run-3-finetune", ttl_s=3.0)
    while True:
        try:
            taker.acquire()
            break
        except LeaseHeld:
            assert time.monotonic() < deadline, "the lease never lapsed"
            time.sleep(0.5)
    assert time.monotonic() - (deadline - 10) >= 2  # not before its time-to-live had passed
    taker.release()


def test_racing_drivers_end_with_one_holder(location):
    leases = [RunLease(location, "run-2-binarize", ttl_s=30.0) for _ in range(6)]
    barrier, won, refused = threading.Barrier(len(leases)), [], []

    def race(lease):
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld:
            refused.append(lease)

    threads = [threading.Thread(target=race, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    won[0].renew()
    assert not won[0].lost
    stolen = RunLease(location, "run-2-binarize", ttl_s=30.0)
    stolen.record.swap(won[0].version, stolen._mine())  # another driver took the lease over
    won[0].renew()
    assert won[0].lost


def test_a_second_bireal_run_stops_naming_the_holder(tmp_path, demo_shards):
    """`bireal run pretrain` on a run id another driver holds exits within 10 s, before Ray starts
    or a byte of tracking is written."""
    params = tmp_path / "p.yaml"
    params.write_text(
        f"train: {{shards: {demo_shards}, out: {tmp_path / 'ckpt'}}}\n"
        f"ray: {{storage_path: {tmp_path / 'ray_results'}, temp_dir: {tmp_path / 'ray_tmp'}}}\n"
        f"mlflow: {{tracking_uri: sqlite:///{tmp_path / 'mlflow.db'}}}\n"
    )
    env = {**os.environ, "BIREAL_PIPELINE_RUN": "leased"}
    ttl = 30.0
    with RunLease(str(tmp_path / "ray_results"), "leased-pretrain", ttl_s=ttl):
        start = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "run", "pretrain", "--params", str(params)],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )
        took = time.monotonic() - start
    assert out.returncode == 2 and f"run leased-pretrain held by {os.uname().nodename}/{os.getpid()}" in out.stderr
    # refused at once, not after waiting for the lease to lapse (3 s on an idle machine; a busy
    # one stretches the CLI's start, not the lease)
    assert took < ttl, f"{took:.1f} s"
    assert not Path(tmp_path / "mlflow.db").exists() and not Path(tmp_path / "ray_tmp").exists()
