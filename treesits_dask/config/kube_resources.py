"""Building blocks of :class:`~treesits_dask.config.kubernetes.KubeSettings`: resources, worker
groups, tolerations, the CronJob.  Pure data + validation; imports nothing from the package."""

from __future__ import annotations

import ipaddress
import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

__all__ = [
    "GPU_RESOURCE",
    "GPU_TAINT",
    "READ_RESOURCE",
    "Adaptive",
    "CpuGroup",
    "CpuQuantity",
    "CronJobSettings",
    "GpuGroup",
    "MIN_KUBE_VERSION",
    "MemoryQuantity",
    "NetworkPolicySettings",
    "PodResources",
    "Toleration",
    "WorkerGroup",
    "cidr",
    "dns_name",
    "kube_version",
    "parse_quantity",
]

#: Dask resource that GPU workers advertise and inference tasks need.
GPU_RESOURCE = "GPU"
#: Dask resource that reading tasks need; advertised by the group named by ``read_on``.
READ_RESOURCE = "CPU"
#: Taint of the GPU nodes of the EO-Lab / CODE-DE Magnum clusters (key, value, effect).
GPU_TAINT = ("node.cloudferro.com/type", "gpu", "NoSchedule")

#: The oldest Kubernetes minor version the manifests are rendered and validated for.
MIN_KUBE_VERSION = (1, 23)

FORBID = ConfigDict(extra="forbid", frozen=True)
_SUFFIX = {
    "": 1,
    "m": Decimal("0.001"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?|\.\d+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_CRON_FIELD = re.compile(r"^[\d*/,\-A-Za-z?]+$")


def parse_quantity(value: str, what: str = "quantity") -> Decimal:
    """A Kubernetes quantity (``"500m"``, ``"6"``, ``"48Gi"``) as a number; ``ValueError`` if
    invalid."""
    m = _QUANTITY.match(str(value).strip())
    if not m:
        raise ValueError(
            f"{what} {value!r} is not a Kubernetes quantity; use e.g. '500m' or '2' for CPU, "
            "'512Mi' or '48Gi' for memory"
        )
    try:
        return Decimal(m[1]) * _SUFFIX[m[2] or ""]
    except InvalidOperation as exc:  # pragma: no cover - the regex only admits decimals
        raise ValueError(f"{what} {value!r} is not a number") from exc


def as_str(v: Any) -> Any:
    """YAML turns ``cpu: 6`` into an int: accept numbers where Kubernetes wants strings."""
    return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v


def _check_cpu(v: str) -> str:
    if parse_quantity(v, "CPU") <= 0:
        raise ValueError(f"CPU {v!r} must be > 0")
    return v


def _check_memory(v: str) -> str:
    if v.endswith("m"):
        raise ValueError(f"{v!r} means milli-bytes; write 'Mi' (mebibytes) or 'Gi'")
    if parse_quantity(v, "memory") < 2**20:
        raise ValueError(f"{v!r} is below 1Mi; did you forget the unit (Gi)?")
    return v


#: A CPU quantity such as ``"500m"`` or ``"6"``.
CpuQuantity = Annotated[str, BeforeValidator(as_str), AfterValidator(_check_cpu)]
#: A memory / disk size such as ``"512Mi"`` or ``"48Gi"``.
MemoryQuantity = Annotated[str, BeforeValidator(as_str), AfterValidator(_check_memory)]


class PodResources(BaseModel):
    """CPU and memory requests and limits of one container (both are always set)."""

    model_config = FORBID

    cpu_request: CpuQuantity = "1"
    cpu_limit: CpuQuantity = "2"
    memory_request: MemoryQuantity = "4Gi"
    memory_limit: MemoryQuantity = "4Gi"

    @model_validator(mode="after")
    def _requests_within_limits(self) -> PodResources:
        for kind in ("cpu", "memory"):
            req, lim = getattr(self, f"{kind}_request"), getattr(self, f"{kind}_limit")
            if parse_quantity(req) > parse_quantity(lim):
                raise ValueError(f"{kind}_request {req!r} is larger than {kind}_limit {lim!r}")
        return self

    def to_k8s(self, extra: dict[str, str] | None = None) -> dict:
        """The container ``resources`` block; ``extra`` (e.g. ``nvidia.com/gpu``) goes in both."""
        extra = extra or {}
        return {
            "limits": {"cpu": self.cpu_limit, "memory": self.memory_limit, **extra},
            "requests": {"cpu": self.cpu_request, "memory": self.memory_request, **extra},
        }

    @property
    def memory_limit_bytes(self) -> int:
        return int(parse_quantity(self.memory_limit))


class Toleration(BaseModel):
    """A pod toleration (Kubernetes field names in snake case)."""

    model_config = FORBID

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    @model_validator(mode="after")
    def _check(self) -> Toleration:
        if self.operator == "Equal" and not self.key:
            raise ValueError("a toleration with operator Equal needs a key")
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("a toleration with operator Exists must not have a value")
        return self

    def to_k8s(self) -> dict:
        out = {
            "key": self.key,
            "operator": self.operator,
            "value": self.value,
            "effect": self.effect,
        }
        return {k: v for k, v in out.items() if v is not None}


class Adaptive(BaseModel):
    """Adaptive scaling bounds of a worker group (the operator's DaskAutoscaler)."""

    model_config = FORBID

    minimum: int = Field(0, ge=0)
    maximum: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self) -> Adaptive:
        if self.minimum > self.maximum:
            raise ValueError(
                f"adaptive minimum {self.minimum} is larger than maximum {self.maximum}"
            )
        return self


class WorkerGroup(PodResources):
    """Workers of one kind: a fixed count (``workers``) or ``adaptive`` bounds, not both."""

    workers: int | None = Field(2, ge=0)
    adaptive: Adaptive | None = None
    threads: int = Field(4, ge=1)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _adaptive_replaces_count(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("adaptive") is not None and "workers" not in data:
            data = {**data, "workers": None}
        return data

    @model_validator(mode="after")
    def _count_or_adaptive(self) -> WorkerGroup:
        if self.workers is not None and self.adaptive is not None:
            raise ValueError(
                "give either workers (a fixed count) or adaptive (minimum/maximum), not both"
            )
        if self.workers is None and self.adaptive is None:
            raise ValueError(
                "give workers (a fixed count, 0 allowed) or adaptive (minimum/maximum)"
            )
        return self

    @property
    def initial_workers(self) -> int:
        """Replicas the group starts with."""
        return self.adaptive.minimum if self.adaptive else int(self.workers or 0)

    @property
    def empty(self) -> bool:
        """True when the group can never have a worker."""
        return self.adaptive is None and not self.workers


class CpuGroup(WorkerGroup):
    """The default worker group: CPU nodes (defaults fit one worker per 8-vCPU / 64 GB node)."""

    workers: int | None = Field(6, ge=0)
    threads: int = Field(6, ge=1)
    cpu_request: CpuQuantity = "6"
    cpu_limit: CpuQuantity = "7"
    memory_request: MemoryQuantity = "48Gi"
    memory_limit: MemoryQuantity = "48Gi"


class GpuGroup(WorkerGroup):
    """GPU workers (defaults fit one worker per ``vm.a6000.4`` node: 8 vCPU, 57 GB, 1 GPU)."""

    enabled: bool = True
    image: str | None = Field(
        None, description="defaults to the cluster image with '-cuda' appended to its tag"
    )
    gpus: str = Field("1", description="nvidia.com/gpu per worker, a string as the CRD demands")
    workers: int | None = Field(2, ge=0)
    threads: int = Field(4, ge=1)
    cpu_request: CpuQuantity = "6"
    cpu_limit: CpuQuantity = "7"
    memory_request: MemoryQuantity = "44Gi"
    memory_limit: MemoryQuantity = "44Gi"
    tolerations: list[Toleration] = Field(
        default_factory=lambda: [
            Toleration(key=GPU_TAINT[0], operator="Equal", value=GPU_TAINT[1], effect=GPU_TAINT[2])
        ]
    )

    @field_validator("gpus", mode="before")
    @classmethod
    def _check_gpus(cls, v: Any) -> str:
        v = as_str(v)
        if not isinstance(v, str) or not re.fullmatch(r"[1-9]\d*", v):
            raise ValueError(f"gpus {v!r} must be a whole number >= 1 (GPUs per worker)")
        return v

    @model_validator(mode="after")
    def _thread_per_gpu(self) -> GpuGroup:
        # each inference task holds one GPU for its forward (one device per worker thread)
        if self.threads < int(self.gpus):
            raise ValueError(
                f"gpu.threads {self.threads} is less than gpu.gpus {self.gpus}: each GPU is used "
                "by one worker thread at a time; give the worker at least as many threads as GPUs"
            )
        return self


class CronJobSettings(BaseModel):
    """The scheduled driver: a CronJob running ``python -m treesits_dask update``."""

    model_config = FORBID

    schedule: str = "17 */6 * * *"
    time_zone: str | None = "Etc/UTC"
    suspend: bool = False
    config_map: str = "treesits-run"
    config_path: str = "/etc/treesits/run.yaml"
    starting_deadline_seconds: int = Field(600, ge=10)
    active_deadline_seconds: int = Field(86400, ge=60)
    backoff_limit: int = Field(1, ge=0)
    successful_jobs_history_limit: int = Field(3, ge=0)
    failed_jobs_history_limit: int = Field(3, ge=0)
    ttl_seconds_after_finished: int | None = Field(86400, ge=0)

    @field_validator("schedule")
    @classmethod
    def _check_schedule(cls, v: str) -> str:
        fields = v.split()
        if v.startswith("@"):
            if v not in (
                "@yearly",
                "@annually",
                "@monthly",
                "@weekly",
                "@daily",
                "@midnight",
                "@hourly",
            ):
                raise ValueError(f"schedule {v!r}: unknown macro")
        elif len(fields) != 5 or not all(_CRON_FIELD.match(f) for f in fields):
            raise ValueError(f"schedule {v!r} is not a 5-field cron expression like '17 */6 * * *'")
        return v

    @field_validator("config_map")
    @classmethod
    def _check_config_map(cls, v: str) -> str:
        return dns_name(v, "cronjob.config_map")

    @field_validator("config_path")
    @classmethod
    def _check_config_path(cls, v: str) -> str:
        if not v.startswith("/") or v.endswith("/") or v.count("/") < 2:
            raise ValueError(
                f"config_path {v!r} must be an absolute file path like /etc/treesits/run.yaml"
            )
        return v


def kube_version(v: Any) -> str:
    """``"1.23"`` / ``"v1.30.2"`` -> ``"1.23"`` / ``"1.30"``; a YAML number (``1.30`` is read as
    1.3) is refused, as is anything older than :data:`MIN_KUBE_VERSION`."""
    if isinstance(v, float):
        raise ValueError(
            f"kube_version {v!r} was read as a number (YAML turns 1.30 into 1.3); quote it: '1.30'"
        )
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?", str(v).strip())
    if not m:
        raise ValueError(f"kube_version {v!r} is not a Kubernetes version like '1.26'")
    version = (int(m[1]), int(m[2]))
    if version < MIN_KUBE_VERSION:
        raise ValueError(
            f"kube_version {v!r} is older than the oldest supported Kubernetes "
            f"{MIN_KUBE_VERSION[0]}.{MIN_KUBE_VERSION[1]}"
        )
    return f"{version[0]}.{version[1]}"


def cidr(v: str, what: str) -> str:
    """A CIDR block (``10.0.0.0/8``, ``2001:db8::/32``) in its normal form; ``ValueError`` else."""
    try:
        return str(ipaddress.ip_network(str(v), strict=False))
    except ValueError as exc:
        raise ValueError(f"{what}: {v!r} is not a CIDR block like 192.168.0.0/16") from exc


class NetworkPolicySettings(BaseModel):
    """Who may reach the scheduler and the workers (NetworkPolicies in ``manifests/``)."""

    model_config = FORBID

    enabled: bool = True
    operator_namespace: str = Field(
        "dask-operator", description="namespace of the dask-kubernetes operator"
    )
    allowed_cidrs: list[str] = Field(
        default_factory=list, description="extra sources of scheduler connections (laptops)"
    )

    @field_validator("operator_namespace")
    @classmethod
    def _check_namespace(cls, v: str) -> str:
        return dns_name(v, "network_policy.operator_namespace")

    @field_validator("allowed_cidrs")
    @classmethod
    def _check_cidrs(cls, v: list[str]) -> list[str]:
        return [cidr(c, "network_policy.allowed_cidrs") for c in v]


def dns_name(v: str, what: str, max_len: int = 63) -> str:
    if not _DNS_LABEL.match(v) or len(v) > max_len:
        raise ValueError(
            f"{what} {v!r} must be lower-case letters, digits and '-', start and end with a letter "
            f"or digit, at most {max_len} characters"
        )
    return v
