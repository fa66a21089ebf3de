"""Settings of the Kubernetes deployment (``kubernetes:`` in a run YAML), validated once.

This module only holds data (its parts are in :mod:`treesits_dask.config.kube_resources`);
:mod:`treesits_dask.kube` builds the manifests from these settings and starts the cluster.

Resource contract with the pipeline: reading tasks are annotated with ``{READ_RESOURCE: 1}``
and inference tasks with ``{GPU_RESOURCE: 1}``.  GPU workers always advertise ``GPU``; which
group advertises ``CPU`` (and so runs the reads) is :attr:`KubeSettings.read_on`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from .kube_resources import (
    FORBID,
    GPU_RESOURCE,
    GPU_TAINT,
    READ_RESOURCE,
    Adaptive,
    CpuGroup,
    CronJobSettings,
    GpuGroup,
    MemoryQuantity,
    PodResources,
    Toleration,
    WorkerGroup,
    as_str,
    dns_name,
    parse_quantity,
)

__all__ = [
    "GPU_RESOURCE",
    "GPU_TAINT",
    "READ_RESOURCE",
    "Adaptive",
    "CpuGroup",
    "CronJobSettings",
    "GpuGroup",
    "KubeSettings",
    "PodResources",
    "Toleration",
    "WorkerGroup",
    "parse_quantity",
    "valid_keys",
]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_NAME = re.compile(
    r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE", re.IGNORECASE
)


class KubeSettings(BaseModel):
    """Everything that the Kubernetes manifests and ``start_cluster`` need (cluster/README.md)."""

    model_config = FORBID

    name: str = Field("treesits", description="DaskCluster name; the scheduler is <name>-scheduler")
    namespace: str = "treesits"
    image: str = "ghcr.io/treesits/treesits-dask:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secret: str | None = Field(None, description="name of a docker-registry Secret")
    scheduler_service_type: Literal["ClusterIP", "LoadBalancer"] = "ClusterIP"
    idle_timeout: int = Field(900, ge=0, description="operator deletes an idle cluster after (s)")
    resource_timeout: int = Field(
        600, ge=1, description="operator must act / scheduler may crash-loop this long (s)"
    )
    start_timeout: int = Field(1200, ge=10, description="scheduler must be up within (s)")
    shutdown_on_close: bool = True
    service_account: str = "treesits-driver"
    env: dict[str, str] = Field(default_factory=dict, description="non-secret environment")
    s3_secret: str | None = Field("treesits-s3", description="Secret holding S3 credentials")
    s3_secret_keys: list[str] = Field(
        default_factory=lambda: ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    )
    cube_claim: str | None = Field("force-ard", description="PVC of the FORCE cube (read-only)")
    cube_mount_path: str = "/force/FORCE/C1/L2/ard"
    scratch_size: MemoryQuantity = Field(
        "20Gi", description="emptyDir at /tmp: spill and COG temp files"
    )
    run_as_user: int = Field(1000, ge=1)
    read_only_root_filesystem: bool = True
    read_on: Literal["cpu", "gpu"] = "cpu"
    cpu: CpuGroup = Field(default_factory=CpuGroup)
    gpu: GpuGroup = Field(default_factory=GpuGroup)
    scheduler: PodResources = Field(default_factory=PodResources)
    driver: PodResources = Field(
        default_factory=lambda: PodResources(memory_request="8Gi", memory_limit="8Gi")
    )
    cronjob: CronJobSettings = Field(default_factory=CronJobSettings)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        # the longest derived name is <name>-scheduler (63 max); workers get <name>-gpu-worker-<10>
        return dns_name(v, "name", max_len=63 - len("-gpu-worker-0123456789"))

    @field_validator("namespace", "service_account")
    @classmethod
    def _check_dns(cls, v: str, info: Any) -> str:
        return dns_name(v, info.field_name)

    @field_validator("image_pull_secret", "s3_secret", "cube_claim")
    @classmethod
    def _check_optional_dns(cls, v: str | None, info: Any) -> str | None:
        return v if v is None else dns_name(v, info.field_name, max_len=253)

    @field_validator("env", mode="before")
    @classmethod
    def _coerce_env(cls, v: Any) -> Any:
        """YAML turns ``FALSE`` / ``443`` into bool / int: keep them as the strings meant."""
        if not isinstance(v, dict):
            return v
        return {k: str(x).upper() if isinstance(x, bool) else as_str(x) for k, x in v.items()}

    @field_validator("env")
    @classmethod
    def _check_env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            if not _ENV_NAME.match(key):
                raise ValueError(f"env: {key!r} is not an environment variable name")
            if _SECRET_NAME.search(key):
                raise ValueError(
                    f"env: {key!r} looks like a credential; manifests hold no secrets. Put it in "
                    "the "
                    "Secret named by s3_secret and list the key in s3_secret_keys"
                )
        return v

    @field_validator("s3_secret_keys")
    @classmethod
    def _check_secret_keys(cls, v: list[str]) -> list[str]:
        bad = [k for k in v if not _ENV_NAME.match(k)]
        if bad:
            raise ValueError(f"s3_secret_keys: {bad} are not environment variable names")
        return v

    @field_validator("cube_mount_path")
    @classmethod
    def _check_mount(cls, v: str) -> str:
        if not v.startswith("/") or v.rstrip("/") in ("", "/tmp", "/etc/treesits"):
            raise ValueError(
                f"cube_mount_path {v!r} must be an absolute path other than /, /tmp, /etc/treesits"
            )
        return v.rstrip("/")

    @model_validator(mode="after")
    def _check_groups(self) -> KubeSettings:
        gpu_used = self.gpu.enabled and not self.gpu.empty
        if self.read_on == "gpu" and not gpu_used:
            raise ValueError("read_on 'gpu' needs GPU workers: enable gpu and give it workers")
        if self.read_on == "cpu" and self.cpu.empty:
            raise ValueError(
                "read_on 'cpu' needs CPU workers (cpu.workers > 0 or cpu.adaptive); "
                "for a GPU-only cluster set read_on: gpu"
            )
        if not self.gpu.enabled and self.gpu.adaptive is not None:
            raise ValueError("gpu.adaptive is set but gpu.enabled is false")
        if self.gpu.enabled and self.cpu.adaptive is not None and not self.gpu.empty:
            raise ValueError(
                "cpu.adaptive cannot be combined with GPU workers: the operator's autoscaler "
                "scales "
                "only the default group and its scale-down may retire GPU workers "
                "(dask/dask-kubernetes#914); give cpu.workers a fixed count"
            )
        if self.gpu.enabled and self.gpu.adaptive is not None and not self.cpu.empty:
            raise ValueError(
                "gpu.adaptive needs a GPU-only cluster (the autoscaler scales only the default "
                "group): set cpu.workers: 0 and read_on: gpu, or give gpu.workers a fixed count"
            )
        return self

    # ---- derived values -------------------------------------------------------------------
    @property
    def gpu_is_default_group(self) -> bool:
        """True for a GPU-only cluster: the GPU workers are the DaskCluster's default group."""
        return self.gpu.enabled and self.cpu.empty

    @property
    def extra_gpu_group(self) -> bool:
        """True when the GPU workers are an extra DaskWorkerGroup next to the CPU default group."""
        return self.gpu.enabled and not self.cpu.empty

    @property
    def default_group(self) -> CpuGroup | GpuGroup:
        return self.gpu if self.gpu_is_default_group else self.cpu

    def worker_resources(self) -> dict[str, dict[str, float]]:
        """Dask resources each group advertises (``{"cpu": {...}, "gpu": {...}}``)."""
        cpu = {READ_RESOURCE: float(self.cpu.threads)} if self.read_on == "cpu" else {}
        gpu = {GPU_RESOURCE: float(self.gpu.gpus)}
        if self.read_on == "gpu":
            gpu[READ_RESOURCE] = float(self.gpu.threads)
        return {"cpu": cpu, "gpu": gpu if self.gpu.enabled else {}}


_NESTED = {
    "cpu": CpuGroup,
    "gpu": GpuGroup,
    "scheduler": PodResources,
    "driver": PodResources,
    "cronjob": CronJobSettings,
    "adaptive": Adaptive,
    "tolerations": Toleration,
}


def valid_keys(loc: Sequence[str | int]) -> list[str]:
    """The settings valid at the parent of ``loc`` (e.g. ``("cpu", "treads")`` -> CpuGroup's)."""
    model: type = KubeSettings
    for part in loc[:-1]:
        model = _NESTED.get(part, model) if isinstance(part, str) else model
    return sorted(model.model_fields)
