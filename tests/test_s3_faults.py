"""A run whose cube, masks, model and output are all on S3 behind a faulty network survives it.

Every request of the run (the driver's and the workers') goes through :class:`FaultProxy` in front
of the moto server: the endpoint reaches the workers only through the run config
(``s3_endpoint_url``, applied by the run's worker plugin; the workers were started pointing at a
dead endpoint).  The proxy answers HTTP 500 and 503, drops connections before an answer or in the
middle of a body, and answers slowly, on reads (s3fs listings, HEADs and GETs, GDAL ``/vsis3/``
range reads of scenes and masks, reads of the map's Icechunk objects) and on writes (chunks,
manifests, snapshots and branch refs of the map, COG and VRT uploads, the lease, ``run.json``).
The run must finish with the same map and COGs (byte for byte) as a clean local-disk run: nothing
lost, nothing written twice with other bytes, nothing left over.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import numpy as np
import pytest
import rasterio

from tests.conftest import environ_restored, new_bucket, upload_tree
from treesits_dask.bench.proxy import FAULT_KINDS, FaultProxy
from treesits_dask.config import load_config
from treesits_dask.io import storage
from treesits_dask.io.remote import clear_gdal_cache
from treesits_dask.outputs.repo import REPO_NAME, MapRepo
from treesits_dask.pipeline.run import run
from treesits_dask.state.lease import LEASE_NAME

pytestmark = [pytest.mark.s3, pytest.mark.slow]

SETTINGS = {"window": "30x60", "batch_size": 500, "dashboard_address": ":0"}
VARIABLES = ("probability", "class", "valid_obs", "last_obs_valid", "last_valid_date")
#: besides the targeted faults below, every EVERY-th request that was not faulted before
EVERY = 7


@dataclass(frozen=True)
class Request:
    """One request as the proxy sees it (path-style: ``/bucket/key?query``)."""

    method: str
    key: str
    query: str
    ranged: bool
    finishing: bool  # run.json was PUT before (the run is finishing)

    @classmethod
    def of(cls, method: str, path: str, rng: str, log) -> Request:
        key, _, query = path.partition("?")
        finishing = any(m == "PUT" and p.endswith("/run.json") for m, p, _ in log)
        return cls(method, key, query, bool(rng), finishing)

    def get(self, *suffixes: str, within: str = "") -> bool:
        return (
            self.method == "GET"
            and self.key.endswith(suffixes)
            and within in self.key
            and not self.query
        )

    def put(self, *suffixes: str, within: str = "") -> bool:
        return self.method == "PUT" and self.key.endswith(suffixes) and within in self.key

    def repo(self, *kinds: str) -> bool:
        """An object of the map's Icechunk repository (``chunks``, ``manifests``, ``snapshots``,
        ``transactions``, ``refs``)."""
        return any(f"/{REPO_NAME}/{kind}/" in self.key for kind in kinds)


#: (category, which requests, what its first matching requests get, in this order): a fault kind,
#: or ``pass`` (let it through unfaulted).  ``drop-before`` / ``drop-mid``: a GET reset before its
#: answer / after half of its body (a header cut off like that can open as a file without its
#: georeference).  The driver reads the model before the workers do; the driver opens the first
#: BOA of each tile, the masks and the COGs (VRT mosaics); only workers read QAI files and Zarr
#: chunks and write data chunks and COGs.
RULES = [
    (
        "s3fs listing",
        lambda q: q.method == "GET" and "list-type=" in q.query,
        ("500", "503", "drop-before", "drop-mid", "slow"),
    ),
    ("s3fs HEAD", lambda q: q.method == "HEAD", ("500", "503", "drop", "slow")),
    (
        "GDAL BOA range read",
        lambda q: q.get("_BOA.tif") and q.ranged,
        ("drop-mid", "500", "drop-before", "503", "slow", "drop-mid"),
    ),
    (
        "GDAL QAI range read (workers)",
        lambda q: q.get("_QAI.tif") and q.ranged,
        ("500", "503", "drop-before", "drop-mid", "slow"),
    ),
    (
        "GDAL mask range read",
        lambda q: q.get(".tif", within="/masks/") and q.ranged,
        ("drop-mid", "500", "slow"),
    ),
    (
        "GDAL COG header read (VRT mosaics)",
        lambda q: q.get(".tif", within="/cog/") and q.ranged,
        ("drop-mid", "500", "drop-before", "drop-mid"),
    ),
    (
        "s3fs model read (workers)",
        lambda q: q.get("", within="/species/"),
        ("pass", "pass", "drop-mid", "500"),
    ),
    (
        "map chunk read (COG tasks)",
        lambda q: q.method == "GET" and q.repo("chunks"),
        ("500", "503", "drop-before", "drop-mid", "slow"),
    ),
    (
        "map snapshot/manifest read",
        lambda q: q.method == "GET" and q.repo("snapshots", "manifests"),
        ("drop-mid", "503", "slow", "500"),
    ),
    (
        "map chunk PUT (workers)",
        lambda q: q.method == "PUT" and q.repo("chunks"),
        ("500", "503", "drop", "slow"),
    ),
    (
        "map snapshot/manifest/transaction PUT",
        lambda q: q.method == "PUT" and q.repo("snapshots", "manifests", "transactions"),
        ("500", "drop", "503"),
    ),
    (
        "COG upload (workers)",
        lambda q: q.put(".tif", within="/cog/"),
        ("500", "503", "drop", "slow"),
    ),
    ("VRT upload", lambda q: q.put(".vrt"), ("503", "drop")),
    (
        "map branch ref GET",
        # (the SDK of Icechunk names the operation in the query: ?x-id=GetObject)
        lambda q: q.method == "GET" and q.repo("refs") and q.key.endswith("/ref.json"),
        ("503", "drop-mid"),
    ),
    ("map branch ref PUT (commit)", lambda q: q.put("ref.json", within="/refs/branch."), ("503",)),
    ("lease HEAD", lambda q: q.method == "HEAD" and q.key.endswith(LEASE_NAME), ("500",)),
    ("lease PUT", lambda q: q.put(LEASE_NAME), ("drop",)),
    ("lease GET", lambda q: q.get(LEASE_NAME), ("drop-mid",)),
    # one key (POST /bucket?delete) for all bulk deletes: the store's own stays unfaulted, so that
    # the lease's (at the end) can be faulted
    (
        "bulk delete in the run",
        lambda q: q.method == "POST" and "delete" in q.query and not q.finishing,
        ("pass",) * 4,
    ),
    (
        "lease release (bulk delete)",
        lambda q: q.method == "POST" and "delete" in q.query and q.finishing,
        ("drop",),
    ),
    ("run.json PUT", lambda q: q.put("run.json"), ("503",)),
    ("write probe", lambda q: ".treesits-write-probe" in q.key, ("500", "drop")),
]


class ScheduledFaultProxy(FaultProxy):
    """:class:`FaultProxy` that also faults the first requests of each category of :data:`RULES`
    (so that every kind of request meets faults whatever the order of a run's requests), and
    records every request.  A faulted request is never faulted again (its retry goes through)."""

    def __init__(self, upstream: str, rules, **kwargs):
        super().__init__(upstream, **kwargs)
        self.todo = {name: [match, list(kinds)] for name, match, kinds in rules}
        self.injected: dict[str, list[str]] = collections.defaultdict(list)
        self.log: list[tuple[str, str, str]] = []

    def _next_fault(self, method: str, path: str, rng: str) -> str | None:
        self._local.drop_style = None
        key = (method, path, rng)
        with self._lock:
            self.log.append(key)
            if self.every and key not in self._seen:
                request = Request.of(method, path, rng, self.log)
                for name, (match, kinds) in self.todo.items():
                    if kinds and match(request):
                        kind, _, style = kinds.pop(0).partition("-")
                        if kind == "pass":
                            return None
                        self._seen.add(key)
                        self.requests += 1
                        self.by_method[method] += 1
                        self.counts[kind] += 1
                        self.faulted.append((kind, method, path))
                        self.injected[name].append(kind + (f"-{style}" if style else ""))
                        self._local.drop_style = style or None
                        return kind
        return super()._next_fault(method, path, rng)

    def _drop_mid_body(self) -> bool:
        style = getattr(self._local, "drop_style", None)
        if style:
            return style == "mid"
        return super()._drop_mid_body()


def _dead_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed


@pytest.fixture(scope="module")
def proxy(moto_endpoint):
    with ScheduledFaultProxy(moto_endpoint, RULES, every=0) as p:
        yield p


@pytest.fixture(scope="module")
def client(s3_module_env):
    """Workers inherit the fake credentials, but an endpoint where nothing listens: the run config
    must bring them the real one (the proxy)."""
    from distributed import Client, LocalCluster

    with environ_restored():
        os.environ.update(
            storage.s3_environment(endpoint_url=_dead_endpoint(), region="RegionOne", environ={})
        )
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
    with cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def inputs(s3_module_env, small_cube, native_lstm):
    """The small cube, its masks and the model uploaded straight to moto (no faults)."""
    bucket = new_bucket("cube")
    cube_url = upload_tree(small_cube.root, f"s3://{bucket}/force/level2")
    mask_url = upload_tree(small_cube.mask_dir, f"s3://{bucket}/masks")
    models = new_bucket("models")
    fs, _ = storage.get_fs(f"s3://{models}")
    for src in (native_lstm, native_lstm[:-3] + ".json"):
        fs.put_file(src, f"{models}/species/{Path(src).name}")
    return {
        "cube": cube_url,
        "mask_dir": mask_url,
        "model": f"s3://{models}/species/{Path(native_lstm).name}",
    }


@pytest.fixture(scope="module")
def local_run(small_cube, native_lstm, client, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    config = load_config(
        overrides=dict(
            cube=small_cube.root,
            mask_dir=small_cube.mask_dir,
            model=native_lstm,
            output=str(out),
            **SETTINGS,
        ),
        environ={},
    )
    with environ_restored():
        run(config, client=client)
    return out


@pytest.fixture(scope="module")
def faulty_run(inputs, client, local_run, proxy, moto_endpoint):
    bucket = new_bucket("out", versioned=True)  # versions show any object written twice
    output = f"s3://{bucket}/maps/2024"
    config = load_config(
        overrides=dict(**inputs, output=output, s3_endpoint_url=proxy.url, **SETTINGS), environ={}
    )
    proxy.reset_counts()
    proxy.every = EVERY
    t0 = time.perf_counter()
    try:
        with environ_restored():  # run() points this process at the proxy; the checks talk to moto
            result = run(config, client=client)
    finally:
        proxy.every = 0
    return {
        "config": config,
        "result": result,
        "seconds": time.perf_counter() - t0,
        "bucket": bucket,
    }


def _s3_objects(url: str) -> dict[str, bytes]:
    fs, path = storage.get_fs(url)
    return {p[len(path) + 1 :]: fs.cat_file(p) for p in fs.find(path)}


def _local_objects(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_run_survives_faults_with_identical_outputs(
    faulty_run, local_run, proxy, small_cube, moto_endpoint
):
    result = faulty_run["result"]
    assert set(result.tiles) == set(small_cube.tiles) and not result.failed
    # faults of every kind were injected, on every kind of request, and the run went on
    assert all(proxy.counts[k] > 0 for k in FAULT_KINDS), proxy.counts
    # (how many requests of a category a run makes depends on GDAL's caches and on timing, so each
    # category must have met faults, not necessarily all that were planned for it)
    planned = {name: [k for k in kinds if k != "pass"] for name, _, kinds in RULES}
    left = {
        name: kinds for name, kinds in planned.items() if kinds and not proxy.injected.get(name)
    }
    assert not left, f"requests that never came through the proxy: {left}"
    # the workers' requests came through the proxy too (map chunks and COGs are written by workers)
    assert any(m == "PUT" and f"/{REPO_NAME}/chunks/" in p for m, p, _ in proxy.log)

    remote = _s3_objects(faulty_run["config"].output)
    local = _local_objects(local_run)
    # the same COGs and VRT mosaics as the clean local run, byte for byte, nothing lost or extra
    cogs = [k for k in local if k.startswith("cog/")]
    assert len([k for k in cogs if k.endswith(".tif")]) == len(VARIABLES) * len(small_cube.tiles)
    assert {k for k in remote if k.startswith("cog/")} == set(cogs)
    # (a tile's _cog.json names the record and snapshot its COGs show: ids of each run)
    differ = [k for k in cogs if remote[k] != local[k] and not k.endswith("/_cog.json")]
    assert not differ, differ
    outside = {k.split("/")[0] for k in remote} - {REPO_NAME, "cog", "_runs", "run.json"}
    assert not outside, outside
    # every object written once or, when a retried write landed twice, with the same bytes (map
    # objects have unique names and are never rewritten; the branch ref is rewritten by each
    # commit); the lease and the write probe written once and deleted once
    bucket = faulty_run["bucket"]
    prefix = storage.strip_protocol(faulty_run["config"].output).split("/", 1)[1]
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="RegionOne")
    etags, deletes = collections.defaultdict(set), collections.Counter()
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", []):
            etags[v["Key"][len(prefix) + 1 :]].add(v["ETag"])
        deletes.update(v["Key"][len(prefix) + 1 :] for v in page.get("DeleteMarkers", []))
    rewritten = {k: len(e) for k, e in etags.items() if len(e) > 1 and not k.endswith("/ref.json")}
    assert not rewritten, rewritten
    assert sorted(deletes) == sorted(
        k for k in etags if k == LEASE_NAME or ".treesits-write-probe" in k
    )
    assert set(deletes.values()) == {1} and LEASE_NAME in deletes
    # no half-done multipart upload and no lease left anywhere
    for b in s3.list_buckets()["Buckets"]:
        assert not s3.list_multipart_uploads(Bucket=b["Name"]).get("Uploads"), b["Name"]
    assert LEASE_NAME not in remote

    # the map: one commit per tile (a retried commit did not land twice), one version, and the
    # same arrays as the clean run; COGs read back through GDAL (/vsis3/, nothing cached)
    repo, ref = MapRepo(faulty_run["config"].output), MapRepo(str(local_run))
    assert set(repo.records()) == set(small_cube.tiles)
    (version,) = repo.versions()
    assert sorted(t["tile"] for t in version["tiles"]) == sorted(small_cube.tiles)
    a, b = repo.open_dataset(), ref.open_dataset()
    assert set(a.data_vars) == set(b.data_vars) == set(VARIABLES) and a.sizes == b.sizes
    for var in VARIABLES:
        np.testing.assert_array_equal(a[var].values, b[var].values)
    assert (a["class"].values != 255).sum() > 1000
    clear_gdal_cache()
    for tile in small_cube.tiles:
        for var in VARIABLES:
            remote_cog = storage.gdal_path(
                storage.join(faulty_run["config"].output, "cog", tile, f"{var}.tif")
            )
            with (
                rasterio.open(remote_cog) as r,
                rasterio.open(local_run / "cog" / tile / f"{var}.tif") as loc,
            ):
                np.testing.assert_array_equal(r.read(), loc.read())
                assert r.crs == loc.crs and r.transform == loc.transform
    print(
        f"\nfaulty S3 run: {faulty_run['seconds']:.1f} s, {proxy.requests} requests "
        f"{dict(proxy.by_method)}, faults {dict(proxy.counts)}"
    )


def test_header_cut_off_in_the_middle_is_read_again(inputs, small_cube, moto_endpoint, caplog):
    """A small GeoTIFF whose one GET breaks off after half of its bytes opens in GDAL without its
    georeference (libtiff only warns that it could not read the GeoKeys): the read must count as
    failed and be retried, not end in "the mask's CRS None differs from the tile's"."""
    from treesits_dask.io import masks
    from treesits_dask.io.grid import TileGrid

    tile = small_cube.tiles[0]
    with rasterio.open(Path(small_cube.mask_dir) / tile / "mask.tif") as src:  # the tile's grid
        tr = src.transform
        grid = TileGrid(
            tile=tile,
            crs_wkt=src.crs.to_wkt(),
            transform=(tr.a, tr.b, tr.c, tr.d, tr.e, tr.f),
            width=src.width,
            height=src.height,
            block_shape=(src.height, src.width),
            count=10,
        )
    url = storage.join(inputs["mask_dir"], tile, "mask.tif")
    with (
        FaultProxy(moto_endpoint, every=1, kinds=("drop",), drop_style="mid") as proxy,
        environ_restored(),
    ):
        os.environ.update(
            storage.s3_environment(endpoint_url=proxy.url, region="RegionOne", environ={})
        )
        clear_gdal_cache()
        with caplog.at_level(logging.WARNING, logger="treesits_dask.storage"):
            source = masks.mask_source(url, grid)
        clear_gdal_cache()
    assert source == masks.MaskSource(url, 0, 0)
    assert proxy.faulted[0] == ("drop", "GET", "/" + storage.gdal_path(url).removeprefix("/vsis3/"))
    assert "was incomplete" in caplog.text and "GeoKeyDirectory" in caplog.text


class _CutOffRepoReads(FaultProxy):
    """Once ``armed``, cuts off after half of its body the first GET of each map object whose key
    holds one of ``parts`` (``transactions``, ``snapshots``): reads that Icechunk 1.1 streams
    without retrying them."""

    def __init__(self, upstream: str, parts: tuple[str, ...]):
        super().__init__(upstream, drop_style="mid")
        self.parts, self.cut, self.armed = parts, [], False

    def _next_fault(self, method: str, path: str, rng: str) -> str | None:
        super()._next_fault(method, path, rng)
        with self._lock:
            part = next((p for p in self.parts if f"/{p}/" in path), None)
            if not self.armed or method != "GET" or part is None or part in dict(self.cut):
                return None
            self.cut.append((part, path))
            return "drop"


@pytest.mark.parametrize("parts", [("transactions",), ("transactions", "snapshots")])
def test_a_tile_commit_whose_rebase_read_breaks_off_is_retried(
    s3_module_env, moto_endpoint, parts, caplog
):
    """Tiles of a run commit concurrently, so a tile's commit rebases onto the others': it reads
    their transaction logs (and the branch tip's snapshot) from the store.  Icechunk 1.1 does not
    retry such a read that breaks off in the middle of its body, and the tile failed after all its
    work ("session error: I/O error" in CI).  The commit is tried again: none of it had landed."""
    import icechunk
    import zarr

    from treesits_dask.outputs.repo import TILES_GROUP, repo_storage

    url = f"s3://{new_bucket('out')}/maps/2024"
    icechunk.Repository.create(repo_storage(MapRepo(url).url))
    setup = icechunk.Repository.open(repo_storage(MapRepo(url).url)).writable_session("main")
    zarr.open_group(setup.store, mode="w").require_group(TILES_GROUP)
    setup.commit("layout")
    first = MapRepo(url).tile_session()[0]
    with _CutOffRepoReads(moto_endpoint, parts) as proxy, environ_restored():
        os.environ.update(
            storage.s3_environment(endpoint_url=proxy.url, region="RegionOne", environ={})
        )
        # another driver's session (a repository object caches the logs and snapshots it wrote
        # itself), opened behind the proxy before the first tile's commit: it must rebase
        second = MapRepo(url).tile_session()[0]
        MapRepo.commit_tile(first, [], "X0001_Y0001", {"n": 1}, {"run": "r"})
        proxy.armed = True
        with caplog.at_level(logging.WARNING, logger="treesits_dask.outputs"):
            snapshot = MapRepo.commit_tile(second, [], "X0002_Y0001", {"n": 2}, {"run": "r"})
    assert sorted(p for p, _ in proxy.cut) == sorted(parts)  # each read was cut off once
    assert caplog.text.count("retrying the commit") == len(parts)
    repo = MapRepo(url)
    assert set(repo.records()) == {"X0001_Y0001", "X0002_Y0001"}
    tiles = [i.metadata.get("tile") for i in repo.repo.ancestry(branch="main")]
    assert tiles[:3] == ["X0002_Y0001", "X0001_Y0001", None]  # each tile committed once
    assert repo.repo.lookup_branch("main") == snapshot
