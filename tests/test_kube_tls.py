"""Only the driver and the cluster's own pods reach the scheduler and the workers (issue 18, 8):
TLS with a CA per Dask cluster, and NetworkPolicies.

The rendered scheduler and worker commands are started here for real, with the certificates of
the Secret the driver creates; as uid 65534 when the tests run as root and that user can run
this Python (where the interpreter sits in root's home it cannot, and they run as root).
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from treesits_dask import kube
from treesits_dask.kube import KubeSettings, make_certificates
from treesits_dask.kube.tls import tls_secret

from .k8s_schemas import supported_versions, validate_everything

NAMESPACE = "treesits"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(address: str, connection_args: dict) -> bool:
    """True when a connection to ``address`` with ``connection_args`` cannot ask the scheduler
    anything."""
    import asyncio

    from distributed.core import rpc

    async def ask():
        async with rpc(address, connection_args=connection_args, timeout=5) as r:
            await r.identity()

    try:
        asyncio.run(asyncio.wait_for(ask(), 10))
    except Exception:  # noqa: BLE001 - any refusal: handshake failure, closed stream, timeout
        return True
    return False


def _context_without_certificate(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca)
    ctx.check_hostname = False
    return ctx


def test_client_without_the_cluster_certificate_is_refused():
    from distributed import Client, LocalCluster

    certs = make_certificates("treesits-abc123", NAMESPACE)
    assert "BEGIN" not in repr(certs)  # keys never end up in logs
    security = certs.security("cluster")
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://",
                      security=security, dashboard_address=":0") as cluster:  # fmt: skip
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        with Client(address, security=certs.security("client"), timeout=10) as client:
            assert client.submit(sum, [1, 2]).result(timeout=30) == 3
        # no certificate: the scheduler demands one
        no_cert = {"ssl_context": _context_without_certificate(certs.ca)}
        assert _refused(address, no_cert)
        # a certificate of another cluster's CA
        other = make_certificates("treesits-other", NAMESPACE).security("client")
        assert _refused(address, other.get_connection_args("client"))
        # plain TCP to the TLS port
        assert _refused(address.replace("tls://", "tcp://"), {})
        # and the right certificate still works
        assert not _refused(address, certs.security("client").get_connection_args("client"))


def _non_root_user() -> dict:
    """``subprocess`` arguments that run the pods' commands as uid/gid 65534 when this process
    is root and that user can run this Python (not when it lives in root's home); else {}."""
    if os.geteuid() != 0:
        return {}
    kw = {"user": 65534, "group": 65534}
    try:
        subprocess.run([sys.executable, "-c", "import distributed"], check=True, timeout=60,
                       capture_output=True, **kw)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    return kw


def _materialize(secret: dict, folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, b64 in secret["data"].items():
        (folder / name).write_bytes(base64.b64decode(b64))
        (folder / name).chmod(0o444)


def _command(container: dict, replace: dict[str, str], extra: list[str]) -> list[str]:
    args = [replace.get(a, a) for a in container["args"]]
    return [str(Path(sys.executable).parent / args[0]), *args[1:], *extra]


def _environment(container: dict, tls_dir: str, scheduler: str, scratch: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DASK_", "AWS_"))}
    for e in container["env"]:
        if "value" in e:
            value = e["value"]
            if value.startswith("/etc/dask-tls/"):
                value = tls_dir + value[len("/etc/dask-tls") :]
            elif value == "/tmp" or value.startswith("/tmp/"):
                value = scratch + value[len("/tmp") :]
            env[e["name"]] = value
    if "DASK_SCHEDULER_ADDRESS" in env:
        env["DASK_SCHEDULER_ADDRESS"] = scheduler
    return env


def test_rendered_pods_run_tls_only_as_non_root(tmp_path):
    from distributed import Client

    settings = KubeSettings(cpu={"threads": 2}, gpu={"threads": 1})
    name = "treesits-tlstest"
    certs = make_certificates(name, NAMESPACE)
    secret = tls_secret(certs, NAMESPACE, {}, owner_uid="0000")
    root = Path(tempfile.mkdtemp(prefix="treesits-tls-"))  # readable by the non-root user
    try:
        root.chmod(0o755)
        tls_dir, scratch = root / "tls", root / "scratch"
        _materialize(secret, tls_dir)
        scratch.mkdir()
        scratch.chmod(0o777)
        port = _free_port()
        address = f"tls://127.0.0.1:{port}"
        cs = kube.cluster_spec(settings, name)
        (sched,) = cs["spec"]["scheduler"]["spec"]["containers"]
        (cpu,) = cs["spec"]["worker"]["spec"]["containers"]
        gpu_group = kube.gpu_worker_group_spec(settings, name)
        (gpu,) = gpu_group["spec"]["worker"]["spec"]["containers"]
        volumes = cs["spec"]["scheduler"]["spec"]["volumes"]
        assert {"secretName": f"{name}-tls", "defaultMode": 0o440} in [
            v["secret"] for v in volumes if "secret" in v
        ]
        user = _non_root_user()
        procs = []

        def start(container, replace, extra, log):
            env = _environment(container, str(tls_dir), address, str(scratch))
            cmd = _command(container, replace, extra)
            fh = open(root / log, "wb")
            procs.append(subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                          cwd=scratch, **user))  # fmt: skip

        start(sched, {"0.0.0.0": "127.0.0.1"}, ["--port", str(port), "--dashboard-address", ":0"],
              "scheduler.log")  # fmt: skip
        for container, worker_name in ((cpu, f"{name}-default-worker-0a1b2c3d4e"),
                                       (gpu, f"{name}-gpu-worker-5f6e7d8c9b")):  # fmt: skip
            ports = {"8788": str(_free_port()), "8789": str(_free_port()),
                     "8790": str(_free_port()), "$(DASK_WORKER_NAME)": worker_name}  # fmt: skip
            start(container, ports, [], f"{worker_name}.log")
        try:
            deadline = time.monotonic() + 60
            client = None
            while client is None:
                try:
                    client = Client(address, security=certs.security("client"), timeout=5)
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            with client:
                client.wait_for_workers(2, timeout=60)
                workers = client.scheduler_info()["workers"]
                assert all(a.startswith("tls://") for a in workers)
                by_name = {w["name"]: w["resources"] for w in workers.values()}
                assert by_name == {f"{name}-default-worker-0a1b2c3d4e": {"CPU": 2.0},
                                   f"{name}-gpu-worker-5f6e7d8c9b": {"GPU": 1.0}}  # fmt: skip
                if user:
                    assert set(client.run(os.geteuid).values()) == {65534}
                assert kube.worker_needs(settings, name)[1].met_by(workers)
                no_cert = {"ssl_context": _context_without_certificate(certs.ca)}
                assert _refused(address, no_cert)
                assert _refused(address.replace("tls://", "tcp://"), {})
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
    except BaseException:
        for log in sorted(root.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_network_policies_admit_only_the_clusters_own_pods():
    settings = KubeSettings(network_policy={"allowed_cidrs": ["192.0.2.10/32"]})
    policies = {p["metadata"]["name"]: p["spec"] for p in kube.network_policies(settings)}
    assert set(policies) == {"treesits-scheduler", "treesits-workers", "treesits-driver"}
    ours = {"app.kubernetes.io/name": "treesits-dask", "app.kubernetes.io/instance": "treesits"}
    sched = policies["treesits-scheduler"]
    assert sched["podSelector"]["matchLabels"] == {**ours, "app.kubernetes.io/component":
                                                   "scheduler"}  # fmt: skip
    assert sched["policyTypes"] == ["Ingress"]
    sources = [(rule["from"], sorted(p["port"] for p in rule["ports"]))
               for rule in sched["ingress"]]  # fmt: skip
    assert sources == [
        ([{"podSelector": {"matchLabels": ours}}], [8786, 8787]),
        ([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name":
                                                 "dask-operator"}}}], [8787]),
        ([{"ipBlock": {"cidr": "192.0.2.10/32"}}], [8786, 8787]),
    ]  # fmt: skip
    workers = policies["treesits-workers"]
    assert workers["podSelector"]["matchExpressions"][0]["values"] == ["cpu-worker", "gpu-worker"]
    (rule,) = workers["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": ours}}]
    assert sorted(p["port"] for p in rule["ports"]) == [8788, 8789, 8790]
    assert policies["treesits-driver"]["ingress"] == []
    # the pods they select carry those labels, and listen on exactly those ports
    cs = kube.cluster_spec(settings, "treesits-abc123")
    for body, component in ((cs["spec"]["scheduler"], "scheduler"),
                            (cs["spec"]["worker"], "cpu-worker")):  # fmt: skip
        assert body["metadata"]["labels"] == {**ours, "app.kubernetes.io/component": component}
    ports = {p["containerPort"] for p in cs["spec"]["worker"]["spec"]["containers"][0]["ports"]}
    assert ports == {8788, 8789, 8790}
    for version in supported_versions():
        validate_everything(kube.network_policies(settings), version)
    assert kube.network_policies(KubeSettings(network_policy={"enabled": False})) == []
    with pytest.raises(ValueError, match="CIDR"):
        KubeSettings(network_policy={"allowed_cidrs": ["laptop"]})


def test_tls_secret_and_pods_fit_the_schemas():
    settings = KubeSettings()
    certs = make_certificates("treesits-abc123", NAMESPACE)
    secret = tls_secret(certs, NAMESPACE, {"app.kubernetes.io/name": "treesits-dask"}, "uid-1")
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {
        "ca.crt", "tls.crt", "tls.key"}  # fmt: skip
    for version in ("1.23", supported_versions()[-1]):
        validate_everything([secret, kube.cluster_spec(settings, "treesits-abc123")], version)
    # without tls: plain TCP, no Secret mounted
    plain = kube.cluster_spec(KubeSettings(tls=False), "treesits-abc123")
    assert "tls" not in plain["spec"]["scheduler"]["spec"]["containers"][0]["args"]
    assert all("secret" not in v for v in plain["spec"]["scheduler"]["spec"]["volumes"])
