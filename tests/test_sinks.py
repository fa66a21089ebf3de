"""The map store (an Icechunk repository), region writes, per-tile COGs and VRT mosaics on a tiny
grid (2 tiles of 40x40 px)."""

from __future__ import annotations

import hashlib
import shutil
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr
from affine import Affine
from rasterio.crs import CRS
from rio_cogeo.cogeo import cog_validate

from treesits_dask.errors import OutputError
from treesits_dask.io import storage
from treesits_dask.outputs import cog, schema
from treesits_dask.outputs import store as outputs_store
from treesits_dask.outputs.repo import MapRepo

ORIGIN = (2456026.363042, 4574919.607965)
CLASSES = ("Spruce", "Beech", "Pine")
TILES = ("X0069_Y0043", "X0070_Y0043")
GRID = schema.OutputGrid(
    crs_wkt=CRS.from_epsg(3035).to_wkt(),
    transform=(10.0, 0.0, ORIGIN[0] + 69 * 400.0, 0.0, -10.0, ORIGIN[1] - 43 * 400.0),
    width=80, height=40, chunk=(20, 20), class_names=CLASSES, multiclass=True,
)  # fmt: skip
REGIONS = [schema.TileRegion(t, 0, 40 * k, 40, 40) for k, t in enumerate(TILES)]
ALL = schema.TileRegion("all", 0, 0, 40, 80)
UNWRITTEN = (20, 60)  # upper-left pixel of the one chunk that is never written


def _window_outputs(rng, shape=(20, 20), n=3):
    """Realistic window outputs: some pixels not predicted (nodata in every variable)."""
    prob = rng.dirichlet(np.ones(n), size=shape).transpose(2, 0, 1).astype(np.float32)
    cls = prob.argmax(axis=0).astype(np.uint8)
    vobs = rng.integers(1, 300, size=shape).astype(np.uint16)
    last = rng.integers(0, 2, size=shape).astype(np.uint8)
    skip = rng.random(shape) < 0.3
    prob[:, skip], cls[skip], vobs[skip], last[skip] = np.nan, 255, 0, 255
    return {"probability": prob, "class": cls, "valid_obs": vobs, "last_obs_valid": last}


def _fill(repo: MapRepo, grid=GRID, seed=0):
    """Write every chunk but UNWRITTEN in one commit; returns the expected full-store arrays."""
    rng = np.random.default_rng(seed)
    expected = {v: _nodata_array(v, grid) for v in grid.variables()}
    session = repo.repo.writable_session("main")
    for r in range(0, grid.height, 20):
        for c in range(0, grid.width, 20):
            if (r, c) == UNWRITTEN:
                continue
            out = _window_outputs(rng, n=len(grid.class_names))
            out = {k: v for k, v in out.items() if k in grid.variables()}
            outputs_store.write_window(session.store, slice(r, r + 20), slice(c, c + 20), out)
            for k, v in out.items():
                expected[k][..., r : r + 20, c : c + 20] = v
    session.commit("fill")
    return expected


def _nodata_array(var, grid=GRID):
    shape = (grid.height, grid.width)
    if var == "probability":
        shape = (len(grid.class_names), *shape)
    return np.full(shape, schema.NODATA[var], dtype=schema.DTYPES[var])


def _repo(output, grid=GRID, attrs=None) -> MapRepo:
    repo = MapRepo(str(output))
    repo.ensure_layout(grid, attrs or {})
    return repo


@pytest.fixture
def repo(tmp_path) -> MapRepo:
    return _repo(tmp_path / "out", attrs={"model": "lstm.pt"})


@pytest.fixture
def store(repo):
    """The map's zarr store as committed on main."""
    return repo.zarr_store()


@pytest.fixture
def filled(repo):
    expected = _fill(repo)
    return repo.zarr_store(), expected


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------- Zarr
def test_store_metadata_for_xarray_and_rioxarray(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no consolidated-metadata (or other) warnings for users
        ds = xr.open_zarr(store, group="0", consolidated=False)
    assert ds.rio.crs.to_epsg() == 3035
    assert ds.rio.transform() == Affine(*GRID.transform)
    assert ds.probability.rio.crs.to_epsg() == 3035
    assert list(ds[schema.CLASS_DIM].values) == list(CLASSES)
    assert ds.probability.dims == (schema.CLASS_DIM, "y", "x")
    assert ds["class"].dims == ("y", "x") and "class" in ds.data_vars
    assert set(ds.data_vars) == set(schema.VARIABLES)
    assert ds.x.values[0] == GRID.transform[2] + 5 and ds.y.values[0] == GRID.transform[5] - 5
    assert ds.attrs["model"] == "lstm.pt"
    # default decoding: integer layers with nodata become float with NaN; valid_obs stays uint16
    assert ds["class"].dtype == np.float32 and ds["class"].rio.encoded_nodata == 255
    assert ds.valid_obs.dtype == np.uint16
    raw = xr.open_zarr(store, group="0", consolidated=False, mask_and_scale=False)
    assert raw["class"].dtype == np.uint8 and raw["class"].rio.nodata == 255
    assert raw.last_obs_valid.dtype == np.uint8 and raw.last_obs_valid.rio.nodata == 255
    assert raw.valid_obs.dtype == np.uint16 and raw.valid_obs.rio.nodata is None
    assert np.isnan(raw.probability.rio.nodata) and raw.probability.dtype == np.float32
    assert list(raw["class"].attrs["class_names"]) == list(CLASSES)
    group = zarr.open_group(store, mode="r")["0"]  # level 0: the map at full resolution
    assert group["probability"].chunks == (3, 20, 20)  # all classes in one chunk
    assert group["class"].chunks == group["valid_obs"].chunks == (20, 20)
    assert group["class"].fill_value == 255  # unwritten chunks are nodata, not class 0 (Spruce)


def test_unwritten_store_reads_nodata(store):
    for var in schema.VARIABLES:
        np.testing.assert_array_equal(
            outputs_store.read_region(store, ALL, var), _nodata_array(var)
        )
    ds = xr.open_zarr(store, group="0", consolidated=False, mask_and_scale=False)
    assert (ds["class"].values == 255).all() and (ds.valid_obs.values == 0).all()
    assert np.isnan(xr.open_zarr(store, group="0", consolidated=False)["class"].values).all()


def test_write_window_reads_back(filled):
    store, expected = filled
    for var in schema.VARIABLES:
        np.testing.assert_array_equal(outputs_store.read_region(store, ALL, var), expected[var])
    r, c = UNWRITTEN
    cls = outputs_store.read_region(store, ALL, "class")
    assert (cls[r : r + 20, c : c + 20] == 255).all()
    ds = xr.open_zarr(store, group="0", consolidated=False, mask_and_scale=False)
    np.testing.assert_array_equal(ds.probability.values, expected["probability"])
    np.testing.assert_array_equal(ds.valid_obs.values, expected["valid_obs"])
    # the edge tile region reads the right part of the store
    np.testing.assert_array_equal(
        outputs_store.read_region(store, REGIONS[1], "last_obs_valid"),
        expected["last_obs_valid"][:, 40:],
    )


def test_write_window_is_idempotent_and_thread_safe(tmp_path):
    repo = _repo(tmp_path / "out")
    rng = np.random.default_rng(5)
    jobs = [
        (slice(r, r + 20), slice(c, c + 20), _window_outputs(rng))
        for r in range(0, 40, 20)
        for c in range(0, 80, 20)
    ]
    session = repo.repo.writable_session("main")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda j: outputs_store.write_window(session.store, *j), jobs))
    session.commit("windows")
    before = {v: outputs_store.read_region(repo.zarr_store(), ALL, v) for v in schema.VARIABLES}
    for rows, cols, out in jobs:
        got = outputs_store.read_region(
            repo.zarr_store(), schema.TileRegion("w", rows.start, cols.start, 20, 20), "class"
        )
        np.testing.assert_array_equal(got, out["class"])
    session = repo.repo.writable_session("main")
    outputs_store.write_window(session.store, *jobs[3])  # rewriting a window changes no value
    session.commit("again")
    for var, values in before.items():
        np.testing.assert_array_equal(
            outputs_store.read_region(repo.zarr_store(), ALL, var), values
        )


def test_write_window_rejects_bad_windows(repo, tmp_path):
    out = _window_outputs(np.random.default_rng(1))
    session = repo.repo.writable_session("main")
    with pytest.raises(OutputError, match="not aligned"):
        outputs_store.write_window(session.store, slice(10, 30), slice(0, 20), out)
    with pytest.raises(OutputError, match="shape"):
        outputs_store.write_window(
            session.store, slice(0, 20), slice(0, 40), {"valid_obs": out["valid_obs"]}
        )
    with pytest.raises(OutputError, match="no map at"):
        MapRepo(str(tmp_path / "missing")).open_dataset()
    binary = schema.OutputGrid(
        **{**GRID.__dict__, "class_names": ("disturbance",), "multiclass": False}
    )
    session = _repo(tmp_path / "binary", binary).repo.writable_session("main")
    with pytest.raises(OutputError, match=r"no variable\(s\) \['class'\]"):
        outputs_store.write_window(
            session.store, slice(0, 20), slice(0, 20), {"class": out["class"]}
        )


def test_binary_store_has_no_class_variable(tmp_path):
    grid = schema.OutputGrid(
        **{**GRID.__dict__, "class_names": ("disturbance",), "multiclass": False}
    )
    assert grid.variables() == ("probability", "valid_obs", "last_obs_valid", "last_valid_date")
    repo = _repo(tmp_path / "out", grid)
    expected = _fill(repo, grid)
    ds = xr.open_zarr(repo.zarr_store(), group="0", consolidated=False, mask_and_scale=False)
    assert set(ds.data_vars) == {"probability", "valid_obs", "last_obs_valid", "last_valid_date"}
    assert ds.probability.shape == (1, 40, 80)
    np.testing.assert_array_equal(ds.probability.values, expected["probability"])
    cogs = cog.tile_cogs(str(tmp_path), repo.zarr_store(), REGIONS[0], grid)
    assert set(cogs) == set(grid.variables())


def test_create_store_twice_changes_nothing(repo):
    expected = _fill(repo)
    history = len(list(repo.repo.ancestry(branch="main")))
    assert repo.ensure_layout(GRID, {"model": "lstm.pt"}) == GRID
    assert repo.ensure_layout(GRID, {"model": "other.pt"}) == GRID  # attrs are the first run's
    assert len(list(repo.repo.ancestry(branch="main"))) == history  # no new commit
    np.testing.assert_array_equal(
        outputs_store.read_region(repo.zarr_store(), ALL, "class"), expected["class"]
    )


def test_store_grows_for_tiles_that_appear(repo):
    """Tiles to the east and south extend the map; nothing written so far moves."""
    expected = _fill(repo)
    bigger = schema.OutputGrid(**{**GRID.__dict__, "width": 120, "height": 60})
    grown = repo.ensure_layout(bigger, {})
    assert (grown.width, grown.height) == (120, 60) and repo.grid() == bigger
    ds = xr.open_zarr(repo.zarr_store(), group="0", consolidated=False, mask_and_scale=False)
    assert ds["class"].shape == (60, 120) and ds.x.values[-1] == GRID.transform[2] + 1195
    np.testing.assert_array_equal(ds["class"].values[:40, :80], expected["class"])
    assert (ds["class"].values[40:] == 255).all() and (ds["class"].values[:, 80:] == 255).all()
    assert repo.ensure_layout(GRID, {}) == bigger  # a smaller request keeps the bigger map


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"chunk": (40, 40)}, "chunk"),
        ({"class_names": ("Spruce", "Beech", "Oak")}, "class names"),
        ({"crs_wkt": CRS.from_epsg(25832).to_wkt()}, "CRS"),
        ({"transform": (10.0, 0.0, 0.0, 0.0, -10.0, 0.0)}, "transform"),
    ],
)
def test_create_store_incompatible_raises(repo, change, what):
    other = schema.OutputGrid(**{**GRID.__dict__, **change})
    with pytest.raises(OutputError, match=what) as info:
        repo.ensure_layout(other, {})
    assert repo.url in str(info.value) and "--output" in str(info.value)


def test_create_store_refuses_foreign_folder(tmp_path):
    foreign = tmp_path / "out" / "map.icechunk"
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("not a store")
    with pytest.raises(OutputError, match="not a treesits_dask map"):
        MapRepo(str(tmp_path / "out")).ensure_layout(GRID, {})
    assert (foreign / "notes.txt").read_text() == "not a store"


def test_grid_rejects_too_many_classes():
    with pytest.raises(OutputError, match="255"):
        schema.OutputGrid(**{**GRID.__dict__, "class_names": tuple(map(str, range(256)))})


# ----------------------------------------------------------------------------------------- COGs
def _check_cogs(output: Path, store: str, region: schema.TileRegion) -> None:
    expect_nodata = {
        "probability": "nan", "class": 255, "valid_obs": None, "last_obs_valid": 255,
        "last_valid_date": 0,
    }  # fmt: skip
    for var in schema.VARIABLES:
        path = output / "cog" / region.tile / f"{var}.tif"
        ok, errors, _ = cog_validate(str(path), quiet=True)
        assert ok, errors
        with rasterio.open(path) as src:
            assert src.crs.to_epsg() == 3035
            a, _, c, _, e, f = GRID.transform
            assert src.transform == Affine(a, 0, c + region.col_off * a, 0, e, f)
            assert src.compression is not None and src.compression.name in ("deflate", "zstd")
            assert src.block_shapes[0] == (16, 16) and src.overviews(1) == [2, 4]
            assert src.dtypes[0] == schema.DTYPES[var]
            if expect_nodata[var] == "nan":
                assert np.isnan(src.nodata)
            else:
                assert src.nodata == expect_nodata[var]
            assert src.descriptions == (CLASSES if var == "probability" else (var,))
            data = src.read()
        stored = outputs_store.read_region(store, region, var)
        np.testing.assert_array_equal(data.reshape(stored.shape), stored)


def test_write_tile_cogs_valid_and_equal_to_zarr(filled, tmp_path):
    store, _ = filled
    output = tmp_path / "out"
    for region in REGIONS:
        urls = cog.tile_cogs(str(output), store, region, GRID, tmp_dir=str(tmp_path))
        assert urls == {v: str(output / "cog" / region.tile / f"{v}.tif") for v in schema.VARIABLES}
        _check_cogs(output, store, region)
    with rasterio.open(output / "cog" / TILES[1] / "class.tif") as src:
        assert (src.read(1)[20:, 20:] == 255).all()  # the unwritten chunk is nodata in the COG too
    with rasterio.open(output / "cog" / TILES[0] / "probability.tif") as src:
        assert src.tags()["OVERVIEW_RESAMPLING"] == "AVERAGE"
    with rasterio.open(output / "cog" / TILES[0] / "class.tif") as src:
        assert src.tags()["OVERVIEW_RESAMPLING"] == "NEAREST"
    # nothing but the final files: no partial or temporary files left behind
    left = {p.name for p in (output / "cog" / TILES[0]).iterdir()}
    assert left == {f"{v}.tif" for v in schema.VARIABLES}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("treesits-")]


def test_write_tile_cogs_twice_is_byte_identical(filled, tmp_path):
    store, _ = filled
    output = tmp_path / "out"
    cog.tile_cogs(str(output), store, REGIONS[0], GRID)
    first = _tree_digest(output / "cog")
    time.sleep(1.1)  # a timestamp in the file would now differ
    cog.tile_cogs(str(output), store, REGIONS[0], GRID)
    assert _tree_digest(output / "cog") == first


def test_vrt_mosaic_reads_back_store_values(filled, tmp_path):
    store, expected = filled
    output = tmp_path / "out"
    for region in REGIONS:
        cog.tile_cogs(str(output), store, region, GRID)
    vrts = cog.write_mosaics(str(output), list(TILES))
    assert cog.mosaic_tiles(str(output)) == list(TILES)
    assert vrts == {v: str(output / "cog" / f"{v}.vrt") for v in schema.VARIABLES}
    text = (output / "cog" / "class.vrt").read_text()
    assert 'relativeToVRT="1"' in text and str(output) not in text
    moved = tmp_path / "moved"  # relative paths: the mosaic still works after moving the folder
    shutil.move(str(output), str(moved))
    for var in schema.VARIABLES:
        with rasterio.open(moved / "cog" / f"{var}.vrt") as src:
            assert (src.width, src.height) == (80, 40) and src.crs.to_epsg() == 3035
            assert src.transform == Affine(*GRID.transform)
            assert src.descriptions == (CLASSES if var == "probability" else (var,))
            assert src.count == (3 if var == "probability" else 1)
            assert src.dtypes[0] == schema.DTYPES[var]
            if var == "valid_obs":
                assert src.nodata is None
            elif var == "probability":
                assert np.isnan(src.nodata)
            else:
                assert src.nodata == schema.NODATA[var]
            data = src.read()
        np.testing.assert_array_equal(data.reshape(expected[var].shape), expected[var])


def test_write_mosaics_without_cogs_raises(tmp_path):
    with pytest.raises(OutputError, match="no tile COGs"):
        cog.write_mosaics(str(tmp_path), list(TILES))


def test_check_writable(tmp_path):
    out = tmp_path / "new" / "output"
    storage.check_writable(str(out))
    assert not (tmp_path / "new").exists()  # checked without creating anything
    afile = tmp_path / "afile"
    afile.write_text("a regular file")
    with pytest.raises(OutputError, match="afile/out") as info:
        storage.check_writable(str(afile / "out"))
    assert "--output" in str(info.value) and "is a file" in str(info.value)


@pytest.mark.parametrize(
    "url, remote",
    [
        ("/data/force/X0069_Y0043/20200302_LEVEL2_SEN2A_BOA.tif", False),
        ("relative/dir/file.tif", False),
        (Path("/data/force"), False),
        ("file:///data/force/a.tif", False),
        ("local://data/a.tif", False),
        ("C:\\data\\a.tif", False),  # a drive letter is not a protocol
        ("s3://bucket/force/a.tif", True),
        ("S3://bucket/a.tif", True),
        ("gs://bucket/a.tif", True),
        ("https://host/a.tif", True),
    ],
)
def test_is_remote(url, remote):
    assert storage.is_remote(url) is remote


# ------------------------------------------------------------------------------------------- S3
@pytest.mark.s3
def test_s3_round_trip(moto_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env = storage.s3_environment(endpoint_url=moto_endpoint, region="eu-central-1", environ={})
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    fs, _ = storage.get_fs("s3://outdir")
    fs.mkdir("outdir")
    output = "s3://outdir/run"
    storage.check_writable(output)
    assert not fs.ls("outdir")  # the probe is gone
    with pytest.raises(OutputError, match="no-such-bucket"):
        storage.check_writable("s3://no-such-bucket/run")
    repo = _repo(output)
    repo.ensure_layout(GRID, {})
    expected = _fill(repo)
    np.testing.assert_array_equal(
        outputs_store.read_region(repo.zarr_store(), ALL, "probability"), expected["probability"]
    )
    assert fs.find("outdir/run/map.icechunk")  # the repository lives on S3
    ds = xr.open_zarr(repo.zarr_store(), group="0", consolidated=False, mask_and_scale=False)
    assert ds.rio.crs.to_epsg() == 3035
    np.testing.assert_array_equal(ds["class"].values, expected["class"])
    for region in REGIONS:
        cog.tile_cogs(output, repo.zarr_store(), region, GRID)
    cog.write_mosaics(output, list(TILES))
    with rasterio.open("/vsis3/outdir/run/cog/valid_obs.vrt") as src:
        np.testing.assert_array_equal(src.read(1), expected["valid_obs"])
    assert not [p for p in fs.find("outdir/run/cog") if "partial" in p]


def test_manifests_are_split_by_tile(tmp_path):
    """A tile commit writes manifest shards of its own tile only: the bytes it writes do not
    grow with the number of tiles already in the map (without splitting, each commit rewrote
    every chunk reference of the arrays it touched)."""
    tile, side = 40, 3
    grid = schema.OutputGrid(
        crs_wkt=GRID.crs_wkt, transform=GRID.transform, width=side * tile, height=side * tile,
        chunk=(20, 20), class_names=CLASSES, multiclass=True,
    )  # fmt: skip
    written = {}
    for split in (True, False):
        out = tmp_path / f"split-{split}"
        repo = MapRepo(str(out))
        repo.ensure_layout(grid, {}, tile_px=(tile, tile) if split else None)
        rng = np.random.default_rng(0)
        manifests = out / "map.icechunk" / "manifests"
        sizes = []
        for k in range(side * side):
            r0, c0 = (k // side) * tile, (k % side) * tile
            session = repo.repo.writable_session("main")
            for r in range(r0, r0 + tile, 20):
                for c in range(c0, c0 + tile, 20):
                    outputs_store.write_window(
                        session.store, slice(r, r + 20), slice(c, c + 20), _window_outputs(rng)
                    )
            before = sum(p.stat().st_size for p in manifests.iterdir())
            session.commit(f"tile {k}")
            sizes.append(sum(p.stat().st_size for p in manifests.iterdir()) - before)
        written[split] = sizes
    assert written[True][-1] <= 1.2 * written[True][0], written[True]
    assert written[False][-1] > 5 * written[False][0], written[False]  # what splitting avoids
    split_config = MapRepo(str(tmp_path / "split-True")).repo.config.manifest.splitting
    assert split_config is not None


def test_manifest_shards_hold_several_tiles_on_a_grid_of_many(tmp_path, monkeypatch):
    """Icechunk 1.x compares every shard of an array with every other each time a window's fork
    is merged, so a grid of many tiles gets shards of k x k whole tiles, at most MAX_SHARDS per
    array, the fewest tiles that do it; a grid of few tiles keeps one shard per tile.  Two tiles
    of one shard committed by two sessions from the same snapshot (tiles in flight together)
    both end up in the map."""
    import math

    from treesits_dask.outputs.repo import MAX_SHARDS, shard_chunks

    assert shard_chunks(GRID, (40, 40)) == (2, 2)  # 1 x 2 tiles: a shard per tile
    national = schema.OutputGrid(
        crs_wkt=GRID.crs_wkt, transform=GRID.transform, width=70000, height=44000,
        chunk=(250, 250), class_names=CLASSES, multiclass=True,
    )  # fmt: skip

    def shards(rows, cols):
        return math.ceil(176 / rows) * math.ceil(280 / cols)

    rows, cols = shard_chunks(national, (1000, 1000))  # 70 x 44 tiles of 1000 px
    assert rows == cols and rows % 4 == 0  # whole tiles of 4 x 4 chunks
    assert shards(rows, cols) <= MAX_SHARDS < shards(rows - 4, cols - 4)
    assert shard_chunks(national, (3000, 3000)) == (12, 12)  # 24 x 15 tiles: a shard per tile

    # a grid of 6 x 6 tiles of 20 px (one chunk each) in shards of 2 x 2 tiles
    grid = schema.OutputGrid(
        crs_wkt=GRID.crs_wkt, transform=GRID.transform, width=120, height=120, chunk=(20, 20),
        class_names=CLASSES, multiclass=True,
    )  # fmt: skip
    repo = MapRepo(str(tmp_path / "out"))
    monkeypatch.setattr("treesits_dask.outputs.repo.MAX_SHARDS", 9)
    repo.ensure_layout(grid, {}, tile_px=(20, 20))
    sizes = repo.repo.config.manifest.splitting.split_sizes[0][1]
    assert [size for _, size in sizes] == [2, 2]
    rng = np.random.default_rng(1)
    windows = {(0, 0): _window_outputs(rng), (0, 20): _window_outputs(rng)}  # one shard
    sessions = [repo.repo.writable_session("main") for _ in windows]
    for session, ((r, c), values) in zip(sessions, windows.items(), strict=True):
        fork = session.fork()
        outputs_store.write_window(fork.store, slice(r, r + 20), slice(c, c + 20), values)
        session.merge(fork)
    for k, session in enumerate(sessions):
        MapRepo.commit_tile(session, [], f"T{k}", {"tile": k}, {})
    stored = outputs_store.data_group(repo.zarr_store())
    for (r, c), values in windows.items():
        np.testing.assert_array_equal(stored["class"][r : r + 20, c : c + 20], values["class"])
