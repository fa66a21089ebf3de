"""Opening scene files: counted opens, header checks, and datasets kept open per thread.

A task that reads a band of a tile opens every scene of its batch; the next task on the same worker
thread mostly reads the same scenes (another band, or the next tile's windows after a restart of
the run), so :func:`dataset` keeps the datasets it opened, checked, per thread (rasterio datasets
must not be shared between threads), up to :func:`capacity` of them, least recently used first
out.  Opening (and checking) a file took about 20 % of the time of a window read when every window
opened every file.  A cached dataset is keyed by its URL and its version (size and mtime or ETag,
as the scene table saw them), so a replaced file is opened again;
:func:`forget_datasets` (called with the GDAL cache clearing at the start of a run) closes them
all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from ..errors import InputDataError
from . import storage
from .crs import same_crs, short_crs
from .grid import TileGrid

__all__ = [
    "DECODED",
    "OPEN_COUNTER",
    "Counter",
    "DecodeCounter",
    "capacity",
    "check_header",
    "dataset",
    "drop_dataset",
    "forget_datasets",
    "open_error",
    "open_raster",
]


class Counter:
    """A thread-safe count in this process (GDAL dataset opens, reads or forwards in progress)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.count += n


class DecodeCounter:
    """What the reads of this process asked GDAL to decode: band-blocks and their uncompressed
    bytes (every block a read touches counts whole, once per read; see
    :func:`treesits_dask.io.bands.decoded_bytes`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.blocks = 0
        self.bytes = 0

    def add(self, blocks: int, nbytes: int) -> None:
        with self._lock:
            self.blocks += blocks
            self.bytes += nbytes

    def reset(self) -> None:
        with self._lock:
            self.blocks = self.bytes = 0

    def snapshot(self) -> tuple[int, int]:
        """(band-blocks, bytes) so far."""
        with self._lock:
            return self.blocks, self.bytes


#: GDAL dataset opens of scene files in this process (tests and benchmarks read it)
OPEN_COUNTER = Counter()
#: blocks decoded by scene reads in this process (the benchmark's decode amplification)
DECODED = DecodeCounter()


def open_raster(url: str):
    """``rasterio.open`` of a local path or ``s3://`` URL, counted in :data:`OPEN_COUNTER`."""
    import rasterio

    OPEN_COUNTER.add()
    return rasterio.open(storage.gdal_path(url))


def open_error(url: str, exc: BaseException) -> InputDataError:
    """The error that names a scene file which cannot be opened at all."""
    return InputDataError(
        f"cannot open {url}: {exc}. The file is missing, unreadable or not a GeoTIFF; "
        "restore it or remove it (with its QAI twin) from the tile folder"
    )


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


# ------------------------------------------------------------------- datasets kept open per thread
_GENERATION = Counter()  # bumped by forget_datasets: every thread drops what it holds
_CAPACITY: int | None = None


def capacity() -> int:
    """Datasets a thread keeps open: the process's open-file limit (raised to its hard limit, at
    most 65536, on first use) shared out among the threads that read (those of the Dask worker
    this runs in, else the cores), halved for everything else a process opens, between 16 and
    4096.  A tile of 600 scenes has 1200 BOA + QAI files, and its read tasks visit them in turn:
    a cache smaller than that (least recently used first out) would open every file again in
    every task (measured: a 600-scene tile read at a fifth of the decode speed with 625)."""
    global _CAPACITY
    if _CAPACITY is None:
        limit = 1024
        try:
            import resource

            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
            if soft != resource.RLIM_INFINITY and soft < want:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
            limit = 65536 if soft == resource.RLIM_INFINITY else soft
        except (ImportError, ValueError, OSError):  # not POSIX, or not allowed
            pass
        _CAPACITY = max(16, min(4096, limit // (2 * _reading_threads())))
    return _CAPACITY


def _reading_threads() -> int:
    """Threads of the Dask worker this process runs (else the cores)."""
    import os

    try:
        from distributed import get_worker

        return max(1, int(get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        return max(1, os.cpu_count() or 1)


class _Open(threading.local):
    def __init__(self) -> None:
        self.datasets: OrderedDict = OrderedDict()
        self.generation = 0


_OPEN = _Open()


def _close_all(held: _Open) -> None:
    while held.datasets:
        _, src = held.datasets.popitem(last=False)
        src.close()


def dataset(url: str, version, check: Callable[[object], None]):
    """The open dataset of ``url`` (at ``version``) for this thread: opened (counted in
    :data:`OPEN_COUNTER`) and ``check``\\ ed once, then kept; do not close it.  Raises what
    opening or ``check`` raises (the file is then not kept)."""
    held = _OPEN
    if held.generation != _GENERATION.count:
        _close_all(held)
        held.generation = _GENERATION.count
    key = (url, version)
    src = held.datasets.get(key)
    if src is not None:
        held.datasets.move_to_end(key)
        return src
    src = open_raster(url)
    try:
        check(src)
    except BaseException:
        src.close()
        raise
    held.datasets[key] = src
    while len(held.datasets) > capacity():
        _, old = held.datasets.popitem(last=False)
        old.close()
    return src


def drop_dataset(url: str, version) -> None:
    """Close this thread's dataset of ``url`` (after a failed read: the next one opens it
    afresh)."""
    src = _OPEN.datasets.pop((url, version), None)
    if src is not None:
        src.close()


def forget_datasets() -> None:
    """Every thread of this process closes the datasets it keeps before its next read (files may
    have been replaced since they were opened)."""
    _GENERATION.add()
