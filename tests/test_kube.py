"""Kubernetes manifests: strict schema validation (CRDs from the dask-kubernetes wheel and the
Kubernetes API schemas), restricted Pod Security, least-privilege RBAC, no secrets, no drift."""

from __future__ import annotations

import copy
import importlib.util
import re
import sys
import threading
import time
from pathlib import Path

import dask.config
import jsonschema
import pytest
import yaml
from dask.utils import parse_bytes

from treesits_dask import kube
from treesits_dask.config import RunConfig
from treesits_dask.config.kube_resources import parse_quantity
from treesits_dask.errors import ConfigError
from treesits_dask.io import storage
from treesits_dask.kube import KubeSettings
from treesits_dask.kube.specs import DASK_API

from .k8s_schemas import (
    pod_specs,
    supported_versions,
    validate_builtin,
    validate_crd,
    validate_everything,
)

REPO = Path(__file__).resolve().parents[1]
CLUSTER_DIR = REPO / "cluster"
FAKE_KEY_ID = "AKIAFAKEKEYID0000042"
FAKE_SECRET = "fake-secret-Zq9xW2vB7nP4tR8s"
GPU_ONLY = {
    "read_on": "gpu",
    "cpu": {"workers": 0},
    "gpu": {"adaptive": {"minimum": 1, "maximum": 4}},
}
CPU_ONLY = {"gpu": {"enabled": False}, "cpu": {"adaptive": {"minimum": 1, "maximum": 7}}}
VARIANTS = {"default": {}, "gpu-only": GPU_ONLY, "cpu-only": CPU_ONLY}


def validate_builtin_all(obj: dict) -> None:
    """Strictly valid for every supported Kubernetes version."""
    for version in supported_versions():
        validate_builtin(obj, version)


# ---- helpers --------------------------------------------------------------------------------
def rendered_objects(settings: KubeSettings, run_yaml: str | None = None) -> list[dict]:
    return [o for objs in kube.manifests(settings, run_yaml).values() for o in objs]


def containers(obj) -> list[dict]:
    return [
        c for spec in pod_specs(obj) for c in spec["containers"] + spec.get("initContainers", [])
    ]


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}  # fmt: skip


def assert_restricted(spec: dict) -> None:
    """The restricted Pod Security Standard, plus requests and limits on every container."""
    psc = spec["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] > 0 and psc["runAsGroup"] > 0 and psc["fsGroup"] > 0
    assert psc["seccompProfile"]["type"] in ("RuntimeDefault", "Localhost")
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key)
    for vol in spec.get("volumes", []):
        kinds = set(vol) - {"name"}
        assert kinds <= RESTRICTED_VOLUMES, vol
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
        assert not sc.get("privileged")
        assert sc.get("runAsUser", psc["runAsUser"]) != 0
        assert sc.get("seccompProfile", psc["seccompProfile"])["type"] == "RuntimeDefault"
        assert not any("hostPort" in p for p in c.get("ports", []))
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][part]), (c["name"], part)


def worker(obj) -> dict:
    (c,) = [c for c in containers(obj) if c["name"] == "worker"]
    return c


def worker_args_resources(container: dict) -> dict[str, float]:
    """Parse ``--resources`` as ``dask worker`` does."""
    args = container["args"]
    if "--resources" not in args:
        return {}
    value = args[args.index("--resources") + 1]
    return {k: float(v) for k, v in (pair.split("=") for pair in value.replace(",", " ").split())}


# ---- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dask_objects_match_crd_strictly(variant):
    settings = KubeSettings(**VARIANTS[variant])
    objects = [o for o in rendered_objects(settings) if o["apiVersion"] == DASK_API]
    expected = {"default": {"DaskCluster", "DaskWorkerGroup"},
                "gpu-only": {"DaskCluster", "DaskAutoscaler"},
                "cpu-only": {"DaskCluster", "DaskAutoscaler"}}  # fmt: skip
    assert {o["kind"] for o in objects} == expected[variant]
    # the same pod specs are also valid Pods of every supported Kubernetes version
    for version in supported_versions():
        validate_everything(objects, version)


def test_strict_validator_rejects_what_the_api_server_would_drop():
    spec = kube.gpu_worker_group_spec(KubeSettings())
    validate_crd(spec)
    unknown = copy.deepcopy(spec)
    unknown["spec"]["worker"]["spec"]["containers"][0]["securityContext"]["appArmorProfile"] = {
        "type": "RuntimeDefault"
    }  # a Kubernetes 1.30 field, absent from the CRD's 1.21 pod schema
    integer_gpu = copy.deepcopy(spec)
    integer_gpu["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"][
        "nvidia.com/gpu"
    ] = 1
    misplaced = copy.deepcopy(spec)
    misplaced["spec"]["worker"]["tolerations"] = misplaced["spec"]["worker"]["spec"]["tolerations"]
    for bad in (unknown, integer_gpu, misplaced):
        with pytest.raises(AssertionError):
            validate_crd(bad)


def test_builtin_objects_valid_strict():
    for version in supported_versions():
        settings = KubeSettings(kube_version=version)
        objects = rendered_objects(settings, run_yaml="cube: /force\noutput: s3://outdir/x\n")
        kinds = [o["kind"] for o in objects if not o["apiVersion"].startswith(DASK_API)]
        psp = ["PodSecurityPolicy", "ClusterRole", "RoleBinding"] if version < "1.25" else []
        assert kinds == ["Namespace", *psp, "ServiceAccount", "Role", "RoleBinding", "ConfigMap",
                         "CronJob", "NetworkPolicy", "NetworkPolicy", "NetworkPolicy"]  # fmt: skip
        for obj in objects:
            if obj["kind"] in kinds:
                validate_builtin(obj, version)
    broken = kube.cronjob(KubeSettings())
    broken["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["envFrom"] = {"x": 1}
    for version in ("1.23", "1.37"):
        with pytest.raises(jsonschema.ValidationError):
            validate_builtin(broken, version)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_pod_is_restricted_and_bounded(variant):
    objects = rendered_objects(KubeSettings(**VARIANTS[variant]))
    specs = [s for o in objects for s in pod_specs(o)]
    # scheduler, default worker group, (GPU group), CronJob driver
    assert len(specs) == (4 if variant == "default" else 3)
    for spec in specs:
        assert_restricted(spec)
    ns = next(o for o in objects if o["kind"] == "Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(
        o["metadata"]["namespace"] == "treesits" for o in objects if o["kind"] != "Namespace"
    )


def test_no_legacy_dask_commands():
    settings = KubeSettings()
    text = "".join(kube.dump(objs) for objs in kube.manifests(settings, "cube: /c\n").values())
    assert not re.search(r"dask-(scheduler|worker)\b", text)
    commands = {tuple(c["args"][:2]) for o in rendered_objects(settings) for c in containers(o)}
    assert commands == {("dask", "scheduler"), ("dask", "worker"), ("python", "-m")}
    assert all("command" not in c for o in rendered_objects(settings) for c in containers(o))


def test_no_secret_values_anywhere(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://leaky.example.test")
    settings = KubeSettings(
        env={"AWS_ENDPOINT_URL": "http://s3.example.test:8080", "AWS_REGION": "RegionOne"}
    )
    paths = kube.render(settings, tmp_path, "cube: /force\noutput: s3://outdir/x\n")
    text = "".join(p.read_text() for p in paths)
    assert FAKE_SECRET not in text and FAKE_KEY_ID not in text
    assert "leaky" not in text  # rendering never reads this process's environment
    # credentials only as references to the Secret, on workers and the driver (not the scheduler)
    for obj in rendered_objects(settings):
        for c in containers(obj):
            refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"]
                    if "secretKeyRef" in e.get("valueFrom", {})}  # fmt: skip
            assert all("value" not in e for e in c["env"] if e["name"].startswith("AWS_SECRET"))
            if c["name"] == "scheduler":
                assert refs == {}
            else:
                assert refs == {k: {"name": "treesits-s3", "key": k}
                                for k in ("AWS_ACCESS_KEY_ID",
                                          "AWS_SECRET_ACCESS_KEY")}  # fmt: skip
            values = {e["name"]: e["value"] for e in c["env"] if "value" in e}
            if c["name"] != "scheduler":  # GDAL needs these, derived from AWS_ENDPOINT_URL
                assert values["AWS_S3_ENDPOINT"] == "s3.example.test:8080"
                assert values["AWS_HTTPS"] == "NO" and values["AWS_VIRTUAL_HOSTING"] == "FALSE"
                assert values["AWS_REGION"] == "RegionOne"
                assert all(values[k] == v for k, v in storage.MALLOC_DEFAULTS.items())
    # a credential in settings is refused, and the error does not echo it
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump({"kubernetes": {"env": {"AWS_SECRET_ACCESS_KEY": FAKE_SECRET}}}))
    with pytest.raises(ConfigError, match="looks like a credential") as e:
        kube.load_settings(y)
    assert FAKE_SECRET not in str(e.value)


def test_role_is_least_privilege():
    objects = kube.rbac(KubeSettings())
    assert [o["kind"] for o in objects] == ["ServiceAccount", "Role", "RoleBinding"]
    role = objects[1]
    grants = {(g, r): set(rule["verbs"]) for rule in role["rules"]
              for g in rule["apiGroups"] for r in rule["resources"]}  # fmt: skip
    flat = yaml.safe_dump(role["rules"])
    assert "*" not in flat and "nodes" not in flat
    # Secrets: create only (each cluster's TLS Secret); never read, change or delete one
    assert [r["verbs"] for r in role["rules"] if "secrets" in r["resources"]] == [["create"]]
    assert grants == {
        ("kubernetes.dask.org", "daskclusters"): {
            "get",
            "list",
            "watch",
            "create",
            "patch",
            "delete",
        },
        ("kubernetes.dask.org", "daskworkergroups"): {
            "get",
            "list",
            "watch",
            "create",
            "patch",
            "delete",
        },
        ("kubernetes.dask.org", "daskautoscalers"): {
            "get",
            "list",
            "watch",
            "create",
            "patch",
            "delete",
        },
        ("", "pods"): {"get", "list", "watch"},
        ("", "services"): {"get", "list", "watch"},
        ("", "pods/log"): {"get"},
        ("", "pods/portforward"): {"get", "create"},
        ("", "secrets"): {"create"},
    }
    binding = objects[2]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "treesits-driver",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "treesits-driver", "namespace": "treesits"}
    ]
    # only the driver pod gets an API token
    cj = kube.cronjob(KubeSettings())
    (driver,) = pod_specs(cj)
    assert (
        driver["serviceAccountName"] == "treesits-driver"
        and driver["automountServiceAccountToken"] is True
    )
    for spec in pod_specs(kube.cluster_spec(KubeSettings())):
        assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec


def test_gpu_worker_group():
    settings = KubeSettings()
    wg = kube.gpu_worker_group_spec(settings)
    assert wg["metadata"]["name"] == "treesits-gpu" and wg["spec"]["cluster"] == "treesits"
    assert wg["spec"]["worker"]["replicas"] == 2
    (spec,) = pod_specs(wg)
    assert {"key": "node.cloudferro.com/type", "operator": "Equal", "value": "gpu",
            "effect": "NoSchedule"} in spec["tolerations"]  # fmt: skip
    (c,) = spec["containers"]
    for part in ("limits", "requests"):
        assert c["resources"][part]["nvidia.com/gpu"] == "1"
        assert isinstance(c["resources"][part]["nvidia.com/gpu"], str)
    assert c["args"][c["args"].index("--resources") + 1] == "GPU=1"
    assert worker_args_resources(c) == {"GPU": 1.0}
    # the group that runs inference imports torch as its workers start; the reading group not,
    # unless it is the only group (then it runs inference)
    assert c["args"][c["args"].index("--preload") + 1] == "treesits_dask.pipeline.warmup"
    assert importlib.util.find_spec("treesits_dask.pipeline.warmup") is not None
    (cpu,) = pod_specs(kube.cluster_spec(settings))[0]["containers"]
    assert cpu["name"] == "worker" and "--preload" not in cpu["args"]
    (alone,) = pod_specs(kube.cluster_spec(KubeSettings(**CPU_ONLY)))[0]["containers"]
    assert alone["args"][alone["args"].index("--preload") + 1] == "treesits_dask.pipeline.warmup"
    # resources and env are the GPU group's own, not copied from the default (CPU) group
    assert c["resources"]["limits"]["memory"] == settings.gpu.memory_limit
    assert "tolerations" not in pod_specs(kube.cluster_spec(settings))[0]
    # zero GPU workers stays zero (make_worker_spec would turn 0 into the cluster default)
    assert (
        kube.gpu_worker_group_spec(KubeSettings(gpu={"workers": 0}))["spec"]["worker"]["replicas"]
        == 0
    )
    sel = KubeSettings(gpu={"node_selector": {"nvidia.com/gpu.present": "true"}, "gpus": 2})
    (spec,) = pod_specs(kube.gpu_worker_group_spec(sel))
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


def test_read_on_decides_who_advertises_the_read_resource():
    cpu_read = KubeSettings()
    cpu_worker = worker(kube.cluster_spec(cpu_read))
    gpu_worker = worker(kube.gpu_worker_group_spec(cpu_read))
    assert worker_args_resources(cpu_worker) == {kube.READ_RESOURCE: 6.0}
    assert worker_args_resources(gpu_worker) == {kube.GPU_RESOURCE: 1.0}
    gpu_read = KubeSettings(read_on="gpu")
    assert worker_args_resources(worker(kube.cluster_spec(gpu_read))) == {}
    assert worker_args_resources(worker(kube.gpu_worker_group_spec(gpu_read))) == {
        kube.GPU_RESOURCE: 1.0, kube.READ_RESOURCE: 4.0,
    }  # fmt: skip
    # GPU-only cluster: the GPU group is the DaskCluster default group, so adapt() scales it
    gpu_only = KubeSettings(**GPU_ONLY)
    cs = kube.cluster_spec(gpu_only)
    assert cs["spec"]["worker"]["replicas"] == 1
    assert (
        cs["spec"]["worker"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        == "1"
    )
    assert "dask/gpu-workergroup.yaml" not in kube.manifests(gpu_only)


def test_scheduler_and_workers_keep_the_operator_contract():
    from dask_kubernetes.operator import make_cluster_spec

    ours = kube.cluster_spec(KubeSettings())
    theirs = make_cluster_spec(name="treesits", n_workers=3)

    def ports(spec: dict) -> list[tuple]:
        return [(p["name"], p.get("containerPort")) for p in spec["containers"][0]["ports"]]

    assert ports(ours["spec"]["scheduler"]["spec"]) == ports(theirs["spec"]["scheduler"]["spec"])
    ours_service = {**ours["spec"]["scheduler"]["service"]}
    assert ours_service["selector"]["dask.org/cluster-name"] == "treesits"
    assert ours_service == theirs["spec"]["scheduler"]["service"]
    # the worker's dashboard where the operator expects it, plus fixed worker and nanny ports
    # (NetworkPolicies name them)
    assert set(ports(theirs["spec"]["worker"]["spec"])) <= set(
        ports(ours["spec"]["worker"]["spec"])
    )
    assert ours["spec"]["scheduler"]["spec"]["containers"][0]["args"][2:] == [
        *theirs["spec"]["scheduler"]["spec"]["containers"][0]["args"][1:],
        "--protocol",
        "tls",
    ]
    their_worker = theirs["spec"]["worker"]["spec"]["containers"][0]["args"][1:]
    our_worker = ours["spec"]["worker"]["spec"]["containers"][0]["args"]
    assert our_worker[:2] == ["dask", "worker"] and set(their_worker) <= set(our_worker)
    assert ours["spec"]["idleTimeout"] == 900
    # the scheduler enables the HTTP API the operator retires workers through
    (sched,) = ours["spec"]["scheduler"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in sched["env"]}
    routes = dask.config.collect_env({k: v for k, v in env.items() if k.startswith("DASK_")})
    assert "distributed.http.scheduler.api" in routes["distributed"]["scheduler"]["http"]["routes"]
    # the worker's memory limit is the container limit, in a form dask parses
    (worker,) = ours["spec"]["worker"]["spec"]["containers"]
    limit = worker["args"][worker["args"].index("--memory-limit") + 1]
    assert parse_bytes(limit) == parse_bytes("48GiB")


def test_cronjob_driver():
    cj = kube.cronjob(KubeSettings(), "my-run")
    spec = cj["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["schedule"] == "17 */6 * * *"
    assert spec["startingDeadlineSeconds"] > 0 and spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 1 and job["activeDeadlineSeconds"] == 86400
    (pod,) = pod_specs(cj)
    (c,) = pod["containers"]
    assert c["args"] == [
        "python",
        "-m",
        "treesits_dask",
        "update",
        "--config",
        "/etc/treesits/run.yaml",
    ]
    assert pod["restartPolicy"] == "Never"
    vol = next(v for v in pod["volumes"] if "configMap" in v)
    assert vol["configMap"] == {
        "name": "my-run",
        "items": [{"key": "run.yaml", "path": "run.yaml"}],
    }
    mount = next(m for m in c["volumeMounts"] if m["name"] == vol["name"])
    assert mount == {"name": vol["name"], "mountPath": "/etc/treesits", "readOnly": True}
    cube = next(m for m in c["volumeMounts"] if m["name"] == "cube")
    assert cube["readOnly"] is True and cube["mountPath"] == "/force/FORCE/C1/L2/ard"
    no_cube = kube.cronjob(KubeSettings(cube_claim=None))
    assert all(v["name"] != "cube" for v in pod_specs(no_cube)[0]["volumes"])


def test_render_is_deterministic_and_removes_stale_files(tmp_path):
    first = kube.render(KubeSettings(), tmp_path / "a")
    second = kube.render(KubeSettings(), tmp_path / "b")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert not any(re.search(r"[&*]id\d+", p.read_text()) for p in first)  # no YAML anchors
    run_yaml = "cube: /force/FORCE/C1/L2/ard\noutput: s3://outdir/treesits\n"
    paths = kube.render(KubeSettings(gpu={"enabled": False}), tmp_path / "a", run_yaml)
    names = sorted(p.relative_to(tmp_path / "a").as_posix() for p in paths)
    assert names == ["dask/daskcluster.yaml", "manifests/00-namespace.yaml",
                     "manifests/10-rbac.yaml", "manifests/20-configmap.yaml",
                     "manifests/30-cronjob.yaml", "manifests/40-networkpolicy.yaml"]  # fmt: skip
    assert not (tmp_path / "a/dask/gpu-workergroup.yaml").exists()
    cm = yaml.safe_load((tmp_path / "a/manifests/20-configmap.yaml").read_text())
    assert cm["data"]["run.yaml"] == run_yaml
    for p in paths:  # every file parses back to the objects that were rendered
        assert all(isinstance(d, dict) for d in yaml.safe_load_all(p.read_text()))


def test_committed_manifests_match_render():
    problems = kube.check_rendered(KubeSettings(), CLUSTER_DIR)
    assert problems == [], f"{problems}; regenerate: python -m treesits_dask.kube render cluster/"
    assert kube.main(["render", str(CLUSTER_DIR), "--check"]) == 0


def test_example_run_yaml(tmp_path):
    example = CLUSTER_DIR / "examples" / "run.yaml"
    settings, text = kube.load_settings(example)
    assert settings.name == "treesits" and text == example.read_text()
    data = yaml.safe_load(text)
    assert data["cluster"] == "kubernetes"
    assert set(data) <= set(RunConfig.model_fields) | {"cluster", "kubernetes"}
    RunConfig(**{k: v for k, v in data.items() if k in RunConfig.model_fields})
    kube.main(["render", str(tmp_path), "--config", str(example)])
    cm = yaml.safe_load((tmp_path / "manifests/20-configmap.yaml").read_text())
    assert cm["metadata"]["name"] == settings.cronjob.config_map and cm["data"]["run.yaml"] == text


@pytest.mark.parametrize(
    "values, match",
    [
        ({"cpu": {"memory_limit": "500m"}}, "milli-bytes"),
        ({"cpu": {"memory_request": "64"}}, "forget the unit"),
        ({"cpu": {"cpu_request": "8"}}, "cpu_request '8' is larger than cpu_limit"),
        ({"driver": {"cpu_limit": "two"}}, "not a Kubernetes quantity"),
        ({"cpu": {"workers": -1}}, "greater than or equal to 0"),
        (
            {"cpu": {"adaptive": {"minimum": 5, "maximum": 2}}, "gpu": {"enabled": False}},
            "larger than maximum",
        ),
        ({"cpu": {"workers": 3, "adaptive": {"maximum": 4}}}, "not both"),
        ({"cpu": {"adaptive": {"minimum": 1, "maximum": 4}}}, "914"),
        ({"gpu": {"adaptive": {"minimum": 1, "maximum": 4}}}, "GPU-only"),
        ({"cpu": {"workers": 0}}, "read_on 'cpu' needs CPU workers"),
        ({"read_on": "gpu", "gpu": {"enabled": False}}, "needs GPU workers"),
        ({"gpu": {"gpus": 0}}, "whole number"),
        ({"gpu": {"tolerations": [{"operator": "Exists", "value": "x"}]}}, "must not have a value"),
        ({"name": "Treesits_1"}, "lower-case"),
        ({"scheduler_service_type": "NodePort"}, "ClusterIP"),
        ({"env": {"DB_PASSWORD": "x"}}, "credential"),
        ({"cronjob": {"schedule": "every day"}}, "cron"),
        (
            {"cpu": {"treads": 4}},
            r"kubernetes\.cpu\.treads: unknown setting; valid here: .*threads",
        ),
        ({"cronjob": {"shedule": "x"}}, r"valid here: .*schedule"),
        ({"gpu": {"tolerations": [{"keys": "a"}]}}, r"valid here: effect, key, operator, value"),
        ({"namespce": "x"}, r"valid here: .*namespace"),
    ],
)
def test_settings_are_validated(tmp_path, values, match):
    y = tmp_path / "run.yaml"
    y.write_text(yaml.safe_dump({"kubernetes": values}))
    with pytest.raises(ConfigError, match=match):
        kube.load_settings(y)


def test_yaml_numbers_become_kubernetes_strings():
    s = KubeSettings(cpu={"cpu_request": 4, "cpu_limit": 4.5,
                          "memory_request": "8Gi", "memory_limit": "8Gi"},
                     gpu={"gpus": 1}, env={"AWS_VIRTUAL_HOSTING": False})  # fmt: skip
    assert (s.cpu.cpu_request, s.cpu.cpu_limit, s.gpu.gpus) == ("4", "4.5", "1")
    assert s.env == {"AWS_VIRTUAL_HOSTING": "FALSE"}
    assert KubeSettings(**s.model_dump()) == s
    assert parse_quantity("1.5Gi") == 1.5 * 2**30 and parse_quantity("250m") * 4 == 1


def test_start_cluster_names_the_extra_when_dask_kubernetes_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "kr8s", None)
    with pytest.raises(ConfigError, match=r"treesits_dask\[k8s\]"):
        kube.start_cluster(KubeSettings())


def test_run_with_deadline():
    assert kube.run_with_deadline(lambda: 42, 5, "quick") == 42
    with pytest.raises(ZeroDivisionError):
        kube.run_with_deadline(lambda: 1 / 0, 5, "failing")
    release = threading.Event()
    start = time.monotonic()
    with pytest.raises(kube.ClusterStartError, match="stuck did not finish within 0.2 s"):
        kube.run_with_deadline(lambda: release.wait(30), 0.2, "stuck")
    assert time.monotonic() - start < 5
    release.set()


def test_readme_documents_every_setting():
    readme = (CLUSTER_DIR / "README.md").read_text()
    from treesits_dask.config.kubernetes import NetworkPolicySettings

    models = (KubeSettings, kube.CpuGroup, kube.GpuGroup, kube.CronJobSettings, kube.PodResources,
              NetworkPolicySettings)  # fmt: skip
    missing = [f"{m.__name__}.{name}" for m in models for name in m.model_fields
               if f"`{name}`" not in readme]  # fmt: skip
    assert missing == []
    for needle in ("helm repo add dask https://helm.dask.org", "dask/dask-kubernetes-operator",
                   "--namespace dask-operator", "create secret generic treesits-s3",
                   "pods/portforward", "node.cloudferro.com/type", "render cluster/",
                   "Kubernetes 1.23 or newer", "PodSecurityPolicy", "auto_scaling_enabled",
                   "kubectl apply --server-side", "NFS read access", "Scratch space",
                   "--target cuda", "--require-hashes"):  # fmt: skip
        assert needle in readme


def test_dockerfile_and_examples():
    # the Dockerfile itself: tests/test_image.py
    assert f"ARG APP_UID={KubeSettings().run_as_user}" in (CLUSTER_DIR / "Dockerfile").read_text()
    volume = list(yaml.safe_load_all((CLUSTER_DIR / "examples/force-ard-volume.yaml").read_text()))
    for obj in volume:
        validate_builtin_all(obj)
    claim = next(o for o in volume if o["kind"] == "PersistentVolumeClaim")
    settings = KubeSettings()
    assert claim["metadata"] == {"name": settings.cube_claim, "namespace": settings.namespace}


def test_start_cluster_without_kubernetes_access_fails_fast(monkeypatch, tmp_path):
    pytest.importorskip("dask_kubernetes")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-such-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    start = time.monotonic()
    with pytest.raises(kube.ClusterStartError, match="kubectl -n treesits get daskclusters"):
        kube.start_cluster(KubeSettings(start_timeout=60))
    assert time.monotonic() - start < 30
