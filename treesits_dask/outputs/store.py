"""The Zarr store of an output (``<output>/predictions.zarr``, Zarr v3, consolidated metadata):
created once from the grid, written window by window (region writes, one chunk each), read back
by region.  The write layer of a run (:func:`write_layer`) lives here too.  Every location is a URL
(local path, ``file://``, ``s3://``), resolved by :mod:`treesits_dask.io.storage`.

Layout: the variables of :mod:`treesits_dask.outputs.schema`; coords ``x``, ``y`` (pixel centres),
``class_name`` (class names), ``spatial_ref`` (CRS, GeoTransform).

Integer nodata: each Zarr array's ``fill_value`` is its nodata, so unwritten chunks read as nodata
(255 for ``class``, never 0, which is a real class).  ``class`` and ``last_obs_valid`` also carry
the CF attribute ``_FillValue = 255``: ``xr.open_zarr(url)`` decodes them to float32 with NaN, and
``xr.open_zarr(url, mask_and_scale=False)`` keeps uint8 as stored; ``.rio.nodata`` is 255 in the
second case (and ``.rio.encoded_nodata`` is 255 in the first).  ``valid_obs`` has no ``_FillValue``:
0 is a real count.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from ..errors import OutputError
from ..io import storage
from ..io.crs import same_crs, short_crs
from ..io.grid import WindowLayout
from .schema import (
    CLASS_DIM,
    DESCRIPTIONS,
    DTYPES,
    NODATA,
    VARIABLES,
    OutputGrid,
    TileRegion,
    predicted_pixels,
    unpack_outputs,
)

__all__ = [
    "WINDOW_STATS",
    "chunk_blocks",
    "create_store",
    "open_dataset",
    "open_store",
    "read_region",
    "write_layer",
    "write_window",
]

log = logging.getLogger(__name__)

_GRID_ATTR = "treesits_grid"
#: per-window statistics returned by the write tasks (see :func:`write_layer`)
WINDOW_STATS = ("pixels_predicted",)


def _zarr_store(url: str, read_only: bool):
    """A zarr store for a URL: LocalStore for local paths, FsspecStore (async) for s3:// etc."""
    import zarr.storage

    if storage.is_remote(url):
        fs, path = storage.get_fs(url)
        return zarr.storage.FsspecStore.from_mapper(fs.get_mapper(path), read_only=read_only)
    return zarr.storage.LocalStore(storage.strip_protocol(url), read_only=read_only)


def open_dataset(url: str, mask_and_scale: bool = False):
    """The store as a lazy ``xarray.Dataset`` (dask arrays), with its CRS as ``spatial_ref``
    (``.rio`` works).  ``mask_and_scale=False`` keeps the integer layers as stored (255 = not
    predicted); True decodes them to float with NaN."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    fs, path = storage.get_fs(url)
    if not fs.exists(path):
        raise OutputError(f"no Zarr store at {url}; run the pipeline into this output first")
    return xr.open_zarr(_zarr_store(url, read_only=True), mask_and_scale=mask_and_scale)


def open_store(url: str, mode: str = "r"):
    """The store's root ``zarr.Group`` (``mode`` "r" or "r+"); :class:`OutputError` if absent."""
    import zarr

    try:
        return zarr.open_group(_zarr_store(url, read_only=mode == "r"), mode=mode)
    except FileNotFoundError as exc:
        raise OutputError(f"no Zarr store at {url}: create it first (create_store)") from exc


def _template(grid: OutputGrid, attrs: dict):
    """Lazy xarray Dataset of the whole store (dask arrays of nodata, never computed)."""
    import dask.array as da
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr
    from affine import Affine

    a, b, c, d, e, f = grid.transform
    if b != 0 or d != 0:
        raise OutputError(f"rotated grids are not supported (transform {grid.transform})")
    rows, cols = grid.chunk
    shape = (grid.height, grid.width)
    x = c + (np.arange(grid.width) + 0.5) * a
    y = f + (np.arange(grid.height) + 0.5) * e
    n = len(grid.class_names)
    data = {}
    for var in grid.variables():
        dims, full, chunks = ("y", "x"), shape, (rows, cols)
        if var == "probability":
            dims, full, chunks = (CLASS_DIM, "y", "x"), (n, *shape), (n, rows, cols)
        arr = da.full(full, NODATA[var], dtype=DTYPES[var], chunks=chunks)
        var_attrs = {"description": DESCRIPTIONS[var]}
        if var in ("probability", "class"):
            var_attrs["class_names"] = list(grid.class_names)
        if var == "last_obs_valid":
            var_attrs.update(flag_values=[0, 1], flag_meanings="screened valid")
        data[var] = xr.Variable(dims, arr, attrs=var_attrs)
    ds = xr.Dataset(
        data,
        coords={
            "x": ("x", x, {"units": "m"}),
            "y": ("y", y, {"units": "m"}),
            CLASS_DIM: (CLASS_DIM, np.array(grid.class_names, dtype=object)),
        },
        attrs={**attrs, _GRID_ATTR: grid.to_attrs()},
    )
    ds = ds.rio.write_crs(grid.crs_wkt).rio.write_transform(Affine(a, b, c, d, e, f))
    for var in grid.variables():
        enc = ds[var].encoding
        enc["chunks"] = ds[var].data.chunksize
        enc["fill_value"] = NODATA[var]  # the Zarr fill_value: unwritten chunks read as nodata
        enc["coordinates"] = "spatial_ref"  # so that open_zarr makes spatial_ref a coordinate
        if var in ("class", "last_obs_valid"):
            enc["_FillValue"] = NODATA[var]
    return ds


def create_store(url: str, grid: OutputGrid, attrs: dict | None = None) -> None:
    """Create the Zarr store at ``url`` for ``grid`` (metadata and coordinates only), once.

    If a store with the same grid and variables exists it is left untouched (re-runs, resume); if
    it differs, :class:`OutputError` names what differs.  ``attrs`` (JSON values) become root
    attributes; differing ``attrs`` of an existing store only log a warning.
    """
    attrs = dict(attrs or {})
    try:
        json.dumps(attrs)
    except TypeError as exc:
        raise OutputError(f"store attributes must be JSON values: {exc}") from exc
    existing = _existing_grid(url)
    if existing is not None:
        stored_grid, stored_attrs, variables = existing
        diffs = _grid_differences(stored_grid, grid)
        if set(variables) != set(grid.variables()):
            diffs.append(f"variables ({sorted(variables)} instead of {sorted(grid.variables())})")
        if diffs:
            raise OutputError(
                f"the Zarr store {url} already exists with a different {'; '.join(diffs)}. "
                "Write to another --output, or delete the store to start over"
            )
        changed = {k: v for k, v in attrs.items() if stored_attrs.get(k) != v}
        if changed:
            log.warning(
                "store %s exists with other attributes than %s; keeping its own", url, changed
            )
        log.info("store %s exists with the same grid; reusing it", url)
        return
    ds = _template(grid, attrs)
    with warnings.catch_warnings():
        # consolidated metadata is not (yet) in the Zarr v3 spec; zarr warns on every write
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        ds.to_zarr(_zarr_store(url, read_only=False), mode="w-", compute=False, consolidated=True)
    log.info("created store %s (%d x %d px, chunks %s)", url, grid.width, grid.height, grid.chunk)


def _existing_grid(url: str) -> tuple[OutputGrid, dict, list[str]] | None:
    """(grid, attrs, array names) of the store at ``url``; None if nothing is there."""
    import zarr

    fs, path = storage.get_fs(url)
    if not fs.exists(path):
        return None
    try:
        group = zarr.open_group(_zarr_store(url, read_only=True), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        if fs.isdir(path) and not fs.ls(path):
            return None  # an empty folder: create the store in it
        raise OutputError(
            f"{url} exists but is not a Zarr store; delete it or write to another --output"
        ) from exc
    attrs = dict(group.attrs)
    if _GRID_ATTR not in attrs:
        raise OutputError(
            f"{url} is a Zarr store that treesits_dask did not create (no '{_GRID_ATTR}' "
            "attribute); delete it or write to another --output"
        )
    grid_attrs = attrs.pop(_GRID_ATTR)
    try:
        stored = OutputGrid.from_attrs(grid_attrs)
    except (KeyError, TypeError, ValueError, OutputError) as exc:
        raise OutputError(
            f"{url} has an unreadable '{_GRID_ATTR}' attribute ({exc}); delete the store"
        ) from exc
    variables = [v for v in group.array_keys() if v in VARIABLES]
    return stored, attrs, variables


def _grid_differences(old: OutputGrid, new: OutputGrid) -> list[str]:

    diffs = []
    if not same_crs(old.crs_wkt, new.crs_wkt):
        diffs.append(f"CRS ({short_crs(old.crs_wkt)} instead of {short_crs(new.crs_wkt)})")
    pairs = zip(old.transform, new.transform, strict=True)
    if not all(math.isclose(p, q, abs_tol=1e-6) for p, q in pairs):
        diffs.append(f"transform ({tuple(old.transform)} instead of {tuple(new.transform)})")
    if (old.width, old.height) != (new.width, new.height):
        diffs.append(f"size ({old.width}x{old.height} px instead of {new.width}x{new.height})")
    if tuple(old.chunk) != tuple(new.chunk):
        diffs.append(f"chunk/window shape ({old.chunk} instead of {new.chunk})")
    if tuple(old.class_names) != tuple(new.class_names):
        diffs.append(f"class names ({list(old.class_names)} instead of {list(new.class_names)})")
    if old.multiclass != new.multiclass:
        diffs.append(f"model kind (multiclass={old.multiclass} instead of {new.multiclass})")
    return diffs


def _check_aligned(url: str, arr, rows: slice, cols: slice) -> tuple[slice, slice]:
    height, width = arr.shape[-2:]
    ch, cw = arr.chunks[-2:]
    rows = slice(*rows.indices(height)[:2])
    cols = slice(*cols.indices(width)[:2])
    for sl, size, step, axis in ((rows, height, ch, "rows"), (cols, width, cw, "cols")):
        if sl.start % step or (sl.stop % step and sl.stop != size) or sl.stop <= sl.start:
            raise OutputError(
                f"window {axis} {sl.start}:{sl.stop} of {url} is not aligned to its {step}-px "
                "chunks; windows must match the store's chunks (the --window it was created with)"
            )
    return rows, cols


def write_window(url: str, rows: slice, cols: slice, outputs: dict[str, np.ndarray]) -> None:
    """Write one chunk-aligned window of each given variable into the existing store.

    Safe from many processes and threads at once as long as windows are distinct.  ``probability``
    has shape (n_classes, h, w), the others (h, w).  Values are cast to the store's dtypes.  A key
    the store lacks (e.g. ``class`` for a binary model) raises :class:`OutputError`; variables
    missing from ``outputs`` are left as they are.  Rewriting a window writes the same bytes.
    """
    group = open_store(url, "r+")
    arrays = set(group.array_keys())
    unknown = [k for k in outputs if k not in arrays or k not in VARIABLES]
    if unknown:
        raise OutputError(
            f"the store {url} has no variable(s) {unknown} (it holds "
            f"{sorted(arrays & set(VARIABLES))}); it was created for another model: write to "
            "another --output"
        )
    for var, value in outputs.items():
        arr = group[var]
        r, c = _check_aligned(url, arr, rows, cols)
        expected = (*arr.shape[:-2], r.stop - r.start, c.stop - c.start)
        value = np.asarray(value)
        if value.shape != expected:
            raise OutputError(
                f"{var} for window {r.start}:{r.stop}, {c.start}:{c.stop} of {url} has shape "
                f"{value.shape}, expected {expected}"
            )
        arr[..., r, c] = value.astype(arr.dtype, copy=False)


def read_region(url: str, region: TileRegion, variable: str) -> np.ndarray:
    """Raw stored values (no nodata decoding) of ``variable`` in a tile's region."""
    group = open_store(url, "r")
    if variable not in group.array_keys():
        raise OutputError(f"the store {url} has no variable {variable!r}")
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


def _write_packed(packed, store_url, rows, cols, variables):
    write_window(store_url, rows, cols, unpack_outputs(packed, variables))
    return np.array([[[predicted_pixels(packed)]]], dtype=np.int64)


def write_layer(
    packed, store_url: str, region: TileRegion, layout: WindowLayout, variables: Sequence[str]
):
    """Lazy dask array (windows_y, windows_x, len(WINDOW_STATS)) of per-window statistics;
    computing it writes every window of ``packed`` (the packed outputs of the tile's windows,
    see :func:`~treesits_dask.outputs.schema.pack_outputs`) into the tile's region of the store."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    name = f"write-{region.tile}-" + tokenize(packed.name, store_url, region)
    dsk = {}
    for i, j, w in layout:
        rows = slice(region.row_off + w.row_off, region.row_off + w.row_off + w.height)
        cols = slice(region.col_off + w.col_off, region.col_off + w.col_off + w.width)
        dsk[(name, i, j, 0)] = (
            _write_packed,
            (packed.name, 0, i, j),
            store_url,
            rows,
            cols,
            tuple(variables),
        )
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[packed])
    n_i, n_j = len(layout.windows), len(layout.windows[0])
    chunks = ((1,) * n_i, (1,) * n_j, (len(WINDOW_STATS),))
    return da.Array(graph, name, chunks, dtype=np.int64)
