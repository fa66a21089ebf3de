"""Scene table -> lazy ``xarray.DataArray`` (time, band, y, x) int16, one dask task per window.

A task reads ONE spatial window of ALL scenes of a tile (graph size grows with tiles x windows, not
with scenes).  QAI screening happens in the same task: screened observations are set to the BOA
nodata value (-9999) in every band, so downstream code sees a single validity rule.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputDataError
from . import storage
from .crs import same_crs, short_crs
from .discovery import S2_BANDS, CubeDefinition, Scene
from .grid import TileGrid, Window, WindowLayout
from .qai import qai_invalid
from .remote import read_retrying

__all__ = [
    "NODATA",
    "OPEN_COUNTER",
    "READS_IN_PROGRESS",
    "Counter",
    "InProgress",
    "WindowReader",
    "check_header",
    "days_since_epoch",
    "open_raster",
    "scene_problems",
    "tile_cube",
    "tile_grid",
]

log = logging.getLogger(__name__)

NODATA = -9999


class Counter:
    """A thread-safe count in this process (GDAL dataset opens, reads or forwards in progress)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.count += n


#: GDAL dataset opens of scene files in this process (tests and benchmarks read it)
OPEN_COUNTER = Counter()


class InProgress(Counter):
    """How many window reads (or, in ``pipeline.predict``, CPU forwards) are running in this process
    right now; used as a context manager around each one.  CPU inference gives a core back to each
    read (see ``Predictor.threads``): a read beside a forward that uses every core stalls the
    forward's OpenMP barriers and made it ~2.4x slower here."""

    def __enter__(self):
        self.add(1)
        return self

    def __exit__(self, *exc) -> None:
        self.add(-1)


READS_IN_PROGRESS = InProgress()


def open_raster(url: str):
    """``rasterio.open`` of a local path or ``s3://`` URL, counted in :data:`OPEN_COUNTER`."""
    import rasterio

    OPEN_COUNTER.add()
    return rasterio.open(storage.gdal_path(url))


def _open_error(url: str, exc: BaseException) -> InputDataError:
    return InputDataError(
        f"cannot open {url}: {exc}. The file is missing, unreadable or not a GeoTIFF; "
        "restore it or remove it (with its QAI twin) from the tile folder"
    )


def _open(url: str):
    """Open a GeoTIFF (remote ones with retries); :class:`InputDataError` naming it if
    impossible."""
    try:
        return read_retrying(url, lambda: open_raster(url), what="opening")
    except Exception as exc:  # rasterio raises RasterioIOError and friends
        raise _open_error(url, exc) from exc


class _OpenFailed(Exception):
    """A scene could not be opened at all (as opposed to failing in the middle of a read)."""


def _missing(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "does not exist" in text or "no such file" in text


def tile_grid(definition: CubeDefinition, scene: Scene) -> TileGrid:
    """The tile's pixel grid from its first BOA; checked against datacube-definition.prj."""

    with _open(scene.boa) as src:
        tr = src.transform
        grid = TileGrid(
            tile=scene.tile,
            crs_wkt=src.crs.to_wkt() if src.crs else "",
            transform=(tr.a, tr.b, tr.c, tr.d, tr.e, tr.f),
            width=src.width,
            height=src.height,
            block_shape=tuple(src.block_shapes[0]),
            count=src.count,
        )
    left, top = definition.tile_origin(scene.tile)
    if not grid.crs_wkt or not same_crs(grid.crs_wkt, definition.crs_wkt):
        raise InputDataError(
            f"{scene.boa}: its CRS ({short_crs(grid.crs_wkt or None)}) is not the CRS of "
            f"datacube-definition.prj ({short_crs(definition.crs_wkt)}); the tile {scene.tile} "
            "does not belong to this cube"
        )
    res_x, res_y = abs(tr.a), abs(tr.e)
    if abs(tr.c - left) > res_x / 2 or abs(tr.f - top) > res_y / 2:
        raise InputDataError(
            f"{scene.boa}: upper-left corner ({tr.c:.3f}, {tr.f:.3f}) is not the origin of tile "
            f"{scene.tile} ({left:.3f}, {top:.3f}) from datacube-definition.prj; the file is in "
            "the wrong tile folder or the .prj belongs to another cube"
        )
    if grid.count != len(S2_BANDS):
        raise InputDataError(
            f"{scene.boa} has {grid.count} bands, but Sentinel-2 BOA has {len(S2_BANDS)}; "
            "restrict --sensors to Sentinel-2 (SEN2A,SEN2B,SEN2C) or remove the file"
        )
    return grid


def check_header(src, url: str, grid: TileGrid, bands: int | None = None) -> None:
    """:class:`InputDataError` unless the open dataset ``src`` has ``bands`` (default: the grid's
    band count) int16 bands on ``grid`` (size, transform, CRS by meaning)."""
    bands = grid.count if bands is None else bands
    tr = src.transform
    if src.count != bands or src.dtypes[0] != "int16":
        raise InputDataError(
            f"{url} has {src.count} bands of {src.dtypes[0]}; expected {bands} int16 band(s) "
            f"like the other scenes of tile {grid.tile}; remove or re-create the file"
        )
    if (src.width, src.height) != (grid.width, grid.height) or not np.allclose(
        (tr.a, tr.b, tr.c, tr.d, tr.e, tr.f),
        grid.transform,
        rtol=0,
        atol=1e-6 * abs(grid.transform[0]),
    ):
        raise InputDataError(
            f"{url} is on another grid ({src.width}x{src.height} px, transform "
            f"{tuple(tr)[:6]}) than tile {grid.tile} ({grid.width}x{grid.height} px, transform "
            f"{grid.transform}); the file does not belong in this tile folder"
        )
    if src.crs is None or src.crs.to_wkt() != grid.crs_wkt:
        if src.crs is None or not same_crs(grid.crs_wkt, src.crs):
            raise InputDataError(
                f"{url} has CRS {short_crs(src.crs)}, not the CRS of tile {grid.tile} "
                f"({short_crs(grid.crs_wkt)}); the file does not belong in this tile folder"
            )


def _header_problem(url: str, grid: TileGrid, bands: int) -> str | None:
    """The problem of one scene file's header, or None (opened with retries when remote)."""

    def check() -> None:
        with open_raster(url) as src:
            check_header(src, url, grid, bands)

    try:
        read_retrying(url, check, what="reading the header", permanent=(InputDataError,))
    except InputDataError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - not a GeoTIFF, gone, no access
        return str(_open_error(url, exc))
    return None


def scene_problems(
    scenes: Sequence[Scene],
    grid: TileGrid,
    qai_flags: Sequence[str] = (),
    known: frozenset[str] = frozenset(),
    threads: int = 16,
) -> list[str]:
    """What is wrong with the scenes of a tile, from their headers only (many read at once): a
    BOA or QAI file that does not open, has other bands or another grid or CRS than ``grid``, or
    a missing QAI twin while ``qai_flags`` screen.  Scenes named in ``known`` (checked by an earlier
    run and unchanged since) are not opened again."""
    from concurrent.futures import ThreadPoolExecutor

    problems = []
    files: list[tuple[str, int]] = []
    for scene in scenes:
        if qai_flags and scene.qai is None:
            qai_name = storage.basename(scene.boa).replace("_BOA", "_QAI")
            problems.append(
                f"{scene.boa} has no QAI file ({qai_name}) but QAI screening is on; restore the "
                "QAI file or set --qai none"
            )
        if scene.name in known:
            continue
        files.append((scene.boa, grid.count))
        if qai_flags and scene.qai is not None:
            files.append((scene.qai, 1))
    if files:
        with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
            found = pool.map(lambda f: _header_problem(f[0], grid, f[1]), files)
            problems += [p for p in found if p]
    return problems


@dataclass(frozen=True)
class WindowReader:
    """Recipe to read one window of all scenes of a tile: pickles as a few strings, opens files in
    the task."""

    grid: TileGrid
    boa: tuple[str, ...]
    qai: tuple[str | None, ...]
    qai_flags: tuple[str, ...] = ()

    def _check(self, src, url: str) -> None:
        check_header(src, url, self.grid)

    def read(self, window: Window, mask: np.ndarray | None = None) -> np.ndarray:
        """``(T, bands, h, w)`` int16; screened observations set to -9999.

        When ``mask`` is given and has no pixel set, no file is opened and a read-only block of
        nodata is returned (broadcast, no memory).
        """
        shape = (len(self.boa), self.grid.count, window.height, window.width)
        if mask is not None and not np.any(mask):
            return np.broadcast_to(np.int16(NODATA), shape)
        with READS_IN_PROGRESS:
            return self._read(window, shape)

    def _read(self, window: Window, shape: tuple[int, ...]) -> np.ndarray:
        from rasterio.windows import Window as RioWindow

        rw = RioWindow(window.col_off, window.row_off, window.width, window.height)
        out = np.empty(shape, dtype=np.int16)
        rows = (
            f"rows {window.row_off}:{window.row_off + window.height}, "
            f"cols {window.col_off}:{window.col_off + window.width}"
        )
        for t, (boa, qai) in enumerate(zip(self.boa, self.qai, strict=True)):

            def read_boa(boa=boa, t=t):
                try:
                    src = open_raster(boa)
                except (
                    Exception
                ) as exc:  # not a GeoTIFF, gone, no access: retried if remote, then named
                    raise _OpenFailed(str(exc)) from exc
                with src:
                    self._check(src, boa)
                    src.read(window=rw, out=out[t])

            try:
                read_retrying(
                    boa, read_boa, what=f"reading window {rows}", permanent=(InputDataError,)
                )
            except InputDataError:
                raise
            except Exception as exc:
                if _missing(exc) or isinstance(exc, _OpenFailed):
                    raise _open_error(boa, exc) from exc
                raise InputDataError(
                    f"cannot read {boa} (window {rows}): {exc}. The file is "
                    "truncated or corrupt; re-create it or remove it (with its QAI twin)"
                ) from exc
            if self.qai_flags:
                if qai is None:
                    raise InputDataError(
                        f"{boa} has no QAI file ({storage.basename(boa).replace('_BOA', '_QAI')}) "
                        "but QAI screening is on; restore the QAI file or set --qai none"
                    )

                def read_qai(qai=qai):
                    with open_raster(qai) as src:
                        check_header(src, qai, self.grid, bands=1)
                        return src.read(1, window=rw)

                try:
                    q = read_retrying(
                        qai, read_qai, what=f"reading window {rows}", permanent=(InputDataError,)
                    )
                except InputDataError:
                    raise
                except Exception as exc:
                    if _missing(exc):
                        raise _open_error(qai, exc) from exc
                    raise InputDataError(
                        f"cannot read QAI file {qai}: {exc}; re-create or remove it"
                    ) from exc
                bad = qai_invalid(q, self.qai_flags)
                if bad.any():
                    out[t][:, bad] = NODATA
        return out


def tile_cube(
    scenes: Sequence[Scene],
    grid: TileGrid,
    layout: WindowLayout,
    qai_flags: Sequence[str] = (),
    mask=None,
):
    """Lazy ``xarray.DataArray`` (time, band, y, x) int16 of one tile, one chunk per window.

    ``mask`` (optional dask array (y, x) bool, chunked like ``layout``) lets a window with no
    masked-in pixel skip all reads.
    """
    import dask.array as da
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    reader = WindowReader(
        grid=grid,
        boa=tuple(s.boa for s in scenes),
        qai=tuple(s.qai for s in scenes),
        qai_flags=tuple(qai_flags),
    )
    mask_name = mask.name if mask is not None else None
    name = f"read-{grid.tile}-" + tokenize(reader, layout.shape, mask_name)
    dsk = {}
    for i, j, w in layout:
        if mask is None:
            dsk[(name, 0, 0, i, j)] = (reader.read, w)
        else:
            dsk[(name, 0, 0, i, j)] = (reader.read, w, (mask.name, i, j))
    chunks = ((len(scenes),), (grid.count,), *layout.chunks)
    deps = [mask] if mask is not None else []
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    data = da.Array(graph, name, chunks, dtype=np.int16)
    times = np.array([np.datetime64(s.date, "ns") for s in scenes], dtype="datetime64[ns]")
    arr = xr.DataArray(
        data,
        dims=("time", "band", "y", "x"),
        coords={
            "time": times,
            "band": list(S2_BANDS[: grid.count]),
            "y": grid.y_coords(),
            "x": grid.x_coords(),
            "sensor": ("time", [s.sensor for s in scenes]),
        },
        name=grid.tile,
        attrs={"nodata": NODATA, "tile": grid.tile, "_FillValue": NODATA},
    )
    arr = arr.rio.write_crs(grid.crs_wkt).rio.write_transform(grid.affine)
    return arr


def days_since_epoch(dates: Sequence[dt.date]) -> np.ndarray:
    """Days since 1970-01-01 of ``dates`` (int64)."""
    return np.array([(d - dt.date(1970, 1, 1)).days for d in dates], dtype=np.int64)
