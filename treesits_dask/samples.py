"""Reference samples for training and evaluation: labelled points (see :mod:`treesits_dask.points`)
whose time series are read from the FORCE cube with the same code as inference, or SITS-NN-style
per-sample CSVs (see :mod:`treesits_dask.sample_csv`).

Points are reprojected to the cube CRS, assigned to their FORCE tile
(:meth:`~treesits_dask.discovery.CubeDefinition.tile_of`) and pixel, and read through
:func:`~treesits_dask.cube.open_cube` (QAI screening included), grouped per tile and window so
that every window holding samples is read once, all in one Dask computation.  The scene window
of a tile is chosen like inference (:func:`~treesits_dask.models.effective_window`).

All samples share one time axis: the union of their tiles' (date, sensor) steps in ascending
order; a step a sample's tile does not have is an invalid observation.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from . import discovery, storage
from .config import _QAI_ALIASES, DEFAULT_QAI_FLAGS, QAI_FLAGS
from .cube import NODATA, choose_window_shape, open_cube, tile_grid
from .discovery import S2_BANDS
from .errors import ConfigError, DiscoveryError, InputDataError
from .points import ReferencePoints, read_points

if TYPE_CHECKING:  # pragma: no cover
    from .models import ModelCard

__all__ = [
    "SampleSet",
    "SampleSettings",
    "encode_labels",
    "extract_pixels",
    "extract_points",
    "load_samples",
    "pixel_centres",
]

log = logging.getLogger(__name__)

_WINDOW = re.compile(r"^\s*(\d+)\s*(?:[xX]\s*(\d+))?\s*$")


# ------------------------------------------------------------------------------------ data types
@dataclass(frozen=True)
class SampleSet:
    """Labelled time series on one time axis, ready for training and evaluation.

    ``series`` (N, T, 10) int16 raw BOA, -9999 where invalid; ``valid`` (N, T) bool; ``days`` (T,)
    int64 days since 1970-01-01 (ascending); ``sensors`` (T,) the FORCE sensor of each step
    (``""`` unknown); ``labels`` (N,) int64 indices into ``class_names``; ``ids`` and ``tiles``
    (``""`` for per-sample CSVs) per sample.
    """

    series: np.ndarray
    valid: np.ndarray
    days: np.ndarray
    sensors: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    ids: tuple[str, ...]
    tiles: tuple[str, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dates(self) -> list[dt.date]:
        return [dt.date(1970, 1, 1) + dt.timedelta(days=int(d)) for d in self.days]

    def subset(self, index: Sequence[int] | np.ndarray) -> SampleSet:
        """The samples at ``index`` (same time axis and classes)."""
        idx = np.asarray(index, dtype=np.int64)
        return replace(
            self,
            series=self.series[idx],
            valid=self.valid[idx],
            labels=self.labels[idx],
            ids=tuple(self.ids[i] for i in idx),
            tiles=tuple(self.tiles[i] for i in idx),
        )

    def with_classes(self, class_names: Sequence[str]) -> SampleSet:
        """The same samples with labels re-indexed into ``class_names`` (matched by name)."""
        names = tuple(class_names)
        if names == self.class_names:
            return self
        lookup = {n: i for i, n in enumerate(names)}
        missing = sorted({self.class_names[k] for k in np.unique(self.labels)} - set(lookup))
        if missing:
            raise ConfigError(
                f"samples of {self.source or 'the sample set'} are labelled {missing}, which the "
                f"model does not know (its classes: {list(names)}); relabel them or train a model "
                "with these classes"
            )
        remap = np.array([lookup.get(n, -1) for n in self.class_names], dtype=np.int64)
        return replace(self, labels=remap[self.labels], class_names=names)

    def drop_empty(self) -> SampleSet:
        """Leave out samples without a valid observation (inference never predicts those)."""
        keep = self.valid.any(axis=1)
        if keep.all():
            return self
        empty = [self.ids[i] for i in np.flatnonzero(~keep)]
        log.warning(
            "%d of %d samples have no valid observation in the window and are left out (%s%s)",
            len(empty),
            len(self),
            ", ".join(empty[:5]),
            ", ..." if len(empty) > 5 else "",
        )
        return self.subset(np.flatnonzero(keep))


class SampleSettings(BaseModel):
    """Where the reference samples are and how to read them (``train`` and ``evaluate``)."""

    model_config = ConfigDict(extra="forbid")

    samples: str = Field(
        description="points (.gpkg, .geojson, .csv) or a folder of per-sample CSVs"
    )
    cube: str | None = Field(None, description="FORCE Level-2 datacube root (needed for points)")
    label_column: str = "label"
    id_column: str | None = Field(None, description="sample id column (default: id / fid / row)")
    x_column: str = "x"
    y_column: str = "y"
    crs: str | None = Field(None, description="CRS of the points where the file names none")
    layer: str | None = Field(None, description="GeoPackage layer (default: the only one)")
    class_names: list[str] | None = Field(
        None, description="class order (label i = class_names[i])"
    )
    qai: str | list[str] = "default"
    sensors: list[str] = Field(default_factory=lambda: ["SEN2A", "SEN2B", "SEN2C"])
    start_date: dt.date | None = None
    end_date: dt.date | None = None
    window: str = "auto"

    @field_validator("sensors", mode="before")
    @classmethod
    def _split_sensors(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("qai", mode="before")
    @classmethod
    def _check_qai(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() in ("default", "none"):
            return v.strip().lower()
        flags = [s.strip().upper() for s in v.split(",")] if isinstance(v, str) else list(v)
        flags = [_QAI_ALIASES.get(f, f) for f in flags if f]
        bad = [f for f in flags if f not in QAI_FLAGS]
        if bad:
            raise ValueError(
                f"unknown QAI flag(s) {bad}; use 'default', 'none' or a comma list of "
                + ", ".join(QAI_FLAGS)
            )
        return flags

    @field_validator("window", mode="before")
    @classmethod
    def _check_window(cls, v: Any) -> str:
        v = str(v).strip()
        if v.lower() == "auto":
            return "auto"
        m = _WINDOW.match(v)
        if not m or int(m[1]) == 0 or (m[2] is not None and int(m[2]) == 0):
            raise ValueError(f"{v!r} is not a window size; use 'auto', N (N x N px) or ROWSxCOLS")
        return v

    @property
    def qai_flags(self) -> tuple[str, ...]:
        if self.qai == "default":
            return DEFAULT_QAI_FLAGS
        if self.qai == "none":
            return ()
        return tuple(self.qai)

    @property
    def window_shape(self) -> tuple[int, int] | None:
        if self.window == "auto":
            return None
        m = _WINDOW.match(self.window)
        return int(m[1]), int(m[2] or m[1])


# ------------------------------------------------------------------------------------ labels
def _as_label(value: Any) -> Any:
    """int for integer-like values, stripped str for names, None for missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        return int(value) if float(value).is_integer() else str(value)
    text = str(value).strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        return text
    return int(f) if f.is_integer() else text


def encode_labels(
    labels: Sequence[Any],
    class_names: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    source: str = "samples",
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels (integers or names) -> ``(codes (N,) int64, class_names)``.

    Integer labels are class indices (``class_names`` default ``class_0 ...``); names are looked
    up in ``class_names`` (default: the sorted distinct names).
    """
    values = [_as_label(v) for v in labels]
    names_of = ids or [str(i) for i in range(len(values))]
    missing = [names_of[i] for i, v in enumerate(values) if v is None]
    if missing:
        raise InputDataError(
            f"{source}: samples {missing[:5]} have no label; fill the label column or remove them"
        )
    kinds = {type(v) for v in values}
    if kinds == {int}:
        codes = np.array(values, dtype=np.int64)
        if class_names is None:
            if codes.size and codes.min() < 0:
                raise InputDataError(f"{source}: integer labels must be >= 0, got {codes.min()}")
            n = int(codes.max()) + 1 if codes.size else 0
            return codes, tuple(f"class_{i}" for i in range(n))
        names = tuple(class_names)
        bad = [names_of[i] for i in np.flatnonzero((codes < 0) | (codes >= len(names)))]
        if bad:
            raise InputDataError(
                f"{source}: samples {bad[:5]} have integer labels outside 0..{len(names) - 1} "
                f"(the classes are {list(names)})"
            )
        return codes, names
    if kinds == {str} or not values:
        names = tuple(class_names) if class_names is not None else tuple(sorted(set(values)))
        lookup = {n: i for i, n in enumerate(names)}
        unknown = sorted({v for v in values if v not in lookup})
        if unknown:
            raise InputDataError(
                f"{source}: labels {unknown[:10]} are not among the classes {list(names)}; "
                "fix the labels or the class_names setting"
            )
        return np.array([lookup[v] for v in values], dtype=np.int64), names
    raise InputDataError(
        f"{source}: the label column mixes integers and names; use one kind (class indices "
        "0..C-1 or class names)"
    )


# ------------------------------------------------------------------------------------ extraction
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
    from .cube import days_since_epoch

    series = _read_tile_pixels(
        scenes, grid, np.asarray(rows), np.asarray(cols), qai_flags, window_shape
    )
    return series, (series != NODATA).all(axis=2), days_since_epoch([s.date for s in scenes])


def _window_tasks(
    scenes, grid, rows, cols, qai_flags, window_shape
) -> list[tuple[np.ndarray, Any]]:
    """Delayed reads: one per window holding pixels, each paired with the positions it fills."""
    import dask

    shape = choose_window_shape(grid, window_shape, len(scenes))
    data = open_cube(scenes, grid, shape, qai_flags).data
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
    from .models import effective_window

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
        if src != dst:
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
        grid = tile_grid(definition, scenes[0])
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
        tasks = _window_tasks(scenes, grid, rows, cols, settings.qai_flags, settings.window_shape)
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


# ------------------------------------------------------------------------------ one entry point
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


def pixel_centres(grid, rows: Sequence[int], cols: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Map coordinates (cube CRS) of pixel centres ``(rows, cols)`` of a tile grid."""
    a, _, c, _, e, f = grid.transform
    return c + a * (np.asarray(cols) + 0.5), f + e * (np.asarray(rows) + 0.5)
