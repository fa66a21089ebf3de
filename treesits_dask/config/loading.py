"""Loading settings: one YAML reader, one layering rule and one error format for every command.

Sources are layered: defaults < YAML file < environment (``TREESITS_<KEY>``, run settings only)
< command-line flags.  Unknown keys are rejected with the list of valid ones; every problem is a
:class:`~treesits_dask.errors.ConfigError` that names the setting and where it came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from ..io import storage
from .kubernetes import valid_keys
from .run import RunConfig
from .training import SampleSettings, TrainConfig

__all__ = [
    "ENV_PREFIX",
    "format_errors",
    "load_config",
    "load_sample_settings",
    "load_settings",
    "load_train_config",
    "read_yaml",
]

ENV_PREFIX = "TREESITS_"
#: settings that hold paths: relative local paths are made absolute when loaded
_PATH_KEYS = ("cube", "output", "model", "model_params", "mask_dir", "mask_worldcover")

S = TypeVar("S", bound=BaseModel)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping of settings; ``-`` in keys becomes ``_`` (flag spelling is accepted)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; check --config")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {p} must be a mapping of settings, got {type(loaded).__name__}"
        )
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def _absolute(url: str | None) -> str | None:
    if url is None or storage.is_remote(url):
        return url
    return str(Path(storage.strip_protocol(url)))


def _env_values(model: type[BaseModel], environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in model.model_fields:
                out[name] = value
    return out


def _model_of(annotation) -> type[BaseModel] | None:
    """The settings model in an annotation such as ``SmoothingSettings | None``."""
    import typing

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def format_errors(exc: ValidationError, model: type[BaseModel], sources: str) -> str:
    """One line per problem, naming the setting, its source and (for unknown keys) the valid
    ones."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            nested = model.model_fields.get(str(err["loc"][0])) if len(err["loc"]) > 1 else None
            if len(err["loc"]) > 1 and err["loc"][0] == "kubernetes":
                valid = ", ".join(valid_keys(err["loc"][1:]))
            elif nested is not None and len(err["loc"]) == 2 and _model_of(nested.annotation):
                valid = ", ".join(sorted(_model_of(nested.annotation).model_fields))
            else:
                valid = ", ".join(sorted(model.model_fields))
            lines.append(f"unknown setting {loc!r} (from {sources}); valid settings are: {valid}")
        elif err["type"] == "missing":
            lines.append(
                f"setting {loc!r} is required (flag --{loc.replace('_', '-')} or key {loc} in YAML)"
            )
        else:
            lines.append(f"setting {loc!r}: {msg}")
    return "; ".join(lines)


def load_settings(
    model: type[S],
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    keys: set[str] | None = None,
) -> S:
    """``model`` from a YAML file, ``TREESITS_*`` variables of ``environ`` (None: none) and
    ``overrides`` (flags; None values are left out; a mapping changes only its keys of a nested
    setting such as ``smoothing``).  ``keys`` (optional) keeps only those keys of
    the YAML file (``evaluate`` reads the sample settings of a train.yaml)."""
    values: dict[str, Any] = {}
    sources = []
    if path is not None:
        loaded = read_yaml(path)
        values.update({k: v for k, v in loaded.items() if keys is None or k in keys})
        sources.append(str(path))
    if environ is not None:
        env = _env_values(model, environ)
        if env:
            sources.append("environment")
        values.update(env)
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            value = {**values[key], **value}  # flags change single keys of a nested setting
        values[key] = value
    if overrides:
        sources.append("command line")
    for key in _PATH_KEYS:
        if key in model.model_fields and isinstance(values.get(key), str):
            values[key] = _absolute(values[key])
    try:
        return model(**values)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, model, " + ".join(sources) or "defaults")) from None


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """A :class:`RunConfig` from a YAML file, ``TREESITS_*`` variables (default: this process's
    environment) and overrides (flags)."""
    return load_settings(RunConfig, path, overrides, os.environ if environ is None else environ)


def load_train_config(
    path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file and overrides (flags)."""
    return load_settings(TrainConfig, path, overrides)


def load_sample_settings(
    path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> SampleSettings:
    """The sample settings of ``evaluate``: from a YAML file (e.g. the train.yaml; its training
    keys are ignored) and overrides (flags)."""
    return load_settings(SampleSettings, path, overrides, keys=set(SampleSettings.model_fields))
