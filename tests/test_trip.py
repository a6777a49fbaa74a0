"""bench/trip.py: a finished stage's checkpoints packed into parts under 16 MiB to come back from a
GPU window, and unpacked in the next one exactly as they were, or not at all."""

import json
import subprocess
import zlib

import pytest
import torch
from safetensors.torch import save_file

from bench import trip
from bench.trip import MANIFEST, pack_trip, shuffle_bytes, trip_bytes, unpack_trip, unshuffle_bytes


@pytest.fixture()
def checkpoints(tmp_path):
    """A float32 checkpoint like a twin's (weights of similar magnitude), and a file of odd length."""
    g = torch.Generator().manual_seed(0)
    weights = {f"layer{i}.weight": torch.randn(64, 64, 3, 3, generator=g) * 0.05 for i in range(6)}
    weights["steps"] = torch.tensor([7], dtype=torch.int64)
    twin = tmp_path / "ckpt" / "pretrain-clip.safetensors"
    twin.parent.mkdir()
    save_file(weights, twin)
    odd = tmp_path / "ckpt" / "notes.bin"
    odd.write_bytes(bytes(range(251)) * 3)
    return [twin, odd]


def test_shuffling_groups_each_words_bytes_and_undoes_itself():
    data = bytes(range(10))
    assert shuffle_bytes(data) == bytes([0, 4, 8, 1, 5, 9, 2, 6, 0, 3, 7, 0])  # padded to 12
    assert unshuffle_bytes(shuffle_bytes(data), len(data)) == data


def test_a_trip_comes_back_bit_for_bit_in_parts_under_the_limit(checkpoints, tmp_path):
    manifest = pack_trip(checkpoints, tmp_path / "trip", part_bytes=100_000)
    twin_parts = manifest["files"][0]["parts"]
    assert len(twin_parts) >= 2 and all((tmp_path / "trip" / p["name"]).stat().st_size <= 100_000 for p in twin_parts)
    # the shuffle pays: float32 weights pack smaller than zlib alone packs them
    plain = len(zlib.compress(checkpoints[0].read_bytes(), 6))
    assert sum((tmp_path / "trip" / p["name"]).stat().st_size for p in twin_parts) < plain
    assert trip_bytes(tmp_path / "trip") == sum(f.stat().st_size for f in (tmp_path / "trip").iterdir())

    restored = unpack_trip(tmp_path / "trip", tmp_path / "next")
    assert [p.name for p in restored] == ["pretrain-clip.safetensors", "notes.bin"]
    for original, copy in zip(checkpoints, restored):
        assert copy.read_bytes() == original.read_bytes()


def test_a_damaged_or_missing_part_is_named_and_nothing_of_its_file_written(checkpoints, tmp_path):
    pack_trip(checkpoints[:1], tmp_path / "trip", part_bytes=100_000)
    part = tmp_path / "trip" / "pretrain-clip.safetensors.part001"
    good = part.read_bytes()
    part.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(ValueError, match=r"pretrain-clip.safetensors.part001: sha256 .* trip.json says"):
        unpack_trip(tmp_path / "trip", tmp_path / "next")
    part.unlink()
    with pytest.raises(FileNotFoundError, match=r"part001: part of pretrain-clip.safetensors missing"):
        unpack_trip(tmp_path / "trip", tmp_path / "next")
    assert not list((tmp_path / "next").iterdir())

    # parts intact but the manifest's whole-file digest disagrees: refused too
    part.write_bytes(good)
    manifest = json.loads((tmp_path / "trip" / MANIFEST).read_text())
    manifest["files"][0]["sha256"] = "0" * 64
    (tmp_path / "trip" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"pretrain-clip.safetensors unpacks to sha256"):
        unpack_trip(tmp_path / "trip", tmp_path / "next")
    assert not list((tmp_path / "next").iterdir())
    with pytest.raises(FileNotFoundError, match="no trip here"):
        unpack_trip(tmp_path / "nothing", tmp_path / "next")


def test_what_a_call_carries_in_is_the_tree_git_sees_and_the_carried_paths(tmp_path, capsys, monkeypatch):
    """Tracked and untracked-not-ignored files travel; ignored ones only when carried; a carried
    path that is not there is named; the command says whether it fits."""
    root = tmp_path / "repo"
    (root / "data" / "shards").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    (root / ".gitignore").write_text("/data/\n")
    (root / "tracked.py").write_bytes(b"x" * 1000)
    subprocess.run(["git", "-C", str(root), "add", "."], check=True)
    (root / "new.py").write_bytes(b"y" * 300)  # untracked, not ignored
    (root / "data" / "shards" / "a.tar").write_bytes(b"z" * 5000)
    (root / "data" / "shards" / "b.tar").write_bytes(b"z" * 7000)
    tree = 1000 + 300 + len("/data/\n")
    assert trip.travelling_bytes(root, []) == (tree, 3)
    assert trip.travelling_bytes(root, ["data/shards"]) == (tree + 12000, 5)
    with pytest.raises(FileNotFoundError, match="data/elsewhere: a carried path that is not here"):
        trip.travelling_bytes(root, ["data/elsewhere"])

    monkeypatch.chdir(root)
    assert trip.main(["--carry", "data/shards"]) == 0 and "fits" in capsys.readouterr().out
    monkeypatch.setattr(trip, "CARRY_IN_BYTES", 10_000)
    assert trip.main(["--carry", "data/shards"]) == 1 and "does NOT fit" in capsys.readouterr().out
