"""Dask clusters: a LocalCluster by default, an existing scheduler, or dask-kubernetes.

GDAL and S3 settings that workers need are process environment variables (``rasterio.Env`` is
thread-local and would not reach worker threads).  Only non-secret variables are sent to workers
(by :class:`~treesits_dask.pipeline.plugins.EnvPlugin`); credentials come from each worker's own
environment / pod.

Resource routing (:class:`Routing`) is the same for every kind of cluster: inference tasks need
the Dask resource ``GPU`` and reads ``CPU`` when a GPU group exists (declared by the settings, or
for a standing cluster behind ``scheduler_address`` found among its workers), and
:func:`wait_for_workers` checks, with a deadline, that workers advertising them have joined.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import dask
from dask.utils import parse_timedelta

from ..config import RunConfig
from ..config.kubernetes import GPU_RESOURCE, READ_RESOURCE
from ..errors import ClusterError
from ..io import storage
from ..kube.start import WorkerNeed, worker_needs
from . import warmup
from .plugins import add_worker_plugin, worker_plugins

__all__ = [
    "Routing",
    "connect",
    "declared_routing",
    "describe",
    "local_cluster_kwargs",
    "needs_for",
    "routing_for",
    "wait_for_workers",
    "worker_environment",
]

log = logging.getLogger(__name__)


def worker_environment(config: RunConfig) -> dict[str, str]:
    """The non-secret environment every process of a run needs: GDAL and malloc defaults
    (:func:`storage.process_defaults`) and the S3 endpoint settings."""
    env = storage.process_defaults()
    env.update(
        storage.s3_environment(config.s3_endpoint_url, config.s3_region, config.s3_addressing)
    )
    return env


def local_cluster_kwargs(config: RunConfig) -> dict:
    """Arguments of ``distributed.LocalCluster`` for a config (pure; used by ``plan`` too)."""
    cores = os.cpu_count() or 1
    # default: few processes with several threads each; the CPU forwards in a process share its
    # cores out, so a window predicted alone (one that holds most of the forest, the last of a
    # tile) still gets all cores of its process
    threads = config.threads_per_worker or min(cores, 4)
    workers = config.workers or max(1, cores // threads)
    return {
        "n_workers": workers,
        "threads_per_worker": threads,
        "processes": True,
        "memory_limit": config.memory_limit,
        "dashboard_address": config.dashboard_address,
    }


def _heterogeneous_local_cluster(config: RunConfig):
    """A CPU worker group (advertising ``CPU=threads``) and a group advertising ``GPU=1``, on this
    machine.

    The same worker-group semantics as the dask-kubernetes cluster with a GPU worker group.
    """
    from distributed import Nanny, Scheduler, SpecCluster

    kw = local_cluster_kwargs(config)
    threads = kw["threads_per_worker"]
    workers = {
        f"cpu-{i}": {
            "cls": Nanny,
            "options": {
                "nthreads": threads,
                "resources": {"CPU": threads},
                "memory_limit": kw["memory_limit"],
            },
        }
        for i in range(kw["n_workers"])
    }
    for i in range(config.local_gpu_workers):
        # one thread per window in flight (each inference task takes 1 / windows of GPU=1)
        workers[f"gpu-{i}"] = {
            "cls": Nanny,
            "options": {
                "nthreads": config.gpu_windows_in_flight,
                "resources": {"GPU": 1},
                "memory_limit": kw["memory_limit"],
                **warmup.worker_kwargs(),  # inference runs here only
            },
        }
    return SpecCluster(
        workers=workers,
        scheduler={"cls": Scheduler, "options": {"dashboard_address": kw["dashboard_address"]}},
    )


@dataclass(frozen=True)
class Routing:
    """Dask resource annotations of reading and of inference tasks (None: unannotated)."""

    read: dict[str, float] | None = None
    predict: dict[str, float] | None = None

    @property
    def gpu(self) -> bool:
        """True when inference runs only on workers that advertise ``GPU``."""
        return self.predict is not None


def _gpu_routing(config: RunConfig, route_reads: bool = True) -> Routing:
    """Reads on ``CPU`` workers, inference on ``GPU`` ones: each inference task takes its share
    of a GPU (``gpu_windows_in_flight`` windows per GPU at once)."""
    return Routing(
        read={READ_RESOURCE: 1} if route_reads else None,
        predict={GPU_RESOURCE: config.gpu_task_share},
    )


def declared_routing(config: RunConfig) -> Routing | None:
    """The routing the settings declare; None for a plain standing cluster (ask its workers).

    With a GPU group reads carry ``CPU`` in both ``read_on`` modes: the group named by
    ``read_on`` is the one that advertises it, so reads never land on the other group.
    """
    if config.cluster == "kubernetes":
        return _gpu_routing(config) if config.kubernetes.gpu.enabled else Routing()
    if config.scheduler_address:
        return None
    return _gpu_routing(config) if config.local_gpu_workers else Routing()


def routing_for(config: RunConfig, workers: dict[str, dict]) -> Routing:
    """The routing of a run: the declared one, or for a standing cluster the resources its
    workers (``scheduler_info()["workers"]``) advertise."""
    declared = declared_routing(config)
    if declared is not None:
        return declared
    advertised = {r for w in workers.values() for r, n in (w.get("resources") or {}).items() if n}
    if GPU_RESOURCE not in advertised:
        return Routing()
    if READ_RESOURCE not in advertised:
        log.warning(
            "workers advertise %s but none %s: reads are not routed and may run on GPU workers",
            GPU_RESOURCE,
            READ_RESOURCE,
        )
    return _gpu_routing(config, route_reads=READ_RESOURCE in advertised)


def needs_for(config: RunConfig, routing: Routing) -> list[WorkerNeed]:
    """Worker groups that must have a worker before the run submits work."""
    if config.cluster == "kubernetes" and not config.scheduler_address:
        return worker_needs(config.kubernetes)
    where = f"the scheduler {config.scheduler_address}" if config.scheduler_address else "here"
    needs = []
    if routing.predict:
        needs.append(
            WorkerNeed(
                group=f"workers advertising {GPU_RESOURCE} (inference)",
                hint=f"start the GPU workers of {where} with `dask worker --resources "
                f"{GPU_RESOURCE}=1` (cluster/README.md, Standing cluster)",
                resource=GPU_RESOURCE,
            )
        )
    if routing.read:
        needs.append(
            WorkerNeed(
                group=f"workers advertising {READ_RESOURCE} (reading)",
                hint=f"start the reading workers of {where} with `dask worker --resources "
                f"{READ_RESOURCE}=<threads>`",
                resource=READ_RESOURCE,
            )
        )
    return needs


def wait_for_workers(
    client, needs: list[WorkerNeed], timeout: float, poll: float = 1.0
) -> dict[str, dict]:
    """Wait until every group of ``needs`` has a worker; return the workers.

    :class:`~treesits_dask.errors.ClusterError` after ``timeout`` seconds names the groups that
    are missing and what to check, instead of letting their tasks wait forever.
    """
    deadline = time.monotonic() + timeout
    while True:
        workers = client.scheduler_info(n_workers=-1)["workers"]
        missing = [n for n in needs if not n.met_by(workers)]
        if not missing:
            return workers
        if time.monotonic() >= deadline:
            lines = "; ".join(f"{n.group} has no worker after {timeout:g} s ({n.hint})"
                              for n in missing)  # fmt: skip
            raise ClusterError(
                f"{lines}. The run stops here instead of waiting for them (workers_timeout)"
            )
        log.info("waiting for %s", ", ".join(n.group for n in missing))
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def describe(config: RunConfig) -> dict:
    """What cluster a config asks for (for ``plan``)."""
    if config.scheduler_address:
        return {
            "kind": "existing scheduler",
            "address": config.scheduler_address,
            "concurrent_tasks": 1,
        }
    if config.cluster == "kubernetes":
        k = config.kubernetes

        def most(group) -> int:  # adaptive groups: their maximum
            return group.adaptive.maximum if group.adaptive else int(group.workers or 0)

        return {
            "kind": "dask-kubernetes",
            "namespace": k.namespace,
            "name": f"{k.name}-<suffix> (one per driver)",
            "image": k.image,
            "gpu_image": k.gpu_image if k.gpu.enabled else None,
            "worker_resources": k.worker_resources(),
            "read_on": k.read_on,
            "tls": k.tls,
            "kube_version": k.kube_version,
            "gpu_windows_in_flight": config.gpu_windows_in_flight,
            "concurrent_tasks": max(
                1,
                most(k.cpu) * k.cpu.threads
                + (
                    most(k.gpu) * min(k.gpu.threads, int(k.gpu.gpus) * config.gpu_windows_in_flight)
                    if k.gpu.enabled
                    else 0
                ),
            ),
        }
    kw = local_cluster_kwargs(config)
    if config.local_gpu_workers:
        return {
            "kind": "local CPU + GPU worker groups",
            "cpu_workers": kw["n_workers"],
            "gpu_workers": config.local_gpu_workers,
            "threads_per_worker": kw["threads_per_worker"],
            "gpu_windows_in_flight": config.gpu_windows_in_flight,
            "concurrent_tasks": kw["n_workers"] * kw["threads_per_worker"]
            + config.local_gpu_workers * config.gpu_windows_in_flight,
        }
    return {
        "kind": "LocalCluster",
        **{k: kw[k] for k in ("n_workers", "threads_per_worker", "memory_limit")},
        "concurrent_tasks": kw["n_workers"] * kw["threads_per_worker"],
    }


#: seconds a cluster started here waits for a lost worker to come back (see :func:`connect`)
LOST_WORKER_TIMEOUT_S = 600


@contextlib.contextmanager
def connect(config: RunConfig) -> Iterator:
    """Yield a ``distributed.Client`` for the configured cluster.

    A cluster started here (LocalCluster, local worker groups, a driver's own DaskCluster) is
    closed on exit; a standing cluster behind ``scheduler_address`` is only disconnected from.
    """
    env = worker_environment(config)
    storage.apply_environment(env)  # the driver, and LocalCluster workers (they inherit it)
    # a LocalCluster closes a lost worker's nanny for good if the worker it restarts has not
    # registered within this timeout (distributed's 15 s is less than a restart can take on a
    # loaded machine: spawning, importing torch, the plugins); the run then went on a worker short
    lost = "distributed.deploy.lost-worker-timeout"
    patient = max(parse_timedelta(dask.config.get(lost, "15s")) or 0, LOST_WORKER_TIMEOUT_S)
    with dask.config.set({lost: f"{patient}s"}):
        client, cluster = _start(config)
        try:
            for plugin in worker_plugins(env):
                add_worker_plugin(client, plugin)
            yield client
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


def _start(config: RunConfig):
    """(client, cluster started here or None) for the configured kind of cluster."""
    from distributed import Client, LocalCluster

    cluster = None
    if config.scheduler_address:
        client = Client(config.scheduler_address)
        log.info("connected to scheduler %s", config.scheduler_address)
    elif config.cluster == "kubernetes":
        from ..kube import start_cluster

        cluster = start_cluster(config.kubernetes)
        try:
            client = Client(cluster.scheduler_address, security=cluster.security)
        except BaseException:
            cluster.close()
            raise
        log.info(
            "Dask cluster %s in namespace %s; dashboard %s",
            cluster.name,
            cluster.namespace,
            cluster.dashboard_link,
        )
    elif config.local_gpu_workers:
        cluster = _heterogeneous_local_cluster(config)
        client = Client(cluster)
        log.info(
            "local cluster: %d CPU worker(s) + %d worker(s) advertising GPU=1; dashboard %s",
            local_cluster_kwargs(config)["n_workers"],
            config.local_gpu_workers,
            client.dashboard_link,
        )
    else:
        kwargs = local_cluster_kwargs(config)
        cluster = LocalCluster(**kwargs, **warmup.worker_kwargs())
        client = Client(cluster)
        log.info(
            "LocalCluster with %d worker(s) x %d thread(s); dashboard %s",
            kwargs["n_workers"],
            kwargs["threads_per_worker"],
            client.dashboard_link,
        )
    return client, cluster
