"""GeoZarr conventions for Zarr v3: the attributes that let any GeoZarr reader (web viewers,
GDAL's Zarr driver, xarray + rioxarray, geozarr-toolkit) place the map on the Earth and find its
overviews.

The map follows three Zarr conventions (registered in each node's ``zarr_conventions``):

* ``proj:`` (CRS; https://github.com/zarr-experimental/geo-proj, v1): ``proj:code`` where the CRS
  is an EPSG code (the FORCE cube's "ETRS89 / LAEA Europe" WKT is recognised as EPSG:3035), else
  ``proj:wkt2`` (the schema's ``oneOf`` allows exactly one of code, WKT2 and PROJJSON);
* ``spatial`` (array index -> map coordinates; https://github.com/zarr-conventions/spatial,
  v0.1): ``spatial:dimensions`` ``["y", "x"]``, the affine ``spatial:transform`` (rasterio order,
  pixel corners), ``spatial:shape``, ``spatial:bbox`` and ``spatial:registration`` ``"pixel"``;
* ``multiscales`` (https://github.com/zarr-conventions/multiscales, v1) on the root group: the
  resolution levels ``0`` (the map), ``1``, ``2``, ... (each half the size of the one before,
  ``derived_from`` it with ``transform.scale`` ``[2.0, 2.0]``), each layout item with its own
  ``spatial:transform`` and ``spatial:shape`` as the spatial convention recommends.  Variables
  are resampled by their kind (each array's ``resampling_method`` attribute): probabilities and
  uncertainty by the mean of the valid pixels of each 2 x 2 block, classes, counts, dates and
  states by its upper-left pixel (``nearest``), so no class that is not in the map appears.

Each level group carries ``proj:`` and ``spatial:`` itself (the proj convention applies a
group's CRS only to its direct children), and each data array its ``spatial:dimensions``.  The
tests validate every node against the conventions' published JSON schemas and check the rules the
schemas cannot express (levels exist, dimensions exist, transforms agree with the scales).
"""

from __future__ import annotations

import math

from ..io.crs import short_crs
from .schema import OutputGrid

__all__ = [
    "MULTISCALES",
    "PROJ",
    "SPATIAL",
    "array_attributes",
    "bbox",
    "group_attributes",
    "level_grid",
    "level_count",
    "multiscales_attributes",
    "proj_attributes",
]

#: the conventions' registration objects, exactly as their schemas define them
PROJ = {
    "schema_url": "https://raw.githubusercontent.com/zarr-experimental/geo-proj/refs/tags/v1/"
    "schema.json",
    "spec_url": "https://github.com/zarr-experimental/geo-proj/blob/v1/README.md",
    "uuid": "f17cb550-5864-4468-aeb7-f3180cfb622f",
    "name": "proj:",
    "description": "Coordinate reference system information for geospatial data",
}
SPATIAL = {
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/spatial/refs/tags/v0.1/"
    "schema.json",
    "spec_url": "https://github.com/zarr-conventions/spatial/blob/v0.1/README.md",
    "uuid": "689b58e2-cf7b-45e0-9fff-9cfc0883d6b4",
    "name": "spatial",
    "description": "Spatial coordinate information",
}
MULTISCALES = {
    "schema_url": "https://raw.githubusercontent.com/zarr-conventions/multiscales/refs/tags/v1/"
    "schema.json",
    "spec_url": "https://github.com/zarr-conventions/multiscales/blob/v1/README.md",
    "uuid": "d35379db-88df-4056-af3a-620245f8e347",
    "name": "multiscales",
    "description": "Multiscale layout of zarr datasets",
}
#: the coarsest level is the first whose long side is at most this (or one chunk), in pixels
OVERVIEW_TARGET = 256


def level_count(grid: OutputGrid) -> int:
    """How many resolution levels the map has: level 0 and halvings until the long side fits
    :data:`OVERVIEW_TARGET` pixels (or one chunk, where the chunk is smaller)."""
    target = min(OVERVIEW_TARGET, max(grid.chunk))
    n, size = 1, max(grid.width, grid.height)
    while size > target:
        size = math.ceil(size / 2)
        n += 1
    return n


def level_grid(grid: OutputGrid, level: int) -> OutputGrid:
    """The grid of resolution ``level`` (0 = the map): pixels ``2**level`` times larger, the same
    upper-left corner, ``ceil`` of the size, the same chunk shape."""
    f = 2**level
    a, b, c, d, e, g = grid.transform
    return OutputGrid(**{
        **grid.__dict__,
        "transform": (a * f, b * f, c, d * f, e * f, g),
        "width": math.ceil(grid.width / f),
        "height": math.ceil(grid.height / f),
    })  # fmt: skip


def bbox(grid: OutputGrid) -> list[float]:
    """``[xmin, ymin, xmax, ymax]`` of the grid's pixel corners."""
    a, _, c, _, e, f = grid.transform
    xs = (c, c + a * grid.width)
    ys = (f, f + e * grid.height)
    return [min(xs), min(ys), max(xs), max(ys)]


def proj_attributes(crs_wkt: str) -> dict:
    """``proj:code`` (an EPSG code) or, where the CRS has none, ``proj:wkt2``."""
    code = short_crs(crs_wkt)
    if code.startswith("EPSG:"):
        return {"proj:code": code}
    import pyproj

    return {"proj:wkt2": pyproj.CRS.from_user_input(crs_wkt).to_wkt("WKT2_2019")}


def _spatial(grid: OutputGrid) -> dict:
    return {
        "spatial:dimensions": ["y", "x"],
        "spatial:transform": [float(v) for v in grid.transform],
        "spatial:shape": [grid.height, grid.width],
        "spatial:bbox": bbox(grid),
        "spatial:registration": "pixel",
    }


def group_attributes(grid: OutputGrid) -> dict:
    """The attributes of a level group (``grid`` = the level's grid): proj + spatial."""
    return {"zarr_conventions": [PROJ, SPATIAL], **proj_attributes(grid.crs_wkt), **_spatial(grid)}


def multiscales_attributes(grid: OutputGrid) -> dict:
    """The attributes of the root group: proj + spatial of level 0 and the ``multiscales``
    layout of every level (``grid`` = the map's grid)."""
    layout = []
    for k in range(level_count(grid)):
        g = level_grid(grid, k)
        item = {"asset": str(k), "transform": {"scale": [1.0, 1.0], "translation": [0.0, 0.0]}}
        if k:
            item = {
                "asset": str(k),
                "derived_from": str(k - 1),
                "transform": {"scale": [2.0, 2.0], "translation": [0.0, 0.0]},
            }
        item["spatial:transform"] = [float(v) for v in g.transform]
        item["spatial:shape"] = [g.height, g.width]
        layout.append(item)
    return {
        "zarr_conventions": [MULTISCALES, PROJ, SPATIAL],
        "multiscales": {"layout": layout},
        **proj_attributes(grid.crs_wkt),
        **_spatial(grid),
    }


def array_attributes() -> dict:
    """What each data array adds: its spatial dimensions (the convention requires them on
    arrays)."""
    return {"zarr_conventions": [SPATIAL], "spatial:dimensions": ["y", "x"]}
