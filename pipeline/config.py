"""Configuration flows one way: typed defaults (dataclasses) <- params.yaml <- command line.

``load_section`` reads one section of params.yaml into a dataclass, rejecting unknown keys and
wrong types with a message naming the file and the dotted key, before any work starts.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad params.yaml entry or override; the message names the file and the dotted key."""


def default_params_path() -> Path:
    """$BIREAL_PARAMS, else params.yaml in the current directory (where `dvc repro` runs stages)."""
    return Path(os.environ.get("BIREAL_PARAMS", Path.cwd() / "params.yaml"))


def read_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(path) if path else default_params_path()
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_type(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def build(cls: type[T], values: dict[str, Any], where: str) -> T:
    """``cls(**values)`` with every key and type checked; ``where`` prefixes error messages."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    checked = {k: _check_type(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**checked)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from e


def load_section(cls: type[T], section: str, params_path: str | os.PathLike | None = None,
                 overrides: dict[str, Any] | None = None) -> T:
    """Defaults of ``cls`` <- ``params.yaml[section]`` <- ``overrides`` (None values ignored)."""
    path = Path(params_path) if params_path else default_params_path()
    values = dict(read_params(path).get(section) or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build(cls, values, f"{path.name}:{section}")


def validate_params(params_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check every section of params.yaml (unknown sections and keys, wrong types, bad values)
    before any stage runs; -> the resolved settings. Raises ConfigError naming file and key."""
    from dataclasses import asdict

    from .ray_train import RayConfig
    from .shard import ShardParams
    from .stages import resolve_train_config
    from .tracking import MlflowConfig, RegistryConfig
    from .train import STAGES
    from .tune import TuneSettings

    path = Path(params_path) if params_path else default_params_path()
    params = read_params(path)
    sections = {"data": DataConfig, "shard": ShardParams, "ray": RayConfig, "mlflow": MlflowConfig,
                "registry": RegistryConfig, "tune": TuneSettings}
    known = set(sections) | {"train", *STAGES}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{path.name}:{unknown[0]}: unknown section (known: {', '.join(sorted(known))})")
    resolved = {name: asdict(load_section(cls, name, path)) for name, cls in sections.items()}
    resolved.update({stage: asdict(resolve_train_config(stage, str(path))) for stage in STAGES})
    return resolved


@dataclasses.dataclass
class DataConfig:
    source: str = "demo"     # image-folder tree, folder with the ILSVRC2012 tars, or "demo"
