"""The ablation's results file: ``bench/ablation.sh`` runs it after ``bireal tune``.

Reads the tune stage's table (``tune.out``/table.json) and the twins' checkpoint headers, writes
``bench/results/ablation.json`` (one row per cell: settings, seeds, per-seed top-1, mean, std; the
paper's claims with their verdicts; the twins' float top-1) and prints the Markdown tables that
docs/benchmarks.md carries.
Usage: python -m bench.ablation_results --params pipeline/configs/cifar10_ablation.yaml \
           --started EPOCH_SECONDS --out bench/results/ablation.json
       python -m bench.ablation_results --rejudge bench/results/ablation_4ep.json
           (the claims of a recorded file judged again from its per-seed values, with today's rule)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

from bireal_core.checkpoint import read_header
from cuda_ext.benchmarks import cpu_model
from pipeline import storage
from pipeline.params import load_params
from pipeline.tune import (
    CELL_KEYS,
    at_budget,
    expected_trials,
    local_grid,
    paper_cell,
    paper_rankings,
    summarize,
    trial_epochs,
    twin_folder,
)

TARGET = 0.70  # the bar for the paper's cell where the profile sets none (tune.paper_cell_bar)


def twin_accuracies(params) -> dict[str, float]:
    """Float top-1 of each twin a cell starts from (the last epoch of its pretrain segment), keyed
    arch/init, or arch/seedN/init for per-seed twins."""
    base = params.train("binarize")
    settings = params.tune
    changes = [*settings.extra_cells, *settings.check_cells]
    arches = {base.arch, *settings.archs, *(c["arch"] for c in changes if "arch" in c)}
    seeds = settings.seeds if settings.twin_per_seed else [None]
    out = {}
    for arch in sorted(arches):
        for seed in seeds:
            folder = Path(twin_folder(base.init_from or base.out, arch, base.arch, seed))
            for init in ("relu", "relu_control", "clip"):
                path = folder / f"pretrain-{init}.safetensors"
                if path.is_file():
                    key = f"{arch}/{init}" if seed is None else f"{arch}/seed{seed}/{init}"
                    out[key] = round(read_header(path)["metrics"]["val_top1"], 4)
    return out


def cell_rows(trials: list[dict]) -> list[dict]:
    """One row per cell of one budget: its settings, per-seed top-1, mean and std (best first)."""
    rows = []
    for cell in dict.fromkeys(tuple(t[k] for k in CELL_KEYS) for t in trials):
        per_seed = sorted((t["seed"], t["val_top1"]) for t in trials if tuple(t[k] for k in CELL_KEYS) == cell)
        values = [v for _, v in per_seed]
        rows.append(
            {
                **dict(zip(CELL_KEYS, cell)),
                "seeds": [s for s, _ in per_seed],
                "top1": [round(v, 4) for v in values],
                "mean": round(statistics.fmean(values), 4),
                "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            }
        )
    return sorted(rows, key=lambda r: -r["mean"])


def finished_trials(params, partial: bool) -> list[dict]:
    """The search's trials: from its table (tune.out/table.json), or with ``partial`` the trials of
    the local grid (`bireal tune --no-ray`) that have finished so far, while it still runs."""
    if partial:
        return local_grid(params.tune, params.train("binarize", {"tuned_config": ""}))[2]
    return json.loads((Path(params.tune.out) / "table.json").read_text())["trials"]


def record(params_path: str, started: float, machine: str = "", partial: bool = False) -> dict:
    params = load_params(params_path)
    settings = params.tune
    searched = finished_trials(params, partial)
    # only trials that ran their whole budget: a search stopped early leaves running ones at fewer
    # epochs, and their last top-1 is not comparable
    trials = [
        t
        for t in searched
        if t["val_top1"] is not None
        and t["epochs"] == trial_epochs(settings, t["init"], t.get("budget", settings.epochs))
    ]
    arch = params.train("binarize").arch
    table = summarize(trials, settings, arch)
    rows = cell_rows(at_budget(trials, settings.epochs, settings))
    paper = paper_cell(settings, arch)
    ours = next((r for r in rows if all(r[k] == v for k, v in paper.items())), None)
    return {
        "arch": arch,
        "width": params.train("binarize").width,
        "epochs_per_trial": settings.epochs,
        "scratch_epochs": settings.scratch_epochs or settings.epochs,
        "check_epochs": settings.check_epochs,
        "twin_per_seed": settings.twin_per_seed,
        "pretrain_epochs": params.train("pretrain").phase_epochs,
        "cells": rows,
        "check_cells": cell_rows(at_budget(trials, settings.check_epochs, settings)) if settings.check_epochs else [],
        "claims": rounded(table["rankings"]),
        "paper_cell_mean": ours["mean"] if ours else None,
        "target": settings.paper_cell_bar or TARGET,
        "twins_float_top1": twin_accuracies(params),
        "trials": len(trials),
        "trials_planned": expected_trials(params.tune, arch),
        "trial_rows": trials,  # what a later window on a fresh machine restores (bench/ablation_gpu.py)
        "partial": partial,  # recorded while the search still ran
        "wall_s": round(time.time() - started),
        "machine": machine or f"{cpu_model()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "params": params_path,
    }


def trials_of(rec: dict) -> list[dict]:
    """A recorded file's per-seed results as the trial rows ``paper_rankings`` reads."""
    return [
        {**{k: cell[k] for k in CELL_KEYS}, "seed": seed, "val_top1": top1}
        for cell in rec["cells"]
        for seed, top1 in zip(cell["seeds"], cell["top1"])
    ]


def rounded(claims: list[dict]) -> list[dict]:
    def r(v):
        if isinstance(v, dict):
            return {k: r(x) for k, x in v.items()}
        return round(v, 4) if isinstance(v, float) else v

    return [r(c) for c in claims]


def rejudge(path: str) -> dict:
    """The recorded file with its claims judged again by ``pipeline.tune.compare`` (paired by seed,
    95% interval); the measurements themselves are unchanged."""
    rec = json.loads(Path(path).read_text())
    rec["claims"] = rounded(paper_rankings(trials_of(rec), paper_cell(load_params(rec["params"]).tune, rec["arch"])))
    rec["claims_rule"] = (
        f"paired by seed, 95% t-interval; at {rec['epochs_per_trial']} epochs per trial and width "
        f"{rec['width']} no claim about converged accuracy is decided: 'opposite at this budget' is not 'refuted'"
    )
    return rec


def markdown(rec: dict) -> str:
    lines = [
        "| arch | estimator | weight rule | init | two-step | top-1 per seed | mean | std |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rec["cells"]:
        seeds = ", ".join(f"{v:.4f}" for v in r["top1"])
        lines.append(
            f"| {r['arch']} | {r['activation']} | {r['weight_gradient']} | {r['init']} | {r['two_step']} | "
            f"{seeds} | {r['mean']:.4f} | {r['std']:.4f} |"
        )
    check = rec.get("check_epochs") or 0
    extra = f" at {check} epochs (95% CI) | over both budgets |" if check else ""
    lines += [
        "",
        f"| the paper's claim | its cell | the other | paired difference (95% CI) | detectable | verdict |{extra}",
        "|---|---|---|---|---|---|" + ("---|---|" if check else ""),
    ]
    for c in rec["claims"]:
        paired = f"{c['diff'] * 100:+.2f} +- {c['ci95'] * 100:.2f} pts" if "diff" in c else "-"
        detectable = f"{c['detectable'] * 100:.2f} pts" if "detectable" in c else "-"
        row = (
            f"| {c['claim']} | {c['left']:.4f} +- {c['left_std']:.4f} | {c['right']:.4f} +- {c['right_std']:.4f} | "
            f"{paired} | {detectable} | {c['verdict']}{' (' + c['note'] + ')' if c.get('note') else ''} |"
        )
        if check:
            short = c.get("at_check")
            row += (
                f" {short['diff'] * 100:+.2f} +- {short['ci95'] * 100:.2f} pts: {short['verdict']} | "
                f"{c['verdict_both_budgets']} |"
                if short
                else " - | - |"
            )
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params")
    parser.add_argument("--started", type=float, help="the run's start, seconds since the epoch")
    parser.add_argument("--out", default="bench/results/ablation.json")
    parser.add_argument("--partial", action="store_true", help="the local grid's finished trials, while it runs")
    parser.add_argument("--rejudge", metavar="FILE", help="judge a recorded file's claims again, in place")
    args = parser.parse_args()
    if args.rejudge:
        write_record(rejudge(args.rejudge), args.rejudge)
    elif args.params and args.started is not None:
        write_record(record(args.params, args.started, partial=args.partial), args.out)
    else:
        parser.error("give --params and --started (a new record), or --rejudge FILE")


def write_record(rec: dict, out: str) -> None:
    """The results file, then the tables docs/benchmarks.md carries and a one-line summary."""
    storage.write_text(out, json.dumps(rec, indent=2) + "\n")  # --rejudge rewrites a committed record in place
    print(markdown(rec))
    mean = rec["paper_cell_mean"]
    print(
        f"\npaper's cell: mean top-1 {mean} (target {rec['target']}); "
        f"{rec['trials']} of {rec['trials_planned']} trials, "
        f"wall {rec['wall_s']} s; "
        f"twins: {rec['twins_float_top1']}; wrote {out}"
    )


if __name__ == "__main__":
    main()
