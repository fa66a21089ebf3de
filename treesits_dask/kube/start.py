"""Start a driver's own Dask cluster on Kubernetes with the dask-kubernetes operator (needs the
``k8s`` extra and access to a cluster).  The objects come from :mod:`treesits_dask.kube.specs`.

* Each driver creates a DaskCluster of its own, ``<name>-<random suffix>``
  (:func:`owned_cluster_name`), and deletes exactly the objects it created when it closes the
  cluster; a standing cluster (``scheduler_address``) is only connected to, never deleted.
* A cluster that is not up within ``start_timeout``, or a start-up interrupted by an error or a
  signal (a CronJob deadline, ``kubectl delete``), is deleted again: a DaskCluster whose scheduler
  never ran would never idle out.
* With ``tls`` the driver makes the cluster's certificates (:mod:`treesits_dask.kube.tls`) and
  keeps its own client certificate in memory.
* :func:`worker_needs` says which worker groups the driver waits for, and what to check when
  one does not come (:func:`treesits_dask.pipeline.cluster.wait_for_workers`).

``KubeCluster`` of dask-kubernetes is not used: it connects with plain TCP only and names clusters
through ``getpass.getuser()``.  The calls to the Kubernetes API go through the small
:class:`KubeApi` protocol (:class:`Kr8sApi` in production, a fake in tests).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import string
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..config.kubernetes import OWNED_SUFFIX_LENGTH, KubeSettings
from ..errors import ClusterError, ConfigError
from .specs import DASK_API, autoscaler_spec, cluster_spec, gpu_worker_group_spec, labels
from .tls import make_certificates, tls_secret

__all__ = [
    "ClusterStartError",
    "KubeApi",
    "Kr8sApi",
    "OwnedCluster",
    "WorkerNeed",
    "owned_cluster_name",
    "run_with_deadline",
    "start_cluster",
    "worker_needs",
]

log = logging.getLogger(__name__)

_PLURALS = {
    "DaskCluster": "daskclusters",
    "DaskWorkerGroup": "daskworkergroups",
    "DaskAutoscaler": "daskautoscalers",
}


class ClusterStartError(ClusterError):
    """The Dask cluster on Kubernetes did not come up (scheduler pod Pending, operator missing)."""


def owned_cluster_name(settings: KubeSettings) -> str:
    """A new DaskCluster name for one driver: ``<name>-<6 random lower-case letters/digits>``."""
    alphabet = string.ascii_lowercase + string.digits
    suffix = "".join(secrets.choice(alphabet) for _ in range(OWNED_SUFFIX_LENGTH))
    return f"{settings.name}-{suffix}"


def run_with_deadline(
    fn: Callable[[], Any], seconds: float, what: str, cancelled: threading.Event | None = None
) -> Any:
    """``fn()`` in a daemon thread; :class:`ClusterStartError` if it has not returned in time.

    Waiting for a scheduler pod that stays Pending would take forever; the daemon thread that is
    still waiting does not keep the process alive.  ``cancelled`` is set when the caller gives
    up (deadline, error, or a signal raised in the caller's thread while it waits), so that
    ``fn`` can stop between its steps.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name=f"deadline: {what}", daemon=True)
    thread.start()
    try:
        thread.join(seconds)
    except BaseException:  # SystemExit from a SIGTERM handler, KeyboardInterrupt
        if cancelled is not None:
            cancelled.set()
        raise
    if thread.is_alive():
        if cancelled is not None:
            cancelled.set()
        raise ClusterStartError(f"{what} did not finish within {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


class KubeApi(Protocol):
    """The Kubernetes calls :func:`start_cluster` makes (one namespace)."""

    def create(self, obj: dict) -> dict:
        """Create ``obj``; return it as the API server stored it (with ``metadata.uid``)."""

    def delete(self, kind: str, name: str) -> None:
        """Delete the object; no error if it does not exist."""

    def wait_for_scheduler(self, cluster: str, timeout: float) -> None:
        """Return when the scheduler pod of ``cluster`` is ready (``timeout``: how long a
        crash-looping scheduler is tolerated)."""

    def scheduler_addresses(self, cluster: str) -> tuple[str, str]:
        """``(host:port of the scheduler, host:port of its dashboard)`` as this process reaches
        them (the service, or a port-forward when outside the cluster)."""


class Kr8sApi:
    """:class:`KubeApi` with kr8s and dask-kubernetes' networking helpers."""

    def __init__(self, namespace: str):
        import kr8s  # noqa: F401 - fail early without the k8s extra

        self.namespace = namespace

    def _cls(self, kind: str) -> Any:
        from kr8s.objects import Secret, new_class

        if kind == "Secret":
            return Secret
        return new_class(kind, DASK_API, asyncio=False, plural=_PLURALS[kind])

    def create(self, obj: dict) -> dict:
        o = self._cls(obj["kind"])(obj, namespace=self.namespace)
        o.create()
        return dict(o.raw)

    def delete(self, kind: str, name: str) -> None:
        import kr8s

        try:
            self._cls(kind).get(name, namespace=self.namespace).delete()
        except kr8s.NotFoundError:
            pass

    def wait_for_scheduler(self, cluster: str, timeout: float) -> None:
        from dask_kubernetes.operator.networking import wait_for_scheduler

        asyncio.run(wait_for_scheduler(cluster, self.namespace, timeout=timeout))

    def scheduler_addresses(self, cluster: str) -> tuple[str, str]:
        from dask_kubernetes.operator.networking import get_scheduler_address

        async def both() -> tuple[str, str]:
            service = f"{cluster}-scheduler"
            comm = await get_scheduler_address(service, self.namespace)
            dashboard = await get_scheduler_address(
                service, self.namespace, port_name="http-dashboard"
            )
            return comm, dashboard

        comm, dashboard = asyncio.run(both())
        return comm.split("://", 1)[-1], dashboard.split("://", 1)[-1]


@dataclass
class OwnedCluster:
    """A driver's own Dask cluster: its address, the driver's TLS settings, and the objects it
    created (deleted by :meth:`close` when ``shutdown``)."""

    name: str
    namespace: str
    scheduler_address: str
    dashboard_link: str
    security: Any = field(repr=False)
    api: KubeApi = field(repr=False)
    created: list[tuple[str, str]] = field(default_factory=list)
    shutdown: bool = True

    def close(self) -> None:
        if not self.shutdown:
            log.info("leaving DaskCluster %s running (shutdown_on_close: false)", self.name)
            return
        delete_created(self.api, self.created)
        self.created = []

    def __enter__(self) -> OwnedCluster:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def delete_created(api: KubeApi, created: list[tuple[str, str]]) -> None:
    """Delete what a driver created, newest first.  The TLS Secret is left to Kubernetes: it is
    owned by the DaskCluster (the driver may not delete Secrets)."""
    for kind, name in reversed(created):
        if kind == "Secret":
            continue
        try:
            api.delete(kind, name)
            log.info("deleted %s %s", kind, name)
        except Exception as exc:  # noqa: BLE001 - the rest is deleted anyway; idle timeout is the net
            log.warning("could not delete %s %s: %s", kind, name, exc)


def start_cluster(settings: KubeSettings, api: KubeApi | None = None) -> OwnedCluster:
    """Create a DaskCluster of this driver's own (with its TLS Secret, GPU worker group and
    autoscaler) and wait until its scheduler runs; return it (use it as a context manager).

    The operator deletes the cluster after ``idle_timeout`` seconds without work even if this
    process is killed, but only once its scheduler runs: if the scheduler is not up within
    ``start_timeout`` seconds (a pod stuck Pending: no node fits, image pull failing), or the
    start is interrupted, everything created so far is deleted and :class:`ClusterStartError`
    says where to look.
    """
    if api is None:
        try:
            api = Kr8sApi(settings.namespace)
        except ImportError as exc:
            raise ConfigError(
                "cluster: kubernetes needs dask-kubernetes; install the k8s extra: "
                "pip install 'treesits_dask[k8s]'"
            ) from exc
    name = owned_cluster_name(settings)
    certs = make_certificates(name, settings.namespace) if settings.tls else None
    created: list[tuple[str, str]] = []
    cancelled = threading.Event()
    log.info("starting DaskCluster %s in namespace %s", name, settings.namespace)

    def create(obj: dict) -> dict:
        stored = api.create(obj)
        created.append((obj["kind"], obj["metadata"]["name"]))
        if cancelled.is_set():  # the caller gave up while this call was in flight
            raise ClusterStartError("start-up cancelled")
        return stored

    def start() -> tuple[str, str]:
        stored = create(cluster_spec(settings, name))
        if certs is not None:
            uid = stored.get("metadata", {}).get("uid")
            create(tls_secret(certs, settings.namespace, labels(settings, "dask-cluster"), uid))
        if settings.extra_gpu_group:
            create(gpu_worker_group_spec(settings, name))
        autoscaler = autoscaler_spec(settings, name)
        if autoscaler is not None:
            create(autoscaler)
        api.wait_for_scheduler(name, settings.resource_timeout)
        return api.scheduler_addresses(name)

    try:
        comm, dashboard = run_with_deadline(
            start, settings.start_timeout, "starting the Dask scheduler", cancelled
        )
    except BaseException as exc:
        cancelled.set()
        delete_created(api, created)
        if isinstance(exc, ClusterStartError):
            raise ClusterStartError(
                f"{exc}; DaskCluster {name} deleted. See why the scheduler pod did not start: "
                f"kubectl -n {settings.namespace} describe pod -l dask.org/cluster-name={name} "
                "(Pending: no node has the requested cpu/memory, or the image cannot be pulled); "
                "raise kubernetes.start_timeout for slow image pulls"
            ) from None
        if isinstance(exc, Exception):  # kr8s / httpx errors: no credentials, no CRDs, forbidden
            raise ClusterStartError(
                f"could not create DaskCluster {name} in namespace {settings.namespace}: "
                f"{exc}. Check access with `kubectl -n {settings.namespace} get daskclusters` "
                "(needs a kubeconfig or the treesits-driver ServiceAccount, and the "
                "dask-kubernetes operator's CRDs; cluster/README.md)"
            ) from exc
        raise  # SystemExit, KeyboardInterrupt: cleaned up, now go
    proto = "tls" if settings.tls else "tcp"
    return OwnedCluster(
        name=name,
        namespace=settings.namespace,
        scheduler_address=f"{proto}://{comm}",
        dashboard_link=f"http://{dashboard}/status",
        security=certs.security("client") if certs is not None else None,
        api=api,
        created=created,
        shutdown=settings.shutdown_on_close,
    )


@dataclass(frozen=True)
class WorkerNeed:
    """A worker group the driver waits for: one of its workers must have joined (a worker whose
    name contains ``name_part`` and that advertises ``resource``)."""

    group: str
    hint: str
    resource: str | None = None
    name_part: str | None = None

    def met_by(self, workers: dict[str, dict]) -> bool:
        """True when some worker of ``scheduler_info()["workers"]`` belongs to this group."""
        return any(
            (self.resource is None or w.get("resources", {}).get(self.resource))
            and (self.name_part is None or self.name_part in str(w.get("name", "")))
            for w in workers.values()
        )


def worker_needs(settings: KubeSettings, cluster_name: str | None = None) -> list[WorkerNeed]:
    """The groups of a driver's cluster that must have a worker before work is submitted (an
    adaptive group that may start at 0 is not waited for), with the likely causes when one
    does not come."""
    cluster = cluster_name or f"{settings.name}-<suffix>"
    ns = settings.namespace
    resources = settings.worker_resources()
    needs = []
    groups = []
    if not settings.cpu.empty:
        groups.append(("cpu", settings.cpu, "default"))
    if settings.gpu.enabled:  # inference waits for it, even when it was given 0 workers
        groups.append(("gpu", settings.gpu, "default" if settings.gpu_is_default_group else "gpu"))
    for kind, group, wg in groups:
        if group.adaptive is not None and group.adaptive.minimum == 0:
            continue
        advertised = resources[kind]
        resource = "GPU" if kind == "gpu" else next(iter(advertised), None)
        pods = f"kubectl -n {ns} describe pod -l dask.org/workergroup-name={cluster}-{wg}"
        if kind == "gpu":
            hint = (
                f"{pods}: Pending with 'Insufficient nvidia.com/gpu' means no node offers a GPU: "
                "the NVIDIA device plugin is missing (kubectl describe node <gpu-node> shows no "
                "nvidia.com/gpu under Allocatable), the GPU node group is at its maximum, or its "
                "autoscaling is off (Magnum: auto_scaling_enabled=true and max_node_count on the "
                "GPU node group, cluster/README.md); 'untolerated taint' means gpu.tolerations "
                "does not match the GPU nodes' taint; ImagePullBackOff: gpu.image"
            )
        else:
            hint = (
                f"{pods}: Pending means no CPU node has cpu.cpu_request / cpu.memory_request "
                "free (lower them or add nodes); ImagePullBackOff: image, image_pull_secret"
            )
        if group.workers == 0:
            hint = f"{kind}.workers is 0: give the group workers. {hint}"
        needs.append(
            WorkerNeed(
                group=f"{kind.upper()} worker group {cluster}-{wg}",
                hint=hint,
                resource=resource,
                name_part=f"-{wg}-worker-",
            )
        )
    return needs
