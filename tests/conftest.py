"""Shared fixtures: paths to ../shared/data, small synthetic FORCE cubes, a native model."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# keep Dask/GDAL quiet and deterministic in tests
os.environ.setdefault("GDAL_DISABLE_READDIR_ON_OPEN", "EMPTY_DIR")


#: the longest modules, longest first (330, 250, 170, 105, 100, 95, 90, 70, 60 and 45 s of test
#: time in a 14-minute run on two workers, 2 cores, whose tests took 27.4 minutes in all), run
#: first: ``make test`` hands whole modules to two pytest-xdist workers in collection order, and a
#: long module handed out last would run alone at the end (test_streaming and test_pipeline had
#: grown long and were missing here)
LONGEST_FIRST = (
    "test_streaming.py", "test_lifecycle.py", "test_pipeline.py", "test_bench_scripts.py",
    "test_faults.py", "test_heterogeneous.py", "test_alerts.py", "test_bench.py", "test_s3.py",
    "test_s3_faults.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items) -> None:
    """Collect the :data:`LONGEST_FIRST` modules first, the others in their order after them."""

    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a module's tests keep their order


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(
            f"test data folder {SHARED_DATA} is missing (expected ../shared/data beside the repo)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def small_cube(tmp_path_factory):
    """Two 60x60 px tiles, 10 scenes, strips layout, old .prj, masks and truth."""
    from treesits_dask.synthetic import make_cube

    root = tmp_path_factory.mktemp("cube")
    return make_cube(
        root / "cube",
        tiles=("X0069_Y0043", "X0070_Y0043"),
        size=60,
        n_scenes=10,
        mask_dir=str(root / "masks"),
        truth_dir=str(root / "truth"),
        seed=3,
    )


@pytest.fixture(scope="session")
def native_lstm(tmp_path_factory):
    """A small native sits-lstm with random weights (5 species classes)."""
    import torch

    from treesits_dask.models import ModelCard, save_native
    from treesits_dask.models.architectures import LSTMClassifier  # noqa: F401  (import checks the API)

    torch.manual_seed(0)
    hp = {"num_bands": 10, "input_size": 16, "hidden_size": 16, "num_layers": 1, "num_classes": 5}
    module = LSTMClassifier(**hp).eval()
    card = ModelCard(
        family="sits-lstm",
        hyperparameters=hp,
        bands=[
            "BLUE",
            "GREEN",
            "RED",
            "REDEDGE1",
            "REDEDGE2",
            "REDEDGE3",
            "BROADNIR",
            "NIR",
            "SWIR1",
            "SWIR2",
        ],
        class_names=["Spruce", "Beech", "Pine", "Douglas fir", "Oak"],
        output_kind="softmax",
        sequence={"kind": "full"},
    )
    path = tmp_path_factory.mktemp("model") / "lstm.pt"
    pt, _ = save_native(module, card, str(path))
    return pt


@contextlib.contextmanager
def local_client():
    """A client of a LocalCluster of two single-threaded worker processes (the cluster of the
    pipeline tests)."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def client():
    """A :func:`local_client` per test module (modules that need the S3 environment in the
    workers override it)."""
    with local_client() as c:
        yield c


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with code {proc.returncode}")
        time.sleep(0.05)
    pytest.fail(f"{what} did not start on port {port}")


@pytest.fixture(scope="session")
def moto_endpoint():
    """A real S3 endpoint: moto's server as a subprocess on 127.0.0.1 (GDAL deadlocks against an
    in-process server)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_port(port, proc, "moto server")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture()
def s3_env(moto_endpoint, monkeypatch):
    """Process environment for the moto endpoint (path-style, plain HTTP, region RegionOne)."""
    from treesits_dask.io import storage

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-value")
    env = storage.s3_environment(endpoint_url=moto_endpoint, region="RegionOne", environ={})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


# ------------------------------------------------------------------------------------------- S3
#: Distinctive fake credentials: tests assert that these never show up in graphs, logs or outputs.
FAKE_KEY_ID = "AKIATREESITSFAKE0001"
FAKE_SECRET = "treesits-FAKE-secret-4f9c2e81d7b3"
FAKE_TOKEN = "treesits-FAKE-session-token-a1b2c3d4"


@contextlib.contextmanager
def environ_restored():
    """Restore ``os.environ`` exactly (``run`` applies GDAL/S3 settings to the driver's
    environment)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def s3_module_env(moto_endpoint):
    """Like ``s3_env`` for a whole module (so that a module's LocalCluster workers inherit the fake
    credentials): moto endpoint, path-style, region RegionOne, distinctive fake credentials."""
    from treesits_dask.io import storage

    with environ_restored():
        for key in (*storage.S3_ENV_KEYS, "AWS_ENDPOINT_URL_S3"):
            os.environ.pop(key, None)
        os.environ.update(
            AWS_ACCESS_KEY_ID=FAKE_KEY_ID,
            AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
            AWS_SESSION_TOKEN=FAKE_TOKEN,
        )
        env = storage.s3_environment(endpoint_url=moto_endpoint, region="RegionOne", environ={})
        os.environ.update(env)
        yield env


def new_bucket(prefix: str = "treesits", versioned: bool = False) -> str:
    """Create a bucket with a unique name on the endpoint of the current environment."""
    import uuid

    import boto3

    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    s3 = boto3.client(
        "s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name=os.environ["AWS_REGION"]
    )
    s3.create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": os.environ["AWS_REGION"]}
    )
    if versioned:
        s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def upload_tree(local_dir, url: str) -> str:
    """Copy a local folder to ``url`` (``s3://bucket/prefix``); returns ``url``."""
    from treesits_dask.io import storage

    fs, path = storage.get_fs(url)
    fs.put(str(local_dir), path, recursive=True)
    return url
