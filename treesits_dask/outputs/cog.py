"""Cloud-Optimized GeoTIFFs: one COG per tile and variable (``<output>/cog/<tile>/<var>.tif``),
read from the tile's region of the Zarr store, and VRT mosaics of all tiles per variable.

A COG is written in three local steps (a tiled GeoTIFF fed block by block ->
``rio_cogeo.cog_translate`` -> ``cog_validate``) and only then published under its final URL
(:func:`treesits_dask.io.storage.publish_file`: an atomic rename on local disks, one upload on
object stores, multipart above :data:`~treesits_dask.io.storage.UPLOAD_PART_SIZE`).  GDAL's COG
driver cannot write to ``s3://``, and nothing partial ever carries the final name.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import OutputError
from ..io import storage
from ..io.crs import same_crs
from ..io.remote import read_retrying
from .schema import ALL_VARIABLES, COG_NODATA, DTYPES, OutputGrid, TileRegion
from .store import RESAMPLING, chunk_blocks, data_group

__all__ = [
    "CogSpec",
    "cog_blocksize",
    "mosaics_hold",
    "write_cog",
    "write_mosaics",
    "write_vrt",
]

log = logging.getLogger(__name__)

_GDAL_TYPES = {"uint8": "Byte", "uint16": "UInt16", "int16": "Int16", "int32": "Int32",
               "float32": "Float32"}  # fmt: skip


@dataclass(frozen=True)
class CogSpec:
    """What one COG holds: size, georeference, band layout and how overviews are resampled."""

    width: int
    height: int
    count: int
    dtype: str
    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    nodata: float | None
    descriptions: tuple[str, ...] | None = None
    overview_resampling: str = "nearest"


def cog_blocksize(height: int, width: int) -> int:
    """Internal tile size: 512 for real tiles, smaller (>= 16) so small rasters get overviews."""
    side = min(height, width) // 2
    size = 512
    while size > 16 and size > side:
        size //= 2
    return size


def _profile(spec: CogSpec, blocksize: int) -> dict:
    predictor = 3 if np.dtype(spec.dtype).kind == "f" else 2
    return {
        "driver": "GTiff",
        "interleave": "pixel",
        "tiled": True,
        "blockxsize": blocksize,
        "blockysize": blocksize,
        "compress": "DEFLATE",
        "predictor": predictor,
    }


def write_cog(
    url: str,
    spec: CogSpec,
    blocks: Iterable[tuple[int, int, np.ndarray]],
    tmp_dir: str | None = None,
    part_size: int | None = None,
) -> str:
    """Write a validated COG to ``url`` from ``(row_off, col_off, array (count, h, w))`` blocks.

    Only one block is in memory at a time (plus what GDAL caches).  Raises :class:`OutputError` if
    the result is not a valid COG or cannot be published.  ``part_size``: see
    :func:`storage.publish_file`.
    """
    import rasterio
    from affine import Affine
    from rio_cogeo.cogeo import cog_translate, cog_validate

    blocksize = cog_blocksize(spec.height, spec.width)
    profile = _profile(spec, blocksize)
    config = {"GDAL_TIFF_OVR_BLOCKSIZE": str(blocksize), "GDAL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory(prefix="treesits-cog-", dir=tmp_dir) as tmp:
        src_path = os.path.join(tmp, "src.tif")
        cog_path = os.path.join(tmp, "cog.tif")
        with rasterio.open(
            src_path,
            "w",
            driver="GTiff",
            width=spec.width,
            height=spec.height,
            count=spec.count,
            dtype=spec.dtype,
            crs=rasterio.crs.CRS.from_wkt(spec.crs_wkt),
            transform=Affine(*spec.transform),
            nodata=spec.nodata,
            tiled=True,
            blockxsize=blocksize,
            blockysize=blocksize,
        ) as dst:
            for row, col, arr in blocks:
                arr = np.asarray(arr, dtype=spec.dtype).reshape(spec.count, *np.shape(arr)[-2:])
                window = rasterio.windows.Window(col, row, arr.shape[2], arr.shape[1])
                dst.write(arr, window=window)
            if spec.descriptions:
                for i, name in enumerate(spec.descriptions, start=1):
                    dst.set_band_description(i, name)
        cog_translate(
            src_path,
            cog_path,
            profile,
            overview_resampling=spec.overview_resampling,
            in_memory=False,
            quiet=True,
            config=config,
        )
        ok, errors, _ = cog_validate(cog_path, quiet=True)
        if not ok:
            raise OutputError(
                f"the COG written for {url} is not valid ({'; '.join(errors)}); this is a bug"
            )
        storage.publish_file(cog_path, url, part_size)
    return url


def _nodata_text(value: float) -> str:
    return "nan" if math.isnan(value) else repr(float(value)).removesuffix(".0")


def write_vrt(vrt_url: str, sources: Sequence[str]) -> str:
    """Write a VRT mosaic of GeoTIFFs that sit in folders below the VRT (paths relative to it).

    ``sources`` are URLs of rasters with the same CRS, resolution, band count, dtype and nodata.
    Band descriptions and nodata are taken from the first source.
    """
    import rasterio

    if not sources:
        raise OutputError(f"no rasters to mosaic into {vrt_url}")
    vrt_dir = posixpath.dirname(storage.strip_protocol(vrt_url).replace(os.sep, "/"))

    def header(url: str) -> tuple:
        with rasterio.open(storage.gdal_path(url)) as src:
            return url, src.profile, src.transform, src.crs, src.descriptions, src.block_shapes[0]

    # remote headers with retries: a header read that broke off may look like a valid file
    # without georeference (see treesits_dask.io.remote)
    infos = [
        read_retrying(url, lambda url=url: header(url), what="reading the header")
        for url in sources
    ]
    _, first, tr0, crs0, desc0, _ = infos[0]
    for url, prof, tr, crs, _, _ in infos[1:]:
        same = (
            same_crs(crs, crs0)
            and prof["count"] == first["count"]
            and prof["dtype"] == first["dtype"]
            and math.isclose(tr.a, tr0.a)
            and math.isclose(tr.e, tr0.e)
            and tr.b == tr0.b == 0
            and _same_nodata(prof.get("nodata"), first.get("nodata"))
        )
        if not same:
            raise OutputError(
                f"{url} does not match {infos[0][0]} (CRS, resolution, bands, dtype or nodata "
                f"differ); the mosaic {vrt_url} needs tiles of one grid: use another --output"
            )
    left = min(i[2].c for i in infos)
    top = max(i[2].f for i in infos)
    placed = []
    width = height = 0
    for url, prof, tr, _, _, blocks in infos:
        xoff, yoff = (tr.c - left) / tr0.a, (tr.f - top) / tr0.e
        if abs(xoff - round(xoff)) > 1e-6 or abs(yoff - round(yoff)) > 1e-6:
            raise OutputError(
                f"{url} is not aligned to the pixel grid of {infos[0][0]}; cannot mosaic it"
            )
        xoff, yoff = round(xoff), round(yoff)
        placed.append((url, prof, xoff, yoff, blocks))
        width, height = max(width, xoff + prof["width"]), max(height, yoff + prof["height"])

    root = ET.Element("VRTDataset", rasterXSize=str(width), rasterYSize=str(height))
    ET.SubElement(root, "SRS", dataAxisToSRSAxisMapping="1,2").text = crs0.to_wkt()
    gt = (left, tr0.a, 0.0, top, 0.0, tr0.e)
    ET.SubElement(root, "GeoTransform").text = ", ".join(repr(float(v)) for v in gt)
    gdal_type = _GDAL_TYPES[first["dtype"]]
    for band in range(1, first["count"] + 1):
        b = ET.SubElement(root, "VRTRasterBand", dataType=gdal_type, band=str(band))
        if desc0[band - 1]:
            ET.SubElement(b, "Description").text = desc0[band - 1]
        if first.get("nodata") is not None:
            ET.SubElement(b, "NoDataValue").text = _nodata_text(first["nodata"])
        for url, prof, xoff, yoff, (by, bx) in placed:
            src = ET.SubElement(b, "SimpleSource")
            rel = posixpath.relpath(storage.strip_protocol(url).replace(os.sep, "/"), vrt_dir)
            ET.SubElement(src, "SourceFilename", relativeToVRT="1").text = rel
            ET.SubElement(src, "SourceBand").text = str(band)
            ET.SubElement(
                src,
                "SourceProperties",
                RasterXSize=str(prof["width"]),
                RasterYSize=str(prof["height"]),
                DataType=gdal_type,
                BlockXSize=str(bx),
                BlockYSize=str(by),
            )
            size = {"xSize": str(prof["width"]), "ySize": str(prof["height"])}
            ET.SubElement(src, "SrcRect", xOff="0", yOff="0", **size)
            ET.SubElement(src, "DstRect", xOff=str(xoff), yOff=str(yoff), **size)
    ET.indent(root)
    storage.publish_bytes(ET.tostring(root, encoding="utf-8") + b"\n", vrt_url)
    return vrt_url


def _same_nodata(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return (math.isnan(a) and math.isnan(b)) or a == b


# ------------------------------------------------------------------------------ tiles, mosaics
#: file beside a tile's COGs naming the record (of the tile in the map) they were made from
COG_MANIFEST = "_cog.json"
#: file beside the mosaics naming the tiles they hold
MOSAIC_MANIFEST = "_mosaic.json"


def tile_cogs(
    output: str,
    zstore,
    region: TileRegion,
    grid: OutputGrid,
    tmp_dir: str | None = None,
    variables=None,
) -> dict[str, str]:
    """Write ``<output>/cog/<tile>/<variable>.tif`` (valid COGs) from the tile's region of the map
    in ``zstore`` (a zarr store), for ``variables`` (default: all of the grid).

    The region is read chunk by chunk into a local temporary GeoTIFF, turned into a COG (DEFLATE,
    overviews: average for the probabilities and uncertainty, nearest for the integer layers),
    validated and then published atomically.  Values equal the store's; re-running writes
    byte-identical files.  Returns ``{variable: url}``.
    """
    a, b, c, d, e, f = grid.transform
    x0, y0 = region.col_off, region.row_off
    transform = (a, b, c + x0 * a + y0 * b, d, e, f + x0 * d + y0 * e)
    group = data_group(zstore)
    written = {}
    for var in variables if variables is not None else grid.variables():
        if var not in group.array_keys():
            raise OutputError(
                f"the map of {output} has no variable {var!r}; was it created for another model?"
            )
        arr = group[var]
        spec = CogSpec(
            width=region.width,
            height=region.height,
            count=arr.shape[0] if arr.ndim == 3 else 1,
            dtype=DTYPES[var],
            crs_wkt=grid.crs_wkt,
            transform=transform,
            nodata=COG_NODATA[var],
            descriptions=tuple(grid.class_names) if arr.ndim == 3 else (var,),
            overview_resampling=RESAMPLING[var],
        )
        url = storage.join(output, "cog", region.tile, f"{var}.tif")
        written[var] = write_cog(url, spec, chunk_blocks(arr, region), tmp_dir=tmp_dir)
    log.info("tile %s: wrote %s COGs to %s", region.tile, list(written), output)
    return written


def cog_manifest(output: str, tile: str) -> dict | None:
    """The manifest of a tile's COGs (None when they are missing or incomplete)."""
    return _read_json(storage.join(output, "cog", tile, COG_MANIFEST))


def _read_json(url: str) -> dict | None:
    fs, path = storage.get_fs(url)
    try:
        with fs.open(path, "rt") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); treated as missing", url, exc)
        return None


def mosaic_tiles(output: str) -> list[str] | None:
    """The tiles the mosaics hold (None when there are no complete mosaics)."""
    manifest = _read_json(storage.join(output, "cog", MOSAIC_MANIFEST))
    return manifest.get("tiles") if manifest else None


def mosaics_hold(output: str, tiles: Sequence[str], variables: Sequence[str] | None) -> bool:
    """Whether the mosaics hold exactly ``tiles`` and (when given) a mosaic of every one of
    ``variables``."""
    manifest = _read_json(storage.join(output, "cog", MOSAIC_MANIFEST))
    if not manifest or manifest.get("tiles") != sorted(set(tiles)):
        return False
    return variables is None or set(variables) <= set(manifest.get("variables") or ())


def write_mosaics(output: str, tiles: Sequence[str]) -> dict[str, str]:
    """Write ``<output>/cog/<variable>.vrt`` mosaics of the tiles' COGs (paths relative to the VRT),
    then the manifest naming the tiles (written last).

    Variables without any tile COG are skipped; tiles lacking a variable are left out of that
    mosaic with a warning.  Raises :class:`OutputError` if no tile has any COG.
    """
    cog_dir = storage.join(output, "cog")
    fs, _ = storage.get_fs(cog_dir)
    written = {}
    for var in ALL_VARIABLES:
        urls = {t: storage.join(cog_dir, t, f"{var}.tif") for t in sorted(set(tiles))}
        present = [u for u in urls.values() if fs.exists(storage.get_fs(u)[1])]
        if not present:
            continue
        if len(present) < len(urls):
            missing = sorted(t for t, u in urls.items() if u not in present)
            log.warning("mosaic %s.vrt leaves out tiles without %s.tif: %s", var, var, missing)
        written[var] = write_vrt(storage.join(cog_dir, f"{var}.vrt"), present)
    if not written:
        raise OutputError(
            f"no tile COGs under {cog_dir} for tiles {list(tiles)}; write them first "
            "(outputs.repo.write_tile_cogs)"
        )
    manifest = json.dumps({"tiles": sorted(set(tiles)), "variables": sorted(written)},
                          indent=1).encode()  # fmt: skip
    storage.publish_bytes(manifest, storage.join(cog_dir, MOSAIC_MANIFEST))
    return written
