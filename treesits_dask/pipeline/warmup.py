"""Dask worker preload of the workers that run inference: torch, the model families and the
prediction kernel are imported in the background as the worker starts (``dask worker --preload
treesits_dask.pipeline.warmup``; the clusters that ``run`` and ``bench`` start pass it to those
workers, and so do the Kubernetes worker groups that run inference).

Importing torch takes a worker 1.3-1.5 s, nearly all of it holding the GIL.  Without this preload
the model plugin of a run imports it in the background beside the first window reads, and those
reads wait for the GIL after each GDAL call: on this 2-core development machine the first two
read tasks of a 1000 px, 60-scene COG tile took 3.75 and 4.84 s of wall time (1.7 and 2.1 s of
CPU) with the import beside them and 2.26 and 2.81 s with torch imported beforehand.  Imported as
the worker starts, it is done before the first read on a cluster started before the run
(Kubernetes, a notebook's ``connect``, ``bench``); on the LocalCluster that ``run`` starts itself
it overlaps the run's set-up (plugins, routing, the task graph) and the first reads less.

Workers that only read (the CPU group beside a GPU group) are not given this preload: torch would
only take their memory.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["PRELOAD", "dask_setup", "imported", "worker_kwargs"]

log = logging.getLogger(__name__)

#: the module name to pass as a Dask worker preload
PRELOAD = __name__

_DONE = threading.Event()


def _import() -> None:
    try:
        import torch  # noqa: F401

        from ..models import loading  # noqa: F401  (the families and their torch modules)
        from . import predict  # noqa: F401  (the kernel and the reads it imports: rasterio)
    except Exception as exc:  # noqa: BLE001 - the model plugin imports again and reports why
        log.warning("could not import torch ahead of the first window: %s", exc)
    finally:
        _DONE.set()


def dask_setup(worker=None) -> None:
    """Dask's preload hook: start the import and return at once (the worker registers with its
    scheduler meanwhile)."""
    threading.Thread(target=_import, name="treesits-warmup", daemon=True).start()


def imported(timeout: float | None = None) -> bool:
    """Whether this process's preload import has finished (waiting up to ``timeout`` s)."""
    return _DONE.wait(timeout)


def worker_kwargs() -> dict:
    """``preload`` and ``preload_argv`` for a worker (``LocalCluster`` or ``Nanny`` options): the
    preloads of Dask's config (``distributed.worker.preload``, which an explicit ``preload``
    would replace) and this module."""
    import dask

    preload = dask.config.get("distributed.worker.preload", None) or []
    preload = [preload] if isinstance(preload, str) else list(preload)
    argv = dask.config.get("distributed.worker.preload-argv", None) or []
    if argv and isinstance(argv[0], str):  # one argv for every preload
        argv = [list(argv)] * len(preload)
    argv = [list(a) for a in argv] or [[] for _ in preload]
    if PRELOAD not in preload:
        preload, argv = [*preload, PRELOAD], [*argv, []]
    return {"preload": preload, "preload_argv": argv}
