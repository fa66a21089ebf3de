"""Kubernetes objects as plain dicts (dask-kubernetes style): pure functions, no API calls.

Every pod template (scheduler, both worker groups, the CronJob driver) meets the *restricted*
Pod Security Standard and sets requests and limits on every container.  The Dask pod specs only
use fields that exist in the Kubernetes 1.21 pod schema frozen into the dask-kubernetes CRDs
(the API server silently drops unknown fields there).

Commands are ``dask scheduler`` / ``dask worker``: distributed >= 2026.6 has no
``dask-scheduler`` / ``dask-worker`` executables, which dask-kubernetes 2026.3 still emits
(dask/distributed#9335), so the specs are built here instead of by ``make_cluster_spec``.
"""

from __future__ import annotations

from ..config.kubernetes import GpuGroup, KubeSettings, PodResources, WorkerGroup
from ..io import storage

__all__ = [
    "DASK_API",
    "SCHEDULER_ROUTES",
    "cluster_spec",
    "config_map",
    "cronjob",
    "gpu_worker_group_spec",
    "object_meta",
    "pod_env",
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
_SCRATCH = "/tmp"
_CONFIG_VOLUME = "run-config"


def _labels(settings: KubeSettings, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "treesits-dask",
        "app.kubernetes.io/instance": settings.name,
        "app.kubernetes.io/component": component,
    }


def object_meta(settings: KubeSettings, name: str, component: str, **extra_labels: str) -> dict:
    return {
        "name": name,
        "namespace": settings.namespace,
        "labels": {**_labels(settings, component), **extra_labels},
    }


def pod_env(settings: KubeSettings) -> list[dict]:
    """Container environment: GDAL defaults, derived S3 settings, ``settings.env``, secret refs.

    S3 settings are derived from ``settings.env`` only (never from this process's environment),
    so rendering is deterministic; explicit entries in ``settings.env`` win.  Credentials appear
    only as ``secretKeyRef`` references to ``settings.s3_secret``.
    """
    values: dict[str, str] = dict(storage.GDAL_DEFAULTS)
    values.update(storage.s3_environment(environ=dict(settings.env)))
    values.update(settings.env)
    values["TMPDIR"] = _SCRATCH
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


def _pod_spec(
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
    """A hardened pod spec around one container: /tmp scratch, optional read-only cube volume."""
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


def worker_pod_spec(settings: KubeSettings, group: WorkerGroup) -> dict:
    """Pod spec of one worker group: ``dask worker`` with threads, memory limit and resources."""
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
        "8788",
    ]
    if advertised:
        args += ["--resources", ",".join(f"{k}={v:g}" for k, v in advertised.items())]
    container = {
        "name": "worker",
        "args": args,
        "env": pod_env(settings),
        "resources": group.to_k8s({"nvidia.com/gpu": group.gpus} if is_gpu else None),
        "ports": [{"name": "http-dashboard", "containerPort": 8788, "protocol": "TCP"}],
    }
    if is_gpu and group.image:
        container["image"] = group.image
    return _pod_spec(
        settings,
        container,
        cube=True,
        node_selector=group.node_selector,
        tolerations=[t.to_k8s() for t in group.tolerations],
    )


def _worker_group_body(settings: KubeSettings, group: WorkerGroup, component: str) -> dict:
    """The ``worker`` block of a DaskCluster / DaskWorkerGroup (replicas set explicitly)."""
    return {
        "replicas": group.initial_workers,
        "metadata": {"labels": _labels(settings, component)},
        "spec": worker_pod_spec(settings, group),
    }


def _scheduler_body(settings: KubeSettings, resources: PodResources) -> dict:
    env = [
        {
            "name": "DASK_DISTRIBUTED__SCHEDULER__HTTP__ROUTES",
            "value": repr(list(SCHEDULER_ROUTES)),
        },
        {"name": "TMPDIR", "value": _SCRATCH},
    ]
    container = {
        "name": "scheduler",
        "args": ["dask", "scheduler", "--host", "0.0.0.0"],
        "env": env,
        "resources": resources.to_k8s(),
        "ports": [
            {"name": "tcp-comm", "containerPort": 8786, "protocol": "TCP"},
            {"name": "http-dashboard", "containerPort": 8787, "protocol": "TCP"},
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
    return {
        "metadata": {"labels": _labels(settings, "scheduler")},
        "spec": _pod_spec(settings, container, cube=False),
        "service": {
            "type": settings.scheduler_service_type,
            "selector": {"dask.org/cluster-name": settings.name, "dask.org/component": "scheduler"},
            "ports": [
                {"name": "tcp-comm", "protocol": "TCP", "port": 8786, "targetPort": "tcp-comm"},
                {
                    "name": "http-dashboard",
                    "protocol": "TCP",
                    "port": 8787,
                    "targetPort": "http-dashboard",
                },
            ],
        },
    }


def cluster_spec(settings: KubeSettings) -> dict:
    """The DaskCluster: scheduler + default worker group (the CPU group; GPU for GPU-only
    clusters)."""
    group = settings.default_group
    component = "gpu-worker" if settings.gpu_is_default_group else "cpu-worker"
    return {
        "apiVersion": DASK_API,
        "kind": "DaskCluster",
        "metadata": object_meta(settings, settings.name, "dask-cluster"),
        "spec": {
            "idleTimeout": settings.idle_timeout,
            "worker": _worker_group_body(settings, group, component),
            "scheduler": _scheduler_body(settings, settings.scheduler),
        },
    }


def gpu_worker_group_spec(settings: KubeSettings) -> dict:
    """The DaskWorkerGroup ``<name>-gpu`` (what ``add_worker_group("gpu", custom_spec=...)``
    creates).

    Built in full: ``make_worker_spec`` would turn 0 workers into the cluster default and copy
    resources and env from the default group.
    """
    return {
        "apiVersion": DASK_API,
        "kind": "DaskWorkerGroup",
        "metadata": object_meta(
            settings,
            f"{settings.name}-gpu",
            "gpu-worker",
            **{"dask.org/cluster-name": settings.name},
        ),
        "spec": {
            "cluster": settings.name,
            "worker": _worker_group_body(settings, settings.gpu, "gpu-worker"),
        },
    }


def cronjob(settings: KubeSettings, config_map_name: str | None = None) -> dict:
    """The scheduled driver: ``python -m treesits_dask update --config <run.yaml>`` every run."""
    cj = settings.cronjob
    config_map_name = config_map_name or cj.config_map
    config_dir, config_file = cj.config_path.rsplit("/", 1)
    container = {
        "name": "driver",
        "args": ["python", "-m", "treesits_dask", "update", "--config", cj.config_path],
        "env": pod_env(settings),
        "resources": settings.driver.to_k8s(),
    }
    pod = _pod_spec(
        settings,
        container,
        cube=True,
        volumes=(
            {
                "name": _CONFIG_VOLUME,
                "configMap": {
                    "name": config_map_name,
                    "items": [{"key": "run.yaml", "path": config_file}],
                },
            },
        ),
        mounts=({"name": _CONFIG_VOLUME, "mountPath": config_dir, "readOnly": True},),
        service_account=True,
        restart_policy="Never",
        grace_seconds=120,  # time to delete the DaskCluster on SIGTERM (activeDeadlineSeconds)
    )
    job_spec: dict = {
        "backoffLimit": cj.backoff_limit,
        "activeDeadlineSeconds": cj.active_deadline_seconds,
    }
    if cj.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = cj.ttl_seconds_after_finished
    job_spec["template"] = {"metadata": {"labels": _labels(settings, "driver")}, "spec": pod}
    spec: dict = {"schedule": cj.schedule}
    if cj.time_zone:
        spec["timeZone"] = cj.time_zone
    spec |= {
        "concurrencyPolicy": "Forbid",
        "startingDeadlineSeconds": cj.starting_deadline_seconds,
        "successfulJobsHistoryLimit": cj.successful_jobs_history_limit,
        "failedJobsHistoryLimit": cj.failed_jobs_history_limit,
        "suspend": cj.suspend,
        "jobTemplate": {"metadata": {"labels": _labels(settings, "driver")}, "spec": job_spec},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": object_meta(settings, f"{settings.name}-update", "driver"),
        "spec": spec,
    }


def config_map(settings: KubeSettings, run_config_yaml: str, name: str | None = None) -> dict:
    """The ConfigMap holding the driver's ``run.yaml``."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(settings, name or settings.cronjob.config_map, "driver"),
        "data": {"run.yaml": run_config_yaml},
    }
