"""The plugins every worker of a run gets (:func:`worker_plugins`): the run's non-secret
environment (:class:`EnvPlugin`), one-line logs of tasks that failed on an input problem
(:class:`TaskErrorLog`), and the files of read pieces removed before the worker closes
(:class:`PieceFiles`); and the scheduler's (:class:`PinnedReads`): the reads pinned to a worker
stay there, paused or not, out of reach of Dask's work stealing, and the read of a worker that
left goes on on one other."""

from __future__ import annotations

import logging
import time

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from ..io import storage

__all__ = [
    "EnvPlugin",
    "PieceFiles",
    "PinnedReads",
    "TaskErrorLog",
    "add_worker_plugin",
    "on_workers",
    "register_pinned_reads",
    "unreachable",
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


#: what distributed logs, with a traceback, where a worker's heartbeat finds the scheduler gone
#: (it retries at the next one): as a cluster closes, the scheduler may go before its workers
HEARTBEAT_LOST = "Failed to communicate with scheduler during heartbeat."


class _OneLineInputErrors(logging.Filter):
    """distributed logs a failed task as "Compute Failed" with the task, the exception and its
    traceback.  For input problems (a :class:`TreesitsError`, whose message names the file and
    the fix, and which the driver reports per tile) one line is enough; other errors keep their
    traceback.  A heartbeat that found the scheduler gone (:data:`HEARTBEAT_LOST`) is one line
    with its error too: a run whose cluster closed printed that traceback after its own message
    (once in about ten runs of ``tests/test_validation.py::test_worker_input_errors_are_one_line``
    on 2 busy cores)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Compute Failed") and len(record.args or ()) == 5:
            key, _, _, exception_text, _ = record.args
            if str(exception_text).split("(", 1)[0] in _package_errors():
                record.msg, record.args = "task %s failed: %s", (key, exception_text)
        elif record.msg == HEARTBEAT_LOST and record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            record.msg, record.args = "%s %s: %s", (HEARTBEAT_LOST, type(error).__name__, error)
            record.exc_info, record.exc_text = None, None
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


#: seconds a worker may stay paused while reads are pinned to it before they go on on another
#: worker: a worker whose memory Dask cannot free (not its data) stays paused, and its tiles would
#: wait for it for ever; checked every :data:`PAUSED_CHECK` seconds
PAUSED_GRACE = 120.0
PAUSED_CHECK = 1.0


class PinnedReads(SchedulerPlugin):
    """The reads pinned to a worker (a tile whose read plan spills:
    :func:`~treesits_dask.pipeline.reading.spill_worker`) stay on it while it is in the cluster,
    paused or not, and go on together on one other worker where it leaves.

    The graph pins them with a loose restriction, so that without this plugin (a standing
    scheduler that cannot load the package) a tile whose worker is lost is still read elsewhere.
    Dask bends a loose restriction in two more cases, and each sent gigabytes of pieces between
    workers (a window task fetches every piece of its window from the worker that holds them,
    which Dask counts as a few bytes each):

    - work stealing treats such a task as unrestricted: an idle reading worker took queued reads
      and window tasks of another worker's tile (two workers of 1 thread and 3 GiB, one of two
      600 px x 600-scene COG tiles in flight: 102-265 s for both, 51-59 s with the reads kept;
      ``benchmarks/idle_readers.py``);
    - while the pinned worker is paused (Dask pauses a worker at 80 % of its memory, which a
      reading worker of a spilling tile may reach), every task of its tile that becomes ready
      goes to a running worker.

    So the plugin makes each pinned read task's restriction strict as it enters the scheduler's
    ``waiting`` state (before Dask picks its worker): it waits for a paused worker, and stealing
    does not move it.  Where the worker leaves (:meth:`remove_worker`), the tile's tasks are
    pinned to one other worker (:meth:`_rehome`); where none is left, to the next that joins
    (:meth:`add_worker`); where it stays paused longer than :data:`PAUSED_GRACE`, to one other
    as well (:meth:`_check_paused`; the pieces it holds are then fetched from it).  Left to
    Dask's fallback for a lost worker, they spread over the workers: with one of three workers
    of 1.5 GiB killed 10 s into the read of two 600-scene COG tiles, the read took 39-151 s,
    Dask spilled 8-55 GiB, other workers were restarted, and two reads failed (KilledWorker); on
    one worker 33-43 s, 1-8 GiB, no other restart (``benchmarks/lost_worker.py``).  Where no
    worker was left at that moment, Dask's fallback found none, and a worker that joined later
    took none of the tasks pinned to the lost one: the read waited for ever."""

    name = "treesits-pinned-reads"

    def __init__(self):
        self.scheduler = None
        self.paused_since: dict[str, float] = {}

    async def start(self, scheduler) -> None:
        from tornado.ioloop import PeriodicCallback

        self.scheduler = scheduler
        check = PeriodicCallback(self._check_paused, PAUSED_CHECK * 1000)
        scheduler.periodic_callbacks[self.name] = check  # stopped with the scheduler
        check.start()

    def _check_paused(self) -> None:
        """The tiles pinned to a worker paused for :data:`PAUSED_GRACE` seconds or more, with
        tasks waiting for it, go on on another (:meth:`_rehome`; its scan of every task only
        while such tasks wait, not every second of a long pause)."""
        if self.scheduler is None:
            return
        now = time.monotonic()
        paused = [a for a, ws in self.scheduler.workers.items() if ws.status.name == "paused"]
        self.paused_since = {a: self.paused_since.get(a, now) for a in paused}
        stuck = {a for a, since in self.paused_since.items() if now - since >= PAUSED_GRACE}
        if stuck and any(ts.worker_restrictions & stuck for ts in self.scheduler.unrunnable):
            self._rehome(f"pinned-reads-paused-{now}", away=stuck)

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        if start != "released" or finish != "waiting" or self.scheduler is None:
            return
        ts = self.scheduler.tasks.get(key)
        if ts is None or not ts.loose_restrictions or not _pinned_read(ts):
            return
        ts.loose_restrictions = False
        workers = self.scheduler.workers
        if workers and not any(w in workers for w in ts.worker_restrictions):
            # pinned to a worker that left before the graph came: the whole tile moves at once
            self._rehome(None)

    def remove_worker(self, scheduler, worker: str, **kwargs) -> None:
        self._rehome(kwargs.get("stimulus_id") or f"pinned-reads-lost-{worker}")

    def add_worker(self, scheduler, worker: str) -> None:
        self._rehome(f"pinned-reads-joined-{worker}")

    def _rehome(self, stimulus_id: str | None, away: set[str] = frozenset()) -> None:
        """Pin each tile whose pinned reads name no worker of the cluster (it left) or only the
        workers ``away`` (paused too long) to one other worker that has the resources they ask
        for: where the tile's other tasks went on already, that one; else a running one before a
        paused one, then the one pinned the fewest tiles, the least busy, the first by address;
        none where the cluster has none (:meth:`add_worker` tries again).  Where
        ``stimulus_id`` is given, the tasks waiting for a worker (``no-worker``) are then sent to
        it."""
        if self.scheduler is None:
            return
        sched = self.scheduler
        workers = {a: ws for a, ws in sched.workers.items() if a not in away}
        lost: dict[str, list] = {}
        pinned: dict[str, set] = {}  # worker -> tiles pinned to it
        homes: dict[str, set] = {}  # tile -> workers of the cluster it is pinned to
        for ts in list(sched.tasks.values()):
            if not ts.worker_restrictions or (tile := _pinned_tile(ts)) is None:
                continue
            present = [w for w in ts.worker_restrictions if w in workers]
            for w in present:
                pinned.setdefault(w, set()).add(tile)
                homes.setdefault(tile, set()).add(w)
            if not present:
                lost.setdefault(tile, []).append(ts)

        def rank(ws) -> tuple:  # a running worker first, then the fewest tiles, the least busy
            return ws not in sched.running, len(pinned.get(ws.address, ())), len(ws.processing)

        ready: list = []
        for tile, tasks in lost.items():
            # where some of the tile's tasks went on elsewhere already (they came later), there
            fitting = [workers[w] for w in sorted(homes.get(tile, ()))]
            fitting = fitting or list(workers.values())
            fitting = [ws for ws in fitting if all(_fits(ws, ts) for ts in tasks)]
            if not fitting:
                continue
            home = min(fitting, key=lambda ws: (*rank(ws), ws.address)).address
            gone = sorted({w for ts in tasks for w in ts.worker_restrictions})
            for ts in tasks:
                ts.worker_restrictions = {home}
                if ts.state == "no-worker":
                    ready.append(ts)
            pinned.setdefault(home, set()).add(tile)
            why = f"has been paused for {PAUSED_GRACE:.0f} s" if away & set(gone) else "left"
            log.warning("tile %s: its reading worker %s %s, its read goes on on %s",
                        tile, ", ".join(gone), why, home)  # fmt: skip
        if ready and stimulus_id is not None:
            ready.sort(key=lambda ts: ts.priority, reverse=True)  # processed last in, first out
            sched.transitions({ts.key: "processing" for ts in ready}, stimulus_id)


def _fits(ws, ts) -> bool:
    """Whether worker ``ws`` has the resources that task ``ts`` asks for."""
    return all(ws.resources.get(r, 0) >= q for r, q in (ts.resource_restrictions or {}).items())


def _pinned_tile(ts) -> str | None:
    """The tile of a read task (None for any other task)."""
    from ..io.cube import read_tile  # imported by the scheduler only where a task is pinned

    return read_tile(ts.key)


def _pinned_read(ts) -> bool:
    """Whether a task is one of a read pinned to a worker."""
    return bool(ts.worker_restrictions) and _pinned_tile(ts) is not None


def worker_plugins(env: dict[str, str]) -> list[WorkerPlugin]:
    """The plugins every worker of a run gets: its environment (:class:`EnvPlugin`), one-line
    input errors (:class:`TaskErrorLog`), piece files removed before it closes
    (:class:`PieceFiles`)."""
    return [EnvPlugin(env), TaskErrorLog(), PieceFiles()]


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says that a worker could not be reached (its connection closed, or none
    made in time: the worker killed, its node gone, before the scheduler noticed), not that
    something failed on it (a worker's own ``OSError`` is of a subclass: ``FileNotFoundError``)."""
    from distributed.comm.core import CommClosedError

    return isinstance(exc, CommClosedError) or type(exc) is OSError


def on_workers(client, function, workers: list[str] | None = None) -> dict:
    """``client.run(function)`` on ``workers`` (default all), by address, without the workers
    that cannot be reached (:func:`unreachable`, logged): a worker lost as a run sets up (an OOM
    kill, a preempted node) failed the whole run, although Dask reschedules its tasks and a
    restarted worker starts without what the run's set-up asks of them (caches to drop, datasets
    to close) or with what it measures (its free disk).  An error raised by ``function`` on a
    worker is raised here."""
    answers = client.run(function, workers=workers, on_error="return")
    got = {}
    for address, answer in answers.items():
        if not isinstance(answer, BaseException):
            got[address] = answer
        elif unreachable(answer):
            log.warning("worker %s cannot be reached (%s): left to Dask", address, answer)
        else:
            raise answer
    return got


def add_worker_plugin(client, plugin: WorkerPlugin) -> None:
    """``client.register_plugin(plugin)``, which fails where a worker cannot be reached
    (:func:`unreachable`); the scheduler keeps the plugin before it sends it to its workers, so
    the workers that answer and every worker that starts later (a lost one, restarted) get it.
    An error of the plugin's set-up on a worker is raised."""
    try:
        client.register_plugin(plugin)
    except Exception as exc:
        if not unreachable(exc):
            raise
        log.warning(
            "a worker could not be reached as %s was registered (%s): the workers that start "
            "later get it from the scheduler", getattr(plugin, "name", plugin), exc,
        )  # fmt: skip


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
