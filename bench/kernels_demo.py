"""Accuracy of training through the packed kernels against the float path, on the demo data.

Bi-Real-18 (width 0.25, small stem) binarized from scratch for 3 epochs on the embedded demo digits,
``kernels: float`` and ``kernels: auto`` with the same seeds; per-epoch validation top-1 and the
last epoch's training loss, one row per run. The float path's own seed-to-seed spread is the noise
the packed path is judged against (docs/benchmarks.md).

    python -m bench.kernels_demo [--seeds 0 1] [--epochs 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipeline.shard import ShardParams, shard_dataset
from pipeline.train import TrainConfig, train_loop


def run(seeds: list[int], epochs: int, out: Path) -> list[dict]:
    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        shard_dataset("demo", str(shards), ShardParams(samples_per_shard=100, processes=2), progress_bar=False)
    rows = []
    for seed in seeds:
        for kernels in ("float", "auto"):
            start = time.perf_counter()
            config = TrainConfig(
                stage="binarize",
                init="scratch",
                shards=str(shards),
                out=str(out / f"{kernels}-seed{seed}"),
                arch="bireal18",
                stem="small",
                width=0.25,
                batch_size=32,
                lr=3e-3,
                epochs=epochs,
                seed=seed,
                kernels=kernels,
            )
            history = train_loop(config)["history"]
            rows.append(
                {
                    "kernels": kernels,
                    "seed": seed,
                    "val_top1": [round(h["val_top1"], 4) for h in history],
                    "train_loss": round(history[-1]["train_loss"], 4),
                    "seconds": round(time.perf_counter() - start),
                }
            )
            print(format_row(rows[-1]), flush=True)
    return rows


def format_row(row: dict) -> str:
    top1 = ", ".join(f"{a:.4f}" for a in row["val_top1"])
    return (
        f"kernels {row['kernels']:<5} seed {row['seed']}: val top-1 by epoch {top1}; "
        f"last train loss {row['train_loss']:.4f} ({row['seconds']} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(args.seeds, args.epochs, args.out or Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":  # the loader's worker processes re-import this module
    main()
