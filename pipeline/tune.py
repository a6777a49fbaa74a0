"""The tune stage's plain part: the per-cell table (mean and spread over seeds), the paper's
ablation claims checked on it, the pick that binarize reads (``best.json``), and its files.
The search itself is Ray Tune's (``pipeline/adapters/ray_tune.py``); the stage that joins them is
``pipeline/stages.py``'s ``tune``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from .params import TuneSettings

CELL_KEYS = ("activation", "weight_gradient", "init", "two_step", "optimizer")


def expected_trials(s: TuneSettings) -> int:
    """How many trials a finished search has."""
    if s.search == "random":
        return s.num_samples
    cells = (
        len(s.activations) * len(s.weight_gradients) * len(s.inits) * len(s.two_step) * len(s.optimizers) * len(s.seeds)
    )
    return cells * s.num_samples


def summarize(trials: list[dict], settings: TuneSettings) -> dict:
    """Per cell (estimator x gradient x init x two-step x recipe): mean and spread over seeds."""
    cells: dict[tuple, list[float]] = {}
    for t in trials:
        if t["val_top1"] is not None:
            cells.setdefault(tuple(t[k] for k in CELL_KEYS), []).append(float(t["val_top1"]))
    table = []
    for key, values in cells.items():
        table.append(
            {
                **dict(zip(CELL_KEYS, key)),
                "seeds": len(values),
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
            }
        )
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
    return {"best": best, "best_trial": best_trial, "table": table, "rankings": paper_rankings(table), "trials": trials}


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
    top, ours = table[0], paper[0]  # the table is sorted by mean
    spread = max(top["std"], ours["std"])
    significant = min(top["seeds"], ours["seeds"]) >= 2 and top["mean"] - ours["mean"] > spread
    return top if significant else ours


def _mean_where(table: list[dict], **match) -> float | None:
    values = [r["mean"] for r in table if all(r[k] == v for k, v in match.items())]
    return statistics.fmean(values) if values else None


# The weight-gradient axis cannot rank in these nets (docs/science.md, tests/test_binarizers.py).
WEIGHT_GRADIENT_NOTE = (
    "not testable here: BN after every binary conv makes the forward invariant to alpha, "
    "so paper = plain up to BN's eps, and official = plain / alpha (Adam cancels it)"
)


def paper_rankings(table: list[dict]) -> list[dict]:
    """The paper's ablation claims, checked on this search's cells (averaged over the others)."""
    claims = [
        ("clip-init > ReLU-init", {"init": "clip"}, {"init": "relu"}),
        ("clip-init > scratch", {"init": "clip"}, {"init": "scratch"}),
        ("ApproxSign > STE", {"activation": "approx_sign"}, {"activation": "ste_sign"}),
        ("magnitude-aware (paper) > plain", {"weight_gradient": "paper"}, {"weight_gradient": "plain"}),
    ]
    out = []
    for label, a, b in claims:
        ma, mb = _mean_where(table, **a), _mean_where(table, **b)
        if ma is not None and mb is not None:
            out.append({"claim": label, "left": ma, "right": mb, "holds": ma > mb})
            if "weight_gradient" in a:  # BatchNorm follows every binary conv: the rules coincide
                out[-1].update(holds=None, note=WEIGHT_GRADIENT_NOTE)
    full = _mean_where(table, init="clip", activation="approx_sign", weight_gradient="paper")
    pairs = [
        r["mean"]
        for r in table
        if sum([r["init"] == "clip", r["activation"] == "approx_sign", r["weight_gradient"] == "paper"]) == 2
    ]
    if full is not None and pairs:
        out.append({"claim": "all three > any two", "left": full, "right": max(pairs), "holds": full > max(pairs)})
    return out


def format_table(summary: dict) -> str:
    lines = [
        f"{'rank':>4} {'activation':<14}{'weight_grad':<12}{'init':<9}{'2-step':<7}{'recipe':<7}"
        f"{'seeds':>6}{'mean':>8}{'std':>8}{'min':>8}{'max':>8}"
    ]
    for i, r in enumerate(summary["table"], 1):
        lines.append(
            f"{i:>4} {r['activation']:<14}{r['weight_gradient']:<12}{r['init']:<9}{str(r['two_step']):<7}"
            f"{r['optimizer']:<7}{r['seeds']:>6}{r['mean']:>8.4f}{r['std']:>8.4f}{r['min']:>8.4f}{r['max']:>8.4f}"
        )
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


def write_outputs(summary: dict, out: str) -> dict[str, str]:
    """best.json (read by binarize via ``tuned_config``), table.json/.txt, table.csv, ablation.png."""
    d = Path(out)
    write_best(out, summary["best"], best_trial=summary["best_trial"])
    (d / "table.json").write_text(json.dumps({k: summary[k] for k in ("table", "rankings", "trials")}, indent=2))
    (d / "table.txt").write_text(format_table(summary) + "\n")
    rows = ["cell,mean,std,seeds"] + [
        f"{'/'.join(str(r[k]) for k in CELL_KEYS)},{r['mean']:.5f},{r['std']:.5f},{r['seeds']}"
        for r in summary["table"]
    ]
    (d / "table.csv").write_text("\n".join(rows) + "\n")
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
