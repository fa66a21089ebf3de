"""Large arrays that the reads hand out, reused across the tasks of a process instead of freed.

Every read task fills memory that it gets from the system: the band of decoded scenes it returns
(123 MB for 8 scenes of a 256-row band of a 3000 px, 10-band tile) and each window put together
from such bands.  Above glibc's mmap threshold (:data:`~treesits_dask.io.storage.MALLOC_DEFAULTS`)
each such array is a fresh mapping, paid for in page faults when it is first written.  Measured
on this development machine (a VM, 2 cores): GDAL decoding the 8 scenes of a 3000 px ZSTD COG
band by band into fresh arrays took 1.0-2.9 s of system time for 1.44 GB, as long as the decoding
itself (1.3-1.9 s of user time), and 0.06-0.10 s into one reused buffer (as the decode floor of
the benchmark does).

:class:`Recycler` keeps the arrays it handed out and gives one out again once nothing refers to it
any more.  The arrays it returns are views of an owner array that it holds; numpy views (pieces of a
band, the bands of a batch), memoryviews and the frames of a pickled array keep their owner alive,
so the owner's reference count tells whether any task result, piece or message still uses it.

Idle owners are memory that Dask counts as unmanaged, so they are bounded: one is freed after
:data:`IDLE_SECONDS` idle in a Dask worker (:data:`LOCAL_IDLE_SECONDS` in any other process: a
driver or a notebook that reads with Dask's threads keeps no read buffers once its compute is
over), and at once (the longest idle first) where the idle owners exceed
:data:`IDLE_SHARE` of the process's memory limit (a Dask worker's, else the machine's memory: the
share the read tasks may fill anyway, ``read_memory``) or where the memory in use would then pass
Dask's ``distributed.worker.memory.target`` share of the limit (where Dask starts to spill).  A
daemon thread does this while any owner is held.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time

import numpy as np

__all__ = [
    "IDLE_SECONDS",
    "IDLE_SHARE",
    "LOCAL_IDLE_SECONDS",
    "MIN_BYTES",
    "RECYCLER",
    "SWEEP_SECONDS",
    "Recycler",
    "handed_out",
    "process_rss",
    "target_share",
    "trim_heap",
    "worker_memory_limit",
]

#: smaller arrays come from malloc's heap (below ``MALLOC_MMAP_THRESHOLD_``), which reuses freed
#: memory already
MIN_BYTES = 4 * 2**20

#: an idle owner is freed after this many seconds: a worker keeps the memory of its reads for the
#: next ones instead of faulting it in again.  The reads of a tile come in bursts, when the worker
#: has predicted the windows it holds: measured end to end at 3000 px x 60 scenes (sits-lstm, 2
#: threads), 70-80 s apart, so that with 30 s most owners had been freed by the next burst and 7
#: of 12 window-row reads faulted 879 MiB in afresh (2.3-2.9 s of system time each against 0.2 s
#: in recycled memory)
IDLE_SECONDS = 300.0

#: the same outside a Dask worker: tasks that follow each other in one compute (the threaded
#: scheduler of a notebook, ``bench``'s driver) still reuse each other's buffers, but nothing is
#: held once it is over.  With :data:`IDLE_SECONDS` there, ``bench``'s driver kept the 1.2 GB of
#: windows it had read for the forward-only figure through the end-to-end run that followed
#: (peak RSS, driver + worker, at 1000 px x 60 scenes: 4.9 GiB, 3.8 GiB with this); a notebook's
#: kernel would hold its reads' memory for five minutes unseen
LOCAL_IDLE_SECONDS = 2.0

#: how often, at most, the janitor thread frees idle owners beyond the room for them (memory in
#: use near Dask's target) or past their idle time
SWEEP_SECONDS = 5.0

#: the idle owners a process keeps, at most, as a share of its memory limit (``read_memory``'s
#: default: what the read tasks of a worker may fill)
IDLE_SHARE = 0.25

#: an owner serves requests of at least ``1 / FIT`` of its size (bands of a tile differ only at
#: its edge, scene batches by one scene)
FIT = 1.25


class _Slot:
    __slots__ = ("raw", "idle_since")

    def __init__(self, raw: np.ndarray) -> None:
        self.raw = raw
        self.idle_since: float | None = None


def _idle(slot: _Slot) -> bool:
    """Nothing but the slot refers to its owner (the slot's reference and the argument's)."""
    return sys.getrefcount(slot.raw) <= 2


def target_share(threshold: str = "target", default: float = 0.6) -> float:
    """Dask's ``distributed.worker.memory.<threshold>`` (``default`` where it is off or not a
    share): ``target`` (0.6), where Dask spills what it manages, or ``spill`` (0.7), where it spills
    by the process's memory."""
    import dask

    value = dask.config.get(f"distributed.worker.memory.{threshold}", default)
    return float(value) if isinstance(value, int | float) and 0 < value <= 1 else default


def _dask_worker_limit() -> int | None:
    """The memory limit of the Dask worker running this task (0: none set), None outside a
    worker (in ``client.run`` too: ``get_worker`` finds none there)."""
    try:
        from distributed import get_worker

        return int(get_worker().memory_manager.memory_limit or 0)
    except (ImportError, ValueError, AttributeError):
        return None


_PROCESS = None


def process_rss() -> int:
    """The resident memory of this process (what Dask's memory thresholds compare); one
    ``psutil.Process``, made again in a forked child (it would read its parent's)."""
    global _PROCESS
    if _PROCESS is None or _PROCESS.pid != os.getpid():
        import psutil

        _PROCESS = psutil.Process()
    return _PROCESS.memory_info().rss


_LIBC = None


def trim_heap() -> bool:
    """Give the free memory of glibc's heaps back to the system (``malloc_trim(0)``), where it
    would otherwise stay in the process: what is freed in the middle of a heap is not returned
    below ``MALLOC_TRIM_THRESHOLD_`` (:data:`~treesits_dask.io.storage.MALLOC_DEFAULTS`), and
    Dask's memory thresholds compare the process's resident memory.  Measured: 120 open 3000 px
    COGs closed left the process at 481 MiB, as with them open; this brought it to 128 MiB in
    28 ms.  False where the C library has no ``malloc_trim`` (not glibc)."""
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            _LIBC = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError, TypeError):  # not glibc (TypeError: Windows)
            _LIBC = False
    if _LIBC is False:
        return False
    _LIBC(0)
    return True


def worker_memory_limit() -> int:
    """The Dask worker's memory limit, else the machine's memory (call it from a task: in
    ``client.run`` ``get_worker`` finds no worker)."""
    limit = _dask_worker_limit()
    if limit:
        return limit
    import psutil

    return int(psutil.virtual_memory().total)


class Recycler:
    """Hands out arrays of at least :data:`MIN_BYTES` as views of owners it reuses (see the
    module).  ``idle_bytes``: the most idle owners kept (None: :data:`IDLE_SHARE` of the memory
    limit), less where the memory in use nears Dask's target; ``idle_seconds``: how long one is
    kept (None: :data:`IDLE_SECONDS` in a Dask worker, else :data:`LOCAL_IDLE_SECONDS`, found by
    the first :meth:`empty`).  ``fresh_bytes`` / ``reused_bytes``: what it handed out in new and
    in reused memory."""

    def __init__(self, idle_bytes: int | None = None, idle_seconds: float | None = None) -> None:
        self._lock = threading.Lock()
        self._slots: list[_Slot] = []
        self._idle_bytes = idle_bytes
        self._memory: int | None = None  # the memory limit, found by the first empty()
        self.idle_seconds = idle_seconds
        self.fresh_bytes = 0
        self.reused_bytes = 0
        self._janitor: threading.Thread | None = None

    # ------------------------------------------------------------------------------ public
    def empty(self, shape: tuple[int, ...], dtype=np.int16) -> np.ndarray:
        """An uninitialised C-contiguous array (a reused one where an idle owner fits)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < MIN_BYTES:
            return np.empty(shape, dtype)
        self._limit()  # found here, in a task (the janitor thread knows no Dask worker)
        with self._lock:
            now = time.monotonic()
            idle = self._mark(now)
            fits = [s for s in idle if nbytes <= s.raw.size <= nbytes * FIT]
            if fits:
                slot = min(fits, key=lambda s: s.raw.size)
                slot.idle_since = None
                self.reused_bytes += nbytes
            else:
                slot = _Slot(np.empty(nbytes, np.uint8))
                self._slots.append(slot)
                self.fresh_bytes += nbytes
            raw = slot.raw
            self._sweep(now, [s for s in idle if s is not slot])  # the others, one being taken
            self._watch()
        return raw[:nbytes].view(dtype).reshape(shape)

    def empty_parts(
        self, shapes: list[tuple[int, ...]], dtype=np.int16, room: int = 0
    ) -> list[np.ndarray]:
        """Uninitialised C-contiguous arrays of ``shapes``, side by side in one owner of at least
        ``room`` elements: the reads of a set of windows ask for the room of all of them, whichever
        have a mask pixel, so that every such read fits the owner of any other (its parts of a
        masked tile differ from read to read, and an owner serves only requests of about its
        size, :data:`FIT`)."""
        sizes = [math.prod(s) for s in shapes]
        flat = self.empty((max(sum(sizes), room),), dtype)
        out, at = [], 0
        for shape, size in zip(shapes, sizes, strict=True):
            out.append(flat[at : at + size].reshape(shape))
            at += size
        return out

    def full(self, shape: tuple[int, ...], value, dtype=np.int16) -> np.ndarray:
        out = self.empty(shape, dtype)
        out.fill(value)
        return out

    def copy(self, a: np.ndarray) -> np.ndarray:
        """A C-contiguous copy of ``a`` (owning no view of ``a``)."""
        out = self.empty(a.shape, a.dtype)
        np.copyto(out, a)
        return out

    def held(self) -> tuple[int, int]:
        """(bytes of all owners held, bytes of the idle ones)."""
        with self._lock:
            self._sweep(time.monotonic())
            return (
                sum(s.raw.size for s in self._slots),
                sum(s.raw.size for s in self._slots if s.idle_since is not None),
            )

    # ------------------------------------------------------------------------------ internals
    def _limit(self) -> int:
        """The memory limit (:func:`worker_memory_limit`), found once, with the idle time where
        none was given (before any owner is kept: the janitor reads it)."""
        if self._memory is None:
            limit = _dask_worker_limit()
            if self.idle_seconds is None:
                self.idle_seconds = IDLE_SECONDS if limit is not None else LOCAL_IDLE_SECONDS
            self._memory = limit or worker_memory_limit()
        return self._memory

    def _room(self, idle: int) -> int:
        """The idle bytes that may be kept: at most ``idle_bytes`` (default :data:`IDLE_SHARE` of
        the memory limit), and only while the memory in use (the process's RSS less ``idle``)
        stays below Dask's target share of the limit."""
        limit = self._limit()
        cap = self._idle_bytes if self._idle_bytes is not None else limit * IDLE_SHARE
        used = process_rss() - idle
        return int(max(0, min(cap, limit * target_share() - used)))

    def _mark(self, now: float) -> list[_Slot]:
        """The idle owners, marked with when they were first found idle.  Under the lock."""
        idle = []
        for s in self._slots:
            if _idle(s):
                if s.idle_since is None:
                    s.idle_since = now
                idle.append(s)
            else:
                s.idle_since = None
        return idle

    def _sweep(self, now: float, idle: list[_Slot] | None = None) -> None:
        """Free the owners idle for too long and those beyond the room for idle ones (the
        longest idle first): of ``idle`` (None: those :meth:`_mark` finds).  Under the lock."""
        idle = self._mark(now) if idle is None else idle
        if not idle:
            return
        idle.sort(key=lambda s: s.idle_since)
        kept = sum(s.raw.size for s in idle)
        budget, drop = self._room(kept), set()
        for s in idle:
            if now - s.idle_since >= self.idle_seconds or kept > budget:
                drop.add(id(s))
                kept -= s.raw.size
        if drop:
            self._slots = [s for s in self._slots if id(s) not in drop]

    def _watch(self) -> None:
        """Start the daemon thread that trims while owners are held.  Under the lock."""
        if self._janitor is None and self._slots:
            self._janitor = threading.Thread(
                target=self._janitor_loop, name="treesits-buffers", daemon=True
            )
            self._janitor.start()

    def _janitor_loop(self) -> None:
        while True:
            time.sleep(max(0.05, min(SWEEP_SECONDS, self.idle_seconds / 2)))
            with self._lock:
                self._sweep(time.monotonic())
                if not self._slots:
                    self._janitor = None
                    return


#: the reads' recycler of this process (bands, windows, the pieces of a plan that spills)
RECYCLER = Recycler()


def handed_out() -> tuple[int, int]:
    """(new, recycled) bytes this process's reads got their buffers in so far (:data:`RECYCLER`)."""
    return RECYCLER.fresh_bytes, RECYCLER.reused_bytes
