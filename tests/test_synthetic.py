"""The synthetic FORCE cube generator: names, .prj formats, file profiles, QAI, content,
determinism."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import rasterio

from treesits_dask.errors import ConfigError
from treesits_dask.io import discovery
from treesits_dask.synthetic import SPECIES, make_cube, sample_pixels

TILES = ("X0069_Y0043", "X0070_Y0044")
ORIGIN_X, ORIGIN_Y = 2456026.363042, 4574919.607965


def _read(path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


def _qai_u16(path) -> np.ndarray:
    return _read(path)[0].view(np.uint16)


@pytest.fixture(scope="module")
def strips(tmp_path_factory):
    root = tmp_path_factory.mktemp("strips")
    return make_cube(root / "cube", tiles=TILES, size=64, n_scenes=8, seed=1)


@pytest.fixture(scope="module")
def cog(tmp_path_factory):
    root = tmp_path_factory.mktemp("cog")
    return make_cube(
        root / "cube",
        size=300,
        n_scenes=2,
        layout="cog",
        prj_format="new",
        cloud_fraction=0.0,
        mask_dir=str(root / "m"),
        truth_dir=str(root / "t"),
        seed=2,
    )


@pytest.fixture(scope="module")
def clear_year(tmp_path_factory):
    """One clear-sky year, for the phenology checks."""
    root = tmp_path_factory.mktemp("year")
    return make_cube(
        root / "cube",
        size=64,
        n_scenes=14,
        start="2021-01-01",
        end="2021-12-31",
        cloud_fraction=0.0,
        forest_fraction=1.0,
        seed=5,
    )


def test_names_dates_and_discovery(strips):
    assert strips.tiles == TILES and strips.class_names == SPECIES
    assert len(strips.dates) == 8 and list(strips.dates) == sorted(set(strips.dates))
    assert all(dt.date(2020, 3, 1) <= d <= dt.date(2023, 8, 30) for d in strips.dates)
    gaps = {(b - a).days for a, b in zip(strips.dates, strips.dates[1:], strict=False)}
    assert len(gaps) > 1  # irregular
    # what sits next to the tiles of a real cube: a tile list and force-mosaic's VRTs
    assert (Path(strips.root) / "tiles.txt").read_text().splitlines() == ["2", *TILES]
    assert list((Path(strips.root) / "mosaic").glob("*_BOA.vrt"))
    assert discovery.list_tiles(strips.root) == sorted(TILES)
    for tile in TILES:
        files = sorted(p.name for p in (Path(strips.root) / tile).iterdir())
        assert all(discovery.FORCE_NAME.match(f) for f in files if not f.endswith(".aux.xml"))
        products = {discovery.parse_scene_name(f)["product"] for f in files if f.endswith(".tif")}
        assert products == {"BOA", "QAI", "CLD", "HOT", "VZN", "AOD", "WVP", "DST"}
        assert any(f.endswith("_OVV.jpg") for f in files)
        assert any(f.endswith("_BOA.tif.aux.xml") for f in files)
        assert any("_LEVEL2_LND08_BOA.tif" in f for f in files)
        skipped = Counter()
        scenes = discovery.scene_table(strips.root, tile, skipped=skipped)
        assert skipped == {
            **{f"{p} files": 1 for p in ("AOD", "CLD", "DST", "HOT", "VZN", "WVP", "OVV")},
            "LND08 scenes (not in sensors)": 1,
            "not FORCE Level-2 files": 1,
        }, skipped
        assert [s.date for s in scenes] == list(strips.dates)
        assert [s.sensor for s in scenes] == ["SEN2A", "SEN2B", "SEN2C"] * 2 + ["SEN2A", "SEN2B"]
        assert all(s.boa.endswith("_BOA.tif") and s.qai and Path(s.qai).is_file() for s in scenes)


@pytest.mark.parametrize("fixture, block", [("strips", 64.0), ("cog", None)])
def test_prj_formats_and_tile_bounds(fixture, block, request):
    cube = request.getfixturevalue(fixture)
    size = 64 if fixture == "strips" else 300
    text = (Path(cube.root) / "datacube-definition.prj").read_text()
    assert ("PROJECTION = " in text) == (fixture == "cog")
    assert len(text.splitlines()) == 7
    d = discovery.read_cube_definition(cube.root)
    assert rasterio.crs.CRS.from_wkt(d.crs_wkt).to_epsg() == 3035
    assert (d.origin_lon, d.origin_lat) == (-25.0, 60.0)
    assert d.origin_x == pytest.approx(ORIGIN_X) and d.origin_y == pytest.approx(ORIGIN_Y)
    assert d.tile_size_x == d.tile_size_y == size * 10
    assert d.block_size == (pytest.approx(block) if block else None)
    tile = cube.tiles[-1]
    tx, ty = discovery.parse_tile_id(tile)
    left, top = ORIGIN_X + tx * size * 10, ORIGIN_Y - ty * size * 10
    assert d.tile_bounds(tile) == pytest.approx((left, top - size * 10, left + size * 10, top))
    assert d.tile_of(left + 5, top - 5) == tile


def test_strip_profile(strips):
    d = discovery.read_cube_definition(strips.root)
    for tile in TILES:
        scene = discovery.scene_table(strips.root, tile)[0]
        with rasterio.open(scene.boa) as src:
            assert (src.count, src.width, src.height) == (10, 64, 64)
            assert set(src.dtypes) == {"int16"} and src.nodata == -9999
            assert src.descriptions == discovery.S2_BANDS
            assert src.crs.to_epsg() == 3035
            assert src.block_shapes == [(6, 64)] * 10  # full-width strips of size // 10 rows
            assert src.profile["compress"] == "lzw" and src.profile["interleave"] == "band"
            assert src.tags(ns="IMAGE_STRUCTURE")["PREDICTOR"] == "2"
            assert (src.transform.c, src.transform.f) == pytest.approx(d.tile_origin(tile))
            assert (src.transform.a, src.transform.e) == (10.0, -10.0)
        assert Path(scene.boa).read_bytes()[:4] == b"II+\x00"  # BigTIFF
        with rasterio.open(scene.qai) as src:
            assert (src.count, src.dtypes[0], src.block_shapes) == (1, "int16", [(6, 64)])
            assert src.transform == rasterio.open(scene.boa).transform


def test_cog_profile_and_cube_grid(cog):
    from treesits_dask.io.cube import tile_grid

    d = discovery.read_cube_definition(cog.root)
    scenes = discovery.scene_table(cog.root, cog.tiles[0])
    assert len(scenes) == 2
    for scene in scenes:
        for path, count in ((scene.boa, 10), (scene.qai, 1)):
            with rasterio.open(path) as src:
                assert (src.count, src.width, src.dtypes[0]) == (count, 300, "int16")
                assert src.block_shapes[0] == (256, 256)  # 256 does not divide 300
                assert src.profile["compress"] == "zstd"
                assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
    grid = tile_grid(d, scenes[0])
    assert (grid.width, grid.height, grid.block_shape) == (300, 300, (256, 256))
    assert Path(cog.mask_dir).name == "m" and Path(cog.truth_dir).name == "t"


def test_qai_consistent_with_boa(strips):
    seen = {"buffer": 0, "cirrus": 0, "shadow": 0, "full": 0}
    for tile in TILES:
        for scene in discovery.scene_table(strips.root, tile):
            boa, q = _read(scene.boa), _qai_u16(scene.qai)
            nodata = boa == -9999
            np.testing.assert_array_equal(
                nodata.any(axis=0), nodata.all(axis=0)
            )  # all bands or none
            np.testing.assert_array_equal(nodata[0], (q & 1) == 1)  # QAI nodata bit <=> BOA nodata
            cloud = (q >> 1) & 3
            assert nodata[0][cloud == 2].all()  # opaque core is -9999
            for name, value in (("buffer", 1), ("cirrus", 3)):
                assert not nodata[0][cloud == value].any()  # flagged only, BOA still there
                seen[name] += int((cloud == value).sum())
            shadow = ((q >> 3) & 1) == 1
            assert not nodata[0][shadow].any() and not (shadow & (cloud != 0)).any()
            seen["shadow"] += int(shadow.sum())
            subzero = ((q >> 8) & 1) == 1
            np.testing.assert_array_equal(subzero, (boa < 0).any(axis=0) & ~nodata[0])
            if (((q >> 4) & 1) == 1).any():  # snow only in winter
                assert scene.date.month in (12, 1, 2, 3)
            seen["full"] += bool(nodata.all())
            if 0 < cloud.mean() < 1 and shadow.any():  # shadows are darker than the clear pixels
                clear = (q & 0b11111) == 0
                assert boa[7][shadow].mean() < boa[7][clear].mean()
    assert all(v > 0 for v in seen.values()), seen


def test_cloud_fraction(tmp_path):
    cube = make_cube(
        tmp_path / "c" / "cube", size=48, n_scenes=30, cloud_fraction=0.3, seed=4, with_masks=False
    )
    flagged = []
    for scene in discovery.scene_table(cube.root, cube.tiles[0]):
        q = _qai_u16(scene.qai)
        flagged.append(((((q >> 1) & 3) != 0) | (((q >> 3) & 1) == 1)).mean())
    assert 0.15 < np.mean(flagged) < 0.45
    assert not Path(cube.mask_dir).exists()
    clear = make_cube(
        tmp_path / "d" / "cube", size=32, n_scenes=5, cloud_fraction=0.0, write_qai=False, seed=4
    )
    scenes = discovery.scene_table(clear.root, clear.tiles[0])
    assert all(s.qai is None for s in scenes)
    assert all((_read(s.boa) != -9999).any() for s in scenes)


def test_deterministic(tmp_path):
    kw = {"tiles": ("X0001_Y0002",), "size": 40, "n_scenes": 6, "seed": 7}
    a = make_cube(tmp_path / "a" / "cube", **kw)
    b = make_cube(tmp_path / "b" / "cube", **kw)
    c = make_cube(tmp_path / "c" / "cube", **{**kw, "seed": 8})
    assert a.dates == b.dates
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    # prj, BOA + QAI, what else FORCE writes into a tile folder (OVV, 6 products, .aux.xml, a
    # Landsat BOA + QAI), truth (species, disturbance dates) + mask, and next to the tiles a tile
    # list + a mosaic VRT
    assert len(files) == 1 + 2 * 6 + 10 + 3 + 2
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert not np.array_equal(a.truth("X0001_Y0002"), c.truth("X0001_Y0002"))


@pytest.mark.parametrize("layout", ["strips", "cog"])
def test_parallel_processes_write_the_same_bytes(tmp_path, layout):
    """Big tiles are written by several processes (each scene from its own generator): the files
    are those a serial run writes, clear-cuts included."""
    from treesits_dask.synthetic import ClearCut

    cut = ClearCut("X0001_Y0002", dt.date(2022, 6, 1), 5, 5, 30, 30)
    kw = {"tiles": ("X0001_Y0002",), "size": 48, "n_scenes": 5, "seed": 9, "layout": layout}
    kw["clear_cuts"] = (cut,)
    make_cube(tmp_path / "serial" / "cube", processes=1, **kw)
    make_cube(tmp_path / "parallel" / "cube", processes=2, **kw)
    files = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial").rglob("*.tif"))
    assert len(files) == 2 * 5 + 6 + 2 + 3  # scenes, other products, Landsat, truths + mask
    for rel in files:
        assert (tmp_path / "serial" / rel).read_bytes() == (
            tmp_path / "parallel" / rel
        ).read_bytes(), rel


def test_warns_about_stale_scenes(tmp_path, caplog):
    make_cube(tmp_path / "cube", size=32, n_scenes=3, seed=1)
    with caplog.at_level("WARNING", logger="treesits_dask.synthetic"):
        make_cube(tmp_path / "cube", size=32, n_scenes=3, seed=1)  # same scenes: silent
        assert not caplog.records
        make_cube(tmp_path / "cube", size=32, n_scenes=3, seed=2)
    assert "BOA files that this synthetic cube does not contain" in caplog.text


def test_forest_truth_and_masks(strips, tmp_path):
    for tile in TILES:
        truth = strips.truth(tile)
        assert truth.dtype == np.uint8 and truth.shape == (64, 64)
        assert set(np.unique(truth)) <= {0, 1, 2, 3, 4, 255}
        forest = strips.forest(tile)
        assert forest.mean() == pytest.approx(0.6, abs=0.01)
        mask = _read(Path(strips.mask_dir) / tile / "mask.tif")[0]
        assert mask.dtype == np.uint8
        np.testing.assert_array_equal(mask == 1, forest)
        # coherent stands, not salt and pepper:
        # most forest neighbours are forest of the same species
        same = (truth[:, 1:] == truth[:, :-1])[forest[:, 1:] & forest[:, :-1]]
        assert (forest[:, 1:] & forest[:, :-1]).sum() > 0.8 * forest[:, 1:].sum()
        assert same.mean() > 0.7  # independent pixels would give about 0.2
    assert not np.array_equal(strips.truth(TILES[0]), strips.truth(TILES[1]))
    sparse = make_cube(tmp_path / "c", size=50, n_scenes=1, forest_fraction=0.1, seed=1)
    assert sparse.forest(sparse.tiles[0]).mean() == pytest.approx(0.1, abs=0.01)


def test_species_phenology_differs(clear_year):
    tile = clear_year.tiles[0]
    truth = clear_year.truth(tile)
    assert (truth != 255).all()
    nir = {k: [] for k in range(5)}
    months = []
    for scene in discovery.scene_table(clear_year.root, tile):
        band = _read(scene.boa)[7].astype(float)  # NIR (B8A)
        ok = ((_qai_u16(scene.qai) & 0b11111) == 0) & (band != -9999)
        for k, series in nir.items():
            series.append(band[ok & (truth == k)].mean())
        months.append(scene.date.month)
    nir = {k: np.array(v) for k, v in nir.items()}
    summer = np.isin(months, [6, 7, 8])
    winter = np.isin(months, [1, 2, 11, 12])
    assert summer.any() and winter.any()
    spruce, beech, oak = nir[0], nir[1], nir[4]
    assert (beech[summer] - spruce[summer]).min() > 1000  # deciduous summer NIR peak
    assert beech[summer].mean() - beech[winter].mean() > 1500  # ... and winter drop
    assert abs(spruce[summer].mean() - spruce[winter].mean()) < 800  # evergreen: flatter
    assert beech[summer].mean() - oak[summer].mean() > 300
    assert np.abs(nir[2] - nir[3]).max() > 300  # Pine vs Douglas fir


def test_sample_pixels(strips):
    tile = TILES[0]
    truth = strips.truth(tile)
    rows, cols, labels = sample_pixels(strips, tile, n_per_class=20, seed=3)
    counts = np.bincount(labels, minlength=5)
    expected = np.minimum(np.bincount(truth[truth != 255], minlength=5), 20)
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(truth[rows, cols], labels)
    assert len(set(zip(rows.tolist(), cols.tolist(), strict=True))) == len(rows)  # no duplicates
    again = sample_pixels(strips, tile, n_per_class=20, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip((rows, cols, labels), again, strict=True))
    everything = sample_pixels(strips, tile, n_per_class=10**6)[2]
    assert everything.size == (truth != 255).sum()


@pytest.mark.parametrize("kwargs, match", [
    ({"layout": "tiles"}, "layout"),
    ({"prj_format": "xml"}, "prj_format"),
    ({"n_scenes": 20, "start": "2021-01-01", "end": "2021-01-10"}, "n_scenes"),
    ({"cloud_fraction": 1.5}, "cloud_fraction"),
    ({"sensors": ("LND08",)}, "Sentinel-2"),
    ({"start": "March"}, "YYYY-MM-DD"),
])  # fmt: skip
def test_invalid_arguments(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_cube(tmp_path / "cube", size=32, **kwargs)
