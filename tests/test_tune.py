"""`bireal tune`: a tiny search (4 trials, 1 epoch, demo data), MLflow child runs, the best
config consumed by binarize, and an interrupted search resumed with Tuner.restore."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import mlflow
import pytest

from bireal_core.checkpoint import read_header
from pipeline.adapters.ray_tune import run_tune
from pipeline.adapters.tracking import resolve
from pipeline.params import MlflowConfig, TuneSettings, load_params
from pipeline.stages import pretrain_other_twins
from pipeline.train import TrainConfig, train_loop
from pipeline.tune import write_outputs


@pytest.fixture(scope="module")
def pretrained(demo_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune_pretrain")
    train_loop(
        TrainConfig(
            stage="pretrain",
            shards=str(demo_shards),
            out=str(out),
            width=0.25,
            batch_size=32,
            phase_epochs=[1, 0, 1],
            max_steps_per_epoch=8,
        )
    )
    return out


def settings(tmp, **kw):
    base = dict(
        activations=["approx_sign", "ste_sign"],
        inits=["scratch", "clip"],
        epochs=1,
        max_steps_per_epoch=4,
        storage_path=str(tmp / "ray_results"),
        out=str(tmp / "tune"),
        max_concurrent=2,
        asha=True,
    )
    return TuneSettings(**{**base, **kw})


def mlflow_cfg(tmp):
    return resolve(
        MlflowConfig(
            tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
            experiment="tune-test",
            artifact_location=str(tmp / "mlartifacts"),
        )
    )


def children(tmp, summary_path=None):
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("bireal.stage") == "tune"]
    kids = [r for r in runs if r.data.tags.get("bireal.stage") == "tune-trial"]
    return client, parents, kids


@pytest.mark.e2e
def test_tiny_search_logs_children_and_writes_best(ray_local, demo_shards, pretrained, tmp_path):
    # a cell beside the grid: the no-shortcut ResNet, from a twin of its own that the stage pretrains
    extra = [{"arch": "binary_resnet18"}]
    params_file = tmp_path / "twin.yaml"
    params_file.write_text(
        f"train: {{shards: {demo_shards}, out: {pretrained}, width: 0.25, batch_size: 32, max_steps_per_epoch: 4}}\n"
        "pretrain: {phase_epochs: [1, 0, 1]}\n"
        f"tune: {{extra_cells: {json.dumps(extra)}, inits: [scratch, clip]}}\n"
    )
    twin_params = load_params(params_file)
    (folder,) = pretrain_other_twins(twin_params, twin_params.train("binarize"))
    twin = Path(folder) / "pretrain-clip.safetensors"
    assert read_header(twin)["model"]["name"] == "binary_resnet18"
    stamp = twin.stat().st_mtime_ns
    pretrain_other_twins(twin_params, twin_params.train("binarize"))
    assert twin.stat().st_mtime_ns == stamp  # there already: not trained again

    base = TrainConfig(shards=str(demo_shards), out=str(pretrained), width=0.25, batch_size=32)
    summary = run_tune(settings(tmp_path, extra_cells=extra), base, mlflow_cfg(tmp_path), group="g")
    assert summary["finished"] and len(summary["trials"]) == 5
    assert len(summary["table"]) == 5 and summary["table"][0]["mean"] >= summary["table"][-1]["mean"]
    assert {r["arch"] for r in summary["table"]} == {"bireal18", "binary_resnet18"}
    claims = {c["claim"] for c in summary["rankings"]}
    assert {"clip-init > scratch", "ApproxSign > STE", "shortcut per conv (Bi-Real) > per two convs (ResNet)"} <= claims
    files = write_outputs(summary, str(tmp_path / "tune"))
    best = json.loads(open(files["best"]).read())["config"]
    assert set(best) == {"activation", "weight_gradient", "init", "two_step", "optimizer", "lr"}
    assert (tmp_path / "tune" / "ablation.png").stat().st_size > 1000

    client, parents, kids = children(tmp_path)
    assert len(parents) == 1 and len(kids) == 5
    assert all(k.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for k in kids)
    assert all(k.info.status == "FINISHED" for k in kids), [k.info.status for k in kids]
    for k in kids:  # each trial's curve and config
        assert [m.step for m in client.get_metric_history(k.info.run_id, "val_top1")] == [0]
        assert k.data.params["activation"] in ("approx_sign", "ste_sign")

    # the final binarize stage consumes the pick through tuned_config
    params = tmp_path / "params.yaml"
    params.write_text(f"binarize:\n  tuned_config: {files['best']}\n")
    config = load_params(params).train("binarize")
    assert (config.activation, config.init) == (best["activation"], best["init"])


def _search_in_a_process(tmp_path, s: TuneSettings, base: TrainConfig, ray_local) -> subprocess.Popen:
    """``run_tune`` in a driver process of its own on the session's cluster, printing whether the
    search it returned had finished."""
    script = tmp_path / "search.py"
    script.write_text(
        "import sys\n"
        "from pipeline.env import apply_offline_defaults; apply_offline_defaults()\n"
        "from pipeline.adapters.ray_train import ensure_ray\n"
        "from pipeline.params import RayConfig\n"
        "ensure_ray(RayConfig())\n"  # joins $RAY_ADDRESS, the test session's cluster
        "from pipeline.train import TrainConfig\n"
        "from pipeline.params import TuneSettings, MlflowConfig\n"
        "from pipeline.adapters.ray_tune import run_tune\n"
        "from pipeline.adapters.tracking import resolve\n"
        f"summary = run_tune(TuneSettings(**{asdict(s)!r}), TrainConfig(**{asdict(base)!r}),\n"
        f"         resolve(MlflowConfig(**{asdict(mlflow_cfg(tmp_path))!r})), 'g')\n"
        "print('FINISHED', summary['finished'])\n"
    )
    log = open(tmp_path / "search.log", "w")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}  # the session's cluster
    return subprocess.Popen([sys.executable, str(script)], stdout=log, stderr=subprocess.STDOUT, env=env)


def _checkpointed_trials(tmp_path) -> set[str]:
    return {p.parent.name for p in (tmp_path / "ray_results").glob("*/_trial_*/checkpoint_*")}


def _interrupt_when(proc: subprocess.Popen, ready) -> None:
    """SIGINT, how a user stops a Tune driver, once ``ready()`` (the search's progress, not a clock)."""
    while proc.poll() is None and not ready():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)


@pytest.mark.e2e
def test_interrupted_search_resumes(ray_local, demo_shards, pretrained, tmp_path):
    """A search whose driver gets SIGINT after two trials is continued, not restarted."""
    base = TrainConfig(shards=str(demo_shards), out=str(pretrained), width=0.25, batch_size=32)
    s = settings(tmp_path, max_concurrent=1, asha=False, max_steps_per_epoch=10)
    proc = _search_in_a_process(tmp_path, s, base, ray_local)
    _interrupt_when(proc, lambda: len(_checkpointed_trials(tmp_path)) >= 2)
    assert 2 <= len(_checkpointed_trials(tmp_path)) < 4, (tmp_path / "search.log").read_text()[-3000:]
    log = (tmp_path / "search.log").read_text()
    assert "KeyboardInterrupt: tune: interrupted" in log and "FINISHED" not in log  # not a search to pick from

    resumed = run_tune(s, base, mlflow_cfg(tmp_path), group="g")
    assert resumed["finished"] and len(resumed["trials"]) == 4, resumed["trials"]
    _, parents, kids = children(tmp_path)
    assert len(parents) == 1 and len(kids) == 4  # no trial started twice
    assert all(k.info.status == "FINISHED" for k in kids), [k.info.status for k in kids]


@pytest.mark.e2e
def test_a_search_interrupted_with_every_trial_started_is_an_interrupt(ray_local, demo_shards, pretrained, tmp_path):
    """Both trials of a 4-epoch search have reported an epoch when the driver gets SIGINT. Tune's
    handler ends the search, fit() returns normally and the stopped trials are TERMINATED like
    finished ones, and each row has epochs: the search passed for finished, and best.json was
    picked from trials a third trained. It is an interrupt now (the CLI's line, exit 130)."""
    base = TrainConfig(shards=str(demo_shards), out=str(pretrained), width=0.25, batch_size=32)
    s = settings(tmp_path, activations=["approx_sign"], epochs=4, max_concurrent=2, asha=False, max_steps_per_epoch=6)
    proc = _search_in_a_process(tmp_path, s, base, ray_local)
    _interrupt_when(proc, lambda: len(_checkpointed_trials(tmp_path)) >= 2)
    log = (tmp_path / "search.log").read_text()
    assert len(list((tmp_path / "ray_results").glob("*/_trial_*/checkpoint_*"))) < 8, log[-3000:]  # not finished
    assert "KeyboardInterrupt: tune: interrupted" in log and "FINISHED" not in log, log[-3000:]
    resumed = run_tune(s, base, mlflow_cfg(tmp_path), group="g")
    assert resumed["finished"] and [t["epochs"] for t in resumed["trials"]] == [4, 4], resumed["trials"]


PAPER = {
    "arch": "bireal18",
    "activation": "approx_sign",
    "weight_gradient": "paper",
    "init": "clip",
    "two_step": False,
    "optimizer": "adam",
}


def test_summary_takes_the_lr_of_the_winning_cells_best_trial():
    """best.json's lr is the one the best trial of the winning cell ran with, not the cell's median."""
    from pipeline.tune import CELL_KEYS, summarize

    cell, other = PAPER, {**PAPER, "init": "scratch"}
    assert set(cell) == set(CELL_KEYS)
    trials = [
        {**cell, "lr": 1e-3, "seed": 0, "val_top1": 0.60},
        {**cell, "lr": 3e-3, "seed": 1, "val_top1": 0.70},
        {**cell, "lr": 9e-3, "seed": 2, "val_top1": 0.65},
        {**cell, "lr": 2e-2, "seed": 3, "val_top1": None},
        {**other, "lr": 5e-3, "seed": 0, "val_top1": 0.50},
    ]
    summary = summarize(trials, TuneSettings(), "bireal18")
    assert summary["best"] == {**{k: v for k, v in cell.items() if k != "arch"}, "lr": 3e-3}
    assert summary["table"][0]["seeds"] == 3 and summary["table"][0]["mean"] == pytest.approx(0.65)


def test_a_pick_on_the_reported_split_is_named(demo_shards, tmp_path):
    """best.json says what the pick was measured on; a pick among cells made on the split the final
    accuracy is reported on (holdout 0: the demo's test split, ImageNet's val) is called optimistic."""
    from pipeline.cli import report_tune
    from pipeline.tune import pick_split, pick_warning, summarize

    assert pick_split(TrainConfig(shards=str(demo_shards))) == "test"
    assert pick_split(TrainConfig(shards=str(demo_shards), holdout=300)) == "holdout"
    trials = [
        {**PAPER, "lr": 1e-3, "seed": 0, "val_top1": 0.6},
        {**PAPER, "init": "scratch", "lr": 1e-3, "seed": 0, "val_top1": 0.5},
    ]
    summary = {**summarize(trials, TuneSettings(), "bireal18"), "picked_on": "test", "enabled": True, "path": "p"}
    summary["files"] = write_outputs(summary, str(tmp_path))
    assert json.loads((tmp_path / "best.json").read_text())["picked_on"] == "test"
    report = report_tune(summary)
    assert "note: the pick was made on the test split, the one the final accuracy is reported on" in report
    assert pick_warning({**summary, "picked_on": "holdout"}) == ""
    assert pick_warning({**summary, "table": summary["table"][:1]}) == ""  # one cell: nothing was picked


def test_best_keeps_the_papers_cell_unless_beaten_beyond_the_seed_spread():
    from pipeline.tune import pick_cell

    def row(activation, mean, std, seeds=3):
        return {**PAPER, "activation": activation, "mean": mean, "std": std, "seeds": seeds}

    paper = row("approx_sign", 0.398, 0.003)
    assert pick_cell([row("ste_sign", 0.401, 0.008), paper], PAPER) is paper  # 0.3 points, spread 0.8
    winner = row("ste_sign", 0.45, 0.008)
    assert pick_cell([winner, paper], PAPER) is winner  # 5.2 points
    one_seed = row("ste_sign", 0.45, 0.0, seeds=1)
    assert pick_cell([one_seed, row("approx_sign", 0.40, 0.0, seeds=1)], PAPER)["activation"] == "approx_sign"
    no_paper = [row("ste_sign", 0.45, 0.01), row("identity_sign", 0.30, 0.01)]
    assert pick_cell(no_paper, PAPER) is no_paper[0]


def test_the_pick_stays_within_the_train_arch():
    """A no-shortcut cell that wins by far is reported, but binarize trains the train arch."""
    from pipeline.tune import summarize

    resnet = {**PAPER, "arch": "binary_resnet18"}
    trials = [
        {**c, "lr": 1e-3, "seed": s, "val_top1": v + s * 0.001}
        for c, v in ((PAPER, 0.5), (resnet, 0.9))
        for s in range(3)
    ]
    summary = summarize(trials, TuneSettings(), "bireal18")
    assert summary["table"][0]["arch"] == "binary_resnet18"
    assert summary["best"]["init"] == "clip" and "arch" not in summary["best"]


def test_cells_are_the_grid_then_the_papers_cell_with_one_setting_changed():
    from pipeline.tune import cells, expected_trials, twins_needed

    s = TuneSettings(
        activations=["approx_sign"],
        inits=["scratch", "relu_control", "clip"],
        extra_cells=[{"activation": "ste_sign"}, {"arch": "binary_resnet18"}, {"init": "clip"}, {"two_step": True}],
        seeds=[0, 1, 2],
        epochs=3,
    )
    got = cells(s, "bireal18")
    assert [c["init"] for c in got[:3]] == ["scratch", "relu_control", "clip"]
    assert got[3] == {**PAPER, "activation": "ste_sign"}
    assert got[4] == {**PAPER, "arch": "binary_resnet18"}
    assert got[5] == {**PAPER, "two_step": True}  # {init: clip} is the paper's cell again: no repeat
    assert len(got) == 6 and expected_trials(s, "bireal18") == 18
    assert twins_needed(s, "bireal18") == {("binary_resnet18", None): {"clip"}}
    grid = TuneSettings(archs=["bireal18", "binary_resnet18"], inits=["scratch", "relu"], activations=["ste_sign"])
    assert len(cells(grid, "bireal18")) == 4
    assert twins_needed(grid, "bireal18") == {("binary_resnet18", None): {"relu"}}  # scratch needs no twin


def ablation_design(**kw) -> TuneSettings:
    """The GPU ablation's shape (pipeline/configs/cifar10_ablation_gpu.yaml), small."""
    base = dict(
        activations=["approx_sign"],
        inits=["clip"],
        extra_cells=[
            {"activation": "ste_sign"},
            {"init": "relu_control"},
            {"arch": "binary_resnet18"},
            {"init": "scratch"},
        ],
        scratch_epochs=7,
        check_epochs=2,
        check_cells=[{}, {"activation": "ste_sign"}],
        twin_per_seed=True,
        paper_cell_bar=0.85,
        seeds=[0, 1],
        epochs=4,
    )
    return TuneSettings(**{**base, **kw})


def test_the_ablation_design_per_seed_twins_equal_compute_scratch_and_a_budget_check():
    """Each seed's trials read that seed's twins; scratch trains its twin's epochs on top (equal
    compute); the budget check's cells train again at check_epochs, as trials of their own."""
    from pipeline.tune import local_trials, trial_base, trial_config, trial_specs, twins_needed

    s = ablation_design()
    specs = trial_specs(s, "bireal18")
    assert len(specs) == 5 * 2 + 2 * 2  # 5 cells x 2 seeds, then 2 check cells x 2 seeds
    assert {(t["cell"]["init"], t["budget"], t["epochs"]) for t in specs} >= {("scratch", 4, 7), ("clip", 4, 4)}
    assert [(t["cell"]["activation"], t["seed"], t["epochs"]) for t in specs[10:]] == [
        ("approx_sign", 0, 2),
        ("approx_sign", 1, 2),
        ("ste_sign", 0, 2),
        ("ste_sign", 1, 2),
    ]
    assert all(t["twin_seed"] == t["seed"] for t in specs)
    assert twins_needed(s, "bireal18") == {
        ("bireal18", 0): {"clip", "relu_control"},
        ("bireal18", 1): {"clip", "relu_control"},
        ("binary_resnet18", 0): {"clip"},
        ("binary_resnet18", 1): {"clip"},
    }
    base = trial_base(s, TrainConfig(out="/ck", shards="/sh"))
    trials = local_trials(s, "bireal18")
    resnet = next(t for t in trials if t["cell"]["arch"] == "binary_resnet18" and t["seed"] == 1)
    scratch = next(t for t in trials if t["cell"]["init"] == "scratch")
    assert trial_config(base, resnet, "/t").init_from == "/ck/twins/binary_resnet18/seed1"
    assert trial_config(base, trials[0], "/t").init_from == "/ck/twins/bireal18/seed0"
    assert (trial_config(base, scratch, "/t").epochs, trial_config(base, trials[-1], "/t").epochs) == (7, 2)
    shared = ablation_design(twin_per_seed=False, check_epochs=0, check_cells=[], scratch_epochs=0)
    assert trial_config(base, local_trials(shared, "bireal18")[0], "/t").init_from == "/ck"  # the pretrain stage's
    assert {t["epochs"] for t in trial_specs(shared, "bireal18")} == {4}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"check_epochs": 0}, "the budget check needs both"),
        ({"check_cells": []}, "the budget check needs both"),
        ({"check_cells": [{"init": "scratch"}]}, "not scratch"),
        ({"check_cells": [{"activation": "sign"}]}, "check_cells\\[0\\].activation: 'sign' is not one of"),
        ({"scratch_epochs": 3}, "scratch_epochs=3 < epochs=4"),
        ({"paper_cell_bar": 85}, "paper_cell_bar=85"),
        ({"check_epochs": 4}, "another budget than epochs"),
        ({"check_cells": [{"two_step": True}], "check_epochs": 1}, "check_epochs >= 2"),
    ],
)
def test_the_ablation_design_is_checked(change, message):
    with pytest.raises(ValueError, match=message):
        ablation_design(**change)


def test_each_claim_is_judged_at_both_budgets():
    """The table and the claims read the search's budget; each claim the budget check also ran gets
    its interval at check_epochs and the verdict over both (contradicted only above the bar)."""
    from pipeline.tune import summarize

    s = ablation_design(seeds=[0, 1, 2])
    paper = dict(PAPER, init="clip")

    def rows(cell, budget, values):
        return [{**cell, "seed": i, "lr": 0.001, "budget": budget, "val_top1": v} for i, v in enumerate(values)]

    trials = [
        *rows(paper, 4, [0.870, 0.872, 0.868]),
        *rows({**paper, "activation": "ste_sign"}, 4, [0.880, 0.883, 0.877]),  # STE ahead at 4 epochs
        *rows({**paper, "init": "scratch"}, 4, [0.80, 0.81, 0.79]),
        *rows(paper, 2, [0.800, 0.805, 0.795]),
        *rows({**paper, "activation": "ste_sign"}, 2, [0.812, 0.815, 0.809]),  # and at 2
    ]
    summary = summarize(trials, s, "bireal18")
    assert {r["seeds"] for r in summary["table"]} == {3} and len(summary["table"]) == 3  # the 4-epoch cells
    assert summary["table"][0]["mean"] == pytest.approx(0.88)
    claims = {c["claim"]: c for c in summary["rankings"]}
    ste = claims["ApproxSign > STE"]
    assert ste["verdict"] == "opposite at this budget" and ste["at_check"]["epochs"] == 2
    assert ste["at_check"]["diff"] == pytest.approx(-0.012) and ste["at_check"]["verdict"] == "opposite at this budget"
    assert ste["verdict_both_budgets"] == "contradicted"  # both budgets against, the paper's cell over 0.85
    below = summarize(trials, ablation_design(seeds=[0, 1, 2], paper_cell_bar=0.9), "bireal18")
    assert {c["claim"]: c for c in below["rankings"]}["ApproxSign > STE"]["verdict_both_budgets"] == "inconclusive"
    assert (
        "scratch trained 7 epochs, the other cells 4" in claims["clip-init > scratch"]["note"]
        and "at_check" not in claims["clip-init > scratch"]
    )
    assert len(summary["trials"]) == len(trials)  # every trial is kept, both budgets


@pytest.mark.parametrize(
    "extra,message",
    [
        ([{"estimator": "ste_sign"}], r"extra_cells\[0\].estimator: unknown setting \(known: activation, arch"),
        ([{"weight_gradiant": "plain"}], r"unknown setting \(did you mean 'weight_gradient'\? known:"),
        ([{"activation": "sign"}], "'sign' is not one of"),
        ([{"two_step": "yes"}], "expected true/false"),
        ([{}], "a mapping of settings"),
        ([{"arch": "resnet1"}], "'resnet1' is not one of"),
    ],
)
def test_extra_cells_are_checked(extra, message):
    with pytest.raises(ValueError, match=message):
        TuneSettings(extra_cells=extra, epochs=2)


def test_two_step_cells_need_room_for_step_one():
    with pytest.raises(ValueError, match="epochs >= 2"):
        TuneSettings(two_step=[False, True], epochs=1)
    with pytest.raises(ValueError, match="epochs >= 2"):
        TuneSettings(extra_cells=[{"two_step": True}], epochs=1)
    assert TuneSettings(two_step=[False, True], epochs=2).epochs == 2


def test_claims_are_judged_by_paired_differences_with_an_interval():
    """Each claim: the paper's cell vs that cell with one setting changed, paired by seed; a 95%
    t-interval of the differences that excludes 0 decides, anything else is inconclusive."""
    from pipeline.tune import budget_verdict, compare, paper_rankings

    def by_seed(values):
        return dict(enumerate(values))

    up = compare(by_seed([0.70, 0.71, 0.72]), by_seed([0.60, 0.62, 0.61]))
    assert up["verdict"] == "reproduced" and up["diff"] == pytest.approx(0.10)
    # half-width = t(0.975, 2) * sd / sqrt(3), sd of the differences (0.10, 0.09, 0.11) = 0.01
    assert up["ci95"] == pytest.approx(4.302653 * 0.01 / 3**0.5, rel=1e-5)
    assert up["detectable"] > up["ci95"]  # 80% power needs more than the interval's half-width
    assert compare(by_seed([0.60, 0.61, 0.62]), by_seed([0.70, 0.71, 0.72]))["verdict"] == "opposite at this budget"
    # a steady 1-point gain in every seed is a result; the same means with the gain's sign flipping are not
    assert compare(by_seed([0.70, 0.72, 0.74]), by_seed([0.69, 0.71, 0.73]))["verdict"] == "reproduced"
    assert compare(by_seed([0.70, 0.72, 0.74]), by_seed([0.68, 0.73, 0.72]))["verdict"] == "inconclusive"
    assert compare({0: 0.70}, {0: 0.60})["verdict"].startswith("fewer than two paired seeds")
    assert compare({0: 0.7, 1: 0.7}, {2: 0.6, 3: 0.6})["pairs"] == 0  # different seeds do not pair
    against = {"verdict": "opposite at this budget"}
    assert budget_verdict(against, against, paper_top1=0.86, bar=0.85) == "contradicted"
    assert budget_verdict(against, against, paper_top1=0.65, bar=0.85) == "inconclusive"  # below the bar
    assert budget_verdict({"verdict": "inconclusive"}, against, 0.86, 0.85) == "inconclusive"  # one budget
    assert budget_verdict(against, {"verdict": "reproduced"}, 0.65, 0.85) == "reproduced"

    def trials(cell, values):
        return [{**cell, "lr": 1e-3, "seed": i, "val_top1": v} for i, v in enumerate(values)]

    runs = (
        trials(PAPER, [0.70, 0.71, 0.72])
        + trials({**PAPER, "init": "relu_control"}, [0.66, 0.67, 0.68])
        + trials({**PAPER, "init": "scratch"}, [0.72, 0.70, 0.715])
        + trials({**PAPER, "arch": "binary_resnet18"}, [0.50, 0.52, 0.54])
        + trials({**PAPER, "weight_gradient": "plain"}, [0.70, 0.71, 0.72])
    )
    claims = {c["claim"]: c for c in paper_rankings(runs, PAPER)}
    assert claims["clip-init > ReLU-init (equal epochs)"]["verdict"] == "reproduced"
    assert claims["clip-init > scratch"]["verdict"] == "inconclusive"
    assert claims["shortcut per conv (Bi-Real) > per two convs (ResNet)"]["right"] == pytest.approx(0.52)
    assert "not testable" in claims["magnitude-aware (paper) > plain"]["note"]
    # the best cell lacking one part is scratch-init here (0.7117): no interval excludes 0
    lacking = claims["all parts > the best cell lacking one"]
    assert lacking["right"] == pytest.approx(0.711667) and lacking["verdict"] == "inconclusive"
    assert "ApproxSign > STE" not in claims  # no STE cell in this search


def test_the_grid_without_ray_runs_each_trial_once_and_resumes(demo_shards, pretrained, tmp_path):
    """`bireal tune --no-ray` (the GPU machine's search): the same trials as the Ray search, each
    in a process of its own, a result per trial kept, a rerun training nothing again."""
    from pipeline.params import ConfigError
    from pipeline.tune import local_trials, run_local, trial_base, trial_name

    s = settings(tmp_path, activations=["approx_sign"], seeds=[0, 1], asha=False, out=str(tmp_path / "tune"))
    base = TrainConfig(shards=str(demo_shards), out=str(pretrained), width=0.25, batch_size=32)
    seen = []
    summary = run_local(s, base, on_trial=lambda row, done, total: seen.append((done, total)))
    assert summary["finished"] and sorted(seen) == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [(r["init"], r["seeds"]) for r in sorted(summary["table"], key=lambda r: r["init"])] == [
        ("clip", 2),
        ("scratch", 2),
    ]
    assert all(t["epochs"] == 1 and 0 <= t["val_top1"] <= 1 for t in summary["trials"])
    results = sorted(Path(summary["path"]).glob("*/result.json"))
    names = {trial_name(trial_base(s, base), t) for t in local_trials(s, "bireal18")}
    assert len(results) == 4 and {p.parent.name for p in results} == names
    stamps = [p.stat().st_mtime_ns for p in results]
    again = run_local(s, base, on_trial=lambda *a: pytest.fail("a finished trial ran again"))
    assert [p.stat().st_mtime_ns for p in results] == stamps
    assert sorted(t["val_top1"] for t in again["trials"]) == sorted(t["val_top1"] for t in summary["trials"])

    # another budget is another trial: a finished 1-epoch trial is not taken for a 2-epoch one
    longer = TuneSettings(**{**asdict(s), "epochs": 2})
    assert not names & {trial_name(trial_base(longer, base), t) for t in local_trials(longer, "bireal18")}

    with pytest.raises(ConfigError, match="lr_min = lr_max"):
        local_trials(settings(tmp_path, lr_min=1e-4, lr_max=1e-2), "bireal18")


@pytest.mark.e2e
def test_a_search_with_an_errored_trial_is_refused(ray_local, demo_shards, pretrained, tmp_path):
    """A trial that fails (its init needs a twin that was never trained) leaves the search
    unfinished: the tune stage raises and writes no best.json, so no partial pick moves on."""
    from pipeline.adapters.ray_tune import run_tune
    from pipeline.tune import require_finished

    base = TrainConfig(shards=str(demo_shards), out=str(pretrained), width=0.25, batch_size=32)
    s = settings(tmp_path, activations=["approx_sign"], inits=["clip", "relu_control"], asha=False)
    summary = run_tune(s, base, mlflow_cfg(tmp_path), group="g")
    assert not summary["finished"] and sorted(t["status"] for t in summary["trials"])[0] == "ERROR"
    with pytest.raises(RuntimeError, match="did not finish: 2 of 2 trials reported .*1 ERROR.*no best.json"):
        require_finished(summary, s, base.arch)
    assert not (tmp_path / "tune" / "best.json").exists()
