"""The plugins every worker of a run gets (:func:`worker_plugins`): the run's non-secret
environment (:class:`EnvPlugin`), one-line logs of tasks that failed on an input problem
(:class:`TaskErrorLog`), and the files of read pieces removed before the worker closes
(:class:`PieceFiles`); and the scheduler's (:class:`PinnedReads`): Dask's work stealing leaves
the reads pinned to a worker where they are, and the read of a worker that left goes on on one
other."""

from __future__ import annotations

import logging

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from ..io import storage

__all__ = [
    "EnvPlugin",
    "PieceFiles",
    "PinnedReads",
    "TaskErrorLog",
    "register_pinned_reads",
    "worker_plugins",
]

log = logging.getLogger(__name__)


class EnvPlugin(WorkerPlugin):
    """Sets non-secret environment variables on every worker, also ones that join later."""

    name = "treesits-env"

    def __init__(self, env: dict[str, str]):
        forbidden = [
            k
            for k in env
            if "SECRET" in k or "TOKEN" in k or "PASSWORD" in k or k.endswith("_KEY_ID")
        ]
        if forbidden:
            raise ValueError(f"refusing to ship credentials to workers: {forbidden}")
        self.env = dict(env)

    def setup(self, worker=None):
        storage.apply_environment(self.env)


def _package_errors() -> set[str]:
    """Names of the exception classes that are input problems (every :class:`TreesitsError`)."""
    from ..errors import TreesitsError

    names, todo = set(), [TreesitsError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


class _OneLineInputErrors(logging.Filter):
    """distributed logs a failed task as "Compute Failed" with the task, the exception and its
    traceback.  For input problems (a :class:`TreesitsError`, whose message names the file and
    the fix, and which the driver reports per tile) one line is enough; other errors keep their
    traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Compute Failed") and len(record.args or ()) == 5:
            key, _, _, exception_text, _ = record.args
            if str(exception_text).split("(", 1)[0] in _package_errors():
                record.msg, record.args = "task %s failed: %s", (key, exception_text)
        return True


class TaskErrorLog(WorkerPlugin):
    """Workers log a task that failed on an input problem as one line, not as a traceback."""

    name = "treesits-task-errors"

    def setup(self, worker=None):
        logger = logging.getLogger("distributed.worker")
        if not any(isinstance(f, _OneLineInputErrors) for f in logger.filters):
            logger.addFilter(_OneLineInputErrors())


class PieceFiles(WorkerPlugin):
    """A closing worker first waits until the files of the read pieces it released are removed
    (:func:`~treesits_dask.io.pieces.wait_removed`, at most :attr:`timeout` seconds), so that
    Dask, removing the worker's local directory next, finds none of them gone under it."""

    name = "treesits-piece-files"
    timeout = 60.0

    def teardown(self, worker=None):
        from ..io.pieces import wait_removed

        wait_removed(self.timeout)


class PinnedReads(SchedulerPlugin):
    """Dask's work stealing does not move the tasks of a read pinned to its worker (a tile whose
    read plan spills: :func:`~treesits_dask.pipeline.reading.spill_worker`).

    Their restriction is loose, so that the tile is read elsewhere if its worker leaves, and Dask
    steals tasks with loose restrictions as if they had none: an idle reading worker took queued
    reads and window tasks of another worker's tile, whose pieces on that worker's disk (which
    Dask counts as a few bytes) then came over gigabytes at a time.  Two workers of 1 thread and
    3 GiB, one of two 600 px x 600-scene COG tiles in flight: 102-265 s for both (one tile up to
    169 s), and with this plugin 51-59 s, 20-30 s a tile (``benchmarks/idle_readers.py``).  Each
    such task is taken out of the stealing extension's lists as it is assigned (after the
    extension put it there); its restriction stays loose, and where its worker leaves the cluster
    the tile's read goes on on one other worker (:meth:`_move_tile`)."""

    name = "treesits-pinned-reads"

    def __init__(self):
        self.scheduler = None

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if finish != "processing" or self.scheduler is None:
            return
        ts = self.scheduler.tasks.get(key)
        if ts is None or not _pinned_read(ts):
            return
        if not any(w in self.scheduler.workers for w in ts.worker_restrictions):
            self._move_tile(ts)
        stealing = self.scheduler.extensions.get("stealing")
        if stealing is not None:
            stealing.remove_key_from_stealable(ts)
            # nor put back when the first task of its kind finishes (its duration then known)
            stealing.unknown_durations.get(ts.prefix.name, set()).discard(ts)

    def _move_tile(self, ts) -> None:
        """The worker that a tile's read was pinned to left the cluster, and Dask has just given
        one of its tasks (``ts``) to another worker: the tile's other tasks go there too.  Else
        Dask spread them over the workers, and the windows fetched their pieces from each: with
        one of three workers of 1.5 GiB killed 10 s into the read of two 600-scene COG tiles, the
        read took 39-151 s, Dask spilled 8-24 GiB, other workers were restarted, and one read
        failed (KilledWorker); with the move 35-43 s, 4-8 GiB, no other restart
        (``benchmarks/lost_worker.py``)."""
        from ..io.cube import read_tile

        gone, home = set(ts.worker_restrictions), ts.processing_on
        if not _fits(home, ts):  # Dask's fallback for a lost worker ignores the resources too
            fitting = [ws for ws in self.scheduler.running if _fits(ws, ts)]
            home = min(fitting, key=lambda ws: (len(ws.processing), ws.address), default=home)
        home, tile = home.address, read_tile(ts.key)
        for other in self.scheduler.tasks.values():  # the tile's other reads pinned with it
            if other.worker_restrictions == gone and other.loose_restrictions:
                if read_tile(other.key) == tile:
                    other.worker_restrictions = {home}
        log.info("tile %s: its reading worker %s left, its read goes on on %s", tile, gone, home)


def _fits(ws, ts) -> bool:
    """Whether worker ``ws`` has the resources that task ``ts`` asks for."""
    return all(ws.resources.get(r, 0) >= q for r, q in (ts.resource_restrictions or {}).items())


def _pinned_read(ts) -> bool:
    """Whether a task is one of a read pinned to a worker (a loose restriction)."""
    if not (ts.loose_restrictions and ts.worker_restrictions):
        return False
    from ..io.cube import read_tile  # imported by the scheduler only where a task is pinned

    return read_tile(ts.key) is not None


def worker_plugins(env: dict[str, str]) -> list[WorkerPlugin]:
    """The plugins every worker of a run gets: its environment (:class:`EnvPlugin`), one-line
    input errors (:class:`TaskErrorLog`), piece files removed before it closes
    (:class:`PieceFiles`)."""
    return [EnvPlugin(env), TaskErrorLog(), PieceFiles()]


def register_pinned_reads(client) -> bool:
    """Registers :class:`PinnedReads` on the scheduler of ``client``; False (with a warning) where
    that scheduler cannot load it (a standing scheduler without this package installed)."""
    try:
        client.register_plugin(PinnedReads())
    except Exception as exc:  # noqa: BLE001 - the run goes on, with Dask's work stealing as is
        log.warning(
            "the scheduler cannot load treesits_dask (%s: %s): Dask's work stealing may move the "
            "reads of a tile whose bands spill away from the worker that holds its pieces (install "
            "treesits_dask where the scheduler runs)", type(exc).__name__, exc,
        )  # fmt: skip
        return False
    return True
