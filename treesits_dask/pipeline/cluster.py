"""Dask clusters: a LocalCluster by default, an existing scheduler, or dask-kubernetes.

GDAL and S3 settings that workers need are process environment variables (``rasterio.Env`` is
thread-local and would not reach worker threads).  Only non-secret variables are sent to workers
(by :class:`EnvPlugin`); credentials come from each worker's own environment / pod.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from distributed.diagnostics.plugin import WorkerPlugin

from ..config import RunConfig
from ..io import storage

__all__ = ["EnvPlugin", "connect", "describe", "local_cluster_kwargs", "worker_environment"]

log = logging.getLogger(__name__)


def worker_environment(config: RunConfig) -> dict[str, str]:
    """The non-secret environment every process of a run needs (GDAL defaults + S3 endpoint
    settings)."""
    env = {k: os.environ.get(k, v) for k, v in storage.GDAL_DEFAULTS.items()}
    env.update(
        storage.s3_environment(config.s3_endpoint_url, config.s3_region, config.s3_addressing)
    )
    return env


class EnvPlugin(WorkerPlugin):
    """Sets non-secret environment variables on every worker, also ones that join later."""

    name = "treesits-env"

    def __init__(self, env: dict[str, str]):
        forbidden = [
            k
            for k in env
            if "SECRET" in k or "TOKEN" in k or "PASSWORD" in k or k.endswith("_KEY_ID")
        ]
        if forbidden:
            raise ValueError(f"refusing to ship credentials to workers: {forbidden}")
        self.env = dict(env)

    def setup(self, worker=None):
        storage.apply_environment(self.env)


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
            },
        }
    return SpecCluster(
        workers=workers,
        scheduler={"cls": Scheduler, "options": {"dashboard_address": kw["dashboard_address"]}},
    )


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
        return {
            "kind": "dask-kubernetes",
            "namespace": k.namespace,
            "name": k.name,
            "image": k.image,
            "worker_resources": k.worker_resources(),
            "read_on": k.read_on,
            "gpu_windows_in_flight": config.gpu_windows_in_flight,
            "concurrent_tasks": max(
                1,
                k.cpu.workers * k.cpu.threads
                + (
                    (k.gpu.workers or 0) * min(k.gpu.threads, config.gpu_windows_in_flight)
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


@contextlib.contextmanager
def connect(config: RunConfig) -> Iterator:
    """Yield a ``distributed.Client`` for the configured cluster; the cluster is closed on exit."""
    from distributed import Client, LocalCluster

    env = worker_environment(config)
    storage.apply_environment(env)  # the driver, and LocalCluster workers (they inherit it)
    if config.scheduler_address:
        client = Client(config.scheduler_address)
        log.info("connected to scheduler %s", config.scheduler_address)
    elif config.cluster == "kubernetes":
        from ..kube import start_cluster

        cluster = start_cluster(config.kubernetes)
        client = Client(cluster)
        log.info(
            "dask-kubernetes cluster %s in namespace %s",
            config.kubernetes.name,
            config.kubernetes.namespace,
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
        cluster = LocalCluster(**kwargs)
        client = Client(cluster)
        log.info(
            "LocalCluster with %d worker(s) x %d thread(s); dashboard %s",
            kwargs["n_workers"],
            kwargs["threads_per_worker"],
            client.dashboard_link,
        )
    try:
        client.register_plugin(EnvPlugin(env))
        yield client
    finally:
        client.close()
        if not config.scheduler_address:
            cluster.close()
