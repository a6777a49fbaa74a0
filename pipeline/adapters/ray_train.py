"""Ray Train adapter: each stage as a ``TorchTrainer`` job around the plain ``train_loop``.

CPU workers talk gloo (this machine: 2 workers), GPU workers NCCL. Every epoch rank 0 writes the
train state and reports it as a ``ray.train.Checkpoint``; ``FailureConfig(max_failures)`` restarts
a failed worker group, and ``train_loop`` resumes from the last reported checkpoint (the
interrupted epoch is run again from its start).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import storage
from ..env import apply_local_ray_defaults, verbose
from ..params import PROCESS_GROUP_TIMEOUT_S, MlflowConfig, RayConfig, TrainConfig, math_settings
from ..segments import published_names, stage_checkpoint
from ..train import Runtime, load_train_state, train_loop
from .ray_jobs import is_job_server

log = logging.getLogger(__name__)
_JOINED = False  # set when ensure_ray joined a running cluster instead of starting one


class RayRuntime(Runtime):
    def __init__(self):
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self._tmp = tempfile.mkdtemp(prefix="bireal-restore-")

    def report(self, metrics: dict, checkpoint_dir: Path) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if self.rank == 0 else None
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, checkpoint=checkpoint)

    def restore_dir(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        return Path(checkpoint.to_directory(os.path.join(self._tmp, "latest")))

    def device(self) -> torch.device:
        import ray.train.torch

        if not torch.cuda.is_available():  # logical GPUs (scheduling only) or ray.backend: gloo on CPUs
            return torch.device("cpu")
        return ray.train.torch.get_device()

    def placement(self) -> list[dict]:
        """Where every worker runs (rank 0 gets all of them): node, ranks, device."""
        import ray
        import ray.train
        import torch.distributed as dist

        ctx = ray.train.get_context()
        me = {
            "world_rank": ctx.get_world_rank(),
            "local_rank": ctx.get_local_rank(),
            "node_rank": ctx.get_node_rank(),
            "node_ip": ray.util.get_node_ip_address(),
            "device": str(self.device()),
        }
        if not (dist.is_available() and dist.is_initialized()):
            return [me]
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, me)
        return everyone


def _worker_entry(payload: dict) -> None:
    """Runs on every Ray Train worker."""
    from .tracking import EpochLogger, system_metrics

    torch.set_num_threads(max(1, int(payload["threads"])))
    config = TrainConfig(**payload["config"])
    runtime = RayRuntime()
    placement = runtime.placement()  # a collective: every rank takes part
    logger = None
    if runtime.rank == 0 and payload.get("mlflow_run"):
        logger = EpochLogger(MlflowConfig(**payload["mlflow"]), payload["mlflow_run"])
        try:  # where the ranks ran: worth a line of log, not a restart, when MLflow is down
            logger.client.log_dict(payload["mlflow_run"], placement, "placement.json")
        except Exception as e:
            log.warning("placement.json not logged (MLflow: %s: %s)", type(e).__name__, e)
        restored = runtime.restore_dir()
        if restored is not None:  # epochs reported before a failure: log once
            logger.backfill(torch.load(restored / "train_state.pt", weights_only=True)["history"])
    here, monitor = placement[runtime.rank], contextlib.nullcontext()
    if payload.get("mlflow_run") and here["local_rank"] == 0:  # one monitor per node
        monitor = system_metrics(MlflowConfig(**payload["mlflow"]), payload["mlflow_run"], f"node{here['node_rank']}")
    with monitor:
        train_loop(config, runtime, on_epoch=logger)
    if logger is not None:  # what is still queued, the driver logs from the stage's history
        logger.close(logger.cfg.sync_wait_s)


def job_runtime_env(cfg: RayConfig) -> dict:
    """The job's runtime_env: the ``ray.runtime_env`` setting, with the storage settings' env vars
    (endpoint, shard cache) added so every worker reaches the same storage."""
    env = dict(cfg.runtime_env)
    names = (storage.ENDPOINT_ENV, storage.CACHE_ENV, storage.TIMEOUT_ENV)
    shared = {k: os.environ[k] for k in names if os.environ.get(k)}
    if shared:
        env["env_vars"] = {**shared, **(env.get("env_vars") or {})}
    return env


def ensure_ray(cfg: RayConfig):
    """Join ``ray.address`` ($RAY_ADDRESS) or start a local instance (loopback-only settings)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if is_job_server(address):  # a cluster's job server: this driver runs in a
        address = "auto"  # job that `bireal submit` or the flow submitted there, on that cluster
    # workers' and Train's own output (per-report dumps) reach the terminal only with `bireal --verbose`;
    # they are in the session's log files either way
    common = {"log_to_driver": verbose(), "runtime_env": job_runtime_env(cfg) or None}
    if address:
        global _JOINED
        ray.init(address=address, **common)
        _JOINED = True
    else:
        apply_local_ray_defaults()
        Path(cfg.temp_dir).mkdir(parents=True, exist_ok=True)
        ray.init(
            num_cpus=max(2, os.cpu_count() or 2),
            include_dashboard=True,
            _temp_dir=cfg.temp_dir,
            configure_logging=False,
            **common,
        )


def check_fits(need: dict[str, float], what: str, fix: str) -> None:
    """Refuse a request the Ray instance can never hold: Ray would wait for it forever (a TorchTrainer
    of GPU workers on a machine without a GPU sat silent until killed). Only a local instance is
    known to stay as it is; on a cluster the autoscaler may still add nodes, so there it is a
    warning. ``need``: {"CPU": n, "GPU": n} in all, for one placement."""
    import ray

    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if not short:
        return
    missing = ", ".join(f"{v:g} {k} (the Ray instance has {h:g})" for k, (v, h) in short.items())
    message = f"{what} needs {missing}: {fix}"
    if ray_is_local():
        raise RuntimeError(message)
    log.warning("%s; waiting for the cluster to grow", message)


def check_workers_fit(stage: str, cfg: RayConfig) -> None:
    """The stage's workers fit the Ray instance (joined or started here, ``ensure_ray``)."""
    ensure_ray(cfg)
    check_fits(
        {"CPU": cfg.num_workers * cfg.cpus_per_worker, "GPU": cfg.num_workers * cfg.use_gpu},
        f"{stage}: ray.num_workers={cfg.num_workers} workers of ray.cpus_per_worker={cfg.cpus_per_worker:g}"
        + (" and one GPU each (ray.use_gpu)" if cfg.use_gpu else ""),
        "lower ray.num_workers or ray.cpus_per_worker, set ray.use_gpu: false on a machine without GPUs, "
        "or join a cluster that has them (ray.address)",
    )


def ray_is_local() -> bool:
    """Whether this process's Ray instance is one it started on this machine (no cluster to grow)."""
    import ray

    return ray.is_initialized() and len(ray.nodes()) == 1 and not (os.environ.get("RAY_ADDRESS") or _JOINED)


def stage_inputs(config: TrainConfig) -> dict:
    """What a stage's result depends on: its math settings (``params.AFFECTS_MATH``) and its data
    (the manifest's sha256); not where it runs from or how many loader workers it has."""
    manifest = storage.read_text(storage.join(config.shards, "manifest.json"))
    return {"settings": math_settings(config), "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest()}


class InputsChanged(RuntimeError):
    """A relaunch whose math settings or data differ from those of the run it would resume."""


def run_name(config: TrainConfig, ray_cfg: RayConfig, group: str) -> str:
    """``<pipeline_run>-<stage>`` (resume: auto), so a re-launched driver finds its run; with
    resume: never a fresh name per launch."""
    base = f"{group}-{config.stage}" if group else config.stage
    return base if ray_cfg.resume == "auto" else f"{base}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class StageRun:
    """One launch's identity of a stage on Ray, worked out once: the run's name in Ray's storage
    and the digest of its inputs (settings with absolute paths, and the data's manifest)."""

    name: str
    inputs: dict  # stage_inputs: what the run computes (named in the error when it changed)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.inputs, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def resume_key(self) -> str:
        """What the MLflow stage run is tagged with, so a re-launch continues the same run."""
        return f"{self.name}:{self.digest}"


def located(config: TrainConfig) -> TrainConfig:
    """``config`` with absolute local paths: the Ray workers do not share the driver's cwd."""
    return TrainConfig(
        **{**asdict(config), "shards": storage.absolute(config.shards), "out": storage.absolute(config.out)}
    )


def stage_run(config: TrainConfig, ray_cfg: RayConfig, group: str) -> StageRun:
    return StageRun(run_name(config, ray_cfg, group), stage_inputs(located(config)))


def changed_inputs(before: dict, now: dict) -> list[str]:
    """The math settings (and the data) that differ between two ``stage_inputs``."""
    keys = sorted(set(before.get("settings", {})) | set(now.get("settings", {})))
    changed = [k for k in keys if before.get("settings", {}).get(k) != now.get("settings", {}).get(k)]
    return changed + (["the data (manifest)"] if before.get("manifest_sha256") != now.get("manifest_sha256") else [])


def _stored_run(storage_path: str, run: StageRun) -> tuple:
    """(filesystem, root, marker path, run folder, the marker's record or None) of ``run`` in storage."""
    fs, root = storage.filesystem(storage_path)
    marker = f"{root}/{run.name}.bireal.json"
    recorded = json.loads(fs.cat_file(marker)) if fs.exists(marker) else None
    return fs, root, marker, f"{root}/{run.name}", recorded


def _refuse_changed(storage_path: str, run: StageRun, recorded: dict | None) -> None:
    what = ", ".join(changed_inputs((recorded or {}).get("inputs") or {}, run.inputs)) or "unrecorded settings"
    raise InputsChanged(
        f"{run.name}: inputs changed since its run in {storage_path} began ({what}): resuming it would return a "
        "model trained on something else; pass --restart to discard its checkpoints and start over"
    )


def check_run(storage_path: str, run: StageRun, restart: bool = False) -> None:
    """Before any work: refuse (``InputsChanged``) to relaunch the run ``run.name`` when storage holds
    it with other inputs, unless ``restart``; the message names what changed."""
    fs, _, _, run_dir, recorded = _stored_run(storage_path, run)
    same = recorded is not None and recorded.get("digest") == run.digest
    if not (restart or same) and fs.exists(run_dir):
        _refuse_changed(storage_path, run, recorded)


def claim_run(storage_path: str, run: StageRun, restart: bool = False) -> bool:
    """Record which inputs the run ``run.name`` belongs to; -> True when an earlier launch with the
    same inputs left it (Ray then resumes it). A run of other inputs under the name is refused
    (``InputsChanged``), or with ``restart`` removed first: the only path that removes one."""
    fs, root, marker, run_dir, recorded = _stored_run(storage_path, run)
    if recorded is not None and recorded.get("digest") == run.digest:
        return fs.exists(run_dir)
    if fs.exists(run_dir):
        if not restart:
            _refuse_changed(storage_path, run, recorded)
        fs.rm(run_dir, recursive=True)
    fs.makedirs(root, exist_ok=True)
    with fs.open(marker, "wb") as f:
        f.write(json.dumps({"digest": run.digest, "inputs": run.inputs}).encode())
    return False


def run_stage_on_ray(
    config: TrainConfig,
    ray_cfg: RayConfig,
    mlflow_cfg: MlflowConfig | None = None,
    mlflow_run: str = "",
    group: str = "",
    run: StageRun | None = None,
    restart: bool = False,
) -> dict:
    """Fit one stage with a TorchTrainer; returns {"checkpoint", "history", "final", "ray_path", "resumed"}.
    The stage's checkpoint ends up in the driver's ``out`` (fetched from ``artifacts`` when the
    outputs travel with the run). ``run``: the launch's identity if the caller already has it;
    ``restart``: discard a run of the same name whose inputs changed (else ``InputsChanged``)."""
    ensure_ray(ray_cfg)  # run_training has checked that the workers fit (check_workers_fit), under its lease
    run = run or stage_run(config, ray_cfg, group)
    config = located(config)
    payload = {
        "config": asdict(config),
        "threads": max(1, int(ray_cfg.cpus_per_worker)),
        "mlflow": asdict(mlflow_cfg) if mlflow_cfg else None,
        "mlflow_run": mlflow_run,
    }
    storage_path = storage.absolute(ray_cfg.storage_path)
    resumed = claim_run(storage_path, run, restart) if ray_cfg.resume == "auto" else False
    try:
        result = torch_trainer(payload, ray_cfg, run.name, storage_path).fit()
        if result.error is not None:  # Ray Train v1 returns it; v2 raises it
            raise result.error
    except SystemExit as e:
        # Ctrl-C: fit()'s own SIGINT handler aborts the run, and Ray's get() then ends the driver with
        # SystemExit(1), which printed nothing. As the interrupt it is, the CLI says what resumes.
        raise KeyboardInterrupt(f"{config.stage}: interrupted; Ray Train aborted the run") from e
    except Exception as e:
        cause = worker_error(e)
        if cause is e:
            raise
        raise cause from e
    history = []
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            history = load_train_state(Path(d))[1]["history"]
    fetch_published(config)
    return {
        "checkpoint": str(stage_checkpoint(config, config.stage)),
        "history": history,
        "final": history[-1] if history else {},
        "ray_path": result.path,
        "resumed": resumed,
    }


def worker_error(error: BaseException) -> BaseException:
    """What a rank raised (the lowest rank that failed), in place of Ray's ``WorkerGroupError``,
    whose message is every rank's traceback: a damaged shard, the clip gate or a NaN loss then
    ends ``bireal train`` and ``dvc repro`` with its own message. Any other error as it is."""
    from ray.exceptions import RayTaskError

    failures = getattr(error, "worker_failures", None) or {}
    if not failures:
        return error
    cause = failures[min(failures)]
    if isinstance(cause, RayTaskError) and isinstance(cause.cause, BaseException):
        cause = cause.cause
    return cause if isinstance(cause, BaseException) else error


def torch_trainer(payload: dict, ray_cfg: RayConfig, name: str, storage_path: str):
    """The stage's ``TorchTrainer``: ``ray.num_workers`` ranks running ``_worker_entry(payload)``,
    checkpointing under ``storage_path/name`` (the same name in the same storage resumes from its
    last checkpoint)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    filesystem, fs_path = storage.pyarrow_filesystem(storage_path)
    backend = ray_cfg.backend if ray_cfg.backend != "auto" else ("nccl" if ray_cfg.use_gpu else "gloo")
    return TorchTrainer(
        _worker_entry,
        train_loop_config=payload,
        scaling_config=ScalingConfig(
            num_workers=ray_cfg.num_workers,
            use_gpu=ray_cfg.use_gpu,
            resources_per_worker={"CPU": ray_cfg.cpus_per_worker},
            placement_strategy=ray_cfg.placement_strategy,
        ),
        torch_config=TorchConfig(backend=backend, timeout_s=int(PROCESS_GROUP_TIMEOUT_S)),
        run_config=RunConfig(
            name=name,
            storage_path=fs_path,
            storage_filesystem=filesystem,
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def fetch_published(config: TrainConfig) -> None:
    """The driver's copies of what the stage published, where its outputs travel with the run."""
    if not config.artifacts:
        return
    for checkpoint in published_names(config):
        storage.fetch(storage.join(config.artifacts, f"{checkpoint}.safetensors"), stage_checkpoint(config, checkpoint))
