"""Settings of ``train`` and ``evaluate``: where the reference samples are
(:class:`SampleSettings`) and how a model is trained from them (:class:`TrainConfig`).  The cube
settings (sensors, dates, QAI, window) are those of
:class:`~treesits_dask.config.inputs.InputSettings`, so training reads the cube exactly as a run
does."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ..io import storage
from ..models.card import card_path
from .inputs import InputSettings

__all__ = ["SampleSettings", "TrainConfig"]


class SampleSettings(InputSettings):
    """Where the reference samples are and how to read them (``train`` and ``evaluate``)."""

    samples: str = Field(
        description="points (.gpkg, .geojson, .csv) or a folder of per-sample CSVs"
    )
    cube: str | None = Field(None, description="FORCE Level-2 datacube root (needed for points)")
    label_column: str = "label"
    id_column: str | None = Field(None, description="sample id column (default: id / fid / row)")
    x_column: str = "x"
    y_column: str = "y"
    crs: str | None = Field(None, description="CRS of the points where the file names none")
    layer: str | None = Field(None, description="GeoPackage layer (default: the only one)")
    class_names: list[str] | None = Field(
        None, description="class order (label i = class_names[i])"
    )


class TrainConfig(SampleSettings):
    """Settings of ``train`` (YAML keys; the README's training section documents each)."""

    family: Literal["sits-lstm", "sits-transformer", "sbert"] = "sits-lstm"
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = Field(None, description="checkpoint to fine-tune")
    init_family: Literal["sits-lstm", "sits-transformer", "sbert", "native"] | None = None
    init_params: str | None = Field(None, description="SITS-NN *_params.json of init_from")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0)
    max_seconds: float = Field(120.0, gt=0)
    max_epochs: int = Field(200, gt=0)
    patience: int = Field(15, gt=0)
    class_weights: Literal["balanced", "none"] | list[float] | dict[str, float] = "balanced"
    batch_size: int = Field(64, ge=2)
    learning_rate: float = Field(1e-3, gt=0)
    seq_len: int | None = Field(None, gt=0, description="sbert: observations per pixel (256)")
    device: str = "auto"
    threads: int = Field(1, ge=1, description="torch CPU threads while training")
    output: str = Field(description="model file to write (<stem>.pt + card <stem>.json)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction {self.val_fraction} + test_fraction {self.test_fraction} leave "
                "nothing to train on"
            )
        if self.init_family and not self.init_from:
            raise ValueError("init_family is set but init_from (the checkpoint) is not")
        sitsnn = self.resolved_init_family in ("sits-lstm", "sits-transformer")
        if self.init_from and sitsnn and not self.init_params:
            raise ValueError(
                f"init_from {self.init_from} is a {self.resolved_init_family} checkpoint: set "
                "init_params to its SITS-NN *_params.json (it holds the hyper-parameters)"
            )
        return self

    @property
    def resolved_init_family(self) -> str | None:
        """``init_family``; else ``native`` with a card beside ``init_from``; else ``family``."""
        if not self.init_from:
            return None
        if self.init_family:
            return self.init_family
        fs, path = storage.get_fs(card_path(self.init_from))
        return "native" if fs.exists(path) else self.family
