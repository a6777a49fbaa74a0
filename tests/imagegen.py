"""Tiny generated datasets for the tests: image folders, the raw ILSVRC2012 layout, bad files, and
shards and artifacts rewritten to hold what the pipeline would not write."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# Class k is painted in colour COLORS[k], so a label can be checked from the pixels after sharding.
COLORS = [(220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 200, 20)]
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def colored_image(label: int, size=(48, 40), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.array(COLORS[label], dtype=np.float32)
    arr = np.clip(base + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def image_folder(root: Path, per_class=(6, 2), classes=3, size=(48, 40), eval_split="val") -> Path:
    for split, n in zip(("train", eval_split), per_class):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colored_image(c, size, seed=i * 10 + c).save(d / f"img{i}.jpg", quality=92)
    return root


def add_bad_files(train_class_dir: Path, label: int) -> dict[str, str]:
    """Every kind of awkward file real ImageNet has; -> {file name: expected outcome}."""
    good = colored_image(label, (40, 40), seed=99)
    d = train_class_dir
    good.convert("CMYK").save(d / "cmyk.jpg", quality=92)
    good.convert("L").save(d / "gray.jpg", quality=92)
    good.convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    arr16 = np.asarray(good.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(arr16).save(d / "sixteen.png")  # uint16 -> mode I;16
    good.save(d / "disguised.JPEG", format="PNG")  # PNG bytes, .JPEG name
    data = jpeg_bytes(good)
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "garbage.jpg").write_bytes(b"\x00not an image at all" * 20)
    # 700 x 1: 179,200 x 256 once a loader resizes its shorter side to 256, over 40 MP
    Image.fromarray(np.zeros((1, 700, 3), np.uint8)).save(d / "strip.png")
    return {
        "cmyk.jpg": "converted",
        "gray.jpg": "converted",
        "palette.png": "converted",
        "sixteen.png": "converted",
        "disguised.JPEG": "converted",
        "truncated.jpg": "quarantine",
        "empty.jpg": "quarantine",
        "garbage.jpg": "quarantine",
        "strip.png": "quarantine",
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def ilsvrc_tars(root: Path, train_per_class=5, val_per_class=2, size=(300, 260), labels: str = "loc") -> dict[str, int]:
    """The raw distribution in miniature: ILSVRC2012_img_train.tar (a tar of per-WNID tars),
    ILSVRC2012_img_val.tar (flat), and labels as LOC_val_solution.csv (``labels='loc'``) or the
    devkit's ground-truth file + meta.mat (``labels='devkit'``). -> {val image stem: label}."""
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "ILSVRC2012_img_train.tar", "w") as outer:
        for c, wnid in enumerate(WNIDS):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for i in range(train_per_class):
                    _add(inner, f"{wnid}_{i}.JPEG", jpeg_bytes(colored_image(c, size, seed=i)))
            _add(outer, f"{wnid}.tar", buf.getvalue())
    truth: dict[str, int] = {}
    n = 0
    with tarfile.open(root / "ILSVRC2012_img_val.tar", "w") as tar:
        for _ in range(val_per_class):
            for c in reversed(range(len(WNIDS))):  # val order is not class order
                n += 1
                stem = f"ILSVRC2012_val_{n:08d}"
                truth[stem] = c
                _add(tar, stem + ".JPEG", jpeg_bytes(colored_image(c, size, seed=100 + n)))
    if labels == "loc":
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            for stem, c in truth.items():
                w.writerow([stem, f"{WNIDS[c]} 10 10 100 100"])
    else:
        _devkit(root / "ILSVRC2012_devkit_t12" / "data", truth)
    return truth


def imagenet_extracted(root: Path, layout: str = "kaggle", train_per_class=3, val_per_class=2, size=(300, 260)):
    """ImageNet as people have it on disk, in miniature: the tars extracted (``train/<wnid>/``,
    a flat ``val/``, the devkit's labels; ``layout='devkit'``) or Kaggle's download
    (``ILSVRC/Data/CLS-LOC/{train/<wnid>, val, test}``, ``LOC_val_solution.csv`` and
    ``LOC_synset_mapping.txt`` beside; ``layout='kaggle'``). -> {val image stem: label}."""
    images = root / "ILSVRC" / "Data" / "CLS-LOC" if layout == "kaggle" else root
    for c, wnid in enumerate(WNIDS):
        (images / "train" / wnid).mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            colored_image(c, size, seed=i).save(images / "train" / wnid / f"{wnid}_{i}.JPEG", quality=92)
    (images / "val").mkdir()
    truth: dict[str, int] = {}
    for n in range(1, val_per_class * len(WNIDS) + 1):
        c = (len(WNIDS) - n) % len(WNIDS)  # val order is not class order
        truth[f"ILSVRC2012_val_{n:08d}"] = c
        colored_image(c, size, seed=100 + n).save(images / "val" / f"ILSVRC2012_val_{n:08d}.JPEG", quality=92)
    if layout == "kaggle":
        (images / "test").mkdir()  # unlabelled
        for n in range(1, 4):
            colored_image(0, size, seed=200 + n).save(images / "test" / f"ILSVRC2012_test_{n:08d}.JPEG", quality=92)
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["ImageId", "PredictionString"])
            for stem, c in truth.items():
                w.writerow([stem, f"{WNIDS[c]} 10 10 100 100 {WNIDS[c]} 20 20 90 90"])
        (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} fish {w[-3:]}, a fish\n" for w in WNIDS))
    else:
        _devkit(root / "ILSVRC2012_devkit_t12" / "data", truth)
    return truth


def _devkit(data_dir: Path, truth: dict[str, int]) -> None:
    """meta.mat (ILSVRC2012_IDs in a shuffled order, plus one non-leaf synset) + ground truth."""
    from scipy.io import savemat

    data_dir.mkdir(parents=True, exist_ok=True)
    ids = {wnid: 3 + k for k, wnid in enumerate(reversed(WNIDS))}  # IDs differ from sorted order
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    rows = [(ids[w], w, f"fish {w[-3:]}", 0) for w in WNIDS] + [(1001, "n00000001", "entity", 4)]
    savemat(str(data_dir / "meta.mat"), {"synsets": np.array(rows, dtype=dtype)})
    (data_dir / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "\n".join(str(ids[WNIDS[c]]) for c in truth.values()) + "\n"
    )


def many_images(root: Path, n: int, classes: int = 4, size=(80, 72)) -> Path:
    for i in range(n):
        d = root / "train" / f"c{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        colored_image(i % classes, size, seed=i).save(d / f"{i:05d}.jpg", quality=90)
    return root


def rewrite_first_shard(out: Path, split: str, changes: dict) -> tuple[str, list[dict]]:
    """Rewrite ``split``'s first shard under ``out`` with image i's bytes replaced by
    ``changes[i](its bytes)``, its manifest record updated: a shard that matches its manifest and
    holds what the shard stage would not have written (a damaged image, a PNG, a strip) ->
    (its URL, its samples as now written)."""
    import json

    import fsspec

    from pipeline.data import iter_shard, read_manifest
    from pipeline.shard import write_shard

    manifest = read_manifest(str(out))
    rec = manifest["splits"][split]["shards"][0]
    url = str(out / rec["name"])
    samples = list(iter_shard(url))
    for i, change in changes.items():
        samples[i]["jpg"] = change(samples[i]["jpg"])
    rows = [(s["__key__"], s["jpg"], int(s["cls"]), s["wnid"].decode()) for s in samples]
    rec.update(write_shard(fsspec.filesystem("file"), url, rows, False))
    (out / "manifest.json").write_text(json.dumps(manifest))
    return url, samples


def rewrite_artifact_header(path: Path, out: Path, edit) -> None:
    """``path``'s tensors (a packed artifact) written to ``out`` under the header ``edit(header)``
    returns: a dict, or a str written as it is (not JSON, say)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["bireal_packed"])
    edited = edit(header)
    text = edited if isinstance(edited, str) else json.dumps(edited)
    save_file(load_file(str(path)), str(out), metadata={"bireal_packed": text})
