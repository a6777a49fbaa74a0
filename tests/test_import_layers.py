"""The layering rule (docs/architecture.md): entry points -> stages -> adapters -> plain modules
-> params; bireal_core and cuda_ext never import the pipeline. Every import counts, including the
lazy ones inside functions, and there is no import circle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# top to bottom; a module may import its own layer or any layer below it
LAYERS = [
    ("entry points", {"pipeline.cli", "pipeline.flow", "pipeline.serve_flow"}),
    ("stages", {"pipeline.stages"}),
    (
        "adapters",
        {
            "pipeline.adapters.ray_train",
            "pipeline.adapters.ray_tune",
            "pipeline.adapters.tracking",
            "pipeline.adapters.registry",
            "pipeline.adapters.pyfunc_model",
            "pipeline.adapters.kuberay",
            "pipeline.adapters.ray_jobs",
            "pipeline.adapters.prefect_setup",
        },
    ),
    (
        "plain modules",
        {
            "pipeline.train",
            "pipeline.segments",
            "pipeline.data",
            "pipeline.decode",
            "pipeline.shard_read",
            "pipeline.lease",
            "pipeline.resident",
            "pipeline.shard",
            "pipeline.sources",
            "pipeline.progress",
            "pipeline.tune",
            "pipeline.evaluate",
            "pipeline.demo",
            "pipeline.data_bench",
            "pipeline.summary",
            "pipeline.profile_rules",
            "pipeline.plan",
            "pipeline.train_bench",
        },
    ),
    ("params", {"pipeline.params"}),
    ("base", {"pipeline.env", "pipeline.storage", "pipeline", "pipeline.adapters"}),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (module level and inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}  # `from . import x` imports x
    return found


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in (ROOT / package).rglob("*.py")}


def test_every_pipeline_module_has_a_layer():
    layered = set().union(*(mods for _, mods in LAYERS))
    assert set(modules("pipeline")) == layered


def test_no_import_points_upward():
    rank = {m: i for i, (_, mods) in enumerate(LAYERS) for m in mods}
    upward = []
    for name, path in modules("pipeline").items():
        for target in imports(path) & set(rank):
            if rank[target] < rank.get(name, len(LAYERS)):
                upward.append(f"{name} ({LAYERS[rank[name]][0]}) imports {target} ({LAYERS[rank[target]][0]})")
    assert not upward, upward


def test_core_packages_never_import_the_pipeline():
    for package in ("bireal_core", "cuda_ext"):
        for name, path in modules(package).items():
            bad = {t for t in imports(path) if t == "pipeline" or t.startswith("pipeline.")}
            assert not bad, f"{name} imports {bad}"
    for name, path in modules("bireal_core").items():
        assert not {t for t in imports(path) if t.startswith("cuda_ext")}, name


def test_no_import_circle():
    mods = modules("pipeline")
    graph = {name: {t for t in imports(path) if t in mods and t != name} for name, path in mods.items()}
    graph = {n: {t for t in ts if not n.startswith(t + ".")} for n, ts in graph.items()}  # a package's own parent
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The rule would be vacuous if the parser missed imports inside functions."""
    found = imports(ROOT / "pipeline" / "stages.py")
    assert {"pipeline.adapters.ray_train", "pipeline.train", "pipeline.params"} <= found


def test_the_shard_encoders_import_no_torch():
    """The shard stage's encoding processes (spawned, one per core) import ``pipeline.shard``, which
    converts images with ``bireal_core.preprocess``: bireal_core imports its torch modules on first
    use, so each process starts in a fraction of a second, not 4 s and 650 MB (the CUDA torch)."""
    import subprocess
    import sys

    code = "import sys, pipeline.shard; print(sorted({'torch', 'torchvision', 'numpy'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"


def test_bireal_core_exports_every_name_it_lists():
    import importlib

    import bireal_core

    assert sorted(bireal_core.__all__) == sorted(bireal_core._EXPORTS)
    for name, module in bireal_core._EXPORTS.items():
        assert getattr(bireal_core, name) is getattr(importlib.import_module(f"bireal_core.{module}"), name)
    assert "resnet18" in bireal_core.list_models()  # the model families register on first use
