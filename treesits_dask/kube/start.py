"""Start the Dask cluster on Kubernetes with the dask-kubernetes operator (needs the ``k8s`` extra
and access to a cluster).  The specs come from :mod:`treesits_dask.kube.specs`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ..config.kubernetes import KubeSettings
from ..errors import ConfigError, TreesitsError
from .specs import DASK_API, cluster_spec, gpu_worker_group_spec

__all__ = ["ClusterStartError", "run_with_deadline", "start_cluster"]

log = logging.getLogger(__name__)


class ClusterStartError(TreesitsError):
    """The Dask cluster on Kubernetes did not come up (scheduler pod Pending, operator missing)."""


def _status_code(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def run_with_deadline(fn: Callable[[], Any], seconds: float, what: str) -> Any:
    """``fn()`` in a daemon thread; :class:`ClusterStartError` if it has not returned in time.

    ``KubeCluster`` waits forever for a scheduler pod that stays Pending; the daemon thread
    that is still waiting does not keep the process alive.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=target, name=f"deadline: {what}", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise ClusterStartError(f"{what} did not finish within {seconds:g} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _delete_cluster(settings: KubeSettings) -> None:
    """Delete the DaskCluster (its pods and worker groups go with it); ignore a missing one."""
    import kr8s
    from kr8s.objects import new_class

    dask_cluster = new_class("DaskCluster", DASK_API, asyncio=False, plural="daskclusters")
    try:
        dask_cluster.get(settings.name, namespace=settings.namespace).delete()
    except kr8s.NotFoundError:
        pass


def start_cluster(settings: KubeSettings) -> Any:
    """Create (or connect to) the DaskCluster, add the GPU group, turn on adaptivity; return it.

    The caller owns the cluster (use it as a context manager).  The operator deletes it after
    ``idle_timeout`` seconds without work even if this process is killed, but only once its
    scheduler runs: if the scheduler is not up within ``start_timeout`` seconds (a pod stuck
    Pending: no node fits, image pull failing), the DaskCluster is deleted and
    :class:`ClusterStartError` says where to look.
    """
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as exc:
        raise ConfigError(
            "cluster: kubernetes needs dask-kubernetes; install the k8s extra: "
            "pip install 'treesits_dask[k8s]'"
        ) from exc
    log.info("starting DaskCluster %s in namespace %s", settings.name, settings.namespace)

    def create() -> Any:
        return KubeCluster(
            custom_cluster_spec=cluster_spec(settings),
            namespace=settings.namespace,
            idle_timeout=settings.idle_timeout,
            shutdown_on_close=settings.shutdown_on_close,
            resource_timeout=settings.resource_timeout,
            quiet=True,
        )

    try:
        cluster = run_with_deadline(create, settings.start_timeout, "starting the Dask scheduler")
    except ClusterStartError as exc:
        _delete_cluster(settings)
        raise ClusterStartError(
            f"{exc}; DaskCluster {settings.name} deleted. See why the scheduler pod did not start: "
            f"kubectl -n {settings.namespace} describe pod -l "
            f"dask.org/cluster-name={settings.name} "
            "(Pending: no node has the requested cpu/memory, or the image cannot be pulled); "
            "raise kubernetes.start_timeout for slow image pulls"
        ) from None
    except Exception as exc:  # kr8s / httpx errors: no credentials, no CRDs, forbidden, ...
        raise ClusterStartError(
            f"could not create DaskCluster {settings.name} in namespace {settings.namespace}: "
            f"{exc}. Check access with `kubectl -n {settings.namespace} get daskclusters` (needs "
            "a kubeconfig or the treesits-driver ServiceAccount, and the dask-kubernetes "
            "operator's CRDs; cluster/README.md)"
        ) from exc
    try:
        if settings.extra_gpu_group:
            body = gpu_worker_group_spec(settings)["spec"]["worker"]
            try:
                cluster.add_worker_group("gpu", custom_spec=body)
            except Exception as exc:  # kr8s.ServerError; 409: left over from a killed run
                if _status_code(exc) != 409:
                    raise
                log.info("worker group %s-gpu exists already; reusing it", settings.name)
        adaptive = settings.default_group.adaptive
        if adaptive is not None:
            cluster.adapt(minimum=adaptive.minimum, maximum=adaptive.maximum)
    except BaseException:
        cluster.close()
        raise
    return cluster
