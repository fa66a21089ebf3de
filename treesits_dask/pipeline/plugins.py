"""The plugins every worker of a run gets (:func:`worker_plugins`): the run's non-secret
environment (:class:`EnvPlugin`), one-line logs of tasks that failed on an input problem
(:class:`TaskErrorLog`), and the files of read pieces removed before the worker closes
(:class:`PieceFiles`)."""

from __future__ import annotations

import logging

from distributed.diagnostics.plugin import WorkerPlugin

from ..io import storage

__all__ = ["EnvPlugin", "PieceFiles", "TaskErrorLog", "worker_plugins"]


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


def worker_plugins(env: dict[str, str]) -> list[WorkerPlugin]:
    """The plugins every worker of a run gets: its environment (:class:`EnvPlugin`), one-line
    input errors (:class:`TaskErrorLog`), piece files removed before it closes
    (:class:`PieceFiles`)."""
    return [EnvPlugin(env), TaskErrorLog(), PieceFiles()]
