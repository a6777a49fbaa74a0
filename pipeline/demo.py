"""``bireal demo``: the cost table and one forward/backward pass of every registered model."""

from __future__ import annotations

import time

import torch

import bireal_core as bc

DEMO_WIDTH = 0.25  # Bi-Real nets at quarter width keep the demo to seconds on 2 cores
FLOAT_MODELS = ("resnet18", "resnet34")


def forward_backward(name: str, stem: str, batch: int = 2) -> dict:
    """One training-mode forward/backward on random images; what a smoke check needs to see."""
    size = 224 if stem == "imagenet" else 32
    width = 1.0 if name in FLOAT_MODELS else DEMO_WIDTH
    model = bc.create_model(name, num_classes=1000 if stem == "imagenet" else 10, stem=stem, width=width)
    x = torch.randn(batch, 3, size, size)
    start = time.perf_counter()
    logits = model(x)
    logits.logsumexp(dim=1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    return {
        "model": name,
        "stem": stem,
        "width": width,
        "input": f"{batch}x3x{size}x{size}",
        "logits": tuple(logits.shape),
        "finite": bool(torch.isfinite(logits).all()),
        "params_without_grad": len(no_grad),
        "seconds": time.perf_counter() - start,
    }


def run_demo() -> list[dict]:
    for arch in ("bireal18", "bireal34", "resnet18", "resnet34"):
        print(bc.summary(bc.create_model(arch)).table(), end="\n\n")
    rows = [forward_backward(name, stem) for name in bc.list_models() for stem in ("imagenet", "small")]
    print(format_rows(rows))
    return rows


def format_rows(rows: list[dict]) -> str:
    """The forward/backward rows as a table, its first column as wide as the longest model name."""
    name = max(len("model"), *(len(r["model"]) for r in rows)) + 2
    lines = [f"{'model':<{name}}{'stem':<10}{'width':>6}{'input':>16}{'logits':>12}{'finite':>8}{'no-grad':>9}{'s':>7}"]
    for r in rows:
        lines.append(
            f"{r['model']:<{name}}{r['stem']:<10}{r['width']:>6}{r['input']:>16}{str(r['logits']):>12}"
            f"{str(r['finite']):>8}{r['params_without_grad']:>9}{r['seconds']:>7.2f}"
        )
    return "\n".join(lines)
