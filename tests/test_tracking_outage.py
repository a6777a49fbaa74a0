"""MLflow off the training's critical path (pipeline/adapters/tracking.py): a real MLflow server
frozen (SIGSTOP) mid-stage costs the stage no failure, and every epoch is in the run exactly once
afterwards; an outage that outlasts ``mlflow.outage_wait_s`` fails the stage with an error naming
MLflow, its checkpoints kept. The clock is scaled: a 2 s client timeout with no client retries
stands for the client's own minute of retries."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline import stages
from pipeline.adapters.tracking import TrackingUnavailable, client, resolve
from pipeline.params import load_params

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from cluster_services import MlflowServer

    root = tmp_path_factory.mktemp("mlflow")
    server = MlflowServer(root, f"sqlite:///{root / 'mlflow.db'}", str(root / "artifacts"), "")
    yield server
    server.close()


@pytest.fixture
def fast_client(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _params(tmp_path, demo_shards, server, epochs: int, outage_wait_s: float):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"train: {{shards: {demo_shards}, out: {tmp_path / 'ckpt'}, width: 0.25, batch_size: 32, "
        "max_steps_per_epoch: 2, loader_workers: 0}\n"
        f"pretrain: {{phase_epochs: [{epochs}, 0, 0]}}\n"
        f"mlflow: {{tracking_uri: '{server.uri}', experiment: {tmp_path.name}, sync_wait_s: 1, "
        f"outage_wait_s: {outage_wait_s}}}\n"
    )
    return load_params(path)


class Freeze:
    """SIGSTOP the server once epoch ``stop_at``'s train state is written; SIGCONT once epoch
    ``resume_at``'s is (None: at the end of the test). Records when each happened."""

    def __init__(self, server, out: Path, stop_at: int, resume_at: int | None):
        self.server, self.out, self.stop_at, self.resume_at = server, out, stop_at, resume_at
        self.stopped_at = self.resumed_at = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _state(self, epoch: int) -> bool:
        return (self.out / ".train_state" / f"pretrain-epoch{epoch:03d}").exists()

    def _watch(self):
        while not self.done.is_set():
            if self.stopped_at is None and self._state(self.stop_at):
                os.killpg(self.server.proc.pid, signal.SIGSTOP)
                self.stopped_at = time.monotonic()
            if self.stopped_at and self.resume_at is not None and self._state(self.resume_at):
                self.resume()
            time.sleep(0.05)

    def resume(self):
        if self.resumed_at is None and self.stopped_at is not None:
            os.killpg(self.server.proc.pid, signal.SIGCONT)
            self.resumed_at = time.monotonic()

    def close(self):
        self.done.set()
        self.thread.join()
        self.resume()


def test_a_frozen_mlflow_mid_stage_costs_no_failure_and_no_epoch(tmp_path, demo_shards, mlflow_server, fast_client):
    params = _params(tmp_path, demo_shards, mlflow_server, epochs=5, outage_wait_s=60)
    freeze = Freeze(mlflow_server, tmp_path / "ckpt", stop_at=0, resume_at=3)
    try:
        result = stages.train("pretrain", params, use_ray=False)
    finally:
        freeze.close()
    # the fault landed mid-stage: MLflow froze after epoch 0 and stayed frozen while epochs 1-3 trained
    assert freeze.stopped_at is not None and freeze.resumed_at is not None
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2, 3, 4]
    c = client(resolve(params.mlflow))
    steps = [m.step for m in c.get_metric_history(result["mlflow_run_id"], "val_top1")]
    assert sorted(steps) == [0, 1, 2, 3, 4]  # every epoch once: buffered, then sent
    assert c.get_run(result["mlflow_run_id"]).info.status == "FINISHED"


def test_an_outage_past_the_wait_fails_naming_mlflow(tmp_path, demo_shards, mlflow_server, fast_client):
    params = _params(tmp_path, demo_shards, mlflow_server, epochs=2, outage_wait_s=3)
    freeze = Freeze(mlflow_server, tmp_path / "ckpt", stop_at=0, resume_at=None)
    try:
        with pytest.raises(TrackingUnavailable, match=f"MLflow at {mlflow_server.uri} unreachable for"):
            stages.train("pretrain", params, use_ray=False)
        assert freeze.stopped_at is not None
    finally:
        freeze.close()
    # the training itself finished: its checkpoint is kept for the rerun
    assert (tmp_path / "ckpt" / "pretrain.safetensors").is_file()


def test_only_an_unreachable_mlflow_is_waited_out():
    """A refusal (a permission, a bad request) is MLflow answering: raised at once; a connection
    error is waited out up to ``outage_wait_s``, then named."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import PERMISSION_DENIED

    from pipeline.adapters.tracking import until_reachable
    from pipeline.params import MlflowConfig

    cfg = MlflowConfig(tracking_uri="http://127.0.0.1:9", outage_wait_s=2.5)
    calls = []

    def refused():
        calls.append(time.monotonic())
        raise MlflowException("not yours", error_code=PERMISSION_DENIED)  # as the REST client raises it

    with pytest.raises(MlflowException, match="not yours"):
        until_reachable(cfg, "moving an alias", refused)
    assert len(calls) == 1

    def down():
        calls.append(time.monotonic())
        raise ConnectionError("refused")

    calls.clear()
    start = time.monotonic()
    with pytest.raises(TrackingUnavailable, match="MLflow at http://127.0.0.1:9 unreachable for"):
        until_reachable(cfg, "finishing the stage's run", down)
    # tried at 0 s and, after a 1 s backoff, at 1 s; the next backoff (2 s) would pass the 2.5 s wait
    assert len(calls) == 2 and calls[1] - calls[0] >= 1.0 and time.monotonic() - start < 2.5


def test_a_tracking_server_that_does_not_answer_is_said_at_once(caplog, tmp_path):
    """`bireal train` with a wrong address (MLFLOW_TRACKING_URI=http://127.0.0.1:9) printed nothing
    for minutes: MLflow's client retries a refused connection ~4 minutes per call. The stage's first
    contact is now a single /health request: the address and the error are on stderr at once, then
    waited for up to outage_wait_s and named. A server that answers anything, and a local store,
    pass at once."""
    import http.server
    import logging

    from pipeline.adapters.tracking import wait_for_tracking
    from pipeline.params import MlflowConfig

    cfg = MlflowConfig(tracking_uri="http://127.0.0.1:9", outage_wait_s=2.5)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(TrackingUnavailable, match=r"127.0.0.1:9 unreachable for"):
        wait_for_tracking(cfg, "starting the binarize stage")
    assert time.monotonic() - start < 5
    (first, *_) = [r.getMessage() for r in caplog.records if "unreachable while" in r.getMessage()]
    assert "MLflow at http://127.0.0.1:9 unreachable while starting the binarize stage" in first
    assert "Connection refused" in first and "$MLFLOW_TRACKING_URI" in first

    class Unauthorized(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_for_tracking(MlflowConfig(tracking_uri=f"http://127.0.0.1:{server.server_port}"), "registering")
    finally:
        server.shutdown()
    wait_for_tracking(MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"), "starting")


def test_the_epoch_sender_stops_at_a_refusal(tmp_path):
    """MLflow answering no (the run was deleted) is not an outage: the logger's sender stops at once
    instead of retrying every 5 s for the stage's lifetime, keeps the refusal, and the driver's
    backfill raises it."""
    from mlflow.exceptions import MlflowException

    from pipeline.adapters.tracking import EpochLogger, client, log_missing_epochs
    from pipeline.params import MlflowConfig

    cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", sync_wait_s=30.0)
    c = client(cfg)
    run_id = c.create_run(c.create_experiment("refusal")).info.run_id
    c.delete_run(run_id)
    logger = EpochLogger(cfg, run_id)
    epoch = {"epoch": 0, "val_top1": 0.5, "train_loss": 1.0, "ended_ms": 1}
    start = time.monotonic()
    logger(epoch)  # returns once the sender has stopped, not after sync_wait_s
    assert time.monotonic() - start < cfg.sync_wait_s
    logger._sender.join(timeout=5)
    assert not logger._sender.is_alive() and isinstance(logger.refused, MlflowException)
    assert logger.close(0) == [0]  # unsent, for the driver's backfill, which names the refusal
    with pytest.raises(MlflowException, match="must be in the 'active' state"):
        log_missing_epochs(cfg, run_id, [epoch])


def test_a_block_shorter_than_the_sampling_interval_still_logs_the_nodes_use(tmp_path):
    """MLflow's monitor publishes a sample only after a whole interval; a stage that ends sooner
    (here 0.3 s against 30 s) still gets its node's samples, published when the block ends."""
    from pipeline.adapters.tracking import system_metrics
    from pipeline.params import MlflowConfig

    cfg = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", sync_wait_s=30.0, system_metrics_s=30.0)
    c = client(cfg)
    run_id = c.create_run(c.create_experiment("short")).info.run_id
    start = time.monotonic()
    with system_metrics(cfg, run_id, "node0"):
        time.sleep(0.3)
    assert time.monotonic() - start < 10  # not the 30 s interval
    metrics = c.get_run(run_id).data.metrics
    assert metrics["system/node0/cpu_utilization_percentage"] >= 0
    assert 0 < metrics["system/node0/system_memory_usage_megabytes"]


def test_system_metrics_never_hold_the_stage_on_a_silent_server():
    """A tracking server that takes connections and never answers (a frozen one): the node's
    system-metrics monitor asks it for the run, and the stage leaves the block after at most
    ``sync_wait_s`` anyway, with MLflow's own client still waiting (its default timeout: 120 s)."""
    import socket

    from pipeline.adapters.tracking import system_metrics
    from pipeline.params import MlflowConfig

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent.settimeout(10)
    uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
    cfg = MlflowConfig(tracking_uri=uri, sync_wait_s=1.0, system_metrics_s=0.2)
    with system_metrics(cfg, "0" * 32, "node0"):
        connection, _ = silent.accept()  # the fault landed: the monitor is waiting on the server
        leaving = time.monotonic()
    took = time.monotonic() - leaving
    connection.close()
    silent.close()
    assert 0.9 <= took < 30  # sync_wait_s (the monitor still held by the server), not the client's 120 s
