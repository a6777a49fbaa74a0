"""Where images come from: an image-folder tree, the raw ILSVRC2012 tars, or the embedded demo set.

Each scanner returns a ``Source``: the class list and, per split, the samples in a canonical
(sorted) order, each with a reference its bytes can be read from without extracting anything,
plus a cheap fingerprint (names, sizes, mtimes; never the image bytes).
"""

from __future__ import annotations

import csv
import hashlib
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
EVAL_SPLITS = ("val", "test")
ILSVRC_TRAIN_TAR = "ILSVRC2012_img_train.tar"
ILSVRC_VAL_TAR = "ILSVRC2012_img_val.tar"
KAGGLE_IMAGES = Path("ILSVRC/Data/CLS-LOC")  # Kaggle's ImageNet: train/<wnid>/, val/ and test/ flat


class SourceError(ValueError):
    """Missing, empty or malformed input (the message names the path)."""


@dataclass(frozen=True)
class Ref:
    """Where a sample's bytes are: a file, or ``size`` bytes at ``offset`` inside a tar."""

    path: str
    offset: int = -1
    size: int = -1

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            if self.offset < 0:
                return f.read()
            f.seek(self.offset)
            return f.read(self.size)

    def describe(self, name: str = "") -> str:
        return self.path if self.offset < 0 else f"{self.path}:{name or self.offset}"


@dataclass(frozen=True)
class Sample:
    label: int
    ref: Ref
    name: str  # the file's name in the source, for the manifest and error messages


@dataclass
class Source:
    kind: str
    path: str
    classes: list[dict]  # [{"index", "wnid", "name"}]
    splits: dict[str, list[Sample]] = field(default_factory=dict)
    fingerprint: str = ""
    ignored: list[str] = field(default_factory=list)  # left out: not images by their suffix, or unlabelled


def _fingerprint(entries) -> str:
    h = hashlib.sha256()
    for e in entries:
        h.update(repr(e).encode())
    return h.hexdigest()


def _stat_entry(path: Path, root: Path) -> tuple:
    st = path.stat()
    return (str(path.relative_to(root)), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------- image folder


def first_few(names: list[str], k: int = 5) -> str:
    """``a, b, c`` or ``a, ..., e and 7 more``: a list for a message line."""
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def _visible(name: str) -> bool:
    """Hidden entries (``.ipynb_checkpoints``, macOS's ``._x.jpg``) are never classes or images."""
    return not name.startswith(".")


def _class_folder_files(class_dir: Path) -> list[Path]:
    """Every visible file under ``class_dir``, sub-folders included (as torchvision's
    ``ImageFolder`` walks them), in sorted relative-path order."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink back up the tree: walked once
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if _visible(d))
        found += [Path(dirpath) / f for f in filenames if _visible(f)]
    return sorted(found, key=lambda f: f.relative_to(class_dir).parts)


def scan_image_folder(root: str | os.PathLike, labels_root: str | os.PathLike | None = None) -> Source:
    """``root/train/<class>/**`` plus ``root/val/<class>/**`` or ``root/test/<class>/**``.

    An evaluation folder may also be flat, as ImageNet's validation images are once extracted
    (``val/ILSVRC2012_val_00000001.JPEG``, ...): those are labelled by ImageNet's own files in
    ``labels_root`` (default ``root``; ``ImageLabels``), and a flat folder none of whose images
    they label (Kaggle's ``test/``) is left out. Files that are not images by their suffix, or
    that lie in ``train/`` outside a class folder, are left out and listed in ``Source.ignored``;
    a train class folder without a single image is an error (a class the net could never learn)."""
    root = Path(root)
    if not (root / "train").is_dir():
        raise SourceError(f"{root}: no train/ folder (expected train/<class>/* and val/ or test/)")
    class_names = sorted(d.name for d in (root / "train").iterdir() if d.is_dir() and _visible(d.name))
    if not class_names:
        raise SourceError(f"{root / 'train'}: no class folders")
    index = {c: i for i, c in enumerate(class_names)}
    labels = ImageLabels(Path(labels_root) if labels_root is not None else root)
    source = Source(
        "folder", str(root), [{"index": i, "wnid": c, "name": labels.name(c)} for i, c in enumerate(class_names)]
    )
    stats = [_stat_entry(f, labels.root) for f in labels.files]
    for split in ("train", *EVAL_SPLITS):
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        samples, without_images = [], []
        for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir() and _visible(d.name)):
            if class_dir.name not in index:
                raise SourceError(f"{class_dir}: class {class_dir.name!r} is not in train/")
            found = 0
            for f in _class_folder_files(class_dir):
                name = f"{split}/{f.relative_to(split_dir).as_posix()}"
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    source.ignored.append(name)
                    continue
                samples.append(Sample(index[class_dir.name], Ref(str(f)), name))
                stats.append(_stat_entry(f, root))
                found += 1
            if found == 0:
                without_images.append(class_dir.name)
        flat = sorted(f for f in split_dir.iterdir() if f.is_file() and _visible(f.name))
        if split == "train":
            source.ignored += [f"train/{f.name}" for f in flat]  # no class folder, so no label
        elif flat:
            labelled = _flat_samples(split_dir, flat, index, labels, source)
            samples += labelled
            stats += [_stat_entry(Path(s.ref.path), root) for s in labelled]
        if split == "train" and samples and without_images:
            raise SourceError(
                f"{split_dir}: {len(without_images)} class folder(s) without images ({first_few(without_images)}); "
                f"every class needs training images (allowed suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        if samples or split == "train" or not flat:
            source.splits[split] = samples
    if not source.splits.get("train"):
        raise SourceError(f"{root / 'train'}: no images found")
    source.fingerprint = _fingerprint(stats)
    return source


def _flat_samples(split_dir: Path, flat: list[Path], index: dict, labels: ImageLabels, source: Source) -> list[Sample]:
    """The images lying directly in an evaluation folder, labelled by ImageNet's label files."""
    images = [f for f in flat if f.suffix.lower() in IMAGE_SUFFIXES]
    source.ignored += [f"{split_dir.name}/{f.name}" for f in flat if f.suffix.lower() not in IMAGE_SUFFIXES]
    if not images:
        return []
    by_stem = labels.val_labels(split_dir, len(images))
    unlabelled = [f.name for f in images if f.stem not in by_stem]
    if len(unlabelled) == len(images):  # a folder the label files do not cover (Kaggle's test/)
        source.ignored.append(f"{split_dir.name}/*: {len(images)} images without labels")
        return []
    if unlabelled:
        raise SourceError(
            f"{split_dir}: no label for {first_few(unlabelled)} in {labels.describe()} "
            f"({len(images) - len(unlabelled)} of its {len(images)} images have one)"
        )
    samples = []
    for f in images:
        wnid = by_stem[f.stem]
        if wnid not in index:
            raise SourceError(f"{split_dir / f.name} is labelled {wnid}, a class not in train/")
        samples.append(Sample(index[wnid], Ref(str(f)), f"{split_dir.name}/{f.name}"))
    return samples


class ImageLabels:
    """ImageNet's label files in ``root``, looked up by name, never by walking the tree (a
    folder of 1.28 M images): ``LOC_val_solution.csv`` and ``LOC_synset_mapping.txt`` (Kaggle's
    download), or the devkit's ``ILSVRC2012_validation_ground_truth.txt`` with ``meta.mat``
    (in ``root`` or ``root/ILSVRC2012_devkit_t12/data``)."""

    def __init__(self, root: Path):
        self.root = root
        places = (root, root / "ILSVRC2012_devkit_t12" / "data")

        def find(name: str) -> Path | None:
            return next((d / name for d in places if (d / name).is_file()), None)

        self.loc, self.mapping = find("LOC_val_solution.csv"), find("LOC_synset_mapping.txt")
        self.ground_truth, self.meta = find("ILSVRC2012_validation_ground_truth.txt"), find("meta.mat")
        self.files = [f for f in (self.loc, self.mapping, self.ground_truth, self.meta) if f is not None]
        self._names: dict[str, str] | None = None
        self._val: dict[str, str] | None = None

    def name(self, wnid: str) -> str:
        """A class's name from the devkit or the synset mapping, else its folder name."""
        if self._names is None:
            self._names = {}
            if self.meta is not None:
                self._names.update({w: words for w, words in read_devkit_synsets(self.meta).values()})
            if self.mapping is not None:
                for line in self.mapping.read_text().splitlines():
                    wnid_, _, words = line.strip().partition(" ")
                    self._names.setdefault(wnid_, words.strip() or wnid_)
        return self._names.get(wnid, wnid)

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.files) or f"{self.root} (no label files)"

    def val_labels(self, split_dir: Path, n_images: int) -> dict[str, str]:
        """Image stem -> WNID for ImageNet's validation images; a SourceError naming what to add
        when there are no label files."""
        if not (self.loc or self.ground_truth):
            raise SourceError(
                f"{split_dir}: {n_images} images directly inside, not in <class>/ folders: put them in class "
                f"folders, or put ImageNet's labels in {self.root} (LOC_val_solution.csv, or "
                "ILSVRC2012_validation_ground_truth.txt with the devkit's meta.mat)"
            )
        if self._val is None:  # read once: val/ and Kaggle's test/ both look their images up
            self._val = read_val_labels(self.loc, self.ground_truth, self.meta)
        return self._val


# ---------------------------------------------------------------------------- ILSVRC2012 tars


def _find(root: Path, pattern: str) -> Path | None:
    hits = sorted(root.rglob(pattern))
    return hits[0] if hits else None


def read_devkit_synsets(meta_mat: Path) -> dict[int, tuple[str, str]]:
    """ILSVRC2012_ID -> (WNID, words) for the 1000 leaf classes of the devkit's meta.mat."""
    from scipy.io import loadmat

    synsets = loadmat(str(meta_mat), squeeze_me=True)["synsets"]
    out = {}
    for s in synsets:
        ident, wnid, words = int(s["ILSVRC2012_ID"]), str(s["WNID"]), str(s["words"])
        if int(s["num_children"]) == 0:
            out[ident] = (wnid, words)
    return out


def _val_labels(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """val image stem -> WNID, and WNID -> class name where the devkit gives one."""
    loc = _find(root, "LOC_val_solution.csv")
    gt = _find(root, "ILSVRC2012_validation_ground_truth.txt")
    meta = _find(root, "meta.mat")
    names = {w: words for w, words in read_devkit_synsets(meta).values()} if meta is not None else {}
    if loc is None and gt is None:
        raise SourceError(
            f"{root}: validation labels not found (LOC_val_solution.csv, or "
            f"ILSVRC2012_validation_ground_truth.txt with the devkit's meta.mat)"
        )
    return read_val_labels(loc, gt, meta), names


def read_val_labels(loc: Path | None, gt: Path | None, meta: Path | None) -> dict[str, str]:
    """Validation image stem -> WNID from Kaggle's LOC_val_solution.csv (first box's WNID), else
    from the devkit's ground truth (ILSVRC2012_IDs in image order) mapped through meta.mat."""
    if loc is not None:
        return read_loc_solution(loc)
    if meta is None:
        raise SourceError(f"{gt}: the devkit's meta.mat is needed to map ILSVRC2012_IDs to WNIDs")
    synsets = read_devkit_synsets(meta)
    labels = {}
    numbered = ((n, line.strip()) for n, line in enumerate(gt.read_text().splitlines(), 1) if line.strip())
    for image, (line_no, text) in enumerate(numbered, 1):  # the i-th ID labels the i-th image
        ident = int(text) if text.isdigit() else None
        if ident not in synsets:
            raise SourceError(
                f"{gt}:{line_no}: {text!r} is not one of the ILSVRC2012_IDs of the {len(synsets)} leaf classes in "
                f"{meta} (one ID per line, the validation images in order)"
            )
        labels[f"ILSVRC2012_val_{image:08d}"] = synsets[ident][0]
    return labels


def read_loc_solution(loc: Path) -> dict[str, str]:
    """Kaggle's LOC_val_solution.csv -> image stem -> its first box's WNID; a SourceError naming
    the file and line for anything else (another CSV, a row without a box)."""
    with open(loc, newline="") as f:
        rows = csv.DictReader(f)
        missing = {"ImageId", "PredictionString"} - set(rows.fieldnames or ())
        if missing:
            raise SourceError(
                f"{loc}: columns {rows.fieldnames}, expected ImageId and PredictionString (Kaggle's "
                "LOC_val_solution.csv: an image id, then its boxes as 'WNID x0 y0 x1 y1 ...')"
            )
        labels = {}
        for row in rows:
            words = (row["PredictionString"] or "").split()
            if not row["ImageId"] or not words:
                raise SourceError(f"{loc}:{rows.line_num}: {row['ImageId']!r} has no WNID in its PredictionString")
            labels[row["ImageId"]] = words[0]
        return labels


def scan_ilsvrc(root: str | os.PathLike) -> Source:
    """The raw distribution: the train tar (a tar of per-class tars named by WNID) and the flat
    val tar, indexed in place: each image becomes (tar, byte offset, size), nothing is extracted."""
    root = Path(root)
    train_tar, val_tar = _find(root, ILSVRC_TRAIN_TAR), _find(root, ILSVRC_VAL_TAR)
    if train_tar is None:
        raise SourceError(f"{root}: {ILSVRC_TRAIN_TAR} not found")
    train: list[tuple[str, str, int, int]] = []  # (wnid, name, offset, size)
    with tarfile.open(train_tar, "r:") as outer:
        for member in outer:
            if not (member.isfile() and member.name.endswith(".tar")):
                continue
            wnid = Path(member.name).stem
            with tarfile.open(fileobj=outer.extractfile(member), mode="r:") as inner:
                for m in inner:
                    if m.isfile():
                        train.append((wnid, m.name, member.offset_data + m.offset_data, m.size))
    if not train:
        raise SourceError(f"{train_tar}: no images in its per-class tars")
    wnids = sorted({t[0] for t in train})
    index = {w: i for i, w in enumerate(wnids)}
    val = []
    if val_tar is not None:
        with tarfile.open(val_tar, "r:") as tar:
            val = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    labels, names = _val_labels(root) if val else ({}, {})
    source = Source(
        "ilsvrc", str(root), [{"index": i, "wnid": w, "name": names.get(w, w)} for i, w in enumerate(wnids)]
    )
    source.splits["train"] = [
        Sample(index[w], Ref(str(train_tar), off, size), f"{w}/{name}") for w, name, off, size in sorted(train)
    ]
    if val:
        samples = []
        for name, off, size in sorted(val):
            stem = Path(name).stem
            if stem not in labels:
                raise SourceError(f"{val_tar}: no label for {name}")
            if labels[stem] not in index:
                raise SourceError(f"{val_tar}: {name} is labelled {labels[stem]}, a class not in the train tar")
            samples.append(Sample(index[labels[stem]], Ref(str(val_tar), off, size), name))
        source.splits["val"] = samples
    files = [p for p in (train_tar, val_tar) if p is not None]
    files += [
        p
        for p in (
            _find(root, "LOC_val_solution.csv"),
            _find(root, "meta.mat"),
            _find(root, "ILSVRC2012_validation_ground_truth.txt"),
        )
        if p is not None
    ]
    source.fingerprint = _fingerprint(_stat_entry(p, root) for p in files)
    return source


# ---------------------------------------------------------------------------- demo data

DEMO_VERSION = "sklearn-digits-32px-v1"


def render_demo_digits(out: str | os.PathLike) -> Path:
    """scikit-learn's 1,797 handwritten digits (8x8) as 32x32 RGB JPEGs in class folders:
    every 5th image goes to test/, the rest to train/. Idempotent (a marker file records it)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    out = Path(out)
    marker = out / ".rendered"
    if marker.is_file() and marker.read_text() == DEMO_VERSION:
        return out
    digits = load_digits()
    palette = np.array([[255, 250, 240], [20, 40, 120]], dtype=np.float32)  # ink on paper, in colour
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        t = (img / 16.0)[..., None]  # (8, 8, 1) ink density
        rgb = (palette[0] * (1 - t) + palette[1] * t).astype(np.uint8)
        split = "test" if i % 5 == 0 else "train"
        path = out / split / str(label) / f"{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).resize((32, 32), Image.Resampling.BICUBIC).save(path, quality=95)
    marker.write_text(DEMO_VERSION)
    return out


def scan_source(path: str, kind: str = "auto", demo_dir: str | os.PathLike | None = None) -> Source:
    """Auto-detect (or take ``kind``: folder | ilsvrc | demo) and scan a source."""
    if kind == "demo" or (kind == "auto" and path == "demo"):
        folder = render_demo_digits(demo_dir or Path.cwd() / "data" / "demo_digits")
        source = scan_image_folder(folder)
        source.kind, source.path = "demo", "demo"
        source.fingerprint = _fingerprint([DEMO_VERSION])  # content is fixed; mtimes are not
        return source
    root = Path(path)
    if not root.exists():
        raise SourceError(f"{root}: source not found")
    if kind == "folder" or (kind == "auto" and (root / "train").is_dir()):
        if not (root / "train").is_dir() and (root / KAGGLE_IMAGES / "train").is_dir():
            return scan_image_folder(root / KAGGLE_IMAGES, labels_root=root)
        return scan_image_folder(root)
    if kind == "auto" and (root / KAGGLE_IMAGES / "train").is_dir():  # Kaggle's ImageNet download
        return scan_image_folder(root / KAGGLE_IMAGES, labels_root=root)
    if kind == "ilsvrc" or (kind == "auto" and _find(root, ILSVRC_TRAIN_TAR) is not None):
        return scan_ilsvrc(root)
    if kind != "auto":
        raise SourceError(f"unknown source kind {kind!r} (auto, folder, ilsvrc, demo)")
    raise SourceError(
        f"{root}: neither an image folder (train/<class>/*) nor the ILSVRC2012 tars ({ILSVRC_TRAIN_TAR}); is it empty?"
    )
