"""Run on Kubernetes with the dask-kubernetes operator: settings, manifests, cluster start-up.

* :class:`KubeSettings` (``kubernetes:`` in a run YAML, :mod:`treesits_dask.config.kubernetes`)
  validates the deployment once.
* :func:`cluster_spec`, :func:`gpu_worker_group_spec`, :func:`rbac`, :func:`network_policies`,
  :func:`cronjob` (:mod:`.specs`, :mod:`.rbac`) return plain dicts (no API calls);
  :func:`render` (:mod:`.render`) writes them as YAML files for a Kubernetes version.
* :mod:`.tls`: a certificate authority per Dask cluster (TLS between all Dask processes).
* :func:`start_cluster` (:mod:`.start`) creates a driver's own DaskCluster (needs the ``k8s``
  extra and a cluster).

``python -m treesits_dask.kube render DIR [--config run.yaml] [--kube-version 1.23] [--check]``
renders the manifests; ``python -m treesits_dask.kube certs DIR`` makes a standing cluster's
certificates.
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
from .driver import config_map, cronjob
from .rbac import namespace, network_policies, pod_security_policy, rbac
from .render import check_rendered, dump, load_settings, main, manifests, render, with_version
from .specs import DASK_API, PORTS, autoscaler_spec, cluster_spec, gpu_worker_group_spec
from .start import (
    ClusterStartError,
    Kr8sApi,
    KubeApi,
    OwnedCluster,
    WorkerNeed,
    owned_cluster_name,
    run_with_deadline,
    start_cluster,
    worker_needs,
)
from .tls import ClusterCertificates, make_certificates

__all__ = [
    "DASK_API",
    "GPU_RESOURCE",
    "PORTS",
    "READ_RESOURCE",
    "Adaptive",
    "ClusterCertificates",
    "ClusterStartError",
    "CpuGroup",
    "CronJobSettings",
    "GpuGroup",
    "Kr8sApi",
    "KubeApi",
    "KubeSettings",
    "OwnedCluster",
    "PodResources",
    "Toleration",
    "WorkerNeed",
    "autoscaler_spec",
    "check_rendered",
    "cluster_spec",
    "config_map",
    "cronjob",
    "dump",
    "gpu_worker_group_spec",
    "load_settings",
    "main",
    "make_certificates",
    "manifests",
    "namespace",
    "network_policies",
    "owned_cluster_name",
    "pod_security_policy",
    "rbac",
    "render",
    "run_with_deadline",
    "start_cluster",
    "valid_keys",
    "with_version",
    "worker_needs",
]
