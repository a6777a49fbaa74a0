"""What crosses from one GPU window to the next: a finished stage's checkpoints, packed losslessly
into parts that the device tool brings back (files of at most 16 MiB) and that travel in again with
the next call (64 MiB in all, the CIFAR-10 shards included).

A width-1.0 Bi-Real-18 twin is 42.7 MiB of float32. zlib alone saves 8% of that; with the bytes
of each 4-byte word grouped by position first (the "shuffle" filter of HDF5 and Blosc: the sign
and exponent bytes of similar weights sit together) it saves about 15%: 36.1 MiB in 3 parts, which
with the 20 MiB of shards and the repository fits the 64 MiB a call carries in. Every file is checked against its
sha256 when it is unpacked, so the next window trains from exactly the weights the last one saved.

    pack_trip([checkpoint, ...], folder)    # folder/trip.json + folder/<name>.part000, ...
    unpack_trip(folder, destination)        # -> the files, verified, each written whole or not at all

Before a call, ``python3 -m bench.trip --carry PATH ...`` says what it would carry in from this
checkout and whether that fits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import zlib
from pathlib import Path

import numpy as np

PART_BYTES = 15 * 2**20  # under the device tool's 16 MiB per returned file
MANIFEST = "trip.json"


def shuffle_bytes(data: bytes) -> bytes:
    """The bytes at positions 0, 4, 8, ..., then 1, 5, 9, ..., and so on (zero-padded to a multiple of 4)."""
    padded = data + bytes(-len(data) % 4)
    return np.frombuffer(padded, dtype=np.uint8).reshape(-1, 4).T.tobytes()


def unshuffle_bytes(data: bytes, size: int) -> bytes:
    """shuffle_bytes undone: the first ``size`` bytes of the original."""
    return np.frombuffer(data, dtype=np.uint8).reshape(4, -1).T.tobytes()[:size]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_trip(files: list[Path], folder: Path, part_bytes: int = PART_BYTES) -> dict:
    """Each file shuffled, compressed and cut into parts of at most ``part_bytes`` in ``folder``,
    with ``trip.json`` naming, per file, its size, its sha256 and its parts' names and sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"part_bytes": part_bytes, "files": []}
    for path in files:
        data = Path(path).read_bytes()
        packed = zlib.compress(shuffle_bytes(data), 6)
        parts = []
        for k, start in enumerate(range(0, len(packed), part_bytes)):
            part = folder / f"{Path(path).name}.part{k:03d}"
            part.write_bytes(packed[start : start + part_bytes])
            parts.append({"name": part.name, "sha256": sha256(packed[start : start + part_bytes])})
        manifest["files"].append({"name": Path(path).name, "bytes": len(data), "sha256": sha256(data), "parts": parts})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def trip_bytes(folder: Path) -> int:
    """What a packed trip in ``folder`` carries: its parts and manifest, in bytes."""
    manifest = json.loads((folder / MANIFEST).read_text())
    names = [MANIFEST] + [part["name"] for entry in manifest["files"] for part in entry["parts"]]
    return sum((folder / name).stat().st_size for name in names)


def unpack_trip(folder: Path, destination: Path) -> list[Path]:
    """The files of the trip in ``folder`` restored into ``destination``, each checked part by part
    and whole against its sha256; a missing or damaged part is named and nothing of that file is
    written (each goes to a temporary name and is renamed once verified)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no trip here (a window that leaves stages writes one)")
    manifest = json.loads(manifest_path.read_text())
    destination.mkdir(parents=True, exist_ok=True)
    restored = []
    for entry in manifest["files"]:
        chunks = []
        for part in entry["parts"]:
            path = folder / part["name"]
            if not path.is_file():
                raise FileNotFoundError(f"{path}: part of {entry['name']} missing (did it come back from the window?)")
            chunk = path.read_bytes()
            if sha256(chunk) != part["sha256"]:
                raise ValueError(f"{path}: sha256 {sha256(chunk)[:12]}..., {MANIFEST} says {part['sha256'][:12]}...")
            chunks.append(chunk)
        data = unshuffle_bytes(zlib.decompress(b"".join(chunks)), entry["bytes"])
        if sha256(data) != entry["sha256"]:
            got, said = sha256(data)[:12], entry["sha256"][:12]
            raise ValueError(f"{folder}: {entry['name']} unpacks to sha256 {got}..., {MANIFEST} says {said}...")
        target = destination / entry["name"]
        temporary = target.with_name(target.name + ".unpacking")
        temporary.write_bytes(data)
        os.replace(temporary, target)
        restored.append(target)
    return restored


# ---- what one device call carries in

CARRY_IN_BYTES = 64 * 2**20  # the working tree that travels, carried paths included


def travelling_bytes(root: Path, carry: list[str]) -> tuple[int, int]:
    """(bytes, files) of what a device call takes from ``root``: the files git tracks or would add
    (untracked, not ignored) and every file under the ``carry`` paths."""
    listed = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    files = {root / name.decode() for name in listed if name}
    for path in carry:
        target = root / path
        if not target.exists():
            raise FileNotFoundError(f"{target}: a carried path that is not here")
        files |= {target} if target.is_file() else {p for p in target.rglob("*") if p.is_file()}
    files = {f for f in files if f.is_file()}  # a tracked file deleted in the working tree does not travel
    return sum(f.stat().st_size for f in files), len(files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="What a device call would carry in from this checkout.")
    parser.add_argument("--carry", nargs="*", default=[], help="ignored paths the call names in carry")
    args = parser.parse_args(argv)
    size, files = travelling_bytes(Path.cwd(), args.carry)
    fits = size <= CARRY_IN_BYTES
    print(
        f"{size / 2**20:.1f} MiB in {files} files (the limit: {CARRY_IN_BYTES / 2**20:.0f} MiB): "
        + ("fits" if fits else "does NOT fit: carry less")
    )
    return 0 if fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
