"""How much a tile's read tasks may hold, from the reading workers of the cluster (see
:mod:`treesits_dask.io.bands`): the decoded scenes of one read task, and the bands of all scenes
a reading worker holds in memory while windows are put together from them, and the local disk
it may fill with what Dask spills of them (the memory guard)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RunConfig
from ..config.kube_resources import parse_quantity
from .cluster import Routing

__all__ = [
    "HELD_SHARE",
    "SPILL_SHARE",
    "WINDOWS_PER_THREAD",
    "WINDOW_SHARE",
    "ReadBudget",
    "read_budget",
    "window_budget",
    "window_memory_problem",
    "worker_disks",
]


@dataclass(frozen=True)
class ReadBudget:
    """What the reading workers of a cluster allow one read task: ``task_bytes`` of decoded scenes
    (``read_memory`` of the smallest reading worker's memory limit, shared out among its threads),
    and ``threads``, the reading threads of the whole cluster (a tile is read in at least as many
    tasks where its windows are put together from pieces anyway).  ``held_bytes``: what a reading
    worker may fill with the bands of the tiles it reads at once (the memory guard of
    :func:`~treesits_dask.io.bands.plan_reads`), ``spill_bytes`` the local disk it may fill with
    what Dask spills of them (None: unknown, no spilling counted on)."""

    task_bytes: int
    threads: int
    memory_limit: int
    held_bytes: int | None = None
    spill_bytes: int | None = None


#: share of a reading worker's memory limit the bands of its tiles may fill (Dask pauses a worker
#: at 80 %; the rest is the windows, the model and the worker itself)
HELD_SHARE = 0.75

#: share of a reading worker's free local disk (on Kubernetes: of its scratch volume) that the
#: bands it spills may fill (the rest: COG temp files, other tiles, the unexpected)
SPILL_SHARE = 0.5


#: windows of all scenes an inference thread needs room for: the window it puts together (its
#: pieces and itself, both in memory), and the one it predicts or that waits for it
WINDOWS_PER_THREAD = 3

#: share of an inference worker's memory limit those windows may fill (the rest: the bands being
#: read, the model, the worker itself).  Measured on a LocalCluster worker of 2 threads reading 600
#: scenes of a 600 px tile in 200 x 200 px windows (458 MiB each): restarted for memory at 3 and
#: 4 GiB (3 x 2 x 458 MiB > 60 % of it), finished at 5 GiB
WINDOW_SHARE = 0.6


def window_memory_problem(
    scenes: int,
    bands: int,
    window: tuple[int, int],
    workers: dict[str, dict],
    routing: Routing,
) -> str | None:
    """Why the inference workers (``scheduler_info()["workers"]`` under ``routing``) cannot hold
    the windows of all ``scenes`` of a tile that their threads work on at once, or None.

    A window holds every scene (the models take whole series), so its memory grows with the scene
    count while the window (the map's chunk) stays fixed.  Where :data:`WINDOWS_PER_THREAD`
    windows per thread exceed :data:`WINDOW_SHARE` of a worker's memory limit, Dask restarts the
    worker again and again and the tile fails after minutes with ``KilledWorker`` (see
    :data:`WINDOW_SHARE`); this says so before anything is read, with the settings that fix it."""
    from dask.utils import format_bytes

    nbytes = scenes * bands * window[0] * window[1] * 2
    smallest = _smallest_inference_worker(workers, routing)
    if smallest is None or not nbytes:
        return None
    limit, threads = smallest
    held = WINDOWS_PER_THREAD * threads * nbytes
    if held <= WINDOW_SHARE * limit:
        return None
    need = held / WINDOW_SHARE
    fit = int(WINDOW_SHARE * limit // (WINDOWS_PER_THREAD * nbytes))
    fewer = (
        f"at most {fit} thread(s) per worker (--threads-per-worker; kubernetes.cpu.threads, "
        "gpu_windows_in_flight), or "
        if fit
        else ""
    )
    return (
        f"a window of all {scenes} scenes is {window[0]}x{window[1]} px x {bands} bands = "
        f"{format_bytes(nbytes)}, and an inference worker with {threads} thread(s) needs room for "
        f"{WINDOWS_PER_THREAD} per thread ({format_bytes(held)}), more than {WINDOW_SHARE:.0%} of "
        f"its {format_bytes(limit)} memory limit: Dask would restart it for memory until the tile "
        f"fails. Give each inference worker at least {format_bytes(need)} (--memory-limit; on "
        f"Kubernetes kubernetes.cpu.memory_limit or kubernetes.gpu.memory_limit), or {fewer}fewer "
        "scenes per run (--start-date / --end-date, where the model allows); a new output can "
        "take smaller windows (--window)"
    )


def window_budget(workers: dict[str, dict], routing: Routing) -> int | None:
    """The most a window of all scenes may hold on the inference workers (``workers`` as
    ``scheduler_info()["workers"]`` describes them, under ``routing``): :data:`WINDOW_SHARE` of
    the smallest memory limit per thread, over :data:`WINDOWS_PER_THREAD`; None without workers."""
    smallest = _smallest_inference_worker(workers, routing)
    if smallest is None:
        return None
    limit, threads = smallest
    return int(WINDOW_SHARE * limit / (WINDOWS_PER_THREAD * threads))


def _smallest_inference_worker(workers: dict[str, dict], routing: Routing):
    """(memory limit, threads) of the worker that may predict (under ``routing``; all where none
    advertises what it asks for) with the least memory per thread; a worker without a limit counts
    with this machine's memory.  None without workers."""
    import psutil

    every = list(workers.values())
    inferring = [
        w
        for w in every
        if not routing.predict or all(k in (w.get("resources") or {}) for k in routing.predict)
    ] or every
    if not inferring:
        return None
    total = psutil.virtual_memory().total
    return min(
        ((int(w.get("memory_limit") or 0) or total, max(1, int(w.get("nthreads") or 1)))
         for w in inferring),
        key=lambda lt: lt[0] / lt[1],
    )  # fmt: skip


def worker_disks(client) -> dict[str, int]:
    """Free bytes of each worker's local directory (where Dask spills), by worker address."""

    def free(dask_worker) -> int:
        import shutil

        return shutil.disk_usage(dask_worker.local_directory).free

    return client.run(free)


def read_budget(
    config: RunConfig,
    workers: dict[str, dict],
    routing: Routing,
    disks: dict[str, int] | None = None,
) -> ReadBudget:
    """The :class:`ReadBudget` of the workers (``scheduler_info()["workers"]``) that read under
    ``routing``.  A worker without a memory limit counts with this machine's memory.  ``disks``:
    free local disk by worker address (:func:`worker_disks`; None: no spilling counted on), capped
    on Kubernetes by the scratch volume of the pods (``kubernetes.scratch_size``)."""
    import psutil

    total = psutil.virtual_memory().total
    every = [w | {"address": a} for a, w in workers.items()]
    reading = [
        w
        for w in every
        if not routing.read or all(k in (w.get("resources") or {}) for k in routing.read)
    ] or every
    if not reading:
        return ReadBudget(int(total * config.read_memory), 1, total, int(total * HELD_SHARE))
    limits = [(int(w.get("memory_limit") or 0) or total, max(1, int(w.get("nthreads") or 1)))
              for w in reading]  # fmt: skip
    task = min(int(limit * config.read_memory) // threads for limit, threads in limits)
    smallest = min(limit for limit, _ in limits)
    # tiles in flight spread over the reading workers; each holds the bands of its share
    per_worker = max(1, -(-config.tiles_in_flight // len(reading)))
    held = int(smallest * HELD_SHARE) // per_worker
    spill = None
    if disks is not None:
        free = [disks.get(w["address"], 0) for w in reading]
        if config.cluster == "kubernetes":
            scratch = int(parse_quantity(config.kubernetes.scratch_size, "scratch_size"))
            free = [min(f, scratch) for f in free]
        spill = int(min(free) * SPILL_SHARE) // per_worker
    return ReadBudget(task, sum(t for _, t in limits), smallest, held, spill)
