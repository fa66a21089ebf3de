"""Settings of the products made from the model's probabilities: uncertainty layers, Bayesian
smoothing and disturbance alerts (``uncertainty:``, ``smoothing:`` and ``alerts:`` in a run
YAML)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["AlertSettings", "SmoothingSettings", "UncertaintyLayer"]

UncertaintyLayer = Literal["entropy", "margin", "least"]


class SmoothingSettings(BaseModel):
    """Bayesian smoothing with the semantics of e-sensing/sits ``sits_smooth`` (REFERENCE.md
    section 6); the defaults are current sits's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_size: int = Field(9, description="odd neighbourhood size in pixels, at least 5")
    neigh_fraction: float = Field(
        0.5, gt=0, le=1, description="share of the neighbours (highest logits) used for the prior"
    )
    smoothness: float | list[float] = Field(
        20.0, description="prior variance: one value, or one per class"
    )

    @field_validator("window_size")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v < 5 or v % 2 == 0:
            raise ValueError(f"window_size {v} must be odd and at least 5 (sits: 5, 7, 9, ...)")
        return v

    @field_validator("smoothness", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            parts = [p for p in v.split(",") if p.strip()]
            return float(parts[0]) if len(parts) == 1 else [float(p) for p in parts]
        return v

    @field_validator("smoothness")
    @classmethod
    def _positive(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values or any(x <= 0 for x in values):
            raise ValueError(f"smoothness {v} must be positive (one value or one per class)")
        return v

    def smoothness_for(self, n_classes: int) -> tuple[float, ...]:
        """One smoothness per class (a list must have one value per class)."""
        if isinstance(self.smoothness, list):
            if len(self.smoothness) != n_classes:
                from ..errors import ConfigError

                raise ConfigError(
                    f"smoothing.smoothness has {len(self.smoothness)} values but the model has "
                    f"{n_classes} classes; give one value or one per class"
                )
            return tuple(float(x) for x in self.smoothness)
        return (float(self.smoothness),) * n_classes


class AlertSettings(BaseModel):
    """Disturbance alerts of a binary (sigmoid) model, kept in the map across updates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: dt.date = Field(
        description="first acquisition date that can raise an alert (the monitoring start)"
    )
    threshold: float = Field(0.5, gt=0, lt=1, description="probability that raises an alert")
    confirm_after: int = Field(
        2, ge=1, description="valid acquisitions at or above the threshold that confirm it"
    )
