"""The checkpoint format every stage reads and writes.

One ``.safetensors`` file (no pickle): the model's state dict as tensors, and in the safetensors
metadata under the key ``bireal`` a JSON header::

    {"format": "bireal-checkpoint", "version": 1,
     "model": {"name": "bireal18", "kwargs": {"num_classes": 10, "stem": "small", ...}},
     "stage": "binarize", "config": {...resolved stage config...}, "metrics": {...}}

``load_checkpoint`` rebuilds the exact model from the header through the model registry, once it
has built it on the meta device and found exactly the file's tensor names and shapes: a header
edited or written by other code is a ``CheckpointError`` naming the file, never a half-loaded model
or an allocation the header asked for.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .registry import create_model

FORMAT = "bireal-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable bireal checkpoint (the message names the file)."""


class NonFiniteError(ValueError):
    """A model with NaN or infinite tensors, which is never written as a checkpoint."""


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    stage: str = "",
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` with its header; written to a temporary name, then renamed (atomic). A model
    with a NaN or infinite tensor is refused (``NonFiniteError``): such a file would pass for a
    result, replace a good one, and be exported, evaluated and registered."""
    spec = getattr(model, "model_spec", None)
    if spec is None:
        raise ValueError("model has no model_spec: build it with bireal_core.create_model")
    header = {
        "format": FORMAT,
        "version": VERSION,
        "model": spec,
        "stage": stage,
        "config": config or {},
        "metrics": metrics or {},
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        named = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise NonFiniteError(f"{path}: not written: {len(bad)} tensors hold NaN or inf ({named})")
    return write_safetensors(path, state, "bireal", header)


def write_safetensors(path: str | os.PathLike, tensors: dict, key: str, header: dict) -> Path:
    """Tensors + a JSON header under metadata ``key``; written to NAME.tmp, then renamed (atomic),
    with the permissions of any file this process creates (the umask's)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; name the file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb"):  # created as open() creates files: 0666 less the umask
            mode = stat.S_IMODE(os.stat(tmp).st_mode)
        # safetensors writes a private temporary file (0600) and renames it over tmp: a checkpoint or
        # artifact would be unreadable by the cluster's other users and by a model server of another uid
        save_file(tensors, str(tmp), metadata={key: json.dumps(header, sort_keys=True)})
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed or interrupted write leaves nothing behind
        raise
    return path


# The safetensors metadata keys of this project's two file kinds: what an error says a file is
HEADER_KINDS = {
    "bireal": "a training checkpoint (bireal export packs it)",
    "bireal_packed": "a packed artifact (bireal export's output)",
}


def project_file_kind(path: str | os.PathLike) -> str | None:
    """What ``HEADER_KINDS`` says of a file this project wrote, or None for any other file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError):
        return None
    return _kind_of(meta)


def _kind_of(meta: dict) -> str | None:
    """What ``HEADER_KINDS`` says of a file by its safetensors metadata, or None."""
    return next((kind for key, kind in HEADER_KINDS.items() if key in meta), None)


def read_safetensors_header(path: str | os.PathLike, key: str, error: type[Exception], what: str) -> dict:
    """The JSON header under metadata ``key``; ``error`` (naming the file) when it can't be read."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    if key not in meta:
        other = _kind_of(meta)
        raise error(f"{path}: no {key} header: not a {what}" + (f"; it is {other}" if other else ""))
    try:
        header = json.loads(meta[key])
    except json.JSONDecodeError as e:
        raise error(f"{path}: the {key} header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise error(f"{path}: the {key} header is a JSON {type(header).__name__}, not an object")
    return header


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a checkpoint, without loading its tensors."""
    header = read_safetensors_header(path, "bireal", CheckpointError, "bireal checkpoint")
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("version", 0) > VERSION:
        raise CheckpointError(f"{path}: version {header['version']} is newer than this code ({VERSION})")
    return header


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model recorded in the header and load its weights: (model, header). The model is
    first built on the meta device and compared with the shapes the file stores, so a header that
    cannot be built or claims a billion classes is a ``CheckpointError`` naming the file, before
    any weight is allocated or read."""
    header = read_header(path)
    spec = header.get("model")
    check_model_matches_file(path, spec)
    model = create_model(spec["name"], **spec["kwargs"])
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
    model.load_state_dict(state, strict=True)
    return model.to(device), header


def check_model_matches_file(path: str | os.PathLike, spec: object) -> None:
    """The model ``spec`` names, built on the meta device (nothing allocated), has exactly the
    tensor names and shapes the file stores (read from its index, not its data)."""
    try:
        with torch.device("meta"):
            model = create_model(spec["name"], **spec["kwargs"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: the header's model {spec!r} cannot be built: {e!r}") from e
    with safe_open(str(path), framework="pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    mismatch = shape_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, stored)
    if mismatch:
        raise CheckpointError(f"{path}: the header's model does not match the stored tensors ({mismatch})")


def shape_mismatch(expected: dict[str, tuple], stored: dict[str, tuple]) -> str:
    """'' when a header's model has exactly the file's tensors ({name: shape} each), else how many
    differ and the first: "101 differ; blocks.0.bn.bias: header (32,), file (16,)"."""
    if expected == stored:
        return ""
    wrong = sorted(set(expected) ^ set(stored)) or sorted(k for k in expected if expected[k] != stored[k])
    first = wrong[0]
    return f"{len(wrong)} differ; {first}: header {expected.get(first)}, file {stored.get(first)}"
