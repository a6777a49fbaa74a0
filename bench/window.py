"""A GPU window's plan, shared by the scripts that run in one (``bench.ablation_gpu``,
``bench.cifar10_gpu``): whole units (a seed, a stage) taken in order while their estimated
seconds fit, announced before any of them runs, refused when not even the first fits."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path


class WindowTooShort(RuntimeError):
    """Not the next unit fits the window: nothing is trained (no epoch is cut)."""


def planned_epochs(config) -> int:
    """The epochs a stage trains at most as planned: a twin's phases, its ReLU control's
    continuation through the later phases and the clip gate's cap; binarize's and finetune's epochs."""
    if config.stage != "pretrain":
        return config.epochs
    control = sum(config.phase_epochs[1:]) if config.relu_control else 0
    return sum(config.phase_epochs) + control + (config.clip_gate_max_epochs if config.clip_gate else 0)


def _one_epoch(config) -> float:
    from pipeline.train import train_loop

    started = time.time()
    train_loop(config)
    return time.time() - started


def probe(config, processes: int) -> dict:
    """One binarize epoch from scratch with ``config``'s settings in each of ``processes`` processes
    side by side (as trials share the GPU), each in a folder of its own: the wall seconds and the
    seconds per epoch of the shared machine (wall / processes). Each process's start, data decode
    and first-step compile are in it: an upper bound."""
    with tempfile.TemporaryDirectory(prefix="bireal-probe-") as tmp:
        configs = [
            dataclasses.replace(
                config, init="scratch", epochs=1, out=f"{tmp}/{i}", artifacts="", two_step=False, distill_from=""
            )
            for i in range(processes)
        ]
        started = time.time()
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
            list(pool.map(_one_epoch, configs))
        wall = time.time() - started
    return {"processes": processes, "wall_s": round(wall, 2), "s_per_epoch": round(wall / processes, 3)}


def take_whole(units: list, cost_s: dict, budget_s: float | None) -> list:
    """The longest prefix of ``units`` whose costs fit ``budget_s`` (all of them without a budget)."""
    chosen, spent = [], 0.0
    for unit in units:
        if budget_s is not None and spent + cost_s[unit] > budget_s:
            break
        chosen.append(unit)
        spent += cost_s[unit]
    return chosen


def announce(timing: dict, plan: dict, progress: Path | None) -> None:
    """The probe and the plan, printed and appended to the progress file, before any training."""
    print(f"probe: {json.dumps(timing)}; plan: {json.dumps(plan)}", flush=True)
    if progress is not None:
        with progress.open("a") as f:
            f.write(json.dumps({"probe": timing, "plan": plan}) + "\n")


def refuse_if_nothing_fits(plan: dict, chosen: list, needs: str) -> None:
    """Raise ``WindowTooShort`` when units are pending and none fits; ``needs`` says what the first
    one would take."""
    if plan["pending"] and not chosen:
        raise WindowTooShort(
            f"{needs}, the window leaves {plan['budget_s']:.0f} s: nothing trained (epochs are never cut); "
            "give a longer --window-s"
        )
