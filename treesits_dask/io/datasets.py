"""Opening scene files: counted opens, header checks, and datasets kept open per process.

A task that reads a band of a tile opens every scene of its batch; the next tasks of the same
worker mostly read the same scenes (another band, or the next tile's windows after a restart of
the run), so :func:`dataset` lends the datasets it opened, checked, from a pool of the process:
each to one thread at a time (rasterio datasets must not be used by two threads at once), given
back after the read and kept, least recently used first out, up to :func:`capacity` of them.
Opening (and checking) a file took about 20 % of the time of a window read when every window
opened every file.  A kept dataset is keyed by its URL and its version (size and mtime or ETag,
as the scene table saw them), so a replaced file is opened again; :func:`forget_datasets`
(called with the GDAL cache clearing at the start of a run) closes them all.  An open GeoTIFF
keeps decoded blocks, so what the pool keeps is bounded by memory too (:func:`memory_budget`,
:func:`held_by`), less where the worker's other memory leaves it no room under the share of the
limit at which Dask spills (:data:`MEMORY_SECONDS`), and GDAL's block cache is limited per
process (:data:`READ_GDAL_CACHE`).  The pool was per thread before: every thread of a worker
kept its own dataset of the same files within its share of the memory, so a 600-scene tile's
1200 files, which fit a 3 GiB worker's budget once, fit no thread's share and were opened 4-5
times per read.

This module is longer than 400 lines: what a worker keeps open (the pool, the header check once
per process, what a kept file holds, GDAL's block cache) is one policy, measured as one.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable

import numpy as np
from rasterio.errors import NotGeoreferencedWarning

from ..errors import InputDataError
from . import storage
from .buffers import process_rss, target_share, trim_heap, worker_memory_limit
from .crs import same_crs, short_crs
from .grid import TileGrid
from .remote import limit_gdal_cache, read_retrying

log = logging.getLogger(__name__)

__all__ = [
    "DECODED",
    "OPEN_COUNTER",
    "SCREENED",
    "Counter",
    "DecodeCounter",
    "MEMORY_SECONDS",
    "MEMORY_WINDOW",
    "capacity",
    "check_header",
    "Lent",
    "dataset",
    "forget_datasets",
    "forwards_here",
    "held_by",
    "kept_datasets",
    "LEAN_HELD",
    "decode_threads",
    "memory_budget",
    "open_error",
    "open_retrying",
    "open_options",
    "open_raster",
    "ordinary_read",
    "pool_state",
    "read_cache_bytes",
    "set_memory_budget",
    "threaded",
    "unchanged",
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
#: BOA blocks the scene reads of this process did not decode because QAI screens every pixel of
#: them (clouds, swath edges): decoded + screened is what the reads covered
SCREENED = DecodeCounter()


#: open options of a scene file this process has checked the header of already
#: (:func:`dataset`): GDAL then leaves out its georeferencing, which the reads do not use.  An open
#: of a FORCE GeoTIFF took 1.4-2.1 ms here, about 1 ms of it building the CRS from the file's
#: GeoTIFF keys (PROJ's database, whatever the CRS); with this 0.5-0.7 ms.  A tile of 600 scenes
#: whose 1200 files a reading thread cannot all keep open opens them 3500-5400 times per read: the
#: 600-scene regime of ``bench --real`` (600 px, 3 GiB worker of 2 threads) read its strips in
#: 22.6-25.8 s against 28.7-35.1 s, its COG in 26.1-28.8 s against 36.9-37.7 s (alternating in
#: one process)
REOPEN_OPTIONS = {"GEOREF_SOURCES": "NONE"}

# a file opened with REOPEN_OPTIONS has no geotransform, and rasterio says so each time
warnings.filterwarnings(
    "ignore", message="Dataset has no geotransform", category=NotGeoreferencedWarning
)


def open_options(georeferenced: bool = True) -> dict:
    """GDAL open options of a scene file: none, or :data:`REOPEN_OPTIONS` without
    ``georeferenced`` (no CRS, an identity transform)."""
    return {} if georeferenced else REOPEN_OPTIONS


def open_raster(url: str, georeferenced: bool = True, threads: int | None = None):
    """``rasterio.open`` of a local path or ``s3://`` URL, counted in :data:`OPEN_COUNTER`, with
    :func:`open_options`; ``threads`` (more than one): for GDAL's multi-threaded read on that many
    threads (the GeoTIFF open option ``NUM_THREADS``, see :data:`LEAN_HELD`)."""
    import rasterio

    OPEN_COUNTER.add()
    options = open_options(georeferenced)
    if threads is not None and threads > 1:
        options = {**options, "NUM_THREADS": str(threads)}
    return rasterio.open(storage.gdal_path(url), **options)


def open_retrying(url: str):
    """Open a GeoTIFF (remote ones with retries); :class:`InputDataError` naming it if
    impossible (:func:`open_error`)."""
    try:
        return read_retrying(url, lambda: open_raster(url), what="opening")
    except Exception as exc:  # rasterio raises RasterioIOError and friends
        raise open_error(url, exc) from exc


def open_error(url: str, exc: BaseException) -> InputDataError:
    """The error that names a scene file which cannot be opened at all."""
    return InputDataError(
        f"cannot open {url}: {exc}. The file is missing, unreadable or not a GeoTIFF; "
        "restore it or remove it (with its QAI twin) from the tile folder"
    )


def check_header(
    src, url: str, grid: TileGrid, bands: int | None = None, georeferenced: bool = True
) -> None:
    """:class:`InputDataError` unless the open dataset ``src`` has ``bands`` (default: the grid's
    band count) int16 bands on ``grid`` (size, transform, CRS by meaning; without
    ``georeferenced``, for a file opened without its georeferencing, only the size)."""
    bands = grid.count if bands is None else bands
    tr = src.transform
    if src.count != bands or src.dtypes[0] != "int16":
        raise InputDataError(
            f"{url} has {src.count} bands of {src.dtypes[0]}; expected {bands} int16 band(s) "
            f"like the other scenes of tile {grid.tile}; remove or re-create the file"
        )
    if (
        (src.width, src.height) != (grid.width, grid.height)
        or georeferenced
        and not np.allclose(
            (tr.a, tr.b, tr.c, tr.d, tr.e, tr.f),
            grid.transform,
            rtol=0,
            atol=1e-6 * abs(grid.transform[0]),
        )
    ):
        raise InputDataError(
            f"{url} is on another grid ({src.width}x{src.height} px, transform "
            f"{tuple(tr)[:6]}) than tile {grid.tile} ({grid.width}x{grid.height} px, transform "
            f"{grid.transform}); the file does not belong in this tile folder"
        )
    if not georeferenced:
        return
    if src.crs is None or src.crs.to_wkt() != grid.crs_wkt:
        if src.crs is None or not same_crs(grid.crs_wkt, src.crs):
            raise InputDataError(
                f"{url} has CRS {short_crs(src.crs)}, not the CRS of tile {grid.tile} "
                f"({short_crs(grid.crs_wkt)}); the file does not belong in this tile folder"
            )


# ---------------------------------------------------------------- datasets kept open per process
_GENERATION = Counter()  # bumped by forget_datasets: the pool closes what it keeps
_CAPACITY: int | None = None


def capacity() -> int:
    """Datasets this process keeps open: half its open-file limit (raised to its hard limit, at
    most 65536, on first use; half for everything else a process opens), between 16 and 16384.
    A tile of 600 scenes has 1200 BOA + QAI files, and its read tasks visit them in turn: a pool
    smaller than that (least recently used first out) would open every file again in every task
    (measured: a 600-scene tile read at a fifth of the decode speed with 625 per thread).  The
    memory the kept datasets hold bounds them too (:func:`memory_budget`)."""
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
        _CAPACITY = max(16, min(16384, limit // 2))
    return _CAPACITY


#: share of the Dask worker's memory limit (else of this machine's memory) that the datasets kept
#: open by a process may hold.  An open GeoTIFF that has been read keeps decoded blocks:
#: measured 2.9 MB per 3000 px FORCE strip file (band-interleaved 300-row strips; with its QAI
#: 1.9 MiB per scene when read as the reads do, see :func:`held_by`), 3.4 MB per
#: 3000 px COG (pixel-interleaved 256 x 256 blocks of 10 bands) and 0.39 MB per its QAI, beside
#: GDAL's block cache (bounded on its own, :data:`READ_GDAL_CACHE`; 120 COGs read with a 16 MiB
#: cache grew the process by 403 MB, with 256 MiB by 655 MB): 1200 files of a 600-scene tile
#: kept by each of a worker's threads were gigabytes that Dask could neither see nor spill (a
#: 3 GiB worker was killed), 16 threads would hold 56 GB.  8 % per process, shared out among its
#: threads, while each thread kept its own; 12 % since its threads share one pool: a 600 px,
#: 600-scene tile's 1200 striped files (619 KiB per scene counted, 346-449 measured) fit a 3 GiB
#: worker's pool once, and a read opens each once (1164 opens against 4600-5600)
KEPT_SHARE = 0.12

_BUDGET: int | None = None
_LIMIT: int | None = None


def memory_budget() -> int:
    """Bytes the datasets this process keeps open may hold (:data:`KEPT_SHARE`)."""
    global _BUDGET, _LIMIT
    if _BUDGET is None:
        _LIMIT = worker_memory_limit()
        _BUDGET = int(_LIMIT * KEPT_SHARE)
    return _BUDGET


#: the pool gives way to the rest of the worker's memory: a thread of the process looks at its
#: memory every this many seconds and closes idle datasets, least recently used first (and so
#: does each give-back), while the process's memory less what the pool holds, at its highest over
#: the last :data:`MEMORY_WINDOW` seconds, leaves less than that for the pool under the share of
#: the limit at which Dask spills by the process's memory (``distributed.worker.memory.spill``,
#: 70 %).  The thread sees the peaks of a model's forward too, when no read gives a dataset back.
#: A 3 GiB worker streaming SBERT through a 3000 px COG of 600 scenes peaked at 2.3-2.4 GiB with
#: the pool's 386 MB, nearly all of it memory Dask does not manage, and Dask spilled 28-32 GB in
#: one tile; 6.1 GB with this (docs/performance.md, "The pool of kept datasets gives way")
MEMORY_SECONDS = 0.1
MEMORY_WINDOW = 10.0

#: what the pool closes for lack of room is freed inside glibc's heap and stays in the process
#: (the rest of its memory then seemed to grow by as much, and the pool gave way until it was
#: empty, the process no smaller: a 600-scene COG read after one with a larger pool spilled 20.8
#: GB, its pool empty): the thread that looks at the memory gives the heap's free memory back to
#: the system (:func:`~treesits_dask.io.buffers.trim_heap`) once the datasets closed so since the
#: last time hold this many bytes, at most every :data:`TRIM_SECONDS`
TRIM_BYTES = 32 * 2**20
TRIM_SECONDS = 1.0
#: times this process's pool gave the heap's free memory back (tests and benchmarks read it)
TRIMS = Counter()

#: what a dataset opened for GDAL's multi-threaded read is counted to hold.  Where the pool has
#: had to close datasets for its memory in this generation (its budget, or the room the rest of
#: the process's memory leaves it), the BOA files of local scenes and COGs on S3 it opens from
#: then on are opened so (the GeoTIFF open option ``NUM_THREADS``, :func:`decode_threads`): a
#: read of more than one block decodes each block into a buffer of its own, freed after it, so
#: the dataset keeps neither a decoded block of all bands nor libtiff's buffer of a compressed
#: one.  Measured (120 files kept, each read in 256 x 512 px, GDAL cache 16 MiB): a 3000 px COG
#: 0.16-0.19 MB against 3.17, a 3000 px FORCE strips BOA (300-row bands) 0.24 MB against 1.67,
#: the same values; 5-10 % more CPU per read (the blocks go through GDAL's thread pool), so only
#: where the files do not fit otherwise.  A read of one block of a pixel-interleaved file takes
#: GDAL's ordinary path all the same, after which the dataset is counted whole
#: (:meth:`Lent.count_reads`).  A 3000 px COG of 600 scenes (12 GiB worker of 2 threads, 200 px
#: windows), whose files the pool's 12 % held about half of, read so in 79.5-88.4 s against
#: 85.6-93.7 s: 1 512-1 609 files kept against 771-878 in the same budget, 4 266-4 779 opens
#: against 33 779-41 800 (docs/performance.md, "Kept files opened for GDAL's multi-threaded
#: read").  A QAI file (one band, small blocks) is not opened so: its reads took 45 % more CPU
#: so, for half its 0.33 MB.  Nor is a striped BOA file on S3 (the reader decides,
#: ``WindowReader._may_be_lean``; docs/performance.md, "Kept files on S3")
LEAN_HELD = 256 * 2**10


def held_by(src, size: int | None = None) -> int:
    """What an open dataset that has been read holds, estimated from the measurements of
    :data:`KEPT_SHARE`: 2.5 decoded blocks of all bands where they are pixel-interleaved (3.3 MB
    of a 3000 px COG, measured 3.36), plus its directory.  (This was 3.5 blocks, from a
    measurement that counted GDAL's block cache too: the kept COGs of a 120-scene tile then
    seemed not to fit a reading thread of a 12 GiB, 2-thread worker, and every task that visited
    them opened them all again.)

    A file of one band per block in full-width strips (FORCE < 3.8 BOA and QAI) holds what its
    largest compressed strip needs in libtiff's read buffer and a part that grows with the width:
    with its ``size`` in bytes known, 1.5 of its mean compressed block plus a fifth of a decoded
    block plus 256 KiB.  Measured (the BOA and QAI of n scenes opened in turn and read whole, GDAL
    cache 16 MiB: the process's growth per scene) against this estimate and 2 decoded strips:
    3000 px in strips of 300 rows 1918 KiB over 110 scenes (3180; 7287), 1000 px of 100 rows 643
    KiB over 45 (799; 1037), 600 px of 60 rows 449 and 346 KiB over 100 and 300 (619; 537).
    Without ``size``: 2 decoded blocks of one band (3.6 MiB for a 3000 px strip), as before,
    which kept only about a third of a 120-scene 3000 px tile's files open on a 12 GiB worker of 2
    threads: its read tasks opened most of their files again, 1600-2035 opens per read against
    466 now (each file about once per thread).  Tiled files of one band per block:
    2 decoded blocks (0.39 MB of a 3000 px COG's QAI, measured 0.39)."""
    bh, bw = src.block_shapes[0]
    block = bh * bw * np.dtype(src.dtypes[0]).itemsize
    pixel = src.count > 1 and src.interleaving is not None and src.interleaving.name == "pixel"
    if pixel:
        return int(2.5 * block * src.count) + 128 * 2**10
    if not size or bw < src.width:  # tiled: 2 blocks, as measured for a COG's QAI
        return int(2 * block) + 128 * 2**10
    blocks = -(-src.height // bh) * -(-src.width // bw) * src.count
    return int(1.5 * size / blocks + 0.2 * block) + 256 * 2**10


def decode_threads() -> int:
    """The threads a dataset opened for GDAL's multi-threaded read (:data:`LEAN_HELD`) decodes
    on: as many as the Dask worker running this task has (the reads of its threads share GDAL's
    one pool of threads, as large as the most any dataset asked for), else as this machine has
    cores; at least 2 (GDAL reads on the calling thread alone below that)."""
    try:
        from distributed import get_worker

        threads = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        threads = os.cpu_count() or 1
    return max(2, int(threads))


def forwards_here() -> None:
    """This process runs CPU forwards (``pipeline.predict`` says so at each): from now on it opens
    no file for GDAL's multi-threaded read (:data:`LEAN_HELD`), and a kept file opened so is
    opened again the ordinary way when it is next lent (so is one a forked child finds in the
    pool it inherited).  The forward's threads are given the worker's cores less one per read
    running (``threads_for_forward``; a read beside a forward that used every core made it 2.4x
    slower), and GDAL's threads would decode a read's blocks on more than one."""
    _POOL.forwards = True


def threaded(src) -> bool:
    """Whether ``src`` was opened for GDAL's multi-threaded read (``NUM_THREADS``)."""
    return "NUM_THREADS" in (getattr(src, "options", None) or {})


def ordinary_read(src, window) -> bool:
    """Whether GDAL reads ``window`` (a rasterio ``Window``) of every band of ``src`` through its
    ordinary path although ``src`` was opened for its multi-threaded read: where the window lies
    in one block of a file whose blocks hold every band (pixel-interleaved) or its one band."""
    if src.count > 1 and (src.interleaving is None or src.interleaving.name != "pixel"):
        return False  # a block per band: two blocks at least
    bh, bw = src.block_shapes[0]
    r0, c0 = int(window.row_off), int(window.col_off)
    r1, c1 = r0 + int(window.height) - 1, c0 + int(window.width) - 1
    return r0 // bh == r1 // bh and c0 // bw == c1 // bw


class _Pool:
    """The datasets this process keeps open: counted (open ones, lent or idle, and the memory
    they hold), the idle ones by key (more than one where threads read a file at once), least
    recently used first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # key -> [(dataset, bytes it is counted to hold, bytes it holds read whole), ...]
        self.idle: OrderedDict = OrderedDict()
        self.open = 0
        self.bytes = 0
        self.generation = 0
        self.room: int | None = None  # what the rest of the process's memory leaves the pool
        self.rest: deque = deque()  # (when, the rest of the process's memory) looked at
        self.watching = False  # the thread that looks at it started
        self.unreturned = 0  # bytes of the datasets closed for lack of room since the last trim
        self.trimmed = 0.0  # when the heap was last trimmed (time.monotonic)
        self.lean = False  # closed datasets for its memory in this generation (LEAN_HELD)
        self.threaded = False  # opened a file so: GDAL's pool of threads started in this process
        self.forked_threaded = False  # forked from a process whose GDAL threads had started
        self.forwards = False  # CPU forwards run in this process (forwards_here)

    @property
    def threads_barred(self) -> bool:
        """No file may be read on GDAL's threads here: CPU forwards run in this process, or it was
        forked from one whose GDAL threads had started."""
        return self.forwards or self.forked_threaded

    def take(self, key):
        """An idle dataset of ``key`` (lent: no longer idle), or None; every idle one of an
        earlier generation is closed first."""
        with self.lock:
            stale = self._new_generation()
            kept = self.idle.get(key)
            found = kept.pop() if kept else None
            if kept is not None and not kept:
                del self.idle[key]
        _close(stale)
        return found

    def add(self, nbytes: int) -> None:
        """Count a dataset opened to be lent."""
        with self.lock:
            self.open += 1
            self.bytes += nbytes

    def give_back(self, key, src, nbytes: int, whole: int, generation: int) -> None:
        """Keep the lent dataset ``src`` of ``key`` idle (closed where it is of an earlier
        generation), then close idle ones, least recently used first, while the open ones are
        more than :func:`capacity` or hold more than :func:`memory_budget` or the room that the
        rest of the process's memory leaves them (:data:`MEMORY_SECONDS`).  Where two threads
        read a file at once, both its datasets are kept: they would read it at once again (two
        threads reading the bands of the same scenes)."""
        closing = []
        with self.lock:
            closing += self._new_generation()
            if generation != self.generation:
                closing.append(self._forget(src, nbytes))
            else:
                self.idle.setdefault(key, []).append((src, nbytes, whole))
                self.idle.move_to_end(key)
            if not self.watching:
                self._watch()
            closing += self._close_beyond()
        _close(closing)

    def _close_beyond(self) -> list:
        """Under the lock: take out the idle datasets, least recently used first, while the
        open ones are more than :func:`capacity` or hold more than :func:`memory_budget` or the
        room the rest of the process's memory leaves them (:data:`MEMORY_SECONDS`); returns
        them, to close outside the lock."""
        closing = []
        budget, most = memory_budget(), capacity()
        roomy = self.room is None or self.room >= budget
        if not roomy:
            budget = self.room
        held = self.bytes
        while self.idle and (self.open > most or self.bytes > budget):
            self.lean = self.lean or self.bytes > budget
            oldest, kept = next(iter(self.idle.items()))
            src, nbytes, _ = kept.pop(0)
            closing.append(self._forget(src, nbytes))
            if not kept:
                del self.idle[oldest]
        if not roomy:
            self.unreturned += held - self.bytes
        return closing

    def look(self) -> None:
        """Look at the process's memory now: the room it leaves the pool (the spill share of the
        worker's limit less the rest of the memory at its highest over the last
        :data:`MEMORY_WINDOW` seconds), and close the idle datasets beyond it.  The settings and
        the memory are read under the pool's lock, so that the last look to take it is the one
        whose room stays (the thread's look, begun before a setting changed, cannot overwrite the
        room of a look made after it).  Where the datasets closed for lack of room (here or as
        they were given back) hold :data:`TRIM_BYTES` since the last time, the heap's free memory
        goes back to the system."""
        with self.lock:
            memory_budget()  # the limit, found once
            limit = int((_LIMIT or worker_memory_limit()) * target_share("spill", 0.7))
            rss, now = process_rss(), time.monotonic()
            self.rest.append((now, rss - self.bytes))
            while self.rest[0][0] < now - MEMORY_WINDOW:
                self.rest.popleft()
            self.room = max(0, limit - max(rest for _, rest in self.rest))
            closing = self._close_beyond()
            trim = self.unreturned >= TRIM_BYTES and now - self.trimmed >= TRIM_SECONDS
            if trim:
                self.unreturned, self.trimmed = 0, now
        _close(closing)
        if trim and trim_heap():
            TRIMS.add()

    def _watch(self) -> None:
        """Under the lock: start the thread that looks at the process's memory every
        :data:`MEMORY_SECONDS` (once per process)."""
        self.watching = True

        def watch() -> None:
            while True:
                time.sleep(MEMORY_SECONDS)
                try:
                    self.look()
                except Exception:  # the pool then keeps its last room
                    log.debug("kept datasets: memory not looked at", exc_info=True)

        threading.Thread(target=watch, name="treesits-kept-datasets", daemon=True).start()

    def forked(self) -> None:
        """In a forked child: no thread looks at its memory yet, the memory looked at was the
        parent's, and the lock may have been held by a thread the child does not have."""
        self.lock = threading.Lock()
        self.watching, self.room, self.unreturned, self.lean = False, None, 0, False
        self.rest.clear()
        # GDAL's pool of threads is not remade in a forked child, whose multi-threaded reads
        # would wait for threads it does not have (a child's read hung so)
        self.forked_threaded = self.forked_threaded or self.threaded

    def recount(self, before: int, after: int) -> None:
        """A lent dataset counted ``before`` bytes holds ``after`` now."""
        with self.lock:
            self.bytes += after - before

    def discard(self, src, nbytes: int) -> None:
        """Close a lent dataset (after a failed read, or one opened for GDAL's threads in a process
        that runs CPU forwards or was forked: the next one opens the file afresh)."""
        with self.lock:
            self._forget(src, nbytes)
        src.close()

    def _forget(self, src, nbytes: int):
        self.open -= 1
        self.bytes -= nbytes
        return src

    def _new_generation(self) -> list:
        """Under the lock: where :func:`forget_datasets` was called since, every idle dataset
        (to close outside the lock)."""
        if self.generation == _GENERATION.count:
            return []
        self.generation = _GENERATION.count
        stale = [self._forget(src, n) for kept in self.idle.values() for src, n, _ in kept]
        self.idle.clear()
        self.lean = False
        return stale


def _close(datasets: list) -> None:
    for src in datasets:
        src.close()


_POOL = _Pool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.forked)


#: files whose header check a process remembers (all forgotten when there are more): 55 tiles of
#: 600 scenes
CHECKED_MOST = 65536


class _Checked:
    """The files whose header a thread of this process checked in this generation (not checked
    again, by any thread: each thread keeps its own datasets, and opens the others' files too)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: set = set()
        self.generation = 0

    def __contains__(self, key) -> bool:
        with self.lock:
            if self.generation != _GENERATION.count:
                self.keys.clear()
                self.generation = _GENERATION.count
            return key in self.keys

    def add(self, key) -> None:
        with self.lock:
            if len(self.keys) >= CHECKED_MOST:  # bounded over a run of many tiles
                self.keys.clear()
            self.keys.add(key)


_CHECKED = _Checked()


#: GDAL's block cache in a process that reads scenes, unless ``GDAL_CACHEMAX`` says otherwise:
#: at most this, and at most :data:`READ_CACHE_SHARE` of the worker's memory limit (never under
#: :data:`MIN_READ_GDAL_CACHE`).  A read decodes each block once into its own buffer, so the cache
#: only has to hold the blocks of the read calls in flight (a 3000 px strip of 10 bands: 18 MB);
#: GDAL's default (5 % of the machine's memory, 1.2 GB here, far more on a big node) was unmanaged
#: memory of every worker that Dask could neither see nor spill, and the blocks of the files a
#: thread keeps open stay in it (docs/performance.md, "The same reads again")
READ_GDAL_CACHE = 256 * 2**20
READ_CACHE_SHARE = 0.04
MIN_READ_GDAL_CACHE = 64 * 2**20


def read_cache_bytes() -> int:
    """GDAL's block cache for this process's reads (see :data:`READ_GDAL_CACHE`)."""
    share = int(worker_memory_limit() * READ_CACHE_SHARE)
    return max(MIN_READ_GDAL_CACHE, min(READ_GDAL_CACHE, share))


_CACHE_LIMITED = threading.Lock()
_cache_limited = False


def _limit_gdal_cache() -> None:
    """Once per process: GDAL's block cache to :func:`read_cache_bytes` (unless set by the
    ``GDAL_CACHEMAX`` environment variable)."""
    global _cache_limited
    with _CACHE_LIMITED:
        if not _cache_limited:
            if "GDAL_CACHEMAX" not in os.environ:
                limit_gdal_cache(read_cache_bytes())
            _cache_limited = True


class Lent:
    """A dataset lent by the process's pool (:func:`dataset`): ``with`` it, the read uses ``src``
    and gives it back at the end, or closes it where the read raised (the next read opens the
    file afresh).  Use it in one thread; do not close it.  ``nbytes``: what the pool counts it to
    hold; ``whole``: what it holds once GDAL's ordinary path read it (more where it was opened
    for the multi-threaded read, :data:`LEAN_HELD`)."""

    __slots__ = ("generation", "key", "nbytes", "src", "whole")

    def __init__(self, key, src, nbytes: int, whole: int, generation: int) -> None:
        self.key, self.src, self.nbytes, self.whole = key, src, nbytes, whole
        self.generation = generation

    @property
    def lean(self) -> bool:
        """Opened for GDAL's multi-threaded read, and counted so (:data:`LEAN_HELD`)."""
        return self.nbytes < self.whole

    def count_reads(self, windows) -> None:
        r"""The read of ``windows`` (rasterio ``Window``\ s of every band) is done: a lean dataset
        that GDAL read one of them through its ordinary path (:func:`ordinary_read`) keeps a
        decoded block from now on, and is counted whole."""
        if self.lean and any(ordinary_read(self.src, w) for w in windows):
            _POOL.recount(self.nbytes, self.whole)
            self.nbytes = self.whole

    def __enter__(self):
        return self.src

    def __exit__(self, kind, exc, tb) -> None:
        if kind is None:
            _POOL.give_back(self.key, self.src, self.nbytes, self.whole, self.generation)
        else:
            _POOL.discard(self.src, self.nbytes)


def dataset(
    url: str, version, check: Callable[..., None], verified: bool = False, lean: bool = False
) -> Lent:
    r"""The open dataset of ``url`` (at ``version``), lent to this thread until the end of the
    ``with`` block of the returned :class:`Lent`: an idle one of the process's pool, else opened
    (counted in :data:`OPEN_COUNTER`) and ``check``\ ed once per process (by whichever thread
    opens it first; any other open, of a file closed for room or read by two threads at once,
    leaves out the georeferencing: :data:`REOPEN_OPTIONS`).  ``check(src, georeferenced=...)``
    checks the header of ``src``; ``verified``: the run's driver checked the header of this file
    at ``version`` already (:func:`~treesits_dask.pipeline.checks.check_tiles`), so where the
    local file is still at that version (:func:`unchanged`), its first open leaves out the
    georeferencing too and ``check`` gets ``georeferenced=False`` (bands and size only; building
    the CRS from the file's GeoTIFF keys was about two thirds of a first open, see
    :data:`REOPEN_OPTIONS`).  Raises what opening or ``check`` raises (the file is then not kept).
    The first call of a process limits GDAL's block cache (:data:`READ_GDAL_CACHE`).
    ``version``: as the reader's (size, mtime or ETag); where its first item is an int, it is the
    file's size, which :func:`held_by` counts a striped file by.  ``lean``: the file is
    opened for GDAL's multi-threaded read where the pool has had to close datasets for its memory
    in this generation (:data:`LEAN_HELD`; the caller's say: the reader's BOA files, local or
    tiled on S3, whose reads call :meth:`Lent.count_reads`), unless this process runs CPU
    forwards (:func:`forwards_here`) or was forked from one that had opened a file so (GDAL's
    threads are not remade in a forked child)."""
    if not _cache_limited:
        _limit_gdal_cache()
    key = (url, version)
    generation = _GENERATION.count  # a forget_datasets from here on: closed when given back
    kept = _POOL.take(key)
    if kept is not None:
        if not (_POOL.threads_barred and threaded(kept[0])):
            return Lent(key, *kept, generation)
        # beside CPU forwards, or kept by the parent of this forked child: opened again the
        # ordinary way
        _POOL.discard(*kept[:2])
    checked = key in _CHECKED  # a file closed for room and opened again is not checked again
    georeferenced = not checked and not (verified and unchanged(url, version))
    lean = lean and _POOL.lean and not _POOL.threads_barred
    if lean:
        _POOL.threaded = True
    src = open_raster(url, georeferenced=georeferenced, threads=decode_threads() if lean else None)
    if not checked:
        try:
            check(src, georeferenced=georeferenced)
        except BaseException:
            src.close()
            raise
        _CHECKED.add(key)
    sized = isinstance(version, tuple) and version and isinstance(version[0], int)
    whole = held_by(src, version[0] if sized else None)
    nbytes = min(LEAN_HELD, whole) if lean else whole
    _POOL.add(nbytes)
    return Lent(key, src, nbytes, whole, generation)


def unchanged(url: str, version) -> bool:
    """Whether the local file ``url`` is at ``version`` (its size and mtime as discovery lists
    them, :class:`~treesits_dask.io.discovery.Scene`) now; False for a remote file (it would cost
    a request) or a version of another form."""
    if not isinstance(version, tuple) or len(version) != 2 or storage.is_remote(url):
        return False
    try:
        st = os.stat(storage.strip_protocol(url))
    except OSError:
        return False
    return (st.st_size, str(st.st_mtime)) == version


def set_memory_budget(nbytes: int) -> None:
    """The datasets this process keeps may hold ``nbytes`` from now on, instead of
    :data:`KEPT_SHARE` of its memory limit: a benchmark's process that is no worker runs short as
    a worker's pool does at hundreds of scenes (``python -m treesits_dask.bench.s3_read
    --kept-mib``)."""
    global _BUDGET
    memory_budget()  # the limit, found once
    with _POOL.lock:
        _BUDGET = int(nbytes)


def pool_state() -> dict:
    """``ran_short``: the pool has closed datasets for its memory in this generation (it opens
    files for GDAL's multi-threaded read from then on, :data:`LEAN_HELD`); ``threads_started``:
    this process opened a file so."""
    with _POOL.lock:
        return {"ran_short": _POOL.lean, "threads_started": _POOL.threaded}


def kept_datasets() -> tuple[int, int]:
    """(datasets, bytes they hold) open in this process's pool, lent or idle."""
    with _POOL.lock:
        return _POOL.open, _POOL.bytes


def forget_datasets() -> None:
    """The process's pool closes the datasets it keeps before the next read lends one, and those
    lent now as they are given back (files may have been replaced since they were opened)."""
    _GENERATION.add()
