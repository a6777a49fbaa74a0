"""The pipeline's stages: one typed function each, and the one table of them.

``STAGE_TABLE`` lists every stage in run order with what it reads (deps and params sections) and
writes (outs, metrics, plots). The CLI (``bireal run STAGE``) and the Prefect flow run the stages from it;
``dvc.yaml`` spells the same graph for DVC, and tests/test_stages.py checks it against this table
through DVC's own parser, so the three cannot drift apart.

Every function takes the ``Params`` read once by the entry point and calls the adapters (Ray Train,
Ray Tune, MLflow) and plain modules below it; heavy packages are imported inside, so the table
itself loads with no torch, ray or mlflow.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from . import storage
from .params import ARTIFACT, CONFUSION, EPOCH_CURVES, METRICS, Params, TrainConfig, not_one_of
from .summary import write_epoch_curve

# ---------------------------------------------------------------------------- the stages


def shard(
    params: Params,
    source: str | None = None,
    out: str | None = None,
    kind: str = "auto",
    overwrite: bool = False,
    progress_bar: bool = True,
) -> dict:
    """Images -> WebDataset shards + manifest at ``train.shards`` (or ``out``)."""
    from .shard import shard_dataset

    return shard_dataset(
        source or params.data.source,
        out or params.train("pretrain").shards,
        params.shard,
        kind=kind,
        overwrite=overwrite,
        progress_bar=progress_bar,
    )


def train(
    stage: str,
    params: Params,
    overrides: dict[str, Any] | None = None,
    use_ray: bool = True,
    metrics_out: str | None = None,
    curve_out: str | None = None,
) -> dict:
    """One training stage (pretrain | binarize | finetune): tracked in MLflow, run on Ray Train
    (or in this process), its final metrics written as JSON and its epochs as CSV."""
    config = params.train(stage, overrides)
    result = run_training(config, params, use_ray)
    if metrics_out:
        storage.write_text(metrics_out, json.dumps({"stage": stage, **result["final"], **result["cost"]}, indent=2))
    if curve_out:
        write_epoch_curve(result["history"], curve_out)
    return result


def run_training(config: TrainConfig, params: Params, use_ray: bool = True) -> dict:
    """``config`` run as one MLflow stage run, on Ray under the run's lease; -> {"checkpoint",
    "history", "final", "cost", "mlflow_run_id"}."""
    import mlflow.tracking  # noqa: F401  (the pipeline extra: without it, fail before any work)

    from .adapters.tracking import experiment_id, resolve, wait_for_tracking
    from .train import check_full_batches

    check_full_batches(config, params.ray.num_workers if use_ray else 1)

    ray_run = None
    if use_ray:
        from .adapters.ray_train import check_run, stage_run

        ray_run = stage_run(config, params.ray, params.group)
        if params.ray.resume == "auto":  # changed inputs are refused here, before any tracking or work
            check_run(storage.absolute(params.ray.storage_path), ray_run, params.restart)
    with run_lease(params, ray_run):  # one driver per run: a second one stops here, naming the first
        if use_ray:
            from .adapters.ray_train import check_workers_fit

            check_workers_fit(config.stage, params.ray)  # a placement Ray can never fill would wait forever
        mlflow_cfg = resolve(params.mlflow)
        wait_for_tracking(mlflow_cfg, f"starting the {config.stage} stage")
        experiment_id(mlflow_cfg)  # the tracking store next: no mlflow, or no server, fails before training
        return _tracked_training(config, params, mlflow_cfg, ray_run)


def run_lease(params: Params, ray_run) -> contextlib.AbstractContextManager:
    """The driver's lease on its stage run (resume: auto names the run; a fresh name needs none)."""
    if ray_run is None or params.ray.resume != "auto":
        return contextlib.nullcontext()
    from .lease import RunLease

    return RunLease(storage.absolute(params.ray.storage_path), ray_run.name, params.ray.lease_ttl_s)


def _tracked_training(config: TrainConfig, params: Params, mlflow_cfg, ray_run) -> dict:
    """The stage as one MLflow run. An MLflow outage mid-stage costs the training no restart: the
    epochs are buffered (``EpochLogger``), the driver logs what a Ray worker could not send, and
    its writes wait up to ``mlflow.outage_wait_s`` before failing with an error naming MLflow."""
    import bireal_core as bc

    from .adapters.tracking import finish_stage_run, log_missing_epochs, log_shards_input, start_stage_run
    from .adapters.tracking import until_reachable as reachable

    use_ray = ray_run is not None
    # resume: auto -- a re-launched stage continues its MLflow run too
    resume_key = ray_run.resume_key if ray_run and params.ray.resume == "auto" else ""
    run_id = start_stage_run(
        mlflow_cfg, config.stage, {"train": asdict(config), "ray": asdict(params.ray)}, params.group, resume_key
    )
    try:
        log_shards_input(mlflow_cfg, run_id, config.shards)  # lineage: the manifest it trains on
        if use_ray:
            from .adapters.ray_train import run_stage_on_ray

            result = run_stage_on_ray(
                config, params.ray, mlflow_cfg, run_id, params.group, ray_run, restart=params.restart
            )
        else:
            from .adapters.tracking import EpochLogger, system_metrics
            from .train import train_loop

            logger = EpochLogger(mlflow_cfg, run_id)
            with system_metrics(mlflow_cfg, run_id, "node0"):
                result = train_loop(config, on_epoch=logger)
            logger.close(mlflow_cfg.sync_wait_s)  # what it could not send, the backfill below retries
        history = result["history"]
        reachable(mlflow_cfg, "logging the stage's epochs", lambda: log_missing_epochs(mlflow_cfg, run_id, history))
    except BaseException as e:
        _mark_failed(mlflow_cfg, run_id, e)
        raise
    cost = bc.summary(bc.load_checkpoint(result["checkpoint"])[0]).as_dict()
    reachable(mlflow_cfg, "finishing the stage's run", lambda: finish_stage_run(mlflow_cfg, run_id, result, cost))
    return {
        **result,
        "mlflow_run_id": run_id,
        "cost": {"cost_ops": cost["ops"], "cost_memory_mbit": cost["memory_mbit"]},
    }


def _mark_failed(mlflow_cfg, run_id: str, error: BaseException) -> None:
    """The run marked FAILED where MLflow answers; the stage's own error is raised either way."""
    import logging

    from .adapters.tracking import finish_stage_run

    try:
        finish_stage_run(mlflow_cfg, run_id, {}, status="FAILED")
    except Exception as e:  # MLflow down too: say so, and let the real error through
        logging.getLogger(__name__).warning(
            "could not mark MLflow run %s FAILED (%s: %s) after: %s", run_id, type(e).__name__, e, error
        )


def tune(params: Params, use_ray: bool = True) -> dict:
    """The search over the binarize stage's settings (``tune`` section); writes best.json (what
    binarize reads through ``tuned_config``), the table and the plot. Disabled: an empty pick.
    ``use_ray=False``: the grid as local processes (``pipeline.tune.run_local``), no tracking."""
    from .tune import local_trials, pick_split, require_finished, run_local, write_best, write_outputs

    settings = params.tune
    if not settings.enabled:
        return {"enabled": False, "files": {"best": str(write_best(settings.out, None, note="tune.enabled is false"))}}
    base = params.train("binarize", {"tuned_config": ""})
    if use_ray:
        from .adapters.ray_tune import run_tune
        from .adapters.tracking import resolve

        pretrain_other_twins(params, base)
        summary = run_tune(settings, base, resolve(params.mlflow), params.group, params.ray)
    else:
        local_trials(settings, base.arch)  # a search it cannot run fails before any twin trains
        pretrain_other_twins(params, base)
        summary = run_local(settings, base, on_trial=print_trial)
    require_finished(summary, settings, base.arch)
    summary["picked_on"] = pick_split(base)
    return {**summary, "enabled": True, "files": write_outputs(summary, settings.out)}


def print_trial(row: dict, done: int, total: int) -> None:
    from .tune import format_trial

    print(f"tune: {format_trial(row, done, total)}", flush=True)


def other_twins(params: Params, base: TrainConfig) -> list[tuple[TrainConfig, set[str]]]:
    """The twins the tune stage pretrains itself, with the pretrain stage's settings (the same
    epochs as the main twin): one per other arch (the no-shortcut net), and with
    ``tune.twin_per_seed`` one per arch and seed (pretrained with that seed). Each with the inits
    its cells read."""
    from .tune import twin_folder, twins_needed

    out = []
    for (arch, seed), inits in twins_needed(params.tune, base.arch).items():
        overrides = {
            "arch": arch,
            "out": twin_folder(base.out, arch, base.arch, seed),
            "artifacts": twin_folder(base.artifacts, arch, base.arch, seed) if base.artifacts else "",
            "relu_control": "relu_control" in inits,
            **({"seed": seed} if seed is not None else {}),
        }
        out.append((params.train("pretrain", overrides), inits))
    return out


def twin_source(config: TrainConfig) -> str:
    """Where a twin's checkpoints are: where it publishes them, else its local out."""
    return config.artifacts or config.out


def twin_missing(config: TrainConfig, inits: set[str]) -> bool:
    """Whether any of these inits' checkpoints is absent where the twin publishes."""
    from . import storage

    return not all(storage.exists(storage.join(twin_source(config), f"pretrain-{i}.safetensors")) for i in inits)


def pretrain_other_twins(params: Params, base: TrainConfig) -> list[str]:
    """Pretrain each other arch's twin (``other_twins``) unless its checkpoints exist."""
    from .train import train_loop

    done = []
    for config, inits in other_twins(params, base):
        if twin_missing(config, inits):
            print(
                f"tune: pretraining the {config.arch} twin (seed {config.seed}) for its cells "
                f"({', '.join(sorted(inits))}) in "
                f"{twin_source(config)}",
                flush=True,
            )
            train_loop(config)
        done.append(twin_source(config))
    return done


def export(
    params: Params, checkpoint: str | None = None, out: str = ARTIFACT, class_names: list[str] | None = None
) -> dict:
    """The finetuned checkpoint -> the packed 1-bit artifact."""
    from cuda_ext.packed import artifact_size, export_checkpoint

    checkpoint = checkpoint or finetuned_checkpoint(params)
    path = export_checkpoint(checkpoint, out, class_names=class_names)
    return {"artifact": str(path), "size": artifact_size(path)}


def evaluate(
    params: Params,
    artifact: str = ARTIFACT,
    shards: str | None = None,
    checkpoint: str | None = None,
    metrics_out: str | None = f"{METRICS}/evaluate.json",
    confusion_out: str | None = CONFUSION,
    device: str = "cpu",
) -> dict:
    """The packed artifact on the evaluation split, with its agreement to the training graph."""
    from cuda_ext.memory import keep_freed_memory

    from .evaluate import evaluate_artifact, write_outputs

    keep_freed_memory()  # what `bireal evaluate` does (cuda_ext/memory.py)
    result = evaluate_artifact(
        artifact,
        shards or params.train("finetune").shards,
        checkpoint if checkpoint is not None else finetuned_checkpoint(params),
        device=device,
    )
    if metrics_out:
        write_outputs(result, metrics_out, confusion_out)
    return result


def read_evaluation(path: str) -> dict:
    """The metrics JSON that ``bireal evaluate --metrics`` wrote (a ``top1`` among them)."""
    try:
        evaluation = json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no evaluation metrics (bireal evaluate --metrics FILE writes them)") from e
    except ValueError as e:
        raise ValueError(f"{path}: not the JSON of bireal evaluate ({e})") from e
    if not isinstance(evaluation, dict):
        raise ValueError(f"{path}: not the JSON of bireal evaluate (a mapping with top1)")
    return evaluation


def register(
    params: Params,
    artifact: str = ARTIFACT,
    evaluation: dict | None = None,
    shards: str | None = None,
    model_name: str | None = None,
    out: str | None = f"{METRICS}/registry.json",
) -> dict:
    """The evaluated artifact into the MLflow registry (``registry`` section), with a real image of
    the evaluation split as the signature's example and the cost table of its source checkpoint."""
    from cuda_ext.packed import read_artifact_header

    from .adapters.registry import check_evaluated, checked_top1, register_artifact, write_registry_summary
    from .adapters.tracking import resolve, wait_for_tracking
    from .data import eval_split_name, iter_shard, read_manifest, split_shards

    evaluation = evaluation or read_evaluation(f"{METRICS}/evaluate.json")
    shards = shards or params.train("finetune").shards
    # --name changes where it goes, not the gate (registry.min_top1)
    registry = replace(params.registry, model_name=model_name) if model_name else params.registry
    checked_top1(evaluation, registry.min_top1)  # before any work; register_artifact checks it again
    header = read_artifact_header(artifact)  # register_artifact verifies the tensors
    check_evaluated(evaluation, artifact, header)  # before any work; and again there
    manifest = read_manifest(shards)
    url = split_shards(manifest, shards, eval_split_name(manifest, shards))[0][0]
    example = Path(artifact).with_name("example.jpg")
    example.write_bytes(next(iter_shard(url))["jpg"])
    cost = None
    if header.get("source", {}).get("checkpoint"):
        import bireal_core as bc

        cost = bc.summary(bc.load_checkpoint(header["source"]["checkpoint"])[0]).as_dict()
    mlflow_cfg = resolve(params.mlflow)
    wait_for_tracking(mlflow_cfg, "registering the artifact")
    result = register_artifact(artifact, evaluation, str(example), mlflow_cfg, registry, params.group, cost)
    if out:
        write_registry_summary(result, out)
    return result


def finetuned_checkpoint(params: Params) -> str:
    from .segments import stage_checkpoint

    return str(stage_checkpoint(params.train("finetune"), "finetune"))


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class StageSpec:
    """One stage: its function and its DVC contract. Paths may name params as ``${section.key}``
    (DVC's templating; ``resolve_path`` fills them in the same way)."""

    name: str
    run: Callable[..., dict]  # run(params, use_ray=...) -> a JSON-able summary
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...] = ()
    metrics: tuple[str, ...] = ()  # JSON that dvc metrics show reads
    plots: tuple[str, ...] = ()  # CSV that dvc plots show draws by itself (the epoch curves: top-level plots)
    uses_ray: bool = False


def _train_runner(stage: str):
    def run(params: Params, use_ray: bool = True) -> dict:
        return train(
            stage,
            params,
            use_ray=use_ray,
            metrics_out=f"{METRICS}/{stage}.json",
            curve_out=f"{EPOCH_CURVES}/{stage}.csv",
        )

    return run


TRAIN_CODE = (
    "bireal_core",
    "pipeline/train.py",
    "pipeline/data.py",
    "pipeline/params.py",
    "pipeline/adapters/ray_train.py",
)
CKPT = "${train.out}"
PRETRAINED = (f"{CKPT}/pretrain-clip.safetensors", f"{CKPT}/pretrain-relu.safetensors")  # what binarize inits from


def training_stage(stage: str, inputs: tuple[str, ...], outs: tuple[str, ...]) -> StageSpec:
    """A Ray Train stage: the shards and its ``inputs`` in, checkpoints ``outs`` (names in
    ``train.out``), ``metrics/<stage>.json`` and its epochs ``plots/epochs/<stage>.csv`` out.
    (pretrain's outs: the phases later stages read; leaky_clip is only a step between.)"""
    return StageSpec(
        stage,
        _train_runner(stage),
        deps=("${train.shards}", *inputs, *TRAIN_CODE),
        params=("train", stage, "ray.num_workers"),
        outs=(*(f"{CKPT}/{name}.safetensors" for name in outs), f"{EPOCH_CURVES}/{stage}.csv"),
        metrics=(f"{METRICS}/{stage}.json",),
        uses_ray=True,
    )


STAGE_TABLE: tuple[StageSpec, ...] = (
    StageSpec(
        "shard",
        lambda p, use_ray=True: shard(p, progress_bar=False),
        deps=("pipeline/shard.py", "pipeline/sources.py", "bireal_core/preprocess.py"),  # its image conversion
        params=("data.source", "shard"),
        outs=("${train.shards}",),
    ),
    training_stage("pretrain", (), outs=("pretrain-relu", "pretrain-clip", "pretrain")),
    StageSpec(
        "tune",
        lambda p, use_ray=True: tune(p),
        deps=(
            "${train.shards}",
            *PRETRAINED,
            "pipeline/tune.py",
            "pipeline/adapters/ray_tune.py",
            *TRAIN_CODE,
        ),
        params=("tune", "train", "binarize"),
        outs=("${tune.out}/best.json", "${tune.out}/table.json"),
        plots=("${tune.out}/table.csv",),
        uses_ray=True,
    ),
    training_stage("binarize", ("${tune.out}/best.json", *PRETRAINED), outs=("binarize",)),
    training_stage("finetune", (f"{CKPT}/binarize.safetensors",), outs=("finetune",)),
    StageSpec(
        "export",
        lambda p, use_ray=True: export(p),
        deps=(f"{CKPT}/finetune.safetensors", "cuda_ext"),
        params=(),
        outs=(ARTIFACT,),
    ),
    StageSpec(
        "evaluate",
        lambda p, use_ray=True: evaluate(p),
        deps=(
            ARTIFACT,
            f"{CKPT}/finetune.safetensors",
            "${train.shards}",
            "pipeline/evaluate.py",
            "pipeline/data.py",
            "cuda_ext",
        ),
        params=(),
        metrics=(f"{METRICS}/evaluate.json",),
        plots=(CONFUSION,),
    ),
    StageSpec(
        "register",
        lambda p, use_ray=True: register(p),
        deps=(ARTIFACT, f"{METRICS}/evaluate.json", "pipeline/adapters"),
        params=("registry",),
        metrics=(f"{METRICS}/registry.json",),
    ),
)
STAGES_BY_NAME = {s.name: s for s in STAGE_TABLE}


def resolve_path(path: str, params: Params) -> str:
    """``${section.key}`` in a table path -> the value of that key in the params file (as DVC
    resolves it: the file's own value, no defaults)."""
    import re

    def value(match: re.Match) -> str:
        section, key = match.group(1).split(".", 1)
        try:
            return str(params.raw[section][key])
        except KeyError:
            raise KeyError(
                f"{params.path.name}: {section}.{key} is needed by the stage table (dvc.yaml templates it)"
            ) from None

    return re.sub(r"\$\{([\w.]+)\}", value, path)


def check_stage_order(names: list[str]) -> None:
    """Stages given to one command run in the order given, and each reads what the stages before it
    in the table write: a ValueError for a stage given twice or before one it follows."""
    order = list(STAGES_BY_NAME)
    unknown = [n for n in names if n not in STAGES_BY_NAME]
    if unknown:
        raise ValueError(f"stage {not_one_of(unknown[0], order)}")
    twice = sorted({n for n in names if names.count(n) > 1}, key=order.index)
    if twice:
        raise ValueError(f"stage {twice[0]} given twice: each runs once")
    in_order = sorted(names, key=order.index)
    if names != in_order:
        late = next(b for a, b in zip(names, in_order) if a != b)
        raise ValueError(
            f"{' '.join(names)}: {late} must run before {names[names.index(late) - 1]} (the stages after it read "
            f"what it writes): give them as {' '.join(in_order)}"
        )


def run_stage(name: str, params: Params, use_ray: bool = True) -> dict:
    """``bireal run NAME``: one stage of the table with its default inputs and outputs."""
    if name not in STAGES_BY_NAME:
        raise KeyError(f"stage {not_one_of(name, STAGES_BY_NAME)}")
    return STAGES_BY_NAME[name].run(params, use_ray=use_ray)


def format_history(history: list[dict]) -> str:
    lines = [
        f"{'epoch':>5} {'segment':<28}{'train_loss':>11}{'train_top1':>11}{'val_top1':>9}"
        f"{'val_top5':>9}{'flip':>8}{'img/s':>8}{'data wait':>10}"
    ]
    for h in history:
        wait = h.get("data_wait_fraction", float("nan"))  # absent in histories written before it was measured
        lines.append(
            f"{h['epoch']:>5} {h['segment']:<28}{h['train_loss']:>11.4f}{h['train_top1']:>11.3f}"
            f"{h['val_top1']:>9.3f}{h['val_top5']:>9.3f}{h['flip_ratio']:>8.4f}{h['img_s']:>8.0f}{wait:>10.1%}"
        )
    return "\n".join(lines)
