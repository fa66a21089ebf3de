"""Small helpers to write hand-made FORCE tiles in tests (independent of the synthetic
generator)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from treesits_dask.io.discovery import S2_BANDS

ORIGIN = (2456026.363042, 4574919.607965)
EPSG3035 = rasterio.crs.CRS.from_epsg(3035)


def write_prj(root: Path, tile_px: int, res: float = 10.0) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "datacube-definition.prj").write_text(
        f"{EPSG3035.to_wkt()}\n-25\n60\n{ORIGIN[0]}\n{ORIGIN[1]}\n"
        f"{tile_px * res}\n{tile_px * res / 10}\n"
    )


def tile_transform(tile: str, tile_px: int, res: float = 10.0):
    tx, ty = int(tile[1:5]), int(tile[7:11])
    return from_origin(ORIGIN[0] + tx * tile_px * res, ORIGIN[1] - ty * tile_px * res, res, res)


def write_scene(
    root: Path,
    tile: str,
    date: dt.date,
    boa: np.ndarray,
    qai: np.ndarray | None = None,
    sensor: str = "SEN2A",
    blocks: tuple[int, int] | None = None,
    transform=None,
    crs=EPSG3035,
):
    """Write BOA (10, h, w) int16 (+ QAI (h, w) int16) as FORCE files; returns the BOA path."""
    folder = root / tile
    folder.mkdir(parents=True, exist_ok=True)
    _, h, w = boa.shape
    transform = transform or tile_transform(tile, w)
    prof = dict(
        driver="GTiff",
        dtype="int16",
        nodata=-9999,
        width=w,
        height=h,
        crs=crs,
        transform=transform,
        compress="lzw",
    )
    if blocks:
        prof.update(tiled=True, blockysize=blocks[0], blockxsize=blocks[1])
    stem = f"{date:%Y%m%d}_LEVEL2_{sensor}"
    path = folder / f"{stem}_BOA.tif"
    with rasterio.open(path, "w", count=boa.shape[0], **prof) as dst:
        dst.write(boa)
        if boa.shape[0] == 10:
            dst.descriptions = S2_BANDS
    if qai is not None:
        with rasterio.open(
            folder / f"{stem}_QAI.tif", "w", count=1, **{**prof, "nodata": 1}
        ) as dst:
            dst.write(qai[None])
    return path


def lazy_tile(scenes, grid, shape, qai_flags=(), mask=None):
    """The lazy tile cube of ``scenes`` in windows of ``shape`` (as a run reads it)."""
    from treesits_dask.io.cube import tile_cube
    from treesits_dask.io.grid import WindowLayout

    return tile_cube(scenes, grid, WindowLayout.of(grid, tuple(shape)), qai_flags, mask=mask)
