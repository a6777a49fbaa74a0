"""The stage table is the one description of the pipeline: dvc.yaml (read by DVC's own parser)
and the Prefect flow follow it; the CLI runs its stages."""

from pathlib import Path

import pytest

from pipeline.params import load_params
from pipeline.stages import STAGE_TABLE, resolve_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dvc_stages():
    """The root dvc.yaml as DVC resolves it (templating from params.yaml) -> {name: stage}; the
    cluster pipeline in deploy/dvc.yaml is tests/test_submit.py's."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        root = [s for s in repo.index.stages if Path(s.dvcfile.path).resolve() == ROOT / "dvc.yaml"]
        yield {stage.name: stage for stage in root}


def _relative(path) -> str:
    return str(Path(path).resolve().relative_to(ROOT)) if Path(path).is_absolute() else str(path)


def test_dvc_yaml_has_the_tables_stages_in_order(dvc_stages):
    assert list(dvc_stages) == [s.name for s in STAGE_TABLE]
    for spec in STAGE_TABLE:
        assert dvc_stages[spec.name].cmd == f"bireal run {spec.name}", spec.name


def test_dvc_yaml_deps_params_outs_match_the_table(dvc_stages):
    from dvc.dependency.param import ParamsDependency

    params = load_params(ROOT / "params.yaml")
    for spec in STAGE_TABLE:
        stage = dvc_stages[spec.name]
        files = sorted(_relative(d.def_path) for d in stage.deps if not isinstance(d, ParamsDependency))
        assert files == sorted(resolve_path(d, params) for d in spec.deps), spec.name
        dvc_params = sorted(p for d in stage.deps if isinstance(d, ParamsDependency) for p in d.params)
        assert dvc_params == sorted(spec.params), spec.name
        outs = sorted(_relative(o.def_path) for o in stage.outs)
        assert outs == sorted(resolve_path(o, params) for o in (*spec.outs, *spec.metrics, *spec.plots)), spec.name
        metrics = sorted(_relative(o.def_path) for o in stage.outs if o.metric)
        assert metrics == sorted(spec.metrics), spec.name
        plots = sorted(_relative(o.def_path) for o in stage.outs if o.plot)
        assert plots == sorted(resolve_path(o, params) for o in spec.plots), spec.name


def test_the_cluster_pipelines_params_are_what_each_job_reads():
    """deploy/dvc.yaml: each stage's DVC params are the table's params of the stages its job runs,
    from the run's params file; the shard manifest in the bucket is a dep of every stage that reads
    shards; the summaries are metrics (outside the outs, so DVC can read them)."""
    import yaml
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    run = yaml.safe_load((ROOT / "deploy" / "dvc-run.yaml").read_text())
    assert load_params(ROOT / run["params"]).train("pretrain").shards == run["shards"]  # submit --shards agrees
    table = {spec.name: spec for spec in STAGE_TABLE}
    with Repo(str(ROOT)) as repo:
        stages = {
            s.name: s for s in repo.index.stages if Path(s.dvcfile.path).resolve() == ROOT / "deploy" / "dvc.yaml"
        }
    assert list(stages) == ["pretrain", "tune", "binarize", "finetune", "package"]
    for name, stage in stages.items():
        ran = [w for w in stage.cmd.split() if w in table and f"--stage {w}" in stage.cmd]
        assert ran == ([name] if name != "package" else ["export", "evaluate", "register"]), stage.cmd
        (file,) = [d for d in stage.deps if isinstance(d, ParamsDependency)]
        assert _relative(file.def_path) == run["params"]
        assert sorted(file.params) == sorted({p for w in ran for p in table[w].params}), name
        external = [str(d.def_path) for d in stage.deps if str(d.def_path).startswith("s3://")]
        assert external == [f"{run['shards']}/manifest.json"], name
        metrics = sorted(_relative(o.def_path) for o in stage.outs if o.metric)
        assert metrics == sorted(f"{run['out']}/summaries/{name}/{w}.json" for w in ran), name
        assert f"--summaries {run['out']}/summaries/{name}" in " ".join(stage.cmd.split())


def test_resolve_path_names_a_missing_key(tmp_path):
    params_file = tmp_path / "p.yaml"
    params_file.write_text("train:\n  out: ck\n")
    params = load_params(params_file)
    assert resolve_path("${train.out}/a.safetensors", params) == "ck/a.safetensors"
    with pytest.raises(KeyError, match="tune.out is needed by the stage table"):
        resolve_path("${tune.out}/best.json", params)


def test_cli_run_choices_are_the_table():
    from pipeline.cli import build_parser

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    stage_arg = next(a for a in run._actions if a.dest == "stage")
    assert tuple(stage_arg.choices) == tuple(s.name for s in STAGE_TABLE)


def test_stages_given_out_of_order_or_twice_are_refused_before_any_runs(tmp_path, capsys, monkeypatch):
    """`bireal run evaluate export` would score the artifact export is about to replace: refused,
    with the order to give, before a stage runs (here none could: there are no shards); so are a
    stage given twice and the same list to `bireal submit`."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    for argv, message in (
        (["run", "evaluate", "export"], "evaluate export: export must run before evaluate"),
        (["run", "shard", "export", "pretrain"], "shard export pretrain: pretrain must run before export"),
        (["run", "export", "export"], "stage export given twice: each runs once"),
        (["submit", "--stage", "register", "--stage", "shard"], "register shard: shard must run before register"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {message}" in err, err
        assert "give them as" in err or "twice" in err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_an_unknown_stage_name_is_refused_with_the_stages_in_order_and_its_near_miss():
    """What the command line's choices cannot catch (a stage list built in code, a Prefect
    parameter): the name, the stages in their order, and the one it is a typo of."""
    from pipeline.params import ConfigError, load_params
    from pipeline.stages import check_stage_order, run_stage

    order = "shard, pretrain, tune, binarize, finetune, export, evaluate, register"
    with pytest.raises(ValueError, match=rf"stage 'pretrian' is not one of {order} \(did you mean 'pretrain'\?\)"):
        check_stage_order(["shard", "pretrian"])
    with pytest.raises(KeyError, match=rf"stage 'compress' is not one of {order}\"$"):
        run_stage("compress", load_params())
    with pytest.raises(ConfigError, match=r"training stage 'binarise' is not one of .* \(did you mean 'binarize'\?\)"):
        load_params().train("binarise")


def test_the_top_level_plots_draw_each_training_stages_curve():
    """dvc.yaml's top-level plots: a line per training stage, from the CSV its runner writes, of a
    column that CSV has."""
    import yaml

    from pipeline.summary import EPOCH_COLUMNS

    training = [s.name for s in STAGE_TABLE if s.uses_ray and s.name != "tune"]
    curves = {f"plots/epochs/{stage}.csv" for stage in training}
    for spec in STAGE_TABLE:
        assert (f"plots/epochs/{spec.name}.csv" in spec.outs) == (spec.name in training), spec.name
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    assert len(plots) == 2
    for plot in plots:
        ((title, definition),) = plot.items()
        assert definition["x"] == "epoch", title
        assert set(definition["y"]) == curves, title
        assert all(column in EPOCH_COLUMNS for column in definition["y"].values()), title


def test_write_epoch_curve_one_row_per_epoch(tmp_path):
    """The CSV behind the learning curves: the columns in order, a row per epoch of the history,
    a column an epoch lacks left empty and keys outside the columns left out."""
    import csv

    from pipeline.summary import EPOCH_COLUMNS, write_epoch_curve

    history = [
        {"epoch": 0, "segment": "relu", "train_loss": 2.25, "val_top1": 0.5, "weights_sha256": "ab"},
        {"epoch": 1, "segment": "clip", "train_loss": 1.5, "val_top1": 0.625, "test_top1": 0.6},
    ]
    path = tmp_path / "plots" / "epochs" / "pretrain.csv"
    write_epoch_curve(history, str(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == EPOCH_COLUMNS
    assert [r["epoch"] for r in rows] == ["0", "1"] and [r["segment"] for r in rows] == ["relu", "clip"]
    assert [float(r["val_top1"]) for r in rows] == [0.5, 0.625]
    assert rows[0]["test_top1"] == "" and rows[1]["test_top1"] == "0.6"
