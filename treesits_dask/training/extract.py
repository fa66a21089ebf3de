"""Time series of reference samples read from the FORCE cube with the same code as inference.

Points are reprojected to the cube CRS, assigned to their FORCE tile
(:meth:`~treesits_dask.io.discovery.CubeDefinition.tile_of`) and pixel, and read through
:func:`~treesits_dask.io.cube.tile_cube` (QAI screening included), grouped per tile and window
so that every window holding samples is read once, all in one Dask computation.  The scene window
of a tile is chosen like inference (:func:`~treesits_dask.models.effective_window`).

All samples share one time axis: the union of their tiles' (date, sensor) steps in ascending
order; a step a sample's tile does not have is an invalid observation.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..config import DEFAULT_QAI_FLAGS, SampleSettings
from ..errors import ConfigError, DiscoveryError, InputDataError
from ..io import discovery, storage
from ..io.crs import same_crs
from ..io.cube import NODATA, days_since_epoch, tile_cube
from ..io.discovery import S2_BANDS
from ..io.grid import WindowLayout, choose_window_shape
from ..models import ModelCard, effective_window
from ..pipeline.checks import checked_scenes
from .points import ReferencePoints, read_points
from .samples import SampleSet, encode_labels

__all__ = ["extract_pixels", "extract_points", "load_samples"]

log = logging.getLogger(__name__)


def extract_pixels(
    scenes: Sequence[discovery.Scene],
    grid,
    rows: Sequence[int],
    cols: Sequence[int],
    qai_flags: Sequence[str] = DEFAULT_QAI_FLAGS,
    window_shape: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Time series of the pixels ``(rows, cols)`` of one tile, through :func:`open_cube`.

    Each window that holds a pixel is read once (one Dask task per window, computed together).
    Returns ``series`` (N, T, 10) int16 (-9999 invalid), ``valid`` (N, T) bool, ``days`` (T,) int64.
    """
    series = _read_tile_pixels(
        scenes, grid, np.asarray(rows), np.asarray(cols), qai_flags, window_shape
    )
    return series, (series != NODATA).all(axis=2), days_since_epoch([s.date for s in scenes])


def _window_tasks(
    scenes, grid, rows, cols, qai_flags, window_shape, checked=()
) -> list[tuple[np.ndarray, Any]]:
    """Delayed reads: one per window holding pixels, each paired with the positions it fills;
    ``checked``: the scenes whose headers the driver checked (the workers check the others')."""
    import dask

    shape = choose_window_shape(grid, window_shape, len(scenes))
    data = tile_cube(scenes, grid, WindowLayout.of(grid, shape), qai_flags, checked=checked).data
    wi, wj = rows // shape[0], cols // shape[1]
    tasks = []
    for key in sorted(set(zip(wi.tolist(), wj.tolist(), strict=True))):
        pos = np.flatnonzero((wi == key[0]) & (wj == key[1]))
        block = data.blocks[0, 0, key[0], key[1]]
        r, c = rows[pos] - key[0] * shape[0], cols[pos] - key[1] * shape[1]
        tasks.append((pos, dask.delayed(_take_pixels)(block, r, c)))
    return tasks


def _take_pixels(block: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(T, 10, h, w) window -> (n, T, 10) series of the given pixels."""
    return np.ascontiguousarray(block[:, :, rows, cols].transpose(2, 0, 1))


def _read_tile_pixels(scenes, grid, rows, cols, qai_flags, window_shape) -> np.ndarray:
    import dask

    tasks = _window_tasks(scenes, grid, rows, cols, qai_flags, window_shape)
    values = dask.compute(*[t for _, t in tasks])
    out = np.empty((len(rows), len(scenes), grid.count), dtype=np.int16)
    for (pos, _), v in zip(tasks, values, strict=True):
        out[pos] = v
    return out


def _tile_scenes(settings: SampleSettings, tile: str, card: ModelCard | None):
    scenes = discovery.scene_table(settings.cube, tile, settings.sensors, with_details=False)
    if not scenes:
        raise DiscoveryError(
            f"tile {tile} holds samples but no BOA scenes of sensors {','.join(settings.sensors)}; "
            "check the 'sensors' setting"
        )
    if card is not None:
        start, end = effective_window(
            card, [s.date for s in scenes], settings.start_date, settings.end_date
        )
    else:
        start = settings.start_date or scenes[0].date
        end = settings.end_date or scenes[-1].date
    kept = [s for s in scenes if start <= s.date <= end]
    if not kept:
        raise DiscoveryError(
            f"tile {tile} has no scenes between {start} and {end} (its scenes span "
            f"{scenes[0].date} .. {scenes[-1].date}); adjust start_date / end_date"
        )
    return kept


def _to_cube_crs(points: ReferencePoints, crs_wkt: str) -> tuple[np.ndarray, np.ndarray]:
    from rasterio.crs import CRS
    from rasterio.warp import transform

    dst = CRS.from_wkt(crs_wkt)
    x, y = points.x.copy(), points.y.copy()
    crs = np.array(points.crs, dtype=object)
    for c in set(points.crs):
        sel = np.flatnonzero(crs == c)
        src = CRS.from_user_input(c)
        if not same_crs(src, dst):
            tx, ty = transform(src, dst, x[sel].tolist(), y[sel].tolist())
            x[sel], y[sel] = tx, ty
    return x, y


def extract_points(
    points: ReferencePoints,
    settings: SampleSettings,
    card: ModelCard | None = None,
) -> tuple[np.ndarray, list[tuple[int, str]], list[tuple[str, int, int]]]:
    """Time series of every point, read from ``settings.cube``.

    ``card`` (optional) decides the scene window like inference (SBERT: 1460 days up to the end).
    Returns ``series`` (N, T, 10) int16 on the union time axis, the ``(day, sensor)`` steps and
    each point's ``(tile, row, col)``.  Points outside the cube are an :class:`InputDataError`
    naming them.
    """
    import dask

    if not settings.cube:
        raise ConfigError(
            f"reading time series of the points in {points.source} needs the 'cube' setting "
            "(the FORCE Level-2 datacube root)"
        )
    definition = discovery.read_cube_definition(settings.cube)
    available = set(discovery.list_tiles(settings.cube))
    x, y = _to_cube_crs(points, definition.crs_wkt)
    tiles = []
    for i in range(len(points)):
        ok = np.isfinite(x[i]) and np.isfinite(y[i])
        tiles.append(definition.tile_of(float(x[i]), float(y[i])) if ok else "")
    outside = [i for i, t in enumerate(tiles) if t not in available]
    if outside:
        lines = "; ".join(f"{points.describe(i)} -> tile {tiles[i] or '?'}" for i in outside[:5])
        more = f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        raise InputDataError(
            f"{len(outside)} of {len(points)} samples of {points.source} lie outside the cube "
            f"{settings.cube} (no such tile folder): {lines}{more}. Check their CRS ('crs' setting "
            "or the file's), the 'cube' setting, or remove them"
        )
    tiles_arr = np.array(tiles)
    located: list[tuple[str, int, int]] = [("", 0, 0)] * len(points)
    plans = []
    for tile in sorted(available & set(tiles)):
        idx = np.flatnonzero(tiles_arr == tile)
        scenes = _tile_scenes(settings, tile, card)
        # every header read and checked on the driver, as run and open_cube do: a file of
        # another grid is named before anything is read, and each scene read in its layout
        scenes, grid = checked_scenes(definition, tile, scenes[0], scenes, settings.qai_flags)
        inv = ~grid.affine
        cols_f = inv.a * x[idx] + inv.b * y[idx] + inv.c
        rows_f = inv.d * x[idx] + inv.e * y[idx] + inv.f
        rows, cols = np.floor(rows_f).astype(np.int64), np.floor(cols_f).astype(np.int64)
        bad = np.flatnonzero((rows < 0) | (rows >= grid.height) | (cols < 0) | (cols >= grid.width))
        if bad.size:
            raise InputDataError(
                f"samples {[points.ids[idx[b]] for b in bad[:5]]} fall in tile {tile} by "
                "datacube-definition.prj but outside its raster; the tile's files do not cover it"
            )
        for k, i in enumerate(idx):
            located[i] = (tile, int(rows[k]), int(cols[k]))
        tasks = _window_tasks(scenes, grid, rows, cols, settings.qai_flags, settings.window_shape,
                              checked=scenes)  # fmt: skip
        steps = [((s.date - dt.date(1970, 1, 1)).days, s.sensor) for s in scenes]
        plans.append((idx, steps, tasks))
    log.info(
        "reading %d samples from %d tile(s), %d window(s)",
        len(points),
        len(plans),
        sum(len(p[2]) for p in plans),
    )
    values = iter(dask.compute(*[t for p in plans for _, t in p[2]]))
    union = sorted({s for _, steps, _ in plans for s in steps})
    position = {s: k for k, s in enumerate(union)}
    out = np.full((len(points), len(union), len(S2_BANDS)), NODATA, dtype=np.int16)
    for idx, steps, tasks in plans:
        cols_t = np.array([position[s] for s in steps])
        for pos, _ in tasks:
            out[np.ix_(idx[pos], cols_t)] = next(values)
    return out, union, located


def load_samples(
    settings: SampleSettings,
    class_names: Sequence[str] | None = None,
    card: ModelCard | None = None,
) -> SampleSet:
    """Read the samples of ``settings``: points (+ time series from the cube) or per-sample CSVs.

    ``class_names`` (else ``settings.class_names``) fixes the class order; ``card`` the scene
    window per tile like inference.  Samples without a valid observation are left out (warning).
    """
    names = class_names if class_names is not None else settings.class_names
    url = settings.samples
    fs, path = storage.get_fs(url)
    if fs.isdir(path):
        from .sample_csv import read_sample_csvs

        samples = read_sample_csvs(
            url,
            settings.label_column,
            settings.id_column,
            names,
            settings.sensors,
            settings.start_date,
            settings.end_date,
        )
        return samples.drop_empty()
    points = read_points(
        url,
        settings.label_column,
        settings.id_column,
        settings.x_column,
        settings.y_column,
        settings.crs,
        settings.layer,
    )
    codes, names = encode_labels(points.labels, names, points.ids, url)
    series, steps, located = extract_points(points, settings, card)
    return SampleSet(
        series=series,
        valid=(series != NODATA).all(axis=2),
        days=np.array([d for d, _ in steps], dtype=np.int64),
        sensors=tuple(s for _, s in steps),
        labels=codes,
        class_names=names,
        ids=points.ids,
        tiles=tuple(t for t, _, _ in located),
        source=url,
    ).drop_empty()
