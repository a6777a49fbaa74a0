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
import time
from pathlib import Path

from bireal_core.checkpoint import read_header
from cuda_ext.benchmarks import cpu_model
from pipeline.params import load_params
from pipeline.tune import CELL_KEYS, expected_trials, local_grid, paper_cell, paper_rankings, summarize, twin_folder

TARGET = 0.70  # the issue's bar for the paper's cell (mean top-1 at width 0.25)


def twin_accuracies(params) -> dict[str, float]:
    """Float top-1 of each twin a cell starts from (the last epoch of its pretrain segment)."""
    base = params.train("binarize")
    arches = {base.arch, *params.tune.archs, *(c["arch"] for c in params.tune.extra_cells if "arch" in c)}
    out = {}
    for arch in sorted(arches):
        folder = Path(twin_folder(base.init_from or base.out, arch, base.arch))
        for init in ("relu", "relu_control", "clip"):
            path = folder / f"pretrain-{init}.safetensors"
            if path.is_file():
                out[f"{arch}/{init}"] = round(read_header(path)["metrics"]["val_top1"], 4)
    return out


def finished_trials(params, partial: bool) -> list[dict]:
    """The search's trials: from its table (tune.out/table.json), or with ``partial`` the trials of
    the local grid (`bireal tune --no-ray`) that have finished so far, while it still runs."""
    if partial:
        return local_grid(params.tune, params.train("binarize", {"tuned_config": ""}))[2]
    return json.loads((Path(params.tune.out) / "table.json").read_text())["trials"]


def record(params_path: str, started: float, machine: str = "", partial: bool = False) -> dict:
    params = load_params(params_path)
    searched = finished_trials(params, partial)
    # only trials that ran their whole budget: a search stopped early leaves running ones at fewer
    # epochs, and their last top-1 is not comparable
    trials = [t for t in searched if t["val_top1"] is not None and t["epochs"] == params.tune.epochs]
    arch = params.train("binarize").arch
    table = summarize(trials, params.tune, arch)
    rows = []
    for r in table["table"]:
        cell = {k: r[k] for k in CELL_KEYS}
        per_seed = sorted(
            (t["seed"], round(t["val_top1"], 4)) for t in trials if all(t[k] == cell[k] for k in CELL_KEYS)
        )
        rows.append(
            {
                **cell,
                "seeds": [s for s, _ in per_seed],
                "top1": [v for _, v in per_seed],
                "mean": round(r["mean"], 4),
                "std": round(r["std"], 4),
            }
        )
    paper = paper_cell(params.tune, arch)
    ours = next((r for r in rows if all(r[k] == v for k, v in paper.items())), None)
    return {
        "arch": arch,
        "width": params.train("binarize").width,
        "epochs_per_trial": params.tune.epochs,
        "pretrain_epochs": params.train("pretrain").phase_epochs,
        "cells": rows,
        "claims": rounded(table["rankings"]),
        "paper_cell_mean": ours["mean"] if ours else None,
        "target": TARGET,
        "twins_float_top1": twin_accuracies(params),
        "trials": len(trials),
        "trials_planned": expected_trials(params.tune, arch),
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
    return [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in c.items()} for c in claims]


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
    lines += [
        "",
        "| the paper's claim | its cell | the other | paired difference (95% CI) | detectable | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in rec["claims"]:
        paired = f"{c['diff'] * 100:+.2f} +- {c['ci95'] * 100:.2f} pts" if "diff" in c else "-"
        detectable = f"{c['detectable'] * 100:.2f} pts" if "detectable" in c else "-"
        lines.append(
            f"| {c['claim']} | {c['left']:.4f} +- {c['left_std']:.4f} | {c['right']:.4f} +- {c['right_std']:.4f} | "
            f"{paired} | {detectable} | {c['verdict']}{' (' + c['note'] + ')' if c.get('note') else ''} |"
        )
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
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rec, indent=2) + "\n")
    print(markdown(rec))
    mean = rec["paper_cell_mean"]
    print(
        f"\npaper's cell: mean top-1 {mean} (target {TARGET}); {rec['trials']} of {rec['trials_planned']} trials, "
        f"wall {rec['wall_s']} s; "
        f"twins: {rec['twins_float_top1']}; wrote {out}"
    )


if __name__ == "__main__":
    main()
