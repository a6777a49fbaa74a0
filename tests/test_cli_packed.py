"""`bireal export` and `bireal predict` end to end, with the errors a user meets."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from imagegen import rewrite_artifact_header
from PIL import Image

import bireal_core as bc
from pipeline.cli import main


@pytest.fixture()
def checkpoint(tmp_path):
    model = bc.create_model("bireal18", num_classes=3, stem="small", width=0.25)
    return bc.save_checkpoint(
        tmp_path / "ckpt.safetensors", model.eval(), stage="finetune", config={"class_names": ["cat", "dog", "fox"]}
    )


def write_image(path, size=(40, 30), mode="RGB"):
    arr = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype("uint8")
    Image.fromarray(arr).convert(mode).save(path)
    return path


def test_export_then_predict(tmp_path, checkpoint, capsys):
    art = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(art)]) == 0
    assert "Mbit" in capsys.readouterr().out
    images = [write_image(tmp_path / "a.jpg"), write_image(tmp_path / "b.png", mode="L")]
    assert main(["predict", "--artifact", str(art), "--topk", "2", "--json", *map(str, images)]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # a line per image
    assert [len(r["top"]) for r in results] == [2, 2]
    for r in results:
        assert r["top"][0]["label"] in {"cat", "dog", "fox"}
        assert r["top"][0]["score"] >= r["top"][1]["score"]


@pytest.mark.parametrize("wide", ["I;16", "I", "F"])
def test_predict_reads_a_wide_image_as_the_shards_store_it(tmp_path, checkpoint, capsys, wide):
    """A 16-bit PNG, a 32-bit integer or float TIFF: the shard stage stores it as its 8-bit image
    (what the model trains on), and `bireal predict` reads it as that image, not as PIL's
    convert("RGB") makes it (clipped at 255: almost all white)."""
    from pipeline.shard import encode_image

    gray = np.random.default_rng(1).integers(0, 256, (30, 40)).astype(np.uint8)  # (H, W), 0 and 255 in it
    wide_pixels = {"I;16": gray.astype(np.uint16) * 257, "I": gray.astype(np.int32) * 257, "F": gray / np.float32(255)}
    wide_file = tmp_path / ("wide.png" if wide == "I;16" else "wide.tif")
    Image.fromarray(wide_pixels[wide]).save(wide_file)
    assert Image.open(wide_file).mode == wide
    eight_bit, white = tmp_path / "eight_bit.png", tmp_path / "white.png"
    Image.fromarray(gray).save(eight_bit)
    Image.fromarray(np.full_like(gray, 255)).save(white)

    encoded = encode_image(type("Ref", (), {"read": lambda self: wide_file.read_bytes()})(), 256, 100)
    assert "to 8-bit" in encoded.note
    sharded = np.asarray(Image.open(io.BytesIO(encoded.data)).convert("L"), dtype=float)
    assert np.abs(sharded - gray).mean() < 2  # the 8-bit image, up to JPEG's error at quality 100

    art = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(art)]) == 0
    capsys.readouterr()
    files = [wide_file, eight_bit, white]
    assert main(["predict", "--artifact", str(art), "--topk", "3", "--json", *map(str, files)]) == 0
    wide_scores, eight_bit_scores, white_scores = map(scores, capsys.readouterr().out.splitlines())
    assert wide_scores == pytest.approx(eight_bit_scores, abs=1e-6)
    assert white_scores != pytest.approx(eight_bit_scores, abs=1e-3)  # the test tells the two apart


def scores(json_line: str) -> dict[int, float]:
    return {top["class_id"]: top["score"] for top in json.loads(json_line)["top"]}


def test_export_takes_class_names_with_commas_from_a_file(tmp_path, checkpoint, capsys):
    """--class-names splits on commas; ImageNet's names hold them, so --class-names-file reads one per
    line, and a file that can't give names is named."""
    from cuda_ext.packed import read_artifact_header

    art = tmp_path / "model.safetensors"
    names = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n\n")
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(checkpoint),
                "--out",
                str(art),
                "--class-names-file",
                str(tmp_path / "names.txt"),
            ]
        )
        == 0
    )
    assert read_artifact_header(art)["class_names"] == names
    capsys.readouterr()
    assert main(["predict", "--artifact", str(art), str(write_image(tmp_path / "a.jpg"))]) == 0
    out = capsys.readouterr().out
    assert any(name in out for name in names), out
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n \n")
    (tmp_path / "twice.txt").write_text("cat\ndog\ncat\n")  # two outputs that predict could not tell apart
    for file, message in (
        ("latin1.txt", "latin1.txt: not UTF-8 text"),
        ("blank.txt", "blank.txt: no class names"),
        ("twice.txt", "the class names given: class_names[2]='cat' repeats class_names[0]"),
    ):
        argv = ["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x.safetensors")]
        assert main([*argv, "--class-names-file", str(tmp_path / file)]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    model, _ = bc.load_checkpoint(checkpoint)
    repeated = bc.save_checkpoint(tmp_path / "repeated.safetensors", model, config={"class_names": ["a", "b", "a"]})
    assert main(["export", "--checkpoint", str(repeated), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert f"{repeated} (config.class_names): class_names[2]='a' repeats class_names[0]" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_predict_errors_name_the_file(tmp_path, checkpoint, capsys):
    art = tmp_path / "model.safetensors"
    main(["export", "--checkpoint", str(checkpoint), "--out", str(art)])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    good = write_image(tmp_path / "ok.jpg")
    # 100000 x 1: 100 k pixels in a few hundred bytes, 3.2 M x 32 once resized for this model (a
    # 20000 x 1 strip took 6 GB through an ImageNet artifact's resize to 256)
    strip = tmp_path / "strip.png"
    Image.new("RGB", (100_000, 1)).save(strip)
    capsys.readouterr()
    assert main(["predict", "--artifact", str(art), str(good), str(bad), str(strip)]) == 1  # some images failed
    out, err = capsys.readouterr()
    assert "broken.jpg" in err and len(err.strip().splitlines()) == 2 and out.startswith(f"{good}: ")
    assert f"{strip}: 100000 x 1 would be 3200000 x 32 = 102,400,000 pixels with its shorter side resized" in err
    assert main(["predict", "--artifact", str(good), str(good)]) == 2
    assert "ok.jpg" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path / "nope.safetensors"), "--out", str(art)]) == 2
    assert "nope.safetensors" in capsys.readouterr().err


def test_predict_goes_a_batch_at_a_time(tmp_path, checkpoint, capsys):
    """Many files do not make one batch: results come a batch at a time, in order, the same as one
    batch gives, and a file is read only when its batch comes (here one written after the first
    batch's results were out)."""
    from cuda_ext.predict import iter_predictions, predict_files

    art = tmp_path / "model.safetensors"
    main(["export", "--checkpoint", str(checkpoint), "--out", str(art)])
    images = [write_image(tmp_path / f"{i}.jpg", size=(40 + 7 * i, 30)) for i in range(5)]
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths = [images[0], images[1], tmp_path / "bad.jpg", images[2], tmp_path / "late.jpg", images[3], images[4]]
    one_batch = predict_files(art, paths[:4] + paths[5:], topk=3, batch_size=64)

    results = iter_predictions(art, paths, topk=3, batch_size=2)
    first = [next(results), next(results)]
    write_image(tmp_path / "late.jpg", size=(50, 50))  # the generator has not read it yet
    rest = list(results)
    got = first + rest
    assert [r["path"] for r in got] == [str(p) for p in paths]
    assert "error" in got[2] and "bad.jpg" in got[2]["error"] and "top" in got[4]  # late.jpg was read
    for batched, whole in zip(got[:4] + got[5:], one_batch):
        assert batched.keys() == whole.keys()
        if "top" in whole:
            assert [t["class_id"] for t in batched["top"]] == [t["class_id"] for t in whole["top"]]
            assert [t["score"] for t in batched["top"]] == pytest.approx([t["score"] for t in whole["top"]], abs=1e-5)

    capsys.readouterr()
    assert main(["predict", "--artifact", str(art), "--batch-size", "2", "--json", *map(str, paths)]) == 1
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in lines] == [str(p) for p in paths] and "bad.jpg" in err


def test_predict_walks_folders(tmp_path, checkpoint, capsys):
    """A folder stands for its image files (PIL's suffixes, any case), walked in sorted order; its
    hidden names, other files and symlinked folders are left out; each line names the file by its
    path, since two folders may hold files of one name; a folder without images is an error line."""
    art = tmp_path / "model.safetensors"
    main(["export", "--checkpoint", str(checkpoint), "--out", str(art)])
    photos = tmp_path / "photos"
    for folder in ("a", "b", ".cache", "empty"):
        (photos / folder).mkdir(parents=True)
    found = [
        write_image(photos / "a" / "1.jpg"),
        write_image(photos / "b" / "1.jpg"),
        write_image(photos / "b" / "2.PNG"),
    ]
    write_image(photos / ".cache" / "3.jpg")
    write_image(photos / "b" / ".4.jpg")
    (photos / "b" / "notes.txt").write_text("not an image")
    (photos / "elsewhere").symlink_to(photos / "b", target_is_directory=True)
    capsys.readouterr()
    assert main(["predict", "--artifact", str(art), str(photos), str(photos / "empty")]) == 1
    out, err = capsys.readouterr()
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(p) for p in found]
    assert err.strip() == f"bireal predict: error: {photos / 'empty'}: a folder without image files " + (
        "(none named *.jpg, *.png, ... inside)"
    )


def png_header_only(path, width: int, height: int):
    """A PNG that claims ``width`` x ``height`` in its header, with a few bytes of pixel data: what a
    decompression bomb looks like before it is decoded."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


BOUNDED = """
import json, sys, time
from cuda_ext.packed import load_packed
from cuda_ext.predict import predict_files
def status_mb(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024
mode, artifact, *images = sys.argv[1:]
if mode == "predict":
    load_packed(artifact)  # the process's RSS after loading the artifact is the base
base = status_mb("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) counts from here
start = time.perf_counter()
if mode == "predict":
    out = [r.get("error", "ok") for r in predict_files(artifact, images)]
else:
    try:
        load_packed(artifact)
        out = "loaded"
    except Exception as e:
        out = f"{type(e).__name__}: {e}"
print(json.dumps({"out": out, "seconds": time.perf_counter() - start, "above_mb": status_mb("VmHWM") - base}))
"""


@pytest.mark.parametrize(
    "argv, message",
    [
        (["predict", "--artifact", "a.safetensors", "--topk", "0", "x.jpg"], "argument --topk: 0: must be >= 1"),
        (["bench", "model", "--device", "tpu"], "argument --device: 'tpu': cpu or cuda[:N]"),
        (["evaluate", "--artifact", "a", "--shards", "s", "--device", "cuda:x"], "argument --device: 'cuda:x'"),
        (["bench", "kernels", "--threads", "0"], "argument --threads: 0: must be >= 1"),
        (["submit", "--stage", "pretrain", "--timeout", "-5"], "argument --timeout: -5: must be > 0"),
        # an option of another benchmark was silently ignored: `bench model --arch bireal34` timed Bi-Real-18
        (["bench", "model", "--arch", "bireal34"], "unrecognized arguments: --arch bireal34"),
        (["bench", "data", "--threads", "4"], "unrecognized arguments: --threads 4"),
        (["predict", "--artifact", "a", "x.jpg", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_flags_out_of_range_are_refused_before_any_work(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"{command_name(argv)}: error: {message}" in capsys.readouterr().err


def command_name(argv: list[str]) -> str:
    """Whose words an error is in: ``bireal bench model`` for a benchmark, else ``bireal COMMAND``."""
    return "bireal " + " ".join(argv[:2] if argv[0] == "bench" else argv[:1])


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "--checkpoint", "c.safetensors", "--out", "{folder}"],
        ["evaluate", "--artifact", "a", "--shards", "s", "--metrics", "{folder}"],
        ["evaluate", "--artifact", "a", "--shards", "s", "--confusion", "{file}/confusion.csv"],
        ["train", "--stage", "binarize", "--history", "{folder}"],
        ["plan", "--gpus", "8", "--json", "{file}/plan.json"],
        ["bench", "kernels", "--jsonl", "{folder}"],
    ],
)
def test_an_output_that_cannot_be_a_file_is_refused_before_any_work(tmp_path, capsys, argv):
    """Before, `evaluate --metrics FOLDER` evaluated every image and then failed on the write, and
    `export --out FOLDER` left FOLDER.tmp behind."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    argv = [a.format(folder=tmp_path / "folder", file=tmp_path / "file") for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{command_name(argv)}: error: argument" in err
    assert ": is a folder; name the file to write" in err or f"{tmp_path / 'file'} is a file, not a folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"] and not any((tmp_path / "folder").iterdir())


def test_a_cuda_device_torch_cannot_see_is_refused_before_any_work(capsys):
    """Before, `evaluate --device cuda` on a machine without a GPU ended in torch's driver message
    after loading the artifact; now the flag is refused as it is parsed (bench said so already)."""
    argv = ["evaluate", "--artifact", "missing.safetensors", "--shards", "nowhere"]
    if torch.cuda.is_available():
        wanted, message = f"cuda:{torch.cuda.device_count()}", f"torch sees {torch.cuda.device_count()} CUDA device(s)"
    else:
        wanted, message = "cuda", f"no CUDA device visible to torch {torch.__version__}"
    with pytest.raises(SystemExit) as e:
        main([*argv, "--device", wanted])
    assert e.value.code == 2 and f"argument --device: '{wanted}': {message}" in capsys.readouterr().err


def test_summary_names_a_damaged_metrics_file_and_an_agreement_never_measured(
    tmp_path, checkpoint, capsys, monkeypatch
):
    """`bireal summary` printed json's "Expecting property name ..." or "Unknown format code 'f'"
    with no file named, and "agreement ... nan%" after an evaluation without --checkpoint."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(checkpoint, tmp_path / "checkpoints" / "finetune.safetensors")
    assert main(["export", "--checkpoint", str(checkpoint), "--out", "artifacts/model.safetensors"]) == 0
    (tmp_path / "metrics").mkdir()
    evaluation = tmp_path / "metrics" / "evaluate.json"
    for text, message in [
        ("{bad", "metrics/evaluate.json: not valid JSON (Expecting property name"),
        ('{"top1": "x", "images": 3, "split": "test"}', "metrics/evaluate.json: top1 is 'x', not what the stage"),
        ('{"top1": 0.5, "split": "test"}', "metrics/evaluate.json: images is None, not what the stage"),
    ]:
        evaluation.write_text(text)
        capsys.readouterr()
        assert main(["summary"]) == 2
        assert f"bireal summary: error: {message}" in capsys.readouterr().err
    evaluation.write_text(json.dumps({"top1": 0.5, "images": 3, "split": "test"}))
    capsys.readouterr()
    assert main(["summary"]) == 0
    out = capsys.readouterr().out
    assert "0.5000 on 3 test images; no agreement with the training graph measured" in out and "nan" not in out


def test_the_confusion_csv_keeps_class_names_with_commas_and_quotes(tmp_path):
    """ImageNet's names hold commas ("tench, Tinca tinca"): each row still reads back as three fields."""
    import csv

    from pipeline.evaluate import write_confusion

    names = ["tench, Tinca tinca", 'the "odd" one', "plain"]
    confusion = [[2, 1, 0], [0, 0, 3], [0, 0, 4]]
    write_confusion(names, confusion, str(tmp_path / "plots" / "confusion.csv"))
    rows = list(csv.DictReader((tmp_path / "plots" / "confusion.csv").open(newline="")))
    assert [(r["actual"], r["predicted"], int(r["count"])) for r in rows] == [
        (names[0], names[0], 2),
        (names[0], names[1], 1),
        (names[1], names[2], 3),
        (names[2], names[2], 4),
    ]


def test_evaluate_refuses_an_artifact_of_other_classes_or_another_checkpoint(tmp_path, checkpoint, demo_shards, capsys):
    """`bireal evaluate`: a 3-way artifact on the 10-class demo shards, or a checkpoint that is not
    the artifact's net (for the agreement), is named before any image is read; an evaluation split
    without images is refused, not scored 0."""
    artifact = tmp_path / "m.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(artifact)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--artifact", str(artifact), "--shards", str(demo_shards)]) == 2
    message = f"error: {artifact}: a 3-way model, but the shards at {demo_shards} have 10 classes"
    assert message in capsys.readouterr().err
    digits, wider = (
        bc.save_checkpoint(
            tmp_path / f"digits-{width}.safetensors",
            bc.create_model("bireal18", num_classes=10, stem="small", width=width).eval(),
            stage="finetune",
        )
        for width in (0.25, 0.5)
    )
    assert main(["export", "--checkpoint", str(digits), "--out", str(artifact)]) == 0
    capsys.readouterr()
    argv = ["evaluate", "--artifact", str(artifact), "--shards", str(demo_shards), "--checkpoint", str(wider)]
    assert main([*argv, "--metrics", str(tmp_path / "m.json")]) == 2
    assert f"error: {wider}: model " in capsys.readouterr().err and not (tmp_path / "m.json").exists()
    # the shards' classes in another order: every output would be scored against another class
    manifest_names = [c["name"] for c in json.loads((demo_shards / "manifest.json").read_text())["classes"]]
    swapped = [manifest_names[1], manifest_names[0], *manifest_names[2:]]
    argv = ["export", "--checkpoint", str(digits), "--out", str(artifact), "--class-names", ",".join(swapped)]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["evaluate", "--artifact", str(artifact), "--shards", str(demo_shards)]) == 2
    err = capsys.readouterr().err
    first = f"output 0 is class {swapped[0]!r}, but class 0 of the shards at {demo_shards} is {manifest_names[0]!r}"
    assert f"{first} (theirs 1)" in err
    # two swapped and one other name: not the same set of names, and still two outputs misaligned
    partly = [manifest_names[0], manifest_names[2], manifest_names[1], "other", *manifest_names[4:]]
    assert main([*argv[:-1], ",".join(partly)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--artifact", str(artifact), "--shards", str(demo_shards)]) == 2
    assert f"output 1 is class {partly[1]!r}, but class 1 of the shards" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(digits), "--out", str(artifact)]) == 0  # names "0".."9" again
    # an evaluation split without images: no top-1 of 0 to pass for a result
    empty = tmp_path / "empty-test-split"
    empty.mkdir()
    manifest = json.loads((demo_shards / "manifest.json").read_text())
    manifest["splits"]["test"] = {"count": 0, "shards": []}
    (empty / "manifest.json").write_text(json.dumps(manifest))
    assert (
        main(["evaluate", "--artifact", str(artifact), "--shards", str(empty), "--metrics", str(tmp_path / "m.json")])
        == 2
    )
    assert f"error: {empty}: the test split has no images to evaluate (0 quarantined" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
    # a shard the manifest lists is gone: a line naming it, not ShardIntegrityError's traceback
    partial = tmp_path / "partial-shards"
    shutil.copytree(demo_shards, partial)
    gone = json.loads((partial / "manifest.json").read_text())["splits"]["test"]["shards"][0]["name"]
    (partial / gone).unlink()
    argv = ["evaluate", "--artifact", str(artifact), "--shards", str(partial), "--metrics", str(tmp_path / "m.json")]
    assert main(argv) == 2
    assert f"bireal evaluate: error: {partial}/{gone}: missing (the manifest lists it)" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
    # a shard changed after sharding is found in the loader's worker process: its error, one line
    shutil.copy(demo_shards / gone, partial / gone)
    damaged = bytearray((partial / gone).read_bytes())
    damaged[5000] ^= 0xFF
    (partial / gone).write_bytes(bytes(damaged))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"bireal evaluate: error: {partial}/{gone}: size/sha256 mismatch" in err
    assert "Caught" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_register_refuses_a_bad_evaluation_before_any_work(tmp_path, checkpoint, capsys, monkeypatch):
    """`bireal register`: a missing or malformed evaluation file, or a top-1 under registry.min_top1
    (also under another --name), is refused naming it before the artifact, the shards or MLflow are
    touched (the artifact and shards here do not exist)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("registry:\n  min_top1: 0.5\n")
    base = ["register", "--artifact", "missing.safetensors", "--shards", "no-shards"]
    (tmp_path / "low.json").write_text(json.dumps({"top1": 0.3}))
    (tmp_path / "list.json").write_text("[0.9]")
    for evaluation, name, message in (
        ("gone.json", [], "gone.json: no evaluation metrics (bireal evaluate --metrics FILE writes them)"),
        ("list.json", [], "list.json: not the JSON of bireal evaluate"),
        ("low.json", [], "evaluation top1=0.3000 is below registry.min_top1=0.5; nothing registered"),
        ("low.json", ["--name", "elsewhere"], "evaluation top1=0.3000 is below registry.min_top1=0.5"),
    ):
        assert main([*base, "--evaluation", evaluation, *name]) == 2
        assert capsys.readouterr().err.startswith(f"bireal register: error: {message}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "list.json", "low.json", "params.yaml"]


def test_register_refuses_the_evaluation_of_another_artifact(tmp_path, checkpoint, demo_shards, capsys, monkeypatch):
    """`bireal evaluate` records the sha256 of the tensors it scored; `register` of another artifact
    with that evaluation is refused before MLflow is touched (before, A's top-1 was registered as
    B's). An evaluation of the artifact itself gets past that check; the artifact with its mean or
    class names edited afterwards (the sha256 covers the tensors only) does not."""
    from pipeline.adapters.registry import check_evaluated

    monkeypatch.chdir(tmp_path)
    digits = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25).eval()
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path, seed in ((first, 1), (second, 2)):
        torch.manual_seed(seed)
        for p in digits.parameters():
            p.data.normal_()
        ckpt = bc.save_checkpoint(tmp_path / f"c{seed}.safetensors", digits, stage="finetune")
        assert main(["export", "--checkpoint", str(ckpt), "--out", str(path)]) == 0
    evaluation = tmp_path / "eval-a.json"
    capsys.readouterr()
    assert main(["evaluate", "--artifact", str(first), "--shards", str(demo_shards), "--metrics", str(evaluation)]) == 0
    bar = capsys.readouterr().err.split("\r")[-1]  # the progress bar's last state
    assert bar.startswith("evaluate test: 100%") and "360/360" in bar, bar
    scored = json.loads(evaluation.read_text())["artifact_sha256"]
    # and on what: the digest of the test split's shards, what the registry compares top-1s by
    from pipeline.data import read_manifest
    from pipeline.evaluate import eval_data_digest

    manifest = read_manifest(str(demo_shards))
    on = json.loads(evaluation.read_text())["eval_data_sha256"]
    assert on == eval_data_digest(manifest, "test") != eval_data_digest(manifest, "train")
    capsys.readouterr()
    argv = ["register", "--artifact", str(second), "--evaluation", str(evaluation), "--shards", str(demo_shards)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{second}: the evaluation is of another artifact (sha256 {scored[:12]}..." in err
    assert "nothing registered" in err and not (tmp_path / "mlflow.db").exists()
    from cuda_ext.packed import read_artifact_header

    check_evaluated(json.loads(evaluation.read_text()), str(first), read_artifact_header(first))  # its own: no error

    # The same tensors (same sha256) under an edited header: scored as it was, not as it is now
    edits = {"input": {**bc.default_input_config("small"), "mean": [0.5, 0.5, 0.5]}, "class_names": list("abcdefghij")}
    for part, value in edits.items():
        edited = tmp_path / f"edited-{part}.safetensors"
        rewrite_artifact_header(first, edited, lambda header: {**header, part: value})
        argv = ["register", "--artifact", str(edited), "--evaluation", str(evaluation), "--shards", str(demo_shards)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{edited}: its header (model, class_names, input, conventions) changed after the evaluation" in err, err
        assert "nothing registered" in err and not (tmp_path / "mlflow.db").exists()


def test_bombs_get_a_clear_error_fast_and_small(tmp_path, checkpoint, capsys):
    """A 30k x 30k PNG, a 60 MP one (under PIL's own limit, over ours) and an artifact whose header
    claims a billion classes: a one-line error each within 5 s, peak memory < 200 MB above the
    process's after loading the artifact; the good image beside them is still classified."""
    import subprocess
    import sys

    art = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(art)]) == 0
    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    large = png_header_only(tmp_path / "large.png", 10000, 6000)
    good = write_image(tmp_path / "good.jpg")
    capsys.readouterr()
    assert main(["predict", "--artifact", str(art), str(good), str(bomb), str(large)]) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"{good}: ") and len(out.strip().splitlines()) == 1
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "bomb.png" in lines[0] and "large.png" in lines[1] and "Traceback" not in err
    assert "60,000,000 pixels, over the 40,000,000" in lines[1]

    def billion_classes(header):
        header["model"]["kwargs"]["num_classes"] = 10**9
        return header

    claims = tmp_path / "claims.safetensors"
    rewrite_artifact_header(art, claims, billion_classes)

    def bounded(*args):
        done = subprocess.run([sys.executable, "-c", BOUNDED, *map(str, args)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.splitlines()[-1])

    images = bounded("predict", art, bomb, large, good)
    assert images["out"][2] == "ok" and "bomb.png" in images["out"][0] and "large.png" in images["out"][1]
    artifact = bounded("load", claims)
    assert artifact["out"].startswith("ArtifactError") and "does not match the stored tensors" in artifact["out"]
    for result in (images, artifact):
        assert result["seconds"] < 5 and result["above_mb"] < 200, result


def test_bench_kernel_rows_and_table():
    """The benchmark code the CLI runs: every row has both sides and the derived columns (timings
    are printed, never asserted)."""
    from cuda_ext.benchmarks import BIREAL18_SHAPES, bench_kernels, format_table

    measured = []
    rows = bench_kernels("cpu", batches=(1,), repeats=1, on_row=measured.append)
    assert measured == rows  # each row handed on as measured (bireal bench --jsonl)
    assert [r["shape"] for r in rows] == [f"{c}x{s}x{s}" for c, s in BIREAL18_SHAPES]
    for r, (channels, side) in zip(rows, BIREAL18_SHAPES):
        assert r["ours_ms"] > 0 and r["baseline_ms"] > 0 and r["block_ms"] > 0
        assert r["speedup"] == r["baseline_ms"] / r["ours_ms"]
        # bytes: one int64 word per 64 input channels in, one float32 per output channel out
        moved = side * side * (8 * (channels // 64) + 4 * channels)
        assert r["ours_gb_s"] == pytest.approx(moved / r["ours_ms"] / 1e6)
    table = format_table(rows, "title")
    assert "64x56x56" in table and "block_speedup" in table and "baseline: F.conv2d float32" in table


def test_keep_freed_memory_keeps_a_freed_block_in_the_process():
    """With glibc's defaults a freed 64 MB tensor goes back to the OS (the next one faults in fresh
    pages); after keep_freed_memory() it stays in the process (RSS unchanged by the free). Each
    setting in a process of its own: the switch is process-wide."""
    import subprocess
    import sys

    script = """
import sys, torch
from cuda_ext.memory import keep_freed_memory
def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
if sys.argv[1] == "kept":
    assert keep_freed_memory()
x = torch.empty(16 * 2**20).fill_(1.0)  # 64 MB, touched
before = rss_mb()
del x
print(round(before - rss_mb()))
"""
    released = {}
    for mode in ("default", "kept"):
        done = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        released[mode] = int(done.stdout.split()[-1])
    assert released["default"] >= 60 and released["kept"] <= 4, released


RELEASED_AFTER = """
import sys, torch
def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
x = torch.empty(16 * 2**20).fill_(1.0)  # 64 MB, touched
before = rss_mb()
del x
print("released", round(before - rss_mb()))
"""


def test_what_users_run_keeps_freed_memory(tmp_path, checkpoint, demo_shards):
    """`bireal predict`, `bireal evaluate` and the pyfunc inside MLflow's model server run with freed
    memory kept (a freed 64 MB block stays in the process afterwards); the pyfunc loaded into a
    user's own process leaves the allocator alone. Each in a process of its own."""
    import subprocess
    import sys

    from pipeline.cli import main

    artifact = tmp_path / "m.safetensors"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(artifact)]) == 0
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    digits = bc.save_checkpoint(
        tmp_path / "digits.safetensors",
        bc.create_model("bireal18", num_classes=10, stem="small", width=0.25).eval(),
        stage="finetune",
        config={"class_names": [str(i) for i in range(10)]},
    )
    digits_artifact = tmp_path / "digits-packed.safetensors"
    assert main(["export", "--checkpoint", str(digits), "--out", str(digits_artifact)]) == 0
    runs = {
        "predict": f"from pipeline.cli import main; main(['predict', '--artifact', {str(artifact)!r}, {str(image)!r}])",
        "evaluate": (
            "from pipeline.cli import main; "
            f"main(['evaluate', '--artifact', {str(digits_artifact)!r}, '--shards', {str(demo_shards)!r}])"
        ),
        "pyfunc in the model server": (
            "import os; os.environ['__pyfunc_model_path__'] = 'x'\n"
            "from pipeline.adapters.pyfunc_model import BirealPackedModel\n"
            "from types import SimpleNamespace as NS\n"
            f"BirealPackedModel().load_context(NS(artifacts={{'packed': {str(artifact)!r}}}))"
        ),
        "pyfunc in a user's process": (
            "from pipeline.adapters.pyfunc_model import BirealPackedModel\n"
            "from types import SimpleNamespace as NS\n"
            f"BirealPackedModel().load_context(NS(artifacts={{'packed': {str(artifact)!r}}}))"
        ),
    }
    released = {}
    for name, code in runs.items():
        done = subprocess.run([sys.executable, "-c", code + "\n" + RELEASED_AFTER], capture_output=True, text=True)
        assert done.returncode == 0, (name, done.stderr[-2000:])
        released[name] = int(done.stdout.split()[-1])
    assert released["predict"] <= 4 and released["evaluate"] <= 4, released
    assert released["pyfunc in the model server"] <= 4, released
    assert released["pyfunc in a user's process"] >= 60, released


def test_bench_memory_and_model_rows():
    """`bireal bench memory` pairs (fused pool vs apart, fresh vs cached residual, fused stem vs
    not) and the model rows' second setting (freed memory kept), in a process of its own: the
    model bench switches the allocator process-wide."""
    import json
    import subprocess
    import sys

    script = """
import json
from cuda_ext.benchmarks import bench_memory, bench_model, format_table
memory = bench_memory("cpu", repeats=1)
model = bench_model("cpu", batches=(1,), repeats=1)
print(format_table(memory, "memory"))
print(json.dumps({"memory": memory, "model": model}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    assert [(r["shape"], r["batch"]) for r in rows["memory"]] == [
        ("stem pool 64x112x112", 1),
        ("stem pool 64x112x112", 16),
        ("layer-1 block 64x56x56", 16),
        ("bireal18 stem fused @224", 1),
        ("bireal18 stem fused @224", 16),
    ]
    for r in rows["memory"]:
        assert r["ours_ms"] > 0 and ("speedup" in r) == ("baseline_ms" in r)
    assert rows["memory"][2]["block_ms"] > 0
    (model,) = rows["model"]  # the headline as a user runs it (freed memory kept), glibc's defaults beside
    assert model["ours_glibc_ms"] > 0 and model["speedup_glibc"] == model["baseline_glibc_ms"] / model["ours_glibc_ms"]
    assert model["speedup"] == model["baseline_ms"] / model["ours_ms"] and "as bireal predict" in model["baseline"]
    assert "stem pool 64x112x112" in done.stdout and "block_ms" in done.stdout
