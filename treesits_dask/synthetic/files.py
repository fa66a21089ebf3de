"""The files of a synthetic FORCE cube, as FORCE writes them: ``datacube-definition.prj`` (both
formats, the WKT variants found in real cubes), BOA and QAI GeoTIFFs (striped or COG), the other
files FORCE writes into a tile folder, and what sits next to the tiles."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..io.discovery import S2_BANDS
from . import phenology as ph

__all__ = [
    "FORCE_LAEA_WKT", "GRIDS", "ORIGIN", "PIXEL", "PRJ_WKTS", "crs_of", "grid_origin",
    "prj_wkt_text", "scene_profile", "tile_transform", "validate_crs", "warn_stale",
    "write_other_files", "write_prj", "write_root_extras", "write_scene", "write_single",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Community-cube grid origin: (lon, lat) and LAEA Europe map coordinates of 25 W / 60 N.
ORIGIN = (-25.0, 60.0, 2456026.363042, 4574919.607965)
PIXEL = 10.0
#: The WKT that FORCE parameter files (and so ``datacube-definition.prj`` of the community cube)
#: carry for EPSG:3035: named "ETRS89 / LAEA Europe", with a zero ``TOWGS84``.  GDAL writes the
#: GeoTIFFs with the EPSG code, which PROJ >= 9 reads back as "ETRS89-extended / LAEA Europe".
FORCE_LAEA_WKT = (
    'PROJCS["ETRS89 / LAEA Europe",GEOGCS["ETRS89",DATUM["European_Terrestrial_Reference_System_'
    '1989",SPHEROID["GRS 1980",6378137,298.257222101,AUTHORITY["EPSG","7019"]],TOWGS84[0,0,0,0,'
    '0,0,0],AUTHORITY["EPSG","6258"]],PRIMEM["Greenwich",0,AUTHORITY["EPSG","8901"]],UNIT["degree'
    '",0.0174532925199433,AUTHORITY["EPSG","9122"]],AUTHORITY["EPSG","4258"]],PROJECTION["Lambert'
    '_Azimuthal_Equal_Area"],PARAMETER["latitude_of_center",52],PARAMETER["longitude_of_center",1'
    '0],PARAMETER["false_easting",4321000],PARAMETER["false_northing",3210000],UNIT["metre",1,AUT'
    'HORITY["EPSG","9001"]],AUTHORITY["EPSG","3035"]]'
)
#: What ``datacube-definition.prj`` says about the CRS (the scene files always carry the EPSG
#: code, as GDAL writes them): ``gdal`` the WKT GDAL makes of that code; ``force`` /
#: ``force-no-towgs84`` FORCE's WKT of EPSG:3035 with / without ``TOWGS84``; ``no-authority`` the
#: WKT1 of the code without any ``AUTHORITY`` (as older tools write UTM grids)
PRJ_WKTS = ("gdal", "force", "force-no-towgs84", "no-authority")
#: grid origins per CRS: (lon, lat, map x, map y) of the upper-left corner of tile X0000_Y0000
GRIDS = {
    "EPSG:3035": ORIGIN,
    "EPSG:32632": (None, None, 200000.0, 6100000.0),
    "EPSG:32633": (None, None, 200000.0, 6100000.0),
}


def validate_crs(crs: str, prj_wkt: str) -> None:
    if crs not in GRIDS:
        raise ConfigError(f"crs={crs!r} is not generated; use one of {', '.join(GRIDS)}")
    if prj_wkt not in PRJ_WKTS:
        raise ConfigError(f"prj_wkt={prj_wkt!r} is unknown; use one of {', '.join(PRJ_WKTS)}")
    if prj_wkt.startswith("force") and crs != "EPSG:3035":
        raise ConfigError(f"prj_wkt={prj_wkt!r} is FORCE's WKT of EPSG:3035, not of {crs}")


def grid_origin(crs: str) -> tuple[float, float, float, float]:
    lon, lat, x, y = GRIDS[crs]
    if lon is None:
        from rasterio.warp import transform

        (lon,), (lat,) = transform(crs, "EPSG:4326", [x], [y])
    return lon, lat, x, y


def tile_transform(tx: int, ty: int, size: int, crs: str = "EPSG:3035"):
    from affine import Affine

    _, _, x, y = GRIDS[crs]
    tile_size = size * PIXEL
    return Affine(PIXEL, 0.0, x + tx * tile_size, 0.0, -PIXEL, y - ty * tile_size)


def crs_of(crs: str = "EPSG:3035"):
    from rasterio.crs import CRS

    return CRS.from_user_input(crs)


def prj_wkt_text(crs: str, prj_wkt: str) -> str:
    import re

    if prj_wkt == "force":
        return FORCE_LAEA_WKT
    if prj_wkt == "force-no-towgs84":
        return FORCE_LAEA_WKT.replace("TOWGS84[0,0,0,0,0,0,0],", "")
    if prj_wkt == "no-authority":
        import pyproj

        return re.sub(r',AUTHORITY\["[^"]+","[^"]+"\]', "", pyproj.CRS(crs).to_wkt("WKT1_GDAL"))
    return crs_of(crs).to_wkt()


def write_prj(root: Path, tile_size: float, prj_format: str, crs: str, prj_wkt: str) -> None:
    wkt = prj_wkt_text(crs, prj_wkt)
    lon, lat, x, y = grid_origin(crs)
    if prj_format == "old":
        lines = [
            wkt,
            f"{lon:.6f}",
            f"{lat:.6f}",
            f"{x:.6f}",
            f"{y:.6f}",
            f"{tile_size:.6f}",
            f"{tile_size / 10:.6f}",
        ]
    else:
        lines = [
            f"PROJECTION = {wkt}",
            f"ORIGIN_GEO_X = {lon:.6f}",
            f"ORIGIN_GEO_Y = {lat:.6f}",
            f"ORIGIN_MAP_X = {x:.6f}",
            f"ORIGIN_MAP_Y = {y:.6f}",
            f"TILE_SIZE_X = {tile_size:.6f}",
            f"TILE_SIZE_Y = {tile_size:.6f}",
        ]
    (root / "datacube-definition.prj").write_text("\n".join(lines) + "\n")


def scene_profile(layout: str, size: int, count: int, transform, nodata: int, crs: str) -> dict:
    base = {
        "dtype": "int16",
        "count": count,
        "width": size,
        "height": size,
        "crs": crs_of(crs),
        "transform": transform,
        "nodata": nodata,
    }
    if layout == "strips":
        return dict(
            base,
            driver="GTiff",
            tiled=False,
            blockysize=max(1, size // 10),
            compress="lzw",
            predictor=2,
            interleave="band",
            BIGTIFF="YES",
        )
    return dict(
        base,
        driver="COG",
        blocksize=256,
        compress="zstd",
        predictor="YES",
        overviews="NONE",
        level=1,
    )


def write_scene(
    folder: Path,
    name: str,
    boa: np.ndarray,
    qai: np.ndarray | None,
    transform,
    layout: str,
    crs: str = "EPSG:3035",
) -> None:
    import rasterio

    size = boa.shape[-1]
    with rasterio.open(
        folder / f"{name}_BOA.tif",
        "w",
        **scene_profile(layout, size, 10, transform, ph.NODATA, crs),
    ) as dst:
        dst.write(boa)
        dst.descriptions = S2_BANDS
    if qai is not None:
        with rasterio.open(
            folder / f"{name}_QAI.tif", "w", **scene_profile(layout, size, 1, transform, 1, crs)
        ) as dst:
            dst.write(qai[None])


def write_single(
    path: Path, data: np.ndarray, transform, crs: str = "EPSG:3035", nodata: int | None = None
) -> None:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    if data.ndim == 2:
        data = data[None]
    count, h, w = data.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        dtype=data.dtype.name,
        count=count,
        width=w,
        height=h,
        crs=crs_of(crs),
        transform=transform,
        nodata=nodata,
        compress="deflate",
    ) as dst:
        dst.write(data)


def warn_stale(folder: Path, names: Sequence[str]) -> None:
    """Never delete anything: only say when a folder holds FORCE scenes this call does not write."""
    keep = set(names)
    stale = [
        p.name
        for p in folder.glob("*_LEVEL2_SEN2*_BOA.tif")
        if p.name.removesuffix("_BOA.tif") not in keep
    ]
    if stale:
        log.warning(
            "%s already holds %d BOA files that this synthetic cube does not contain (e.g. %s); "
            "they will be discovered with it: use an empty root",
            folder,
            len(stale),
            min(stale),
        )


#: products FORCE writes beside BOA and QAI (one small file each is enough for discovery)
_OTHER_PRODUCTS = ("CLD", "HOT", "VZN", "AOD", "WVP", "DST")


def write_other_files(folder: Path, name: str, date: dt.date, transform, crs: str) -> None:
    """Files a FORCE tile folder holds besides BOA and QAI, which discovery must ignore (tiny):
    the other products, a quicklook, GDAL's ``.aux.xml`` and a Landsat 8 scene (6 bands, 30 m)."""
    from affine import Affine

    (folder / f"{name}_OVV.jpg").write_bytes(b"\xff\xd8\xff\xd9")  # an empty JPEG
    for product in _OTHER_PRODUCTS:
        write_single(folder / f"{name}_{product}.tif", np.zeros((1, 1), np.uint8), transform, crs)
    (folder / f"{name}_BOA.tif.aux.xml").write_text(
        '<PAMDataset><Metadata><MDI key="FORCE">statistics</MDI></Metadata></PAMDataset>\n'
    )
    landsat = f"{date:%Y%m%d}_LEVEL2_LND08"
    coarse = transform @ Affine.scale(3.0)
    boa = np.full((6, 2, 2), ph.NODATA, np.int16)
    write_single(folder / f"{landsat}_BOA.tif", boa, coarse, crs, nodata=ph.NODATA)
    write_single(folder / f"{landsat}_QAI.tif", np.ones((1, 2, 2), np.int16), coarse, crs, 1)


def write_root_extras(root: Path, tiles: Sequence[str], name: str) -> None:
    """What sits next to the tiles of a real cube: a FORCE tile-list file and the VRT mosaics
    ``force-mosaic`` writes into ``mosaic/``."""
    (root / "tiles.txt").write_text(f"{len(tiles)}\n" + "".join(f"{t}\n" for t in tiles))
    mosaic = root / "mosaic"
    mosaic.mkdir(exist_ok=True)
    sources = "".join(
        f'<SourceFilename relativeToVRT="1">../{t}/{name}_BOA.tif</SourceFilename>' for t in tiles
    )
    (mosaic / f"{name}_BOA.vrt").write_text(f"<VRTDataset>{sources}</VRTDataset>\n")
