"""Ray Tune adapter: the tune stage's search over the binarize stage's settings.

Trials are *function trainables* that call the same ``train_loop`` as the binarize stage in the
trial's process (one worker, no DDP). Why not Ray Train inside Tune: a trial of this search is
small (one GPU on a cluster, one CPU here), so DDP inside a trial buys nothing, while Tune-over-Train
needs a second layer of placement groups that on 2 cores leaks or deadlocks; the function
trainable keeps one code path and exact resource accounting (``with_resources``). Every trial is
an MLflow child run of one tuning run (``adapters/tracking.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from .. import storage as storage_mod
from ..env import framework_output_quiet
from ..params import MlflowConfig, RayConfig, TrainConfig, TuneSettings
from ..train import Runtime, train_loop
from ..tune import CELL_KEYS, expected_trials, summarize, trial_base, trial_config, trial_specs
from .ray_train import check_fits, ensure_ray


class TuneRuntime(Runtime):
    """Reports each epoch (and its train state as a checkpoint) to Tune; restores from Tune."""

    def __init__(self):
        self._tmp = tempfile.mkdtemp(prefix="bireal-trial-")

    def report(self, metrics: dict, checkpoint_dir: Path) -> None:
        from ray import tune

        tune.report(
            {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
            checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)),
        )

    def restore_dir(self) -> Path | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        return None if checkpoint is None else Path(checkpoint.to_directory(f"{self._tmp}/restore"))


def param_space(s: TuneSettings, arch: str) -> dict:
    """One grid (or choice) dimension over the search's trials (``trial_specs``: cell, seed and
    epochs), one value or distribution for the lr."""
    from ray import tune

    pick = tune.grid_search if s.search == "grid" else tune.choice
    space = {"trial": pick(trial_specs(s, arch))}
    space["lr"] = s.lr_min if s.lr_min == s.lr_max else tune.loguniform(s.lr_min, s.lr_max)
    return space


def _trial(trial: dict, base: dict, tracking: dict | None) -> None:
    """One trial: the binarize stage's loop with this trial's settings, logged as an MLflow child."""
    from ray import tune

    torch.set_num_threads(max(1, int(base.pop("_threads", 1))))
    context = tune.get_context()
    trial_dir = Path(base["out"]) / "trials" / context.get_trial_id()
    config = trial_config(base, {**trial["trial"], "lr": trial["lr"]}, str(trial_dir))
    logger = None
    if tracking:
        from .tracking import trial_logger

        spec = trial["trial"]
        overrides = {**spec["cell"], "lr": trial["lr"], "seed": spec["seed"], "epochs": spec["epochs"]}
        logger = trial_logger(tracking, context.get_trial_id(), context.get_trial_name(), overrides)
    history = train_loop(config, TuneRuntime(), on_epoch=logger)["history"]
    if logger is not None:  # trials that ASHA stops never get here: the driver closes them
        from .tracking import log_missing_epochs, until_reachable

        logger.close(logger.cfg.sync_wait_s)  # then what it could not send, once MLflow answers
        until_reachable(
            logger.cfg, "closing the trial's run", lambda: log_missing_epochs(logger.cfg, logger.run_id, history)
        )
        until_reachable(logger.cfg, "closing the trial's run", lambda: logger.client.set_terminated(logger.run_id))


def experiment_name(settings: TuneSettings, base: TrainConfig) -> str:
    """Stable per (settings, base config): re-running after an interruption finds the same run."""
    digest = hashlib.sha256(json.dumps([asdict(settings), asdict(base)], sort_keys=True).encode())
    return f"tune-{digest.hexdigest()[:10]}"


def _trial_rows(results) -> list[dict]:
    rows = []
    for r in results:
        cfg = r.config or {}
        spec = cfg.get("trial") or {}
        m = r.metrics or {}
        rows.append(
            {
                **{k: (spec.get("cell") or {}).get(k) for k in CELL_KEYS},
                "lr": cfg.get("lr"),
                **{k: spec.get(k) for k in ("seed", "budget")},
                "val_top1": m.get("val_top1"),
                # the trial's own epoch count: Tune's training_iteration restarts in a restored trial
                "epochs": int(m["epoch"]) + 1 if "epoch" in m else m.get("training_iteration", 0),
                "status": "ERROR" if r.error else ("TERMINATED" if m.get("training_iteration") else "PENDING"),
                "trial_id": m.get("trial_id", ""),
            }
        )
    return rows


def _tuner(settings: TuneSettings, trainable, name: str, storage: str, arch: str):
    """A new search, or the interrupted one of the same settings (``Tuner.restore``: finished
    trials are kept, unfinished ones continue from their checkpoint)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    filesystem, fs_storage = storage_mod.pyarrow_filesystem(storage)
    path = f"{fs_storage}/{name}"
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        return tune.Tuner.restore(
            path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    longest = max(1, settings.epochs, settings.scratch_epochs)  # scratch may train the twin's epochs too
    scheduler = (
        ASHAScheduler(time_attr="training_iteration", max_t=longest, grace_period=settings.grace_period)
        if settings.asha
        else None
    )
    return tune.Tuner(
        trainable,
        param_space=param_space(settings, arch),
        tune_config=tune.TuneConfig(
            metric="val_top1",
            mode="max",
            scheduler=scheduler,
            num_samples=settings.num_samples,
            max_concurrent_trials=settings.max_concurrent,
        ),
        run_config=tune.RunConfig(name=name, storage_path=fs_storage, storage_filesystem=filesystem, verbose=0),
    )


class _StopSignalSeen(logging.Handler):
    """Whether Tune's own SIGINT/SIGUSR1 handler ran: on Ctrl-C it ends the search, fit() returns
    normally and the stopped trials are TERMINATED like finished ones. What tells the two apart is
    the warning that handler logs (``ray.tune.tune``, "Stop signal received")."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = False

    def emit(self, record: logging.LogRecord) -> None:
        if record.funcName == "signal_interrupt_tune_run" or "Stop signal received" in record.getMessage():
            self.seen = True


@contextlib.contextmanager
def tune_stop_signal():
    logger, watcher = logging.getLogger("ray.tune.tune"), _StopSignalSeen()
    logger.addHandler(watcher)
    try:
        yield watcher
    finally:
        logger.removeHandler(watcher)


def run_tune(
    settings: TuneSettings,
    base: TrainConfig,
    mlflow_cfg: MlflowConfig | None = None,
    group: str = "",
    ray_cfg: RayConfig | None = None,
) -> dict:
    """Run (or resume) the search; -> {"best", "table", "rankings", "trials", "path", "finished"}."""
    from ray import tune

    from .tracking import close_tune_runs, tune_parent_run, wait_for_tracking

    ensure_ray(ray_cfg or RayConfig())
    check_fits(  # one trial must fit, or none ever starts
        {"CPU": settings.cpus_per_trial, "GPU": settings.gpus_per_trial},
        f"a tune trial of tune.cpus_per_trial={settings.cpus_per_trial:g} and tune.gpus_per_trial="
        f"{settings.gpus_per_trial:g}",
        "lower them, or join a cluster that has them (ray.address)",
    )
    storage = storage_mod.absolute(settings.storage_path)
    name = experiment_name(settings, base)
    base_dict = {**trial_base(settings, base), "_threads": max(1, int(settings.cpus_per_trial))}
    if mlflow_cfg:
        wait_for_tracking(mlflow_cfg, "starting the search")
    tracking = tune_parent_run(mlflow_cfg, group, name, settings) if mlflow_cfg else None
    trainable = tune.with_parameters(_trial, base=base_dict, tracking=tracking)
    trainable = tune.with_resources(trainable, {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})
    with framework_output_quiet(), tune_stop_signal() as stop:  # Tune's experiment box; the table is ours
        results = _tuner(settings, trainable, name, storage, base.arch).fit()
    if stop.seen:  # the trials are TERMINATED as finished ones are: not a search to pick from
        raise KeyboardInterrupt("tune: interrupted; Tune saved the search's state")
    trials = _trial_rows(results)
    expected = expected_trials(settings, base.arch)
    finished = len(trials) == results.num_terminated == expected and results.num_errors == 0
    summary = summarize(trials, settings, base.arch)
    summary.update({"path": f"{storage}/{name}", "finished": finished})
    if tracking:
        close_tune_runs(mlflow_cfg, tracking, summary)
    return summary
