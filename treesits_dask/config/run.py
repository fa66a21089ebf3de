"""Settings of ``run``, ``update`` and ``plan``: :class:`RunConfig`."""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError
from ..io import storage
from .inputs import InputSettings
from .kubernetes import KubeSettings
from .postprocess import AlertSettings, SmoothingSettings, UncertaintyLayer

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
    read_memory: float = Field(
        0.25,
        gt=0,
        le=1,
        description="share of a reading worker's memory limit that its read tasks may fill with "
        "decoded scenes (shared out among its threads)",
    )
    stream: Literal["auto", "always", "never"] = Field(
        "auto",
        description="run a one-way LSTM (sits-lstm) or SBERT over a tile's scenes batch by "
        "batch, a state carried from one batch to the next (the LSTM's h and c; SBERT's newest "
        "256 valid observations): auto where the tile's bands of all scenes would not be held in "
        "a reading worker's memory (SBERT: only where its plan would otherwise decode blocks more "
        "than once), always where windows are put together from bands, never; under auto and "
        "always also a tile whose windows of all scenes the inference workers cannot hold, "
        "where its states fit (else refused)",
    )
    scheduler_address: str | None = None
    device: str = "auto"
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32", description="numeric precision of the forward pass (fp32: the parity mode)"
    )
    torch_compile: bool = Field(False, description="run the model through torch.compile")
    gpu_batch_max: int = Field(
        65536, gt=0, description="on a GPU: the most pixels per batch (chosen from free memory)"
    )
    gpu_windows_in_flight: int = Field(
        2, ge=1, description="windows a GPU worker holds at once (host work beside the device)"
    )
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
    uncertainty: list[UncertaintyLayer] = Field(
        default_factory=list, description="uncertainty layers of multi-class models"
    )
    smoothing: SmoothingSettings | None = Field(
        None, description="Bayesian smoothing of the probabilities (off when not given)"
    )
    alerts: AlertSettings | None = Field(
        None, description="disturbance alerts of binary models (off when not given)"
    )

    @field_validator("uncertainty", mode="before")
    @classmethod
    def _split_layers(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip() and s.strip() != "none"]
        return v

    @field_validator("uncertainty")
    @classmethod
    def _unique_layers(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

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
        windows = int(k.gpu.gpus) * self.gpu_windows_in_flight
        if k.gpu.enabled and k.gpu.threads < windows:
            raise ValueError(
                f"kubernetes.gpu.threads {k.gpu.threads} is less than gpu.gpus x "
                f"gpu_windows_in_flight ({windows}): a GPU worker runs one window per thread, so "
                f"it could not hold {self.gpu_windows_in_flight} windows per GPU; give gpu.threads "
                f"at least {windows} or lower gpu_windows_in_flight"
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

    # ---- derived values -------------------------------------------------------------------
    @property
    def gpu_task_share(self) -> float:
        """The ``GPU`` resource one inference task takes: ``1 / gpu_windows_in_flight``, so that a
        worker advertising ``GPU=1`` holds that many windows at once (rounded down where float
        rounding would leave less than a share for the last one: a worker subtracts each running
        task's share from what it advertises)."""
        k = self.gpu_windows_in_flight
        share = 1.0 / k

        def fits(q: float) -> bool:
            left = 1.0
            for _ in range(k):
                if left < q:
                    return False
                left -= q
            return True

        while not fits(share):
            share = math.nextafter(share, 0.0)
        return share

    @property
    def layers(self) -> tuple[str, ...]:
        """The optional map layers these settings ask for (uncertainty, alerts, smoothing)."""
        out = list(self.uncertainty)
        if self.alerts is not None:
            out += ["alert_first_seen", "alert_confirmations", "alert_state"]
        if self.smoothing is not None:
            out += ["probability_smoothed", "class_smoothed"]
        return tuple(out)

    def require_model(self) -> None:
        if not self.model:
            raise ConfigError("no model given: set --model (a checkpoint) and --model-family")
