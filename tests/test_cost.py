import json
import subprocess
import sys
from pathlib import Path

import pytest

import bireal_core as bc
from pipeline.cli import main


@pytest.mark.parametrize("arch", sorted(bc.PAPER_TABLE))
def test_paper_table_within_one_percent(arch):
    result = bc.summary(bc.create_model(arch))
    paper = bc.PAPER_TABLE[arch]
    assert result.ops == pytest.approx(paper["ops"], rel=0.01)
    assert result.memory_mbit == pytest.approx(paper["memory_mbit"], rel=0.01)


def test_bireal18_breakdown_matches_independent_recount():
    r = bc.summary(bc.create_model("bireal18"))
    assert r.binary_macs == pytest.approx(1.676e9, rel=1e-3)
    stem = sum(l.macs for l in r.layers if l.name.startswith("stem"))
    downsample = sum(l.macs for l in r.layers if "downsample" in l.name)
    assert stem == pytest.approx(1.18e8, rel=1e-2)
    assert downsample == pytest.approx(1.93e7, rel=1e-2)
    assert sum(1 for l in r.layers if l.kind == "binary") == 16
    assert r.params == 11_689_512  # same parameter count as ResNet-18


def test_float_and_twin_have_no_binary_macs():
    twin = bc.create_twin("bireal18")
    r = bc.summary(twin)
    assert r.binary_macs == 0 and r.binary_params == 0


def test_cli_json(capsys):
    assert main(["cost", "--arch", "bireal34", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert {"ops", "memory_mbit", "binary_macs", "real_macs", "params"} <= d.keys()
    assert d["ops"] == pytest.approx(1.93e8, rel=0.01)


def test_cli_table_and_bad_arch(capsys):
    assert main(["cost", "--arch", "bireal18"]) == 0
    out = capsys.readouterr().out
    assert "33.51" in out and "1.64e+08" in out
    assert main(["cost", "--arch", "nonet"]) == 2
    assert capsys.readouterr().err.startswith("bireal cost: error: unknown model 'nonet'; registered: ")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--width", "0"], "argument --width: 0: must be > 0"),
        (["--width", "nan"], "argument --width: nan: must be > 0"),
        (["--num-classes", "0"], "argument --num-classes: 0: must be >= 1"),
        (["--input-size", "3"], "--input-size 3: too small for bireal18 with the imagenet stem"),
    ],
)
def test_cli_bad_numbers_are_named(capsys, args, message):
    try:
        rc = main(["cost", "--arch", "bireal18", *args])
    except SystemExit as e:  # argparse's own error (a flag's range)
        rc = e.code
    assert rc == 2 and capsys.readouterr().err.splitlines()[-1].startswith(f"bireal cost: error: {message}")


def test_cli_counts_any_size_without_allocating_it(capsys):
    """The CLI counts on the meta device: an input of 100,000 px a side (120 GB as a CPU tensor) and
    Bi-Real-152 at width 64 (238 G parameters) are counted, not allocated; the convs' MACs scale
    with the area exactly (100,000 = 32 x 3,125), the FC's do not."""

    def cost(*args):
        assert main(["cost", "--arch", "bireal18", "--stem", "small", "--num-classes", "10", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    small, huge = cost("--layers"), cost("--input-size", "100000", "--layers")
    for a, b in zip(small["layers"], huge["layers"]):
        assert b["macs"] == (a["macs"] * 3125**2 if a["name"] != "fc" else a["macs"]), a["name"]
    assert main(["cost", "--arch", "bireal152", "--width", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["binary_params"] > 2e11


def test_models_refuse_widths_and_class_counts_that_build_nothing():
    for kwargs, message in (
        ({"width": 0.0}, "width=0.0: the channel multiplier must be > 0"),
        ({"width": float("inf")}, "width=inf"),
        ({"num_classes": 0}, "num_classes=0: must be an integer >= 1"),
        ({"num_classes": 2.5}, "num_classes=2.5"),
    ):
        with pytest.raises(ValueError, match=message):
            bc.create_model("bireal18", **kwargs)


def test_entry_point_installed():
    """The console script that `pip install` made (next to this interpreter), not `python -m`."""
    script = Path(sys.executable).parent / "bireal"
    assert script.is_file(), f"{script}: not installed (pip install -e .)"
    args = ["cost", "--arch", "bireal18", "--stem", "small", "--width", "0.5", "--num-classes", "10", "--json"]
    out = subprocess.run([str(script), *args], check=True, capture_output=True, text=True).stdout
    assert json.loads(out)["input_size"] == 32
