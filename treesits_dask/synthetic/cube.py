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
from ..io.discovery import parse_tile_id
from . import phenology as ph
from .files import (
    FORCE_LAEA_WKT,
    ORIGIN,
    PIXEL,
    PRJ_WKTS,
    tile_transform,
    validate_crs,
    warn_stale,
    write_other_files,
    write_prj,
    write_root_extras,
    write_scene,
    write_single,
)
from .parallel import auto_processes, write_scenes_parallel

__all__ = [
    "FORCE_LAEA_WKT", "ORIGIN", "PRJ_WKTS", "SPECIES", "ClearCut", "SyntheticCube", "make_cube",
    "sample_pixels",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Class names, ids 0..4 (the order of the published SITS-NN 5-class models).
SPECIES = ("Spruce", "Beech", "Pine", "Douglas fir", "Oak")
LAYOUTS = ("strips", "cog")
PRJ_FORMATS = ("old", "new")
_S2_SENSORS = ("SEN2A", "SEN2B", "SEN2C", "SEN2D")


@dataclass(frozen=True)
class ClearCut:
    """A forest disturbance: the forest pixels of a rectangle of ``tile`` (rows ``row`` ..
    ``row + height``, columns ``col`` .. ``col + width``) are clear-cut on ``date``: scenes from
    that date on show bare soil and slash there."""

    tile: str
    date: dt.date
    row: int
    col: int
    height: int
    width: int


@dataclass(frozen=True)
class SyntheticCube:
    """What :func:`make_cube` wrote, and the known answers."""

    root: str
    tiles: tuple[str, ...]
    dates: tuple[dt.date, ...]
    class_names: tuple[str, ...]
    truth_dir: str
    mask_dir: str
    clear_cuts: tuple[ClearCut, ...] = ()

    def disturbance(self, tile: str) -> np.ndarray:
        """(H, W) int32 date of the clear-cut of each pixel of ``tile``, days since 1970-01-01
        (0 = not disturbed)."""
        import rasterio

        with rasterio.open(Path(self.truth_dir) / tile / "disturbance.tif") as src:
            return src.read(1)

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
    clear_cuts: Sequence[ClearCut] = (),
    processes: int | None = None,
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
    give an empty ``root`` (a warning names stale scenes).  ``processes``: scenes rendered and
    written at once in separate processes (default: one in-process for small cubes, else every
    core, as many as the free memory holds, about 1.5 GB each at 3000 px); the bytes do not
    depend on it.  Memory is about 2 GB for a 3000 px tile plus the processes; 1000 px x 60
    scenes takes about 15 s on 2 cores.  ``clear_cuts`` (:class:`ClearCut`) disturb forest stands
    from a date on; the date of each disturbed pixel goes to ``<truth_dir>/<tile>/disturbance.tif``
    (days since 1970-01-01, 0 = none; written for every tile).  Without clear-cuts the files are
    those of earlier versions, byte for byte.
    """
    tiles = tuple(dict.fromkeys(str(t).strip() for t in tiles))
    start_d, end_d = _as_date(start, "start"), _as_date(end, "end")
    _validate(tiles, size, n_scenes, (start_d, end_d), sensors, layout, prj_format, seed)
    validate_crs(crs, prj_wkt)
    for name, v in (("cloud_fraction", cloud_fraction), ("forest_fraction", forest_fraction)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"{name}={v} must be between 0 and 1")
    root_p = Path(root).resolve()
    truth_p = Path(truth_dir).resolve() if truth_dir else root_p.parent / "truth"
    mask_p = Path(mask_dir).resolve() if mask_dir else root_p.parent / "masks"
    root_p.mkdir(parents=True, exist_ok=True)
    write_prj(root_p, size * PIXEL, prj_format, crs, prj_wkt)

    rng = np.random.default_rng(np.random.SeedSequence(seed))
    dates = _acquisition_dates(rng, start_d, end_d, n_scenes)
    names = [f"{d:%Y%m%d}_LEVEL2_{sensors[i % len(sensors)]}" for i, d in enumerate(dates)]
    weather = ph.weather_for_dates(rng, dates, cloud_fraction)
    processes = processes or auto_processes(size, n_scenes)
    t_all = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="synthetic-write") as pool:
        pending: deque[Future] = deque()
        for tile in tiles:
            t0 = time.perf_counter()
            tx, ty = parse_tile_id(tile)
            key = (tx & 0xFFFFFFFF, ty & 0xFFFFFFFF)
            transform = tile_transform(tx, ty, size, crs)
            tile_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))
            species = ph.species_map(tile_rng, size, forest_fraction, len(SPECIES), forest_scale)
            sig = ph.tile_signal(tile_rng, species)
            folder = root_p / tile
            folder.mkdir(parents=True, exist_ok=True)
            warn_stale(folder, names)
            write_single(
                truth_p / tile / "species.tif", species, transform, crs, nodata=ph.NON_FOREST
            )
            cut_day = _clear_cut_days(clear_cuts, tile, sig.forest)
            write_single(truth_p / tile / "disturbance.tif", cut_day, transform, crs, nodata=0)
            if with_masks:
                forest = sig.forest.astype(np.uint8)
                write_single(mask_p / tile / "mask.tif", forest, transform, crs)
            cuts = cut_day if clear_cuts else None
            days = [(d - _EPOCH).days for d in dates]
            if processes > 1:
                doys = [d.timetuple().tm_yday for d in dates]
                write_scenes_parallel(
                    sig, folder, names, weather, doys, seed, key, write_qai, transform, layout,
                    crs, processes, cuts, days,
                )  # fmt: skip
            else:
                _write_scenes(pool, pending, sig, folder, names, dates, weather, seed, key,
                              write_qai, transform, layout, crs, cuts)  # fmt: skip
            write_other_files(folder, names[0], dates[0], transform, crs)
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
    write_root_extras(root_p, tiles, names[0])
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
        clear_cuts=tuple(clear_cuts),
    )


_EPOCH = dt.date(1970, 1, 1)


def _clear_cut_days(cuts: Sequence[ClearCut], tile: str, forest: np.ndarray) -> np.ndarray:
    """(H, W) int32 days since 1970-01-01 of each forest pixel's clear-cut (0 = none)."""
    out = np.zeros(forest.shape, dtype=np.int32)
    for cut in cuts:
        if cut.tile != tile:
            continue
        if min(cut.row, cut.col) < 0 or cut.height < 1 or cut.width < 1:
            raise ConfigError(f"clear-cut {cut} must be a non-empty rectangle inside the tile")
        rect = (slice(cut.row, cut.row + cut.height), slice(cut.col, cut.col + cut.width))
        day = (_as_date(cut.date, "clear-cut date") - _EPOCH).days
        first = np.where(out[rect] > 0, np.minimum(out[rect], day), day)
        out[rect] = np.where(forest[rect], first, 0)
    return out


def _write_scenes(
    pool,
    pending,
    sig,
    folder,
    names,
    dates,
    weather,
    seed,
    key,
    write_qai,
    transform,
    layout,
    crs,
    cut_day=None,
) -> None:
    """Render the scenes in this process, written by ``pool`` (at most 3 queued: bounded memory).
    ``cut_day``: the clear-cut day of each pixel (0 = none), or None."""
    for i, (d, name, w) in enumerate(zip(dates, names, weather, strict=True)):
        scene_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*key, i)))
        cut = None if cut_day is None else (cut_day > 0) & (cut_day <= (d - _EPOCH).days)
        boa, qai = ph.render_scene(scene_rng, sig, w, d.timetuple().tm_yday, cut)
        while len(pending) >= 3:
            pending.popleft().result()
        pending.append(
            pool.submit(
                write_scene, folder, name, boa, qai if write_qai else None, transform, layout, crs
            )
        )  # fmt: skip


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
