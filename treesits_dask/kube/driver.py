"""The scheduled driver as plain dicts: the CronJob running ``python -m treesits_dask update``
and the ConfigMap with its run.yaml.  Fields that ``kube_version`` lacks are left out."""

from __future__ import annotations

from ..config.kubernetes import KubeSettings
from .specs import labels, object_meta, pod_env, pod_spec

__all__ = ["JOB_NAME_LABEL", "config_map", "cronjob"]

#: Job pods carry this label (the Job's name); the driver's lease uses it.
JOB_NAME_LABEL = "job-name"
_CONFIG_VOLUME = "run-config"


def _driver_env(settings: KubeSettings) -> list[dict]:
    # the Job's name: a retry of the same Job takes over its dead predecessor's lease at once
    job = {
        "name": "TREESITS_DRIVER_JOB",
        "valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{JOB_NAME_LABEL}']"}},
    }
    return [*pod_env(settings), job]


def cronjob(settings: KubeSettings, config_map_name: str | None = None) -> dict:
    """The scheduled driver: ``python -m treesits_dask update --config <run.yaml>`` every run.

    Fields that ``settings.kube_version`` lacks are left out: ``timeZone`` (1.25+; before, the
    controller manager's zone, UTC on Magnum) and ``podReplacementPolicy`` (1.29+).
    """
    cj = settings.cronjob
    config_map_name = config_map_name or cj.config_map
    config_dir, config_file = cj.config_path.rsplit("/", 1)
    container = {
        "name": "driver",
        "args": ["python", "-m", "treesits_dask", "update", "--config", cj.config_path],
        "env": _driver_env(settings),
        "resources": settings.driver.to_k8s(),
    }
    pod = pod_spec(
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
    if settings.version >= (1, 29):
        # a retry starts only once the failed driver has stopped (not while it still cleans up)
        job_spec["podReplacementPolicy"] = "Failed"
    if cj.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = cj.ttl_seconds_after_finished
    job_spec["template"] = {"metadata": {"labels": labels(settings, "driver")}, "spec": pod}
    spec: dict = {"schedule": cj.schedule}
    if cj.time_zone and settings.version >= (1, 25):
        spec["timeZone"] = cj.time_zone
    spec |= {
        "concurrencyPolicy": "Forbid",
        "startingDeadlineSeconds": cj.starting_deadline_seconds,
        "successfulJobsHistoryLimit": cj.successful_jobs_history_limit,
        "failedJobsHistoryLimit": cj.failed_jobs_history_limit,
        "suspend": cj.suspend,
        "jobTemplate": {"metadata": {"labels": labels(settings, "driver")}, "spec": job_spec},
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
