"""The core (bireal_core + cuda_ext + predict) works without the pipeline extra: `bireal export`
and `bireal predict` run with ray, mlflow, prefect, dvc, webdataset and scikit-learn never
imported, and the logged pyfunc asks only for what prediction needs."""

import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
from PIL import Image

import bireal_core as bc
from pipeline.cli import PIPELINE_EXTRA

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_ONLY = tuple(p for p in PIPELINE_EXTRA if p != "tqdm")  # torch uses tqdm when it happens to be there

# runs one CLI command, then prints which pipeline-only packages it loaded (bench's module too)
SCRIPT = f"""
import sys
from pipeline.cli import main
rc = main(sys.argv[1:])
import cuda_ext.benchmarks
print('loaded:', sorted({{m.split('.')[0] for m in sys.modules}} & set({PIPELINE_ONLY!r})))
sys.exit(rc)
"""


def run_core(*args):
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True)
    loaded = next((line for line in done.stdout.splitlines() if line.startswith("loaded:")), "")
    return done, loaded


def test_export_and_predict_need_no_pipeline_packages(tmp_path):
    model = bc.create_model("bireal18", num_classes=3, stem="small", width=0.25).eval()
    ckpt = bc.save_checkpoint(
        tmp_path / "ckpt.safetensors", model, stage="finetune", config={"class_names": ["cat", "dog", "fox"]}
    )
    art = tmp_path / "model.safetensors"
    done, loaded = run_core("export", "--checkpoint", str(ckpt), "--out", str(art))
    assert done.returncode == 0, done.stderr
    assert loaded == "loaded: []"
    image = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(image)
    done, loaded = run_core("predict", "--artifact", str(art), str(image))
    assert done.returncode == 0, done.stderr
    assert loaded == "loaded: []"
    assert any(label in done.stdout for label in ("cat", "dog", "fox"))


def test_the_check_sees_pipeline_packages(tmp_path):
    """A command of the pipeline loads them, so "loaded: []" above is a real finding."""
    done, loaded = run_core("shard", "--source", "demo", "--out", str(tmp_path / "s"), "--samples-per-shard", "900")
    assert done.returncode == 0, done.stderr
    assert "fsspec" in loaded and "sklearn" in loaded


def test_core_dependencies_leave_the_pipeline_stack_to_the_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"])
    assert not any(name in core for name in ("ray", "mlflow", "prefect", "dvc", "webdataset"))
    extra = " ".join(project["optional-dependencies"]["pipeline"])
    assert all(name in extra for name in ("ray", "mlflow", "prefect", "dvc", "webdataset"))


def test_a_pipeline_command_without_the_extra_says_what_to_install(tmp_path):
    """The core install meets `bireal train` with a clear error, not a traceback."""
    code = (
        "import sys\n"
        "class NoMlflow:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'mlflow':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoMlflow())\n"
        "from pipeline.cli import main\n"
        "sys.exit(main(['train', '--stage', 'pretrain', '--params', sys.argv[1]]))\n"
    )
    params = tmp_path / "params.yaml"
    params.write_text(f"train:\n  out: {tmp_path / 'ckpt'}\n")
    done = subprocess.run([sys.executable, "-c", code, str(params)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "needs mlflow, part of the pipeline extra: pip install 'bireal[pipeline]'" in done.stderr


def test_pyfunc_requirements_are_only_what_prediction_needs():
    from pipeline.adapters.registry import PYFUNC_REQUIREMENTS

    assert "bireal" in PYFUNC_REQUIREMENTS and "torch" in PYFUNC_REQUIREMENTS
    assert not any(r.startswith(("bireal[", "ray", "prefect", "dvc")) for r in PYFUNC_REQUIREMENTS)


def test_every_package_and_profile_is_packaged():
    """A non-editable install ships every subpackage and the params profiles."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = config["packages"]["find"]["include"]
    packages = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in ROOT.glob("*/**/__init__.py")}
    packages = {p for p in packages if p.split(".")[0] in ("bireal_core", "cuda_ext", "pipeline")}
    assert all(any(fnmatch(p, pattern) for pattern in include) for p in packages), packages
    assert "configs/*.yaml" in config["package-data"]["pipeline"]
