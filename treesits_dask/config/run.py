"""Settings of ``run``, ``update`` and ``plan``: :class:`RunConfig`."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError
from ..io import storage
from .inputs import InputSettings
from .kubernetes import KubeSettings

__all__ = ["RunConfig"]


class RunConfig(InputSettings):
    """Settings of ``run`` / ``plan`` / ``update`` (the README's configuration reference)."""

    cube: str = Field(description="FORCE Level-2 datacube root (holds datacube-definition.prj)")
    tiles: str | list[str] = Field("all", description="tile ids, a FORCE tile-list file, or 'all'")
    output: str = Field(description="output directory (or s3:// prefix)")
    model: str | None = Field(None, description="checkpoint file")
    model_family: Literal["sbert", "sits-lstm", "sits-transformer", "native"] = "native"
    model_params: str | None = Field(None, description="SITS-NN *_params.json")
    mask_dir: str | None = None
    mask_name: str = "mask.tif"
    mask_worldcover: str | None = None
    mask_classes: list[int] = Field(default_factory=lambda: [10])
    batch_size: int = Field(2048, gt=0)
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
    workers_timeout: float = Field(
        1800.0, gt=0, description="seconds to wait for a worker of each needed group"
    )
    kubernetes: KubeSettings = Field(default_factory=KubeSettings)

    @field_validator("mask_classes", mode="before")
    @classmethod
    def _split_classes(cls, v: Any) -> Any:
        if isinstance(v, (str, int)):
            v = [int(c) for c in str(v).split(",") if c.strip()]
        return v

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"{v!r} is not a device; use auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_mask_dir(cls, values: Any) -> Any:
        # masks built from WorldCover go to <output>/masks unless a mask_dir is given
        if (
            isinstance(values, dict)
            and values.get("mask_worldcover")
            and not values.get("mask_dir")
        ):
            if values.get("output"):
                values = {
                    **values,
                    "mask_dir": storage.join(str(values["output"]), "masks"),
                    "mask_name": "mask.tif",
                }
        return values

    @model_validator(mode="after")
    def _check_model(self) -> RunConfig:
        if (
            self.model_family in ("sits-lstm", "sits-transformer")
            and self.model
            and not self.model_params
        ):
            raise ValueError(
                f"model_family {self.model_family} needs model_params (the SITS-NN *_params.json "
                "that holds the hyper-parameters); pass --model-params"
            )
        return self

    @model_validator(mode="after")
    def _check_kubernetes(self) -> RunConfig:
        if self.cluster != "kubernetes" or self.scheduler_address:
            return self
        k = self.kubernetes
        if k.idle_timeout == 0:
            raise ValueError(
                "kubernetes.idle_timeout 0 would keep the Dask cluster of a killed driver (and its "
                "GPU nodes) forever; give it seconds (default 900). 0 is for a standing cluster, "
                "used through scheduler_address"
            )
        pod_endpoint = k.env.get("AWS_ENDPOINT_URL_S3") or k.env.get("AWS_ENDPOINT_URL")
        if pod_endpoint and self.s3_endpoint_url:
            ours = storage.s3_environment(self.s3_endpoint_url, environ={})["AWS_ENDPOINT_URL"]
            theirs = storage.s3_environment(pod_endpoint, environ={})["AWS_ENDPOINT_URL"]
            if ours != theirs:
                raise ValueError(
                    f"s3_endpoint_url {self.s3_endpoint_url!r} and kubernetes.env AWS_ENDPOINT_URL "
                    f"{pod_endpoint!r} differ: the driver would use one object store and the pods "
                    "another. Give the endpoint once (s3_endpoint_url)"
                )
        return self

    def require_model(self) -> None:
        if not self.model:
            raise ConfigError("no model given: set --model (a checkpoint) and --model-family")
