"""Forest masks: user files (``--mask-dir`` + ``--mask-name``), read per window, aligned to the
tile grid.

A mask value > 0 means "predict this pixel" (uint8 1/0 or float32 1/0/NaN masks are accepted).
"""

from __future__ import annotations

import fnmatch
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import MaskError
from . import storage
from .crs import same_crs, short_crs
from .grid import TileGrid, Window, WindowLayout
from .remote import read_retrying

__all__ = [
    "ROW_RANGES_KEPT",
    "MaskPixels",
    "MaskSource",
    "ensure_masks",
    "find_mask",
    "mask_pixels",
    "mask_source",
    "missing_masks",
    "open_mask",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskSource:
    """Where a tile's mask lives and where the tile sits inside that file (pixel offsets)."""

    url: str
    row_off: int = 0
    col_off: int = 0

    def read(self, window: Window) -> np.ndarray:
        """Boolean mask of one window (True = predict)."""
        import rasterio
        from rasterio.windows import Window as RioWindow

        def read():
            with rasterio.open(storage.gdal_path(self.url)) as src:
                return src.read(
                    1,
                    window=RioWindow(
                        self.col_off + window.col_off,
                        self.row_off + window.row_off,
                        window.width,
                        window.height,
                    ),
                )

        try:
            data = read_retrying(self.url, read, what="reading mask window")
        except Exception as exc:
            raise MaskError(f"cannot read mask {self.url}: {exc}; re-create the mask file") from exc
        with np.errstate(invalid="ignore"):
            return np.nan_to_num(data, nan=0) > 0


def find_mask(mask_dir: str, mask_name: str, tile: str) -> str:
    """``<mask_dir>/<tile>/<mask_name>`` (name or glob), else ``<mask_dir>/<mask_name>``."""
    for folder in (storage.join(mask_dir, tile), mask_dir):
        fs, path = storage.get_fs(folder)
        if not fs.isdir(path):
            continue
        names = sorted(
            storage.basename(p)
            for p in fs.ls(path, detail=False)
            if fnmatch.fnmatch(storage.basename(p), mask_name)
        )
        names = [n for n in names if fs.isfile(path.rstrip("/") + "/" + n)]
        if len(names) > 1:
            raise MaskError(
                f"mask name {mask_name!r} matches {len(names)} files in {folder} "
                f"({', '.join(names[:4])}); "
                "make --mask-name specific"
            )
        if names:
            return storage.join(folder, names[0])
    raise MaskError(
        f"no mask for tile {tile}: neither {storage.join(mask_dir, tile, mask_name)} nor "
        f"{storage.join(mask_dir, mask_name)} exists; check --mask-dir and --mask-name"
    )


def mask_source(url: str, grid: TileGrid) -> MaskSource:
    """Check that the mask file covers the tile on the same grid and return how to read it."""
    import rasterio

    def header():
        with rasterio.open(storage.gdal_path(url)) as src:
            return src.transform, src.crs, src.width, src.height, src.count

    try:
        tr, crs, width, height, count = read_retrying(url, header, what="opening mask")
    except Exception as exc:
        raise MaskError(f"cannot open mask {url} for tile {grid.tile}: {exc}") from exc
    a, _, c, _, e, f = grid.transform
    problem = None
    if count < 1:
        problem = "it has no band"
    elif crs is None or not same_crs(grid.crs_wkt, crs):
        problem = f"its CRS {short_crs(crs)} differs from the tile's ({short_crs(grid.crs_wkt)})"
    elif not (np.isclose(tr.a, a, rtol=1e-6) and np.isclose(tr.e, e, rtol=1e-6)) or tr.b or tr.d:
        problem = f"its pixel size ({tr.a}, {tr.e}) differs from the tile's ({a}, {e})"
    else:
        col = (c - tr.c) / a
        row = (f - tr.f) / e
        if abs(col - round(col)) > 1e-3 or abs(row - round(row)) > 1e-3:
            problem = "its pixels are not aligned with the tile's pixels"
        else:
            col, row = round(col), round(row)
            if col < 0 or row < 0 or col + grid.width > width or row + grid.height > height:
                problem = (
                    f"it does not cover the tile ({width}x{height} px; the tile needs "
                    f"{grid.width}x{grid.height} px at offset {col},{row})"
                )
    if problem:
        raise MaskError(
            f"mask {url} does not match the grid of tile {grid.tile}: {problem}; "
            "re-create the mask on the tile grid (see `python -m treesits_dask mask`)"
        )
    return MaskSource(url, row, col)


def open_mask(source: MaskSource, grid: TileGrid, layout: WindowLayout):
    """Lazy dask array (y, x) bool of the tile's mask, one chunk per window of ``layout``."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    name = f"mask-{grid.tile}-" + tokenize(source, grid, layout.shape)
    dsk = {(name, i, j): (source.read, w) for i, j, w in layout}
    return da.Array(HighLevelGraph.from_collections(name, dsk), name, layout.chunks, dtype=bool)


#: row ranges whose column sums a :class:`MaskPixels` keeps (8 bytes a column: 3 MB of a 3000 px
#: tile; a tile's plans ask for a few dozen)
ROW_RANGES_KEPT = 128


@dataclass(frozen=True, eq=False)
class MaskPixels:
    """The pixels to predict of a tile's mask, packed 8 to a byte (1.1 MB for a 3000 px tile),
    counted per rectangle: what a streamed tile's model states hold (:func:`mask_pixels`)."""

    bits: np.ndarray  # (height, ceil(width / 8)) uint8, np.packbits of the mask's rows
    width: int
    #: per row range asked for: its pixels to predict in each column, summed (the bands of a
    #: plan are few, and planned again for each count of sections); at most
    #: :data:`ROW_RANGES_KEPT` of them, all forgotten when there would be more
    _columns: dict = field(default_factory=dict, repr=False)

    def count(self, rows: tuple[int, int], cols: tuple[int, int]) -> int:
        """Pixels to predict in rows ``[r0, r1)`` and columns ``[c0, c1)`` of the tile."""
        (r0, r1), (c0, c1) = rows, cols
        per_column = self._columns.get((r0, r1))
        if per_column is None:
            if len(self._columns) >= ROW_RANGES_KEPT:
                self._columns.clear()
            block = np.unpackbits(self.bits[r0:r1], axis=1, count=self.width)
            per_column = self._columns[(r0, r1)] = block.sum(axis=0, dtype=np.int64)
        return int(per_column[c0:c1].sum())


@functools.lru_cache(maxsize=64)
def mask_pixels(source: MaskSource, height: int, width: int) -> MaskPixels:
    """The :class:`MaskPixels` of a tile ``height`` x ``width`` px, read from its mask once per
    process (64 masks kept: 70 MB of 3000 px tiles)."""
    data = source.read(Window(0, 0, height, width)).astype(bool, copy=False)
    bits = np.packbits(data, axis=1)
    bits.flags.writeable = False
    return MaskPixels(bits, width)


def missing_masks(mask_dir: str, mask_name: str, tiles: Sequence[str]) -> list[str]:
    """The tiles of ``tiles`` for which :func:`find_mask` finds no mask."""
    missing = []
    for tile in tiles:
        try:
            find_mask(mask_dir, mask_name, tile)
        except MaskError:
            missing.append(tile)
    return missing


def ensure_masks(
    mask_dir: str,
    mask_name: str,
    tiles: Sequence[str],
    worldcover: str | None,
    cube: str,
    classes: Sequence[int],
    client=None,
) -> dict[str, str]:
    """Make sure every tile of ``tiles`` has a mask: with ``worldcover`` (a folder of ESA
    WorldCover map tiles), build the missing ones into ``<mask_dir>/<tile>/mask.tif`` on
    ``client``'s cluster; returns ``{tile: url}`` of the masks built.  Without ``worldcover``
    nothing is built (a missing mask is reported when the run is planned)."""
    if not worldcover:
        return {}
    missing = missing_masks(mask_dir, mask_name, tiles)
    if not missing:
        return {}
    from .worldcover import build_masks

    log.info("building %d forest mask(s) from WorldCover %s", len(missing), worldcover)
    return build_masks(worldcover, cube, missing, mask_dir, classes=classes, client=client)
