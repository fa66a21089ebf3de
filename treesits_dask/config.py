"""One validated configuration object for a run.

Sources are layered: defaults < YAML file < environment (``TREESITS_<KEY>``) < command-line flags.
Unknown keys are rejected with the list of valid ones; every problem is a :class:`ConfigError`
that names the setting.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import storage
from .errors import ConfigError
from .kube_settings import KubeSettings

__all__ = ["RunConfig", "load_config", "QAI_FLAGS", "DEFAULT_QAI_FLAGS", "ENV_PREFIX"]

ENV_PREFIX = "TREESITS_"

#: QAI flag names accepted by ``qai`` (FORCE's names; REFERENCE.md section 1).
QAI_FLAGS = (
    "NODATA", "CLOUD_OPAQUE", "CLOUD_BUFFER", "CLOUD_CIRRUS", "CLOUD_SHADOW", "SNOW", "WATER",
    "AEROSOL_INT", "AEROSOL_HIGH", "AEROSOL_FILL", "SUBZERO", "SATURATION", "SUN_LOW",
    "ILLUMINATION_MEDIUM", "ILLUMINATION_POOR", "ILLUMINATION_SHADOW", "SLOPE", "WVP_FILL",
)  # fmt: skip
#: FORCE's default screening.
DEFAULT_QAI_FLAGS = (
    "NODATA", "CLOUD_OPAQUE", "CLOUD_BUFFER", "CLOUD_CIRRUS", "CLOUD_SHADOW", "SNOW", "SUBZERO",
    "SATURATION",
)  # fmt: skip
_QAI_ALIASES = {"ILLUMIN_LOW": "ILLUMINATION_MEDIUM", "ILLUMIN_POOR": "ILLUMINATION_POOR",
                "ILLUMIN_NONE": "ILLUMINATION_SHADOW", "SUN_ZENITH": "SUN_LOW"}  # fmt: skip

_WINDOW = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*$")


class RunConfig(BaseModel):
    """Settings of ``run`` / ``plan`` (the README's configuration reference documents each)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cube: str = Field(description="FORCE Level-2 datacube root (holds datacube-definition.prj)")
    tiles: str | list[str] = Field("all", description="tile ids, a FORCE tile-list file, or 'all'")
    output: str = Field(description="output directory (or s3:// prefix)")
    model: str | None = Field(None, description="checkpoint file")
    model_family: Literal["sbert", "sits-lstm", "sits-transformer", "native"] = "native"
    model_params: str | None = Field(None, description="SITS-NN *_params.json")
    start_date: dt.date | None = None
    end_date: dt.date | None = None
    sensors: list[str] = Field(default_factory=lambda: ["SEN2A", "SEN2B", "SEN2C"])
    mask_dir: str | None = None
    mask_name: str = "mask.tif"
    mask_worldcover: str | None = None
    mask_classes: list[int] = Field(default_factory=lambda: [10])
    qai: str | list[str] = "default"
    batch_size: int = Field(2048, gt=0)
    window: str = "auto"
    workers: int | None = Field(None, gt=0)
    threads_per_worker: int | None = Field(None, gt=0)
    memory_limit: str = "auto"
    scheduler_address: str | None = None
    device: str = "auto"
    tiles_in_flight: int = Field(2, gt=0)
    cog: bool = True
    dashboard_address: str = ":8787"
    force: bool = False
    lease_ttl: float = Field(900.0, gt=0)
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_addressing: Literal["auto", "path", "virtual"] = "auto"
    cluster: Literal["local", "kubernetes"] = "local"
    local_gpu_workers: int = Field(0, ge=0)
    kubernetes: KubeSettings = Field(default_factory=KubeSettings)

    @field_validator("sensors", mode="before")
    @classmethod
    def _split_sensors(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("sensors")
    @classmethod
    def _check_sensors(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if not re.fullmatch(r"SEN2[A-D]|LND0[4-9]", s)]
        if bad:
            raise ValueError(f"unknown sensor(s) {bad}; use FORCE names like SEN2A,SEN2B,SEN2C")
        if not v:
            raise ValueError("at least one sensor is needed")
        return v

    @field_validator("mask_classes", mode="before")
    @classmethod
    def _split_classes(cls, v: Any) -> Any:
        if isinstance(v, (str, int)):
            v = [int(c) for c in str(v).split(",") if c.strip()]
        return v

    @field_validator("window", mode="before")
    @classmethod
    def _check_window(cls, v: Any) -> str:
        v = str(v).strip()
        if v.lower() == "auto":
            return "auto"
        m = _WINDOW.match(v)
        if not m or int(m[1]) == 0 or (m[2] is not None and int(m[2]) == 0):
            raise ValueError(f"{v!r} is not a window size; use 'auto', N (N x N px) or ROWSxCOLS")
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"{v!r} is not a device; use auto, cpu, cuda or cuda:N")
        return v

    @field_validator("qai", mode="before")
    @classmethod
    def _check_qai(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in ("default", "none"):
            return v.strip().lower()
        flags = [s.strip().upper() for s in v.split(",")] if isinstance(v, str) else list(v)
        flags = [_QAI_ALIASES.get(f, f) for f in flags if f]
        bad = [f for f in flags if f not in QAI_FLAGS]
        if bad:
            raise ValueError(
                f"unknown QAI flag(s) {bad}; use 'default', 'none' or a comma list of {', '.join(QAI_FLAGS)}"
            )
        return flags

    @model_validator(mode="before")
    @classmethod
    def _default_mask_dir(cls, values: Any) -> Any:
        # masks built from WorldCover go to <output>/masks unless a mask_dir is given
        if isinstance(values, dict) and values.get("mask_worldcover") and not values.get("mask_dir"):
            if values.get("output"):
                values = {**values, "mask_dir": storage.join(str(values["output"]), "masks"),
                          "mask_name": "mask.tif"}
        return values

    @model_validator(mode="after")
    def _check_dates(self) -> RunConfig:
        if self.start_date and self.end_date and self.start_date > self.end_date:
            raise ValueError(f"start_date {self.start_date} is after end_date {self.end_date}")
        if self.model_family in ("sits-lstm", "sits-transformer") and self.model and not self.model_params:
            raise ValueError(
                f"model_family {self.model_family} needs model_params (the SITS-NN *_params.json "
                "that holds the hyper-parameters); pass --model-params"
            )
        return self

    # ---- derived values -------------------------------------------------------------------
    @property
    def qai_flags(self) -> tuple[str, ...]:
        """The QAI flags that make an observation invalid (empty: no screening)."""
        if self.qai == "default":
            return DEFAULT_QAI_FLAGS
        if self.qai == "none":
            return ()
        return tuple(self.qai)

    @property
    def window_shape(self) -> tuple[int, int] | None:
        """``(rows, cols)`` or ``None`` for ``auto``."""
        if self.window == "auto":
            return None
        m = _WINDOW.match(self.window)
        rows = int(m[1])
        return rows, int(m[2]) if m[2] else rows

    @property
    def gpu_group(self) -> bool:
        """Whether inference tasks carry the ``GPU`` resource (a worker group advertises it)."""
        if self.scheduler_address:
            return False
        if self.cluster == "kubernetes":
            return self.kubernetes.gpu.enabled
        return self.local_gpu_workers > 0

    @property
    def read_on_cpu(self) -> bool:
        """Whether reads carry the ``CPU`` resource (only CPU-group workers advertise it)."""
        if not self.gpu_group:
            return False
        return self.cluster != "kubernetes" or self.kubernetes.read_on == "cpu"

    def require_model(self) -> None:
        if not self.model:
            raise ConfigError("no model given: set --model (a checkpoint) and --model-family")


def _absolute(url: str | None) -> str | None:
    if url is None or storage.is_remote(url):
        return url
    return str(Path(storage.strip_protocol(url)))


_PATH_KEYS = ("cube", "output", "model", "model_params", "mask_dir", "mask_worldcover")


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    fields = RunConfig.model_fields
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in fields:
                out[name] = value
    return out


def _format_errors(exc: ValidationError, sources: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            if len(err["loc"]) > 1 and err["loc"][0] == "kubernetes":
                from .kube import valid_keys

                valid = ", ".join(valid_keys(err["loc"][1:]))
            else:
                valid = ", ".join(sorted(RunConfig.model_fields))
            lines.append(f"unknown setting {loc!r} (from {sources}); valid settings are: {valid}")
        elif err["type"] == "missing":
            lines.append(f"setting {loc!r} is required (flag --{loc.replace('_', '-')} or key {loc} in YAML)")
        else:
            lines.append(f"setting {loc!r}: {msg}")
    return "; ".join(lines)


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Build a :class:`RunConfig` from a YAML file, ``TREESITS_*`` variables and overrides (flags)."""
    values: dict[str, Any] = {}
    sources = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; check --config")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must be a mapping of settings, got {type(loaded).__name__}")
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
        sources.append(str(p))
    env = _env_values(os.environ if environ is None else environ)
    if env:
        sources.append("environment")
    values.update(env)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if overrides:
        sources.append("command line")
    for key in _PATH_KEYS:
        if isinstance(values.get(key), str):
            values[key] = _absolute(values[key])
    try:
        return RunConfig(**values)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, " + ".join(sources) or "defaults")) from None
