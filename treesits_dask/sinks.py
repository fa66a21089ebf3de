"""Output writers: one Zarr store on the FORCE grid (region writes per window), a COG per tile and
VRT mosaics.  Every location is a URL (local path, ``file://``, ``s3://``), resolved by
:mod:`storage`.

Store layout (``<output>/predictions.zarr``, Zarr v3, consolidated metadata)::

    probability    (class_name, y, x) float32   NaN = not predicted; all classes in one chunk
    class          (y, x) uint8                 255 = not predicted (multi-class models only)
    valid_obs      (y, x) uint16                valid observations used (0 = not predicted)
    last_obs_valid (y, x) uint8                 1 newest scene valid, 0 screened, 255 not predicted
    coords         x, y (pixel centres), class_name (class names), spatial_ref (CRS, GeoTransform)

The class axis is called ``class_name`` and not ``class``: a dimension named like the ``class``
variable makes xarray turn that variable into a 2-D coordinate of every other variable.

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
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from . import _cog, storage
from .errors import OutputError

__all__ = [
    "CLASS_DIM", "DTYPES", "NODATA", "VARIABLES", "OutputGrid", "TileRegion", "check_writable",
    "create_store", "read_region", "write_mosaics", "write_tile_cogs", "write_window",
]  # fmt: skip

log = logging.getLogger(__name__)

VARIABLES = ("probability", "class", "valid_obs", "last_obs_valid")
NODATA = {"probability": float("nan"), "class": 255, "valid_obs": 0, "last_obs_valid": 255}
DTYPES = {
    "probability": "float32", "class": "uint8", "valid_obs": "uint16", "last_obs_valid": "uint8",
}  # fmt: skip
#: name of the class axis of ``probability`` (and of the coordinate holding the class names)
CLASS_DIM = "class_name"
#: nodata written into the COGs (None: the band has no nodata value)
_COG_NODATA = {"probability": float("nan"), "class": 255, "valid_obs": None, "last_obs_valid": 255}
_DESCRIPTIONS = {
    "probability": "class probability from the model (NaN = not predicted)",
    "class": "most probable class (index into class_names; 255 = not predicted)",
    "valid_obs": "number of valid observations used by the model (0 = not predicted)",
    "last_obs_valid": "1 = newest scene valid, 0 = screened or nodata, 255 = not predicted",
}
_GRID_ATTR = "treesits_grid"


@dataclass(frozen=True)
class OutputGrid:
    """The store's grid: CRS, upper-left affine, size, chunk (= window shape) and classes."""

    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int
    chunk: tuple[int, int]
    class_names: tuple[str, ...]
    multiclass: bool

    def __post_init__(self) -> None:
        if min(self.width, self.height, *self.chunk) <= 0 or not self.class_names:
            raise OutputError(
                f"invalid output grid {self}: sizes, chunk and class names must be non-empty"
            )
        if self.multiclass and len(self.class_names) > 255:
            raise OutputError(
                f"{len(self.class_names)} classes do not fit the uint8 class map (at most 255, as "
                "255 is its nodata); use a model with fewer classes"
            )

    def variables(self) -> tuple[str, ...]:
        """The variables of the store: :data:`VARIABLES` without ``class`` for binary models."""
        return tuple(v for v in VARIABLES if self.multiclass or v != "class")

    def to_attrs(self) -> dict:
        """JSON-compatible description, stored in the Zarr root attributes."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_attrs(cls, attrs: dict) -> OutputGrid:
        return cls(
            crs_wkt=attrs["crs_wkt"], transform=tuple(attrs["transform"]),
            width=int(attrs["width"]), height=int(attrs["height"]), chunk=tuple(attrs["chunk"]),
            class_names=tuple(attrs["class_names"]), multiclass=bool(attrs["multiclass"]),
        )  # fmt: skip


@dataclass(frozen=True)
class TileRegion:
    """Position of one tile in the store grid (pixels)."""

    tile: str
    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.row_off, self.row_off + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.col_off, self.col_off + self.width)


# ----------------------------------------------------------------------------------------- Zarr
def _zarr_store(url: str, read_only: bool):
    """A zarr store for a URL: LocalStore for local paths, FsspecStore (async) for s3:// etc."""
    import zarr.storage

    if storage.is_remote(url):
        fs, path = storage.get_fs(url)
        return zarr.storage.FsspecStore.from_mapper(fs.get_mapper(path), read_only=read_only)
    return zarr.storage.LocalStore(storage.strip_protocol(url), read_only=read_only)


def _open_group(url: str, mode: str):
    import zarr

    try:
        return zarr.open_group(_zarr_store(url, read_only=mode == "r"), mode=mode)
    except FileNotFoundError as exc:
        raise OutputError(f"no Zarr store at {url}: create it first (sinks.create_store)") from exc


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
        var_attrs = {"description": _DESCRIPTIONS[var]}
        if var in ("probability", "class"):
            var_attrs["class_names"] = list(grid.class_names)
        if var == "last_obs_valid":
            var_attrs.update(flag_values=[0, 1], flag_meanings="screened valid")
        data[var] = xr.Variable(dims, arr, attrs=var_attrs)
    ds = xr.Dataset(
        data,
        coords={"x": ("x", x, {"units": "m"}), "y": ("y", y, {"units": "m"}),
                CLASS_DIM: (CLASS_DIM, np.array(grid.class_names, dtype=object))},
        attrs={**attrs, _GRID_ATTR: grid.to_attrs()},
    )  # fmt: skip
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
    from rasterio.crs import CRS

    diffs = []
    if old.crs_wkt != new.crs_wkt and CRS.from_wkt(old.crs_wkt) != CRS.from_wkt(new.crs_wkt):
        old_crs, new_crs = (
            CRS.from_wkt(old.crs_wkt).to_string(),
            CRS.from_wkt(new.crs_wkt).to_string(),
        )
        diffs.append(f"CRS ({old_crs} instead of {new_crs})")
    if not all(math.isclose(p, q, abs_tol=1e-6) for p, q in zip(old.transform, new.transform)):
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
    group = _open_group(url, "r+")
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
    group = _open_group(url, "r")
    if variable not in group.array_keys():
        raise OutputError(f"the store {url} has no variable {variable!r}")
    return group[variable][..., region.rows, region.cols]


def _chunk_blocks(arr, region: TileRegion) -> Iterator[tuple[int, int, np.ndarray]]:
    """(row, col relative to the region, values) for each store chunk that overlaps the region."""
    ch, cw = arr.chunks[-2:]
    r0 = region.row_off - region.row_off % ch
    c0 = region.col_off - region.col_off % cw
    for r in range(r0, region.row_off + region.height, ch):
        for c in range(c0, region.col_off + region.width, cw):
            rs = slice(max(r, region.row_off), min(r + ch, region.row_off + region.height))
            cs = slice(max(c, region.col_off), min(c + cw, region.col_off + region.width))
            yield rs.start - region.row_off, cs.start - region.col_off, arr[..., rs, cs]


# ----------------------------------------------------------------------------------------- COGs
def write_tile_cogs(
    output: str,
    store_url: str,
    region: TileRegion,
    grid: OutputGrid,
    tmp_dir: str | None = None,
) -> dict[str, str]:
    """Write ``<output>/cog/<tile>/<variable>.tif`` (valid COGs) from the tile's store region.

    The region is read chunk by chunk into a local temporary GeoTIFF, turned into a COG (DEFLATE,
    overviews: average for probability, nearest for the integer layers), validated and then
    published atomically.  Values equal the store's; re-running writes byte-identical files.
    Returns ``{variable: url}``.
    """
    a, b, c, d, e, f = grid.transform
    x0, y0 = region.col_off, region.row_off
    transform = (a, b, c + x0 * a + y0 * b, d, e, f + x0 * d + y0 * e)
    group = _open_group(store_url, "r")
    written = {}
    for var in grid.variables():
        if var not in group.array_keys():
            raise OutputError(
                f"the store {store_url} has no variable {var!r}; was it created for another model?"
            )
        arr = group[var]
        spec = _cog.CogSpec(
            width=region.width, height=region.height, count=arr.shape[0] if arr.ndim == 3 else 1,
            dtype=DTYPES[var], crs_wkt=grid.crs_wkt, transform=transform, nodata=_COG_NODATA[var],
            descriptions=tuple(grid.class_names) if var == "probability" else (var,),
            overview_resampling="average" if var == "probability" else "nearest",
        )  # fmt: skip
        url = storage.join(output, "cog", region.tile, f"{var}.tif")
        written[var] = _cog.write_cog(url, spec, _chunk_blocks(arr, region), tmp_dir=tmp_dir)
    log.info("tile %s: wrote %s COGs to %s", region.tile, list(written), output)
    return written


def write_mosaics(output: str, tiles: Sequence[str]) -> dict[str, str]:
    """Write ``<output>/cog/<variable>.vrt`` mosaics of the tiles' COGs (paths relative to the VRT).

    Variables without any tile COG are skipped; tiles lacking a variable are left out of that
    mosaic with a warning.  Raises :class:`OutputError` if no tile has any COG.
    """
    cog_dir = storage.join(output, "cog")
    fs, _ = storage.get_fs(cog_dir)
    written = {}
    for var in VARIABLES:
        urls = {t: storage.join(cog_dir, t, f"{var}.tif") for t in sorted(set(tiles))}
        present = [u for u in urls.values() if fs.exists(storage.get_fs(u)[1])]
        if not present:
            continue
        if len(present) < len(urls):
            missing = sorted(t for t, u in urls.items() if u not in present)
            log.warning("mosaic %s.vrt leaves out tiles without %s.tif: %s", var, var, missing)
        written[var] = _cog.write_vrt(storage.join(cog_dir, f"{var}.vrt"), present)
    if not written:
        raise OutputError(
            f"no tile COGs under {cog_dir} for tiles {list(tiles)}; write them first "
            "(write_tile_cogs)"
        )
    return written


def check_writable(output: str) -> None:
    """Raise :class:`OutputError` if ``output`` cannot be created or written (probe + delete)."""
    fs, path = storage.get_fs(output)
    probe = storage.join(output, f".treesits-write-probe-{uuid.uuid4().hex}")
    try:
        # object stores have no folders (and s3fs.makedirs would create a missing bucket)
        if not storage.is_remote(output):
            fs.makedirs(path, exist_ok=True)
        _, probe_path = storage.get_fs(probe)
        fs.pipe_file(probe_path, b"treesits_dask write probe\n")
        fs.rm_file(probe_path)
    except Exception as exc:  # any failure means "not writable"; reported with its cause
        raise OutputError(
            f"the output location {output} cannot be written ({type(exc).__name__}: {exc}); "
            "choose another --output or fix its permissions / credentials"
        ) from exc
