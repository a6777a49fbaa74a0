"""Registry-driven model tests: every registered model, both stems."""

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import bireal_core as bc
from bireal_core import BinaryConv2d
from bireal_core.registry import register_model

FLOAT = {"resnet18", "resnet34"}
BIREAL = [n for n in bc.list_models() if n not in FLOAT]
STEM_INPUT = {"imagenet": (224, 1000), "small": (32, 10)}


def build(name, stem, **kwargs):
    size, classes = STEM_INPUT[stem]
    width = 1.0 if name in FLOAT else 0.25
    return bc.create_model(name, num_classes=classes, stem=stem, width=width, **kwargs), size, classes


def test_registry_lists_every_family():
    assert set(bc.list_models()) == {
        "bireal18",
        "bireal34",
        "bireal50",
        "bireal101",
        "bireal152",
        "binary_resnet18",
        "resnet18",
        "resnet34",
    }


def test_duplicate_registration_refused():
    with pytest.raises(ValueError, match="already registered"):

        @register_model
        def bireal18(**kwargs):  # noqa: F811
            return None


def test_unknown_model_named_in_error():
    with pytest.raises(KeyError, match="bireal19"):
        bc.create_model("bireal19")


@pytest.mark.parametrize("stem", ["imagenet", "small"])
@pytest.mark.parametrize("name", bc.list_models())
def test_forward_backward(name, stem):
    model, size, classes = build(name, stem)
    x = torch.randn(2, 3, size, size)
    logits = model(x)
    assert logits.shape == (2, classes)
    assert torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a (finite) gradient: {missing}"
    binary = [(n, m) for n, m in model.named_modules() if isinstance(m, bc.BinaryConv2d) and m.is_binary]
    assert binary or name.startswith("resnet"), f"{name} has no binary conv"
    dead = [n for n, m in binary if m.weight.grad.abs().sum() == 0]  # every binary conv (conv1/2/3 too)
    assert not dead, f"binary convs whose estimator passed no gradient: {dead}"


@pytest.mark.parametrize("name", BIREAL)
def test_binary_layer_counts(name):
    model, _, _ = build(name, "small")
    binary = [m for m in model.modules() if isinstance(m, BinaryConv2d) and m.is_binary]
    blocks = len(model.blocks)
    per_block = {"bireal18": 1, "bireal34": 1, "binary_resnet18": 2}.get(name, 3)
    first_real = 1 if per_block == 3 else 0  # bottleneck: stage 1's first 1x1 stays real
    assert len(binary) == blocks * per_block - first_real


@pytest.mark.parametrize("name", BIREAL)
def test_twin_initializes_every_tensor(name):
    twin = bc.create_twin(name, activation="clip", num_classes=10, stem="small", width=0.25)
    for m in twin.modules():
        if isinstance(m, BinaryConv2d):
            assert m.weight_binarizer is None and not m.is_binary
    model = bc.create_model(name, num_classes=10, stem="small", width=0.25)
    report = bc.init_from_twin(model, twin.state_dict())
    assert report.complete, str(report)
    assert len(report.copied) == len(model.state_dict())
    for k, v in twin.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_init_from_twin_reports_what_does_not_map():
    twin = bc.create_twin("bireal18", num_classes=10, stem="small", width=0.25)
    model = bc.create_model("bireal18", num_classes=7, stem="small", width=0.25)
    state = twin.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["blocks.0.bn.bias"]
    report = bc.init_from_twin(model, state)
    assert report.unexpected == ["extra.weight"]
    assert report.missing == ["blocks.0.bn.bias"]
    assert [m.split()[0] for m in report.mismatched] == ["fc.weight", "fc.bias"]


def test_twin_rejects_sign_activation():
    with pytest.raises(ValueError, match="twin activation"):
        bc.create_twin("bireal18", activation="approx_sign")


def test_two_step_switch():
    model = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25, binary_weights=False)
    convs = [m for m in model.modules() if isinstance(m, BinaryConv2d)]
    assert all(not m.is_binary and m.input_binarizer.binary for m in convs)  # step 1: activations only
    assert bc.set_binary_weights(model, True, "official") == len(convs)
    assert all(m.is_binary and m.weight_binarizer.gradient == "official" for m in convs)
    assert model.model_spec["kwargs"]["binary_weights"] is True


def test_bad_option_rejected():
    with pytest.raises(ValueError, match="activation"):
        bc.create_model("bireal18", activation="tanh")
    with pytest.raises(ValueError, match="stem"):
        bc.create_model("bireal18", stem="huge")
    with pytest.raises(ValueError, match="width"):
        bc.create_model("resnet18", width=0.5)


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def official_state_dict(name: str) -> list[tuple[str, int, str]]:
    """(key, element count, param|buffer) of the authors' PyTorch model, in registration order,
    without Bi-Real-50's `layers.0.down_conv1x1` (built, never used: ../shared/reference/README.md)."""
    rows = []
    for line in (REFERENCE / f"official_{name}_state_dict.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, kind = line.split("\t")
        if not key.startswith("layers.0.down_conv1x1"):
            rows.append((key, math.prod(json.loads(shape)), kind.strip()))
    return rows


@pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"the authors' key lists are not here ({REFERENCE})")
@pytest.mark.parametrize("name", ["bireal18", "bireal34", "bireal50"])
def test_state_dict_maps_one_to_one_onto_the_official_model(name):
    """Same layers in the same order, same sizes (their binary weights are stored flattened), same
    parameter/buffer split: what a loader of the authors' checkpoints needs, and a structural
    drift that a parameter count alone would miss."""
    model = bc.create_model(name)
    params = {n for n, _ in model.named_parameters()}
    ours = [(k, v.numel(), "param" if k in params else "buffer") for k, v in model.state_dict().items()]
    theirs = official_state_dict(name)
    assert len(ours) == len(theirs)
    mismatched = [(a, b) for a, b in zip(ours, theirs) if a[1:] != b[1:]]
    assert not mismatched, mismatched[:3]


@pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"the authors' key lists are not here ({REFERENCE})")
def test_import_official_maps_an_authors_checkpoint(tmp_path, capsys):
    """A checkpoint laid out as the authors' (their names and order, flattened binary weights,
    DataParallel's prefix, the unused Bi-Real-50 conv) lands position by position in our model."""
    from pipeline.cli import main

    theirs = {}
    for line in (REFERENCE / "official_bireal50_state_dict.tsv").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, _ = line.split("\t")
        shape = json.loads(shape)
        theirs[f"module.{key}"] = torch.tensor(7) if key.endswith("num_batches_tracked") else torch.randn(shape)
    torch.save({"epoch": 3, "state_dict": theirs}, tmp_path / "official.pth.tar")
    out = tmp_path / "imported.safetensors"
    args = ["import-official", "--arch", "bireal50", "--checkpoint", str(tmp_path / "official.pth.tar")]
    assert main([*args, "--out", str(out)]) == 0
    model, header = bc.load_checkpoint(out)
    used = [v for k, v in theirs.items() if "layers.0.down_conv1x1" not in k]
    for (name, ours), value in zip(model.state_dict().items(), used, strict=True):
        assert torch.equal(ours.flatten(), value.flatten().to(ours.dtype)), name
    assert header["model"]["kwargs"]["num_classes"] == 1000
    assert main([*args[:2], "bireal18", *args[3:], "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not the authors' bireal18" in capsys.readouterr().err


def test_import_official_names_a_file_of_ours(tmp_path, capsys):
    """torch.load reads a safetensors file too: a checkpoint of ours, given by mistake, would be
    mapped by position. It is named for what it is, and nothing is written."""
    from pipeline.cli import main

    ours = bc.save_checkpoint(tmp_path / "ours.safetensors", bc.create_model("bireal18"), stage="binarize")
    out = tmp_path / "imported.safetensors"
    assert main(["import-official", "--arch", "bireal18", "--checkpoint", str(ours), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ours.safetensors: a training checkpoint (bireal export packs it), not an authors' checkpoint" in err
    assert not out.exists()


TENSORS = {"a": torch.zeros(2)}
NOT_A_CHECKPOINT = r"not a PyTorch checkpoint \(torch\.load: \w+: [^\n]+\)"  # the reason: torch's, version to version


@pytest.mark.parametrize(
    "content, message",
    [
        # training scripts often save their argparse args or numpy scalars beside the state dict
        (
            lambda: {"state_dict": TENSORS, "args": argparse.Namespace(lr=0.1)},
            "type argparse.Namespace besides tensors",
        ),
        (lambda: {"state_dict": TENSORS, "best": np.float64(0.5)}, r"type numpy\S*scalar besides tensors"),
        (b"not a checkpoint\n", NOT_A_CHECKPOINT),
        (bytes(range(7, 256)), NOT_A_CHECKPOINT),
    ],
    ids=["argparse-args", "numpy-scalar", "text", "bytes"],
)
def test_import_official_says_in_one_line_why_a_file_does_not_load(tmp_path, capsys, content, message):
    """torch.load's weights-only refusal is a page of advice ending in `weights_only=False`, and a
    file that is no checkpoint gave `(105)`: now one line that names the object or the reason."""
    from pipeline.cli import main

    path = tmp_path / "theirs.pth.tar"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content(), path)
    out = tmp_path / "imported.safetensors"
    assert main(["import-official", "--arch", "bireal18", "--checkpoint", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists()


def test_binary_resnet18_is_bireal18_without_the_inner_shortcuts():
    """Same 16 binary convs with the same shapes, in 8 two-conv blocks with one shortcut each: the
    real-valued output of a block's first conv is not carried past its second."""
    plain = bc.create_model("binary_resnet18", num_classes=10, stem="small", width=0.25)
    bireal = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25)

    def binary_shapes(model):
        return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, BinaryConv2d) and m.is_binary]

    assert binary_shapes(plain) == binary_shapes(bireal) and len(binary_shapes(plain)) == 16
    assert len(plain.blocks) == 8 and len(bireal.blocks) == 16
    block = plain.blocks[1].eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        before = block(x)
        assert torch.allclose(block(x * 3.0) - 3.0 * x, before - x, atol=1e-5)  # x reaches the convs only as sign(x)
        block.bn1.weight.mul_(2.0)  # h -> 2h (eval BN: affine in h)
        block.bn1.bias.mul_(2.0)
        assert torch.equal(block(x), before)  # h is only seen through sign(h)
    assert len(bc.binary_conv_bn_pairs(plain)) == 16  # alpha folds for finetune


def test_bireal_demo_runs_every_model_and_prints_a_row_each(capsys):
    """`bireal demo`: the cost tables, then one forward/backward row per registered model and stem,
    its columns apart (binary_resnet18's name ran into its stem: 'binary_resnet18imagenet')."""
    from pipeline.cli import main

    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "OPs (binary/64 + real)" in out  # the cost tables
    table = out[out.index("model ") :].splitlines()
    rows = [line.split() for line in table[1:] if line.strip()]
    assert sorted((r[0], r[1]) for r in rows) == sorted(
        (name, stem) for name in bc.list_models() for stem in ("imagenet", "small")
    )
    for model, stem, _width, _input, *logits, finite, no_grad, _seconds in rows:
        assert finite == "True" and no_grad == "0", (model, stem)
        assert "".join(logits) == ("(2,1000)" if stem == "imagenet" else "(2,10)"), (model, stem)
