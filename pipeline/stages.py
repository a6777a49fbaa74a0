"""The training stages as plain functions with their configuration resolved; what the CLI (and
DVC and Prefect through it) call. Configuration: TrainConfig defaults <- params.yaml ``train`` <-
params.yaml ``<stage>`` <- ``--set key=value`` overrides."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError, build, default_params_path, load_section, read_params
from .train import STAGES, TrainConfig


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["epochs=2", "phases=[relu,clip]"]`` -> {"epochs": 2, "phases": ["relu", "clip"]} (YAML values)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def resolve_train_config(stage: str, params_path: str | None = None,
                         overrides: dict[str, Any] | None = None) -> TrainConfig:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r} (one of {', '.join(STAGES)})")
    path = Path(params_path) if params_path else default_params_path()
    params = read_params(path)
    build(TrainConfig, dict(params.get("train") or {}), f"{path.name}:train")   # errors name train.KEY
    values = {**(params.get("train") or {}), **(params.get(stage) or {}), **(overrides or {}), "stage": stage}
    tuned = values.get("tuned_config")
    if tuned and Path(tuned).is_file():          # the tune stage's pick overrides its own keys
        best = json.loads(Path(tuned).read_text())["config"] or {}   # null: tuning was disabled
        values.update({k: v for k, v in best.items() if k not in (overrides or {})})
    return build(TrainConfig, values, f"{path.name}:{stage}")


def run_train_stage(stage: str, params_path: str | None = None, overrides: dict[str, Any] | None = None,
                    use_ray: bool = True, metrics_out: str | None = None) -> dict:
    """Resolve, track in MLflow, run (Ray Train or in-process), write the metrics JSON."""
    import bireal_core as bc

    from .ray_train import RayConfig
    from .tracking import MlflowConfig, finish_stage_run, pipeline_run_id, resolve, start_stage_run

    config = resolve_train_config(stage, params_path, overrides)
    ray_cfg = load_section(RayConfig, "ray", params_path)
    mlflow_cfg = resolve(load_section(MlflowConfig, "mlflow", params_path))
    run_id = start_stage_run(mlflow_cfg, stage, {"train": asdict(config), "ray": asdict(ray_cfg)},
                             pipeline_run_id(params_path))
    try:
        if use_ray:
            from .ray_train import run_stage_on_ray

            result = run_stage_on_ray(config, ray_cfg, mlflow_cfg, run_id)
        else:
            from .tracking import EpochLogger
            from .train import train_loop

            result = train_loop(config, on_epoch=EpochLogger(mlflow_cfg, run_id))
    except BaseException:
        finish_stage_run(mlflow_cfg, run_id, {}, status="FAILED")
        raise
    model, _ = bc.load_checkpoint(result["checkpoint"])
    cost = bc.summary(model).as_dict()
    finish_stage_run(mlflow_cfg, run_id, result, cost)
    result["mlflow_run_id"] = run_id
    if metrics_out:
        Path(metrics_out).parent.mkdir(parents=True, exist_ok=True)
        Path(metrics_out).write_text(json.dumps({"stage": stage, **result["final"],
                                                 "cost_ops": cost["ops"], "cost_memory_mbit": cost["memory_mbit"]},
                                                indent=2))
    return result


def format_history(history: list[dict]) -> str:
    lines = [f"{'epoch':>5} {'segment':<28}{'train_loss':>11}{'train_top1':>11}{'val_top1':>9}"
             f"{'val_top5':>9}{'flip':>8}{'img/s':>8}"]
    for h in history:
        lines.append(f"{h['epoch']:>5} {h['segment']:<28}{h['train_loss']:>11.4f}{h['train_top1']:>11.3f}"
                     f"{h['val_top1']:>9.3f}{h['val_top5']:>9.3f}{h['flip_ratio']:>8.4f}{h['img_s']:>8.0f}")
    return "\n".join(lines)
