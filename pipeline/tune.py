"""``bireal tune``: Ray Tune over the sign approximation, the weight gradient, the initialization,
two-step, the learning rate and the optimizer recipe -- the paper's ablation, run by the pipeline.

Trials are *function trainables* that call the same ``train_loop`` as the binarize stage in the
trial's process (one worker, no DDP). Why not Ray Train inside Tune: a trial of this search is
small (one GPU on a cluster, one CPU here), so DDP inside a trial buys nothing, while Tune-over-Train
needs a second layer of placement groups that on 2 cores leaks or deadlocks (docs/stack notes);
the function trainable keeps one code path and exact resource accounting (``with_resources``).

Every trial is an MLflow child run of one tuning run. The stage writes the best configuration
(JSON, read by the final binarize stage through ``tuned_config``), the per-cell table (mean and
spread over seeds, ranked) with the paper's ablation rankings checked, and a bar plot.
"""
from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .train import Runtime, TrainConfig, train_loop

CELL_KEYS = ("activation", "weight_gradient", "init", "two_step", "optimizer")


@dataclass
class TuneSettings:
    """The ``tune`` section of params.yaml."""

    enabled: bool = True                 # false: the stage writes an empty pick, binarize keeps its own
    activations: list[str] = field(default_factory=lambda: ["approx_sign", "ste_sign"])
    weight_gradients: list[str] = field(default_factory=lambda: ["paper"])
    inits: list[str] = field(default_factory=lambda: ["scratch", "clip"])
    two_step: list[bool] = field(default_factory=lambda: [False])
    optimizers: list[str] = field(default_factory=lambda: ["adam"])
    lr_min: float = 0.002                # log-uniform in [lr_min, lr_max]; equal bounds fix it
    lr_max: float = 0.002
    seeds: list[int] = field(default_factory=lambda: [0])
    search: str = "grid"                 # grid: every cell x seed; random: num_samples draws
    num_samples: int = 1
    epochs: int = 1                      # per trial (binarize epochs)
    max_steps_per_epoch: int = 0         # 0: whole epochs; >0 caps the images per epoch
    asha: bool = True                    # early stopping (ASHA on val_top1); off for ablations
    grace_period: int = 1
    max_concurrent: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0          # 1 on a GPU cluster
    storage_path: str = "ray_results"
    out: str = "tune"                    # best config, table, plot

    def __post_init__(self):
        if self.search not in ("grid", "random"):
            raise ValueError(f"search={self.search!r}, expected grid or random")
        if not 0 < self.lr_min <= self.lr_max:
            raise ValueError("need 0 < lr_min <= lr_max")
        if True in self.two_step and self.epochs < 2:
            raise ValueError(f"two_step includes true but epochs={self.epochs}: a two-step trial spends "
                             "1 of its epochs on step 1 (equal compute), so it needs epochs >= 2")


class TuneRuntime(Runtime):
    """Reports each epoch (and its train state as a checkpoint) to Tune; restores from Tune."""

    def __init__(self):
        super().__init__()
        import tempfile

        self._tmp = tempfile.mkdtemp(prefix="bireal-trial-")

    def report(self, metrics: dict, checkpoint_dir: Path) -> None:
        from ray import tune

        tune.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
                    checkpoint=tune.Checkpoint.from_directory(str(checkpoint_dir)))

    def restore_dir(self) -> Path | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        return None if checkpoint is None else Path(checkpoint.to_directory(f"{self._tmp}/restore"))


def param_space(s: TuneSettings) -> dict:
    from ray import tune

    pick = tune.grid_search if s.search == "grid" else tune.choice
    space = {"activation": pick(s.activations), "weight_gradient": pick(s.weight_gradients),
             "init": pick(s.inits), "two_step": pick(s.two_step), "optimizer": pick(s.optimizers),
             "seed": pick(s.seeds)}
    space["lr"] = s.lr_min if s.lr_min == s.lr_max else tune.loguniform(s.lr_min, s.lr_max)
    return space


def _trial(trial: dict, base: dict, tracking: dict | None) -> None:
    """One trial: the binarize stage's loop with this trial's settings, logged as an MLflow child."""
    from ray import tune

    torch.set_num_threads(max(1, int(base.pop("_threads", 1))))
    trial_dir = Path(base["out"]) / "trials" / tune.get_context().get_trial_id()
    overrides = {k: trial[k] for k in (*CELL_KEYS, "lr", "seed")}
    config = TrainConfig(**{**base, **overrides, "stage": "binarize", "out": str(trial_dir),
                            "init_from": base["out"], "step1_epochs": 1})
    logger = None
    if tracking:
        from .tracking import EpochLogger, MlflowConfig, client

        cfg = MlflowConfig(**tracking["mlflow"])
        c = client(cfg)
        existing = c.search_runs([tracking["experiment_id"]],
                                 f"tags.`bireal.trial_id` = '{tune.get_context().get_trial_id()}'")
        run_id = existing[0].info.run_id if existing else c.create_run(
            tracking["experiment_id"], run_name=tune.get_context().get_trial_name(),
            tags={"mlflow.parentRunId": tracking["parent_run"], "bireal.trial_id": tune.get_context().get_trial_id(),
                  "bireal.stage": "tune-trial"}).info.run_id
        if existing:                     # a trial restarted by a resumed search: same run, live again
            c.update_run(run_id, status="RUNNING")
        else:
            for k, v in overrides.items():
                c.log_param(run_id, k, v)
        logger = EpochLogger(cfg, run_id)
    train_loop(config, TuneRuntime(), on_epoch=logger)
    if logger is not None:               # trials that ASHA stops never get here: the driver closes them
        logger.client.set_terminated(logger.run_id, "FINISHED")


def experiment_name(settings: TuneSettings, base: TrainConfig) -> str:
    """Stable per (settings, base config): re-running after an interruption finds the same run."""
    digest = hashlib.sha256(json.dumps([asdict(settings), asdict(base)], sort_keys=True).encode())
    return f"tune-{digest.hexdigest()[:10]}"


def run_tune(settings: TuneSettings, base: TrainConfig, mlflow_cfg=None, group: str = "") -> dict:
    """Run the search, or resume it when an interrupted run of the same settings exists
    (``Tuner.restore``: finished trials are kept, unfinished ones continue from their checkpoint);
    -> {"best", "table", "rankings", "trials", "path", "finished"}."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from .ray_train import RayConfig, _absolute, ensure_ray

    ensure_ray(RayConfig())
    storage = _absolute(settings.storage_path)
    name = experiment_name(settings, base)
    path = f"{storage}/{name}"
    base_dict = {**asdict(base), "epochs": settings.epochs, "max_steps_per_epoch": settings.max_steps_per_epoch,
                 "out": _absolute(base.out), "shards": _absolute(base.shards),
                 "_threads": max(1, int(settings.cpus_per_trial))}
    tracking = _tracking(mlflow_cfg, group, name, settings) if mlflow_cfg else None
    trainable = tune.with_parameters(_trial, base=base_dict, tracking=tracking)
    trainable = tune.with_resources(trainable, {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})
    if tune.Tuner.can_restore(path):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(1, settings.epochs),
                                  grace_period=settings.grace_period) if settings.asha else None
        tuner = tune.Tuner(
            trainable, param_space=param_space(settings),
            tune_config=tune.TuneConfig(metric="val_top1", mode="max", scheduler=scheduler,
                                        num_samples=settings.num_samples,
                                        max_concurrent_trials=settings.max_concurrent),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0))
    results = tuner.fit()
    trials = _trial_rows(results)
    finished = len(trials) == _expected(settings) and all(t["status"] == "TERMINATED" for t in trials)
    summary = summarize(trials, settings)
    summary.update({"path": path, "finished": finished})
    if tracking:
        _close_children(mlflow_cfg, tracking, summary)
    return summary


def _expected(s: TuneSettings) -> int:
    if s.search == "random":
        return s.num_samples
    cells = (len(s.activations) * len(s.weight_gradients) * len(s.inits) * len(s.two_step)
             * len(s.optimizers) * len(s.seeds))
    return cells * s.num_samples


def _trial_rows(results) -> list[dict]:
    rows = []
    for r in results:
        cfg = r.config or {}
        m = r.metrics or {}
        rows.append({**{k: cfg.get(k) for k in (*CELL_KEYS, "lr", "seed")},
                     "val_top1": m.get("val_top1"), "epochs": m.get("training_iteration", 0),
                     "status": "ERROR" if r.error else ("TERMINATED" if m.get("training_iteration") else "PENDING"),
                     "trial_id": m.get("trial_id", "")})
    return rows


def summarize(trials: list[dict], settings: TuneSettings) -> dict:
    """Per cell (estimator x gradient x init x two-step x recipe): mean and spread over seeds."""
    cells: dict[tuple, list[float]] = {}
    for t in trials:
        if t["val_top1"] is not None:
            cells.setdefault(tuple(t[k] for k in CELL_KEYS), []).append(float(t["val_top1"]))
    table = []
    for key, values in cells.items():
        table.append({**dict(zip(CELL_KEYS, key)), "seeds": len(values), "mean": statistics.fmean(values),
                      "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                      "min": min(values), "max": max(values)})
    table.sort(key=lambda r: -r["mean"])
    best_trial = max((t for t in trials if t["val_top1"] is not None), key=lambda t: t["val_top1"], default=None)
    best = None
    pick = pick_cell(table)
    if pick is not None:
        cell = {k: pick[k] for k in CELL_KEYS}
        # the picked cell's best trial supplies the lr (a median of the cell's lrs may be an lr no
        # trial ran with, or the worst trial's)
        in_cell = [t for t in trials if t["val_top1"] is not None and all(t[k] == cell[k] for k in CELL_KEYS)]
        best = {**cell, "lr": max(in_cell, key=lambda t: t["val_top1"])["lr"]}
    return {"best": best, "best_trial": best_trial, "table": table, "rankings": paper_rankings(table),
            "trials": trials}


PAPER_CELL = {"activation": "approx_sign", "weight_gradient": "paper", "init": "clip", "two_step": False}


def pick_cell(table: list[dict]) -> dict | None:
    """The cell best.json names: the paper's own (ApproxSign, magnitude-aware, clip init; the best of
    its recipes) unless another cell beats it by more than the seed spread of both. With fewer than
    two seeds in either there is no spread to judge a win by, so the paper's cell stays. Without the
    paper's cell in the search, the top cell."""
    if not table:
        return None
    paper = [r for r in table if all(r[k] == v for k, v in PAPER_CELL.items())]
    if not paper:
        return table[0]
    top, ours = table[0], paper[0]                       # the table is sorted by mean
    spread = max(top["std"], ours["std"])
    significant = min(top["seeds"], ours["seeds"]) >= 2 and top["mean"] - ours["mean"] > spread
    return top if significant else ours


def _mean_where(table: list[dict], **match) -> float | None:
    values = [r["mean"] for r in table if all(r[k] == v for k, v in match.items())]
    return statistics.fmean(values) if values else None


# The weight-gradient axis cannot rank in these nets (docs/science.md, tests/test_binarizers.py).
WEIGHT_GRADIENT_NOTE = ("not testable here: BN after every binary conv makes the forward invariant to alpha, "
                        "so paper = plain up to BN's eps, and official = plain / alpha (Adam cancels it)")


def paper_rankings(table: list[dict]) -> list[dict]:
    """The paper's ablation claims, checked on this search's cells (averaged over the others)."""
    claims = [("clip-init > ReLU-init", {"init": "clip"}, {"init": "relu"}),
              ("clip-init > scratch", {"init": "clip"}, {"init": "scratch"}),
              ("ApproxSign > STE", {"activation": "approx_sign"}, {"activation": "ste_sign"}),
              ("magnitude-aware (paper) > plain", {"weight_gradient": "paper"}, {"weight_gradient": "plain"})]
    out = []
    for label, a, b in claims:
        ma, mb = _mean_where(table, **a), _mean_where(table, **b)
        if ma is not None and mb is not None:
            out.append({"claim": label, "left": ma, "right": mb, "holds": ma > mb})
            if "weight_gradient" in a:  # BatchNorm follows every binary conv: the rules coincide
                out[-1].update(holds=None, note=WEIGHT_GRADIENT_NOTE)
    full = _mean_where(table, init="clip", activation="approx_sign", weight_gradient="paper")
    pairs = [r["mean"] for r in table if sum([r["init"] == "clip", r["activation"] == "approx_sign",
                                              r["weight_gradient"] == "paper"]) == 2]
    if full is not None and pairs:
        out.append({"claim": "all three > any two", "left": full, "right": max(pairs), "holds": full > max(pairs)})
    return out


def format_table(summary: dict) -> str:
    lines = [f"{'rank':>4} {'activation':<14}{'weight_grad':<12}{'init':<9}{'2-step':<7}{'recipe':<7}"
             f"{'seeds':>6}{'mean':>8}{'std':>8}{'min':>8}{'max':>8}"]
    for i, r in enumerate(summary["table"], 1):
        lines.append(f"{i:>4} {r['activation']:<14}{r['weight_gradient']:<12}{r['init']:<9}{str(r['two_step']):<7}"
                     f"{r['optimizer']:<7}{r['seeds']:>6}{r['mean']:>8.4f}{r['std']:>8.4f}{r['min']:>8.4f}{r['max']:>8.4f}")
    lines.append("")
    lines.append("paper's ablation ranking on these cells (val top-1, averaged over the other settings):")
    for c in summary["rankings"]:
        verdict = c.get("note") or ("holds" if c["holds"] else "does not hold at this scale")
        lines.append(f"  {c['claim']:<34} {c['left']:.4f} vs {c['right']:.4f}: {verdict}")
    if summary["best"]:
        lines.append(f"best configuration: {json.dumps(summary['best'])}")
    return "\n".join(lines)


def write_best(out: str, config: dict | None, **extra) -> Path:
    """``out``/best.json: the pick that binarize reads through ``tuned_config`` (null: keep its own)."""
    path = Path(out) / "best.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, **extra}, indent=2))
    return path


def tune_stage(params_path: str | None = None) -> dict:
    """The tune stage (``bireal tune``): the search configured by params.yaml's ``tune`` section
    around its binarize settings, with its outputs written (``files``). Disabled: an empty pick,
    -> {"enabled": False, "files": {"best": ...}}."""
    from .config import load_section
    from .stages import resolve_train_config
    from .tracking import MlflowConfig, pipeline_run_id, resolve

    settings = load_section(TuneSettings, "tune", params_path)
    if not settings.enabled:
        return {"enabled": False,
                "files": {"best": str(write_best(settings.out, None, note="tune.enabled is false"))}}
    base = resolve_train_config("binarize", params_path, {"tuned_config": ""})
    summary = run_tune(settings, base, resolve(load_section(MlflowConfig, "mlflow", params_path)),
                       pipeline_run_id(params_path))
    return {**summary, "enabled": True, "files": write_outputs(summary, settings.out)}


def write_outputs(summary: dict, out: str) -> dict[str, str]:
    """best.json (read by binarize via ``tuned_config``), table.json/.txt, table.csv, ablation.png."""
    d = Path(out)
    write_best(out, summary["best"], best_trial=summary["best_trial"])
    (d / "table.json").write_text(json.dumps({k: summary[k] for k in ("table", "rankings", "trials")}, indent=2))
    (d / "table.txt").write_text(format_table(summary) + "\n")
    rows = ["cell,mean,std,seeds"] + [
        f"{'/'.join(str(r[k]) for k in CELL_KEYS)},{r['mean']:.5f},{r['std']:.5f},{r['seeds']}" for r in summary["table"]]
    (d / "table.csv").write_text("\n".join(rows) + "\n")
    _plot(summary, d / "ablation.png")
    return {"best": str(d / "best.json"), "table": str(d / "table.txt")}


def _plot(summary: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:      # matplotlib comes with mlflow; without it only the plot is skipped
        return
    table = summary["table"]
    labels = ["/".join(str(r[k]) for k in ("activation", "weight_gradient", "init")) for r in table]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(table) + 1.5))
    ax.barh(range(len(table)), [r["mean"] for r in table], xerr=[r["std"] for r in table], color="#3a6ea5")
    ax.set_yticks(range(len(table)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("val top-1 (mean +- std over seeds)")
    ax.set_title("Bi-Real ablation (ranked)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _tracking(mlflow_cfg, group: str, name: str, settings: TuneSettings) -> dict:
    from .tracking import client, experiment_id, flatten

    c = client(mlflow_cfg)
    exp = experiment_id(mlflow_cfg)
    existing = c.search_runs([exp], f"tags.`bireal.tune_name` = '{name}'")
    if existing:                                             # a resumed search: same parent run
        parent = existing[0].info.run_id
    else:
        parent = c.create_run(exp, run_name="tune", tags={"bireal.stage": "tune", "bireal.tune_name": name,
                                                          "bireal.pipeline_run": group}).info.run_id
        for k, v in flatten({"tune": asdict(settings)}).items():
            c.log_param(parent, k, str(v))
    return {"mlflow": asdict(mlflow_cfg), "experiment_id": exp, "parent_run": parent}


def _close_children(mlflow_cfg, tracking: dict, summary: dict) -> None:
    from .tracking import client

    c = client(mlflow_cfg)
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
