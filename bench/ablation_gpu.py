"""The ablation on a GPU machine, through the plain functions (no Ray, no MLflow).

The GPU machine has only python3 + torch (+ pyyaml, safetensors, pillow). The run starts with a
timing probe: one binarize epoch in each of ``tune.max_concurrent`` processes side by side, which
gives the seconds per epoch with the GPU shared as the trials share it. From it, and the epochs one
seed costs (its twins' and its trials'), it takes as many whole seeds as fit ``--window-s`` and never
fewer epochs than the profile states; the seeds left over are the next window's. Then the twins
pretrain in processes of their own side by side (per seed with ``tune.twin_per_seed``: the Bi-Real
twin with its equal-compute ReLU control, and each other arch's twin), then the grid runs as
``tune.max_concurrent`` trial processes sharing the GPU (``pipeline.tune.run_local``, the search
``bireal tune --no-ray`` runs), then the results file that ``bench/ablation.sh`` writes on the CPU
machine. Every finished trial is appended to ``--progress`` as a JSON line, so a run cut off by its
time limit still returns what it measured; run it again on the same files and finished twins and
trials are kept. A GPU machine keeps nothing between windows: the next window gets the last one's
results file back with ``--resume-from``, whose finished trials (``trial_rows``) are restored as
done and whose twins' top-1 is carried into the new results (a seed's twins and trials all run in
its window, so no checkpoint has to cross).
Usage: python3 -m bench.ablation_gpu [--params P] --results FILE.json [--progress FILE.jsonl]
           [--window-s SECONDS] [--resume-from PREVIOUS_RESULTS.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from bench.ablation_results import record, write_record
from bench.cifar10_gpu import machine_name
from bench.window import announce, planned_epochs, probe, refuse_if_nothing_fits, take_whole
from pipeline import storage
from pipeline.params import TrainConfig, load_params
from pipeline.stages import other_twins, twin_missing
from pipeline.tune import format_trial, local_grid, local_trials, run_local, write_outputs

PROFILE = "pipeline/configs/cifar10_ablation_gpu.yaml"


def pretrain(config: TrainConfig) -> str:
    """One twin in this (child) process: -> its folder."""
    from pipeline.train import train_loop

    started = time.time()
    history = train_loop(config)["history"]
    print(
        f"twin {config.arch} seed {config.seed} in {config.out}: val top-1 {history[-1]['val_top1']:.4f}, "
        f"{time.time() - started:.0f} s",
        flush=True,
    )
    return config.out


def twins_of(params, seeds: list[int]) -> list[tuple[TrainConfig, set[str]]]:
    """The twins the trials of ``seeds`` start from, each with the inits they read: with
    ``tune.twin_per_seed`` each seed's (every arch, pretrained with that seed); otherwise the
    pretrain stage's twin (with its ReLU control) and each other arch's, shared by all seeds."""
    base = params.train("binarize", {"tuned_config": ""})
    twins = other_twins(params, base)
    if params.tune.twin_per_seed:
        return [(config, inits) for config, inits in twins if config.seed in seeds]
    main = params.train("pretrain")
    return [(main, {"relu", "clip"} | ({"relu_control"} if main.relu_control else set())), *twins]


def seed_epochs(params, seed: int) -> int:
    """The epochs one seed costs: its twins' (per-seed twins only; shared ones are paid once) and
    its trials'."""
    base = params.train("binarize", {"tuned_config": ""})
    trials = sum(t["epochs"] for t in local_trials(params.tune, base.arch) if t["seed"] == seed)
    twins = sum(planned_epochs(c) for c, _ in twins_of(params, [seed])) if params.tune.twin_per_seed else 0
    return trials + twins


def pending_seeds(params) -> list[int]:
    """The seeds with a trial that has not finished, in the profile's order."""
    _, _, _, pending = local_grid(params.tune, params.train("binarize", {"tuned_config": ""}))
    todo = {t["seed"] for t in pending}
    return [s for s in params.tune.seeds if s in todo]


def plan_window(params, window_s: float, probe_result: dict, elapsed_s: float) -> dict:
    """Which of the pending seeds this window runs, from the probe: every one without a window."""
    todo = pending_seeds(params)
    epochs = {seed: seed_epochs(params, seed) for seed in todo}
    cost = {seed: epochs[seed] * probe_result["s_per_epoch"] for seed in todo}
    budget = window_s - elapsed_s if window_s else None
    return {
        "pending": todo,
        "seeds": take_whole(todo, cost, budget),
        "epochs_per_seed": epochs,
        "estimate_s": {s: round(cost[s]) for s in todo},
        "budget_s": round(budget) if budget is not None else None,
    }


def trial_writer(progress: Path | None, started: float):
    def write(row: dict, done: int, total: int) -> None:
        row = {**row, "wall_s": round(time.time() - started)}
        print(f"{format_trial(row, done, total)} (wall {row['wall_s']} s)", flush=True)
        if progress is not None:
            with progress.open("a") as f:
                f.write(json.dumps(row) + "\n")

    return write


def restore_trials(params, previous: dict) -> int:
    """The finished trials of a previous window's results (``trial_rows``) written back as done
    (``<trials>/<trial_id>/result.json``, what a finished trial leaves); -> how many were missing."""
    _, folder, _, _ = local_grid(params.tune, params.train("binarize", {"tuned_config": ""}))
    restored = 0
    for row in previous["trial_rows"]:
        result = folder / row["trial_id"] / "result.json"
        if not result.is_file():
            storage.write_text(str(result), json.dumps(row, indent=1))
            restored += 1
    return restored


def load_previous(path: Path | None, params_file: str) -> dict | None:
    if path is None:
        return None
    previous = json.loads(path.read_text())
    if "trial_rows" not in previous or previous.get("params") != params_file:
        raise ValueError(
            f"{path}: not a window of this run (needs trial_rows and params {params_file!r}, "
            f"has params {previous.get('params')!r})"
        )
    return previous


def run(
    params_file: str, results: Path, progress: Path | None, window_s: float = 0.0, resume_from: Path | None = None
) -> dict:
    params = load_params(params_file)  # errors name the file and key before any work
    base = params.train("binarize", {"tuned_config": ""})
    local_trials(params.tune, base.arch)  # a search the grid cannot run fails before the twins train
    previous = load_previous(resume_from, params_file)
    if previous is not None:
        print(f"resumed from {resume_from}: {restore_trials(params, previous)} finished trials restored", flush=True)
    started = time.time()
    timing = probe(base, max(1, params.tune.max_concurrent))
    plan = plan_window(params, window_s, timing, time.time() - started)
    announce(timing, plan, progress)
    if plan["pending"]:
        first = plan["pending"][0]
        needs = f"seed {first} needs {plan['epochs_per_seed'][first]} epochs x {timing['s_per_epoch']} s"
        refuse_if_nothing_fits(plan, plan["seeds"], f"{needs} = {plan['estimate_s'][first]} s")
    twins = [c for c, inits in twins_of(params, plan["seeds"]) if twin_missing(c, inits)]
    if twins:
        with ProcessPoolExecutor(len(twins), mp_context=get_context("spawn")) as pool:
            list(pool.map(pretrain, twins))
    window = dataclasses.replace(params.tune, seeds=plan["seeds"])
    run_local(window, base, on_trial=trial_writer(progress, started))
    left = pending_seeds(params)
    if not left:  # the whole grid: its table and pick (every trial is kept, nothing trains again)
        write_outputs(run_local(params.tune, base), params.tune.out)
    rec = record(params_file, started, machine=machine_name(), partial=bool(left))
    rec.update({"probe": timing, "window_seeds": plan["seeds"], "seeds_left": left})
    if previous is not None:  # the earlier windows' twins are on their machines only
        rec["twins_float_top1"] = {**previous["twins_float_top1"], **rec["twins_float_top1"]}
    write_record(rec, str(results))
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=PROFILE)
    parser.add_argument("--results", required=True, type=Path, help="the results JSON (bench/results/ablation*.json)")
    parser.add_argument("--progress", type=Path, help="append each finished trial here as a JSON line")
    parser.add_argument(
        "--window-s", type=float, default=0.0, help="seconds this window has: the whole seeds that fit (0: all)"
    )
    parser.add_argument("--resume-from", type=Path, help="the last window's --results file (carried in)")
    args = parser.parse_args()
    run(args.params, args.results, args.progress, args.window_s, args.resume_from)


if __name__ == "__main__":
    main()
