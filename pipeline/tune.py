"""The tune stage's plain part: each trial's settings, the per-cell table (mean and spread over
seeds), the paper's ablation claims checked on it, the pick that binarize reads (``best.json``),
and its files. The search runs on Ray Tune (``pipeline/adapters/ray_tune.py``), or, for a machine
without Ray (the GPU check machine, ``bireal tune --no-ray``), as a grid of local processes
(``run_local``); both call ``trial_config`` and ``train_loop``. The stage that joins them is
``pipeline/stages.py``'s ``tune``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

from . import storage
from .params import CELL_AXES, ConfigError, TrainConfig, TuneSettings

CELL_KEYS = tuple(CELL_AXES)  # arch, activation, weight_gradient, init, two_step, optimizer


def paper_cell(settings: TuneSettings, arch: str) -> dict:
    """The paper's own cell in this search: ApproxSign, magnitude-aware, clip init, one step."""
    return {
        "arch": arch,
        "activation": "approx_sign",
        "weight_gradient": "paper",
        "init": "clip",
        "two_step": False,
        "optimizer": settings.optimizers[0],
    }


def cells(settings: TuneSettings, arch: str) -> list[dict]:
    """Every cell of the search, in order and without repeats: the grid (every combination of the
    axes), then ``extra_cells`` (the paper's cell with the named settings changed). ``arch`` is the
    train section's arch, the grid's when ``archs`` is empty."""
    grid = [
        dict(zip(CELL_KEYS, combo))
        for combo in itertools.product(
            settings.archs or [arch],
            settings.activations,
            settings.weight_gradients,
            settings.inits,
            settings.two_step,
            settings.optimizers,
        )
    ]
    out: list[dict] = []
    for cell in grid + [{**paper_cell(settings, arch), **extra} for extra in settings.extra_cells]:
        if cell not in out:
            out.append(cell)
    return out


def check_cells(settings: TuneSettings, arch: str) -> list[dict]:
    """The budget check's cells: the paper's cell with the settings each entry names changed."""
    out: list[dict] = []
    for change in settings.check_cells:
        cell = {**paper_cell(settings, arch), **change}
        if cell not in out:
            out.append(cell)
    return out


def twin_folder(pretrain_out: str, arch: str, train_arch: str, seed: int | None = None) -> str:
    """Where a cell's pretrain checkpoints are: the pretrain stage's for the train section's arch;
    for another arch (the no-shortcut net), its own twin's, pretrained by the tune stage; with a
    seed (``twin_per_seed``), that seed's twin of the arch, pretrained by the tune stage too."""
    if seed is None:
        return pretrain_out if arch == train_arch else f"{pretrain_out}/twins/{arch}"
    return f"{pretrain_out}/twins/{arch}/seed{seed}"


def twins_needed(settings: TuneSettings, arch: str) -> dict[tuple[str, int | None], set[str]]:
    """The twins the tune stage pretrains itself, (arch, seed or None) -> the inits their cells
    read: each arch other than ``arch``, and with ``twin_per_seed`` every arch once per seed."""
    needed: dict[tuple[str, int | None], set[str]] = {}
    for trial in trial_specs(settings, arch):
        cell = trial["cell"]
        if cell["init"] != "scratch" and (cell["arch"] != arch or trial["twin_seed"] is not None):
            needed.setdefault((cell["arch"], trial["twin_seed"]), set()).add(cell["init"])
    return needed


def trial_epochs(settings: TuneSettings, init: str, budget: int) -> int:
    """A trial's binarize epochs: its budget's, except scratch at the search's budget, which gets
    ``scratch_epochs`` (its twin's epochs on top: equal compute) when set."""
    equal_compute = init == "scratch" and settings.scratch_epochs and budget == settings.epochs
    return settings.scratch_epochs if equal_compute else budget


def trial_specs(settings: TuneSettings, arch: str) -> list[dict]:
    """Every trial of the grid, in order: each cell x seed at the search's budget (``epochs``),
    then the budget check's cells x seeds at ``check_epochs``. Each names the twin seed it starts
    from (its own seed with ``twin_per_seed``, else None: the one shared twin)."""

    def spec(cell: dict, seed: int, budget: int) -> dict:
        return {
            "cell": cell,
            "seed": seed,
            "budget": budget,
            "epochs": trial_epochs(settings, cell["init"], budget),
            "twin_seed": seed if settings.twin_per_seed else None,
        }

    main = [spec(cell, seed, settings.epochs) for cell in cells(settings, arch) for seed in settings.seeds]
    check = [spec(cell, seed, settings.check_epochs) for cell in check_cells(settings, arch) for seed in settings.seeds]
    return main + check


def trial_base(settings: TuneSettings, base: TrainConfig) -> dict:
    """The binarize settings every trial starts from, as a dict with absolute locations (a trial
    runs in a process of its own, on Ray in its own working directory)."""
    return {
        **asdict(base),
        "epochs": settings.epochs,
        "max_steps_per_epoch": settings.max_steps_per_epoch,
        "out": storage.absolute(base.out),
        # the pretrain checkpoints: where they were published, else the local out
        "init_from": storage.absolute(base.init_from or base.artifacts or base.out),
        "shards": storage.absolute(base.shards),
    }


def trial_config(base: dict, trial: dict, out: str) -> TrainConfig:
    """One trial (a ``trial_specs`` entry with its lr): the binarize stage with its cell, lr, seed
    and epochs, starting from its arch's twin (its seed's with ``twin_per_seed``); two-step trials
    spend one of their epochs on step 1."""
    cell = trial["cell"]
    overrides = {**cell, "lr": trial["lr"], "seed": trial["seed"], "epochs": trial["epochs"]}
    init_from = twin_folder(base["init_from"], cell["arch"], base["arch"], trial["twin_seed"])
    return TrainConfig(
        **{**base, **overrides, "stage": "binarize", "out": out, "init_from": init_from, "step1_epochs": 1}
    )


def expected_trials(settings: TuneSettings, arch: str) -> int:
    """How many trials a finished search has."""
    if settings.search == "random":
        return settings.num_samples
    return len(trial_specs(settings, arch)) * settings.num_samples


# ---------------------------------------------------------------------------- the grid without Ray


def local_trials(settings: TuneSettings, arch: str) -> list[dict]:
    """The grid's trials in order (``trial_specs``), one lr for all (a search over lr, or a random
    search, samples: that is Ray Tune's job)."""
    if settings.search != "grid" or settings.lr_min != settings.lr_max or settings.num_samples != 1:
        raise ConfigError(
            f"tune: the search without Ray runs a grid once at one lr; got search={settings.search!r}, "
            f"lr_min={settings.lr_min}, lr_max={settings.lr_max}, num_samples={settings.num_samples} "
            "(set search: grid, lr_min = lr_max, num_samples: 1, or run it on Ray)"
        )
    return [{**spec, "lr": settings.lr_min} for spec in trial_specs(settings, arch)]


def trial_name(base: dict, trial: dict) -> str:
    """A trial's folder name: a digest of all its settings, so a finished trial is reused only by
    a search that would train it the same way (other epochs, twins or data: another folder)."""
    config = asdict(trial_config(base, trial, out=""))
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _run_local_trial(trial: dict, base: dict, folder: str, threads: int) -> dict:
    """One trial in a process of its own; its result.json marks it done (a rerun skips it), and an
    interrupted trial resumes from its last epoch's train state (``train_loop``)."""
    import torch

    from .train import train_loop

    torch.set_num_threads(threads)
    config = trial_config(base, trial, folder)
    history = train_loop(config)["history"]
    row = trial_row(trial, history[-1]["val_top1"], len(history))
    storage.write_text(str(Path(folder) / "result.json"), json.dumps(row, indent=1))  # present = finished
    return row


def format_trial(row: dict, done: int, total: int) -> str:
    """A finished trial as one line of progress."""
    cell = " ".join(f"{k}={row[k]}" for k in ("arch", "activation", "weight_gradient", "init", "two_step"))
    return f"trial {done}/{total} {cell} seed={row['seed']} epochs={row['epochs']}: val top-1 {row['val_top1']:.4f}"


def trial_row(trial: dict, val_top1: float | None, epochs: int, status: str = "TERMINATED") -> dict:
    """A trial as the table reads it (the Ray Tune adapter writes the same rows)."""
    return {
        **{k: trial["cell"][k] for k in CELL_KEYS},
        "lr": trial["lr"],
        "seed": trial["seed"],
        "budget": trial["budget"],
        "val_top1": val_top1,
        "epochs": epochs,
        "status": status,
        "trial_id": trial["name"],
    }


def local_grid(settings: TuneSettings, base: TrainConfig) -> tuple[dict, Path, list[dict], list[dict]]:
    """The local grid's state: (trial base, trials folder, rows of the finished trials, the
    pending trials, each with its folder name)."""
    base_dict = trial_base(settings, base)
    folder = Path(base_dict["out"]) / "trials"
    rows, pending = [], []
    for trial in local_trials(settings, base.arch):
        trial = {**trial, "name": trial_name(base_dict, trial)}
        result = folder / trial["name"] / "result.json"
        if result.is_file():
            rows.append(json.loads(result.read_text()))
        else:
            pending.append(trial)
    return base_dict, folder, rows, pending


def run_local(settings: TuneSettings, base: TrainConfig, on_trial=None) -> dict:
    """The grid as ``max_concurrent`` local processes (``cpus_per_trial`` threads each; on a GPU
    machine they share the GPU): the same trials, table and claims as the Ray Tune search.
    Finished trials are kept: run it again after an interruption. ``on_trial(row, done, total)``."""
    base_dict, folder, rows, pending = local_grid(settings, base)
    total = len(rows) + len(pending)
    threads = max(1, int(settings.cpus_per_trial))
    # spawn: a forked child would inherit the parent's CUDA state and thread pools
    with ProcessPoolExecutor(max(1, settings.max_concurrent), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_local_trial, t, base_dict, str(folder / t["name"]), threads) for t in pending]
        for future in as_completed(futures):
            rows.append(future.result())
            if on_trial is not None:
                on_trial(rows[-1], len(rows), total)
    summary = summarize(rows, settings, base.arch)
    summary.update({"path": str(folder), "finished": len(rows) == total})
    return summary


def at_budget(trials: list[dict], budget: int, settings: TuneSettings) -> list[dict]:
    """The trials of one budget (a row without one ran the search's own, ``epochs``)."""
    return [t for t in trials if t.get("budget", settings.epochs) == budget]


def summarize(trials: list[dict], settings: TuneSettings, arch: str) -> dict:
    """Per cell: mean and spread over seeds; the paper's claims checked; the pick for binarize.
    The table, the pick and the claims read the search's budget; with a budget check, each claim
    also carries its comparison at ``check_epochs`` and the verdict over both budgets."""
    checked = at_budget(trials, settings.check_epochs, settings) if settings.check_epochs else []
    trials_all, trials = trials, at_budget(trials, settings.epochs, settings)
    by_cell: dict[tuple, list[float]] = {}
    for t in trials:
        if t["val_top1"] is not None:
            by_cell.setdefault(tuple(t[k] for k in CELL_KEYS), []).append(float(t["val_top1"]))
    table = [{**dict(zip(CELL_KEYS, key)), **spread(values)} for key, values in by_cell.items()]
    table.sort(key=lambda r: -r["mean"])
    best_trial = max((t for t in trials if t["val_top1"] is not None), key=lambda t: t["val_top1"], default=None)
    best = None
    # binarize trains the train section's arch from its own twin: the pick stays within that arch
    pick = pick_cell([r for r in table if r["arch"] == arch], paper_cell(settings, arch))
    if pick is not None:
        cell = {k: pick[k] for k in CELL_KEYS if k != "arch"}
        # the picked cell's best trial supplies the lr (a median of the cell's lrs may be an lr no
        # trial ran with, or the worst trial's)
        in_cell = [t for t in trials if t["val_top1"] is not None and all(t[k] == pick[k] for k in CELL_KEYS)]
        best = {**cell, "lr": max(in_cell, key=lambda t: t["val_top1"])["lr"]}
    paper = paper_cell(settings, arch)
    rankings = paper_rankings(trials, paper, settings.scratch_epochs, settings.epochs)
    if checked:
        rankings = with_budget_check(rankings, paper_rankings(checked, paper), settings, _values(trials, paper))
    return {"best": best, "best_trial": best_trial, "table": table, "rankings": rankings, "trials": trials_all}


def with_budget_check(rankings: list[dict], checked: list[dict], settings: TuneSettings, paper: dict) -> list[dict]:
    """Each claim that the budget check also ran: its comparison at ``check_epochs`` (``at_check``)
    and ``budget_verdict`` over the two budgets, against ``paper_cell_bar``."""
    by_claim = {c["claim"]: c for c in checked}
    paper_top1 = statistics.fmean(paper.values()) if paper else 0.0
    out = []
    for claim in rankings:
        short = by_claim.get(claim["claim"])
        if short is not None and "diff" in short and "diff" in claim:
            kept = ("diff", "ci95", "detectable", "verdict", "left", "right", "pairs")
            claim = {
                **claim,
                "at_check": {"epochs": settings.check_epochs, **{k: short[k] for k in kept}},
                "verdict_both_budgets": budget_verdict(short, claim, paper_top1, settings.paper_cell_bar),
            }
        out.append(claim)
    return out


def spread(values: list[float]) -> dict:
    return {
        "seeds": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def pick_cell(table: list[dict], paper: dict) -> dict | None:
    """The cell best.json names: the paper's own unless another cell beats it by more than the seed
    spread of both. With fewer than two seeds in either there is no spread to judge a win by, so
    the paper's cell stays. Without the paper's cell in the search, the top cell."""
    if not table:
        return None
    ours = next((r for r in table if all(r[k] == v for k, v in paper.items() if k in r)), None)
    if ours is None:
        return table[0]
    top = table[0]  # the table is sorted by mean
    significant = min(top["seeds"], ours["seeds"]) >= 2 and top["mean"] - ours["mean"] > max(top["std"], ours["std"])
    return top if significant else ours


# The weight-gradient axis cannot rank in these nets (docs/science.md, tests/test_binarizers.py).
WEIGHT_GRADIENT_NOTE = (
    "not testable here: BN after every binary conv makes the forward invariant to alpha, "
    "so paper = plain up to BN's eps, and official = plain / alpha (Adam cancels it)"
)

SCRATCH_NOTE = "unequal compute: the clip cell also trained its twin; scratch needs the twin's epochs too"
EQUAL_SCRATCH_NOTE = (
    "scratch trained {} epochs, the other cells {} after their twin: "
    "equal compute where the twin trained the difference"
)

# The paper's claims as one-setting changes of its cell: (claim, setting, the other values in the
# order they are tried). "clip-init > ReLU-init" uses the equal-compute ReLU twin when it ran.
CLAIMS = [
    ("ApproxSign > STE", "activation", ["ste_sign"]),
    ("ApproxSign > identity (no estimator)", "activation", ["identity_sign"]),
    ("clip-init > ReLU-init (equal epochs)", "init", ["relu_control"]),
    ("clip-init > ReLU-init (fewer epochs)", "init", ["relu"]),
    ("clip-init > scratch", "init", ["scratch"]),
    ("shortcut per conv (Bi-Real) > per two convs (ResNet)", "arch", ["binary_resnet18"]),
    ("magnitude-aware (paper) > plain", "weight_gradient", ["plain"]),
    ("magnitude-aware (paper) > Caffe rule (sign, no clip)", "weight_gradient", ["caffe"]),
    ("one step > two-step", "two_step", [True]),
]


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy, which scikit-learn brings with the pipeline extra)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def compare(left: dict[int, float], right: dict[int, float]) -> dict:
    """The paper's cell (``left``) against another (``right``), each {seed: top-1}, paired by seed
    (a seed fixes the data order and the binarize init of both): the mean difference, its 95%
    t-interval, and the smallest difference this n detects at 80% power. Verdict: ``reproduced``
    when the interval excludes 0 in the paper's direction, ``opposite at this budget`` when it
    excludes 0 the other way (a single budget cannot contradict a claim about converged accuracy:
    ``budget_verdict`` judges two), otherwise ``inconclusive``."""
    seeds = sorted(set(left) & set(right))
    a, b = spread(list(left.values())), spread(list(right.values()))
    out = {"left": a["mean"], "right": b["mean"], "left_std": a["std"], "right_std": b["std"], "pairs": len(seeds)}
    if len(seeds) < 2:
        return {**out, "verdict": "fewer than two paired seeds: no interval"}
    diffs = [left[s] - right[s] for s in seeds]
    n, mean, sd = len(diffs), statistics.fmean(diffs), statistics.stdev(diffs)
    t95 = t_quantile(0.975, n - 1)
    half = t95 * sd / math.sqrt(n)
    detectable = (t95 + t_quantile(0.8, n - 1)) * sd / math.sqrt(n)
    if mean - half > 0:
        verdict = "reproduced"
    elif mean + half < 0:
        verdict = "opposite at this budget"
    else:
        verdict = "inconclusive"
    return {**out, "diff": mean, "ci95": half, "detectable": detectable, "verdict": verdict}


def budget_verdict(short: dict, long: dict, paper_top1: float, bar: float) -> str:
    """A claim judged at two budgets (``compare`` at the shorter and the longer one): reproduced when
    the longer one's interval excludes 0 in the paper's direction; contradicted only when both
    exclude 0 the other way and the paper's cell reaches ``bar`` (below it a comparison of 1-bit
    nets says little about converged accuracy); otherwise inconclusive."""
    if long["verdict"] == "reproduced":
        return "reproduced"
    against = short["verdict"] == long["verdict"] == "opposite at this budget"
    return "contradicted" if against and paper_top1 >= bar else "inconclusive"


def _values(trials: list[dict], cell: dict) -> dict[int, float]:
    """{seed: top-1} of the finished trials of ``cell``."""
    return {
        int(t["seed"]): float(t["val_top1"])
        for t in trials
        if t["val_top1"] is not None and all(t[k] == cell[k] for k in cell)
    }


def paper_rankings(trials: list[dict], paper: dict, scratch_epochs: int = 0, epochs: int = 0) -> list[dict]:
    """The paper's ablation claims on this search (one budget): its cell against the same cell with
    one setting changed, per seed; then the full method against the best cell that lacks one of its
    three parts. ``scratch_epochs``: what scratch trained when it was given more than the other
    cells' ``epochs`` (its twin's epochs on top)."""
    ours = _values(trials, paper)
    if not ours:
        return []
    out = []
    for claim, key, others in CLAIMS:
        theirs = _values(trials, {**paper, key: others[0]})
        if theirs:
            out.append({"claim": claim, "other": {key: others[0]}, **compare(ours, theirs)})
            if key == "weight_gradient" and others[0] == "plain":  # BN follows every binary conv
                out[-1]["note"] = WEIGHT_GRADIENT_NOTE
            if others[0] == "scratch":
                out[-1]["note"] = EQUAL_SCRATCH_NOTE.format(scratch_epochs, epochs) if scratch_epochs else SCRATCH_NOTE
    lacking = [
        {**paper, **change}
        for change in ({"activation": "ste_sign"}, {"init": "relu_control"}, {"init": "relu"}, {"init": "scratch"})
    ]
    best_lacking = max(
        (v for v in (_values(trials, c) for c in lacking) if v),
        key=lambda v: statistics.fmean(v.values()),
        default=None,
    )
    if best_lacking:
        out.append({"claim": "all parts > the best cell lacking one", "other": {}, **compare(ours, best_lacking)})
    return out


def format_table(summary: dict) -> str:
    lines = [
        f"{'rank':>4} {'arch':<16}{'activation':<14}{'weight_grad':<12}{'init':<13}{'2-step':<7}{'recipe':<7}"
        f"{'seeds':>6}{'mean':>8}{'std':>8}{'min':>8}{'max':>8}"
    ]
    for i, r in enumerate(summary["table"], 1):
        lines.append(
            f"{i:>4} {r['arch']:<16}{r['activation']:<14}{r['weight_gradient']:<12}{r['init']:<13}"
            f"{str(r['two_step']):<7}{r['optimizer']:<7}{r['seeds']:>6}{r['mean']:>8.4f}{r['std']:>8.4f}"
            f"{r['min']:>8.4f}{r['max']:>8.4f}"
        )
    lines.append("")
    lines.append(
        "the paper's claims: its cell vs the same cell with one setting changed "
        "(means; paired difference by seed with its 95% interval):"
    )
    for c in summary["rankings"]:
        verdict = c["verdict"] + (f" ({c['note']})" if c.get("note") else "")
        paired = f", diff {c['diff']:+.4f} +- {c['ci95']:.4f}" if "diff" in c else ""
        lines.append(f"  {c['claim']:<54} {c['left']:.4f} vs {c['right']:.4f}{paired}: {verdict}")
        if "at_check" in c:
            short = c["at_check"]
            lines.append(
                f"  {'':<54} at {short['epochs']} epochs: diff {short['diff']:+.4f} +- {short['ci95']:.4f}: "
                f"{short['verdict']}; over both budgets: {c['verdict_both_budgets']}"
            )
    if summary["best"]:
        lines.append(f"best configuration: {json.dumps(summary['best'])}")
    return "\n".join(lines)


def require_finished(summary: dict, settings: TuneSettings, arch: str) -> None:
    """A search with a trial that errored or never ran picks from part of its grid: refuse it
    (non-zero exit, no best.json) instead of handing binarize, DVC and Prefect a partial pick."""
    if summary["finished"]:
        return
    trials = summary["trials"]
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(Counter(t.get("status", "?") for t in trials).items()))
    raise RuntimeError(
        f"tune: the search did not finish: {len(trials)} of {expected_trials(settings, arch)} trials reported "
        f"({statuses or 'none'}); no best.json written. Run it again to resume it (finished trials are kept)"
    )


def write_best(out: str, config: dict | None, **extra) -> Path:
    """``out``/best.json: the pick that binarize reads through ``tuned_config`` (null: keep its own)."""
    path = Path(out) / "best.json"
    storage.write_text(str(path), json.dumps({"config": config, **extra}, indent=2))  # binarize reads it
    return path


def pick_split(config: TrainConfig) -> str:
    """What the trials' val_top1, and so the pick, is measured on: the held-out part of the train
    split (``holdout``), else the split ``bireal evaluate`` reports the final accuracy on."""
    if config.holdout:
        return "holdout"
    from .data import eval_split_name, read_manifest

    return eval_split_name(read_manifest(config.shards), config.shards)


def pick_warning(summary: dict) -> str:
    """'' or why the pick's accuracy is optimistic: a choice made on the split the accuracy is
    reported on (picking the best of several cells on it fits the pick to those images)."""
    split = summary.get("picked_on")
    if not split or split == "holdout" or len(summary["table"]) < 2:
        return ""
    return (
        f"note: the pick was made on the {split} split, the one the final accuracy is reported on, so that "
        "accuracy is optimistic; set train.holdout (e.g. 5000) to pick on a held-out part of the train split"
    )


def write_outputs(summary: dict, out: str) -> dict[str, str]:
    """best.json (read by binarize via ``tuned_config``), table.json/.txt, table.csv, ablation.png."""
    d = Path(out)
    write_best(out, summary["best"], best_trial=summary["best_trial"], picked_on=summary.get("picked_on"))
    table = {k: summary[k] for k in ("table", "rankings", "trials")}
    storage.write_text(str(d / "table.json"), json.dumps(table, indent=2))
    storage.write_text(str(d / "table.txt"), format_table(summary) + "\n")
    rows = ["cell,mean,std,seeds"] + [
        f"{'/'.join(str(r[k]) for k in CELL_KEYS)},{r['mean']:.5f},{r['std']:.5f},{r['seeds']}"
        for r in summary["table"]
    ]
    storage.write_text(str(d / "table.csv"), "\n".join(rows) + "\n")
    _plot(summary, d / "ablation.png")
    return {"best": str(d / "best.json"), "table": str(d / "table.txt")}


def _plot(summary: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib comes with mlflow; without it only the plot is skipped
        return
    table = summary["table"]
    labels = ["/".join(str(r[k]) for k in CELL_KEYS[:4]) + ("/2-step" if r["two_step"] else "") for r in table]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(table) + 1.5))
    ax.barh(range(len(table)), [r["mean"] for r in table], xerr=[r["std"] for r in table], color="#3a6ea5")
    ax.set_yticks(range(len(table)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("val top-1 (mean +- std over seeds)")
    ax.set_title("Bi-Real ablation (ranked)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
