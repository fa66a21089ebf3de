"""Forest masks from ESA WorldCover: ids, index, grids, masks built from the real N00E006 tile."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin
from rasterio.warp import Resampling, reproject, transform
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from treesits_dask.errors import MaskError
from treesits_dask.io.discovery import read_cube_definition
from treesits_dask.io.worldcover import (
    WORLDCOVER_NAME,
    MaskGrid,
    build_masks,
    build_tile_mask,
    force_tile_grid,
    ids_covering,
    index_worldcover,
    lazy_tile_mask,
    mask_window,
    tile_lonlat_bounds,
    worldcover_id,
)

from .helpers import write_scene

WORLDCOVER_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "worldcover"
REAL = WORLDCOVER_DIR / "ESA_WorldCover_10m_2021_v200_N00E006_Map.tif"
UTM32N = CRS.from_epsg(32632)
TILE = "X0000_Y0000"
# upper-left of X0000_Y0000: a 3 x 3 km tile on the north-east coast of Sao Tome (trees, town, sea)
SAO_TOME_ORIGIN = (246000.0, 38000.0)
# a tile at ~0.33 N that crosses 6 E, i.e. WorldCover N00E003 | N00E006
STRADDLE_ORIGIN = (164500.0, 40000.0)


def write_prj(root: Path, origin: tuple[float, float], tile_size: float = 3000.0) -> str:
    """A FORCE cube root in UTM 32N (new ``KEY = value`` .prj format) with an empty tile folder."""
    lon, lat = transform(UTM32N, "EPSG:4326", [origin[0]], [origin[1]])
    (root / TILE).mkdir(parents=True, exist_ok=True)
    (root / "datacube-definition.prj").write_text(
        f"PROJECTION = {UTM32N.to_wkt()}\nORIGIN_GEO_X = {lon[0]}\nORIGIN_GEO_Y = {lat[0]}\n"
        f"ORIGIN_MAP_X = {origin[0]}\nORIGIN_MAP_Y = {origin[1]}\n"
        f"TILE_SIZE_X = {tile_size}\nTILE_SIZE_Y = {tile_size}\n"
    )
    return str(root)


def write_fake_worldcover(
    folder: Path, wid: str, seed: int, year: int = 2021, version: str = "v200"
) -> Path:
    """A WorldCover-named 3 x 3 degree file, 1/400 degree pixels, classes 10/30/80, nodata 0."""
    m = WORLDCOVER_NAME.match(f"ESA_WorldCover_10m_{year}_{version}_{wid}_Map.tif")
    lat = int(m["lat"]) * (1 if m["ns"] == "N" else -1)
    lon = int(m["lon"]) * (1 if m["ew"] == "E" else -1)
    n = 1200
    data = np.random.default_rng(seed).choice(np.array([0, 10, 10, 30, 80], np.uint8), size=(n, n))
    path = folder / m.string
    with rasterio.open(
        path, "w", driver="GTiff", width=n, height=n, count=1, dtype="uint8", nodata=0,
        crs="EPSG:4326", transform=from_origin(lon, lat + 3, 3 / n, 3 / n), tiled=True,
        compress="deflate",
    ) as dst:  # fmt: skip
        dst.write(data, 1)
    return path


def source_positions(source: Path, grid: MaskGrid) -> tuple[np.ndarray, np.ndarray]:
    """Fractional (col, row) in ``source`` of each pixel centre of ``grid``, transformed by PROJ."""
    cols, rows = np.meshgrid(np.arange(grid.width) + 0.5, np.arange(grid.height) + 0.5)
    xs, ys = grid.affine @ (cols.ravel(), rows.ravel())
    with rasterio.open(source) as src:
        lon, lat = transform(UTM32N, src.crs, xs, ys)
        c, r = ~src.transform @ (np.asarray(lon), np.asarray(lat))
    return c.reshape(grid.height, grid.width), r.reshape(grid.height, grid.width)


def exact_nearest(source: Path, grid: MaskGrid) -> np.ndarray:
    """Independent oracle: the source value under each pixel centre (floor of its exact spot)."""
    c, r = (np.floor(a).astype(int) for a in source_positions(source, grid))
    out = np.zeros(c.shape, np.uint8)
    with rasterio.open(source) as src:
        inside = (c >= 0) & (r >= 0) & (c < src.width) & (r < src.height)
        if inside.any():
            r0, c0 = r[inside].min(), c[inside].min()
            window = Window(c0, r0, c[inside].max() - c0 + 1, r[inside].max() - r0 + 1)
            block = src.read(1, window=window)
            out[inside] = block[r[inside] - r0, c[inside] - c0]
    return out


def reproject_whole_tile(source: Path, grid: MaskGrid) -> np.ndarray:
    """GDAL's default warp (gdalwarp -r near, error threshold 0.125 px) of the whole tile."""
    out = np.zeros((grid.height, grid.width), np.uint8)
    with rasterio.open(source) as src:
        reproject(
            rasterio.band(src, 1), out, dst_transform=grid.affine, dst_crs=UTM32N,
            resampling=Resampling.nearest,
        )  # fmt: skip
    return out


def read_mask(url: str) -> tuple[np.ndarray, dict]:
    with rasterio.open(url) as src:
        return src.read(1), {"profile": src.profile, "overviews": src.overviews(1), "crs": src.crs}


# ---------------------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "corner, wid",
    [((0, 6), "N00E006"), ((-3, -60), "S03W060"), ((51, -3), "N51W003"), ((-36, 174), "S36E174"),
     ((0, 0), "N00E000"), ((-90, -180), "S90W180")],
)  # fmt: skip
def test_worldcover_id_in_all_hemispheres(corner, wid):
    assert worldcover_id(*corner) == wid
    m = WORLDCOVER_NAME.match(f"ESA_WorldCover_10m_2021_v200_{wid}_Map.tif")
    sign_lat, sign_lon = (1 if m["ns"] == "N" else -1), (1 if m["ew"] == "E" else -1)
    assert (sign_lat * int(m["lat"]), sign_lon * int(m["lon"])) == corner


def test_worldcover_id_rejects_a_non_corner():
    with pytest.raises(MaskError, match="south-west corner"):
        worldcover_id(1, 6)


def test_ids_covering_crosses_tile_boundaries_in_every_direction():
    assert ids_covering((6.5, 0.2, 6.7, 0.4)) == ["N00E006"]
    assert sorted(ids_covering((5.9, -0.1, 6.1, 0.1))) == [
        "N00E003",
        "N00E006",
        "S03E003",
        "S03E006",
    ]
    assert sorted(ids_covering((-0.5, 50.0, 0.5, 51.0))) == ["N48E000", "N48W003"]
    assert sorted(ids_covering((-61.0, -2.5, -59.5, -1.0))) == ["S03W060", "S03W063"]
    # edges that only touch a neighbour do not select it
    assert ids_covering((6.0, 0.0, 9.0, 3.0)) == ["N00E006"]
    # west > east: the box crosses the antimeridian
    assert sorted(ids_covering((179.0, -1.0, -179.0, 1.0))) == [
        "N00E177",
        "N00W180",
        "S03E177",
        "S03W180",
    ]


def test_index_lists_a_folder_and_keeps_the_newest_version(tmp_path):
    for name in (
        "ESA_WorldCover_10m_2020_v100_N00E006_Map.tif",
        "ESA_WorldCover_10m_2021_v200_N00E006_Map.tif",
        "ESA_WorldCover_10m_2021_v100_S03W060_Map.tif",
        "ESA_WorldCover_10m_2020_v200_S03W060_Map.tif",
        "ESA_WorldCover_10m_2021_v200_N00E006_Map.tif.aux.xml",
        "ESA_WorldCover_10m_2021_v200_N00E006_InputQuality.tif",
        "notes.txt",
    ):
        (tmp_path / name).write_bytes(b"")
    index = index_worldcover(str(tmp_path))
    assert index == {
        "N00E006": str(tmp_path / "ESA_WorldCover_10m_2021_v200_N00E006_Map.tif"),
        "S03W060": str(tmp_path / "ESA_WorldCover_10m_2021_v100_S03W060_Map.tif"),
    }
    assert index_worldcover(str(WORLDCOVER_DIR)) == {"N00E006": str(REAL)}
    with pytest.raises(MaskError, match="does not exist"):
        index_worldcover(str(tmp_path / "missing"))


def test_force_tile_grid_follows_the_cube_definition(tmp_path):
    definition = read_cube_definition(write_prj(tmp_path, SAO_TOME_ORIGIN))
    grid = force_tile_grid(definition, "X0002_Y0001", 20.0)
    assert (grid.width, grid.height) == (150, 150)
    assert grid.transform == (20.0, 0.0, 246000.0 + 6000.0, 0.0, -20.0, 38000.0 - 3000.0)
    assert grid.bounds == definition.tile_bounds("X0002_Y0001")
    west, south, east, north = tile_lonlat_bounds(force_tile_grid(definition, TILE))
    assert 6.7 < west < east < 6.8 and 0.3 < south < north < 0.4
    with pytest.raises(MaskError, match="TILE_SIZE_X"):
        force_tile_grid(definition, TILE, 7.0)


# ----------------------------------------------------------------- masks from the real tile


@pytest.fixture(scope="module")
def sao_tome(tmp_path_factory):
    """Cube root, mask folder, masks built from the real WorldCover file (100 px windows), grid."""
    root = tmp_path_factory.mktemp("wc")
    cube = write_prj(root / "cube", SAO_TOME_ORIGIN)
    masks = build_masks(str(WORLDCOVER_DIR), cube, [TILE], str(root / "masks"), window=100)
    grid = force_tile_grid(read_cube_definition(cube), TILE)
    return cube, str(root / "masks"), masks, grid


def test_mask_from_real_worldcover_is_nearest_class_10(sao_tome):
    _, mask_dir, masks, grid = sao_tome
    assert masks == {TILE: os.path.join(mask_dir, TILE, "mask.tif")}
    mask, _ = read_mask(masks[TILE])
    assert mask.shape == (300, 300) and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1} and 0.1 < mask.mean() < 0.9
    # pixel for pixel the nearest WorldCover class (exact transformer), windows included
    classes = exact_nearest(REAL, grid)
    assert {10, 50, 80} <= set(np.unique(classes))  # trees, built-up and sea in this tile
    np.testing.assert_array_equal(mask, (classes == 10).astype(np.uint8))


def test_mask_matches_a_whole_tile_gdal_warp_up_to_its_linear_approximation(sao_tome):
    _, _, masks, grid = sao_tome
    mask, _ = read_mask(masks[TILE])
    warped = reproject_whole_tile(REAL, grid)
    differ = mask != (warped == 10)
    # gdalwarp's default transformer interpolates linearly (error <= 0.125 source px): it may only
    # disagree where the exact source position lies within 0.125 px of a source pixel edge
    assert differ.sum() <= 0.001 * mask.size
    fc, fr = source_positions(REAL, grid)
    edge = np.minimum(np.abs(fc - np.round(fc)), np.abs(fr - np.round(fr)))
    assert (edge[differ] < 0.125).all()


def test_mask_cog_is_valid_uint8_without_nodata(sao_tome):
    _, _, masks, grid = sao_tome
    ok, errors, _ = cog_validate(masks[TILE], quiet=True)
    assert ok, errors
    _, info = read_mask(masks[TILE])
    prof = info["profile"]
    assert prof["dtype"] == "uint8" and prof["nodata"] is None and prof["compress"] == "deflate"
    assert prof["tiled"] and info["overviews"] and info["crs"] == UTM32N
    assert tuple(prof["transform"])[:6] == grid.transform


def test_any_window_shape_gives_the_same_mask(sao_tome):
    _, _, masks, grid = sao_tome
    mask, _ = read_mask(masks[TILE])
    whole = mask_window([str(REAL)], grid, (0, 0, grid.height, grid.width), {10})
    np.testing.assert_array_equal(whole, mask)
    odd = lazy_tile_mask([str(REAL)], grid, {10}, window=(37, 53))
    assert odd.numblocks == (9, 6)
    np.testing.assert_array_equal(odd.compute(scheduler="sync"), mask)
    # other classes: 80 (water) is disjoint from tree cover
    water = mask_window([str(REAL)], grid, (50, 150, 120, 100), {80})
    assert water.any() and not (water & mask[50:170, 150:250]).any()


def test_existing_masks_are_skipped_unless_overwrite(sao_tome):
    cube, mask_dir, masks, _ = sao_tome
    url = masks[TILE]
    os.utime(url, ns=(1_000_000_000, 1_000_000_000))
    assert build_masks(str(WORLDCOVER_DIR), cube, [TILE], mask_dir) == masks
    assert os.stat(url).st_mtime_ns == 1_000_000_000
    assert (
        build_masks(str(WORLDCOVER_DIR), cube, TILE, mask_dir, overwrite=True, window=150) == masks
    )
    assert os.stat(url).st_mtime_ns != 1_000_000_000
    assert cog_validate(url, quiet=True)[0]


def test_tile_without_worldcover_file_names_tile_and_ids(sao_tome, tmp_path):
    cube, *_ = sao_tome
    with pytest.raises(MaskError) as err:  # 100 tiles east: ~9.4 E, needs N00E009
        build_masks(str(WORLDCOVER_DIR), cube, ["X0100_Y0000"], str(tmp_path))
    assert (
        "X0100_Y0000" in str(err.value)
        and "N00E009" in str(err.value)
        and str(WORLDCOVER_DIR) in str(err.value)
    )
    assert not (tmp_path / "X0100_Y0000").exists()


def test_unreadable_source_is_a_mask_error(tmp_path, sao_tome):
    *_, grid = sao_tome
    with pytest.raises(MaskError, match="missing_Map.tif"):
        mask_window([str(tmp_path / "missing_Map.tif")], grid, (0, 0, 10, 10), {10})


def test_resolution_comes_from_the_first_boa(tmp_path):
    cube = write_prj(tmp_path / "cube", SAO_TOME_ORIGIN)
    boa = np.full((10, 100, 100), 500, np.int16)
    write_scene(
        Path(cube),
        TILE,
        dt.date(2021, 6, 1),
        boa,
        transform=from_origin(*SAO_TOME_ORIGIN, 30, 30),
        crs=UTM32N,
    )
    masks = build_masks(str(WORLDCOVER_DIR), cube, [TILE], str(tmp_path / "masks"))
    with rasterio.open(masks[TILE]) as src:
        assert (src.width, src.height) == (100, 100)
        assert src.transform == from_origin(*SAO_TOME_ORIGIN, 30, 30)
        assert set(np.unique(src.read(1))) == {0, 1}


# ------------------------------------------------------------------- straddling two ids


def test_tile_straddling_two_ids_ors_them(tmp_path):
    folder = tmp_path / "worldcover"
    folder.mkdir()
    (folder / REAL.name).symlink_to(REAL)
    fake = write_fake_worldcover(folder, "N00E003", seed=1)
    cube = write_prj(tmp_path / "cube", STRADDLE_ORIGIN)
    grid = force_tile_grid(read_cube_definition(cube), TILE)
    west, _, east, _ = tile_lonlat_bounds(grid)
    assert west < 6.0 < east and ids_covering(tile_lonlat_bounds(grid)) == ["N00E003", "N00E006"]

    masks = build_masks(str(folder), cube, [TILE], str(tmp_path / "masks"), window=100)
    mask, _ = read_mask(masks[TILE])
    from_fake, from_real = (exact_nearest(p, grid) == 10 for p in (fake, REAL))
    np.testing.assert_array_equal(mask, (from_fake | from_real).astype(np.uint8))
    assert from_fake.any() and (mask[~from_real] == 1).any()  # the neighbour contributes
    # pixels east of 6 E are never taken from the N00E003 file
    cols = np.arange(grid.width) + 0.5
    lon, _ = transform(
        UTM32N, "EPSG:4326", grid.affine.c + 10 * cols, np.full(cols.shape, grid.affine.f - 1500)
    )
    assert (
        not from_fake[:, np.asarray(lon) > 6.001].any()
        and from_fake[:, np.asarray(lon) < 5.999].any()
    )


def test_or_of_two_sources_that_both_hold_trees(tmp_path):
    west_file = write_fake_worldcover(tmp_path, "N00E003", seed=2)
    east_file = write_fake_worldcover(tmp_path, "N00E006", seed=3)
    cube = write_prj(tmp_path / "cube", STRADDLE_ORIGIN)
    grid = force_tile_grid(read_cube_definition(cube), TILE)
    got = mask_window([str(west_file), str(east_file)], grid, (0, 0, grid.height, grid.width), {10})
    a, b = (exact_nearest(p, grid) == 10 for p in (west_file, east_file))
    assert a.any() and b.any() and not (a & b).any()
    np.testing.assert_array_equal(got, (a | b).astype(np.uint8))
    only_west = mask_window([str(west_file)], grid, (100, 0, 100, 300), {10})
    np.testing.assert_array_equal(only_west, a[100:200].astype(np.uint8))


# ------------------------------------------------------------------------------- on Dask


def test_build_tile_mask_runs_one_task_per_window_on_a_local_cluster(sao_tome, tmp_path):
    from distributed import Client, LocalCluster, get_task_stream

    _, _, masks, grid = sao_tome
    expected, _ = read_mask(masks[TILE])
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
        get_task_stream(client) as stream,
    ):
        out = build_tile_mask(
            [str(REAL)], grid, str(tmp_path / "m" / "mask.tif"), window=100, client=client
        )
    window_tasks = [t for t in stream.data if t["key"][0].startswith("worldcover-mask-")]
    assert len(window_tasks) == 9
    got, _ = read_mask(out)
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------------------------- S3


@pytest.mark.s3
def test_worldcover_on_s3_and_masks_to_s3(s3_env, sao_tome):
    from treesits_dask.io import storage

    cube, _, local_masks, _ = sao_tome
    fs, _ = storage.get_fs("s3://worldcover")
    fs.mkdir("worldcover")
    fs.mkdir("masks")
    fs.put_file(str(REAL), f"worldcover/{REAL.name}")
    fs.pipe_file("worldcover/README.txt", b"not a map")
    assert index_worldcover("s3://worldcover/") == {"N00E006": f"s3://worldcover/{REAL.name}"}

    masks = build_masks("s3://worldcover", cube, [TILE], "s3://masks/v1", window=150)
    assert masks == {TILE: f"s3://masks/v1/{TILE}/mask.tif"}
    assert fs.ls("masks/v1/X0000_Y0000", detail=False) == ["masks/v1/X0000_Y0000/mask.tif"]
    with rasterio.open(storage.gdal_path(masks[TILE])) as src:
        np.testing.assert_array_equal(src.read(1), read_mask(local_masks[TILE])[0])


def test_mask_equals_an_exact_gdal_warp_pixel_for_pixel(sao_tome):
    """GDAL's own warp with nearest resampling and the exact transformer
    (``gdalwarp -r near -et 0``) of the whole tile gives the same mask, except where a pixel centre
    falls within 1e-3 source px of a source pixel edge (2 of 90000 pixels here)."""
    _, _, masks, grid = sao_tome
    mask, _ = read_mask(masks[TILE])
    warped = np.zeros((grid.height, grid.width), np.uint8)
    with rasterio.open(REAL) as src:
        reproject(
            rasterio.band(src, 1), warped, dst_transform=grid.affine, dst_crs=UTM32N,
            resampling=Resampling.nearest, tolerance=0,
        )  # fmt: skip
    assert (warped == 10).any() and (warped != 10).any()
    differ = mask != (warped == 10)
    fc, fr = source_positions(REAL, grid)
    edge = np.minimum(np.abs(fc - np.round(fc)), np.abs(fr - np.round(fr)))
    # the two computations of a pixel centre's source position (PROJ here, GDAL's transformer there)
    # agree to about 1e-3 source px (~0.3 m); only centres that close to a source edge may differ
    assert differ.sum() <= 1e-4 * mask.size, int(differ.sum())
    assert (edge[differ] < 1e-3).all(), edge[differ]
