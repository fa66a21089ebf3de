"""Kubernetes objects of the Dask cluster as plain dicts (dask-kubernetes style): pure
functions, no API calls (the driver's CronJob is :mod:`treesits_dask.kube.driver`).

Every pod template (scheduler, both worker groups, the CronJob driver) meets the *restricted*
Pod Security Standard and sets requests and limits on every container.  The Dask pod specs only
use fields that exist in the Kubernetes 1.21 pod schema frozen into the dask-kubernetes CRDs
(the API server silently drops unknown fields there).

A driver owns a DaskCluster named ``<name>-<suffix>`` (``cluster_name``); every pod keeps the
labels ``app.kubernetes.io/name: treesits-dask`` and ``app.kubernetes.io/instance: <name>``, which
the NetworkPolicies select.  With ``tls`` the scheduler and workers speak TLS only, with the
certificates of the Secret ``<cluster_name>-tls`` (:mod:`treesits_dask.kube.tls`).

The module is longer than 400 lines because the DaskCluster is one object: its scheduler, worker
groups and their pods share ports, labels, TLS and environment, and are read together here.

Commands are ``dask scheduler`` / ``dask worker``: distributed >= 2026.6 has no
``dask-scheduler`` / ``dask-worker`` executables, which dask-kubernetes 2026.3 still emits
(dask/distributed#9335), so the specs are built here instead of by ``make_cluster_spec``.
"""

from __future__ import annotations

from ..config.kubernetes import GpuGroup, KubeSettings, PodResources, WorkerGroup
from ..io import storage
from .tls import tls_environment, tls_secret_name, tls_volume

__all__ = [
    "DASK_API",
    "PORTS",
    "SCHEDULER_ROUTES",
    "autoscaler_spec",
    "cluster_spec",
    "gpu_worker_group_spec",
    "labels",
    "object_meta",
    "pod_env",
    "pod_spec",
    "scheduler_address",
    "worker_pod_spec",
]

DASK_API = "kubernetes.dask.org/v1"
#: distributed's default HTTP routes plus the API that the operator uses to retire workers
#: gracefully and to check idleness (without it scale-down loses data).
SCHEDULER_ROUTES = (
    "distributed.http.scheduler.prometheus",
    "distributed.http.scheduler.info",
    "distributed.http.scheduler.json",
    "distributed.http.health",
    "distributed.http.proxy",
    "distributed.http.statics",
    "distributed.http.scheduler.api",
)
#: the Dask preload of the workers that run inference (:mod:`treesits_dask.pipeline.warmup`,
#: named here: ``kube`` sits below ``pipeline`` and does not import it)
WARMUP_PRELOAD = "treesits_dask.pipeline.warmup"
#: Every port a Dask pod listens on (fixed, so that NetworkPolicies can name them).
PORTS = {
    "scheduler": 8786,
    "scheduler-dashboard": 8787,
    "worker-dashboard": 8788,
    "worker": 8789,
    "nanny": 8790,
}
_SCRATCH = "/tmp"


def labels(settings: KubeSettings, component: str) -> dict[str, str]:
    """The labels of every object and pod: app name, instance (``settings.name``), component."""
    return {
        "app.kubernetes.io/name": "treesits-dask",
        "app.kubernetes.io/instance": settings.name,
        "app.kubernetes.io/component": component,
    }


def object_meta(settings: KubeSettings, name: str, component: str, **extra_labels: str) -> dict:
    return {
        "name": name,
        "namespace": settings.namespace,
        "labels": {**labels(settings, component), **extra_labels},
    }


def scheduler_address(settings: KubeSettings, cluster_name: str) -> str:
    """The scheduler's address inside the cluster (``tls://`` with TLS)."""
    proto = "tls" if settings.tls else "tcp"
    host = f"{cluster_name}-scheduler.{settings.namespace}.svc.cluster.local"
    return f"{proto}://{host}:{PORTS['scheduler']}"


def _process_env() -> dict[str, str]:
    """What every container needs with a read-only root and an arbitrary uid: writable home,
    temp and config folders on the scratch volume, and a user name (``getpass.getuser()`` fails
    for a uid without a passwd entry)."""
    return {
        "TMPDIR": _SCRATCH,
        "HOME": _SCRATCH,
        "MPLCONFIGDIR": f"{_SCRATCH}/matplotlib",
        "XDG_CACHE_HOME": f"{_SCRATCH}/.cache",
        "USER": "treesits",
        "LOGNAME": "treesits",
    }


def pod_env(settings: KubeSettings) -> list[dict]:
    """Environment of the containers that touch data (workers, driver): process folders, GDAL
    defaults, derived S3 settings, ``settings.env``, secret refs.

    S3 settings are derived from ``settings.env`` only (never from this process's environment),
    so rendering is deterministic; explicit entries in ``settings.env`` win.  Addressing
    (``AWS_VIRTUAL_HOSTING``) is set only when ``settings.env`` names the endpoint: otherwise the
    driver's settings decide it and its worker plugin sets it on every worker.  No ``TREESITS_*``
    variable: those would override run.yaml in the driver.  Credentials appear only as
    ``secretKeyRef`` references to ``settings.s3_secret``.
    """
    values: dict[str, str] = {**_process_env(), **storage.GDAL_DEFAULTS, **storage.MALLOC_DEFAULTS}
    s3 = storage.s3_environment(environ=dict(settings.env))
    if "AWS_ENDPOINT_URL" not in s3:
        s3.pop("AWS_VIRTUAL_HOSTING")
    values.update(s3)
    values.update(settings.env)
    env = [{"name": k, "value": v} for k, v in sorted(values.items())]
    if settings.s3_secret:
        env += [
            {"name": key, "valueFrom": {"secretKeyRef": {"name": settings.s3_secret, "key": key}}}
            for key in settings.s3_secret_keys
        ]
    return env


def _container_security(settings: KubeSettings) -> dict:
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": settings.read_only_root_filesystem,
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pod_security(settings: KubeSettings) -> dict:
    return {
        "runAsNonRoot": True,
        "runAsUser": settings.run_as_user,
        "runAsGroup": settings.run_as_user,
        "fsGroup": settings.run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_spec(
    settings: KubeSettings,
    container: dict,
    *,
    cube: bool,
    volumes: tuple[dict, ...] = (),
    mounts: tuple[dict, ...] = (),
    service_account: bool = False,
    node_selector: dict[str, str] | None = None,
    tolerations: list[dict] | None = None,
    restart_policy: str | None = None,
    grace_seconds: int | None = None,
) -> dict:
    """A hardened pod spec (restricted Pod Security Standard) around one container: non-root,
    no privileges, read-only root, /tmp scratch, an optional read-only cube volume."""
    all_volumes = [{"name": "scratch", "emptyDir": {"sizeLimit": settings.scratch_size}}, *volumes]
    all_mounts = [{"name": "scratch", "mountPath": _SCRATCH}, *mounts]
    if cube and settings.cube_claim:
        all_volumes.append(
            {
                "name": "cube",
                "persistentVolumeClaim": {"claimName": settings.cube_claim, "readOnly": True},
            }
        )
        all_mounts.append({"name": "cube", "mountPath": settings.cube_mount_path, "readOnly": True})
    container = {
        "name": container["name"],
        "image": container.get("image", settings.image),
        "imagePullPolicy": settings.image_pull_policy,
        **{k: v for k, v in container.items() if k not in ("name", "image")},
        "securityContext": _container_security(settings),
        "volumeMounts": all_mounts,
    }
    spec: dict = {
        "automountServiceAccountToken": service_account,
        "enableServiceLinks": False,
        "securityContext": _pod_security(settings),
        "containers": [container],
        "volumes": all_volumes,
    }
    if service_account:
        spec["serviceAccountName"] = settings.service_account
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    if grace_seconds is not None:
        spec["terminationGracePeriodSeconds"] = grace_seconds
    if settings.image_pull_secret:
        spec["imagePullSecrets"] = [{"name": settings.image_pull_secret}]
    if node_selector:
        spec["nodeSelector"] = dict(sorted(node_selector.items()))
    if tolerations:
        spec["tolerations"] = tolerations
    return spec


def _tls_parts(settings: KubeSettings, cluster_name: str) -> tuple[list[dict], tuple, tuple]:
    """(env, volumes, mounts) of a Dask pod: TLS only, with the cluster's certificates."""
    if not settings.tls:
        return [], (), ()
    volume, mount = tls_volume(tls_secret_name(cluster_name))
    env = [{"name": k, "value": v} for k, v in tls_environment(mount["mountPath"]).items()]
    return env, (volume,), (mount,)


def worker_pod_spec(
    settings: KubeSettings, group: WorkerGroup, cluster_name: str | None = None
) -> dict:
    """Pod spec of one worker group: ``dask worker`` with threads, memory limit, fixed ports and
    the resources its group advertises (``dask worker --resources``)."""
    cluster_name = cluster_name or settings.name
    is_gpu = isinstance(group, GpuGroup)
    advertised = settings.worker_resources()["gpu" if is_gpu else "cpu"]
    args = [
        "dask",
        "worker",
        "--name",
        "$(DASK_WORKER_NAME)",
        "--nthreads",
        str(group.threads),
        "--memory-limit",
        str(group.memory_limit_bytes),
        "--dashboard",
        "--dashboard-address",
        str(PORTS["worker-dashboard"]),
        "--worker-port",
        str(PORTS["worker"]),
        "--nanny-port",
        str(PORTS["nanny"]),
    ]
    if settings.tls:
        args += ["--protocol", "tls"]
    if advertised:
        args += ["--resources", ",".join(f"{k}={v:g}" for k, v in advertised.items())]
    if is_gpu or not settings.gpu.enabled:  # the group that runs inference: torch as it starts
        args += ["--preload", WARMUP_PRELOAD]
    tls_env, volumes, mounts = _tls_parts(settings, cluster_name)
    # set here, so the operator does not add its tcp:// address (it keeps a DASK_SCHEDULER_ADDRESS
    # that the pod spec already has)
    address = {"name": "DASK_SCHEDULER_ADDRESS", "value": scheduler_address(settings, cluster_name)}
    container = {
        "name": "worker",
        "args": args,
        "env": [address, *tls_env, *pod_env(settings)],
        "resources": group.to_k8s({"nvidia.com/gpu": group.gpus} if is_gpu else None),
        "ports": [
            {
                "name": "http-dashboard",
                "containerPort": PORTS["worker-dashboard"],
                "protocol": "TCP",
            },
            {"name": "tcp-worker", "containerPort": PORTS["worker"], "protocol": "TCP"},
            {"name": "tcp-nanny", "containerPort": PORTS["nanny"], "protocol": "TCP"},
        ],
    }
    if is_gpu:
        container["image"] = settings.gpu_image
    return pod_spec(
        settings,
        container,
        cube=True,
        volumes=volumes,
        mounts=mounts,
        node_selector=group.node_selector,
        tolerations=[t.to_k8s() for t in group.tolerations],
    )


def _worker_group_body(
    settings: KubeSettings, group: WorkerGroup, component: str, cluster_name: str
) -> dict:
    """The ``worker`` block of a DaskCluster / DaskWorkerGroup (replicas set explicitly)."""
    return {
        "replicas": group.initial_workers,
        "metadata": {"labels": labels(settings, component)},
        "spec": worker_pod_spec(settings, group, cluster_name),
    }


def _scheduler_body(settings: KubeSettings, resources: PodResources, cluster_name: str) -> dict:
    timeout = settings.no_workers_timeout
    tls_env, volumes, mounts = _tls_parts(settings, cluster_name)
    env = [
        {
            "name": "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES",
            "value": repr(list(SCHEDULER_ROUTES)),
        },
        # tasks that no worker can run (GPU workers that never come) fail instead of holding the
        # cluster until the Job's deadline; the idle cluster is then deleted by the operator
        {
            "name": "DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT",
            "value": f"{timeout}s" if timeout else "null",
        },
        *tls_env,
        *[{"name": k, "value": v} for k, v in sorted(_process_env().items())],
    ]
    args = ["dask", "scheduler", "--host", "0.0.0.0"]
    if settings.tls:
        args += ["--protocol", "tls"]
    container = {
        "name": "scheduler",
        "args": args,
        "env": env,
        "resources": resources.to_k8s(),
        "ports": [
            {"name": "tcp-comm", "containerPort": PORTS["scheduler"], "protocol": "TCP"},
            {
                "name": "http-dashboard",
                "containerPort": PORTS["scheduler-dashboard"],
                "protocol": "TCP",
            },
        ],
        "readinessProbe": {
            "httpGet": {"port": "http-dashboard", "path": "/health"},
            "initialDelaySeconds": 0,
            "periodSeconds": 1,
            "timeoutSeconds": 300,
        },
        "livenessProbe": {
            "httpGet": {"port": "http-dashboard", "path": "/health"},
            "initialDelaySeconds": 15,
            "periodSeconds": 20,
        },
    }
    service: dict = {
        "type": settings.scheduler_service_type,
        "selector": {"dask.org/cluster-name": cluster_name, "dask.org/component": "scheduler"},
        "ports": [
            {
                "name": "tcp-comm",
                "protocol": "TCP",
                "port": PORTS["scheduler"],
                "targetPort": "tcp-comm",
            },
            {
                "name": "http-dashboard",
                "protocol": "TCP",
                "port": PORTS["scheduler-dashboard"],
                "targetPort": "http-dashboard",
            },
        ],
    }
    if settings.scheduler_service_type == "LoadBalancer":
        service["loadBalancerSourceRanges"] = list(settings.load_balancer_source_ranges)
    return {
        "metadata": {"labels": labels(settings, "scheduler")},
        "spec": pod_spec(settings, container, cube=False, volumes=volumes, mounts=mounts),
        "service": service,
    }


def cluster_spec(settings: KubeSettings, cluster_name: str | None = None) -> dict:
    """The DaskCluster ``cluster_name`` (default ``settings.name``, a standing cluster):
    scheduler + default worker group (the CPU group; GPU for GPU-only clusters)."""
    cluster_name = cluster_name or settings.name
    group = settings.default_group
    component = "gpu-worker" if settings.gpu_is_default_group else "cpu-worker"
    return {
        "apiVersion": DASK_API,
        "kind": "DaskCluster",
        "metadata": object_meta(settings, cluster_name, "dask-cluster"),
        "spec": {
            "idleTimeout": settings.idle_timeout,
            "worker": _worker_group_body(settings, group, component, cluster_name),
            "scheduler": _scheduler_body(settings, settings.scheduler, cluster_name),
        },
    }


def gpu_worker_group_spec(settings: KubeSettings, cluster_name: str | None = None) -> dict:
    """The DaskWorkerGroup ``<cluster>-gpu`` next to the default (CPU) group.

    Built in full: ``make_worker_spec`` would turn 0 workers into the cluster default and copy
    resources and env from the default group.
    """
    cluster_name = cluster_name or settings.name
    return {
        "apiVersion": DASK_API,
        "kind": "DaskWorkerGroup",
        "metadata": object_meta(
            settings,
            f"{cluster_name}-gpu",
            "gpu-worker",
            **{"dask.org/cluster-name": cluster_name},
        ),
        "spec": {
            "cluster": cluster_name,
            "worker": _worker_group_body(settings, settings.gpu, "gpu-worker", cluster_name),
        },
    }


def autoscaler_spec(settings: KubeSettings, cluster_name: str | None = None) -> dict | None:
    """The DaskAutoscaler of the default group when it is adaptive (else None): what
    ``KubeCluster.adapt`` creates."""
    adaptive = settings.default_group.adaptive
    if adaptive is None:
        return None
    cluster_name = cluster_name or settings.name
    return {
        "apiVersion": DASK_API,
        "kind": "DaskAutoscaler",
        "metadata": object_meta(
            settings, cluster_name, "autoscaler", **{"dask.org/cluster-name": cluster_name}
        ),
        "spec": {
            "cluster": cluster_name,
            "minimum": adaptive.minimum,
            "maximum": adaptive.maximum,
        },
    }
