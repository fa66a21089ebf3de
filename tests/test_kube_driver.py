"""The driver on Kubernetes (issue 18): the same settings in its pod as on a laptop, a cluster of
its own that it alone deletes, worker groups waited for with a deadline, clean start-up on
signals, the lease of a retried Job, and manifests for every supported Kubernetes version.

Kubernetes itself is not available here: the calls to its API go through a fake
:class:`~treesits_dask.kube.KubeApi`; Dask clusters, schedulers and workers are real.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid

import pytest
import yaml

from treesits_dask import kube
from treesits_dask.cli import main
from treesits_dask.config import load_config
from treesits_dask.errors import ClusterError, ConfigError, OutputError
from treesits_dask.io import storage
from treesits_dask.kube import KubeSettings
from treesits_dask.kube.driver import cronjob
from treesits_dask.pipeline.cluster import describe, wait_for_workers, worker_environment
from treesits_dask.state.lease import JOB_ENV, Lease

from .k8s_schemas import supported_versions, validate_everything

ENDPOINT = "https://s3.waw3-1.cloudferro.com"


class FakeApi:
    """The Kubernetes API as :func:`kube.start_cluster` uses it, in memory."""

    def __init__(self, on_wait=None):
        self.objects: dict[tuple[str, str], dict] = {}
        self.deleted: list[tuple[str, str]] = []
        self.on_wait = on_wait

    def create(self, obj: dict) -> dict:
        key = (obj["kind"], obj["metadata"]["name"])
        if key in self.objects:
            raise RuntimeError(f"409 Conflict: {key} exists")
        stored = {**obj, "metadata": {**obj["metadata"], "uid": str(uuid.uuid4())}}
        self.objects[key] = stored
        return stored

    def delete(self, kind: str, name: str) -> None:
        if self.objects.pop((kind, name), None) is not None:
            self.deleted.append((kind, name))

    def wait_for_scheduler(self, cluster: str, timeout: float) -> None:
        if self.on_wait:
            self.on_wait()

    def scheduler_addresses(self, cluster: str) -> tuple[str, str]:
        return f"{cluster}-scheduler.treesits:8786", f"{cluster}-scheduler.treesits:8787"


def _env_values(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


# ---- 1. the driver pod computes the laptop's configuration -------------------------------------
def test_driver_pod_loads_the_same_settings_as_a_laptop(tmp_path, monkeypatch):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        yaml.safe_dump(
            {
                "cube": "/force/FORCE/C1/L2/ard",
                "output": "s3://outdir/treesits",
                "s3_endpoint_url": ENDPOINT,
                "cluster": "kubernetes",
                "kubernetes": {"env": {"AWS_REGION": "WAW3-1"}},
            }
        )
    )
    laptop = load_config(run_yaml, environ={})
    (driver,) = cronjob(laptop.kubernetes)["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"
    ]
    pod_environ = _env_values(driver)
    in_pod = load_config(run_yaml, environ=pod_environ)
    assert in_pod == laptop and in_pod.s3_addressing == "auto"
    # ... and sends its workers the same, path-style, S3 environment
    for key in (*storage.S3_ENV_KEYS, "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    laptop_env = worker_environment(laptop)
    for key, value in pod_environ.items():
        monkeypatch.setenv(key, value)
    pod_env = worker_environment(in_pod)
    s3 = ("AWS_ENDPOINT_URL", "AWS_S3_ENDPOINT", "AWS_HTTPS", "AWS_VIRTUAL_HOSTING")
    assert {k: pod_env[k] for k in s3} == {k: laptop_env[k] for k in s3}
    assert pod_env["AWS_VIRTUAL_HOSTING"] == "FALSE" and pod_env["AWS_REGION"] == "WAW3-1"
    storage.apply_environment(pod_env)
    assert storage.s3_options()["config_kwargs"]["s3"]["addressing_style"] == "path"
    # no pod of the deployment carries addressing it cannot know, nor a variable named after a
    # setting (TREESITS_<setting> overrides run.yaml)
    for obj in [o for objs in kube.manifests(laptop.kubernetes).values() for o in objs]:
        for c in [c for spec in _pod_specs(obj) for c in spec["containers"]]:
            names = {e["name"] for e in c["env"]}
            assert "AWS_VIRTUAL_HOSTING" not in names
            fields = type(laptop).model_fields
            settings_named = {n for n in names if n.startswith("TREESITS_")
                              and n[len("TREESITS_"):].lower() in fields}  # fmt: skip
            assert settings_named == set()
    # TREESITS_* in kubernetes.env is refused, and so is a second, different endpoint
    with pytest.raises(ConfigError, match="override the run's settings"):
        load_config(
            overrides={"cube": "/c", "output": "/o", "kubernetes": {"env": {"TREESITS_X": "1"}}},
            environ={},
        )
    with pytest.raises(ConfigError, match="differ"):
        load_config(
            overrides={
                "cube": "/c",
                "output": "/o",
                "cluster": "kubernetes",
                "s3_endpoint_url": ENDPOINT,
                "kubernetes": {"env": {"AWS_ENDPOINT_URL": "https://other.example.org"}},
            },
            environ={},
        )


def _pod_specs(obj):
    from .k8s_schemas import pod_specs

    return pod_specs(obj)


# ---- 2. each driver owns its cluster ----------------------------------------------------------
def test_each_driver_owns_a_cluster_and_deletes_only_it():
    api = FakeApi()
    standing = kube.cluster_spec(KubeSettings())  # e.g. applied by hand from cluster/dask/
    api.create(standing)
    settings = KubeSettings()
    first = kube.start_cluster(settings, api=api)
    second = kube.start_cluster(settings, api=api)
    assert first.name != second.name
    assert first.name.startswith("treesits-") and second.name.startswith("treesits-")
    assert first.name != "treesits" and len(first.name) == len("treesits-") + 6
    kinds = sorted(k for k, n in api.objects if n.startswith(first.name))
    assert kinds == ["DaskCluster", "DaskWorkerGroup", "Secret"]
    assert first.scheduler_address == f"tls://{first.name}-scheduler.treesits:8786"
    first.close()
    assert api.deleted == [("DaskWorkerGroup", f"{first.name}-gpu"), ("DaskCluster", first.name)]
    # the Secret goes with its owner, the DaskCluster (the driver may not delete Secrets)
    secret = api.objects[("Secret", f"{first.name}-tls")]
    assert secret["metadata"]["ownerReferences"][0]["name"] == first.name
    assert ("DaskCluster", second.name) in api.objects
    assert ("DaskCluster", "treesits") in api.objects  # the standing cluster is never touched
    second.close()
    assert ("DaskCluster", "treesits") in api.objects


def test_a_standing_cluster_is_used_not_closed(tmp_path):
    from distributed import Client, LocalCluster

    from treesits_dask.pipeline.cluster import connect

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as standing:  # fmt: skip
        config = load_config(
            overrides={"cube": "/c", "output": str(tmp_path), "cluster": "kubernetes",
                       "scheduler_address": standing.scheduler_address},
            environ={},
        )  # fmt: skip
        with connect(config) as client:
            assert client.scheduler.address == standing.scheduler_address
        with Client(standing.scheduler_address, timeout=5) as again:
            assert len(again.scheduler_info()["workers"]) == 1


# ---- 3. GPU workers that never arrive ----------------------------------------------------------
def _named_workers(names_resources: dict[str, dict]):
    from distributed import Nanny, Scheduler, SpecCluster

    return SpecCluster(
        workers={
            name: {"cls": Nanny, "options": {"nthreads": 1, "resources": res, "name": name,
                                             "memory_limit": "1GiB"}}
            for name, res in names_resources.items()
        },
        scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
    )  # fmt: skip


def test_driver_waits_for_the_gpu_group_and_names_what_is_missing():
    from distributed import Client

    settings = KubeSettings()
    needs = kube.worker_needs(settings, "treesits-abc123")
    assert [n.group for n in needs] == [
        "CPU worker group treesits-abc123-default",
        "GPU worker group treesits-abc123-gpu",
    ]
    cpu_only = {"treesits-abc123-default-worker-0a1b2c3d4e": {"CPU": 1}}
    with _named_workers(cpu_only) as cluster, Client(cluster) as client:
        start = time.monotonic()
        with pytest.raises(ClusterError) as err:
            wait_for_workers(client, needs, timeout=1.5, poll=0.2)
        assert time.monotonic() - start < 10
    message = str(err.value)
    assert "GPU worker group treesits-abc123-gpu has no worker" in message
    assert "CPU worker group" not in message
    for cause in ("nvidia.com/gpu", "device plugin", "maximum", "autoscaling", "tolerations"):
        assert cause in message
    both = {**cpu_only, "treesits-abc123-gpu-worker-5f6e7d8c9b": {"GPU": 1}}
    with _named_workers(both) as cluster, Client(cluster) as client:
        assert len(wait_for_workers(client, needs, timeout=30, poll=0.2)) == 2


def test_rendered_scheduler_fails_tasks_no_worker_can_run():
    """The scheduler's no-workers timeout (from its rendered environment): GPU tasks without GPU
    workers fail instead of keeping the cluster busy until the Job's deadline."""
    import dask.config
    from distributed import Client, LocalCluster

    settings = KubeSettings(no_workers_timeout=1)
    (sched,) = kube.cluster_spec(settings)["spec"]["scheduler"]["spec"]["containers"]
    env = {
        k: v
        for k, v in _env_values(sched).items()
        if k == "DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT"
    }  # noqa: E501
    assert env == {"DASK_DISTRIBUTED__SCHEDULER__NO_WORKERS_TIMEOUT": "1s"}
    collected = dask.config.collect_env(env)["distributed"]["scheduler"]
    with dask.config.set({f"distributed.scheduler.{k}": v for k, v in collected.items()}):
        with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
            with Client(cluster) as client:
                future = client.submit(sum, [1, 2], resources={"GPU": 1})
                start = time.monotonic()
                with pytest.raises(Exception, match="GPU"):
                    future.result(timeout=30)
                assert time.monotonic() - start < 15
    # a driver-owned cluster must idle out if its driver dies
    with pytest.raises(ConfigError, match="idle_timeout 0"):
        load_config(
            overrides={"cube": "/c", "output": "/o", "cluster": "kubernetes",
                       "kubernetes": {"idle_timeout": 0}},
            environ={},
        )  # fmt: skip


# ---- 7e. a half-started cluster is cleaned up --------------------------------------------------
def test_sigterm_during_start_deletes_what_was_created():
    def sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the scheduler "never" comes

    def terminate(signum, frame):  # what the CLI installs
        raise SystemExit(143)

    api = FakeApi(on_wait=sigterm)
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        start = time.monotonic()
        with pytest.raises(SystemExit):
            kube.start_cluster(KubeSettings(), api=api)
        assert time.monotonic() - start < 5
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert sorted(k for k, _ in api.deleted) == ["DaskCluster", "DaskWorkerGroup"]
    assert [k for k, _ in api.objects] == ["Secret"]  # garbage-collected with its owner


def test_failed_start_deletes_what_was_created():
    def crash():
        raise RuntimeError("Scheduler in CrashLoopBackOff for more than 600 seconds.")

    api = FakeApi(on_wait=crash)
    with pytest.raises(kube.ClusterStartError, match="CrashLoopBackOff") as err:
        kube.start_cluster(KubeSettings(gpu={"enabled": False}, cpu={"adaptive": {"maximum": 4}}),
                           api=api)  # fmt: skip
    assert sorted(k for k, _ in api.deleted) == ["DaskAutoscaler", "DaskCluster"]
    assert "kubectl -n treesits get daskclusters" in str(err.value)


# ---- 7a / 7c ------------------------------------------------------------------------------------
def test_plan_describes_adaptive_groups():
    config = load_config(
        overrides={"cube": "/c", "output": "/o", "cluster": "kubernetes",
                   "kubernetes": {"gpu": {"enabled": False},
                                  "cpu": {"adaptive": {"minimum": 1, "maximum": 7}}}},
        environ={},
    )  # fmt: skip
    assert describe(config)["concurrent_tasks"] == 7 * 6


def test_load_balancer_needs_tls_and_source_ranges():
    with pytest.raises(ValueError, match="exposes the scheduler"):
        KubeSettings(scheduler_service_type="LoadBalancer")
    with pytest.raises(ValueError, match="exposes the scheduler"):
        KubeSettings(scheduler_service_type="LoadBalancer", tls=False,
                     load_balancer_source_ranges=["203.0.113.0/24"])  # fmt: skip
    settings = KubeSettings(scheduler_service_type="LoadBalancer",
                            load_balancer_source_ranges=["203.0.113.7/24"])  # fmt: skip
    service = kube.cluster_spec(settings)["spec"]["scheduler"]["service"]
    assert service["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    (policy,) = [p for p in kube.network_policies(settings) if p["metadata"]["name"].endswith(
        "-scheduler")]  # fmt: skip
    assert {"ipBlock": {"cidr": "203.0.113.0/24"}} in policy["spec"]["ingress"][-1]["from"]
    validate_everything([kube.cluster_spec(settings), policy], "1.23")


# ---- 7d. the retry of a failed Job takes over its lease at once ---------------------------------
def test_retry_of_the_same_job_takes_over_the_lease(tmp_path, monkeypatch):
    output = str(tmp_path / "out")
    os.makedirs(output)
    pod = "treesits-update-29390-abcde"
    dead = {"owner": f"{pod}:1:deadbeef", "host": pod, "pid": 1, "job": "treesits-update-29390",
            "renewed": time.time(), "expires": time.time() + 900, "expires_utc": "x"}  # fmt: skip
    assert dead["host"] != socket.gethostname()
    storage.publish_bytes(json.dumps(dead).encode(), os.path.join(output, "_lease.json"))
    monkeypatch.setenv(JOB_ENV, "treesits-update-29391")  # another Job: still blocked
    with pytest.raises(OutputError, match="leased by another driver"):
        Lease(output, ttl=900).acquire()
    monkeypatch.setenv(JOB_ENV, "treesits-update-29390")  # the Job's next pod
    with Lease(output, ttl=900) as lease:
        assert json.loads((tmp_path / "out" / "_lease.json").read_text())["owner"] == lease.owner


# ---- 5. every supported Kubernetes version -----------------------------------------------------
def test_plan_render_validates_strictly_for_every_supported_version(
    small_cube, native_lstm, tmp_path, capsys
):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        yaml.safe_dump({"cube": small_cube.root, "output": str(tmp_path / "out"),
                        "model": native_lstm, "cluster": "kubernetes",
                        "kubernetes": {"env": {"AWS_ENDPOINT_URL": ENDPOINT}}})
    )  # fmt: skip
    versions = supported_versions()
    assert versions[0] == "1.23" and versions[-1] >= "1.37"
    for version in versions:
        out = tmp_path / f"k8s-{version}"
        rc = main(["plan", "--config", str(run_yaml), "--render", str(out),
                   "--kube-version", version])  # fmt: skip
        assert rc == 0, capsys.readouterr().err
        objects = [d for p in sorted(out.rglob("*.yaml")) for d in yaml.safe_load_all(
            p.read_text()) if d]  # fmt: skip
        kinds = validate_everything(objects, version)
        assert {"CronJob", "NetworkPolicy", "DaskCluster", "DaskWorkerGroup"} <= set(kinds)
        assert ("PodSecurityPolicy" in kinds) == (version < "1.25")
        (cj,) = [o for o in objects if o["kind"] == "CronJob"]
        assert ("timeZone" in cj["spec"]) == (version >= "1.25")
        job = cj["spec"]["jobTemplate"]["spec"]
        assert ("podReplacementPolicy" in job) == (version >= "1.29")
    capsys.readouterr()
    # what a version lacks is refused when it cannot be left out
    with pytest.raises(ValueError, match="needs Kubernetes >= 1.25"):
        KubeSettings(kube_version="1.24", cronjob={"time_zone": "Europe/Berlin"})
    with pytest.raises(ValueError, match="quote it"):
        KubeSettings(kube_version=1.30)
    with pytest.raises(ValueError, match="older than"):
        KubeSettings(kube_version="1.22")
