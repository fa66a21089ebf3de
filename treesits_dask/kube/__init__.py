"""Run on Kubernetes with the dask-kubernetes operator: settings, manifests, cluster start-up.

* :class:`KubeSettings` (``kubernetes:`` in a run YAML, :mod:`.settings` and :mod:`.groups`)
  validates the deployment once.
* :func:`cluster_spec`, :func:`gpu_worker_group_spec`, :func:`rbac`, :func:`cronjob`
  (:mod:`.specs`, :mod:`.rbac`) return plain dicts (no API calls); :func:`render`
  (:mod:`.render`) writes them as YAML files.
* :func:`start_cluster` (:mod:`.start`) creates the ``KubeCluster`` (needs the ``k8s`` extra and
  a cluster).

``python -m treesits_dask.kube render DIR [--config run.yaml] [--check]`` renders the manifests.
"""

from ..config.kubernetes import (
    GPU_RESOURCE,
    READ_RESOURCE,
    Adaptive,
    CpuGroup,
    CronJobSettings,
    GpuGroup,
    KubeSettings,
    PodResources,
    Toleration,
    valid_keys,
)
from .rbac import namespace, rbac
from .render import check_rendered, dump, load_settings, main, manifests, render
from .specs import DASK_API, cluster_spec, config_map, cronjob, gpu_worker_group_spec
from .start import ClusterStartError, run_with_deadline, start_cluster

__all__ = [
    "DASK_API",
    "GPU_RESOURCE",
    "READ_RESOURCE",
    "Adaptive",
    "ClusterStartError",
    "CpuGroup",
    "CronJobSettings",
    "GpuGroup",
    "KubeSettings",
    "PodResources",
    "Toleration",
    "check_rendered",
    "cluster_spec",
    "config_map",
    "cronjob",
    "dump",
    "gpu_worker_group_spec",
    "load_settings",
    "main",
    "manifests",
    "namespace",
    "rbac",
    "render",
    "run_with_deadline",
    "start_cluster",
    "valid_keys",
]
