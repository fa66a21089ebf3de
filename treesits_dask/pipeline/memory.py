"""What the workers of a run can hold of the windows of all scenes: a window holds every scene
(the models take whole series) and is the map's chunk, fixed when the map is made, so its memory
grows with the scene count.  ``window: auto`` keeps a new map's windows within the
:func:`window_budget` of the inference workers the settings start (:func:`expected_workers`), and a
tile whose windows exceed what its inference workers can hold is refused before anything is read
(:func:`window_memory_problem`: by the plan where the settings say which workers, by the
scheduler loop on a standing cluster) instead of restarting workers until Dask gives up."""

from __future__ import annotations

import functools
import logging

from ..config import RunConfig
from ..config.kubernetes import GPU_RESOURCE, READ_RESOURCE
from .cluster import Routing, local_cluster_kwargs
from .reading import memory_and_threads, routed_workers

__all__ = [
    "AUTO_WINDOW_SHARE",
    "BLOCK_CHUNK_SHARE",
    "WINDOWS_PER_THREAD",
    "WINDOW_SHARE",
    "expected_workers",
    "fitting_chunk",
    "streams_instead",
    "tiles_that_fit",
    "window_budget",
    "window_memory_problem",
]

log = logging.getLogger(__name__)


#: windows of all scenes an inference thread needs room for: the window it puts together (its
#: pieces and itself, both in memory), and the one it predicts or that waits for it
WINDOWS_PER_THREAD = 3

#: share of an inference worker's memory limit those windows may fill (the rest: the bands being
#: read, the model, the worker itself).  Measured on a LocalCluster worker of 2 threads reading 600
#: scenes of a 600 px tile in 200 x 200 px windows (458 MiB each): restarted for memory at 3 and
#: 4 GiB (3 x 2 x 458 MiB > 60 % of it), finished at 5 GiB (sits-lstm, 2 % forest)
WINDOW_SHARE = 0.6

#: the share of an inference worker's memory limit that chunks of whole blocks much larger than
#: the window (:func:`~treesits_dask.io.grid.block_chunk`: 256 x 256 px blocks for 200 x 200 px
#: windows, 1.64 times the pixels) may fill, :data:`WINDOWS_PER_THREAD` per thread: well within
#: what is refused, since windows of 0.55 of it ran without a restart (see :data:`WINDOW_SHARE`).
#: They are not the map's chunks, so each run decides again
BLOCK_CHUNK_SHARE = 0.45

#: the share ``window: auto`` leaves those windows when it makes a map: half of what is refused,
#: because the window stays the map's for years while its series grows (measured as above, 2
#: threads, 3 GiB: 100 x 100 px windows ran without a restart, 150 x 150 px ones were restarted
#: twice, 200 x 200 px ones four times until the tile failed)
AUTO_WINDOW_SHARE = 0.3


def window_memory_problem(
    scenes: int,
    bands: int,
    window: tuple[int, int],
    workers: dict[str, dict],
    routing: Routing,
    share: float | None = None,
) -> str | None:
    """Why the inference workers (``scheduler_info()["workers"]`` under ``routing``) cannot hold
    the windows of all ``scenes`` of a tile that their threads work on at once, or None.

    A window holds every scene (the models take whole series), so its memory grows with the scene
    count while the window (the map's chunk) stays fixed.  Where :data:`WINDOWS_PER_THREAD`
    windows per thread exceed :data:`WINDOW_SHARE` of a worker's memory limit, Dask restarts the
    worker again and again and the tile fails after minutes with ``KilledWorker`` (see
    :data:`WINDOW_SHARE`); this says so before anything is read, with the settings that fix it.
    ``share``: the share to check against instead (None: :data:`WINDOW_SHARE`; chunks larger
    than the window take :data:`BLOCK_CHUNK_SHARE`)."""
    from dask.utils import format_bytes

    nbytes = scenes * bands * window[0] * window[1] * 2
    smallest = _smallest_inference_worker(workers, routing)
    if smallest is None or not nbytes:
        return None
    limit, threads = smallest
    share = WINDOW_SHARE if share is None else share
    held = WINDOWS_PER_THREAD * threads * nbytes
    if held <= share * limit:
        return None
    need = held / share
    fit = int(share * limit // (WINDOWS_PER_THREAD * nbytes))
    fewer = (
        f"at most {fit} thread(s) per worker (--threads-per-worker; kubernetes.cpu.threads, "
        "gpu_windows_in_flight), or "
        if fit
        else ""
    )
    return (
        f"a window of all {scenes} scenes is {window[0]}x{window[1]} px x {bands} bands = "
        f"{format_bytes(nbytes)}, and an inference worker with {threads} thread(s) needs room for "
        f"{WINDOWS_PER_THREAD} per thread ({format_bytes(held)}), more than {share:.0%} of "
        f"its {format_bytes(limit)} memory limit: Dask would restart it for memory until the tile "
        f"fails. Give each inference worker at least {format_bytes(need)} (--memory-limit; on "
        f"Kubernetes kubernetes.cpu.memory_limit or kubernetes.gpu.memory_limit), or {fewer}fewer "
        "scenes per run (--start-date / --end-date, where the model allows); a new output can "
        "take smaller windows (--window)"
    )


def streams_instead(
    problem: str,
    stream: str,
    config: RunConfig,
    card,
    workers: dict[str, dict],
    routing: Routing,
    tile,
) -> tuple[bool, str]:
    """Whether a tile whose windows of all scenes the inference workers cannot hold (``problem``,
    :func:`window_memory_problem`) is streamed through the model instead, and why: (True, what
    its states hold) where its model may stream (``stream``, the tile's setting: not ``never``)
    and the states of its mask's pixels fit what an inference worker has room for
    (:attr:`~treesits_dask.pipeline.reading.ReadBudget.state_bytes`); else (False, ``problem``
    with what streaming would take, or the setting that allows it; logged where it streams).
    ``tile``: ``(name, grid, window layout, scene count, mask)``.

    A streamed tile never holds a window of all scenes: each window steps its model state
    through batches of scenes (:mod:`~treesits_dask.pipeline.streaming`).  So a map whose windows
    were chosen for fewer scenes (they stay the map's while its series grows) goes on with the
    LSTM, and with SBERT where its states fit, instead of being refused (:func:`fitting_chunk`:
    ``window: 250`` of 600 scenes on a 3 GiB worker of 2 threads)."""
    from dask.utils import format_bytes

    from ..io.bands import plan_reads
    from .reading import STATE_SHARE, mask_states, read_budget

    if stream == "never":
        if card.streams and config.alerts is None:
            problem += "; or let the model stream the tile in batches of scenes (--stream auto)"
        return False, problem
    name, grid, layout, scenes, mask = tile
    room = read_budget(config, workers, routing).state_bytes
    of_plan = functools.partial(
        mask_states, grid=grid, mask=mask, per_pixel=card.stream_state_bytes
    )
    streamed = plan_reads(grid, layout, scenes, 1 << 30, stream="required", state_room=room,
                          states=of_plan)  # fmt: skip
    states = of_plan(streamed)
    what = "the pixels of its mask" if mask is not None else "every pixel"
    if room is None or states <= room:
        why = f"its windows' model states ({what}) hold up to {format_bytes(states)}"
        if streamed.sections > 1:
            why += f", in {streamed.sections} sections of window columns"
        if stream != "required":  # else the plan said so
            log.info(
                "tile %s: its windows of all %d scenes (%dx%d px) do not fit the inference "
                "workers; streamed through the model instead: %s", name, scenes, *layout.shape, why,
            )  # fmt: skip
        return True, why
    return False, (
        f"{problem}. Streamed through the model instead, its windows' model states ({what}) "
        f"would hold {format_bytes(states)} at once even in {streamed.sections} sections of "
        f"window columns, more than the {format_bytes(room)} an "
        f"inference worker has room for ({STATE_SHARE:.0%} of its memory limit over the tiles in "
        "flight on it: --memory-limit, --tiles-in-flight)"
    )


def fitting_chunk(
    scenes: int,
    bands: int,
    chunk: tuple[int, int],
    window: tuple[int, int],
    workers: dict[str, dict],
    routing: Routing,
    larger: tuple[int, int] | None = None,
) -> tuple[tuple[int, int], str | None]:
    """The shape a tile is read and predicted in on these inference workers, and why it does not
    fit (None where it does): ``larger`` (chunks of whole blocks that hold a window,
    :func:`~treesits_dask.io.grid.block_chunk`) where given and within
    :data:`BLOCK_CHUNK_SHARE` of the workers' memory; else its read ``chunk`` (whole blocks or
    strips, :func:`~treesits_dask.io.grid.read_shape`) where that fits, else its ``window``, which
    is a little smaller and read in bands as well (:func:`window_memory_problem` of the window
    where neither fits: the window is the setting to change)."""
    chunk, window = tuple(chunk), tuple(window)
    if larger is not None and tuple(larger) != chunk:
        share = BLOCK_CHUNK_SHARE
        if window_memory_problem(scenes, bands, larger, workers, routing, share) is None:
            return tuple(larger), None
    problem = window_memory_problem(scenes, bands, chunk, workers, routing)
    if problem and chunk != window:
        return window, window_memory_problem(scenes, bands, window, workers, routing)
    return chunk, problem


def window_budget(
    workers: dict[str, dict], routing: Routing, share: float = AUTO_WINDOW_SHARE
) -> int | None:
    """The most a window of all scenes may hold on the inference workers (``workers`` as
    ``scheduler_info()["workers"]`` describes them, under ``routing``): ``share`` of the smallest
    memory limit per thread, over :data:`WINDOWS_PER_THREAD`; None without workers."""
    smallest = _smallest_inference_worker(workers, routing)
    if smallest is None:
        return None
    limit, threads = smallest
    return int(share * limit / (WINDOWS_PER_THREAD * threads))


def _smallest_inference_worker(workers: dict[str, dict], routing: Routing):
    """(memory limit, threads) of the worker that may predict under ``routing`` with the least
    memory per thread (a worker without a limit counts with this machine's memory); None without
    workers."""
    import psutil

    inferring = routed_workers(list(workers.values()), routing.predict)
    if not inferring:
        return None
    total = psutil.virtual_memory().total
    return min((memory_and_threads(w, total) for w in inferring), key=lambda lt: lt[0] / lt[1])


def expected_workers(config: RunConfig) -> dict[str, dict] | None:
    """The workers the settings will start, as ``scheduler_info()["workers"]`` describes them
    (memory limit, threads, resources), known on the driver before any cluster exists; None for
    a standing cluster behind ``scheduler_address`` (only its workers know).  A Kubernetes group
    counts the workers it starts with (an adaptive group: its minimum), at least the one a run
    waits for."""
    from distributed.worker_memory import parse_memory_limit

    from ..config.kube_resources import parse_quantity

    if config.scheduler_address:
        return None
    if config.cluster == "kubernetes":
        k = config.kubernetes
        res = k.worker_resources()
        groups = {"cpu": k.cpu, **({"gpu": k.gpu} if k.gpu.enabled else {})}
        return {
            f"{name}-{i}": {"memory_limit": int(parse_quantity(group.memory_limit)),
                            "nthreads": group.threads, "resources": res[name]}
            for name, group in groups.items()
            for i in range(max(1, group.initial_workers))
        }  # fmt: skip
    kw = local_cluster_kwargs(config)
    threads = kw["threads_per_worker"]
    gpu = bool(config.local_gpu_workers)
    workers = {
        f"cpu-{i}": {
            "memory_limit": parse_memory_limit(kw["memory_limit"], threads, logger=log) or 0,
            "nthreads": threads,
            "resources": {READ_RESOURCE: threads} if gpu else {},
        }
        for i in range(kw["n_workers"])
    }
    for i in range(config.local_gpu_workers):
        workers[f"gpu-{i}"] = {
            "memory_limit": parse_memory_limit(
                kw["memory_limit"], config.gpu_windows_in_flight, logger=log
            )
            or 0,
            "nthreads": config.gpu_windows_in_flight,
            "resources": {GPU_RESOURCE: 1},
        }
    return workers


def tiles_that_fit(plan, client, routing: Routing, cb, result) -> list:
    """The tiles of ``plan`` (a :class:`~treesits_dask.pipeline.plan.RunPlan`) whose windows of
    all scenes fit the memory of the cluster's inference workers; the others fail at once, before
    anything is read, with the sizes and the settings to change, told to ``cb`` and recorded in
    ``result`` (the plan checks this already where the settings say which workers; a standing
    cluster's workers are known only here).  A tile whose read chunks (whole blocks or strips, a
    little larger than its windows) do not fit but whose windows do is read in its windows, as
    the plan decides where it knows the workers; one whose windows do not fit either is streamed
    through the model where its model may and its states fit (:func:`streams_instead`)."""
    import dataclasses

    from ..io.grid import WindowLayout, block_chunk, read_shape

    workers = client.scheduler_info(n_workers=-1)["workers"]
    kept = []
    for tile in plan.tiles:
        chunk, window = tile.reading.shape, tile.layout.shape  # chunks of all scenes, predicted
        # chunks of whole blocks larger than the window, which the plan chose for the workers it
        # expected, are checked as it checked them, with the chunks near the window after them
        larger = chunk if chunk == block_chunk(tile.grid, window) else None
        shape, problem = fitting_chunk(
            len(tile.scenes), tile.grid.count, read_shape(tile.grid, window) if larger else chunk,
            window, workers, routing, larger,
        )  # fmt: skip
        if problem is not None:
            layout = tile.layout  # not even the window fits: streamed, where it may be
            streams, why = streams_instead(
                problem, tile.stream, plan.config, plan.card, workers, routing,
                (tile.tile, tile.grid, layout, len(tile.scenes), tile.mask),
            )  # fmt: skip
            if streams:
                kept.append(dataclasses.replace(tile, read_layout=None, stream="required"))
                continue
            problem = why
        if problem is None and shape != chunk:
            log.info(
                "tile %s: chunks of %dx%d px of all scenes do not fit the inference workers, "
                "chunks of %dx%d px do: read in those",
                tile.tile, *chunk, *shape,
            )  # fmt: skip
            read_layout = None if shape == window else WindowLayout.of(tile.grid, shape)
            tile = dataclasses.replace(tile, read_layout=read_layout)
        if problem is None:
            kept.append(tile)
            continue
        log.error("tile %s not processed: %s", tile.tile, problem)
        result.failed[tile.tile] = problem
        cb.tile_failed(tile.tile, problem)
    return kept
