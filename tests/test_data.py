"""`bireal shard` on every input format and bad file, interruption, verify, and the loaders."""

import io
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from imagegen import (
    COLORS,
    WNIDS,
    add_bad_files,
    colored_image,
    ilsvrc_tars,
    image_folder,
    imagenet_extracted,
    jpeg_bytes,
    many_images,
    rewrite_first_shard,
)
from PIL import Image

import bireal_core as bc
from pipeline.data import eval_split_name, iter_shard_slice, make_loader, plan_epoch, read_manifest, split_shards
from pipeline.shard import ShardError, ShardParams, shard_dataset, summarize, verify_shards
from pipeline.sources import SourceError

FAST = dict(processes=1, samples_per_shard=4)


def read_samples(out: Path, manifest: dict, split: str) -> list[dict]:
    samples = []
    for rec in manifest["splits"][split]["shards"]:
        with tarfile.open(out / rec["name"], "r:*") as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name in sorted(n for n in files if n.endswith(".jpg")):
            key = name[:-4]
            im = Image.open(io.BytesIO(files[name]))
            samples.append(
                {"key": key, "image": im, "cls": int(files[key + ".cls"]), "wnid": files[key + ".wnid"].decode()}
            )
    return samples


def color_class(im: Image.Image) -> int:
    mean = np.asarray(im.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0)
    return int(np.argmin([np.abs(mean - np.array(c)).sum() for c in COLORS]))


def test_image_folder_with_every_bad_file_kind(tmp_path):
    src = image_folder(tmp_path / "src", per_class=(5, 2), classes=3)
    expected = add_bad_files(src / "train" / "class1", label=1)
    m = shard_dataset(str(src), str(tmp_path / "out"), ShardParams(**FAST), progress_bar=False)
    quarantined = {Path(q["path"]).name: q["reason"] for q in m["quarantine"]}
    converted = {Path(c["path"]).name: c["note"] for c in m["converted"]}
    assert set(quarantined) == {n for n, v in expected.items() if v == "quarantine"}
    assert set(converted) == {n for n, v in expected.items() if v == "converted"}
    assert quarantined["empty.jpg"] == "zero-byte file"
    assert "undecodable" in quarantined["truncated.jpg"]
    assert quarantined["strip.png"] == (
        "too elongated: 700 x 1 would be 179200 x 256 = 45,875,200 pixels with its shorter side resized to 256, "
        "over the 40,000,000 the loaders allow"
    )
    assert "CMYK to RGB" in converted["cmyk.jpg"] and "16-bit" in converted["sixteen.png"]
    assert "PNG data" in converted["disguised.JPEG"]
    # nothing dropped silently: every file is either in a shard or in the quarantine list
    assert m["splits"]["train"]["count"] + len(quarantined) == 3 * 5 + len(expected)
    assert m["splits"]["train"]["per_class"] == {"class0": 5, "class1": 5 + 5, "class2": 5}
    assert m["splits"]["val"]["count"] == 6
    samples = read_samples(tmp_path / "out", m, "train")
    assert all(s["image"].mode == "RGB" and s["image"].format == "JPEG" for s in samples)
    assert all(color_class(s["image"]) == s["cls"] for s in samples if s["image"].size == (48, 40))
    assert verify_shards(str(tmp_path / "out")) == []


def test_image_folder_walks_sub_folders_and_names_what_it_leaves_out(tmp_path):
    """Images in sub-folders of a class count (as in torchvision's ImageFolder); hidden entries and
    files that are not images by their suffix are left out, the latter listed; a symlink back up
    the tree is walked once; the undecodable file's reason names no in-memory buffer."""
    src = image_folder(tmp_path / "src", per_class=(4, 2), classes=2)
    nested = src / "train" / "class1" / "more" / "deeper"
    nested.mkdir(parents=True)
    colored_image(1, seed=7).save(nested / "img9.jpg", quality=92)
    (src / "train" / "class1" / "more" / "loop").symlink_to("..")
    (src / "train" / "class0" / "README.txt").write_text("notes")
    (src / "train" / "class0" / "._img0.jpg").write_bytes(b"AppleDouble")
    (src / "train" / ".ipynb_checkpoints").mkdir()
    (src / "train" / "class0" / "bad.jpg").write_bytes(b"\x00not an image" * 10)
    m = shard_dataset(str(src), str(tmp_path / "out"), ShardParams(**FAST), progress_bar=False)
    assert [c["name"] for c in m["classes"]] == ["class0", "class1"]
    assert m["splits"]["train"]["per_class"] == {"class0": 4, "class1": 5}
    assert m["ignored"] == ["train/class0/README.txt"]
    (reason,) = [q["reason"] for q in m["quarantine"]]
    assert reason == "undecodable: UnidentifiedImageError: cannot identify image file"
    with pytest.raises(KeyError, match=r"no val or test split \(it has: train\); shard a source with val/"):
        eval_split_name({"splits": {"train": m["splits"]["train"]}})
    assert eval_split_name(m) == "val"
    assert "ignored: 1 left out (not images by their suffix, outside a class folder, or without a label): " + (
        "train/class0/README.txt"
    ) in summarize(m)
    samples = read_samples(tmp_path / "out", m, "train")
    assert sorted(s["cls"] for s in samples) == [0] * 4 + [1] * 5
    assert all(color_class(s["image"]) == s["cls"] for s in samples)


def test_an_evaluation_split_left_empty_by_the_quarantine_is_refused(tmp_path):
    """Every val image quarantined (here a strip too elongated to resize): before, each stage
    evaluated no images (top-1 0 every epoch) and only `bireal evaluate` refused the result."""
    src = image_folder(tmp_path / "src", per_class=(3, 0), classes=2)
    Image.fromarray(np.zeros((1, 700, 3), np.uint8)).save(src / "val" / "class0" / "strip.png")
    m = shard_dataset(str(src), str(tmp_path / "out"), ShardParams(**FAST), progress_bar=False)
    assert m["splits"]["val"]["count"] == 0 and m["splits"]["val"]["quarantined"] == 1
    with pytest.raises(
        ValueError, match=r"out: the val split has no images to evaluate \(1 quarantined: their reasons"
    ):
        eval_split_name(m, str(tmp_path / "out"))


def test_one_sharder_per_output_folder(tmp_path):
    """Two `bireal shard` into one folder deleted each other's partial shards (the second died on
    `No such file or directory: .../train-000003.tar.tmp`); the second now stops at once. The lock
    is the folder's own flock: nothing is written beside or into the folder for it."""
    from pipeline.shard import sharding_lease

    src = image_folder(tmp_path / "src", per_class=(3, 1), classes=2)
    out = tmp_path / "out"
    out.mkdir()
    with sharding_lease(str(out), str(out)):  # another sharder holds it
        with pytest.raises(ShardError, match=r"out: another process is sharding into this folder"):
            shard_dataset(str(src), str(out), ShardParams(**FAST), progress_bar=False)
    assert list(out.iterdir()) == []
    shard_dataset(str(src), str(out), ShardParams(**FAST), progress_bar=False)
    assert verify_shards(str(out)) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_train_class_folder_without_images_is_named(tmp_path):
    src = image_folder(tmp_path / "src", per_class=(3, 1), classes=2)
    (src / "train" / "class_z").mkdir()
    (src / "train" / "class_z" / "labels.csv").write_text("x")
    with pytest.raises(SourceError, match=r"1 class folder\(s\) without images \(class_z\); every class needs"):
        shard_dataset(str(src), str(tmp_path / "out"), ShardParams(**FAST), progress_bar=False)
    assert not (tmp_path / "out").exists()  # refused before anything is written


@pytest.mark.parametrize("labels", ["loc", "devkit"])
def test_raw_ilsvrc_tars_streamed_in_place(tmp_path, labels):
    truth = ilsvrc_tars(tmp_path / "ilsvrc", labels=labels)
    out = tmp_path / "out"
    m = shard_dataset(str(tmp_path / "ilsvrc"), str(out), ShardParams(**FAST), progress_bar=False)
    assert m["source"]["kind"] == "ilsvrc"
    assert [c["wnid"] for c in m["classes"]] == WNIDS
    if labels == "devkit":
        assert m["classes"][2]["name"] == f"fish {WNIDS[2][-3:]}"
    assert m["splits"]["train"]["count"] == 4 * 5 and m["splits"]["val"]["count"] == len(truth)
    assert set(m["splits"]["val"]["per_class"].values()) == {2}
    for split in ("train", "val"):
        for s in read_samples(out, m, split):
            assert min(s["image"].size) == 256  # ImageNet resize of the shorter side
            assert color_class(s["image"]) == s["cls"]  # the label matches the pixels
            assert s["wnid"] == WNIDS[s["cls"]]


@pytest.mark.parametrize("layout", ["kaggle", "devkit"])
def test_extracted_imagenet_with_a_flat_val_folder(tmp_path, layout):
    """ImageNet as it is on disk once extracted: val/ holds the 50,000 images flat, labelled by
    Kaggle's LOC_val_solution.csv or the devkit's ground truth; Kaggle's download is found from
    its root, and its unlabelled test/ is left out, said so in the manifest."""
    truth = imagenet_extracted(tmp_path / "imagenet", layout)
    train = tmp_path / "imagenet" / ("ILSVRC/Data/CLS-LOC/train" if layout == "kaggle" else "train")
    colored_image(0).save(train / "stray.JPEG")  # in train/ but in no class folder: no label
    out = tmp_path / "out"
    m = shard_dataset(str(tmp_path / "imagenet"), str(out), ShardParams(**FAST), progress_bar=False)
    assert [c["wnid"] for c in m["classes"]] == WNIDS
    assert m["classes"][2]["name"].startswith(f"fish {WNIDS[2][-3:]}")  # the synset mapping's or devkit's words
    assert set(m["splits"]) == {"train", "val"} and m["splits"]["val"]["count"] == len(truth)
    assert set(m["splits"]["val"]["per_class"].values()) == {2}
    assert m["ignored"] == ["train/stray.JPEG"] + (["test/*: 3 images without labels"] if layout == "kaggle" else [])
    for s in read_samples(out, m, "val"):
        assert color_class(s["image"]) == s["cls"] and s["wnid"] == WNIDS[s["cls"]]  # labels match pixels


def test_a_flat_val_folder_without_labels_is_named(tmp_path):
    """Before: val/ with its images directly inside gave 'val: 0 samples' and no error."""
    imagenet_extracted(tmp_path / "imagenet", "devkit")
    devkit = tmp_path / "imagenet" / "ILSVRC2012_devkit_t12"
    shutil.rmtree(devkit)
    with pytest.raises(SourceError, match=r"val: 8 images directly inside, not in <class>/ folders: put them in"):
        shard_dataset(str(tmp_path / "imagenet"), str(tmp_path / "out"), ShardParams(**FAST), progress_bar=False)
    imagenet_extracted(tmp_path / "second", "devkit")  # a label file that misses an image
    gt = tmp_path / "second" / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("\n".join(gt.read_text().split()[:-1]) + "\n")
    with pytest.raises(
        SourceError, match=r"no label for ILSVRC2012_val_00000008.JPEG in .*\(7 of its 8 images have one\)"
    ):
        shard_dataset(str(tmp_path / "second"), str(tmp_path / "out2"), ShardParams(**FAST), progress_bar=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


@pytest.mark.parametrize(
    "labels, edit, message",
    [
        (
            "loc",
            lambda t: t.replace("ImageId,", "Image,"),
            r"LOC_val_solution.csv: columns \['Image', 'PredictionString'\]",
        ),
        (
            "loc",
            lambda t: t.replace(t.splitlines()[3].split(",")[1], ""),
            r"LOC_val_solution.csv:4: 'ILSVRC2012_val_\d+' has no WNID",
        ),
        (
            "devkit",
            lambda t: t.replace("\n", "\nseven\n", 1),
            r"ground_truth.txt:2: 'seven' is not one of the ILSVRC2012_IDs of the 4 leaf",
        ),
        ("devkit", lambda t: "1001\n" + t, r"ground_truth.txt:1: '1001' is not one of the ILSVRC2012_IDs"),
        ("devkit", lambda t: "\n\n" + t.replace("\n", "\n\n"), None),  # blank lines label nothing
    ],
)
def test_imagenet_label_files_that_do_not_parse_are_named_with_the_line(tmp_path, labels, edit, message):
    """Kaggle's CSV and the devkit's ground truth, each with a line that is not what they hold: the
    file and line named, nothing written (before: a KeyError 'ImageId', an IndexError, a ValueError
    from int(), a KeyError 1001)."""
    truth = ilsvrc_tars(tmp_path / "raw", labels=labels)
    files = {
        "loc": "LOC_val_solution.csv",
        "devkit": "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
    }
    label_file = tmp_path / "raw" / files[labels]
    label_file.write_text(edit(label_file.read_text()))
    out = tmp_path / "out"
    if message is None:
        m = shard_dataset(str(tmp_path / "raw"), str(out), ShardParams(**FAST), progress_bar=False)
        assert m["splits"]["val"]["count"] == len(truth)
        assert all(color_class(s["image"]) == s["cls"] for s in read_samples(out, m, "val"))  # not shifted
        return
    with pytest.raises(SourceError, match=message):
        shard_dataset(str(tmp_path / "raw"), str(out), ShardParams(**FAST), progress_bar=False)
    assert not out.exists()


def test_overwrite_leaves_only_the_new_shards(tmp_path):
    """--overwrite with fewer or gzipped shards, or another eval split: the earlier run's shards it
    does not write again are removed (they stayed beside the new ones, in DVC's copy of the folder
    and in anything that globs it); files that are not shards of ours are kept."""
    src, out = image_folder(tmp_path / "src"), tmp_path / "out"
    first = shard_dataset(str(src), str(out), ShardParams(**FAST), progress_bar=False)
    assert len(first["splits"]["train"]["shards"]) == 5  # 18 train images, 4 a shard
    (out / "notes.txt").write_text("mine")
    (src / "val").rename(src / "test")  # another eval split's name too
    with pytest.raises(ShardError, match="pass --overwrite to replace them"):
        shard_dataset(str(src), str(out), ShardParams(processes=1, samples_per_shard=8, gzip=True), progress_bar=False)
    second = shard_dataset(
        str(src), str(out), ShardParams(processes=1, samples_per_shard=8, gzip=True), overwrite=True, progress_bar=False
    )
    listed = {rec["name"] for split in second["splits"].values() for rec in split["shards"]}
    assert listed == {"train-000000.tar.gz", "train-000001.tar.gz", "train-000002.tar.gz", "test-000000.tar.gz"}
    assert {p.name for p in out.iterdir()} == listed | {"manifest.json", "notes.txt"}
    assert verify_shards(str(out)) == []


def test_demo_source_and_gzip(tmp_path):
    m = shard_dataset(
        "demo", str(tmp_path / "out"), ShardParams(samples_per_shard=500, gzip=True, processes=2), progress_bar=False
    )
    assert m["source"]["kind"] == "demo" and len(m["classes"]) == 10
    assert m["splits"]["train"]["count"] == 1437 and m["splits"]["test"]["count"] == 360
    assert all(r["name"].endswith(".tar.gz") for r in m["splits"]["train"]["shards"])
    assert verify_shards(str(tmp_path / "out")) == []


def test_killed_run_resumes_byte_identical(tmp_path):
    src = many_images(tmp_path / "src", 600)
    args = ["--source", str(src), "--resize", "64", "--samples-per-shard", "20", "--processes", "1"]
    reference = tmp_path / "reference"
    subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "shard", *args, "--out", str(reference)], check=True, capture_output=True
    )
    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "shard", *args, "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress = out / ".shard-progress.json"
    while proc.poll() is None:  # until 3 shards are done (on the process, not a clock: load slows it)
        if progress.exists():
            try:
                if len(json.loads(progress.read_text())["splits"]["train"]["shards"]) >= 3:
                    break
            except (json.JSONDecodeError, KeyError):
                pass
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    kept = sorted(p.name for p in out.glob("train-*.tar"))
    assert 3 <= len(kept) < 30
    mtimes = {name: (out / name).stat().st_mtime_ns for name in kept}
    resume = [*args[:-1], "2"]  # another worker count: the same bytes, so the run resumes
    subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "shard", *resume, "--out", str(out)], check=True, capture_output=True
    )
    for name in kept[:3]:  # complete shards were kept, not rewritten
        assert (out / name).stat().st_mtime_ns == mtimes[name]
    ref_files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ref_files
    for name in ref_files:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_ctrl_c_is_one_line_and_the_run_resumes(tmp_path):
    """Ctrl-C (SIGINT) while sharding: exit 130 with one line saying what running it again does,
    not a traceback from wherever the work was; running it again finishes the shards."""
    # 300 copies of one 1200 x 900 photo: each is decoded and downscaled (~15 ms), so the run is
    # seconds long after its first shard on any machine (400 small images took 0.6 s in CI)
    src = tmp_path / "src"
    photo = jpeg_bytes(colored_image(0, (1200, 900)))
    for i in range(300):
        (src / "train" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / "train" / f"c{i % 3}" / f"{i:04d}.jpg").write_bytes(photo)
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "pipeline.cli", "shard", "--source", str(src), "--out", str(out)]
    argv += ["--resize", "64", "--samples-per-shard", "20", "--processes", "1"]
    # SIGINT as a terminal's Ctrl-C finds it: a suite started in the background (nohup, `cmd &`)
    # passes SIGINT on ignored, and a Python started so keeps ignoring it
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint
    )
    progress = out / ".shard-progress.json"
    while proc.poll() is None and not progress.exists():  # until the first shard is done
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "bireal shard: interrupted; the same command keeps the complete shards and goes on after the last"
    )
    assert not (out / "manifest.json").exists()
    subprocess.run(argv, check=True, capture_output=True)
    assert verify_shards(str(out)) == []


def test_verify_detects_tampering(tmp_path):
    src = image_folder(tmp_path / "src")
    out = tmp_path / "out"
    m = shard_dataset(str(src), str(out), ShardParams(**FAST), progress_bar=False)
    victim = out / m["splits"]["train"]["shards"][0]["name"]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    (out / m["splits"]["val"]["shards"][0]["name"]).unlink()
    problems = verify_shards(str(out))
    assert any("sha256" in p for p in problems) and any("missing" in p for p in problems)
    with pytest.raises(ShardError, match=r"nowhere: no such folder$"):  # a typo in the path
        verify_shards(str(tmp_path / "nowhere"))
    with pytest.raises(ShardError, match=r"src: no manifest.json \(not a shard folder"):
        verify_shards(str(src))


def test_verify_takes_no_option_that_makes_shards(tmp_path, capsys):
    """`bireal shard --source S --out O --verify O` verified O (or failed on its absence) and made
    nothing, with a line reading like success; now the options it would not use are named."""
    from pipeline.cli import main

    src = image_folder(tmp_path / "src")
    out = tmp_path / "out"
    shard_dataset(str(src), str(out), ShardParams(**FAST), progress_bar=False)
    assert main(["shard", "--source", str(src), "--out", str(tmp_path / "new"), "--verify", str(out)]) == 2
    assert "error: --verify DIR only checks shards already made; it takes no --source, --out" in capsys.readouterr().err
    assert main(["shard", "--verify", str(out), "--no-gzip", "--kind", "folder"]) == 2
    assert "it takes no --kind, --gzip" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    assert main(["shard", "--verify", str(out)]) == 0 and "OK, every shard matches" in capsys.readouterr().out


def test_bad_inputs_named(tmp_path):
    with pytest.raises(SourceError, match="nowhere"):
        shard_dataset(str(tmp_path / "nowhere"), str(tmp_path / "out"), progress_bar=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty"):
        shard_dataset(str(tmp_path / "empty"), str(tmp_path / "out"), progress_bar=False)
    (tmp_path / "noimg" / "train" / "a").mkdir(parents=True)
    with pytest.raises(SourceError, match="no images"):
        shard_dataset(str(tmp_path / "noimg"), str(tmp_path / "out"), progress_bar=False)
    src = image_folder(tmp_path / "src")
    shard_dataset(str(src), str(tmp_path / "out"), ShardParams(**FAST), progress_bar=False)
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "out").iterdir())
    made_with = f"samples_per_shard={FAST['samples_per_shard']} (now 3)"
    with pytest.raises(ShardError, match=re.escape(f"holds shards made with {made_with}; choose another --out")):
        shard_dataset(
            str(src), str(tmp_path / "out"), ShardParams(**{**FAST, "samples_per_shard": 3}), progress_bar=False
        )
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "out").iterdir()) == before
    # the worker count does not change a byte: another count keeps the shards, as does a manifest
    # written before it was left out of the identity (it listed every setting)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    manifest["params"]["processes"] = 7
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "out").iterdir())
    kept = shard_dataset(str(src), str(tmp_path / "out"), ShardParams(**{**FAST, "processes": 2}), progress_bar=False)
    assert kept["params"]["processes"] == 7  # the manifest as it was: nothing was re-sharded
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "out").iterdir()) == before


# ---------------------------------------------------------------------------- loaders


def collect(location, split, train, rank, world, workers, epoch=0, batch=16):
    it, plan = make_loader(
        location,
        split,
        bc.default_input_config("small"),
        batch,
        train=train,
        rank=rank,
        world_size=world,
        workers=workers,
        epoch=epoch,
        with_keys=True,
    )
    keys, batches = [], 0
    for images, labels, k in it:
        assert images.shape[1:] == (3, 32, 32) and len(labels) == len(k)
        keys += list(k)
        batches += 1
    return keys, batches, plan


def test_eval_sees_each_sample_exactly_once_2x2(demo_shards):
    loc = str(demo_shards)
    keys = []
    for rank in range(2):
        k, _, _ = collect(loc, "test", False, rank, 2, 2)
        keys += k
    assert len(keys) == len(set(keys)) == read_manifest(loc)["splits"]["test"]["count"]


def test_train_equal_steps_at_most_once_and_reshuffled_2x2(demo_shards):
    loc = str(demo_shards)
    per_epoch = []
    for epoch in (0, 1):
        keys, steps = [], []
        for rank in range(2):
            k, b, plan = collect(loc, "train", True, rank, 2, 2, epoch=epoch)
            keys += k
            steps.append(b)
        assert steps[0] == steps[1] == plan.steps > 0  # every rank runs the same steps
        assert len(keys) == len(set(keys))  # at most once per epoch
        assert plan.left_out == 1437 - len(keys)  # the remainder is counted
        per_epoch.append(keys)
    assert per_epoch[0] != per_epoch[1]  # reshuffled each epoch


def test_persistent_workers_serve_every_epoch_as_workers_started_for_it(demo_shards):
    """The training loader's workers start once: the same processes serve every epoch, each
    re-planned from the shared epoch number and reseeded from it. So epoch e's batches (keys,
    labels, pixels) are those of a loader started for epoch e alone, also after an epoch abandoned
    halfway (``max_steps_per_epoch``: what the workers had prefetched is dropped); ``close`` ends them."""
    import multiprocessing

    import torch

    from pipeline.data import ShardLoader

    config, location = bc.default_input_config("small"), str(demo_shards)
    options = dict(train=True, world_size=2, workers=2, seed=5, with_keys=True)  # rank 0 of 2

    def started_for(epoch: int) -> list:
        return list(make_loader(location, "train", config, 16, epoch=epoch, **options)[0])

    def children() -> set[int]:
        return {p.pid for p in multiprocessing.active_children()}

    def planned_keys(plan) -> set[str]:  # what the plan deals to rank 0's two workers
        return {s["__key__"] for urls in plan.readers[:2] for url in urls for s in iter_shard_slice(url)}

    before = children()
    loader = ShardLoader(location, "train", config, 16, persistent=True, **options)
    try:
        first, _ = loader.epoch(0)
        halfway = [next(first) for _ in range(3)]
        workers = children() - before
        assert len(workers) == 2
        for epoch in (1, 2):
            batches, plan = loader.epoch(epoch)
            ours = list(batches)
            assert children() - before == workers  # the same two processes
            keys = {k for _, _, batch_keys in ours for k in batch_keys}
            assert len(keys) == plan.steps * 16 and keys <= planned_keys(plan) != planned_keys(loader.plan_of(epoch=0))
            reference = started_for(epoch)
            assert len(ours) == len(reference) == plan.steps > 0
            for (x, y, keys), (x_ref, y_ref, keys_ref) in zip(ours, reference):
                assert list(keys) == list(keys_ref) and torch.equal(y, y_ref) and torch.equal(x, x_ref)
        assert [list(k) for _, _, k in halfway] == [list(k) for _, _, k in started_for(0)[:3]]
    finally:
        loader.close()
    assert children() - before == set()


def test_loader_workers_start_from_a_forkserver_beside_other_threads(demo_shards, monkeypatch):
    """A loader forks its workers only where no other thread runs: beside one (a Ray Train worker
    has several) it starts them from a forkserver (``worker_start_method``), since a fork while
    another thread holds CPython's thread-state lock leaves the child hung for good (an evaluation
    loader's worker did so in CI). The forkserver's workers serve the forked ones' batches (keys,
    labels, pixels) in the same order; remote shards always get a forkserver, no workers neither."""
    import threading

    import torch

    from pipeline.data import ShardLoader, worker_start_method

    config, location = bc.default_input_config("small"), str(demo_shards)
    options = dict(train=False, workers=2, with_keys=True)
    assert worker_start_method("s3://bucket/shards", 2) == "forkserver"
    assert worker_start_method(location, 0) is None
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert worker_start_method(location, 2) == "forkserver"
        loader = ShardLoader(location, "test", config, 16, **options)
        assert loader.loader.multiprocessing_context.get_start_method() == "forkserver"
        served = list(loader.epoch(0)[0])
    finally:
        stop.set()
        other.join()
    with monkeypatch.context() as m:
        m.setattr(threading, "active_count", lambda: 1)  # as in a process with this thread alone
        assert worker_start_method(location, 2) is None
        forked = list(make_loader(location, "test", config, 16, **options)[0])
    assert len(served) == len(forked) > 1
    for (x, y, keys), (x_ref, y_ref, keys_ref) in zip(served, forked):
        assert list(keys) == list(keys_ref) and torch.equal(y, y_ref) and torch.equal(x, x_ref)


def test_plan_never_starves_a_rank():
    shards = [(f"s{i}", n) for i, n in enumerate([100, 100, 7])]
    plan = plan_epoch(shards, world_size=2, workers=2, batch_size=16, train=True)
    assert plan.steps == 6  # the best rank could do more; all run the poorest rank's count
    assert plan.left_out == 207 - 6 * 16 * 2
    assert plan_epoch(shards, 4, 2, 16, train=True).steps == 0  # more readers than shards: 0, no hang


def test_imagenet_path_loader_and_url(tmp_path):
    ilsvrc_tars(tmp_path / "ilsvrc", train_per_class=4)
    out = tmp_path / "shards"
    shard_dataset(str(tmp_path / "ilsvrc"), f"file://{out}", ShardParams(**FAST), progress_bar=False)
    config = bc.default_input_config("imagenet")
    loader, plan = make_loader(f"file://{out}", "train", config, 4, train=True, workers=1)
    images, labels = next(loader)
    assert images.shape == (4, 3, 224, 224) and labels.dtype.is_floating_point is False
    val, _ = make_loader(str(out), "val", config, 8, train=False, workers=1)
    total = sum(len(y) for _, y in val)
    assert total == 8
    assert [u for u, _ in split_shards(read_manifest(str(out)), str(out), "val")]


def noise_folder(root: Path, per_class: int = 5, size=(60, 45)) -> Path:
    """Two classes of noise JPEGs: pixels at 0 and 255 too, so lighting's clamp is reached."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(2):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"c{c}" / f"{i}.jpg", quality=90)
    return root


@pytest.mark.parametrize("augment", ["imagenet", "caffe", "small"])
def test_the_uint8_loader_draws_as_the_float_path_and_gives_its_pixels_within_a_level(tmp_path, augment):
    """The workers decode with torchvision, crop, resize and flip in torch and hand over uint8 crops
    and lighting draws; lighting (clamp and truncation) and normalisation run after collation. At a
    fixed seed every batch is the PIL float path's (crop, flip, Lighting, ToTensor, Normalize per
    image) within one level of 255: the same crops, flips and lighting draws, resampled by torch.
    224 crops of ImageNet's recipes and 32 px, one loader worker drawing from its own generator."""
    import torch

    from bireal_core.augment import ImageRecipe

    source = noise_folder(tmp_path / "src")
    shard_dataset(str(source), str(tmp_path / "shards"), ShardParams(**FAST), progress_bar=False)
    config = {**bc.default_input_config("small" if augment == "small" else "imagenet"), "augment": augment}
    level = torch.tensor(config["std"])[:, None, None] * 255  # one uint8 step, normalised

    def batches(uint8: bool, train: bool) -> list:
        split = "train" if train else "val"
        loader, _ = make_loader(
            str(tmp_path / "shards"), split, config, 3, train=train, workers=1, pca_lighting=True, uint8=uint8, seed=3
        )
        return list(loader)

    for train in (True, False):
        ours, reference = batches(True, train), batches(False, train)
        assert len(ours) == len(reference) == (3 if train else 2)
        for (x, y), (x_ref, y_ref) in zip(ours, reference):
            assert x.dtype == torch.float32 and x.shape == x_ref.shape and x.shape[-1] == config["size"]
            assert torch.equal(y, y_ref)
            off = ((x - x_ref) * level).abs()
            assert off.max() <= 1.001, off.max()  # a draw out of step would move whole crops
            assert off.mean() < 0.05  # one level at under 1% of the values (noise images: the hardest case)
    image, alpha = ImageRecipe(config, train=True, pca_lighting=True)(torch.zeros(3, 45, 60, dtype=torch.uint8))
    assert image.dtype == torch.uint8 and image.shape == (3, config["size"], config["size"]) and alpha.shape == (3,)


def test_pca_lighting_acts_on_the_uint8_image_as_the_official_recipe():
    """At most one step of 1/255 per pixel and channel (the cast truncates), uint8 in and out."""
    import torch

    from bireal_core.preprocess import Lighting

    torch.manual_seed(0)
    img = Image.fromarray(np.random.default_rng(0).integers(1, 255, (20, 30, 3), dtype=np.uint8), "RGB")
    changed = 0
    for _ in range(50):
        out = Lighting(0.1)(img)
        assert out.mode == "RGB" and out.size == img.size
        diff = np.asarray(out).astype(int) - np.asarray(img).astype(int)
        assert np.abs(diff).max() <= 1
        changed += int(diff.any())
    assert changed > 0  # it does act
    assert Lighting(0.0)(img) is img


def test_caffe_augmentation_resizes_then_crops():
    """augment=caffe: shorter side to 256, a random 224 crop, mirror (the paper's Caffe data layer)."""
    import torch

    from bireal_core.preprocess import train_transform

    config = {**bc.default_input_config("imagenet"), "augment": "caffe"}
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8), "RGB")
    out = train_transform(config)(img)
    assert out.shape == (3, 224, 224)
    # a 224 window of the 256 x 341 resize, as is or mirrored (no rescaling of the crop)
    from torchvision import transforms as T

    full = T.Compose([T.Resize(256, antialias=True), T.ToTensor(), T.Normalize(config["mean"], config["std"])])(img)
    windows = [
        full[:, i : i + 224, j : j + 224] for i in range(full.shape[1] - 223) for j in range(full.shape[2] - 223)
    ]
    assert any(torch.allclose(out, w) or torch.allclose(out, w.flip(-1)) for w in windows)
    with pytest.raises(ValueError, match="augment"):
        train_transform({**config, "augment": "autoaugment"})


def test_holdout_is_an_exact_fixed_part_of_the_train_split(demo_shards):
    """The first N train samples (the sharder's seeded shuffle) are held out: disjoint from what
    trains, together the whole split, the same every time, cut inside a shard where N falls."""
    from pipeline.data import HOLDOUT, iter_shard_slice, make_loader, read_manifest, split_shards

    manifest = read_manifest(str(demo_shards))
    whole = split_shards(manifest, str(demo_shards), "train")
    held = split_shards(manifest, str(demo_shards), HOLDOUT, holdout=250)
    kept = split_shards(manifest, str(demo_shards), "train", holdout=250)
    assert [n for _, n in held] == [100, 100, 50] and sum(n for _, n in kept) == sum(n for _, n in whole) - 250
    assert held[2][0].endswith("#samples=0:50") and kept[0][0].endswith("#samples=50:100")

    def keys(shards):
        return [s["__key__"] for url, n in shards for s in iter_shard_slice(url)]

    held_keys, kept_keys, all_keys = keys(held), keys(kept), keys(whole)
    assert len(held_keys) == 250 and held_keys + kept_keys == all_keys  # exact, in order, disjoint
    # a loader over the held-out split reads exactly those samples; training never sees them
    batches, _ = make_loader(
        str(demo_shards),
        HOLDOUT,
        {"size": 32, "resize": 32, "mean": [0.5] * 3, "std": [0.5] * 3},
        64,
        train=False,
        workers=2,
        holdout=250,
        with_keys=True,
    )
    assert sorted(k for _, _, ks in batches for k in ks) == sorted(held_keys)
    train, plan = make_loader(
        str(demo_shards),
        "train",
        {"size": 32, "resize": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "augment": "small"},
        10,
        train=True,
        workers=2,
        holdout=250,
        with_keys=True,
    )
    seen = {k for _, _, ks in train for k in ks}
    assert seen and not seen & set(held_keys) and len(seen) == plan.steps * 10
    with pytest.raises(ValueError, match="holdout=2000: the train split .* has only"):
        split_shards(manifest, str(demo_shards), HOLDOUT, holdout=2000)
    with pytest.raises(ValueError, match="needs holdout > 0"):
        split_shards(manifest, str(demo_shards), HOLDOUT)


@pytest.mark.parametrize("augment", ["imagenet", "caffe", "small"])
def test_the_device_decode_path_keeps_the_plan_and_the_recipe(tmp_path, augment):
    """``decode: device`` (run here on CPU tensors; nvJPEG on a GPU): the workers hand over JPEG
    bytes, so every batch holds the worker path's samples in its order (keys and labels equal);
    evaluation's resize and centre crop give its pixels within one level of 255 (torch against PIL
    resampling); training batches are the recipe's 224 (or 32) crops, the same at the same seed."""
    import torch

    source = noise_folder(tmp_path / "src")
    shard_dataset(str(source), str(tmp_path / "shards"), ShardParams(**FAST), progress_bar=False)
    config = {**bc.default_input_config("small" if augment == "small" else "imagenet"), "augment": augment}
    level = torch.tensor(config["std"])[:, None, None] * 255  # one uint8 step, normalised

    def batches(decode: str, train: bool, seed: int = 3) -> list:
        torch.manual_seed(7)
        split = "train" if train else "val"
        loader, _ = make_loader(str(tmp_path / "shards"), split, config, 3, train=train, workers=1,
                                pca_lighting=True, seed=seed, decode=decode, with_keys=True)  # fmt: skip
        return list(loader)

    for train in (False, True):
        ours, reference = batches("device", train), batches("worker", train)
        assert len(ours) == len(reference) == (3 if train else 2)
        for (x, y, keys), (x_ref, y_ref, keys_ref) in zip(ours, reference):
            assert keys == keys_ref and torch.equal(y, y_ref)
            assert x.dtype == torch.float32 and x.shape == x_ref.shape and x.shape[-1] == config["size"]
            if not train:
                assert ((x - x_ref) * level).abs().max() <= 1.001
    again, other = batches("device", True), batches("device", True, seed=4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches("device", True), again))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(again, other))
    with pytest.raises(ValueError, match="decode='gpu': one of worker, device"):
        make_loader(str(tmp_path / "shards"), "val", config, 3, train=False, decode="gpu")


def noise_shards_with_val_images(source: Path, out: Path, changes: dict) -> list[dict]:
    """Shards of ``noise_folder`` whose first val shard has image i replaced by ``changes[i](its bytes)``
    (a shard as written elsewhere or by an older version) -> its samples."""
    shard_dataset(str(noise_folder(source)), str(out), ShardParams(**FAST), progress_bar=False)
    return rewrite_first_shard(out, "val", changes)[1]


def test_the_device_path_decodes_what_nvjpeg_will_not_and_replaces_what_nothing_decodes(tmp_path, caplog):
    """A PNG stored as a shard's .jpg (ImageNet has one) fails the batched JPEG decode: the batch
    is decoded image by image and PIL takes the PNG (its pixels as the worker path's); bytes that
    nothing decodes are replaced by the batch's previous good image, logged with its key, and the
    batch keeps its size."""
    import torch

    out = tmp_path / "shards"

    def png_of(jpg: bytes) -> bytes:
        png = io.BytesIO()
        Image.open(io.BytesIO(jpg)).save(png, format="PNG")
        return png.getvalue()

    samples = noise_shards_with_val_images(tmp_path / "src", out, {0: png_of, 2: lambda jpg: jpg[:300]})
    config = bc.default_input_config("imagenet")
    caplog.set_level(logging.WARNING, logger="pipeline.decode")

    def first_batch(decode: str) -> tuple:
        return next(make_loader(str(out), "val", config, 4, train=False, workers=0, with_keys=True, decode=decode)[0])

    x, y, keys = first_batch("device")
    assert len(keys) == len(y) == x.shape[0] == 4 and keys[0] == samples[0]["__key__"]
    x_ref, _, _ = first_batch("worker")
    level = torch.tensor(config["std"])[:, None, None] * 255
    assert ((x[0] - x_ref[0]) * level).abs().max() <= 1.001  # the PNG, decoded by PIL
    assert torch.equal(x[2], x[1])  # the damaged file: its predecessor stands in
    warned = [r.getMessage() for r in caplog.records if "replaced by the batch's previous" in r.getMessage()]
    assert len(warned) == 1 and samples[2]["__key__"] in warned[0]


@pytest.mark.parametrize("path", ["float", "uint8", "device"])
def test_an_image_too_elongated_to_resize_is_replaced_on_every_loader_path(tmp_path, caplog, path):
    """Shards from before the shard stage quarantined strips, or from another tool, may hold one:
    a 20000 x 1 strip in the val split took evaluation to an 8.7 GB peak (5,120,000 x 256 once
    resized). Here 700 x 1 (179,200 x 256, over 40 MP): every loader path counts it as a damaged
    image, logs it by key and keeps the batch's size."""
    import torch

    out = tmp_path / "shards"
    samples = noise_shards_with_val_images(tmp_path / "src", out, {1: lambda _: jpeg_bytes(Image.new("RGB", (700, 1)))})
    caplog.set_level(logging.WARNING, logger="pipeline")
    options = {"float": dict(uint8=False), "uint8": dict(uint8=True), "device": dict(decode="device")}[path]
    config = bc.default_input_config("imagenet")
    batches, _ = make_loader(str(out), "val", config, 4, train=False, workers=0, with_keys=True, **options)
    x, y, keys = next(batches)
    assert x.shape == (4, 3, 224, 224) and len(y) == len(keys) == 4
    # the worker paths repeat the next good image in its place, the device path the previous one
    stand_in = 0 if path == "device" else 2
    assert torch.equal(x[1], x[stand_in]) and not torch.equal(x[0], x[2])
    warned = [r.getMessage() for r in caplog.records if samples[1]["__key__"] in r.getMessage()]
    assert len(warned) == 1 and "replaced" in warned[0]
    if path != "device":
        assert "too elongated: 700 x 1 would be 179200 x 256" in warned[0]


def test_bench_data_measures_every_loader_and_refuses_a_set_too_small(tmp_path, capsys):
    """`bireal bench data --imagenet-like N`: every sharding, loader and step row, the two ratios, in
    one run; a set too small to give each loader worker a batch is named, not divided by zero
    (--imagenet-like 40 raised ZeroDivisionError from the ratio rows)."""
    import math

    from pipeline.cli import main

    assert main(["bench", "data", "--imagenet-like", "40"]) == 2
    assert "30 training images, fewer than 2 batches of 32 (one per loader worker)" in capsys.readouterr().err
    out = tmp_path / "rows.json"
    assert main(["bench", "data", "--imagenet-like", "100", "--json", str(out)]) == 0
    rows = {r["what"]: r for r in json.loads(out.read_text())}
    assert "load webdataset uint8, 1 process" in capsys.readouterr().out  # the table
    loads = [w for w in rows if w.startswith("load ")]
    assert sorted(loads) == sorted(
        f"load {w}"
        for w in (
            "webdataset float, 1 process",
            "webdataset uint8, 1 process",
            "webdataset uint8, 2 workers",
            "webdataset decode on cpu, 1 process",
            "imagefolder, 2 workers",
        )
    )
    for what in loads:  # 90 training images: two whole batches of 32 on every loader
        assert rows[what]["images"] == 64 and rows[what]["img_s"] > 0, what
    assert rows["shard, 1 process(es)"]["images"] == rows["shard, 2 process(es)"]["images"] == 100
    for what in ("uint8 / float, 1 process", "decode on cpu / float, 1 process"):
        assert math.isfinite(rows[what]["ratio"]) and rows[what]["ratio"] > 0, what
    steps = [w for w in rows if w.startswith("step: ")]
    assert len(steps) == 6 and all(rows[w]["ms"] > 0 for w in steps), steps
