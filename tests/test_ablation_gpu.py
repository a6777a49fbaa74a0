"""`python3 -m bench.ablation_gpu` (the GPU machine's ablation), run on the CPU at a tiny size: the
timing probe, whole seeds per window (a seed's twins and trials; no epoch cut), per-seed twins,
the budget check, and a second window on a fresh machine that finishes what the first left from its
results file, without retraining it."""

import json
import shutil

import pytest
import yaml
from tiny import tiny_train

import bench.ablation_gpu as ablation_gpu
from bench.window import WindowTooShort
from pipeline.params import load_params


@pytest.fixture()
def profile(demo_shards, tmp_path):
    """The GPU ablation's design at a tiny size: 2 seeds, each with its own twin."""
    path = tmp_path / "ablation.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "train": tiny_train(demo_shards, tmp_path / "ckpt"),
                "pretrain": {"phase_epochs": [1, 0, 1]},
                "binarize": {"lr": 0.001},
                "tune": {
                    "activations": ["approx_sign"],
                    "inits": ["clip"],
                    "extra_cells": [{"activation": "ste_sign"}, {"init": "scratch"}],
                    "scratch_epochs": 3,  # at least epochs (equal compute is the profile's to state)
                    "check_epochs": 1,
                    "check_cells": [{}, {"activation": "ste_sign"}],
                    "twin_per_seed": True,
                    "seeds": [0, 1],
                    "epochs": 2,
                    "max_steps_per_epoch": 2,
                    "lr_min": 0.001,
                    "lr_max": 0.001,
                    "asha": False,
                    "max_concurrent": 2,
                    "storage_path": str(tmp_path / "ray_results"),
                    "out": str(tmp_path / "tune"),
                },
            }
        )
    )
    return path


def test_the_window_takes_whole_seeds_and_the_next_one_finishes(profile, tmp_path, monkeypatch):
    params = load_params(profile)
    twins = tmp_path / "ckpt" / "twins" / "bireal18"
    # the seed's twin: relu 1 + clip 1; its trials: paper 2, STE 2, scratch 3, the check's 1 + 1
    assert ablation_gpu.seed_epochs(params, 0) == 2 + 9

    # the probe's answer fixed at 1 s an epoch (the last window runs the real one)
    monkeypatch.setattr(ablation_gpu, "probe", lambda params, n: {"processes": n, "wall_s": 2.0, "s_per_epoch": 1.0})

    # a window no seed fits: refused after the probe, nothing trained
    with pytest.raises(
        WindowTooShort, match=r"seed 0 needs 11 epochs x 1\.0 s = 11 s, the window leaves -?\d+ s: nothing trained"
    ):
        ablation_gpu.run(str(profile), tmp_path / "r.json", None, window_s=1.0)
    assert not twins.exists()
    (tmp_path / "other.json").write_text(json.dumps({"params": "another.yaml", "trial_rows": []}))
    with pytest.raises(ValueError, match=r"other.json: not a window of this run"):
        ablation_gpu.run(str(profile), tmp_path / "r.json", None, resume_from=tmp_path / "other.json")

    # a window one seed fits: 11 s + a margin
    progress = tmp_path / "progress.jsonl"
    first = ablation_gpu.run(str(profile), tmp_path / "r.json", progress, window_s=16.0)
    assert (first["window_seeds"], first["seeds_left"], first["partial"]) == ([0], [1], True)
    assert sorted(p.name for p in twins.iterdir()) == ["seed0"]
    lines = [json.loads(line) for line in progress.read_text().splitlines()]
    assert lines[0]["plan"]["seeds"] == [0] and lines[0]["plan"]["estimate_s"] == {"0": 11, "1": 11}
    assert sorted((t["seed"], t["init"], t["epochs"]) for t in lines[1:])[:3] == [
        (0, "clip", 1),
        (0, "clip", 1),
        (0, "clip", 2),
    ]
    assert len(lines) == 1 + 5 and not (tmp_path / "tune" / "best.json").exists()  # no pick from half a search
    done = sorted((tmp_path / "ckpt" / "trials").glob("*/result.json"))
    assert len(done) == 5

    # the next window on a fresh machine (no twins, no trials), from the first window's results
    # file: with the real probe and no limit, seed 1 only, then the whole table
    rows = {p.parent.name: json.loads(p.read_text()) for p in done}
    shutil.copyfile(tmp_path / "r.json", tmp_path / "window1.json")
    shutil.rmtree(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "tune", ignore_errors=True)
    monkeypatch.undo()
    progress2 = tmp_path / "progress2.jsonl"
    second = ablation_gpu.run(
        str(profile), tmp_path / "r.json", progress2, window_s=0.0, resume_from=tmp_path / "window1.json"
    )
    assert (second["window_seeds"], second["seeds_left"], second["partial"]) == ([1], [], False)
    assert second["probe"]["processes"] == 2 and second["probe"]["s_per_epoch"] > 0
    assert {t["seed"] for t in map(json.loads, progress2.read_text().splitlines()[1:])} == {1}  # seed 0 not rerun
    restored = {p.parent.name: json.loads(p.read_text()) for p in done}
    assert restored == rows  # the first window's trials, as they finished
    assert sorted(p.name for p in twins.iterdir()) == ["seed1"]
    assert {k.split("/")[1] for k in second["twins_float_top1"]} == {"seed0", "seed1"}  # seed 0's carried
    assert second["trials"] == 10 == second["trials_planned"]
    assert [len(c["seeds"]) for c in second["cells"]] == [2, 2, 2] and len(second["check_cells"]) == 2
    ste = next(c for c in second["claims"] if c["claim"] == "ApproxSign > STE")
    assert ste["at_check"]["epochs"] == 1 and ste["verdict_both_budgets"] in (
        "reproduced",
        "inconclusive",
        "contradicted",
    )
    scratch = next(c for c in second["claims"] if c["claim"] == "clip-init > scratch")
    assert "scratch trained 3 epochs, the other cells 2 after their twin" in scratch["note"]
    assert json.loads((tmp_path / "r.json").read_text())["seeds_left"] == []
    assert (tmp_path / "tune" / "best.json").exists()
