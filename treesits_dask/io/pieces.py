"""Pieces of a band kept on the reading worker's local disk, for read plans whose bands of all
scenes do not fit the worker's memory (:attr:`~treesits_dask.io.bands.ReadPlan.spills`).

Left to Dask, such pieces were spilled by the worker's event loop, one key at a time, and read
back there before a window's task could start, while the task already held a thread: in the
600-scene regime (600 px COG, 256 px blocks, 100 px windows, a 3 GiB worker of 2 threads) 3 GB
were written and read back so, and the threads stood idle for a third of the read.  Here the
read task decides from the worker's memory (:func:`in_memory`) whether its pieces stay in memory
or go to disk; if to disk, it writes each piece to a file of the worker's local directory itself
(in its own thread, into the page cache, which the kernel writes back in the background), and
hands Dask a :class:`DiskPiece`: a name that Dask counts as a few bytes.  The task that puts a
window together reads its pieces from their files in its own thread, straight into the window
where the piece is a whole run of its scenes.  A piece's file is removed when Dask lets go of it
(the key is released), and with the worker's local directory when it stops.

A :class:`DiskPiece` sent to another worker (or to the client) pickles as the array it holds, so
the pieces of a window read by several workers still come together.  A run does not let that
happen where it can help it: Dask, which counts a piece as a few bytes, fetches as many of them
in one message as fit its 50 MB message limit, gigabytes of arrays at once, so a tile whose plan
spills is read and put together on one reading worker
(:func:`~treesits_dask.pipeline.reading.spill_worker`; elsewhere only if that worker leaves).
A piece that Dask spills, which it does only where other data fills the worker's memory (a
piece weighs nothing), is written again, as an array, to Dask's spill directory.
"""

from __future__ import annotations

import atexit
import errno
import os
import queue
import shutil
import tempfile
import threading
import uuid
import weakref

import numpy as np

from ..errors import ClusterError
from .buffers import RECYCLER
from .datasets import Counter

__all__ = [
    "IN_MEMORY_SHARE",
    "PROCESS_SHARE",
    "WRITTEN",
    "DiskPiece",
    "PieceWriter",
    "in_memory",
    "piece_directory",
    "wait_removed",
]

#: bytes of pieces written to local disk by this process (the benchmark reports them)
WRITTEN = Counter()

#: shares of a Dask worker's memory limit that the data it holds (Dask's managed memory) and the
#: whole process may fill with pieces kept in memory; a batch that would take either further goes
#: to local disk (:func:`in_memory`; Dask spills from 60 % managed or 70 % of the process)
IN_MEMORY_SHARE = 0.5
PROCESS_SHARE = 0.6

_DIR: dict[int, str] = {}
_DIR_LOCK = threading.Lock()


def piece_directory() -> str:
    """This process's directory for pieces: under the Dask worker's local directory (where Dask
    spills, on Kubernetes the scratch volume), else the temporary directory; made on first use."""
    pid = os.getpid()
    with _DIR_LOCK:
        if pid not in _DIR:
            try:
                from distributed import get_worker

                base = get_worker().local_directory
            except (ImportError, ValueError):  # not in a Dask worker
                base = tempfile.gettempdir()
            path = os.path.join(base, f"treesits-pieces-{pid}")
            os.makedirs(path, exist_ok=True)
            atexit.register(shutil.rmtree, path, ignore_errors=True)
            _DIR[pid] = path
        return _DIR[pid]


def in_memory(nbytes: int) -> bool:
    """Whether a read task's pieces of ``nbytes`` stay in memory: outside a Dask worker (or one
    without a memory limit) always; in one, while the data the worker holds in memory plus
    ``nbytes`` stay within :data:`IN_MEMORY_SHARE` of its memory limit and the process's memory
    plus ``nbytes`` within :data:`PROCESS_SHARE` (below where Dask starts to spill).  Where the
    bands of all scenes exceed the reading worker's memory only on paper (the plan's guard counts
    :data:`~treesits_dask.io.bands.BANDS_HELD` of them), the pieces stay in memory and cost no
    disk round trip (3 % of a read of the 600-scene regime's striped files here, which Dask did
    not spill)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return True
    limit = worker.memory_manager.memory_limit
    if not limit:
        return True
    held = getattr(getattr(worker.data, "fast", None), "total_weight", None)
    if held is None:  # a plain dict: no spilling at all
        return True
    if held + nbytes > IN_MEMORY_SHARE * limit:
        return False
    return worker.monitor.get_process_memory() + nbytes <= PROCESS_SHARE * limit


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


_GONE: queue.SimpleQueue = queue.SimpleQueue()
_REMOVER: list[threading.Thread] = []
_PENDING = threading.Condition()
_pending = [0]  # files handed to the remover and not removed yet


def _remover() -> None:
    while True:
        _remove(_GONE.get())
        with _PENDING:
            _pending[0] -= 1
            if not _pending[0]:
                _PENDING.notify_all()


def _remove_later(path: str) -> None:
    """Remove ``path`` in a background thread: Dask releases a piece in its event loop, and
    unlinking a file whose pages are cached took 0.8 ms here (per piece of a 600-scene band)."""
    with _DIR_LOCK:
        if not _REMOVER or not _REMOVER[0].is_alive():
            _REMOVER[:] = [threading.Thread(target=_remover, name="piece-remover", daemon=True)]
            _REMOVER[0].start()
    with _PENDING:
        _pending[0] += 1
    _GONE.put(path)


def wait_removed(timeout: float) -> bool:
    """Wait (at most ``timeout`` seconds) until the files of the pieces released so far are
    removed; whether they are.  A closing worker calls it (``pipeline.plugins.PieceFiles``)
    before Dask removes its local directory: removing the same files at once, Dask logged an
    error per file ("Failed to remove ...") at the end of a run that had written pieces."""
    with _PENDING:
        return _PENDING.wait_for(lambda: not _pending[0], timeout)


class DiskPiece:
    """A ``shape`` int16 array in the file ``path`` (C order), removed with the last reference."""

    __slots__ = ("path", "shape", "__weakref__")

    def __init__(self, path: str, shape: tuple[int, ...]) -> None:
        self.path, self.shape = path, tuple(shape)
        weakref.finalize(self, _remove_later, path)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * 2

    def read_into(self, out: np.ndarray) -> None:
        """Read the piece into ``out`` (its shape; any strides: a whole run of a window's scenes
        is read straight into it, else through a buffer)."""
        if out.shape != self.shape:
            raise ValueError(f"piece of shape {self.shape} read into {out.shape}")
        direct = out.flags.c_contiguous
        buf = out if direct else RECYCLER.empty(self.shape, np.int16)
        view = memoryview(buf.reshape(-1)).cast("B")
        with open(self.path, "rb", buffering=0) as f:
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{self.path}: piece file ends at byte {done} of {len(view)}")
                done += n
        if not direct:
            out[...] = buf

    def load(self) -> np.ndarray:
        """The piece as an array (new memory)."""
        out = np.empty(self.shape, np.int16)
        self.read_into(out)
        return out

    def __reduce__(self):
        # to another process (a worker that puts the window together, the client) as its array:
        # the file is local to this worker
        return np.asarray, (self.load(),)

    def __repr__(self) -> str:
        return f"DiskPiece({self.path!r}, {self.shape})"


class PieceWriter:
    """A new piece of ``shape`` ``(scenes, bands, rows, cols)`` int16, written scene by scene (in
    any order) to a file of :func:`piece_directory`; :meth:`close` hands it out as a
    :class:`DiskPiece`, :meth:`abort` removes it.  :class:`ClusterError` naming the directory
    where the disk is full."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(shape)
        self.directory = piece_directory()
        self.path = os.path.join(self.directory, uuid.uuid4().hex)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._buf = np.empty(self.shape[1:], np.int16)
        self._scene_bytes = self._buf.nbytes
        self._written: set[int] = set()

    def put(self, t: int, scene: np.ndarray) -> None:
        """Scene ``t`` (``shape[1:]``, any strides) of the piece."""
        np.copyto(self._buf, scene)
        view = memoryview(self._buf.reshape(-1)).cast("B")
        offset, done = t * self._scene_bytes, 0
        try:
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
        except OSError as exc:
            self.abort()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ClusterError(
                    f"no room left in {self.directory} for the pieces of a band of all scenes "
                    "that this reading worker holds on disk: give the reading workers more local "
                    "disk (kubernetes.scratch_size, or a local directory on a larger disk), more "
                    "memory, or fewer scenes per run"
                ) from exc
            raise
        self._written.add(t)

    def close(self) -> DiskPiece:
        """The piece, every scene of it written."""
        missing = self.shape[0] - len(self._written)
        os.close(self._fd)
        self._fd = None
        if missing:
            _remove(self.path)
            raise RuntimeError(f"{self.path}: {missing} scenes of the piece were not written")
        piece = DiskPiece(self.path, self.shape)
        WRITTEN.add(piece.nbytes)
        return piece

    def abort(self) -> None:
        """Close and remove the file (a failed read)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _remove(self.path)


try:  # Dask counts a piece as the little memory it holds: it is on disk, not to be spilled
    from dask.sizeof import sizeof

    @sizeof.register(DiskPiece)
    def _sizeof_piece(p: DiskPiece) -> int:
        return 64 + len(p.path)

except ImportError:  # pragma: no cover - dask is a dependency
    pass
