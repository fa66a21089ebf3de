"""The map follows the GeoZarr conventions for Zarr v3: every node that registers the ``proj:``,
``spatial`` or ``multiscales`` convention validates against the convention's published JSON
schema (offline copies in ``tests/schemas``), and the rules the specifications state in prose
hold (levels are child groups, ``derived_from`` precedes, shapes and transforms agree with the
scales, dimensions exist, CRS and transform agree with the coordinates).  geozarr-toolkit, the
reference validator, needs Python >= 3.12, so these checks are written here."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import zarr
from jsonschema import Draft7Validator
from rasterio.crs import CRS

from treesits_dask.outputs import schema
from treesits_dask.outputs.repo import MapRepo

SCHEMAS = Path(__file__).parent / "schemas" / "zarr-conventions"
#: convention UUID -> published schema
CONVENTIONS = {
    "f17cb550-5864-4468-aeb7-f3180cfb622f": "geo-proj-v1.schema.json",
    "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4": "spatial-v0.1.schema.json",
    "d35379db-88df-4056-af3a-620245f8e347": "multiscales-v1.schema.json",
}


def _validator(uuid: str) -> Draft7Validator:
    return Draft7Validator(json.loads((SCHEMAS / CONVENTIONS[uuid]).read_text()))


def _nodes(group: zarr.Group, path: str = ""):
    """(path, node) of every group and array below ``group`` (depth first)."""
    yield path, group
    for name, child in group.members():
        sub = f"{path}/{name}" if path else name
        if isinstance(child, zarr.Group):
            yield from _nodes(child, sub)
        else:
            yield sub, child


def _document(node) -> dict:
    """The node's zarr.json as a dict (what the schemas describe)."""
    return json.loads(json.dumps(node.metadata.to_dict(), default=str))


def check_geozarr(zstore) -> dict:
    """Validate a map store; returns what was checked (for the assertions of the callers)."""
    root = zarr.open_group(zstore, mode="r")
    seen = {uuid: 0 for uuid in CONVENTIONS}
    validators = {uuid: _validator(uuid) for uuid in CONVENTIONS}
    for path, node in _nodes(root):
        doc = _document(node)
        for conv in doc.get("attributes", {}).get("zarr_conventions", []):
            errors = list(validators[conv["uuid"]].iter_errors(doc))
            assert not errors, (path or "/", conv["name"], [e.message for e in errors[:3]])
            seen[conv["uuid"]] += 1
        attrs = doc.get("attributes", {})
        if doc["node_type"] == "array" and "spatial:dimensions" in attrs:
            # "Each entry in spatial:dimensions MUST match one of the names declared in the
            # array's dimension_names"
            assert set(attrs["spatial:dimensions"]) <= set(doc["dimension_names"]), path
    # multiscales on the root: the levels are its child groups, in order, derived one by one
    attrs = dict(root.attrs)
    layout = attrs["multiscales"]["layout"]
    assets = [item["asset"] for item in layout]
    for k, item in enumerate(layout):
        level = root[item["asset"]]
        assert isinstance(level, zarr.Group), item["asset"]
        if "derived_from" in item:
            assert item["derived_from"] in assets[:k], "a level follows the level it comes from"
            source = layout[assets.index(item["derived_from"])]
            sx, sy = item["transform"]["scale"]
            a, _, c, _, e, f = item["spatial:transform"]
            a0, _, c0, _, e0, f0 = source["spatial:transform"]
            assert (a, e) == (a0 * sx, e0 * sy) and (c, f) == (c0, f0)  # translation 0
            h0, w0 = source["spatial:shape"]
            assert item["spatial:shape"] == [math.ceil(h0 / sy), math.ceil(w0 / sx)]
        _check_level(level, item, attrs)
    return {"levels": len(layout), "nodes": seen}


def _check_level(level: zarr.Group, item: dict, root_attrs: dict) -> None:
    """A level group: its spatial: and proj: attributes, its arrays and coordinates agree."""
    attrs = dict(level.attrs)
    assert attrs["spatial:transform"] == item["spatial:transform"]
    assert attrs["spatial:shape"] == item["spatial:shape"]
    h, w = attrs["spatial:shape"]
    a, _, c, _, e, f = attrs["spatial:transform"]
    x, y = level["x"][:], level["y"][:]
    assert (len(y), len(x)) == (h, w)
    np.testing.assert_allclose(x, c + (np.arange(w) + 0.5) * a)  # pixel registration
    np.testing.assert_allclose(y, f + (np.arange(h) + 0.5) * e)
    xmin, ymin, xmax, ymax = attrs["spatial:bbox"]
    assert (xmin, xmax, ymax, ymin) == pytest.approx((c, c + a * w, f, f + e * h))
    assert attrs["spatial:registration"] == "pixel"
    crs = CRS.from_wkt(dict(level["spatial_ref"].attrs)["crs_wkt"])
    assert attrs["proj:code"] == root_attrs["proj:code"] == f"EPSG:{crs.to_epsg()}"
    for var in level.array_keys():
        if var in schema.ALL_VARIABLES:
            arr = level[var]
            assert arr.shape[-2:] == (h, w), var
            assert list(arr.metadata.dimension_names[-2:]) == attrs["spatial:dimensions"]


def test_map_layout_follows_geozarr(tmp_path):
    """A map of a 1000 x 1400 px grid (4 levels: 1400, 700, 350, 175 px)."""
    grid = schema.OutputGrid(
        crs_wkt=CRS.from_epsg(3035).to_wkt(),
        transform=(10.0, 0.0, 2456026.363042, 0.0, -10.0, 4574919.607965),
        width=1400, height=1000, chunk=(250, 250), class_names=("Spruce", "Beech"),
        multiclass=True, layers=("entropy", "probability_smoothed", "class_smoothed"),
    )  # fmt: skip
    repo = MapRepo(str(tmp_path / "out"))
    repo.ensure_layout(grid, {"model": "m.pt"})
    checked = check_geozarr(repo.zarr_store())
    assert checked["levels"] == 4
    assert all(checked["nodes"].values())
    # the map grows (tiles to the east): the levels grow and a level is added
    grown = schema.OutputGrid(**{**grid.__dict__, "width": 2800})
    repo.ensure_layout(grown, {})
    assert check_geozarr(repo.zarr_store())["levels"] == 5
    ds = repo.open_dataset(level=4, crop=False)
    assert ds.rio.transform().a == 160.0 and ds.sizes["x"] == 175 and ds.rio.crs.to_epsg() == 3035


def test_schemas_reject_what_the_conventions_forbid():
    """The copies are the real schemas: they refuse broken documents."""
    spatial = _validator("689b58e2-cf7b-45e0-9fff-9cfc0883d6b4")
    reg = {"uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4"}
    ok = {"zarr_format": 3, "node_type": "array",
          "attributes": {"zarr_conventions": [reg], "spatial:dimensions": ["y", "x"]}}  # fmt: skip
    assert spatial.is_valid(ok)
    assert not spatial.is_valid({**ok, "attributes": {"zarr_conventions": [reg]}})  # no dims
    proj = _validator("f17cb550-5864-4468-aeb7-f3180cfb622f")
    doc = {"zarr_format": 3, "node_type": "group",
           "attributes": {"zarr_conventions": [{"uuid": "f17cb550-5864-4468-aeb7-f3180cfb622f"}],
                          "proj:code": "EPSG:3035"}}  # fmt: skip
    assert proj.is_valid(doc)
    both = {**doc, "attributes": {**doc["attributes"], "proj:wkt2": "..."}}
    assert not proj.is_valid(both)  # exactly one of code, wkt2, projjson
    multi = _validator("d35379db-88df-4056-af3a-620245f8e347")
    layout = [{"asset": "0"}, {"asset": "1", "derived_from": "0"}]
    ms = {"zarr_format": 3, "node_type": "group",
          "attributes": {"zarr_conventions": [{"uuid": "d35379db-88df-4056-af3a-620245f8e347"}],
                         "multiscales": {"layout": layout}}}  # fmt: skip
    assert not multi.is_valid(ms)  # derived_from without transform


@pytest.mark.slow
def test_a_run_writes_a_geozarr_map(small_cube, native_lstm, tmp_path):
    from treesits_dask.config import load_config
    from treesits_dask.pipeline.run import run

    out = tmp_path / "out"
    config = load_config(
        overrides=dict(cube=small_cube.root, mask_dir=small_cube.mask_dir, model=native_lstm,
                       output=str(out), window="30x60", workers=1, dashboard_address=":0",
                       smoothing={"window_size": 5}, cog=False),
        environ={},
    )  # fmt: skip
    run(config)
    checked = check_geozarr(MapRepo(str(out)).zarr_store())
    assert checked["levels"] >= 7  # the grid reaches from tile X0000_Y0000 to X0070_Y0043
    # every level opens as a georeferenced Dataset holding the decimated map
    repo = MapRepo(str(out))
    full = repo.open_dataset(crop=False)["class"].values
    for level in (1, 2, 3):
        ds = repo.open_dataset(level=level, crop=False)
        f = 2**level
        np.testing.assert_array_equal(ds["class"].values, full[::f, ::f])
        assert ds.rio.transform().a == 10.0 * f
        assert (ds["class"].values != 255).any()


def test_maps_without_levels_are_read_and_extended(tmp_path):
    """A map written before the overviews (arrays at the root) is still read, written and
    extended (new layers, more tiles); it gets no levels."""
    import zarr

    from treesits_dask.outputs import store as outputs_store

    grid = schema.OutputGrid(
        crs_wkt=CRS.from_epsg(3035).to_wkt(),
        transform=(10.0, 0.0, 2456026.363042, 0.0, -10.0, 4574919.607965),
        width=80, height=40, chunk=(20, 20), class_names=("Spruce", "Beech"), multiclass=True,
    )  # fmt: skip
    old = schema.OutputGrid(**{**grid.__dict__})
    zstore = zarr.storage.MemoryStore()
    legacy = outputs_store._template(old, ("probability", "class", "valid_obs", "last_obs_valid"),
                                     {outputs_store.GRID_ATTR: old.to_attrs()})  # fmt: skip
    legacy.to_zarr(zstore, mode="w-", compute=False, consolidated=False)
    assert outputs_store.data_path(zstore) == "" and outputs_store.level_paths(zstore) == []
    wider = schema.OutputGrid(**{**grid.__dict__, "width": 120, "layers": ("entropy",)})
    grown = outputs_store.extend_layout(zstore, old, wider)
    assert grown.width == 120 and grown.layers == ("entropy",)
    values = {"class": np.ones((20, 20), np.uint8), "entropy": np.full((20, 20), 0.5, np.float32),
              "last_valid_date": np.full((20, 20), 19000, np.int32)}  # fmt: skip
    outputs_store.write_window(zstore, slice(0, 20), slice(100, 120), values)
    region = schema.TileRegion("t", 0, 100, 20, 20)
    for var, want in values.items():
        np.testing.assert_array_equal(outputs_store.read_region(zstore, region, var), want)
    assert outputs_store.level_paths(zstore) == []  # no overviews for such a map
