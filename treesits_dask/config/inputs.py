"""Settings shared by every command that reads the cube: cube root, sensors, date window, QAI
screening and window shape.  :class:`InputSettings` holds them with their validators, once;
``run`` / ``update`` / ``plan`` (:class:`~treesits_dask.config.run.RunConfig`) and ``train`` /
``evaluate`` (:mod:`treesits_dask.config.training`) extend it.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["DEFAULT_QAI_FLAGS", "QAI_ALIASES", "QAI_FLAGS", "InputSettings", "parse_window"]

#: QAI flag names accepted by ``qai`` (FORCE's names; REFERENCE.md section 1).
QAI_FLAGS = (
    "NODATA",
    "CLOUD_OPAQUE",
    "CLOUD_BUFFER",
    "CLOUD_CIRRUS",
    "CLOUD_SHADOW",
    "SNOW",
    "WATER",
    "AEROSOL_INT",
    "AEROSOL_HIGH",
    "AEROSOL_FILL",
    "SUBZERO",
    "SATURATION",
    "SUN_LOW",
    "ILLUMINATION_MEDIUM",
    "ILLUMINATION_POOR",
    "ILLUMINATION_SHADOW",
    "SLOPE",
    "WVP_FILL",
)
#: FORCE's default screening.
DEFAULT_QAI_FLAGS = (
    "NODATA",
    "CLOUD_OPAQUE",
    "CLOUD_BUFFER",
    "CLOUD_CIRRUS",
    "CLOUD_SHADOW",
    "SNOW",
    "SUBZERO",
    "SATURATION",
)
#: Other names of QAI flags (FORCE parameter files of older versions).
QAI_ALIASES = {
    "ILLUMIN_LOW": "ILLUMINATION_MEDIUM",
    "ILLUMIN_POOR": "ILLUMINATION_POOR",
    "ILLUMIN_NONE": "ILLUMINATION_SHADOW",
    "SUN_ZENITH": "SUN_LOW",
}

_WINDOW = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*$")
_SENSOR = re.compile(r"SEN2[A-D]|LND0[4-9]")


def parse_window(value: str) -> tuple[int, int] | None:
    """``"auto"`` -> None, ``"300"`` -> (300, 300), ``"300x3000"`` -> (300, 3000)."""
    if value == "auto":
        return None
    m = _WINDOW.match(value)
    return int(m[1]), int(m[2] or m[1])


class InputSettings(BaseModel):
    """Where the cube is and how its observations are selected and screened."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cube: str | None = Field(None, description="FORCE Level-2 datacube root")
    sensors: list[str] = Field(default_factory=lambda: ["SEN2A", "SEN2B", "SEN2C"])
    start_date: dt.date | None = None
    end_date: dt.date | None = None
    qai: str | list[str] = "default"
    window: str = "auto"

    @field_validator("sensors", mode="before")
    @classmethod
    def _split_sensors(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("sensors")
    @classmethod
    def _check_sensors(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if not _SENSOR.fullmatch(s)]
        if bad:
            raise ValueError(f"unknown sensor(s) {bad}; use FORCE names like SEN2A,SEN2B,SEN2C")
        if not v:
            raise ValueError("at least one sensor is needed")
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

    @field_validator("qai", mode="before")
    @classmethod
    def _check_qai(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in ("default", "none"):
            return v.strip().lower()
        flags = [s.strip().upper() for s in v.split(",")] if isinstance(v, str) else list(v)
        flags = [QAI_ALIASES.get(f, f) for f in flags if f]
        bad = [f for f in flags if f not in QAI_FLAGS]
        if bad:
            raise ValueError(
                f"unknown QAI flag(s) {bad}; use 'default', 'none' or a comma list of "
                + ", ".join(QAI_FLAGS)
            )
        return flags

    @model_validator(mode="after")
    def _check_dates(self) -> InputSettings:
        if self.start_date and self.end_date and self.start_date > self.end_date:
            raise ValueError(f"start_date {self.start_date} is after end_date {self.end_date}")
        return self

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
        return parse_window(self.window)
