"""Ray Train adapter: each stage as a ``TorchTrainer`` job around the plain ``train_loop``.

CPU workers talk gloo (this machine: 2 workers), GPU workers NCCL. Every epoch rank 0 writes the
train state and reports it as a ``ray.train.Checkpoint``; ``FailureConfig(max_failures)`` restarts
a failed worker group, and ``train_loop`` resumes from the last reported checkpoint (the
interrupted epoch is run again from its start).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

import torch

from ..env import verbose
from ..params import MlflowConfig, RayConfig, TrainConfig
from ..train import Runtime, load_train_state, stage_checkpoint, train_loop


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

        return ray.train.torch.get_device()


def _worker_entry(payload: dict) -> None:
    """Runs on every Ray Train worker."""
    from .tracking import EpochLogger

    torch.set_num_threads(max(1, int(payload["threads"])))
    config = TrainConfig(**payload["config"])
    runtime = RayRuntime()
    logger = None
    if runtime.rank == 0 and payload.get("mlflow_run"):
        logger = EpochLogger(MlflowConfig(**payload["mlflow"]), payload["mlflow_run"])
        restored = runtime.restore_dir()
        if restored is not None:  # epochs reported before a failure: log once
            logger.backfill(torch.load(restored / "train_state.pt", weights_only=True)["history"])
    train_loop(config, runtime, on_epoch=logger)


def ensure_ray(cfg: RayConfig):
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    # workers' and Train's own output (per-report dumps) reach the terminal only with `bireal --verbose`;
    # they are in the session's log files either way
    quiet = {"log_to_driver": verbose()}
    if address:
        ray.init(address=address, **quiet)
    else:
        Path(cfg.temp_dir).mkdir(parents=True, exist_ok=True)
        ray.init(
            num_cpus=max(2, os.cpu_count() or 2),
            include_dashboard=True,
            _temp_dir=cfg.temp_dir,
            configure_logging=False,
            **quiet,
        )


def run_stage_on_ray(
    config: TrainConfig, ray_cfg: RayConfig, mlflow_cfg: MlflowConfig | None = None, mlflow_run: str = ""
) -> dict:
    """Fit one stage with a TorchTrainer; returns {"checkpoint", "history", "final"}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray(ray_cfg)
    config = TrainConfig(**{**asdict(config), "shards": absolute(config.shards), "out": absolute(config.out)})
    payload = {
        "config": asdict(config),
        "threads": max(1, int(ray_cfg.cpus_per_worker)),
        "mlflow": asdict(mlflow_cfg) if mlflow_cfg else None,
        "mlflow_run": mlflow_run,
    }
    trainer = TorchTrainer(
        _worker_entry,
        train_loop_config=payload,
        scaling_config=ScalingConfig(
            num_workers=ray_cfg.num_workers,
            use_gpu=ray_cfg.use_gpu,
            resources_per_worker={"CPU": ray_cfg.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if ray_cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"{config.stage}-{uuid.uuid4().hex[:8]}",  # unique: a reused name resumes
            storage_path=absolute(ray_cfg.storage_path),
            failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    history = []
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            history = load_train_state(Path(d))[1]["history"]
    return {
        "checkpoint": str(stage_checkpoint(config, config.stage)),
        "history": history,
        "final": history[-1] if history else {},
        "ray_path": result.path,
    }


def absolute(path: str) -> str:
    if "://" in path:
        return path
    p = Path(path)
    return str(p if p.is_absolute() else (Path.cwd() / p).resolve())
