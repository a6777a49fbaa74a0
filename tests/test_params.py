"""Params are read once into typed sections: every enumerated choice is a Literal that matches
what bireal_core accepts, a typo fails `bireal check-params` fast with file, key, value and the
allowed values, and checking imports none of torch, ray, mlflow, prefect or dvc."""

import dataclasses
import resource
import subprocess
import sys
import typing

import pytest
import yaml

from pipeline import params as P

HEAVY = ("torch", "ray", "mlflow", "prefect", "dvc", "cuda_ext")  # bireal_core.preprocess needs no torch


def test_choices_match_what_bireal_core_accepts():
    import bireal_core as bc
    from bireal_core.binarizers import SIGN_ACTIVATIONS, TWIN_ACTIVATIONS, WEIGHT_GRADIENTS

    assert set(typing.get_args(P.Arch)) == set(bc.list_models())
    assert typing.get_args(P.Activation) == SIGN_ACTIVATIONS
    assert typing.get_args(P.WeightGradient) == WEIGHT_GRADIENTS
    assert typing.get_args(P.Phase) == TWIN_ACTIVATIONS
    assert typing.get_args(P.Augment) == ("auto", *bc.AUGMENTS)
    assert P.PAD_VALUES == bc.layers.PAD_VALUES


@pytest.mark.parametrize(
    "section, key, bad, allowed, guess",
    [
        ("binarize", "activation", "aprox_sign", "approx_sign, ste_sign, identity_sign", "approx_sign"),
        ("train", "weight_gradient", "magnitude", "paper, official, plain", None),
        ("train", "arch", "bireal19", "bireal18, bireal34", "bireal18"),
        ("finetune", "stem", "cifar", "small, imagenet", None),
        ("train", "optimizer", "adamw", "adam, sgd", "adam"),
        ("pretrain", "precision", "fp16", "fp32, bf16", None),
        ("tune", "search", "bayes", "grid, random", None),
    ],
)
def test_typo_in_an_enumerated_param_is_named(tmp_path, section, key, bad, allowed, guess):
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {key}: {bad}\n")
    before = child_cpu_seconds()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "check-params", "--params", str(path)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert f"{path}:{section}.{key}: '{bad}' is not one of {allowed}" in done.stderr
    # a near miss is named; a value like none of them gets no guess
    assert (f"(did you mean '{guess}'?)" in done.stderr) if guess else ("did you mean" not in done.stderr)
    # before any expensive work: the CPU the check used (not its wall time, which a busy machine
    # stretches), against the minutes a stage takes
    cpu = child_cpu_seconds() - before
    assert cpu < 10, cpu


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "pretrain:\n  phase_epoch: [1, 1, 1]\n",
            "pretrain.phase_epoch: unknown key (did you mean 'phase_epochs'? known:",
        ),
        ("train:\n  weigth_decay: 0\n", "train.weigth_decay: unknown key (did you mean 'weight_decay'? known:"),
        ("train:\n  sparkle: 1\n", "train.sparkle: unknown key (known: activation, arch,"),
        ("trian:\n  epochs: 1\n", ":trian: unknown section (did you mean 'train'? known: binarize, data,"),
        ("ray:\n  num_worker: 4\n", "ray.num_worker: unknown key (did you mean 'num_workers'? known: address,"),
    ],
)
def test_an_unknown_name_in_a_params_file_is_named_with_its_near_miss(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(P.ConfigError) as e:
        P.load_params(path)
    assert str(e.value).startswith(str(path)) and message in str(e.value), str(e.value)


def child_cpu_seconds() -> float:
    """CPU seconds used by this process's finished children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.parametrize(
    "section, key, value, where",
    [
        ("tune", "activations", "[approx_sign, stesign]", "tune.activations[1]: 'stesign'"),
        ("tune", "inits", "[clip, imagenet]", "tune.inits[1]: 'imagenet'"),
        ("tune", "weight_gradients", "[paper, alpha]", "tune.weight_gradients[1]: 'alpha'"),
        ("pretrain", "phases", "[relu, clipp]", "pretrain.phases[1]: 'clipp'"),
    ],
)
def test_typo_inside_a_list_is_named_with_its_index(tmp_path, section, key, value, where):
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(P.ConfigError, match=r"is not one of") as e:
        P.load_params(path)
    assert where in str(e.value)


def test_checking_params_imports_nothing_heavy():
    code = (
        "import sys; from pipeline.cli import main; rc = main(['check-params', '--params', 'params.yaml']); "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})), rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[] 0"


def test_profiles_load_by_name_and_unknown_names_list_them():
    params = P.load_params("cifar10_bireal18")
    assert params.path == P.CONFIGS_DIR / "cifar10_bireal18.yaml"
    assert params.train("binarize").width == 0.5
    with pytest.raises(P.ConfigError, match="imagenet_bireal18_official"):
        P.load_params("imagenet_bireal18_oficial")


def test_code_built_configs_check_choices_too():
    with pytest.raises(ValueError, match="activation='aprox_sign' is not one of"):
        P.TrainConfig(activation="aprox_sign")
    with pytest.raises(ValueError, match="inits='imagenet'"):
        P.TuneSettings(inits=["clip", "imagenet"])


def test_tuned_pick_is_read_when_the_stage_asks(tmp_path):
    """The flow loads params before tune runs; binarize must still see tune's pick."""
    best = tmp_path / "best.json"
    path = tmp_path / "params.yaml"
    path.write_text(f"binarize:\n  tuned_config: {best}\n  activation: approx_sign\n")
    params = P.load_params(path)
    assert params.train("binarize").activation == "approx_sign"
    best.write_text('{"config": {"activation": "ste_sign", "init": "relu"}}')
    config = params.train("binarize")
    assert (config.activation, config.init) == ("ste_sign", "relu")
    assert params.train("binarize", {"activation": "identity_sign"}).activation == "identity_sign"  # CLI wins
    best.write_text('{"config": {"activation": "stee_sign"}}')
    with pytest.raises(P.ConfigError, match="binarize.activation: 'stee_sign' is not one of"):
        params.train("binarize")


def test_every_training_setting_says_whether_it_changes_the_math():
    """The resume rule (pipeline/adapters/ray_train.py) reads AFFECTS_MATH: a setting added to
    TrainConfig without an entry there fails here, not silently on a cluster."""
    import dataclasses

    from pipeline.params import AFFECTS_MATH, TrainConfig, math_settings

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(AFFECTS_MATH) == fields, (sorted(fields - set(AFFECTS_MATH)), sorted(set(AFFECTS_MATH) - fields))
    operational = {k for k, v in AFFECTS_MATH.items() if not v}
    assert {"loader_workers", "out", "shards", "kernels", "loader"} <= operational
    assert {"lr", "epochs", "precision", "batch_size", "seed"} <= set(math_settings(TrainConfig()))


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("storage", "stage_wait_s", 1800, "storage: stage_wait_s=1800: > 0 and below the process group's timeout"),
        ("storage", "stage_wait_s", 0, "storage: stage_wait_s=0.0: must be > 0"),
        ("mlflow", "system_metrics_s", -1, "mlflow: system_metrics_s=-1.0: must be >= 0"),
        ("train", "width", 0, "train: width=0.0: must be > 0"),
        ("train", "lr", ".inf", "train: lr=inf: must be > 0 (and finite)"),
        ("train", "momentum", 1, "train: momentum=1.0: must be in [0, 1)"),
        ("finetune", "pad_value", 0.5, "finetune: pad_value=0.5: one of 0, 1, -1 (what a binary conv's border"),
        ("train", "label_smoothing", -0.1, "train: label_smoothing=-0.1: must be in [0, 1)"),
        ("train", "loader_workers", -2, "train: loader_workers=-2: must be >= 0"),
        ("pretrain", "phase_epochs", "[2, -1, 1]", "pretrain: phase_epochs=[2, -1, 1]: each must be >= 0"),
        ("binarize", "distill_temperature", ".nan", "binarize: distill_temperature=nan: must be > 0 (and finite)"),
        ("train", "lr_milestones", "[0.75, 0.5]", "train: lr_milestones=[0.75, 0.5]: fractions of the stage's steps"),
        ("tune", "seeds", "[]", "tune: seeds=[]: the grid needs at least one value on every axis"),
        ("tune", "seeds", "[0, 1, 0]", "tune: seeds=[0, 1, 0]: 0 more than once: a seed's trials would train again"),
        ("tune", "max_concurrent", 0, "tune: max_concurrent=0: must be >= 1"),
        ("tune", "lr_max", 0.0001, "tune: lr_min=0.002 > lr_max=0.0001"),
        ("ray", "num_workers", 0, "ray: num_workers=0: must be >= 1"),
        ("shard", "jpeg_quality", 101, "shard: jpeg_quality=101: must be in [1, 100]"),
        ("registry", "min_top1", 1.5, "registry: min_top1=1.5: must be in [0, 1]"),
        ("data", "train_images", -5, "data: train_images=-5: must be >= 0"),
        ("recipe", "batch", "{binarize: 0}", "recipe: batch.binarize=0: must be >= 1"),
    ],
)
def test_numbers_out_of_range_are_named_with_their_range(tmp_path, section, key, value, message):
    """Every bounded number of every section: the file, the section, the key, the value and the
    range it must be in, before any work starts (NaN and infinity included)."""
    path = tmp_path / "params.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n")
    with pytest.raises(P.ConfigError) as e:
        P.load_params(path)
    assert f"{path}:{message}" in str(e.value)


def test_the_range_rules_read_as_written():
    assert [P.within(x, "in [0, 1)") for x in (0.0, 0.5, 1.0, -0.1, float("nan"))] == [True, True, False, False, False]
    assert [P.within(x, "in (0, 1]") for x in (0.0, 1.0)] == [False, True]
    assert [P.within(x, "> 0") for x in (0, 1e-9, float("inf"))] == [False, True, False]
    assert [P.within(x, ">= -1") for x in (-1, -2)] == [True, False]
    # every table names fields of its section with a rule of these forms, and every number of a
    # section has a rule but those unbounded on purpose (a new setting must say which it is)
    unbounded = {("TrainConfig", "pad_value")}  # any real pad value is a valid (if unusual) choice
    for cls in (*P.SECTIONS.values(), P.TrainConfig):
        hints = typing.get_type_hints(cls)
        numbers = {
            f.name
            for f in dataclasses.fields(cls)
            if {int, float} & {hints[f.name], *typing.get_args(hints[f.name])}
            and typing.get_origin(hints[f.name]) is not dict  # recipe: its own rules, per stage
        }
        ruled = set(getattr(cls, "RANGES", {}))
        assert numbers - ruled == {name for owner, name in unbounded if owner == cls.__name__}, cls.__name__
        fields = {f.name for f in dataclasses.fields(cls)}
        for name, rule in getattr(cls, "RANGES", {}).items():
            assert name in fields and (rule.startswith(("> ", ">= ")) or rule[3] in "[(" and rule[-1] in "])"), (
                cls.__name__,
                name,
                rule,
            )


def test_a_params_file_named_must_exist(tmp_path, monkeypatch, capsys):
    """A file named by --params or $BIREAL_PARAMS that is not there stops the command (a typo must
    not train with the defaults); only the implicit ./params.yaml may be absent."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BIREAL_PARAMS", raising=False)
    with pytest.raises(P.ConfigError, match="typo.yaml: params file not found"):
        P.load_params("typo.yaml")
    assert main(["check-params", "--params", "conf/typo.yml"]) == 2
    assert "bireal check-params: error: conf/typo.yml: params file not found" in capsys.readouterr().err
    monkeypatch.setenv("BIREAL_PARAMS", str(tmp_path / "gone.yaml"))
    with pytest.raises(P.ConfigError, match="gone.yaml: params file not found"):
        P.load_params()
    monkeypatch.setenv("BIREAL_PARAMS", "imagenet_bireal18_paper")  # a profile's name, as --params takes
    assert P.load_params().path == P.CONFIGS_DIR / "imagenet_bireal18_paper.yaml"
    monkeypatch.setenv("BIREAL_PARAMS", "imagenet_bireal18_papr")
    with pytest.raises(
        P.ConfigError,
        match=r"\$BIREAL_PARAMS=imagenet_bireal18_papr: neither a params file nor a profile "
        r"\(did you mean 'imagenet_bireal18_paper'\? profiles: cifar10_ablation, ",
    ):
        P.load_params()
    monkeypatch.delenv("BIREAL_PARAMS")
    assert P.load_params().raw == {}  # no ./params.yaml: the defaults
    assert main(["check-params"]) == 0
    assert "params.yaml (no such file: the defaults): OK" in capsys.readouterr().out


def test_yaml_as_dvc_reads_it_exponents_are_floats_and_a_key_given_twice_is_named(tmp_path, capsys):
    """`lr: 1e-3` was the string '1e-3' to PyYAML (YAML 1.1), so the file was refused, and a section
    or key given twice kept the last silently; DVC's parser (YAML 1.2) reads both as written."""
    from pipeline.cli import main

    (tmp_path / "sci.yaml").write_text("binarize:\n  lr: 1e-3\n  weight_decay: 5E-4\n")
    params = P.load_params(tmp_path / "sci.yaml", P.parse_overrides(["lr=2e-4"]))
    assert P.load_params(tmp_path / "sci.yaml").train("binarize").lr == 1e-3
    assert params.train("binarize").lr == 2e-4 and params.train("binarize").weight_decay == 5e-4
    (tmp_path / "two.yaml").write_text("binarize:\n  epochs: 3\npretrain:\n  lr: 0.1\nbinarize:\n  lr: 0.01\n")
    with pytest.raises(P.ConfigError, match=r"two.yaml: not valid YAML: key 'binarize' given twice \(lines 1 and 5\)"):
        P.load_params(tmp_path / "two.yaml")
    (tmp_path / "twice.yaml").write_text("binarize:\n  epochs: 3\n  epochs: 5\n")
    assert main(["check-params", "--params", str(tmp_path / "twice.yaml")]) == 2
    assert "key 'epochs' given twice (lines 2 and 3)" in capsys.readouterr().err
    # a merge key may still be overridden, as YAML means it to be
    (tmp_path / "merge.yaml").write_text(
        "binarize: &common\n  lr: 0.01\n  epochs: 3\nfinetune:\n  <<: *common\n  lr: 0.001\n"
    )
    merged = P.load_params(tmp_path / "merge.yaml")
    assert (merged.train("finetune").lr, merged.train("finetune").epochs) == (0.001, 3)
    assert P.parse_yaml("1e") == "1e" and P.parse_yaml("1.2.3") == "1.2.3" and P.parse_yaml("3") == 3


YAML11_SCALARS = [  # read differently by YAML 1.1 (PyYAML's default) and 1.2 (DVC's ruamel)
    *["010", "-017", "0o17", "09", "1:30", "190:20:30", "1:30.5", "+.5", "-.5", "+.5e-3"],
    *["yes", "No", "ON", "off", "y", "=", "0x1F", "0b11", "1_000", "1e-3", ".inf", "2026-12-08", "~", ""],
]


def test_plain_scalars_read_as_dvc_reads_them(tmp_path, capsys):
    """PyYAML read `epochs: 010` as 8 (octal), `1:30` as 90 and `on` as true where DVC (YAML 1.2)
    reads 10, '1:30' and 'on': a stage trained what `dvc params diff` did not show. Compared with
    DVC's own parser on the scalars that differ between the versions and on 3,000 drawn ones."""
    import math
    import random

    dvc_yaml = pytest.importorskip("dvc.utils.serialize", reason="DVC's parser comes with the pipeline extra")
    dvc_parse_yaml = dvc_yaml.parse_yaml

    from pipeline.cli import main

    def read(parse, scalar):
        try:
            value = parse(f"k: {scalar}\n")["k"]
        except Exception:  # noqa: BLE001 (either parser's refusal is one outcome)
            return "refused"
        return type(value).__name__, "nan" if value != value else repr(value)  # noqa: PLR0124 (nan)

    rng = random.Random(0)
    drawn = ["".join(rng.choices("0123456789_.eE+-xobO:anNyYt~", k=rng.randint(1, 6))) for _ in range(3000)]
    differ = [
        (s, ours, theirs)
        for s in YAML11_SCALARS + drawn
        if s != "="  # ruamel refuses YAML 1.1's '=' (the 'value' tag) where we read the word
        if (ours := read(P.parse_yaml, s)) != (theirs := read(lambda t: dvc_parse_yaml(t, "x"), s))
    ]
    assert differ == []
    assert [P.parse_yaml(s) for s in ("010", "1:30", "on", "0o17")] == [10, "1:30", "on", 15]
    assert math.isinf(P.parse_yaml("-.inf")) and P.parse_yaml("1e-3") == 0.001

    (tmp_path / "octal.yaml").write_text("binarize:\n  epochs: 010\n")
    assert P.load_params(tmp_path / "octal.yaml").train("binarize").epochs == 10
    assert P.parse_overrides(["epochs=010"]) == {"epochs": 10}
    (tmp_path / "yes.yaml").write_text("tune:\n  enabled: yes\n")
    assert main(["check-params", "--params", str(tmp_path / "yes.yaml")]) == 2
    assert "tune.enabled: expected true/false, got 'yes' (YAML 1.2, as DVC reads the file" in capsys.readouterr().err


def test_a_params_file_of_the_wrong_shape_is_named_not_a_traceback(tmp_path):
    """`train: 5` ended in TypeError's traceback, a binary file in a UnicodeDecodeError naming no
    file, and a folder read as 'params file not found'."""
    (tmp_path / "scalar.yaml").write_text("train: 5\n")
    with pytest.raises(P.ConfigError, match=r"scalar.yaml:train: expected a mapping of settings, got 5"):
        P.load_params(tmp_path / "scalar.yaml")
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(P.ConfigError, match=r"binary.yaml: not a text file in UTF-8 \(invalid start byte at byte 0\)"):
        P.load_params(tmp_path / "binary.yaml")
    (tmp_path / "conf").mkdir()
    with pytest.raises(P.ConfigError, match=r"conf: a folder, not a params file"):
        P.load_params(tmp_path / "conf")
    (tmp_path / "empty-section.yaml").write_text("train:\ntune:\n")
    assert P.load_params(tmp_path / "empty-section.yaml").train("binarize").width == P.TrainConfig().width


def test_mlflow_tracking_uri_from_mlflows_own_variable_where_the_file_is_silent(tmp_path, monkeypatch):
    """$MLFLOW_TRACKING_URI (how users point MLflow at a server) fills an empty mlflow.tracking_uri:
    before, the runs went to ./mlflow.db whatever it said. The file's value wins; the cluster rule
    sees the server; a submitted job gets it in its environment (its copy of the file has none)."""
    from pipeline.adapters.ray_jobs import job_env
    from pipeline.adapters.tracking import resolve

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert P.load_params().mlflow.tracking_uri == ""
    assert resolve(P.load_params().mlflow).tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    params = P.load_params()
    assert params.mlflow.tracking_uri == "http://mlflow.example:5000"
    assert resolve(params.mlflow).tracking_uri == "http://mlflow.example:5000"
    assert job_env(params)["MLFLOW_TRACKING_URI"] == "http://mlflow.example:5000"
    (tmp_path / "own.yaml").write_text("mlflow:\n  tracking_uri: http://own:5000\n")
    assert P.load_params("own.yaml").mlflow.tracking_uri == "http://own:5000"
    shared = "s3://bucket"
    cluster = {
        "ray": {"address": "auto", "storage_path": f"{shared}/ray"},
        "tune": {"storage_path": f"{shared}/tune"},
        "storage": {"artifacts": f"{shared}/artifacts"},
        "train": {"shards": f"{shared}/shards"},
    }
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    assert P.load_params("cluster.yaml").mlflow.tracking_uri == "http://mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(P.ConfigError, match="mlflow.tracking_uri must be a tracking server"):
        P.load_params("cluster.yaml")
    assert "MLFLOW_TRACKING_URI" not in job_env(P.load_params())


def test_set_overrides_are_named_as_given(tmp_path, monkeypatch, capsys):
    """`--set KEY=VALUE`: an unknown key or a wrong type is named as the flag (not as a key of the
    params file, which may not hold it); a range or cross-setting error says which --set it had."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BIREAL_PARAMS", raising=False)
    for flag, message in (
        ("epochs=abc", "--set epochs: expected an integer, got 'abc'"),
        ("epoch=3", "--set epoch: unknown training setting (did you mean 'epochs'? known: activation, arch,"),
        ("lrr=0.1", "--set lrr: unknown training setting (did you mean 'lr'? known: activation, arch,"),
        ("nothing_like_it=1", "--set nothing_like_it: unknown training setting (known: activation, arch,"),
        ("train.lr=0.1", "--set train.lr: name the training setting without its section (--set lr=...)"),
        ("binarize.epochs=3", "--set binarize.epochs: name the training setting without its section (--set epochs="),
        ("train.lrr=0.1", "--set train.lrr: unknown training setting (known: activation, arch,"),
        ("activation=sign", "--set activation: 'sign' is not one of approx_sign, ste_sign, identity_sign\n"),
        ("activation=aprox_sign", "identity_sign (did you mean 'approx_sign'?)"),
        ("epochs=-1", "params.yaml:pretrain: epochs=-1: must be >= 0 (with --set epochs=-1)"),
        ("phases=[relu]", "phase_epochs (3) differ in length (with --set phases=['relu'])"),
    ):
        assert main(["check-params", "--set", flag]) == 2, flag
        assert message in capsys.readouterr().err
    assert main(["check-params", "--set", "epochs=3"]) == 0


@pytest.mark.parametrize(
    "name, problem",
    [
        ("it's", "\"'\" in the name (a registered model's has none of /:'\"`@"),
        ("team/bireal", "'/' in the name"),
        ("bireal@v2", "'@' in the name"),
        ("", "a name (not empty)"),
        (" bireal", "no leading or trailing spaces"),
        ("bi\treal", "'\\t' in the name"),
    ],
)
def test_a_registered_model_name_the_registry_would_refuse_is_named_before_training(tmp_path, capsys, name, problem):
    """Registering is the pipeline's last stage: a model name MLflow refuses ('/', ':') or that breaks
    the registry's search filter (a quote) or a models:/NAME@ALIAS URI ('@') failed there, after the
    training. Now `check-params` (and every stage's load) and `register --name` refuse it first."""
    from pipeline.cli import main

    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"registry": {"model_name": name}}))
    assert main(["check-params", "--params", str(tmp_path / "p.yaml")]) == 2
    assert f"p.yaml:registry: model_name={name!r}: {problem}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as refused:  # argparse's usage error, before the artifact is opened
        main(["register", "--artifact", "absent", "--evaluation", "absent", "--shards", "absent", "--name", name])
    assert refused.value.code == 2
    assert f"argument --name: {name!r}: {problem}" in capsys.readouterr().err
    assert P.registered_name_problem("bireal18-imagenet_official.v2 (run 3)") == ""


def test_an_empty_mlflow_experiment_is_named():
    with pytest.raises(P.ConfigError, match=r"p.yaml:mlflow: experiment='': an MLflow experiment's name"):
        P.build(P.MlflowConfig, {"experiment": ""}, "p.yaml:mlflow")
