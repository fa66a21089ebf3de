"""Cube, masks, model and outputs on an S3 endpoint (a moto server on 127.0.0.1, spoken to over
HTTP) give the same outputs as the local-disk run, leave no credentials anywhere, and upload large
COGs in parts."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import rasterio

from tests.conftest import FAKE_SECRET, FAKE_TOKEN, local_client, new_bucket, upload_tree
from treesits_dask.config import load_config
from treesits_dask.errors import OutputError
from treesits_dask.io import cube, storage
from treesits_dask.outputs import cog
from treesits_dask.outputs.repo import REPO_NAME, MapRepo
from treesits_dask.pipeline.plan import make_plan
from treesits_dask.pipeline.run import run, tile_graph
from treesits_dask.state.lease import LEASE_NAME, Lease

pytestmark = [pytest.mark.s3, pytest.mark.slow]

SETTINGS = dict(window="30x60", batch_size=500, dashboard_address=":0")


@pytest.fixture(scope="module")
def client(s3_module_env):
    """Workers inherit the fake credentials from the environment (as pods get them from a secret);
    endpoint and addressing reach them through the run's worker plugin."""
    with local_client() as c:
        yield c


@pytest.fixture(scope="module")
def inputs(s3_module_env, small_cube, native_lstm):
    """The small cube, its masks and the model uploaded to two buckets."""
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
    run(config, client=client)
    return out


@pytest.fixture(scope="module")
def s3_run(inputs, client, local_run):
    output = f"s3://{new_bucket('out', versioned=True)}/maps/2024"
    config = load_config(overrides=dict(**inputs, output=output, **SETTINGS), environ={})
    leases = []

    class Watch:  # what a second process would see while the run holds the lease
        def start(self, total, link):
            fs, path = storage.get_fs(storage.join(output, LEASE_NAME))
            leases.append(fs.cat_file(path))

        def window_done(self, tile): ...
        def tile_done(self, tile, stats): ...
        def tile_failed(self, tile, error): ...

    t0 = time.perf_counter()
    result = run(config, client=client, callbacks=Watch())
    return {
        "config": config,
        "result": result,
        "seconds": time.perf_counter() - t0,
        "leases": leases,
    }


def _s3_objects(url: str) -> dict[str, bytes]:
    fs, path = storage.get_fs(url)
    return {p[len(path) + 1 :]: fs.cat_file(p) for p in fs.find(path)}


def _local_objects(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_s3_run_equals_local_run(s3_run, local_run, small_cube):
    assert set(s3_run["result"].tiles) == set(small_cube.tiles) and not s3_run["result"].failed
    output = s3_run["config"].output
    remote = _s3_objects(output)
    local = _local_objects(local_run)
    # the same COGs and VRT mosaics, byte for byte
    same_bytes = [k for k in local if k.startswith("cog/")]
    assert same_bytes and {k for k in remote if k.startswith("cog/")} == set(same_bytes)
    # (a tile's _cog.json names the record and snapshot its COGs show: ids of each run)
    differ = [k for k in same_bytes if remote[k] != local[k] and not k.endswith("/_cog.json")]
    assert not differ, differ
    # the map is an Icechunk repository on S3 (snapshots, manifests, chunks, the branch ref)
    kinds = {k.split("/")[1] for k in remote if k.startswith(REPO_NAME + "/")}
    assert {"chunks", "manifests", "snapshots", "refs"} <= kinds, kinds
    # with one finished record per tile, and the same arrays as the local run
    s3_map, local_map = MapRepo(output), MapRepo(str(local_run))
    assert set(s3_map.records()) == set(small_cube.tiles)
    a, b = s3_map.open_dataset(), local_map.open_dataset()
    assert (
        set(a.data_vars)
        == set(b.data_vars)
        == {"probability", "class", "valid_obs", "last_obs_valid", "last_valid_date"}
    )
    assert a.sizes == b.sizes and a.rio.transform() == b.rio.transform()
    for var in a.data_vars:
        np.testing.assert_array_equal(a[var].values, b[var].values)
    assert (a["class"].values != 255).sum() > 1000
    for tile in small_cube.tiles:
        for var in ("probability", "class", "valid_obs", "last_obs_valid", "last_valid_date"):
            with (
                rasterio.open(
                    storage.gdal_path(storage.join(output, "cog", tile, f"{var}.tif"))
                ) as r,
                rasterio.open(local_run / "cog" / tile / f"{var}.tif") as loc,
            ):
                np.testing.assert_array_equal(r.read(), loc.read())
                assert r.crs == loc.crs and r.transform == loc.transform
    with rasterio.open(storage.gdal_path(storage.join(output, "cog", "class.vrt"))) as src:
        np.testing.assert_array_equal(src.read(1), b["class"].values)  # the map's bounding box
        assert src.transform == b.rio.transform()
    summary = json.loads(remote["run.json"])
    assert summary["complete"] and summary["pixels_predicted"] == s3_run["result"].pixels_predicted
    # the lease object existed while the run was going, and is gone
    assert json.loads(s3_run["leases"][0])["expires"] > time.time() - 600
    assert LEASE_NAME not in remote


def test_a_streamed_run_of_the_cube_on_s3_maps_the_local_run(
    inputs, client, local_run, small_cube, caplog
):
    """The LSTM streamed through the model (``stream: always``; the read budget cut so that each
    batch holds one or two scenes), its scenes and masks read from S3 band by band and batch by
    batch, maps what the local run (not streamed, all scenes at once) maps: probabilities to
    float rounding, the rest exactly."""
    output = f"s3://{new_bucket('streamed')}/maps"
    # windows of half the tile's width: put together from bands (full-width windows of whole
    # strips are read whole, never streamed)
    settings = {**SETTINGS, "window": "30x30"}
    config = load_config(
        overrides=dict(**inputs, output=output, stream="always", cog=False, read_memory=1e-5,
                       **settings),
        environ={},
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        result = run(config, client=client)
    assert set(result.tiles) == set(small_cube.tiles) and not result.failed
    batches = [
        int(b) for b in re.findall(r"streamed through the model in (\d+) batches", caplog.text)
    ]
    assert len(batches) == len(small_cube.tiles) and min(batches) > 1, batches
    a, b = MapRepo(output).open_dataset(), MapRepo(str(local_run)).open_dataset()
    assert (b["class"].values != 255).sum() > 1000
    np.testing.assert_allclose(a.probability.values, b.probability.values, rtol=0, atol=1e-5)
    for var in ("class", "valid_obs", "last_obs_valid", "last_valid_date"):
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)


def test_no_credentials_in_graph_logs_or_outputs(s3_run, inputs, client, caplog):
    secrets = (FAKE_SECRET.encode(), FAKE_TOKEN.encode())
    # outputs: every object the run wrote (run.json, the map's
    # Icechunk objects, COGs, VRTs)
    for key, data in _s3_objects(s3_run["config"].output).items():
        assert not any(s in data for s in secrets), key
    # the task graph of a tile, and the plugins sent to the workers
    from treesits_dask.pipeline.cluster import worker_environment
    from treesits_dask.pipeline.plugins import EnvPlugin
    from treesits_dask.pipeline.predict import ModelPlugin

    config = s3_run["config"].model_copy(update={"force": True})
    with caplog.at_level(logging.DEBUG, logger="treesits_dask"):
        plan = make_plan(config)
        _, fork = MapRepo(config.output).tile_session()  # pickled into the write tasks
        _, graph = tile_graph(plan, plan.tiles[0], fork)
    import cloudpickle

    blobs = [
        cloudpickle.dumps(dict(graph)),
        cloudpickle.dumps(fork),
        pickle.dumps(plan.spec),
        cloudpickle.dumps(EnvPlugin(worker_environment(config))),
        cloudpickle.dumps(ModelPlugin(plan.spec, "cpu")),
        json.dumps(plan.summary(), default=str).encode(),
        repr(config).encode(),
    ]
    assert not any(s in blob for blob in blobs for s in secrets)
    # logs: the driver's and every worker's
    text = (
        caplog.text
        + json.dumps(client.get_worker_logs(n=10_000))
        + json.dumps(client.get_scheduler_logs(n=10_000))
    )
    assert FAKE_SECRET not in text and FAKE_TOKEN not in text
    with pytest.raises(ValueError, match="refusing"):
        EnvPlugin({"AWS_SECRET_ACCESS_KEY": FAKE_SECRET})


def test_second_run_reads_no_pixels_and_starts_no_cluster(s3_run, monkeypatch):
    """Everything is up to date: no cluster, no GDAL open, a small fraction of the first run's
    time."""
    import treesits_dask.pipeline.run

    def no_cluster(config):
        raise AssertionError("a cluster was started for an up-to-date output")

    monkeypatch.setattr(treesits_dask.pipeline.run, "connect", no_cluster)
    opens = cube.OPEN_COUNTER.count
    t0 = time.perf_counter()
    again = run(s3_run["config"])
    seconds = time.perf_counter() - t0
    assert cube.OPEN_COUNTER.count == opens
    assert not again.tiles and set(again.skipped) == set(s3_run["result"].tiles)
    assert seconds < s3_run["seconds"] / 2, (seconds, s3_run["seconds"])


def test_force_rewrites_identical_objects(s3_run, client):
    """Re-running every tile writes every COG again (a second S3 version) with the same bytes,
    keeps the mosaics (the same tiles), and adds a version of the map whose arrays equal the
    first version's."""
    config = s3_run["config"]
    bucket, prefix = storage.strip_protocol(config.output).split("/", 1)
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="RegionOne")

    def versions():
        out: dict[str, list[str]] = {}
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
            for v in page.get("Versions", []):
                out.setdefault(v["Key"][len(prefix) + 1 :], []).append(v["ETag"])
        return out

    repo = MapRepo(config.output)
    first = repo.versions()
    before = versions()
    result = run(config.model_copy(update={"force": True}), client=client)
    assert set(result.tiles) == set(s3_run["result"].tiles)
    after = versions()
    written = [k for k in before if k.endswith(".tif")]
    assert len(written) == 10  # 2 tiles x 5 variables
    for key in written:
        assert len(after[key]) == len(before[key]) + 1, key  # written again ...
        assert len(set(after[key])) == 1, key  # ... with the same bytes (same ETag)
    mosaics = [k for k in before if k.endswith(".vrt")]
    assert len(mosaics) == 5 and all(after[k] == before[k] for k in mosaics)  # same tiles: kept
    history = repo.versions()
    assert len(history) == len(first) + 1
    assert {t["tile"] for t in history[-1]["tiles"]} == set(result.tiles)
    old, new = repo.open_dataset(first[-1]["version"]), repo.open_dataset()
    for var in new.data_vars:
        np.testing.assert_array_equal(old[var].values, new[var].values)
    assert not repo.changes(first[-1]["version"])["changed"].any()


def test_second_driver_is_refused_and_stale_lease_taken_over(s3_run):
    config = s3_run["config"].model_copy(update={"force": True})
    with Lease(config.output, ttl=60):
        host = re.escape(socket.gethostname())
        with pytest.raises(
            OutputError, match=f"leased by another driver \\(on {host}, pid {os.getpid()}\\)"
        ) as info:
            run(config)
        assert "_lease.json" in str(info.value)
    fs, path = storage.get_fs(storage.join(config.output, LEASE_NAME))
    assert not fs.exists(path)  # released
    fs.pipe_file(
        path,
        json.dumps(
            {
                "owner": "other-host:4242:dead",
                "host": "other-host",
                "pid": 4242,
                "expires": time.time() - 5,
            }
        ).encode(),
    )
    lease = Lease(config.output, ttl=60).acquire()
    assert json.loads(fs.cat_file(path))["owner"] == lease.owner
    lease.release()
    assert not fs.exists(path)


def test_two_drivers_taking_over_a_dead_lease(s3_run, monkeypatch):
    """Two drivers that read the same stale lease both try to take it over; S3's conditional
    write lets one through and refuses the other ("At least one of the pre-conditions you
    specified did not hold", HTTP 412), which is told that another driver took it at the same
    time (not that the lease cannot be written)."""
    output = s3_run["config"].output
    fs, path = storage.get_fs(storage.join(output, LEASE_NAME))
    dead = {"owner": "other-host:4242:dead", "host": "other-host", "pid": 4242,
            "expires": time.time() - 5}  # fmt: skip
    fs.pipe_file(path, json.dumps(dead).encode())
    late = Lease(output, ttl=60)
    stale = late._read()  # what the second driver read before the first one wrote
    first = Lease(output, ttl=60).acquire()
    monkeypatch.setattr(late, "_read", lambda: stale)
    with pytest.raises(OutputError, match="another driver took the lease .* at the same time"):
        late.acquire()
    assert json.loads(fs.cat_file(path))["owner"] == first.owner
    first.release()
    assert not fs.exists(path)


def test_large_cogs_are_uploaded_in_parts(s3_module_env, tmp_path):
    """COGs of at least twice the part size go up as multipart uploads (S3 ETag
    ``<md5>-<parts>``)."""
    from affine import Affine

    bucket = new_bucket("cogs")
    rng = np.random.default_rng(0)
    spec = cog.CogSpec(
        width=1800,
        height=1800,
        count=1,
        dtype="float32",
        crs_wkt=rasterio.crs.CRS.from_epsg(3035).to_wkt(),
        transform=tuple(Affine(10, 0, 4e6, 0, -10, 3e6))[:6],
        nodata=float("nan"),
    )
    block = rng.random((1, 1800, 1800), dtype=np.float32)
    big = cog.write_cog(f"s3://{bucket}/big.tif", spec, [(0, 0, block)], part_size=5 * 2**20)
    small = cog.write_cog(
        f"s3://{bucket}/small.tif", spec, [(0, 0, block)]
    )  # default parts: 32 MiB
    s3 = boto3.client("s3", endpoint_url=s3_module_env["AWS_ENDPOINT_URL"], region_name="RegionOne")
    big_head = s3.head_object(Bucket=bucket, Key="big.tif")
    assert big_head["ContentLength"] >= 10 * 2**20
    assert big_head["ETag"].strip('"').endswith(f"-{-(-big_head['ContentLength'] // (5 * 2**20))}")
    assert "-" not in s3.head_object(Bucket=bucket, Key="small.tif")["ETag"]
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    with rasterio.open(storage.gdal_path(big)) as a, rasterio.open(storage.gdal_path(small)) as b:
        np.testing.assert_array_equal(a.read(), b.read())
        np.testing.assert_array_equal(a.read(1), block[0])
    with pytest.raises(ValueError, match="5 MiB"):
        storage.upload(str(tmp_path), f"s3://{bucket}/x", part_size=2**20)


def _read_bands_from_s3(moto_endpoint, tmp_path, layout: str, short: bool):
    """A 3000 x 1280 px, 10-band BOA file of the synthetic cube's ``layout`` uploaded to S3 and
    read in bands of 256 rows (whole block rows of a COG), full width, as the pipeline reads a
    tile, through a request-counting proxy, with the GDAL settings every reading process gets;
    ``short``: the process's pool of kept datasets has had to close datasets for its memory (as
    at hundreds of scenes).  Returns the bands, the file's values and size, the proxy and whether
    the kept dataset was opened for GDAL's multi-threaded read."""
    from affine import Affine

    from tests.conftest import environ_restored
    from treesits_dask.bench.proxy import FaultProxy
    from treesits_dask.io import datasets
    from treesits_dask.io.bands import Band, Piece
    from treesits_dask.io.grid import TileGrid
    from treesits_dask.io.reader import WindowReader
    from treesits_dask.io.remote import clear_gdal_cache
    from treesits_dask.synthetic.files import scene_profile

    width, height, rows = 3000, 1280, 256
    crs = rasterio.crs.CRS.from_epsg(3035)
    transform = Affine(10, 0, 4_526_026, 0, -10, 3_284_205)
    data = np.random.default_rng(1).integers(0, 3000, (10, height, width), dtype=np.int16)
    local = tmp_path / "boa.tif"
    # the synthetic cube's profile (COG: FORCE >= 3.8, 256 px ZSTD blocks), 1280 rows high
    profile = dict(scene_profile(layout, width, 10, transform, -9999, "EPSG:3035"), height=height)
    with rasterio.open(local, "w", **profile) as dst:
        dst.write(data)
    url = f"s3://{new_bucket('rows')}/boa.tif"
    storage.upload(str(local), url)
    with rasterio.open(local) as src:
        block = tuple(src.block_shapes[0])
    grid = TileGrid("X0069_Y0043", crs.to_wkt(), tuple(transform)[:6], width, height, block, 10)
    reader = WindowReader(grid=grid, boa=(url,), qai=(None,))
    datasets.forget_datasets()
    datasets._POOL.take(("none", None))  # the new generation, whose pool has not run short
    saved = datasets._POOL.lean, datasets._POOL.forwards
    datasets._POOL.lean = short  # as if it had closed datasets for its memory
    datasets._POOL.forwards = False  # as in a process that runs no CPU forward
    try:
        with FaultProxy(moto_endpoint) as proxy, environ_restored():
            os.environ.update(storage.process_defaults())
            os.environ.update(storage.s3_environment(endpoint_url=proxy.url, region="RegionOne",
                                                     environ={}))  # fmt: skip
            clear_gdal_cache()
            got = [
                reader.read_band(
                    Band(k, k * rows, rows, (Piece(k, 0, (0, rows), (0, rows), 0, width),)), 0, 1
                )  # fmt: skip
                for k in range(height // rows)
            ]
            kept = [src for (u, _), e in datasets._POOL.idle.items() if u == url for src, *_ in e]
            assert datasets.pool_state()["ran_short"] == short
            clear_gdal_cache()
    finally:
        datasets._POOL.lean, datasets._POOL.forwards = saved
        datasets.forget_datasets()
    assert len(kept) == 1
    return got, data, local.stat().st_size, proxy, datasets.threaded(kept[0])


@pytest.mark.parametrize("short", [False, True], ids=["pool-with-room", "pool-short"])
def test_a_block_row_of_a_force_sized_cog_is_one_request(
    s3_module_env, moto_endpoint, tmp_path, short
):
    """Reading a tile in bands (whole block rows, full width) from S3: one GET per block row of a
    3000 px, 10-band COG (a row of its 256 px blocks is over GDAL's default 10 MB of merged ranges)
    and no more bytes than the file, with the GDAL settings every reading process gets; the same
    where the pool of kept datasets runs short and opens the COG for GDAL's multi-threaded read
    (``NUM_THREADS``, which keeps no decoded block: a file closed for room would cost a request
    again when it is opened)."""
    got, data, size, proxy, threaded = _read_bands_from_s3(moto_endpoint, tmp_path, "cog", short)
    assert threaded == short
    rows = 256
    for k, band in enumerate(got):  # a band that is one whole window: the window itself
        np.testing.assert_array_equal(band[0], data[:, k * rows : (k + 1) * rows])
    gets = proxy.by_method["GET"]
    # one GET per block row, and the header (one or two GETs)
    assert gets <= len(got) + 2, (gets, proxy.by_method)
    assert proxy.bytes_down <= 1.02 * size, (proxy.bytes_down, size)


def test_striped_files_on_s3_are_not_opened_for_gdals_threads(s3_module_env, moto_endpoint,
                                                              tmp_path):  # fmt: skip
    """A striped BOA file (FORCE < 3.8) on S3 is opened the ordinary way even where the pool runs
    short (opened for GDAL's multi-threaded read, such files were read in 2.2 times the time),
    and its values are read exactly."""
    got, data, _, _, threaded = _read_bands_from_s3(moto_endpoint, tmp_path, "strips", True)
    assert not threaded
    rows = 256
    for k, band in enumerate(got):
        np.testing.assert_array_equal(band[0], data[:, k * rows : (k + 1) * rows])
