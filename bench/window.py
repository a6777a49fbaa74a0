"""A GPU window's plan, shared by the scripts that run in one (``bench.ablation_gpu``,
``bench.cifar10_gpu``): whole units (a seed, a stage) taken in order while their estimated
seconds fit, announced before any of them runs, refused when not even the first fits."""

from __future__ import annotations

import json
from pathlib import Path


class WindowTooShort(RuntimeError):
    """Not the next unit fits the window: nothing is trained (no epoch is cut)."""


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
