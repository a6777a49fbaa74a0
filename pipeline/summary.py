"""``bireal summary``: what the last pipeline run made, in a few lines (the end of ``make demo``):
the packed model's size and top-1 with its agreement to the training graph, its speed against the
training graph run in float, the registry version and alias, and where to look next."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .params import ARTIFACT, METRICS, Params


def time_forward(model, x, repeats: int = 20) -> float:
    """Median milliseconds of ``model(x)`` after a warm-up."""
    import statistics

    import torch

    times = []
    with torch.inference_mode():
        for i in range(repeats + 3):
            start = time.perf_counter()
            model(x)
            if i >= 3:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def speed_line(artifact: str, checkpoint: str) -> str:
    import torch

    import bireal_core as bc
    from cuda_ext.packed import load_packed

    packed, header = load_packed(artifact)
    float_model = bc.load_checkpoint(checkpoint)[0].eval()
    size = header["input"]["size"]
    x = torch.randn(1, 3, size, size)
    ours, base = time_forward(packed, x), time_forward(float_model, x)
    return f"packed {ours:.2f} ms vs training graph in float {base:.2f} ms ({base / ours:.1f}x), CPU, batch 1"


def pipeline_summary(params: Params) -> str:
    """The summary, from the files the stages wrote (a missing one is named, not guessed)."""
    from cuda_ext.packed import artifact_size

    checkpoint = str(Path(params.train("finetune").out) / "finetune.safetensors")
    metrics = Path(METRICS)
    for path in (ARTIFACT, checkpoint, metrics / "evaluate.json"):
        if not Path(path).is_file():
            return f"no pipeline run to summarize: {path} is missing (run `dvc repro` or `make demo`)"
    evaluation = json.loads((metrics / "evaluate.json").read_text())
    size = artifact_size(ARTIFACT)
    float_bytes = Path(checkpoint).stat().st_size
    rows = [
        (
            "packed model",
            f"{ARTIFACT}: {size['bytes']:,} bytes ({size['mbit']:.2f} Mbit), "
            f"{float_bytes / size['bytes']:.1f}x smaller than the float checkpoint",
        ),
        (
            "top-1",
            f"{evaluation['top1']:.4f} on {evaluation['images']} {evaluation['split']} images; "
            f"agreement with the training graph {evaluation.get('float_agreement', float('nan')):.2%}",
        ),
        ("speed", speed_line(ARTIFACT, checkpoint)),
    ]
    registry = metrics / "registry.json"
    if registry.is_file():
        r = json.loads(registry.read_text())
        alias = "champion" if r.get("champion") else "candidate"
        rows.append(("registry", f"{r['name']} version {r['version']} ({alias}): models:/{r['name']}@{alias}"))
    rows.append(
        (
            "look at",
            "dvc metrics show; plots/confusion.csv; mlflow ui --backend-store-uri "
            f"{params.mlflow.tracking_uri or 'sqlite:///' + str(Path.cwd() / 'mlflow.db')}",
        )
    )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
