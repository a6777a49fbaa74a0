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
        "weight_gradient": "paper",
        "two_step": False,
        "lr": 0.01,
        "epochs": 20,
        "lr_milestones": [0.5, 0.75],
    },
    "finetune": {**SHARED, "epochs": 1, "lr": 0.001, "optimizer": "sgd"},
}


@pytest.mark.parametrize(
    "profile,expected", [("imagenet_bireal18_official", OFFICIAL), ("imagenet_bireal18_paper", PAPER)]
)
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
    ):
        path = CONFIGS / f"{profile}.yaml"
        workers = yaml.safe_load(path.read_text())["ray"]["num_workers"]
        assert load_params(path).train(stage).batch_size * workers == global_batch, (profile, stage)


def test_official_recipe_has_no_pretrain_stage(tmp_path):
    from pipeline.train import train_loop

    config = load_params(CONFIGS / "imagenet_bireal18_official.yaml").train(
        "pretrain", {"shards": str(tmp_path), "out": str(tmp_path)}
    )
    with pytest.raises(ValueError, match="nothing to train"):
        train_loop(config)
