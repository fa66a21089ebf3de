"""Synthetic FORCE Level-2 datacubes with real folder and file names (demo, tests, benchmarks).

:func:`make_cube` writes ``datacube-definition.prj`` and, per tile, Sentinel-2 BOA + QAI GeoTIFFs
on the community-cube grid (EPSG:3035), plus a known species map (``truth``) and a forest mask.
Each species has its own phenology, so a small sequence model can learn to separate them; clouds,
buffers, cirrus, shadows, snow and swath edges are flagged in QAI as FORCE does.  Output files
are byte-identical for the same arguments.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..io.discovery import S2_BANDS, parse_tile_id
from . import phenology as ph

__all__ = [
    "FORCE_LAEA_WKT", "ORIGIN", "PRJ_WKTS", "SPECIES", "SyntheticCube", "make_cube",
    "sample_pixels",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Class names, ids 0..4 (the order of the published SITS-NN 5-class models).
SPECIES = ("Spruce", "Beech", "Pine", "Douglas fir", "Oak")
#: Community-cube grid origin: (lon, lat) and LAEA Europe map coordinates of 25 W / 60 N.
ORIGIN = (-25.0, 60.0, 2456026.363042, 4574919.607965)
PIXEL = 10.0
LAYOUTS = ("strips", "cog")
PRJ_FORMATS = ("old", "new")
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
_GRIDS = {
    "EPSG:3035": ORIGIN,
    "EPSG:32632": (None, None, 200000.0, 6100000.0),
    "EPSG:32633": (None, None, 200000.0, 6100000.0),
}
_S2_SENSORS = ("SEN2A", "SEN2B", "SEN2C", "SEN2D")


@dataclass(frozen=True)
class SyntheticCube:
    """What :func:`make_cube` wrote, and the known answers."""

    root: str
    tiles: tuple[str, ...]
    dates: tuple[dt.date, ...]
    class_names: tuple[str, ...]
    truth_dir: str
    mask_dir: str

    def truth(self, tile: str) -> np.ndarray:
        """(H, W) uint8 species id of ``tile``; 255 = non-forest."""
        import rasterio

        with rasterio.open(Path(self.truth_dir) / tile / "species.tif") as src:
            return src.read(1)

    def forest(self, tile: str) -> np.ndarray:
        """(H, W) bool forest pixels of ``tile`` (those with a species)."""
        return self.truth(tile) != ph.NON_FOREST


def make_cube(
    root: str | Path,
    tiles: Sequence[str] = ("X0069_Y0043",),
    size: int = 200,
    n_scenes: int = 40,
    start: str | dt.date = "2020-03-01",
    end: str | dt.date = "2023-08-30",
    sensors: Sequence[str] = ("SEN2A", "SEN2B", "SEN2C"),
    layout: str = "strips",
    prj_format: str = "old",
    crs: str = "EPSG:3035",
    prj_wkt: str = "gdal",
    cloud_fraction: float = 0.25,
    forest_fraction: float = 0.6,
    forest_scale: float | None = None,
    write_qai: bool = True,
    with_masks: bool = True,
    mask_dir: str | None = None,
    truth_dir: str | None = None,
    seed: int = 0,
) -> SyntheticCube:
    """Write a synthetic FORCE Level-2 cube under ``root``; returns its description.

    ``layout="strips"``: FORCE < 3.8 files (full-width strips of ``size // 10`` rows, LZW +
    predictor 2, band-interleaved BigTIFF); ``"cog"``: FORCE >= 3.8 COGs (256 x 256 tiles, ZSTD).
    ``prj_format``: ``"old"`` 7-line or ``"new"`` ``KEY = value`` ``datacube-definition.prj``;
    ``crs`` the grid (``EPSG:3035``, the community cube's, or ``EPSG:32632`` / ``EPSG:32633``);
    ``prj_wkt`` how the .prj spells it (:data:`PRJ_WKTS`).  Tile folders also hold what FORCE
    writes beside BOA and QAI (CLD, HOT, VZN, AOD, WVP, DST, OVV quicklooks, ``.aux.xml``, a
    Landsat scene) and the root a tile-list file and a ``mosaic/`` folder of VRTs: discovery must
    ignore them.
    Truth maps go to ``truth_dir`` (default ``<root>/../truth``), masks to ``mask_dir``
    (default ``<root>/../masks``).  Same arguments, same bytes; the species map of a tile
    depends only on ``seed``, the tile id, ``size``, ``forest_fraction`` and ``forest_scale`` (the
    width of forest patches in pixels; default ``size / 5``, at most 60).  Nothing is deleted:
    give an empty ``root`` (a warning names stale scenes).  Memory is about 2 GB for a 3000 px
    tile; 1000 px x 60 scenes takes about 15 s on 2 cores.
    """
    tiles = tuple(dict.fromkeys(str(t).strip() for t in tiles))
    start_d, end_d = _as_date(start, "start"), _as_date(end, "end")
    _validate(tiles, size, n_scenes, (start_d, end_d), sensors, layout, prj_format, seed)
    _validate_crs(crs, prj_wkt)
    for name, v in (("cloud_fraction", cloud_fraction), ("forest_fraction", forest_fraction)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name}={v} must be between 0 and 1")
    root_p = Path(root).resolve()
    truth_p = Path(truth_dir).resolve() if truth_dir else root_p.parent / "truth"
    mask_p = Path(mask_dir).resolve() if mask_dir else root_p.parent / "masks"
    root_p.mkdir(parents=True, exist_ok=True)
    _write_prj(root_p, size * PIXEL, prj_format, crs, prj_wkt)

    rng = np.random.default_rng(np.random.SeedSequence(seed))
    dates = _acquisition_dates(rng, start_d, end_d, n_scenes)
    names = [f"{d:%Y%m%d}_LEVEL2_{sensors[i % len(sensors)]}" for i, d in enumerate(dates)]
    weather = ph.weather_for_dates(rng, dates, cloud_fraction)
    t_all = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="synthetic-write") as pool:
        pending: deque[Future] = deque()
        for tile in tiles:
            t0 = time.perf_counter()
            tx, ty = parse_tile_id(tile)
            key = (tx & 0xFFFFFFFF, ty & 0xFFFFFFFF)
            transform = _tile_transform(tx, ty, size, crs)
            tile_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
            species = ph.species_map(tile_rng, size, forest_fraction, len(SPECIES), forest_scale)
            sig = ph.tile_signal(tile_rng, species)
            folder = root_p / tile
            folder.mkdir(parents=True, exist_ok=True)
            _warn_stale(folder, names)
            _write_single(
                truth_p / tile / "species.tif", species, transform, crs, nodata=ph.NON_FOREST
            )
            if with_masks:
                forest = sig.forest.astype(np.uint8)
                _write_single(mask_p / tile / "mask.tif", forest, transform, crs)
            for i, (d, name, w) in enumerate(zip(dates, names, weather, strict=True)):
                scene_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*key, i)))
                boa, qai = ph.render_scene(scene_rng, sig, w, d.timetuple().tm_yday)
                while len(pending) >= 3:  # bound memory: at most 3 scenes queued for writing
                    pending.popleft().result()
                pending.append(
                    pool.submit(
                        _write_scene,
                        folder,
                        name,
                        boa,
                        qai if write_qai else None,
                        transform,
                        layout,
                        crs,
                    )
                )
            _write_distractors(folder, names[0], dates[0], transform, crs)
            log.info(
                "synthetic tile %s: %d scenes of %d x %d px generated in %.1f s",
                tile,
                len(dates),
                size,
                size,
                time.perf_counter() - t0,
            )
        while pending:
            pending.popleft().result()
    _write_root_extras(root_p, tiles, names[0])
    log.info(
        "synthetic cube %s: %d tiles written in %.1f s",
        root_p,
        len(tiles),
        time.perf_counter() - t_all,
    )
    return SyntheticCube(
        root=str(root_p),
        tiles=tiles,
        dates=tuple(dates),
        class_names=SPECIES,
        truth_dir=str(truth_p),
        mask_dir=str(mask_p),
    )


def sample_pixels(
    cube: SyntheticCube, tile: str, n_per_class: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random labelled forest pixels of ``tile``: ``rows, cols, labels`` (int64).

    Up to ``n_per_class`` pixels per species (all of a species' pixels when it has fewer).
    """
    if n_per_class < 1:
        raise ConfigError(f"n_per_class must be >= 1, got {n_per_class}")
    truth = cube.truth(tile)
    rng = np.random.default_rng(seed)
    picks = []
    for k in range(len(cube.class_names)):
        idx = np.flatnonzero(truth.ravel() == k)
        if idx.size > n_per_class:
            idx = np.sort(rng.choice(idx, n_per_class, replace=False))
        picks.append(idx)
    flat = np.concatenate(picks).astype(np.int64)
    rows, cols = np.divmod(flat, truth.shape[1])
    return rows, cols, truth.ravel()[flat].astype(np.int64)


# --------------------------------------------------------------------------------------- helpers
def _as_date(value: str | dt.date, name: str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"{name}={value!r} is not a date; use YYYY-MM-DD") from None


def _validate(
    tiles: tuple[str, ...],
    size: int,
    n_scenes: int,
    period: tuple[dt.date, dt.date],
    sensors: Sequence[str],
    layout: str,
    prj_format: str,
    seed: int,
) -> None:
    start, end = period
    if not tiles:
        raise ConfigError("tiles is empty; give at least one tile id such as X0069_Y0043")
    for t in tiles:
        parse_tile_id(t)
    if size < 16:
        raise ConfigError(f"size={size} is too small; use at least 16 px per tile edge")
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is unknown; use one of {', '.join(LAYOUTS)}")
    if prj_format not in PRJ_FORMATS:
        raise ConfigError(
            f"prj_format={prj_format!r} is unknown; use one of {', '.join(PRJ_FORMATS)}"
        )
    if not sensors or any(s not in _S2_SENSORS for s in sensors):
        raise ConfigError(
            f"sensors={tuple(sensors)!r}: only Sentinel-2 sensors {_S2_SENSORS} are generated"
        )
    n_days = (end - start).days + 1
    if n_days < 1:
        raise ConfigError(f"end {end} is before start {start}")
    if not 1 <= n_scenes <= n_days:
        raise ConfigError(
            f"n_scenes={n_scenes} must be between 1 and the {n_days} days from {start} to {end}"
        )
    if seed < 0:
        raise ConfigError(f"seed={seed} must be >= 0")


def _acquisition_dates(
    rng: np.random.Generator, start: dt.date, end: dt.date, n: int
) -> list[dt.date]:
    """``n`` distinct, irregular dates in [start, end], ascending."""
    n_days = (end - start).days + 1
    offsets = np.sort(rng.choice(n_days, n, replace=False))
    return [start + dt.timedelta(days=int(o)) for o in offsets]


def _validate_crs(crs: str, prj_wkt: str) -> None:
    if crs not in _GRIDS:
        raise ConfigError(f"crs={crs!r} is not generated; use one of {', '.join(_GRIDS)}")
    if prj_wkt not in PRJ_WKTS:
        raise ConfigError(f"prj_wkt={prj_wkt!r} is unknown; use one of {', '.join(PRJ_WKTS)}")
    if prj_wkt.startswith("force") and crs != "EPSG:3035":
        raise ConfigError(f"prj_wkt={prj_wkt!r} is FORCE's WKT of EPSG:3035, not of {crs}")


def _origin(crs: str) -> tuple[float, float, float, float]:
    lon, lat, x, y = _GRIDS[crs]
    if lon is None:
        from rasterio.warp import transform

        (lon,), (lat,) = transform(crs, "EPSG:4326", [x], [y])
    return lon, lat, x, y


def _tile_transform(tx: int, ty: int, size: int, crs: str = "EPSG:3035"):
    from affine import Affine

    _, _, x, y = _GRIDS[crs]
    tile_size = size * PIXEL
    return Affine(PIXEL, 0.0, x + tx * tile_size, 0.0, -PIXEL, y - ty * tile_size)


def _crs(crs: str = "EPSG:3035"):
    from rasterio.crs import CRS

    return CRS.from_user_input(crs)


def _prj_wkt(crs: str, prj_wkt: str) -> str:
    import re

    if prj_wkt == "force":
        return FORCE_LAEA_WKT
    if prj_wkt == "force-no-towgs84":
        return FORCE_LAEA_WKT.replace("TOWGS84[0,0,0,0,0,0,0],", "")
    if prj_wkt == "no-authority":
        import pyproj

        return re.sub(r',AUTHORITY\["[^"]+","[^"]+"\]', "", pyproj.CRS(crs).to_wkt("WKT1_GDAL"))
    return _crs(crs).to_wkt()


def _write_prj(root: Path, tile_size: float, prj_format: str, crs: str, prj_wkt: str) -> None:
    wkt = _prj_wkt(crs, prj_wkt)
    lon, lat, x, y = _origin(crs)
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


def _profile(layout: str, size: int, count: int, transform, nodata: int, crs: str) -> dict:
    base = {
        "dtype": "int16",
        "count": count,
        "width": size,
        "height": size,
        "crs": _crs(crs),
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


def _write_scene(
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
        folder / f"{name}_BOA.tif", "w", **_profile(layout, size, 10, transform, ph.NODATA, crs)
    ) as dst:
        dst.write(boa)
        dst.descriptions = S2_BANDS
    if qai is not None:
        with rasterio.open(
            folder / f"{name}_QAI.tif", "w", **_profile(layout, size, 1, transform, 1, crs)
        ) as dst:
            dst.write(qai[None])


def _write_single(
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
        crs=_crs(crs),
        transform=transform,
        nodata=nodata,
        compress="deflate",
    ) as dst:
        dst.write(data)


def _warn_stale(folder: Path, names: Sequence[str]) -> None:
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


def _write_distractors(folder: Path, name: str, date: dt.date, transform, crs: str) -> None:
    """Files a FORCE tile folder holds besides BOA and QAI, which discovery must ignore (tiny):
    the other products, a quicklook, GDAL's ``.aux.xml`` and a Landsat 8 scene (6 bands, 30 m)."""
    from affine import Affine

    (folder / f"{name}_OVV.jpg").write_bytes(b"\xff\xd8\xff\xd9")  # an empty JPEG
    for product in _OTHER_PRODUCTS:
        _write_single(folder / f"{name}_{product}.tif", np.zeros((1, 1), np.uint8), transform, crs)
    (folder / f"{name}_BOA.tif.aux.xml").write_text(
        '<PAMDataset><Metadata><MDI key="FORCE">statistics</MDI></Metadata></PAMDataset>\n'
    )
    landsat = f"{date:%Y%m%d}_LEVEL2_LND08"
    coarse = transform @ Affine.scale(3.0)
    boa = np.full((6, 2, 2), ph.NODATA, np.int16)
    _write_single(folder / f"{landsat}_BOA.tif", boa, coarse, crs, nodata=ph.NODATA)
    _write_single(folder / f"{landsat}_QAI.tif", np.ones((1, 2, 2), np.int16), coarse, crs, 1)


def _write_root_extras(root: Path, tiles: Sequence[str], name: str) -> None:
    """What sits next to the tiles of a real cube: a FORCE tile-list file and the VRT mosaics
    ``force-mosaic`` writes into ``mosaic/``."""
    (root / "tiles.txt").write_text(f"{len(tiles)}\n" + "".join(f"{t}\n" for t in tiles))
    mosaic = root / "mosaic"
    mosaic.mkdir(exist_ok=True)
    sources = "".join(
        f'<SourceFilename relativeToVRT="1">../{t}/{name}_BOA.tif</SourceFilename>' for t in tiles
    )
    (mosaic / f"{name}_BOA.vrt").write_text(f"<VRTDataset>{sources}</VRTDataset>\n")
