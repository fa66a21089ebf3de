"""Quicklook PNGs and the STAC catalog of a tiny output written by the real sinks (2 tiles of
40x40 px on the FORCE grid, 5 classes, a block of not-predicted pixels)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS

from treesits_dask.cli import main
from treesits_dask.errors import OutputError
from treesits_dask.outputs import cog, schema
from treesits_dask.outputs import quicklook as ql
from treesits_dask.outputs import store as outputs_store
from treesits_dask.outputs.repo import MapRepo
from treesits_dask.outputs.stac import write_stac

pystac = pytest.importorskip("pystac")

ORIGIN = (2456026.363042, 4574919.607965)  # community-cube grid origin (EPSG:3035)
CLASSES = ("Spruce", "Beech", "Pine", "Douglas fir", "Oak")
TILES = ("X0069_Y0043", "X0070_Y0043")
SIZE, CHUNK = 40, 20
GAP = (slice(0, 20), slice(20, 40))  # not predicted in the first tile (one whole window)
# the grid origin is at 25 W / 60 N; tiles 69/70 of 400 m lie ~28 km east, ~17 km south of it
LON, LAT = (-25.0, -24.0), (59.5, 60.0)


ALL = schema.TileRegion("all", 0, 0, SIZE, 2 * SIZE)


def _grid(multiclass: bool) -> schema.OutputGrid:
    return schema.OutputGrid(
        crs_wkt=CRS.from_epsg(3035).to_wkt(),
        transform=(10.0, 0.0, ORIGIN[0] + 69 * 400.0, 0.0, -10.0, ORIGIN[1] - 43 * 400.0),
        width=2 * SIZE, height=SIZE, chunk=(CHUNK, CHUNK),
        class_names=CLASSES if multiclass else ("disturbance",), multiclass=multiclass,
    )  # fmt: skip


def _build(out: Path, multiclass: bool = True, run_json: bool = True) -> Path:
    """Write store + tile COGs + VRT mosaics + run.json like the pipeline does (tiles of 40 px)."""
    grid = _grid(multiclass)
    repo = MapRepo(str(out))
    repo.ensure_layout(grid, {"model_family": "sits-lstm", "model": "lstm.pt"})
    rng = np.random.default_rng(7)
    n = len(grid.class_names)
    regions = [schema.TileRegion(t, 0, SIZE * k, SIZE, SIZE) for k, t in enumerate(TILES)]
    for region in regions:
        session = repo.repo.writable_session("main")
        for r in range(0, SIZE, CHUNK):
            for c in range(0, SIZE, CHUNK):
                prob = rng.dirichlet(np.ones(n) * 0.5, size=(CHUNK, CHUNK)).transpose(2, 0, 1)
                prob = prob.astype(np.float32)
                if n == 1:
                    prob = rng.random((1, CHUNK, CHUNK), dtype=np.float32)
                cls = prob.argmax(axis=0).astype(np.uint8)
                vobs = rng.integers(1, 120, size=(CHUNK, CHUNK)).astype(np.uint16)
                last = rng.integers(0, 2, size=(CHUNK, CHUNK)).astype(np.uint8)
                if region.tile == TILES[0] and (slice(r, r + CHUNK), slice(c, c + CHUNK)) == GAP:
                    prob[:], cls[:], vobs[:], last[:] = np.nan, 255, 0, 255
                outputs = {"probability": prob, "class": cls, "valid_obs": vobs,
                           "last_obs_valid": last}  # fmt: skip
                outputs = {k: v for k, v in outputs.items() if k in grid.variables()}
                rows = slice(region.row_off + r, region.row_off + r + CHUNK)
                cols = slice(region.col_off + c, region.col_off + c + CHUNK)
                outputs_store.write_window(session.store, rows, cols, outputs)
        record = {
            "region": {"rows": [region.row_off, region.row_off + SIZE],
                       "cols": [region.col_off, region.col_off + SIZE]},
        }  # fmt: skip
        MapRepo.commit_tile(session, [], region.tile, record, {})
        cog.tile_cogs(str(out), repo.zarr_store(), region, grid)
    cog.write_mosaics(str(out), TILES)
    if run_json:
        tiles = {
            t: {"scenes": 10, "first_scene": f"2021-0{k + 3}-01", "last_scene": "2023-08-30",
                "windows": 4, "pixels_predicted": 1200}
            for k, t in enumerate(TILES)
        }  # fmt: skip
        (out / "run.json").write_text(
            json.dumps({"tiles": tiles, "pixels_predicted": 2400, "complete": True})
        )
    return out


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("multi") / "out")


@pytest.fixture(scope="module")
def binary_output(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("binary") / "out", multiclass=False, run_json=False)


def _colors(png: Path) -> np.ndarray:
    img = matplotlib.image.imread(png)
    return np.unique((img[..., :3] * 255).round().astype(np.uint8).reshape(-1, 3), axis=0)


def _has_color(png: Path, hex_color: str, min_pixels: int = 20) -> bool:
    img = (matplotlib.image.imread(png)[..., :3] * 255).round().astype(int)
    rgb = [int(hex_color[i : i + 2], 16) for i in (1, 3, 5)]
    return int((np.abs(img - rgb).sum(axis=-1) == 0).sum()) >= min_pixels


# ----------------------------------------------------------------------------------- quicklook
def test_quicklook_writes_tile_and_mosaic_pngs(output):
    written = ql.quicklook(str(output))
    folder = output / "quicklook"
    expected = {
        f"{name}_{kind}.png"
        for name in (*TILES, "mosaic")
        for kind in ("class", "probability", "valid_obs")
    }
    assert {Path(w).name for w in written} == expected
    assert {p.name for p in folder.iterdir()} == expected
    for name in expected:
        img = matplotlib.image.imread(folder / name)
        h, w = img.shape[:2]
        assert 250 <= h <= 1600 and 500 <= w <= 1800, (name, img.shape)
        assert len(_colors(folder / name)) > 20, f"{name} looks blank"
    # every class colour and the not-predicted grey appear in the class map of the first tile
    class_png = folder / f"{TILES[0]}_class.png"
    for color in ql.class_colors(len(CLASSES)):
        assert _has_color(class_png, color), color
    assert _has_color(class_png, ql.NOT_PREDICTED_COLOR, min_pixels=400)
    # the second tile has no gap: its map area shows no grey apart from the legend patch
    assert not _has_color(folder / f"{TILES[1]}_class.png", ql.NOT_PREDICTED_COLOR, 400)


def test_quicklook_is_deterministic_and_honours_out_dir(output, tmp_path):
    a = ql.quicklook(str(output), out_dir=str(tmp_path / "a"), tiles=[TILES[0]], mosaic=False)
    b = ql.quicklook(str(output), out_dir=str(tmp_path / "b"), tiles=[TILES[0]], mosaic=False)
    assert [Path(p).name for p in a] == [
        f"{TILES[0]}_{k}.png" for k in ("class", "probability", "valid_obs")
    ]
    for x, y in zip(a, b, strict=True):
        assert Path(x).read_bytes() == Path(y).read_bytes(), x


def test_class_figure_legend_and_nodata(output):
    raster = ql.read_raster(str(output / "cog" / TILES[0] / "class.tif"))
    names = list(ql.read_raster(str(output / "cog" / TILES[0] / "probability.tif")).descriptions)
    assert names == list(CLASSES)
    fig = ql.plot_class(raster, names, title="t")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [*CLASSES, "not predicted"]
    image = fig.axes[0].images[0].get_array()
    assert image.mask[GAP].all() and image.mask.sum() == 400  # exactly the not-predicted window
    # a probability map has a colour bar from 0 to 1
    fig = ql.plot_probability(ql.read_raster(str(output / "cog" / TILES[0] / "probability.tif")))
    assert len(fig.axes) == 2 and fig.axes[1].get_ylim() == (0.0, 1.0)
    values = fig.axes[0].images[0].get_array()
    assert values.mask.sum() == 400 and values.min() >= 1 / len(CLASSES) - 1e-6


def test_read_raster_uses_overviews_and_caps_size(output):
    url = str(output / "cog" / TILES[1] / "probability.tif")
    full = ql.read_raster(url, max_size=1500)
    assert full.data.shape == (5, 40, 40) and full.full_shape == (40, 40)
    small = ql.read_raster(url, max_size=20)
    assert small.data.shape == (5, 20, 20) and small.shown_resolution == 20.0
    with rasterio.open(url, overview_level=0) as ovr:  # the COG's first (averaged) overview
        np.testing.assert_allclose(small.data, ovr.read(), rtol=1e-6)
    # not a plain decimation of the full-resolution pixels
    assert not np.allclose(small.data, full.data[:, ::2, ::2])
    mosaic = ql.read_raster(str(output / "cog" / "probability.vrt"), max_size=40)
    assert mosaic.data.shape == (5, 20, 40)  # the 80 x 40 px mosaic, from the tiles' overviews
    with rasterio.open(url, overview_level=0) as ovr:
        np.testing.assert_allclose(mosaic.data[:, :, 20:], ovr.read(), rtol=1e-6)


def test_quicklook_binary_output(binary_output):
    written = ql.quicklook(str(binary_output))
    names = sorted(Path(p).name for p in written)
    assert names == sorted(
        f"{n}_{k}.png" for n in (*TILES, "mosaic") for k in ("probability", "valid_obs")
    )
    for p in written:
        assert len(_colors(Path(p))) > 20
    raster = ql.read_raster(str(binary_output / "cog" / TILES[0] / "probability.tif"))
    fig = ql.plot_probability(raster, title="disturbance")
    assert fig.axes[1].get_ylabel() == "probability of disturbance"


def test_quicklook_mosaic_from_zarr_without_cogs(output, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(output / "map.icechunk", copy / "map.icechunk")
    written = ql.quicklook(str(copy), max_size=30)
    assert sorted(Path(p).name for p in written) == [
        "mosaic_class.png", "mosaic_probability.png", "mosaic_valid_obs.png"
    ]  # fmt: skip
    raster = ql._zarr_raster(ql._open_map(str(copy)), "class", 30)
    assert raster.data.shape == (1, 14, 27)  # 80 x 40 px read every 3rd pixel
    np.testing.assert_array_equal(
        raster.data[0],
        outputs_store.read_region(MapRepo(str(copy)).zarr_store(), ALL, "class")[::3, ::3],
    )
    assert raster.nodata == 255 and raster.descriptions == ("class",)
    with pytest.raises(OutputError, match="nothing to draw"):
        ql.quicklook(str(tmp_path / "empty"))


def test_quicklook_cli_main(output, tmp_path, capsys):
    out_dir = tmp_path / "ql"
    assert main(["quicklook", str(output), "--out-dir", str(out_dir), "--tiles", TILES[1],
                 "--no-mosaic", "--max-size", "30", "--stac"]) == 0  # fmt: skip
    printed = capsys.readouterr().out.split()
    assert printed[-1] == str(output / "stac" / "catalog.json")
    assert sorted(p.name for p in out_dir.iterdir()) == [
        f"{TILES[1]}_{k}.png" for k in ("class", "probability", "valid_obs")
    ]


# ----------------------------------------------------------------------------------------- STAC
def test_stac_catalog_items_and_assets(output):
    ql.quicklook(str(output))
    url = write_stac(str(output))
    assert url == str(output / "stac" / "catalog.json")
    catalog = pystac.Catalog.from_file(url)
    items = sorted(catalog.get_items(recursive=True), key=lambda i: i.id)
    assert [i.id for i in items] == list(TILES)
    raw = json.loads(Path(url).read_text())
    assert all(not link["href"].startswith("/") for link in raw["links"])  # self-contained
    for item in items:
        lon0, lat0, lon1, lat1 = item.bbox
        assert LON[0] < lon0 < lon1 < LON[1] and LAT[0] < lat0 < lat1 < LAT[1], item.bbox
        ring = item.geometry["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) > 5
        assert all(lon0 <= x <= lon1 and lat0 <= y <= lat1 for x, y in ring)
        props = item.properties
        assert props["proj:code"] == "EPSG:3035" and props["proj:shape"] == [40, 40]
        assert props["proj:transform"][:3] == [10.0, 0.0, ORIGIN[0] + int(item.id[1:5]) * 400]
        # 400 m at 60 N; the LAEA grid is rotated against the meridians there (a tilted square)
        assert 0.007 < lon1 - lon0 < 0.012 and 0.0035 < lat1 - lat0 < 0.006
        assert props["treesits_dask:model_family"] == "sits-lstm"
        assert props["end_datetime"] == "2023-08-30T23:59:59Z" and item.datetime is None
        assert {"probability", "class", "valid_obs", "last_obs_valid", "thumbnail"} <= set(
            item.assets
        )
        for key, asset in item.assets.items():
            href = asset.get_absolute_href()
            assert Path(href).is_file(), href
            assert not item.to_dict()["assets"][key]["href"].startswith("/")  # relative
        data = item.to_dict()["assets"]
        assert data["class"]["type"] == pystac.MediaType.COG
        assert data["class"]["roles"] == ["data"]
        assert data["class"]["raster:bands"] == [
            {"nodata": 255, "data_type": "uint8", "spatial_resolution": 10.0}
        ]
        assert [b["nodata"] for b in data["probability"]["raster:bands"]] == ["nan"] * 5
        classes = data["class"]["classification:classes"]
        assert [c.get("title") for c in classes[:5]] == list(CLASSES)
        assert classes[3]["name"] == "Douglas_fir" and classes[-1]["nodata"] is True
        assert data["thumbnail"]["roles"] == ["thumbnail", "overview"]
        assert data["thumbnail"]["href"].endswith(f"{item.id}_class.png")
        with rasterio.open(item.assets["class"].get_absolute_href()) as src:
            assert src.width == item.properties["proj:shape"][1]
    first = next(i for i in items if i.id == TILES[0])
    assert first.properties["start_datetime"] == "2021-03-01T00:00:00Z"


def test_stac_is_deterministic_and_validates(output):
    url = write_stac(str(output), validate=True)
    before = {p: p.read_bytes() for p in sorted((output / "stac").rglob("*.json"))}
    write_stac(str(output), validate=True)
    after = {p: p.read_bytes() for p in sorted((output / "stac").rglob("*.json"))}
    assert before == after and len(before) == 3
    # the core STAC schema (shipped with pystac; no network)
    pytest.importorskip("jsonschema")
    from pystac.validation.stac_validator import JsonSchemaSTACValidator

    validator = JsonSchemaSTACValidator()
    for item in pystac.Catalog.from_file(url).get_items(recursive=True):
        validator.validate_core(item.to_dict(), pystac.STACObjectType.ITEM, "1.1.0")
        bad = item.to_dict()
        del bad["properties"]["start_datetime"]  # neither datetime nor a range: invalid
        with pytest.raises(pystac.STACValidationError):
            validator.validate_core(bad, pystac.STACObjectType.ITEM, "1.1.0")


def test_stac_binary_without_run_json(binary_output, caplog):
    caplog.set_level("WARNING", logger="treesits_dask.stac")
    catalog = pystac.Catalog.from_file(write_stac(str(binary_output), quicklook_dir="/nowhere"))
    items = list(catalog.get_items(recursive=True))
    assert len(items) == 2 and "no date for tile" in caplog.text
    for item in items:
        assert "class" not in item.assets and "thumbnail" not in item.assets
        assert item.properties["start_datetime"] == "1970-01-01T00:00:00Z"
    url = write_stac(
        str(binary_output), start_datetime="2022-01-01", end_datetime="2022-12-31", validate=True
    )
    item = next(pystac.Catalog.from_file(url).get_items(recursive=True))
    assert item.properties["end_datetime"] == "2022-12-31T23:59:59Z"
    with pytest.raises(OutputError, match="no tile COGs"):
        write_stac(str(binary_output.parent / "missing"))


# ------------------------------------------------------------------------------------------- S3
@pytest.mark.s3
def test_quicklook_and_stac_on_s3(output, s3_env):
    from treesits_dask.io import storage

    fs, _ = storage.get_fs("s3://qlbucket")
    fs.mkdir("qlbucket")
    for name in ("cog", "map.icechunk"):
        fs.put(str(output / name), f"qlbucket/run/{name}", recursive=True)
    fs.put_file(str(output / "run.json"), "qlbucket/run/run.json")
    assert ql.find_tiles("s3://qlbucket/run") == list(TILES)
    written = ql.quicklook("s3://qlbucket/run", max_size=20)
    assert written[0] == f"s3://qlbucket/run/quicklook/{TILES[0]}_class.png"
    assert all(fs.exists(w) for w in written) and len(written) == 9
    url = write_stac("s3://qlbucket/run")
    assert url == "s3://qlbucket/run/stac/catalog.json"
    item = json.loads(fs.cat_file(f"qlbucket/run/stac/{TILES[0]}/{TILES[0]}.json"))
    assert item["assets"]["class"]["href"] == f"../../cog/{TILES[0]}/class.tif"
    assert item["assets"]["thumbnail"]["href"] == f"../../quicklook/{TILES[0]}_class.png"
    assert LON[0] < item["bbox"][0] < LON[1]
    catalog = json.loads(fs.cat_file("qlbucket/run/stac/catalog.json"))
    assert sorted(link["href"] for link in catalog["links"] if link["rel"] == "item") == [
        f"./{t}/{t}.json" for t in TILES
    ]


def test_readme_links_a_quicklook_png():
    """The map shown in the README exists, is a PNG drawn by quicklook, and is not blank."""
    import re
    from pathlib import Path

    from PIL import Image

    root = Path(__file__).resolve().parents[1]
    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", (root / "README.md").read_text())
    assert links, "README.md shows no PNG"
    for link in links:
        with Image.open(root / link) as img:
            assert img.format == "PNG" and img.width >= 400 and img.height >= 200
            arr = np.asarray(img.convert("RGB"))
        colours = np.unique(arr.reshape(-1, 3), axis=0)
        assert len(colours) > 6  # a legend of classes, not an empty canvas
