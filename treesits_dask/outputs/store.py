"""The Zarr layout of the map: arrays on the FORCE grid, created once, extended when tiles appear
or layers are added, written window by window (one chunk each), read back by region.  The
functions here work on any zarr store object; :mod:`treesits_dask.outputs.repo` gives them the
versioned Icechunk store of an output.  The write layer of a run (:func:`write_layer`) lives here
too.

Layout (GeoZarr, :mod:`treesits_dask.outputs.geozarr`): the root group holds the grid (attribute
``treesits_grid``), the tile records (``_tiles/``) and the ``multiscales`` layout; group ``0`` is
the map at full resolution, groups ``1``, ``2``, ... its overviews (each half the size of the one
before, :mod:`treesits_dask.outputs.overviews`).  Each level group is a complete xarray Dataset:
the variables of :mod:`treesits_dask.outputs.schema`, coords ``x``, ``y`` (pixel centres),
``class_name`` (class names), ``spatial_ref`` (CRS, GeoTransform).  Maps written before the
overviews existed hold the full-resolution arrays at the root and no levels (:func:`data_path`
finds them; they get no overviews).  The grid is anchored at the upper-left corner of tile
``X0000_Y0000`` of the FORCE grid, so every tile has a fixed place in it: tile ``X{x}_Y{y}``
covers rows ``y * tile_height`` and columns ``x * tile_width`` onwards, whichever tiles a run
selects.

Integer nodata: each Zarr array's ``fill_value`` is its nodata, so unwritten chunks read as nodata
(255 for ``class``, never 0, which is a real class).  The uint8 layers and the dates also carry
the CF attribute ``_FillValue``: ``xr.open_zarr(store, group="0")`` decodes them to float32 with
NaN (dates, which carry CF ``units``, to datetime64 with NaT), and ``mask_and_scale=False,
decode_times=False`` keeps them as stored.  ``valid_obs`` and ``alert_confirmations`` have no
``_FillValue``: 0 is a real count.

This module is longer than 400 lines because creating, growing, writing and reading the layout
share its private helpers (level templates, attribute-preserving writes).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import OutputError
from ..io.crs import same_crs, short_crs
from ..io.grid import WindowLayout
from . import geozarr
from .schema import (
    ALL_VARIABLES,
    CLASS_DIM,
    DESCRIPTIONS,
    DTYPES,
    NODATA,
    OutputGrid,
    Packing,
    TileRegion,
)

__all__ = [
    "GRID_ATTR", "LEVEL0", "RESAMPLING", "WINDOW_STATS", "chunk_blocks", "create_layout",
    "data_group", "data_path", "extend_layout", "grid_differences", "level_paths", "read_region",
    "stored_grid", "write_layer", "write_window",
]  # fmt: skip

log = logging.getLogger(__name__)

GRID_ATTR = "treesits_grid"
#: the group of the map at full resolution (level 0 of the multiscales layout)
LEVEL0 = "0"
#: per-window statistics returned by the write tasks (see :func:`write_layer`)
WINDOW_STATS = ("pixels_predicted",)
#: variables with a class axis
_CLASS_AXIS = ("probability", "probability_smoothed")
#: layers with a CF ``_FillValue`` (uint8 with nodata 255, dates with nodata 0)
_CF_FILL = ("class", "last_obs_valid", "alert_state", "class_smoothed", "last_valid_date",
            "alert_first_seen")  # fmt: skip
_DATES = ("last_valid_date", "alert_first_seen")
#: how each variable is resampled into the overviews (``average``: mean of the valid pixels of a
#: 2 x 2 block; ``nearest``: its upper-left pixel)
RESAMPLING = {v: "average" if DTYPES[v] == "float32" else "nearest" for v in ALL_VARIABLES}


def _coords(grid: OutputGrid) -> tuple[np.ndarray, np.ndarray]:
    a, _, c, _, e, f = grid.transform
    return c + (np.arange(grid.width) + 0.5) * a, f + (np.arange(grid.height) + 0.5) * e


def _template(grid: OutputGrid, variables: Sequence[str], attrs: dict, level: int = 0):
    """Lazy xarray Dataset of one level (dask arrays of nodata, never computed)."""
    import dask.array as da
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr
    from affine import Affine

    a, b, c, d, e, f = grid.transform
    if b != 0 or d != 0:
        raise OutputError(f"rotated grids are not supported (transform {grid.transform})")
    rows, cols = grid.chunk
    shape = (grid.height, grid.width)
    x, y = _coords(grid)
    n = len(grid.class_names)
    data = {}
    for var in variables:
        dims, full, chunks = ("y", "x"), shape, (rows, cols)
        if var in _CLASS_AXIS:
            dims, full, chunks = (CLASS_DIM, "y", "x"), (n, *shape), (n, rows, cols)
        # one dask chunk (never computed): a graph of one task per variable, whatever the size
        arr = da.full(full, NODATA[var], dtype=DTYPES[var], chunks=full)
        var_attrs = {"description": DESCRIPTIONS[var], **geozarr.array_attributes()}
        if level:
            var_attrs["resampling_method"] = RESAMPLING[var]
        if var in ("probability", "class", "probability_smoothed", "class_smoothed"):
            var_attrs["class_names"] = list(grid.class_names)
        if var == "last_obs_valid":
            var_attrs.update(flag_values=[0, 1], flag_meanings="screened valid")
        if var == "alert_state":
            var_attrs.update(flag_values=[0, 1, 2, 3],
                             flag_meanings="none candidate confirmed retracted")  # fmt: skip
        if var in _DATES:
            var_attrs.update(units="days since 1970-01-01", calendar="proleptic_gregorian")
        data[var] = xr.Variable(dims, arr, attrs=var_attrs, encoding={"chunks": chunks})
    ds = xr.Dataset(
        data,
        coords={
            "x": ("x", x, {"units": "m"}),
            "y": ("y", y, {"units": "m"}),
            CLASS_DIM: (CLASS_DIM, np.array(grid.class_names, dtype=object)),
        },
        attrs=attrs,
    )
    ds = ds.rio.write_crs(grid.crs_wkt).rio.write_transform(Affine(a, b, c, d, e, f))
    for var in variables:
        enc = ds[var].encoding
        enc["fill_value"] = NODATA[var]  # the Zarr fill_value: unwritten chunks read as nodata
        enc["coordinates"] = "spatial_ref"  # so that open_zarr makes spatial_ref a coordinate
        if var in _CF_FILL:
            enc["_FillValue"] = NODATA[var]
    return ds


def _to_zarr(ds, zstore, group: str | None, mode: str) -> None:
    """``ds.to_zarr`` (metadata and coordinates only); in mode ``a`` the group keeps its
    attributes (xarray would replace them with the Dataset's)."""
    import zarr

    kept = {}
    if mode == "a":
        root = zarr.open_group(zstore, mode="r")
        kept = dict((root[group] if group else root).attrs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        ds.to_zarr(zstore, group=group, mode=mode, compute=False, consolidated=False)
    if kept:
        root = zarr.open_group(zstore, mode="r+")
        (root[group] if group else root).attrs.update(kept)


def _root_attrs(grid: OutputGrid) -> dict:
    return {GRID_ATTR: grid.to_attrs(), **geozarr.multiscales_attributes(grid)}


def create_layout(zstore, grid: OutputGrid, attrs: dict | None = None) -> None:
    """Create the levels, arrays, coordinates and attributes of ``grid`` in the empty ``zstore``
    (metadata only: no chunk is written).  ``attrs`` (JSON values) become root attributes."""
    import zarr

    attrs = dict(attrs or {})
    try:
        json.dumps(attrs)
    except TypeError as exc:
        raise OutputError(f"store attributes must be JSON values: {exc}") from exc
    root = zarr.open_group(zstore, mode="w-")
    root.attrs.update({**attrs, **_root_attrs(grid)})
    for level in range(geozarr.level_count(grid)):
        _create_level(zstore, grid, level, attrs if level == 0 else {})
    log.info(
        "created the map layout (%d x %d px, chunks %s, %d overview level(s))",
        grid.width, grid.height, grid.chunk, geozarr.level_count(grid) - 1,
    )  # fmt: skip


def _create_level(zstore, grid: OutputGrid, level: int, attrs: dict | None = None) -> None:
    g = geozarr.level_grid(grid, level)
    attrs = {**(attrs or {}), **geozarr.group_attributes(g)}
    _to_zarr(_template(g, grid.variables(), attrs, level), zstore, str(level), "w-")


def data_path(zstore) -> str:
    """Where the full-resolution arrays are: group ``0``, or the root of a map written before
    the overviews existed."""
    import zarr

    root = zarr.open_group(zstore, mode="r")
    return LEVEL0 if LEVEL0 in root.group_keys() else ""


def level_paths(zstore) -> list[str]:
    """The level groups of the map, finest first (``[]`` for a map without levels)."""
    import zarr

    root = zarr.open_group(zstore, mode="r")
    names = set(root.group_keys())
    out = []
    while str(len(out)) in names:
        out.append(str(len(out)))
    return out


def data_group(zstore, mode: str = "r"):
    """The zarr group of the full-resolution arrays (see :func:`data_path`)."""
    import zarr

    root = zarr.open_group(zstore, mode=mode)
    try:  # a member's metadata, not a listing: see write_window
        return root[LEVEL0]
    except KeyError:
        return root


def stored_grid(zstore) -> OutputGrid | None:
    """The grid of the layout in ``zstore``; None when it holds none."""
    import zarr

    try:
        group = zarr.open_group(zstore, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    attrs = dict(group.attrs)
    if GRID_ATTR not in attrs:
        return None
    try:
        return OutputGrid.from_attrs(attrs[GRID_ATTR])
    except (KeyError, TypeError, ValueError, OutputError) as exc:
        raise OutputError(
            f"the map store has an unreadable '{GRID_ATTR}' attribute ({exc})"
        ) from exc


def grid_differences(old: OutputGrid, new: OutputGrid) -> list[str]:
    """What keeps ``new`` from being written into a store of ``old`` (its size may only grow,
    from the same upper-left corner; its optional layers may only be added to)."""
    diffs = []
    if not same_crs(old.crs_wkt, new.crs_wkt):
        diffs.append(f"CRS ({short_crs(old.crs_wkt)} instead of {short_crs(new.crs_wkt)})")
    pairs = zip(old.transform, new.transform, strict=True)
    if not all(math.isclose(p, q, abs_tol=1e-6) for p, q in pairs):
        diffs.append(f"transform ({tuple(old.transform)} instead of {tuple(new.transform)})")
    if tuple(old.chunk) != tuple(new.chunk):
        diffs.append(f"chunk/window shape ({old.chunk} instead of {new.chunk})")
    if tuple(old.class_names) != tuple(new.class_names):
        diffs.append(f"class names ({list(old.class_names)} instead of {list(new.class_names)})")
    if old.multiclass != new.multiclass:
        diffs.append(f"model kind (multiclass={old.multiclass} instead of {new.multiclass})")
    dropped = [v for v in old.layers if v not in new.layers]
    if dropped:
        diffs.append(
            f"set of layers (it holds {', '.join(dropped)}, which the settings leave out; a map "
            "keeps its layers: enable them again (uncertainty, alerts, smoothing)"
        )
    return diffs


def extend_layout(zstore, old: OutputGrid, new: OutputGrid) -> OutputGrid:
    """Grow the arrays of ``zstore`` from ``old`` to cover ``new`` too (tiles that appeared to
    the east or south), add the layers ``new`` has and the store lacks, and the overview levels
    a larger map needs; returns the grid now stored.  Nothing written so far moves."""
    import zarr

    width, height = max(old.width, new.width), max(old.height, new.height)
    layers = tuple(v for v in new.layers if v not in old.layers)
    grown = OutputGrid(**{**old.__dict__, "width": width, "height": height,
                          "layers": (*old.layers, *layers)})  # fmt: skip
    root = zarr.open_group(zstore, mode="r+")
    legacy = LEVEL0 not in root.group_keys()
    levels = [""] if legacy else level_paths(zstore)
    for k, path in enumerate(levels):
        g = geozarr.level_grid(grown, k)
        group = root[path] if path else root
        names = set(group.array_keys())  # a listing: once per level, not once per variable
        for var in sorted(names):
            if var in ALL_VARIABLES:
                arr = group[var]
                if arr.shape[-2:] != (g.height, g.width):
                    arr.resize((*arr.shape[:-2], g.height, g.width))
        x, y = _coords(g)
        for name, values, size in (("x", x, g.width), ("y", y, g.height)):
            arr = group[name]
            start = arr.shape[0]
            if start != size:
                arr.resize((size,))
                arr[start:] = values[start:]
        missing = [v for v in grown.variables() if v not in names]
        if missing:
            _to_zarr(_template(g, missing, {}, k), zstore, path or None, "a")
        if not legacy:
            group.attrs.update(geozarr.group_attributes(g))
    if not legacy:
        for k in range(len(levels), geozarr.level_count(grown)):
            _create_level(zstore, grown, k)
        root.attrs.update(_root_attrs(grown))
    else:
        root.attrs[GRID_ATTR] = grown.to_attrs()
    if grown != old:
        log.info(
            "map store extended from %d x %d to %d x %d px%s", old.width, old.height, width,
            height, f", layers {list(layers)} added" if layers else "",
        )  # fmt: skip
    return grown


def _check_aligned(arr, rows: slice, cols: slice) -> tuple[slice, slice]:
    height, width = arr.shape[-2:]
    ch, cw = arr.chunks[-2:]
    rows = slice(*rows.indices(height)[:2])
    cols = slice(*cols.indices(width)[:2])
    for sl, size, step, axis in ((rows, height, ch, "rows"), (cols, width, cw, "cols")):
        if sl.start % step or (sl.stop % step and sl.stop != size) or sl.stop <= sl.start:
            raise OutputError(
                f"window {axis} {sl.start}:{sl.stop} of the map store is not aligned to its "
                f"{step}-px chunks; windows must match the store's chunks (the window shape it "
                "was created with)"
            )
    return rows, cols


def write_window(zstore, rows: slice, cols: slice, outputs: dict[str, np.ndarray]) -> None:
    """Write one chunk-aligned window of each given variable into the layout in ``zstore``.

    ``probability`` has shape (n_classes, h, w), the others (h, w).  Values are cast to the
    store's dtypes.  A key the store lacks (e.g. ``class`` for a binary model) raises
    :class:`OutputError`; variables missing from ``outputs`` are left as they are.
    """
    group = data_group(zstore, "r+")
    # each array opened by its name, never listed: Icechunk lists a session's keys synchronously
    # on zarr's event loop, and with windows written from other threads at once that loop once
    # stayed in the listing while the writes waited on it (a test hung)
    found, unknown = {}, []
    for var in outputs:
        try:
            found[var] = group[var] if var in ALL_VARIABLES else None
        except KeyError:
            found[var] = None
        if found[var] is None:
            unknown.append(var)
    if unknown:
        raise OutputError(
            f"the map store has no variable(s) {unknown} (it holds "
            f"{sorted(set(group.array_keys()) & set(ALL_VARIABLES))}); it was created for "
            "another model or other layers: write to another --output"
        )
    for var, value in outputs.items():
        arr = found[var]
        r, c = _check_aligned(arr, rows, cols)
        expected = (*arr.shape[:-2], r.stop - r.start, c.stop - c.start)
        value = np.asarray(value)
        if value.shape != expected:
            raise OutputError(
                f"{var} for window {r.start}:{r.stop}, {c.start}:{c.stop} of the map store has "
                f"shape {value.shape}, expected {expected}"
            )
        arr[..., r, c] = value.astype(arr.dtype, copy=False)


def read_region(zstore, region: TileRegion, variable: str) -> np.ndarray:
    """Raw stored values (no nodata decoding) of ``variable`` in a tile's region."""
    group = data_group(zstore, "r")
    if variable not in group.array_keys():
        raise OutputError(f"the map store has no variable {variable!r}")
    return group[variable][..., region.rows, region.cols]


def chunk_blocks(arr, region: TileRegion) -> Iterator[tuple[int, int, np.ndarray]]:
    """(row, col relative to the region, values) for each store chunk that overlaps the region."""
    ch, cw = arr.chunks[-2:]
    r0 = region.row_off - region.row_off % ch
    c0 = region.col_off - region.col_off % cw
    for r in range(r0, region.row_off + region.height, ch):
        for c in range(c0, region.col_off + region.width, cw):
            rs = slice(max(r, region.row_off), min(r + ch, region.row_off + region.height))
            cs = slice(max(c, region.col_off), min(c + cw, region.col_off + region.width))
            yield rs.start - region.row_off, cs.start - region.col_off, arr[..., rs, cs]


def _write_packed(packed, session, rows, cols, variables, packing):
    """Write one window into ``session`` (an Icechunk fork session, pickled to this task) and
    return the session with its changes, for the driver to merge, and the window's statistics."""
    write_window(session.store, rows, cols, packing.unpack(packed, variables))
    return session, np.array([packing.predicted(packed)], dtype=np.int64)


def write_layer(
    packed,
    session,
    region: TileRegion,
    layout: WindowLayout,
    variables: Sequence[str],
    packing: Packing | None = None,
):
    """One task per window of the tile: writes the window of ``packed`` (the packed outputs of
    the tile's windows, laid out as ``packing`` says; default: no optional layers) into the
    tile's region through ``session`` (a fork of the tile's writable session).  Returns the keys
    of the write tasks and the graph: each task's result is ``(session, statistics)``."""
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    if packing is None:
        packing = Packing(packed.shape[0] - len(Packing(0).scalars))
    name = f"write-{region.tile}-" + tokenize(packed.name, region, id(session))
    dsk = {}
    for i, j, w in layout:
        rows = slice(region.row_off + w.row_off, region.row_off + w.row_off + w.height)
        cols = slice(region.col_off + w.col_off, region.col_off + w.col_off + w.width)
        dsk[(name, i, j)] = (
            _write_packed,
            (packed.name, 0, i, j),
            session,
            rows,
            cols,
            tuple(variables),
            packing,
        )
    return list(dsk), HighLevelGraph.from_collections(name, dsk, dependencies=[packed])
