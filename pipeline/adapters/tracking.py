"""MLflow tracking, all of it: one run per stage grouped by a pipeline-run tag, and the tune
stage's parent run with one child run per trial. (The registry is ``adapters/registry.py``.)

The driver creates the run (so a restarted Ray worker keeps logging into the same one) and
workers log by run id through ``MlflowClient``; only rank 0 logs. Epoch metrics are logged
exactly once even across a worker restart: steps already in the run's history are skipped. An
MLflow outage does not stop training: epochs are buffered and sent when it answers again
(``EpochLogger``), and the driver's writes wait for it up to ``mlflow.outage_wait_s``, then fail
naming MLflow (``until_reachable``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import ssl
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from .. import storage
from ..params import MlflowConfig, TuneSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
PIPELINE_TAG = "bireal.pipeline_run"
NON_METRIC_KEYS = {"segment", "ended_ms"}


def resolve(cfg: MlflowConfig) -> MlflowConfig:
    """Absolute URIs, so Ray workers and Tune trials in other working directories share them."""
    root = Path.cwd()  # the project the stages run in (dvc repro, make demo: the checkout)
    uri = cfg.tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"
    if uri.startswith(("http://", "https://")):  # a tracking server: it decides where artifacts go
        return replace(cfg, tracking_uri=uri)
    artifacts = cfg.artifact_location or str(root / "mlartifacts")
    if "://" not in artifacts:
        artifacts = Path(artifacts).resolve().as_uri()
    return replace(cfg, tracking_uri=uri, artifact_location=artifacts)


def client(cfg: MlflowConfig):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)  # the registry lives there too


def experiment_id(cfg: MlflowConfig) -> str:
    c = client(cfg)
    exp = c.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(cfg.experiment, artifact_location=cfg.artifact_location or None)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def start_stage_run(cfg: MlflowConfig, stage: str, config: dict, group: str, resume_key: str = "") -> str:
    """A stage's run. With ``resume_key`` (run name and inputs digest), an unfinished run of an
    earlier launch with that key is continued instead (its logged epochs are kept, not repeated)."""
    c = client(cfg)
    tags = {PIPELINE_TAG: group, "bireal.stage": stage}
    if resume_key:
        tags["bireal.resume_key"] = resume_key
        found = c.search_runs(
            [experiment_id(cfg)],
            f"tags.`bireal.resume_key` = '{resume_key}' and attributes.status != 'FINISHED'",
            max_results=1,
        )
        if found:
            c.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    run = c.create_run(experiment_id(cfg), run_name=stage, tags=tags)
    for key, value in loggable_params(config).items():
        c.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


# What a stage run's params may show (anyone with READ on the experiment sees them): the train and
# ray settings, never a runtime_env's values, which carry whatever a user passes to the workers
# (tokens, keys). Of those, the names alone are logged.
LOGGED_SECTIONS = ("train", "ray")
NAMES_ONLY = {"ray.runtime_env"}


def loggable_params(config: dict) -> dict[str, Any]:
    """The allow-listed, flattened params of ``{"train": ..., "ray": ...}``."""
    out = {}
    for section in LOGGED_SECTIONS:
        values = dict(config.get(section) or {})
        for key in [k for k in values if f"{section}.{k}" in NAMES_ONLY]:
            hidden = values.pop(key) or {}
            out[f"{section}.{key}"] = json.dumps(
                {k: sorted(v) if isinstance(v, dict) else "<set>" for k, v in hidden.items()}, sort_keys=True
            )
        out.update(flatten(values, f"{section}."))
    return out


def log_shards_input(cfg: MlflowConfig, run_id: str, shards: str) -> dict:
    """The shard manifest as the run's input dataset (MLflow lineage, ``MlflowClient.log_inputs``):
    its URI as the source, its sha256 as the digest, and the per-split counts and classes as the
    profile, so a run names exactly the data it trained on and a re-shard shows as a new dataset.
    -> what was logged."""
    import hashlib

    from mlflow.entities import Dataset, DatasetInput, InputTag

    location = shards if storage.is_url(shards) else str(Path(shards).resolve())
    url = storage.join(location, "manifest.json")
    text = storage.read_text(url)
    digest = hashlib.sha256(text.encode()).hexdigest()
    manifest = json.loads(text)
    profile = {
        "sha256": digest,
        "splits": {name: split["count"] for name, split in manifest["splits"].items()},
        "classes": len(manifest["classes"]),
    }
    source_type = url.split("://", 1)[0] if "://" in url else "local"
    dataset = Dataset(
        name=Path(shards.rstrip("/")).name or "shards",
        digest=digest[:16],  # MLflow shows a short digest; the whole sha256 is in the profile
        source_type=source_type,
        source=json.dumps({"uri": url}),
        profile=json.dumps(profile),
    )
    client(cfg).log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])])
    return {"uri": url, **profile}


def log_metrics(c, run_id: str, values: dict[str, float], step: int = 0, timestamp_ms: int | None = None) -> None:
    """``values`` at ``step`` in one request (``log_batch``): recorded all together or not at all.
    With the same ``timestamp_ms`` a resend is idempotent: the store keeps one row per (key,
    timestamp, step, value), so a request that timed out but landed is not logged twice."""
    from mlflow.entities import Metric

    when = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
    c.log_batch(run_id, metrics=[Metric(key, float(value), when, step) for key, value in values.items()])


def epoch_values(metrics: dict) -> tuple[int, dict[str, float]]:
    """An epoch's (timestamp in ms, numeric metrics) as logged: its end time where recorded."""
    values = {k: v for k, v in metrics.items() if k not in NON_METRIC_KEYS and isinstance(v, (int, float))}
    return int(metrics.get("ended_ms") or time.time() * 1000), values


class TrackingUnavailable(RuntimeError):
    """MLflow stayed unreachable longer than ``mlflow.outage_wait_s`` where the pipeline must write."""


def _unreachable(cfg: MlflowConfig, seconds: float, what: str, error: BaseException) -> TrackingUnavailable:
    cause = storage.scrub_credentials(str(error), cfg.tracking_uri)[:300]  # MLflow's errors quote the URL
    return TrackingUnavailable(
        f"MLflow at {storage.without_credentials(cfg.tracking_uri)} unreachable for {seconds:.0f} s while {what} "
        f"({type(error).__name__}: {cause}); training's checkpoints are kept: run the stage again once MLflow "
        "is back (it resumes and logs the epochs it has)"
    )


# what MLflow answers when it is up and says no: raised at once, never waited out
ANSWERED = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_DOES_NOT_EXIST",
    "RESOURCE_ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
    "BAD_REQUEST",
    "INVALID_STATE",
}


def _unreachable_error(error: BaseException) -> bool:
    return getattr(error, "error_code", None) not in ANSWERED


def until_reachable(cfg: MlflowConfig, what: str, call: Callable[[], T]) -> T:
    """``call()``, retried with backoff while MLflow is unreachable, for up to ``cfg.outage_wait_s``;
    then ``TrackingUnavailable`` naming MLflow (never an unrelated error in its place)."""
    start, delay = time.monotonic(), 1.0
    while True:
        try:
            return call()
        except Exception as e:  # the client raises MlflowException or requests' errors for a down server
            if not _unreachable_error(e):  # MLflow answered: a bad request or a refusal is not an outage
                raise
            waited = time.monotonic() - start
            if waited + delay > cfg.outage_wait_s:
                raise _unreachable(cfg, waited, what, e) from None  # its message has the cause, scrubbed
            log.warning(
                "MLflow at %s unreachable while %s (%s: %s); retrying in %.0f s, for up to mlflow.outage_wait_s=%.0f s "
                "(the address: mlflow.tracking_uri or $MLFLOW_TRACKING_URI)",
                storage.without_credentials(cfg.tracking_uri), what, type(e).__name__,
                storage.scrub_credentials(str(e), cfg.tracking_uri)[:200], delay,
                cfg.outage_wait_s,
            )  # fmt: skip
            time.sleep(delay)
            delay = min(2 * delay, 30.0)


def probe(cfg: MlflowConfig, timeout_s: float = 10.0) -> None:
    """One request to a tracking server's ``/health``, no retries: an ``OSError`` where nothing
    answers. (MLflow's own client retries a refused connection for about 4 minutes per call,
    silently, before its first error.) A local store has nothing to probe."""
    import urllib.error
    import urllib.request

    if not cfg.tracking_uri.startswith(("http://", "https://")):
        return
    # urllib reads 'user:password@host' as the host name: /health wants no user (a 401 answers too)
    health = f"{storage.without_credentials(cfg.tracking_uri).rstrip('/')}/health"
    try:
        urllib.request.urlopen(health, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # a server answered (an auth proxy, a 404 from a gateway): MLflow's client says the rest
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLError):
            return  # something answered in TLS: MLflow's client has the certificate settings
        raise


def wait_for_tracking(cfg: MlflowConfig, what: str) -> None:
    """Before a command's first MLflow write: a server that does not answer is said at once, on
    stderr, and waited for up to ``mlflow.outage_wait_s`` (a typo in the address then reads as an
    outage that names the address, not as minutes of silence)."""
    until_reachable(cfg, what, lambda: probe(cfg))


class EpochLogger:
    """Logs each epoch's metrics at step = epoch, once, off the training's critical path.

    ``__call__`` queues the epoch and waits at most ``cfg.sync_wait_s`` for a sender thread to log
    it, so a healthy MLflow has every epoch before the stage reports it, and an unreachable one
    costs the training that much per epoch, not a failure: the sender keeps the queue and retries
    until MLflow answers. A refusal (MLflow answered: a deleted run, no permission) is not retried:
    the sender stops and keeps it in ``refused``, and the driver's backfill raises it, naming what
    MLflow said. Steps already in the run (a restarted worker's backfill) are skipped.
    ``close`` waits for the queue to drain; what a worker could not send, the driver backfills
    from the stage's history (``stages._tracked_training``)."""

    RETRY_S = 5.0

    def __init__(self, cfg: MlflowConfig, run_id: str):
        self.cfg, self.client, self.run_id = cfg, client(cfg), run_id
        self.logged: set[int] | None = None  # the run's logged steps, read on the first reachable send
        self.queue: dict[int, tuple[int, dict[str, float]]] = {}  # step -> (timestamp ms, metrics)
        self.abandoned = False  # closed: nothing more is sent
        self.refused: BaseException | None = None  # what MLflow answered instead of logging
        self._lock = threading.Lock()
        self._wake, self._drained, self._closing = threading.Event(), threading.Event(), False
        self._drained.set()
        self._sender = threading.Thread(target=self._send_loop, name=f"mlflow-{run_id[:8]}", daemon=True)
        self._sender.start()

    def __call__(self, metrics: dict) -> None:
        self.backfill([metrics])

    def backfill(self, history: list[dict]) -> None:
        """Queue every epoch of ``history``, then wait (once, at most ``sync_wait_s``) for them."""
        with self._lock:
            for metrics in history:
                self.queue[int(metrics["epoch"])] = epoch_values(metrics)
            self._drained.clear()
        self._wake.set()
        self._drained.wait(self.cfg.sync_wait_s)

    @property
    def pending(self) -> list[int]:
        with self._lock:
            return sorted(self.queue)

    def _send_pending(self) -> None:
        if self.logged is None:
            self.logged = {m.step for m in self.client.get_metric_history(self.run_id, "val_top1")}
        while True:
            with self._lock:
                if not self.queue or self.abandoned:
                    self._drained.set()
                    return
                step = min(self.queue)
                values = self.queue[step]
            if step not in self.logged:
                log_metrics(self.client, self.run_id, values[1], step, timestamp_ms=values[0])
                self.logged.add(step)
            with self._lock:
                if self.queue.get(step) is values:
                    del self.queue[step]

    def _send_loop(self) -> None:
        down_since = None
        while True:
            self._wake.wait(self.RETRY_S if down_since is not None else None)
            self._wake.clear()
            try:
                self._send_pending()
                if down_since is not None:
                    waited = time.monotonic() - down_since
                    log.warning("MLflow reachable again after %.0f s: buffered epochs logged", waited)
                down_since = None
            except Exception as e:
                if not _unreachable_error(e):  # MLflow answered no: retrying cannot change that
                    log.error("MLflow refused the epochs' metrics (%s): not retried", e)
                    self.refused, self.abandoned = e, True
                    self._drained.set()
                    return
                # unreachable (or slow): keep the queue, retry
                self.logged = None  # a timed-out request may have landed: read the run again first
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("MLflow unreachable (%s): epochs %s buffered, retrying", type(e).__name__, self.pending)
            if self.abandoned or (self._closing and down_since is None):
                return

    def close(self, wait_s: float) -> list[int]:
        """Wait up to ``wait_s`` for the queued epochs to be logged, then stop sending (whoever
        backfills next must not race this thread); -> the steps still unsent."""
        self._closing = True
        self._wake.set()
        self._drained.wait(wait_s)
        with self._lock:
            unsent, self.abandoned = sorted(self.queue), True
            self.queue.clear()
        return unsent


def publish_last_sample(monitor, node: str) -> None:
    """One more step of a finished MLflow SystemMetricsMonitor: what it collected since it last
    published, with a sample taken now. Its loop publishes only after a whole interval, so a block
    shorter than the interval (a short stage, or a loaded machine's slow start) would log nothing
    and the samples taken at its start would be dropped."""
    try:
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:  # an outage, a deleted run: metrics are not worth a failure
        log.warning("last system metrics of %s not logged (%s: %s)", node, type(e).__name__, e)


@contextlib.contextmanager
def system_metrics(cfg: MlflowConfig, run_id: str, node: str) -> Iterator[None]:
    """While the block runs, this node's CPU, memory, disk and network use (and with nvidia-ml-py,
    every GPU's utilization and memory) logged into ``run_id`` as ``system/<node>/...`` every
    ``cfg.system_metrics_s`` seconds by MLflow's monitor; one per node, so a starved or idle GPU
    shows next to the epochs' ``data_wait_fraction``. A restarted worker continues the steps.

    Metrics are not worth a failure or a wait: the monitor lives in a thread of its own (MLflow's
    monitor asks the server for the run when it starts), a monitor that cannot start is a warning,
    an outage ends the node's sampling for the stage (MLflow's monitor stops at an unreachable
    server), and leaving the block waits at most ``cfg.sync_wait_s`` for the last samples, which
    include one taken on leaving (``publish_last_sample``)."""
    if not cfg.system_metrics_s:
        yield
        return
    stop = threading.Event()

    def sample() -> None:
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                run_id,
                sampling_interval=cfg.system_metrics_s,
                resume_logging=True,  # a restarted worker's samples follow the ones already logged
                node_id=node,
                tracking_uri=cfg.tracking_uri,
            )
            monitor.start()
        except Exception as e:
            log.warning("system metrics of %s not logged (%s: %s)", node, type(e).__name__, e)
            return
        stop.wait()
        monitor.finish()  # joins MLflow's thread and sends what it holds
        publish_last_sample(monitor, node)

    thread = threading.Thread(target=sample, name=f"system-metrics-{node}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(cfg.sync_wait_s)
        if thread.is_alive():
            wait = cfg.sync_wait_s
            log.warning("system metrics of %s: MLflow did not take the last samples within %.0f s", node, wait)


def log_missing_epochs(cfg: MlflowConfig, run_id: str, history: list[dict]) -> list[int]:
    """The driver's backfill: every epoch of ``history`` the run lacks (a worker's metrics lost in
    an outage), logged once; -> the steps logged now."""
    c = client(cfg)
    logged = {m.step for m in c.get_metric_history(run_id, "val_top1")}
    added = []
    for metrics in history:
        step = int(metrics["epoch"])
        if step not in logged:
            when, values = epoch_values(metrics)
            log_metrics(c, run_id, values, step, timestamp_ms=when)
            logged.add(step)
            added.append(step)
    return added


def finish_stage_run(
    cfg: MlflowConfig, run_id: str, result: dict, cost: dict | None = None, status: str = "FINISHED"
) -> None:
    c = client(cfg)
    if cost:
        keys = ("ops", "memory_mbit", "binary_macs", "real_macs", "params")
        log_metrics(c, run_id, {f"cost_{key}": cost[key] for key in keys})
        c.log_dict(run_id, cost, "cost_summary.json")
    checkpoint = result.get("checkpoint")
    if checkpoint and Path(checkpoint).is_file():
        c.log_artifact(run_id, checkpoint, artifact_path="checkpoint")
    c.set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------- the tune stage


def tune_parent_run(cfg: MlflowConfig, group: str, name: str, settings: TuneSettings) -> dict:
    """The search's parent run (the same one when an interrupted search resumes); -> what trials
    need to log under it."""
    c = client(cfg)
    exp = experiment_id(cfg)
    existing = c.search_runs([exp], f"tags.`bireal.tune_name` = '{name}'")
    if existing:
        parent = existing[0].info.run_id
    else:
        parent = c.create_run(
            exp, run_name="tune", tags={"bireal.stage": "tune", "bireal.tune_name": name, PIPELINE_TAG: group}
        ).info.run_id
        for k, v in flatten({"tune": asdict(settings)}).items():
            c.log_param(parent, k, str(v))
    return {"mlflow": asdict(cfg), "experiment_id": exp, "parent_run": parent}


def trial_logger(tracking: dict, trial_id: str, trial_name: str, settings: dict) -> EpochLogger:
    """A trial's child run (found again when a resumed search restarts the trial) and its logger."""
    cfg = MlflowConfig(**tracking["mlflow"])
    c = client(cfg)
    existing = c.search_runs([tracking["experiment_id"]], f"tags.`bireal.trial_id` = '{trial_id}'")
    if existing:  # a trial restarted by a resumed search: same run, live again
        run_id = existing[0].info.run_id
        c.update_run(run_id, status="RUNNING")
    else:
        run_id = c.create_run(
            tracking["experiment_id"],
            run_name=trial_name,
            tags={
                "mlflow.parentRunId": tracking["parent_run"],
                "bireal.trial_id": trial_id,
                "bireal.stage": "tune-trial",
            },
        ).info.run_id
        for k, v in settings.items():
            c.log_param(run_id, k, v)
    return EpochLogger(cfg, run_id)


def close_tune_runs(cfg: MlflowConfig, tracking: dict, summary: dict) -> None:
    """Close the trials' runs (ASHA-stopped ones never close themselves) and log the table."""
    c = client(cfg)
    children = c.search_runs([tracking["experiment_id"]], f"tags.`mlflow.parentRunId` = '{tracking['parent_run']}'")
    for run in children:
        if run.info.status == "RUNNING":
            c.set_terminated(run.info.run_id, "FINISHED" if summary["finished"] else "KILLED")
    if summary["best"]:
        c.log_dict(tracking["parent_run"], summary["best"], "best_config.json")
        c.log_dict(tracking["parent_run"], {"table": summary["table"], "rankings": summary["rankings"]}, "table.json")
        c.log_metric(tracking["parent_run"], "best_val_top1", summary["table"][0]["mean"])
    if summary["finished"]:
        c.set_terminated(tracking["parent_run"], "FINISHED")
