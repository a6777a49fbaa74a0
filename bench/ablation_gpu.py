"""The ablation on a GPU machine, through the plain functions (no Ray, no MLflow).

The GPU machine has only python3 + torch (+ pyyaml, safetensors, pillow): the twins pretrain in
processes of their own side by side (the Bi-Real twin with its equal-compute ReLU control, and each
other arch's twin), then the grid runs as ``tune.max_concurrent`` trial processes sharing the GPU
(``pipeline.tune.run_local``, the search ``bireal tune --no-ray`` runs), then the results file that
``bench/ablation.sh`` writes on the CPU machine. Every finished trial is appended to ``--progress``
as a JSON line, so a run cut off by its time limit still returns what it measured; run it again on
the same files and finished twins and trials are kept.
Usage: python3 -m bench.ablation_gpu [--params P] --results FILE.json [--progress FILE.jsonl]
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from bench.ablation_results import record, write_record
from bench.cifar10_gpu import machine_name
from pipeline.params import TrainConfig, load_params
from pipeline.stages import other_twins, twin_missing
from pipeline.tune import format_trial, local_trials, run_local, write_outputs

PROFILE = "pipeline/configs/cifar10_ablation_gpu.yaml"


def pretrain(config: TrainConfig) -> str:
    """One twin in this (child) process: -> its folder."""
    from pipeline.train import train_loop

    started = time.time()
    history = train_loop(config)["history"]
    print(f"twin {config.arch} in {config.out}: val top-1 {history[-1]['val_top1']:.4f}, {time.time() - started:.0f} s")
    return config.out


def twins_to_train(params) -> list[TrainConfig]:
    """The pretrain stage's twin (with its ReLU control) and each other arch's, where missing."""
    base = params.train("binarize", {"tuned_config": ""})
    main = params.train("pretrain")
    inits = {"relu", "clip"} | ({"relu_control"} if main.relu_control else set())
    twins = [(main, inits), *other_twins(params, base)]
    return [config for config, needed in twins if twin_missing(config, needed)]


def trial_writer(progress: Path | None, started: float):
    def write(row: dict, done: int, total: int) -> None:
        row = {**row, "wall_s": round(time.time() - started)}
        print(f"{format_trial(row, done, total)} (wall {row['wall_s']} s)", flush=True)
        if progress is not None:
            with progress.open("a") as f:
                f.write(json.dumps(row) + "\n")

    return write


def run(params_file: str, results: Path, progress: Path | None) -> dict:
    params = load_params(params_file)  # errors name the file and key before any work
    base = params.train("binarize", {"tuned_config": ""})
    local_trials(params.tune, base.arch)  # a search the grid cannot run fails before the twins train
    started = time.time()
    twins = twins_to_train(params)
    if twins:
        with ProcessPoolExecutor(len(twins), mp_context=get_context("spawn")) as pool:
            list(pool.map(pretrain, twins))
    summary = run_local(params.tune, base, on_trial=trial_writer(progress, started))
    write_outputs(summary, params.tune.out)
    rec = record(params_file, started, machine=machine_name())
    write_record(rec, str(results))
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=PROFILE)
    parser.add_argument("--results", required=True, type=Path, help="the results JSON (bench/results/ablation*.json)")
    parser.add_argument("--progress", type=Path, help="append each finished trial here as a JSON line")
    args = parser.parse_args()
    run(args.params, args.results, args.progress)


if __name__ == "__main__":
    main()
