import json

import pytest
import torch

import bireal_core as bc


def trained_like(name="bireal18"):
    model = bc.create_model(name, num_classes=10, stem="small", width=0.25, weight_gradient="official")
    model.train()
    with torch.no_grad():
        for _ in range(2):  # move BN running statistics away from their defaults
            model(torch.randn(4, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("name", ["bireal18", "bireal50", "resnet18"])
def test_round_trip_rebuilds_exact_model(tmp_path, name):
    model = trained_like(name) if name != "resnet18" else bc.create_model(name, num_classes=10, stem="small").eval()
    path = bc.save_checkpoint(
        tmp_path / "m.safetensors", model, stage="binarize", config={"lr": 0.01}, metrics={"val_top1": 0.5}
    )
    loaded, header = bc.load_checkpoint(path)
    assert header["stage"] == "binarize" and header["config"] == {"lr": 0.01}
    assert header["metrics"] == {"val_top1": 0.5}
    assert loaded.model_spec == model.model_spec
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded.eval()(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_no_pickle_and_header_readable(tmp_path):
    path = bc.save_checkpoint(tmp_path / "m.safetensors", trained_like())
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + header_len])["__metadata__"]
    assert json.loads(meta["bireal"])["model"]["name"] == "bireal18"
    assert b"\x80\x04" not in raw[: 8 + header_len]  # no pickle protocol marker in the header


def test_two_step_state_survives(tmp_path):
    model = bc.create_model("bireal18", num_classes=10, stem="small", width=0.25, binary_weights=False)
    bc.set_binary_weights(model, True)
    loaded, _ = bc.load_checkpoint(bc.save_checkpoint(tmp_path / "m.safetensors", model))
    assert all(m.is_binary for m in loaded.modules() if isinstance(m, bc.BinaryConv2d))


def test_bad_files_rejected_with_path(tmp_path):
    with pytest.raises(bc.CheckpointError, match="not found"):
        bc.load_checkpoint(tmp_path / "absent.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(bc.CheckpointError, match="junk.safetensors"):
        bc.load_checkpoint(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(bc.CheckpointError, match="no bireal header: not a bireal checkpoint"):
        bc.load_checkpoint(plain)
    good = bc.save_checkpoint(tmp_path / "good.safetensors", trained_like())
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(bc.CheckpointError, match="truncated.safetensors: not a readable safetensors file"):
        bc.load_checkpoint(truncated)


def test_files_get_the_processs_permissions_and_say_what_they_are(tmp_path):
    """A checkpoint and an artifact are created as any file of this process (0666 less the umask,
    where safetensors alone makes them 0600: unreadable by a model server of another user); each
    read as the other kind says what it is; an export never writes over its own checkpoint."""
    import os
    import stat

    from cuda_ext.packed import ArtifactError, export_checkpoint, load_packed

    old = os.umask(0o027)
    try:
        checkpoint = bc.save_checkpoint(tmp_path / "m.safetensors", trained_like())
        artifact = export_checkpoint(checkpoint, tmp_path / "packed.safetensors")
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in (checkpoint, artifact)] == [0o640, 0o640]
    with pytest.raises(bc.CheckpointError, match="it is a packed artifact"):
        bc.load_checkpoint(artifact)
    with pytest.raises(ArtifactError, match="it is a training checkpoint"):
        load_packed(checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(ArtifactError, match="is the checkpoint itself"):
        export_checkpoint(checkpoint, tmp_path / "." / "m.safetensors")
    assert checkpoint.read_bytes() == before


def test_a_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    """`bireal export --out FOLDER` used to fail on the rename and leave FOLDER.tmp (161 KB) behind;
    a folder is now refused first, and a write that fails midway removes its temporary file."""
    import bireal_core.checkpoint as ck

    folder = tmp_path / "artifacts"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match="artifacts: is a folder; name the file to write"):
        bc.save_checkpoint(folder, trained_like())

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        bc.save_checkpoint(tmp_path / "m.safetensors", trained_like())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts"]


def _without_model(header):
    del header["model"]
    return header


def _edit_model(change):
    def apply(header):
        change(header["model"])
        return header

    return apply


@pytest.mark.parametrize(
    "change, message",
    [
        (_without_model, "the header's model None cannot be built"),
        (_edit_model(lambda m: m["kwargs"].update(widht=1)), "unexpected keyword argument 'widht'"),
        (_edit_model(lambda m: m.update(name="bireal19")), "unknown model 'bireal19'; registered: "),
        (_edit_model(lambda m: m["kwargs"].update(width=-1)), "width=-1: the channel multiplier must be > 0"),
        (
            _edit_model(lambda m: m["kwargs"].update(width=0.5)),
            "the header's model does not match the stored tensors (101 differ; blocks.0.bn.bias: header (32,), "
            "file (16,))",
        ),
        (  # built for real, this would ask for 512 GB before the shapes were compared
            _edit_model(lambda m: m["kwargs"].update(num_classes=10**9)),
            "does not match the stored tensors (2 differ; fc.bias: header (1000000000,), file (10,))",
        ),
    ],
    ids=["no-model", "unknown-argument", "unknown-name", "bad-width", "other-width", "a-billion-classes"],
)
def test_a_header_that_does_not_build_its_tensors_is_refused_naming_the_file(tmp_path, change, message):
    """Every stage loads checkpoints through load_checkpoint (export, evaluate --checkpoint, init_from):
    a header edited or written by other code is a CheckpointError naming the file and what is wrong,
    decided on the meta device before any weight is allocated, not a TypeError or a state-dict dump."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    good = bc.save_checkpoint(tmp_path / "good.safetensors", trained_like(), stage="finetune")
    with safe_open(str(good), "pt") as f:
        header = json.loads(f.metadata()["bireal"])
    bad = tmp_path / "edited.safetensors"
    save_file(load_file(str(good)), str(bad), metadata={"bireal": json.dumps(change(header))})
    with pytest.raises(bc.CheckpointError) as refused:
        bc.load_checkpoint(bad)
    assert str(refused.value).startswith(f"{bad}: ") and message in str(refused.value), refused.value
