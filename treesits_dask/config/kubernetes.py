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
    NetworkPolicySettings,
    PodResources,
    Toleration,
    WorkerGroup,
    as_str,
    cidr,
    dns_name,
    kube_version,
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
    "NetworkPolicySettings",
    "OWNED_SUFFIX_LENGTH",
    "PodResources",
    "Toleration",
    "WorkerGroup",
    "parse_quantity",
    "valid_keys",
]

#: A driver's DaskCluster is ``<name>-<suffix>``: this many random characters and a dash.
OWNED_SUFFIX_LENGTH = 6
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_NAME = re.compile(
    r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE", re.IGNORECASE
)


class KubeSettings(BaseModel):
    """Everything that the Kubernetes manifests and ``start_cluster`` need (cluster/README.md)."""

    model_config = FORBID

    name: str = Field(
        "treesits",
        description="prefix of every object; a driver's DaskCluster is <name>-<6 random chars>",
    )
    namespace: str = "treesits"
    kube_version: str = Field("1.26", description="Kubernetes minor version rendered for")
    image: str = "ghcr.io/treesits/treesits-dask:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secret: str | None = Field(None, description="name of a docker-registry Secret")
    scheduler_service_type: Literal["ClusterIP", "LoadBalancer"] = "ClusterIP"
    load_balancer_source_ranges: list[str] = Field(
        default_factory=list, description="CIDRs allowed to reach a LoadBalancer scheduler"
    )
    tls: bool = Field(True, description="TLS with a per-cluster CA between all Dask processes")
    network_policy: NetworkPolicySettings = Field(default_factory=NetworkPolicySettings)
    idle_timeout: int = Field(900, ge=0, description="operator deletes an idle cluster after (s)")
    no_workers_timeout: int = Field(
        1800, ge=0, description="tasks no worker can run fail after (s); 0: wait forever"
    )
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
        # a driver's cluster is <name>-<suffix>; its longest derived name (a label value, 63 max)
        # is <cluster>-default-worker-<10 hex>, the operator's default worker group
        suffix = 1 + OWNED_SUFFIX_LENGTH
        return dns_name(v, "name", max_len=63 - suffix - len("-default-worker-0123456789"))

    @field_validator("kube_version", mode="before")
    @classmethod
    def _check_version(cls, v: Any) -> str:
        return kube_version(v)

    @field_validator("load_balancer_source_ranges")
    @classmethod
    def _check_ranges(cls, v: list[str]) -> list[str]:
        return [cidr(c, "load_balancer_source_ranges") for c in v]

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
            if key.upper().startswith("TREESITS_"):
                raise ValueError(
                    f"env: {key!r} would override the run's settings in the driver pod (TREESITS_* "
                    "variables do), so the driver would run other settings than run.yaml says; "
                    "put the setting into run.yaml instead"
                )
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
    def _check_exposure(self) -> KubeSettings:
        if self.scheduler_service_type == "LoadBalancer" and not (
            self.tls and self.load_balancer_source_ranges
        ):
            raise ValueError(
                "scheduler_service_type LoadBalancer exposes the scheduler, which runs any code a "
                "client sends it with the workers' S3 credentials, outside the cluster (often on a "
                "public floating IP). Use ClusterIP and `kubectl port-forward` "
                "(cluster/README.md), or keep tls: true and list the client networks in "
                "load_balancer_source_ranges"
            )
        if self.gpu.image is None and "@" in self.image:
            raise ValueError(
                f"image {self.image!r} is pinned by digest, so the CUDA image cannot be derived "
                "from its tag: set gpu.image (the image built with --target cuda)"
            )
        if self.cronjob.time_zone not in (None, "Etc/UTC", "UTC") and self.version < (1, 25):
            raise ValueError(
                f"cronjob.time_zone {self.cronjob.time_zone!r} needs Kubernetes >= 1.25 "
                f"(kube_version is {self.kube_version}); there the schedule is read in the "
                "controller manager's time zone (UTC on Magnum): write it in UTC and set "
                "time_zone: Etc/UTC"
            )
        return self

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

    @property
    def version(self) -> tuple[int, int]:
        """``kube_version`` as ``(major, minor)``."""
        major, minor = self.kube_version.split(".")
        return int(major), int(minor)

    @property
    def gpu_image(self) -> str:
        """The image of the GPU workers: ``gpu.image``, else the CUDA build of ``image``
        (``repo:tag`` -> ``repo:tag-cuda``, built from the same Dockerfile with ``--target
        cuda``)."""
        if self.gpu.image:
            return self.gpu.image
        repo, _, last = self.image.rpartition("/")
        name, sep, tag = last.partition(":")
        return f"{repo + '/' if repo else ''}{name}:{tag if sep else 'latest'}-cuda"

    def worker_resources(self) -> dict[str, dict[str, float]]:
        """Dask resources each group advertises (``{"cpu": {...}, "gpu": {...}}``)."""
        cpu = {READ_RESOURCE: float(self.cpu.threads)} if self.read_on == "cpu" else {}
        gpu = {GPU_RESOURCE: float(self.gpu.gpus)}
        if self.read_on == "gpu":
            gpu[READ_RESOURCE] = float(self.gpu.threads)
        return {"cpu": cpu, "gpu": gpu if self.gpu.enabled else {}}


_NESTED = {
    "network_policy": NetworkPolicySettings,
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
