"""The objects an operator applies once, as plain dicts: the namespace, the driver's RBAC, the
NetworkPolicies that keep everyone but the cluster's own pods away from the Dask ports, and for
Kubernetes < 1.25 a PodSecurityPolicy that admits the treesits pods."""

from __future__ import annotations

from ..config.kubernetes import KubeSettings
from .specs import PORTS, labels, object_meta

__all__ = ["namespace", "network_policies", "pod_security_policy", "rbac"]


def rbac(settings: KubeSettings) -> list[dict]:
    """ServiceAccount, Role and RoleBinding of the driver: namespaced, least privilege.

    Custom resources: what ``KubeCluster`` does (create/get/patch/delete clusters, worker groups
    and autoscalers; list/watch to follow them).  Pods: find the scheduler and read its state;
    ``pods/log`` for ``cluster.get_logs()`` and start-up errors; ``pods/portforward`` only when
    the driver runs outside the cluster (laptop), ``get`` for WebSocket and ``create`` for SPDY
    and Kubernetes >= 1.35.  Services: find the scheduler address.  Secrets: ``create`` only (the
    cluster's TLS certificates).  No wildcards.
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
                # the TLS Secret of each new cluster; it is owned by the DaskCluster and deleted
                # with it, so the driver can neither read, change nor delete any Secret
                {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
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


def network_policies(settings: KubeSettings) -> list[dict]:
    """Ingress to the scheduler and workers only from this deployment's pods (labelled
    ``app.kubernetes.io/instance: <name>``: driver, scheduler, workers), to the scheduler's HTTP
    port from the operator's namespace (idle checks, scaling), and from
    ``network_policy.allowed_cidrs`` / ``load_balancer_source_ranges``; no ingress to the
    driver.  Egress is left open (S3, NFS, the API server)."""
    np = settings.network_policy
    if not np.enabled:
        return []
    ours = {k: v for k, v in labels(settings, "").items() if not k.endswith("/component")}
    cluster_pods = [{"podSelector": {"matchLabels": ours}}]

    def ports(*names: str) -> list[dict]:
        return [{"protocol": "TCP", "port": PORTS[n]} for n in names]

    scheduler_ports = ports("scheduler", "scheduler-dashboard")
    scheduler_ingress = [
        {"from": cluster_pods, "ports": scheduler_ports},
        {
            "from": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": np.operator_namespace}
                    }
                }
            ],
            "ports": ports("scheduler-dashboard"),
        },
    ]
    cidrs = sorted({*np.allowed_cidrs, *settings.load_balancer_source_ranges})
    if cidrs:
        scheduler_ingress.append(
            {"from": [{"ipBlock": {"cidr": c}} for c in cidrs], "ports": scheduler_ports}
        )

    def policy(name: str, component: str | list[str], ingress: list[dict]) -> dict:
        selector: dict = {"matchLabels": dict(ours)}
        if isinstance(component, str):
            selector["matchLabels"]["app.kubernetes.io/component"] = component
        else:
            selector["matchExpressions"] = [
                {"key": "app.kubernetes.io/component", "operator": "In", "values": component}
            ]
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": object_meta(settings, f"{settings.name}-{name}", "network-policy"),
            "spec": {"podSelector": selector, "policyTypes": ["Ingress"], "ingress": ingress},
        }

    return [
        policy("scheduler", "scheduler", scheduler_ingress),
        policy(
            "workers",
            ["cpu-worker", "gpu-worker"],
            [{"from": cluster_pods, "ports": ports("worker", "nanny", "worker-dashboard")}],
        ),
        policy("driver", "driver", []),
    ]


def pod_security_policy(settings: KubeSettings) -> list[dict]:
    """For Kubernetes < 1.25 (Magnum 1.23 may enable the PodSecurityPolicy admission plugin):
    a PodSecurityPolicy as strict as the restricted standard, and the right of every
    ServiceAccount of the namespace to use it.  Empty for newer versions (the API is gone)."""
    if settings.version >= (1, 25):
        return []
    name = f"{settings.namespace}-{settings.name}-restricted"
    meta = {"name": name, "labels": labels(settings, "pod-security")}
    ranges = [{"min": 1, "max": 65535}]
    return [
        {
            "apiVersion": "policy/v1beta1",
            "kind": "PodSecurityPolicy",
            "metadata": {
                **meta,
                "annotations": {
                    "seccomp.security.alpha.kubernetes.io/allowedProfileNames": "runtime/default",
                    "seccomp.security.alpha.kubernetes.io/defaultProfileName": "runtime/default",
                },
            },
            "spec": {
                "privileged": False,
                "allowPrivilegeEscalation": False,
                "requiredDropCapabilities": ["ALL"],
                "volumes": [
                    "configMap",
                    "csi",
                    "downwardAPI",
                    "emptyDir",
                    "ephemeral",
                    "persistentVolumeClaim",
                    "projected",
                    "secret",
                ],  # fmt: skip
                "hostNetwork": False,
                "hostIPC": False,
                "hostPID": False,
                "runAsUser": {"rule": "MustRunAsNonRoot"},
                "runAsGroup": {"rule": "MustRunAs", "ranges": ranges},
                "supplementalGroups": {"rule": "MustRunAs", "ranges": ranges},
                "fsGroup": {"rule": "MustRunAs", "ranges": ranges},
                "seLinux": {"rule": "RunAsAny"},
                "readOnlyRootFilesystem": False,
            },
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": meta,
            "rules": [
                {
                    "apiGroups": ["policy"],
                    "resources": ["podsecuritypolicies"],
                    "verbs": ["use"],
                    "resourceNames": [name],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {**meta, "namespace": settings.namespace},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Group",
                    "name": f"system:serviceaccounts:{settings.namespace}",
                }
            ],
        },
    ]
