"""``bireal evaluate``: the packed artifact on the evaluation split: accuracy, per-class accuracy,
confusion matrix, and agreement with the training-graph checkpoint it was exported from."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import storage
from .progress import image_bar


def evaluate_artifact(
    artifact: str,
    shards: str,
    checkpoint: str | None = None,
    batch_size: int = 128,
    workers: int = 1,
    device: str = "cpu",
    progress_bar: bool = False,
) -> dict:
    """Top-1, per-class top-1 and the confusion matrix of the packed ``artifact`` on the evaluation
    split of ``shards``; with ``checkpoint``, also its top-1 agreement with the training graph.
    ``device="cuda"`` runs the packed model through the CUDA kernels; ``progress_bar``: a bar in
    images (ImageNet's 50,000 take minutes on a CPU)."""
    import bireal_core as bc
    from cuda_ext.packed import header_digest, ieee_float32, load_packed

    from .data import eval_split_name, make_loader, read_manifest
    from .shard_read import check_sizes

    packed, header = load_packed(artifact, device=device)
    manifest = read_manifest(shards)
    float_model = bc.load_checkpoint(checkpoint)[0].eval().to(device) if checkpoint else None
    check_pairing(artifact, header, shards, manifest, checkpoint, float_model)
    split = eval_split_name(manifest, shards)
    check_sizes(manifest, shards, [split])
    n = len(manifest["classes"])
    confusion = torch.zeros(n, n, dtype=torch.int64)
    agree = seen = 0
    batches, _ = make_loader(
        shards, split, header["input"], batch_size, train=False, workers=workers, manifest=manifest, device=device
    )
    bar = image_bar(f"evaluate {split}", manifest["splits"][split]["count"], enabled=progress_bar)
    with torch.inference_mode():
        for images, labels in batches:
            images = images.to(device, non_blocking=True)
            pred = packed(images).argmax(1)
            if float_model is not None:  # the training graph in IEEE float32, as the packed model runs
                with ieee_float32():
                    agree += int((float_model(images).argmax(1) == pred).sum())
            pred = pred.cpu()  # the labels and the confusion matrix stay on the CPU
            confusion += torch.bincount(labels * n + pred, minlength=n * n).view(n, n)
            seen += len(labels)
            bar.update(len(labels))
    bar.close()
    if seen == 0:  # a top-1 of 0 over no images would pass for a result (and could be registered)
        raise ValueError(f"{shards}: the {split} split has no images to evaluate")
    correct = confusion.diag()
    per_class = (correct.float() / confusion.sum(1).clamp(min=1)).tolist()
    names = [c["name"] for c in manifest["classes"]]
    result = {
        "artifact_sha256": header["sha256"],  # what was scored: register checks it is what it registers
        "artifact_header_sha256": header_digest(header),  # with which input, classes, ...: the sha omits them
        "eval_data_sha256": eval_data_digest(manifest, split),  # on what: the registry compares like with like
        "split": split,
        "images": seen,
        "top1": float(correct.sum()) / seen,
        "per_class_top1": dict(zip(names, per_class)),
        "confusion": confusion.tolist(),
        "class_names": names,
    }
    if float_model is not None:
        result["float_agreement"] = agree / seen
        result["float_disagreements"] = seen - agree
    return result


def eval_data_digest(manifest: dict, split: str) -> str:
    """The sha256 of the evaluated images and labels: of the split's shards' names and sha256s,
    which cover every byte of them. Two top-1s compare only when this is the same."""
    import hashlib

    shards = [(r["name"], r["sha256"]) for r in manifest["splits"][split]["shards"]]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()


def check_pairing(artifact: str, header: dict, shards: str, manifest: dict, checkpoint, float_model) -> None:
    """The artifact's outputs index the shards' classes, and the checkpoint (for the agreement) is
    the net the artifact was exported from; else a ValueError naming both, before any image."""
    n = len(manifest["classes"])
    if len(header["class_names"]) != n:
        raise ValueError(
            f"{artifact}: a {len(header['class_names'])}-way model, but the shards at {shards} have {n} classes"
        )
    ours, theirs = header["class_names"], [c["name"] for c in manifest["classes"]]
    index = {name: j for j, name in enumerate(theirs)}
    # a name both sides have, at another index (the same classes reordered, or partly other ones);
    # wholly other names pass: an export without names says "0".."N-1" for the shards' wnids
    moved = [i for i, name in enumerate(ours) if index.get(name, i) != i]
    if moved:
        i = moved[0]
        raise ValueError(
            f"{artifact}: output {i} is class {ours[i]!r}, but class {i} of the shards at {shards} is {theirs[i]!r} "
            f"(theirs {index[ours[i]]}): classes in another order would be scored as errors (shard the data as the "
            "model was trained)"
        )
    if float_model is not None and float_model.model_spec != header["model"]:
        raise ValueError(
            f"{checkpoint}: model {float_model.model_spec}, but {artifact} was exported from {header['model']}"
        )


def write_outputs(result: dict, metrics_path: str, confusion_csv: str | None = None) -> None:
    keys = ("split", "images", "top1", "artifact_sha256", "artifact_header_sha256", "eval_data_sha256")
    metrics = {k: result[k] for k in keys if k in result}
    metrics.update({k: result[k] for k in ("float_agreement", "float_disagreements") if k in result})
    storage.write_text(metrics_path, json.dumps(metrics, indent=2))  # register reads it: whole or not at all
    if confusion_csv:
        write_confusion(result["class_names"], result["confusion"], confusion_csv)


def write_confusion(names: list[str], confusion: list[list[int]], path: str) -> None:
    """The nonzero cells as ``actual,predicted,count`` rows (what ``dvc plots`` draws), quoted as
    CSV: ImageNet's class names hold commas ("tench, Tinca tinca")."""
    import csv

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("actual", "predicted", "count"))
        for i, row in enumerate(confusion):
            writer.writerows((names[i], names[j], c) for j, c in enumerate(row) if c)
