"""Namespace and driver RBAC: the objects an operator applies once, as plain dicts."""

from __future__ import annotations

from ..config.kubernetes import KubeSettings
from .specs import object_meta

__all__ = ["namespace", "rbac"]


def rbac(settings: KubeSettings) -> list[dict]:
    """ServiceAccount, Role and RoleBinding of the driver: namespaced, least privilege.

    Custom resources: what ``KubeCluster`` does (create/get/patch/delete clusters, worker groups
    and autoscalers; list/watch to follow them).  Pods: find the scheduler and read its state;
    ``pods/log`` for ``cluster.get_logs()`` and start-up errors; ``pods/portforward`` only when
    the driver runs outside the cluster (laptop), ``get`` for WebSocket and ``create`` for SPDY
    and Kubernetes >= 1.35.  Services: find the scheduler address.  No secrets, no wildcards.
    """
    crud = ["get", "list", "watch", "create", "patch", "delete"]
    read = ["get", "list", "watch"]
    sa = settings.service_account
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": object_meta(settings, sa, "driver"),
            "automountServiceAccountToken": False,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": object_meta(settings, sa, "driver"),
            "rules": [
                {
                    "apiGroups": ["kubernetes.dask.org"],
                    "resources": ["daskclusters", "daskworkergroups", "daskautoscalers"],
                    "verbs": crud,
                },
                {"apiGroups": [""], "resources": ["pods", "services"], "verbs": read},
                {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]},
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": object_meta(settings, sa, "driver"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": settings.namespace}],
        },
    ]


def namespace(settings: KubeSettings) -> dict:
    """The namespace, enforcing the restricted Pod Security Standard on everything in it."""
    labels = {"app.kubernetes.io/name": "treesits-dask"}
    for mode in ("enforce", "audit", "warn"):
        labels[f"pod-security.kubernetes.io/{mode}"] = "restricted"
        labels[f"pod-security.kubernetes.io/{mode}-version"] = "latest"
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": settings.namespace, "labels": labels},
    }
