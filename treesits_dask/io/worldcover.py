"""Forest masks on the FORCE grid built from ESA WorldCover map tiles (REFERENCE.md section 2).

WorldCover ships 3 x 3 degree tiles (EPSG:4326, uint8, nodata 0, 36000 x 36000 px) named
``ESA_WorldCover_10m_<year>_<version>_<N|S><lat><E|W><lon>_Map.tif`` after their south-west
corner.  A tile's mask is 1 where the nearest-resampled class is in ``classes`` (default 10, tree
cover), else 0, ORed over every WorldCover tile the FORCE tile touches.

Resampling is GDAL's nearest neighbour through a ``WarpedVRT`` on the *whole* FORCE tile grid with
an (effectively) exact transformer: GDAL's default linear approximation (``gdalwarp -et 0.125``)
depends on how the warp is chunked, so windows would disagree with a whole-tile warp at a few
pixels per tile.  With the exact transformer every window equals the whole-tile result (= ``gdalwarp
-r near -et 0``), and each window reads only the source blocks it needs; no source is ever loaded
whole.  One dask task computes one window.

This module is longer than the 400-line guideline because it is one stage read top to bottom:
the WorldCover file index, the FORCE tile grid, the warp of one window and the mask COG.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import MaskError
from . import discovery, storage
from .cube import tile_grid
from .discovery import CubeDefinition

if TYPE_CHECKING:
    import dask.array as da
    from distributed import Client

__all__ = [
    "TREE_COVER",
    "WORLDCOVER_NAME",
    "MaskGrid",
    "build_masks",
    "build_tile_mask",
    "force_tile_grid",
    "ids_covering",
    "index_worldcover",
    "lazy_tile_mask",
    "mask_window",
    "tile_lonlat_bounds",
    "worldcover_id",
]

log = logging.getLogger(__name__)

#: WorldCover map file basename; the id (``N00E006``) is the tile's south-west corner.
WORLDCOVER_NAME = re.compile(
    r"^ESA_WorldCover_10m_(?P<year>\d{4})_(?P<version>v\d+)_"
    r"(?P<ns>[NS])(?P<lat>\d{2})(?P<ew>[EW])(?P<lon>\d{3})_Map\.tif$"
)
#: WorldCover class "Tree cover".
TREE_COVER = 10
#: WorldCover tile edge in degrees.
TILE_DEGREES = 3

# rasterio 1.4 cannot build a WarpedVRT with tolerance=0 (its exact-transformer branch leaves the
# transformer unset); an approximation error of 1e-9 source pixels is below double precision noise
# of the coordinates and gives the exact transformer's answer.
_EXACT_TOLERANCE = 1e-9
_WARP_MEM_MB = 64

Bounds = tuple[float, float, float, float]
PixelWindow = tuple[int, int, int, int]  # row_off, col_off, height, width


@dataclass(frozen=True)
class MaskGrid:
    """Pixel grid of one FORCE tile's mask: CRS, affine ``(a, b, c, d, e, f)`` and size."""

    tile: str
    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int

    @property
    def affine(self):
        from affine import Affine

        return Affine(*self.transform)

    @property
    def bounds(self) -> Bounds:
        """``(left, bottom, right, top)`` in map units."""
        return _window_bounds(self, (0, 0, self.height, self.width))


def worldcover_id(lat_sw: int, lon_sw: int) -> str:
    """WorldCover id of a south-west corner: (0, 6) -> ``N00E006``, (-3, -60) -> ``S03W060``."""
    on_grid = lat_sw % TILE_DEGREES == 0 and lon_sw % TILE_DEGREES == 0
    if not (on_grid and -90 <= lat_sw < 90 and -180 <= lon_sw < 180):
        raise MaskError(
            f"({lat_sw}, {lon_sw}) is not the south-west corner of a WorldCover tile; corners are "
            f"multiples of {TILE_DEGREES} degrees with -90 <= lat < 90 and -180 <= lon < 180"
        )
    ns = "N" if lat_sw >= 0 else "S"
    ew = "E" if lon_sw >= 0 else "W"
    return f"{ns}{abs(lat_sw):02d}{ew}{abs(lon_sw):03d}"


def _cells(lo: float, hi: float, first: int, last: int) -> range:
    d = TILE_DEGREES
    start = max(first, math.floor(lo / d) * d)
    return range(start, min(last + d, max(math.ceil(hi / d) * d, start + d)), d)


def ids_covering(bounds_lonlat: Bounds) -> list[str]:
    """Ids of all WorldCover tiles intersecting ``(west, south, east, north)`` (degrees).

    Edges that only touch a tile do not select it.  ``west > east`` means the box crosses the
    antimeridian (as :func:`rasterio.warp.transform_bounds` reports it).
    """
    west, south, east, north = bounds_lonlat
    if south > north:
        raise MaskError(f"invalid lon/lat bounds {bounds_lonlat}: south > north")
    lon_ranges = [(west, east)] if west <= east else [(west, 180.0), (-180.0, east)]
    lats = _cells(south, north, -90, 87)
    ids: list[str] = []
    for lat in lats:
        for lo, hi in lon_ranges:
            ids += [worldcover_id(lat, lon) for lon in _cells(lo, hi, -180, 177)]
    return list(dict.fromkeys(ids))


def _version_key(match: re.Match) -> tuple[int, int]:
    return int(match["year"]), int(match["version"][1:])


def index_worldcover(source: str) -> dict[str, str]:
    """``{id: url}`` of the WorldCover map files directly inside a folder or S3 prefix.

    Where several years or versions hold the same id, the newest (year, then version) wins.
    """
    fs, path = storage.get_fs(source)
    if not fs.isdir(path):
        raise MaskError(
            f"WorldCover folder {source!r} does not exist or is not a folder; point it at the "
            "folder holding ESA_WorldCover_10m_<year>_<version>_<id>_Map.tif files"
        )
    best: dict[str, tuple[tuple[int, int], str]] = {}
    for entry in fs.ls(path, detail=False):
        name = storage.basename(entry)
        m = WORLDCOVER_NAME.match(name)
        if not m:
            continue
        wid = f"{m['ns']}{m['lat']}{m['ew']}{m['lon']}"
        key = _version_key(m)
        if wid not in best or key > best[wid][0]:
            best[wid] = (key, storage.join(source, name))
    if not best:
        log.warning("no WorldCover map files (ESA_WorldCover_10m_*_Map.tif) in %s", source)
    return {wid: url for wid, (_, url) in sorted(best.items())}


def force_tile_grid(definition: CubeDefinition, tile: str, resolution: float = 10.0) -> MaskGrid:
    """The exact pixel grid of a FORCE tile at ``resolution`` from ``datacube-definition.prj``."""
    sizes = []
    for axis in ("x", "y"):
        size = getattr(definition, f"tile_size_{axis}")
        n = size / resolution
        if resolution <= 0 or abs(n - round(n)) > 1e-6 or round(n) < 1:
            raise MaskError(
                f"tile {tile}: TILE_SIZE_{axis.upper()} {size} m is not a whole number of "
                f"{resolution} m pixels; "
                "choose a mask resolution that divides the FORCE tile size"
            )
        sizes.append(round(n))
    left, top = definition.tile_origin(tile)
    return MaskGrid(
        tile=tile,
        crs_wkt=definition.crs_wkt,
        width=sizes[0],
        height=sizes[1],
        transform=(resolution, 0.0, left, 0.0, -resolution, top),
    )


def _window_bounds(grid: MaskGrid, window: PixelWindow) -> Bounds:
    row, col, h, w = window
    aff = grid.affine
    xs, ys = zip(*(aff @ (c, r) for c in (col, col + w) for r in (row, row + h)), strict=True)
    return min(xs), min(ys), max(xs), max(ys)


def tile_lonlat_bounds(grid: MaskGrid) -> Bounds:
    """``(west, south, east, north)`` of the tile footprint in EPSG:4326 (densified edges)."""
    from rasterio.warp import transform_bounds

    return tuple(transform_bounds(grid.crs_wkt, "EPSG:4326", *grid.bounds, densify_pts=21))


def _intersects(src, grid: MaskGrid, window: PixelWindow) -> bool:
    """Whether the window's footprint (plus two source pixels) overlaps the source's extent."""
    from rasterio.warp import transform_bounds

    west, south, east, north = transform_bounds(
        grid.crs_wkt, src.crs, *_window_bounds(grid, window), densify_pts=21
    )
    if west > east:  # crosses the antimeridian of the source CRS: be conservative
        return True
    mx, my, b = 2 * abs(src.transform.a), 2 * abs(src.transform.e), src.bounds
    overlaps_x = west - mx < b.right and east + mx > b.left
    return overlaps_x and south - my < b.top and north + my > b.bottom


def mask_window(
    sources: Sequence[str],
    grid: MaskGrid,
    window: PixelWindow,
    classes: Iterable[int] = frozenset({TREE_COVER}),
) -> np.ndarray:
    """uint8 ``(h, w)`` mask of ``window = (row_off, col_off, h, w)``: 1 where the nearest
    WorldCover class of any source is in ``classes``, else 0.  Reads only the source blocks the
    window needs.
    """
    import rasterio
    from rasterio.crs import CRS
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from rasterio.windows import Window

    row, col, h, w = window
    wanted = np.array(sorted(classes))
    out = np.zeros((h, w), dtype=np.uint8)
    dst_crs = CRS.from_wkt(grid.crs_wkt)
    for url in sources:
        try:
            with rasterio.open(storage.gdal_path(url)) as src:
                if src.crs is None:
                    raise MaskError(
                        f"WorldCover file {url} has no CRS; replace it with the original ESA file"
                    )
                if not _intersects(src, grid, window):
                    continue
                with WarpedVRT(
                    src,
                    crs=dst_crs,
                    transform=grid.affine,
                    width=grid.width,
                    height=grid.height,
                    resampling=Resampling.nearest,
                    tolerance=_EXACT_TOLERANCE,
                    warp_mem_limit=_WARP_MEM_MB,
                ) as vrt:
                    data = vrt.read(1, window=Window(col, row, w, h))
        except MaskError:
            raise
        except Exception as exc:  # rasterio raises RasterioIOError, CPLE_* and friends
            raise MaskError(
                f"cannot read WorldCover file {url} for tile {grid.tile}: {exc}; check that the "
                "file exists and is readable (for s3:// URLs: the S3 endpoint settings)"
            ) from exc
        out |= np.isin(data, wanted).astype(np.uint8)
    return out


def _window_shape(window: int | tuple[int, int]) -> tuple[int, int]:
    rows, cols = (window, window) if isinstance(window, int) else window
    if rows < 1 or cols < 1:
        raise MaskError(f"mask window {window!r} must be positive (pixels per side)")
    return int(rows), int(cols)


def _splits(size: int, step: int) -> tuple[int, ...]:
    return tuple(min(step, size - off) for off in range(0, size, step))


def lazy_tile_mask(
    sources: Sequence[str],
    grid: MaskGrid,
    classes: Iterable[int] = frozenset({TREE_COVER}),
    window: int | tuple[int, int] = 1000,
) -> da.Array:
    """Lazy uint8 dask array (height, width) of a tile's mask, one :func:`mask_window` per chunk."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    rows, cols = _window_shape(window)
    sources, classes = tuple(sources), frozenset(int(c) for c in classes)
    row_chunks, col_chunks = _splits(grid.height, rows), _splits(grid.width, cols)
    name = f"worldcover-mask-{grid.tile}-" + tokenize(sources, grid, classes, rows, cols)
    dsk = {}
    for i, h in enumerate(row_chunks):
        for j, w in enumerate(col_chunks):
            dsk[(name, i, j)] = (mask_window, sources, grid, (i * rows, j * cols, h, w), classes)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    return da.Array(graph, name, (row_chunks, col_chunks), dtype=np.uint8)


def _cog_blocksize(grid: MaskGrid) -> int:
    size = 512
    while size > 16 and size > min(grid.width, grid.height) // 2:
        size //= 2
    return size


def _write_mask_cog(data: np.ndarray, grid: MaskGrid, out_url: str) -> None:
    """Write a validated uint8 COG (DEFLATE, nearest overviews, no nodata) and publish it
    atomically: a rename inside the destination folder on local disks, one upload to object stores.
    """
    import rasterio
    from rasterio.crs import CRS
    from rio_cogeo.cogeo import cog_translate, cog_validate

    block = _cog_blocksize(grid)
    profile = {
        "driver": "GTiff",
        "interleave": "pixel",
        "tiled": True,
        "blockxsize": block,
        "blockysize": block,
        "compress": "DEFLATE",
        "predictor": 2,
    }
    fs, path = storage.get_fs(out_url)
    remote = storage.is_remote(out_url)
    try:
        if not remote:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.TemporaryDirectory(
            prefix=".treesits-mask-", dir=None if remote else os.path.dirname(path)
        ) as tmp:
            src_path, cog_path = os.path.join(tmp, "src.tif"), os.path.join(tmp, "mask.tif")
            with rasterio.open(
                src_path,
                "w",
                width=grid.width,
                height=grid.height,
                count=1,
                dtype="uint8",
                crs=CRS.from_wkt(grid.crs_wkt),
                transform=grid.affine,
                **profile,
            ) as dst:
                dst.write(data, 1)
            cog_translate(
                src_path,
                cog_path,
                profile,
                overview_resampling="nearest",
                in_memory=False,
                quiet=True,
                config={"GDAL_TIFF_OVR_BLOCKSIZE": str(block), "GDAL_NUM_THREADS": "1"},
            )
            ok, errors, _ = cog_validate(cog_path, quiet=True)
            if not ok:
                raise MaskError(
                    f"mask COG of tile {grid.tile} is invalid ({'; '.join(errors)}): a bug"
                )
            if remote:
                fs.put_file(cog_path, path)
            else:
                os.replace(cog_path, path)
    except OSError as exc:
        raise MaskError(
            f"cannot write mask {out_url}: {exc}; check that the mask folder is writable"
        ) from exc


def build_tile_mask(
    sources: Sequence[str],
    grid: MaskGrid,
    out_url: str,
    classes: Iterable[int] = frozenset({TREE_COVER}),
    window: int | tuple[int, int] = 1000,
    client: Client | None = None,
) -> str:
    """Compute a tile's mask window by window (on ``client``, else dask's default scheduler) and
    write it as a COG to ``out_url`` (local path or ``s3://``).  Returns ``out_url``.
    """
    mask = lazy_tile_mask(sources, grid, classes, window)
    data = client.compute(mask).result() if client is not None else mask.compute()
    data = np.asarray(data, dtype=np.uint8)
    log.info(
        "tile %s: %.1f %% of %d px in the mask -> %s",
        grid.tile,
        100 * data.mean(),
        data.size,
        out_url,
    )
    _write_mask_cog(data, grid, out_url)
    return out_url


def _tile_resolution(cube: str, definition: CubeDefinition, tile: str) -> float:
    """Pixel size of the tile's first BOA, else 10 m (a tile without scenes)."""
    fs, path = storage.get_fs(storage.join(cube, tile))
    scenes = discovery.scene_table(cube, tile, with_details=False) if fs.isdir(path) else []
    if not scenes:
        return 10.0
    tr = tile_grid(definition, scenes[0]).transform
    if not math.isclose(abs(tr[0]), abs(tr[4]), rel_tol=1e-9):
        raise MaskError(
            f"{scenes[0].boa} has non-square pixels ({tr[0]} x {tr[4]}); pass the mask "
            "resolution explicitly"
        )
    return abs(tr[0])


def build_masks(
    worldcover: str,
    cube: str,
    tiles: str | Sequence[str],
    mask_dir: str,
    classes: Iterable[int] = (TREE_COVER,),
    overwrite: bool = False,
    resolution: float | None = None,
    client: Client | None = None,
    window: int | tuple[int, int] = 1000,
) -> dict[str, str]:
    """Build ``<mask_dir>/<tile>/mask.tif`` for each FORCE tile from the folder ``worldcover``.

    ``tiles``: a list of tile ids (tile folders need not exist), or ``"all"`` / a comma list / a
    FORCE tile-list file as understood by :func:`discovery.select_tiles`.  Existing masks are kept
    unless ``overwrite``.  ``resolution`` defaults to the pixel size of the tile's first BOA, or
    10 m.  Returns ``{tile: mask url}``.
    """
    definition = discovery.read_cube_definition(cube)
    if isinstance(tiles, str):
        tile_ids = discovery.select_tiles(cube, tiles)
    else:
        tile_ids = list(dict.fromkeys(str(t).strip() for t in tiles))
        for t in tile_ids:
            discovery.parse_tile_id(t)
    classes = frozenset(int(c) for c in classes)
    index: dict[str, str] | None = None
    out: dict[str, str] = {}
    for tile in tile_ids:
        url = storage.join(mask_dir, tile, "mask.tif")
        fs, path = storage.get_fs(url)
        if fs.exists(path) and not overwrite:
            log.info("tile %s: mask %s exists, skipped (overwrite to rebuild)", tile, url)
            out[tile] = url
            continue
        res = resolution if resolution is not None else _tile_resolution(cube, definition, tile)
        grid = force_tile_grid(definition, tile, res)
        needed = ids_covering(tile_lonlat_bounds(grid))
        if index is None:
            index = index_worldcover(worldcover)
        sources = [index[i] for i in needed if i in index]
        if not sources:
            raise MaskError(
                f"no WorldCover file for tile {tile}: it needs {', '.join(needed)} and "
                f"{worldcover} holds none of them; download "
                "ESA_WorldCover_10m_<year>_<version>_<id>_Map.tif for these ids into that folder"
            )
        missing = [i for i in needed if i not in index]
        if missing:
            log.warning(
                "tile %s: no WorldCover file for %s (sea?): 0 there", tile, ", ".join(missing)
            )
        out[tile] = build_tile_mask(sources, grid, url, classes, window, client)
    return out
