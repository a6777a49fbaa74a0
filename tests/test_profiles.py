"""The shipped ImageNet recipes, value by value: a change to a profile has to change this file too."""

from pathlib import Path

import pytest

from pipeline.params import load_params

CONFIGS = Path(__file__).resolve().parents[1] / "pipeline" / "configs"

SHARED = {"arch": "bireal18", "stem": "imagenet", "width": 1.0, "precision": "fp32", "weight_clip": 0.0}

# stage -> the values the recipe fixes (the rest are the pipeline's defaults)
OFFICIAL = {
    "binarize": {
        **SHARED,
        "batch_size": 128,
        "augment": "imagenet",
        "pca_lighting": True,
        "optimizer": "adam",
        "lr": 0.001,
        "weight_decay": 0.0,
        "label_smoothing": 0.1,
        "init": "scratch",
        "latent_init": "official",
        "activation": "approx_sign",
        "weight_gradient": "official",
        "two_step": False,
        "epochs": 256,
    },
    "finetune": {**SHARED, "epochs": 0},
    "pretrain": {"phase_epochs": [0, 0, 0]},
}
PAPER = {
    "pretrain": {
        **SHARED,
        "phases": ["relu", "leaky_clip", "clip"],
        "phase_epochs": [90, 10, 10],
        "phase_lr_scale": [1.0, 0.1, 0.1],
        "batch_size": 64,
        "augment": "imagenet",
        "optimizer": "sgd",
        "momentum": 0.9,
        "lr": 0.1,
        "weight_decay": 0.0001,
        "lr_milestones": [0.3333, 0.6667],
        "label_smoothing": 0.0,
        "pca_lighting": False,
    },
    "binarize": {
        **SHARED,
        "batch_size": 32,
        "augment": "caffe",
        "pca_lighting": False,
        "optimizer": "sgd",
        "momentum": 0.9,
        "weight_decay": 0.0,
        "label_smoothing": 0.0,
        "init": "clip",
        "activation": "approx_sign",
        "weight_gradient": "caffe",  # the released Caffe code's rule at its lr (docs/science.md)
        "two_step": False,
        "lr": 0.01,
        "epochs": 20,
        "lr_milestones": [0.5, 0.75],
    },
    "finetune": {**SHARED, "epochs": 1, "lr": 0.001, "optimizer": "sgd"},
}


def _with_arch(recipe: dict, arch: str) -> dict:
    return {stage: ({**values, "arch": arch} if "arch" in values else values) for stage, values in recipe.items()}


# Bi-Real-34: the authors' README (Caffe section): 40 epochs at batch 1024 from lr 0.08, x0.1 at
# the 20th and 30th epoch; here at batch 128 with the linearly scaled 0.01
PAPER34 = {
    **_with_arch(PAPER, "bireal34"),
    "binarize": {**PAPER["binarize"], "arch": "bireal34", "epochs": 40, "lr": 0.01, "lr_milestones": [0.5, 0.75]},
}
# Bi-Real-50: the authors' BiReal_50 train.py: batch 256 (64 x 4 GPUs), Adam 5e-4
OFFICIAL50 = {
    **_with_arch(OFFICIAL, "bireal50"),
    "binarize": {**OFFICIAL["binarize"], "arch": "bireal50", "batch_size": 64, "lr": 0.0005},
}
# Bi-Real-152: Bi-Real-50's recipe at 32 x 8 GPUs, two-step with half the epochs per step (choices)
BIREAL152 = {
    **_with_arch(OFFICIAL, "bireal152"),
    "binarize": {
        **OFFICIAL["binarize"],
        "arch": "bireal152",
        "batch_size": 32,
        "lr": 0.0005,
        "two_step": True,
        "step1_epochs": 128,
        "latent_init": "default",  # ReActNet step 1: nn.Conv2d's default init
        "step1_weight_decay": 1e-5,  # ReActNet step 1 (step 2: 0)
        "weight_decay": 0.0,
    },
}
PROFILES = {
    "imagenet_bireal18_official": OFFICIAL,
    "imagenet_bireal18_paper": PAPER,
    "imagenet_bireal34_paper": PAPER34,
    "imagenet_bireal50_official": OFFICIAL50,
    "imagenet_bireal152": BIREAL152,
}


@pytest.mark.parametrize("profile,expected", list(PROFILES.items()))
def test_recipe_values_are_pinned(profile, expected):
    path = CONFIGS / f"{profile}.yaml"
    for stage, values in expected.items():
        config = load_params(path).train(stage)
        got = {k: getattr(config, k) for k in values}
        assert got == values, (profile, stage)


def test_global_batch_of_each_recipe():
    """Per-worker batch x ray.num_workers gives the batch the recipe's lr is quoted at."""
    import yaml

    for profile, stage, global_batch in (
        ("imagenet_bireal18_official", "binarize", 512),
        ("imagenet_bireal18_paper", "binarize", 128),
        ("imagenet_bireal18_paper", "pretrain", 256),
        ("imagenet_bireal34_paper", "binarize", 128),
        ("imagenet_bireal34_paper", "pretrain", 256),
        ("imagenet_bireal50_official", "binarize", 256),
        ("imagenet_bireal152", "binarize", 256),
    ):
        path = CONFIGS / f"{profile}.yaml"
        workers = yaml.safe_load(path.read_text())["ray"]["num_workers"]
        assert load_params(path).train(stage).batch_size * workers == global_batch, (profile, stage)


def test_the_recipes_quote_their_published_batch_and_lr():
    """The recipe section holds the numbers as published: Bi-Real-34's README quotes 1024 / 0.08."""
    quoted = {
        "imagenet_bireal18_official": ({"binarize": 512}, {"binarize": 0.001}),
        "imagenet_bireal18_paper": ({"pretrain": 256, "binarize": 128}, {"pretrain": 0.1, "binarize": 0.01}),
        "imagenet_bireal34_paper": ({"pretrain": 256, "binarize": 1024}, {"pretrain": 0.1, "binarize": 0.08}),
        "imagenet_bireal50_official": ({"binarize": 256}, {"binarize": 0.0005}),
    }
    for profile, (batch, lr) in quoted.items():
        recipe = load_params(CONFIGS / f"{profile}.yaml").recipe
        assert (recipe.batch, recipe.lr, recipe.lr_scaling) == (batch, lr, "linear"), profile


@pytest.mark.parametrize(
    "profile,resize",
    [
        ("imagenet_bireal18_official", 0),  # RandomResizedCrop in the binary stage: full-size shards
        ("imagenet_bireal50_official", 0),
        ("imagenet_bireal152", 0),
        ("imagenet_bireal18_paper", 256),  # the Caffe data layer's resize 256 + random 224 crop
        ("imagenet_bireal34_paper", 256),
    ],
)
def test_random_resized_crop_profiles_shard_at_full_size(profile, resize):
    params = load_params(CONFIGS / f"{profile}.yaml")
    assert params.shard.resize == resize
    crops = params.train("binarize").augment == "imagenet"
    assert crops == (resize == 0 or resize >= 512), "a RandomResizedCrop stage needs >= 512-px (or full) shards"


def test_shards_smaller_than_a_stage_reads_are_named(tmp_path):
    """The rule the shipped profiles keep (above), for any profile: shards no smaller than a stage's
    evaluation resize, and >= 512 px where a binary stage trains on RandomResizedCrop."""
    from pipeline.profile_rules import reproduction_problems

    official_256 = load_params(_variant(tmp_path, "imagenet_bireal18_official", shard={"resize": 256}))
    (problem,) = reproduction_problems(official_256)
    assert "shard.resize is 256, and binarize trains on RandomResizedCrop" in problem
    assert "~72 px of a shard" in problem and ">= 512" in problem
    official_512 = load_params(_variant(tmp_path, "imagenet_bireal18_official", shard={"resize": 512}))
    assert reproduction_problems(official_512) == []
    paper_128 = load_params(_variant(tmp_path, "imagenet_bireal18_paper", shard={"resize": 128}))
    problems = reproduction_problems(paper_128)
    assert [p.split("resizes")[0].split("px shorter side ")[1] for p in problems] == [
        "pretrain (stem imagenet) ",
        "binarize (stem imagenet) ",
        "finetune (stem imagenet) ",
    ]
    assert all("shard.resize is 128, below the 256-px" in p for p in problems)
    cifar_16 = load_params(_variant(tmp_path, "cifar10_bireal18", shard={"resize": 16}))
    assert len(reproduction_problems(cifar_16)) == 3  # below the small stem's 32 too


def test_official_recipe_has_no_pretrain_stage(tmp_path):
    from pipeline.train import train_loop

    config = load_params(CONFIGS / "imagenet_bireal18_official.yaml").train(
        "pretrain", {"shards": str(tmp_path), "out": str(tmp_path)}
    )
    with pytest.raises(ValueError, match="nothing to train"):
        train_loop(config)


# ---------------------------------------------------------------------------- the cluster rules


@pytest.mark.parametrize("profile", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_profile_keeps_the_rules(profile):
    from pipeline.profile_rules import reproduction_problems

    assert reproduction_problems(load_params(CONFIGS / f"{profile}.yaml")) == []


def _variant(tmp_path, profile: str, **sections) -> Path:
    """The profile with some keys of some sections replaced."""
    import yaml

    raw = yaml.safe_load((CONFIGS / f"{profile}.yaml").read_text())
    for section, values in sections.items():
        raw[section] = {**(raw.get(section) or {}), **values}
    path = tmp_path / f"{profile}-variant.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_another_global_batch_needs_the_linearly_scaled_lr(tmp_path):
    from pipeline.profile_rules import expected_lr, reproduction_problems

    # 8 workers instead of 4: global batch 1024, the recipe's 1e-3 at 512 becomes 2e-3
    wrong = load_params(_variant(tmp_path, "imagenet_bireal18_official", ray={"num_workers": 8}))
    (problem,) = reproduction_problems(wrong)
    assert "binarize.lr is 0.001" in problem and "global batch of 1024" in problem and "gives 0.002" in problem
    scaled = load_params(_variant(tmp_path, "imagenet_bireal18_official", ray={"num_workers": 8}, train={"lr": 0.002}))
    assert reproduction_problems(scaled) == []
    assert expected_lr(scaled, "binarize", gpus=64) == pytest.approx(0.001 * 128 * 64 / 512)
    # without linear scaling the batch itself must stay
    fixed = load_params(
        _variant(tmp_path, "imagenet_bireal18_official", ray={"num_workers": 8}, recipe={"lr_scaling": "none"})
    )
    (problem,) = reproduction_problems(fixed)
    assert "is not the recipe's 512" in problem and "lr_scaling is none" in problem


def test_too_few_shards_per_data_reader_is_named_with_the_fix(tmp_path):
    from pipeline.profile_rules import reproduction_problems

    params = load_params(_variant(tmp_path, "imagenet_bireal50_official", shard={"samples_per_shard": 20000}))
    problems = reproduction_problems(params)
    # 65 shards for 4 workers x 8 loader workers = 32 readers (128 needed), in the one trained stage
    assert len(problems) == 1 and "65 shards" in problems[0] and "32 data readers" in problems[0]
    assert "set shard.samples_per_shard to 10010 or fewer" in problems[0]  # ceil(1281167 / 128)
    # the same profile on 64 GPUs needs smaller shards still; Bi-Real-152's are sized for it
    assert reproduction_problems(load_params(CONFIGS / "imagenet_bireal50_official.yaml"), gpus=64)
    on_64 = reproduction_problems(load_params(CONFIGS / "imagenet_bireal152.yaml"), gpus=64)
    assert len(on_64) == 1 and "binarize.lr" in on_64[0]  # only the lr, which `bireal plan` scales


def test_a_global_batch_that_leaves_an_epoch_without_steps_is_named(tmp_path):
    """On 100,000 GPUs Bi-Real-18's batch of 32 per GPU is 3.2 million images a step, more than
    ImageNet: `bireal plan` printed a 1-step epoch at lr 250 and no warning; and its shard advice
    was 'samples_per_shard 1 or fewer', which no shard size satisfies."""
    from pipeline.plan import plan
    from pipeline.profile_rules import MIN_STEPS_PER_EPOCH, reproduction_problems

    params = load_params(CONFIGS / "imagenet_bireal18_paper.yaml")
    assert reproduction_problems(params) == []
    problems = reproduction_problems(params, gpus=100_000)
    steps = [p for p in problems if "full step(s)" in p]
    assert len(steps) == 3  # pretrain, binarize, finetune
    assert "binarize: a global batch of 3200000" in steps[1] and "makes 0 full step(s) of 1281167 images" in steps[1]
    assert f"must be at most {1281167 // MIN_STEPS_PER_EPOCH}" in steps[1]
    shards = [p for p in problems if "shards (" in p]
    assert shards and all("cannot make 3200000 shards: lower ray.num_workers" in p for p in shards)
    assert "full step(s)" in " ".join(plan(params, gpus=100_000)["warnings"])
    # the boundary: exactly MIN_STEPS_PER_EPOCH full steps pass
    gpus = 1281167 // (MIN_STEPS_PER_EPOCH * 64)  # pretrain's 64 a GPU is the largest batch
    assert not [p for p in reproduction_problems(params, gpus=gpus) if "full step(s)" in p]
    assert [p for p in reproduction_problems(params, gpus=gpus + 1) if "pretrain: a global batch" in p]


def test_cpu_tune_trials_on_a_gpu_profile_are_refused(tmp_path):
    from pipeline.profile_rules import reproduction_problems

    params = load_params(_variant(tmp_path, "imagenet_bireal18_paper", tune={"enabled": True}))
    (problem,) = reproduction_problems(params)
    assert "tune.gpus_per_trial" in problem
    ok = load_params(_variant(tmp_path, "imagenet_bireal18_paper", tune={"enabled": True, "gpus_per_trial": 1}))
    assert reproduction_problems(ok) == []


def test_a_finetune_net_other_than_binarizes_is_named(tmp_path):
    """Finetune retrains binarize's net: another width in its section is a problem check-params
    (and bireal submit) names before any training, not a finetune that trains something else."""
    from pipeline.profile_rules import reproduction_problems

    params = load_params(_variant(tmp_path, "cifar10_bireal18", finetune={"width": 1.0}))
    (problem,) = reproduction_problems(params)
    assert "finetune.width is 1.0, binarize.width 0.5: finetune retrains the binarize stage's net" in problem
    same = load_params(_variant(tmp_path, "cifar10_bireal18", finetune={"width": 0.5}))
    assert reproduction_problems(same) == []


def test_check_params_prints_each_problem_and_fails(tmp_path, capsys):
    from pipeline.cli import main

    bad = _variant(tmp_path, "imagenet_bireal18_official", ray={"num_workers": 8}, tune={"enabled": True})
    assert main(["check-params", "--params", str(bad)]) == 1
    out = capsys.readouterr().out
    assert out.count("FAIL ") == 2 and "2 problems" in out


def test_a_recipe_names_stages_only(tmp_path):
    from pipeline.params import ConfigError

    with pytest.raises(ConfigError, match="'binarise' is not a stage"):
        load_params(_variant(tmp_path, "imagenet_bireal18_official", recipe={"batch": {"binarise": 512}}))


def test_the_converged_cifar10_recipe():
    """The accuracy run's recipe (docs/science.md): a ReLU twin trained like a float ResNet-18 on
    CIFAR-10, gated clip phases, 200 Adam binary epochs; all 50,000 images, the test set reported."""
    params = load_params(CONFIGS / "cifar10_bireal18_converged.yaml")
    twin, binary = params.train("pretrain"), params.train("binarize")
    assert (twin.optimizer, twin.nesterov, twin.momentum, twin.lr, twin.weight_decay, twin.schedule) == (
        "sgd",
        True,
        0.9,
        0.1,
        0.0005,
        "cosine",
    )
    assert twin.phase_epochs == [60, 10, 10] and (twin.clip_gate, twin.clip_gate_max_epochs) == (0.02, 30)
    assert (binary.optimizer, binary.lr, binary.schedule, binary.weight_decay, binary.epochs) == (
        "adam",
        0.002,
        "linear",
        0.0,
        200,
    )
    assert (binary.init, binary.activation, binary.width, binary.batch_size) == ("clip", "approx_sign", 1.0, 256)
    assert (binary.loader, binary.precision, binary.holdout, binary.distill_from) == ("resident", "bf16", 0, "")


def test_the_gpu_ablation_design():
    """The ablation that can decide the paper's claims (docs/science.md): width 0.5, per-seed twins
    behind their gates, 20 binary epochs per cell, scratch at equal compute, a 10-epoch check."""
    params = load_params(CONFIGS / "cifar10_ablation_gpu.yaml")
    twin, binary, tune = params.train("pretrain"), params.train("binarize"), params.tune
    assert (twin.optimizer, twin.nesterov, twin.lr, twin.weight_decay, twin.schedule) == (
        "sgd",
        True,
        0.1,
        5e-4,
        "cosine",
    )
    assert (twin.phase_epochs, twin.relu_control, twin.relu_floor, twin.clip_gate) == ([15, 3, 3], True, 0.9, 0.05)
    assert (binary.optimizer, binary.lr, binary.schedule, binary.weight_decay) == ("adam", 0.001, "linear", 0.0)
    assert (binary.width, binary.batch_size, binary.loader, binary.precision) == (0.5, 256, "resident", "bf16")
    assert (tune.epochs, tune.check_epochs, tune.twin_per_seed, tune.seeds) == (20, 10, True, [0, 1, 2])
    assert tune.scratch_epochs == sum(twin.phase_epochs) + tune.epochs == 41  # equal compute
    cells = [{k: v for k, v in c.items()} for c in tune.extra_cells]
    assert cells == [
        {"activation": "ste_sign"},
        {"init": "relu_control"},
        {"arch": "binary_resnet18"},
        {"init": "scratch"},
    ]
    assert not any("weight_gradient" in c or "two_step" in c for c in cells)  # degenerate under Adam; not ECCV's
    assert tune.check_cells == [{}, {"activation": "ste_sign"}, {"arch": "binary_resnet18"}]
    assert tune.paper_cell_bar == 0.85 and (tune.lr_min, tune.lr_max) == (0.001, 0.001)
