"""How much a tile's read tasks may hold, from the reading workers of the cluster (see
:mod:`treesits_dask.io.bands`): the decoded scenes of one read task, and the bands of all scenes
a reading worker holds in memory while windows are put together from them, and the local disk
it may fill with what Dask spills of them (the memory guard).

This module is longer than 400 lines: the budgets, the reading workers they come from and the
plans a tile's read follows under them (one, one per file layout, or one per stage of a streamed
tile) are asked together by the planner, the preview and the scheduler."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from ..config import RunConfig
from ..config.kube_resources import parse_quantity
from ..io.pieces import IN_MEMORY_SHARE
from .cluster import Routing

__all__ = [
    "ALONE_DECODE",
    "HELD_SHARE",
    "SPILL_SHARE",
    "STATE_SHARE",
    "ReadBudget",
    "alone_budget",
    "answering",
    "free_disk",
    "idle_reader",
    "mask_states",
    "memory_and_threads",
    "pinned_worker",
    "plans_decode",
    "read_alone",
    "read_budget",
    "read_scenes",
    "readers",
    "reading_workers",
    "routed_workers",
    "spill_worker",
    "stream_sections",
    "stages_states",
    "stream_stages",
    "tile_bytes",
    "tile_decode",
    "tile_ordered",
    "tile_read_plan",
    "tile_read_plans",
    "tile_scenes",
    "tile_spills",
    "tile_states",
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
    what Dask spills of them (None: unknown, no spilling counted on).  ``in_memory_bytes``: what
    it may fill with bands held whole in memory that windows cross (None: ``held_bytes``), half
    its limit (:data:`~treesits_dask.io.pieces.IN_MEMORY_SHARE`, shared as ``held_bytes``):
    beyond it, such a plan whose bands fit ``held_bytes`` spills where the disk is known (see
    :func:`~treesits_dask.io.bands.plan_reads`).  ``state_bytes``: what the model states of a
    streamed tile may fill on an inference worker (:data:`STATE_SHARE` of the smallest one's
    limit, shared out among the tiles in flight on each; None: no limit), within which SBERT
    streams a tile instead of decoding its blocks more than once (``fallback``)."""

    task_bytes: int
    threads: int
    memory_limit: int
    held_bytes: int | None = None
    spill_bytes: int | None = None
    in_memory_bytes: int | None = None
    state_bytes: int | None = None


#: share of an inference worker's memory limit that the model states of the streamed tiles it
#: steps may fill (:class:`ReadBudget`, :func:`~treesits_dask.pipeline.preview.state_warnings`):
#: beyond it, with the worker's own memory (torch, read buffers, COGs), Dask passes its 60 %
#: target and writes the states to disk and back between batches of scenes (a 3 GiB worker
#: streaming an unmasked 3000 px tile of 300-row strips, 1.76 GiB of states: 3-9 GB written per
#: 100 s run; with twice the states 39-42 GB, see ``benchmarks/stream_windows.py``)
STATE_SHARE = 0.5

#: share of a reading worker's memory limit the bands of its tiles may fill (Dask pauses a worker
#: at 80 %; the rest is the windows, the model and the worker itself)
HELD_SHARE = 0.75

#: share of a reading worker's free local disk (on Kubernetes: of its scratch volume) that the
#: bands it spills may fill (the rest: COG temp files, other tiles, the unexpected)
SPILL_SHARE = 0.5


def worker_disks(client, workers: list[str] | None = None) -> dict[str, int]:
    """Free bytes of each worker's local directory (where Dask spills), by worker address (of
    ``workers``, default all; not of one that cannot be reached: :func:`~.plugins.on_workers`)."""

    from .plugins import on_workers

    def free(dask_worker) -> int:
        import shutil

        return shutil.disk_usage(dask_worker.local_directory).free

    return on_workers(client, free, workers)  # a worker that cannot be reached has none


def answering(workers: dict[str, dict], disks: dict[str, int]) -> dict[str, dict]:
    """The workers of ``workers`` (``scheduler_info()["workers"]``) that answered
    :func:`worker_disks` (``disks``).  One that could not be reached was lost before the
    scheduler noticed (an OOM kill, a preempted node): counted, it lent the read budgets of the
    tiles that start next its memory and threads, and its missing disk made the least free disk
    of the reading workers nothing (no spilling counted on).  All of ``workers`` where none
    answered (the budgets then count no disk, as before)."""
    return {a: w for a, w in workers.items() if a in disks} or workers


def routed_workers(workers: list[dict], resources: dict | None) -> list[dict]:
    """The ``workers`` (as ``scheduler_info()["workers"]`` describes them) that advertise every
    resource of ``resources`` (None: any worker); all of them where none does."""
    return [
        w
        for w in workers
        if not resources or all(k in (w.get("resources") or {}) for k in resources)
    ] or workers


def readers(workers: dict[str, dict], routing: Routing) -> list[dict]:
    """The workers of ``workers`` (``scheduler_info()["workers"]``) that read under ``routing``
    (:func:`routed_workers`), each with its ``address``."""
    return routed_workers([w | {"address": a} for a, w in workers.items()], routing.read)


def free_disk(config: RunConfig, reading: list[dict], disks: dict[str, int]) -> int:
    """The least free local disk of the ``reading`` workers (:func:`readers`) by ``disks``
    (:func:`worker_disks`; a worker not in it has none), capped on Kubernetes by the scratch
    volume of the pods (``kubernetes.scratch_size``)."""
    free = min((disks.get(w["address"], 0) for w in reading), default=0)
    if config.cluster == "kubernetes":
        free = min(free, int(parse_quantity(config.kubernetes.scratch_size, "scratch_size")))
    return free


def spill_worker(
    workers: dict[str, dict], routing: Routing, busy: Iterable[str | None] = ()
) -> str | None:
    """The reading worker (address) that reads a tile whose read plan spills and puts its windows
    together (:func:`~treesits_dask.io.cube.tile_cube`'s ``worker``): of the workers
    (``scheduler_info()["workers"]``) that read under ``routing``, the one that reads the fewest
    of the tiles in flight (``busy``: the workers they were given), the first by address among
    equals; None where fewer than two workers read (nothing to choose).

    A spilling plan writes the pieces of its bands to the local disk of the worker that reads
    them.  Left to Dask, the windows were put together anywhere, and each fetched the pieces
    that other workers had written, as arrays: two workers of 1 thread and 1.5 GiB reading two
    600 px x 600-scene COG tiles took 66-181 s, Dask spilled 10-26 GiB and restarted workers; with
    each tile on one worker 38.9 s, 2.9 GiB spilled, no restart (at 3 GiB: 23.0-24.7 s, nothing
    spilled, against 29.6-32.7 s, 2.2-2.8 GiB; ``benchmarks/spill_workers.py``).
    :func:`read_budget` already counts a worker's bands as those of its share of the tiles in
    flight."""
    reading = sorted(w["address"] for w in readers(workers, routing))
    if len(reading) < 2:
        return None
    load = Counter(w for w in busy if w in reading)
    return min(reading, key=lambda a: (load[a], a))


def idle_reader(workers: dict[str, dict], routing: Routing, busy: list[str | None]) -> bool:
    """Whether a reading worker (of ``workers``, ``scheduler_info()["workers"]``) reads none of the
    tiles in flight (``busy``: the workers their reads were pinned to, None where not pinned).
    False where one of those workers left the cluster: its tile's read went on on another worker
    (:class:`~treesits_dask.pipeline.plugins.PinnedReads`), which one is not known here."""
    if any(w is not None and w not in workers for w in busy):
        return False
    idle = spill_worker(workers, routing, busy)
    return idle is not None and idle not in busy


def tile_scenes(tile) -> tuple:
    """The scenes a tile's read goes through, oldest first: its own, and for alert runs the older
    ones their steps need."""
    return (*tile.alerts.older, *tile.scenes) if tile.alerts is not None else tuple(tile.scenes)


def read_scenes(tile) -> int:
    """How many scenes a tile's read goes through (:func:`tile_scenes`)."""
    return len(tile.scenes) + (len(tile.alerts.older) if tile.alerts is not None else 0)


def tile_bytes(tile) -> int:
    """The bytes of the scenes a tile's read goes through (:func:`read_scenes`), decoded: what a
    plan that decodes every block once decodes."""
    return read_scenes(tile) * tile.grid.height * tile.grid.width * tile.grid.count * 2


def tile_read_plan(tile, reads: ReadBudget | None):
    """The :class:`~treesits_dask.io.bands.ReadPlan` of ``tile`` (a
    :class:`~treesits_dask.pipeline.plan.TilePlan`, alert runs with their older scenes) under
    ``reads``, as :func:`~treesits_dask.io.cube.tile_cube` plans it for the tile's graph; None
    without a budget (nothing is held, nothing spills), except for a tile that must be streamed
    (``stream: required``), planned with the default read task."""
    from ..io.bands import plan_reads

    if reads is None:
        if tile.stream != "required":
            return None
        from ..io.cube import DEFAULT_READ_BYTES

        reads = ReadBudget(DEFAULT_READ_BYTES, 1, 0)
    scenes = read_scenes(tile)
    return plan_reads(
        tile.grid, tile.reading, scenes, reads.task_bytes, min_tasks=reads.threads,
        held_bytes=reads.held_bytes, spill_bytes=reads.spill_bytes,
        in_memory_bytes=reads.in_memory_bytes, stream=tile.stream,
        state_room=reads.state_bytes, states=functools.partial(tile_states, tile),
    )  # fmt: skip


def tile_states(tile, plan) -> int:
    """The most memory the model states of ``tile`` (a
    :class:`~treesits_dask.pipeline.plan.TilePlan`) hold at once where it is streamed by
    ``plan`` (:meth:`~treesits_dask.io.bands.ReadPlan.states_bytes`): the pixels of its mask
    (read once per process), or every pixel without one."""
    return mask_states(plan, tile.grid, tile.mask, tile.stream_state)


def stream_sections(tile, reads: ReadBudget) -> int:
    """The fewest sections of window columns in which ``tile`` (a
    :class:`~treesits_dask.pipeline.plan.TilePlan`), streamed, holds model states of its mask's
    pixels within the room of ``reads`` (:attr:`ReadBudget.state_bytes`); 0 where none: with the
    free disk (what its plan compares them with), all that its plan takes from its mask."""
    from ..io.bands import streamed_within

    def fits(plan) -> bool:
        return reads.state_bytes is None or tile_states(tile, plan) <= reads.state_bytes

    scenes = read_scenes(tile)
    plan = streamed_within(tile.grid, tile.reading, tile.grid.count, scenes, reads.task_bytes,
                           reads.threads, fits)  # fmt: skip
    return plan.sections if plan is not None else 0


def stream_stages(tile, reads: ReadBudget | None, plan=None) -> tuple:
    """``(run, plan)`` of each stage of ``tile`` (a :class:`~treesits_dask.pipeline.plan.TilePlan`)
    where :func:`tile_read_plan` streams it and its scenes are in more than one file layout, in
    runs of consecutive scenes in one layout (:func:`~treesits_dask.io.layouts.layout_runs`):
    each run with a streamed plan for its own blocks (as a tile that must be streamed is
    planned, :func:`~treesits_dask.io.bands.plan_reads`), each block of each scene so decoded
    once (:func:`~treesits_dask.pipeline.streaming.stages_layer`).  Where a stage hands its windows'
    states to the next stage's, both stages' states are held (:func:`stages_states`), so the
    stages are read in the sections that decode least with the states of every two adjacent
    stages within the room of ``reads`` for them (a striped stage's sections each decode its
    full-width strips, a COG stage's cut only the blocks at their edges).  Empty where the tile
    is not streamed, or in one layout, or where the stages would decode more than the one plan
    for all its scenes (:func:`plans_decode`), or in more than
    :data:`~treesits_dask.io.layouts.STREAM_STAGES` runs where they would not decode
    :data:`~treesits_dask.io.layouts.STAGE_COST` of its scenes' bytes less per stage (each stage
    reads and steps at least one batch of its own: many short runs cost more than decoding the
    other layout's blocks again).  ``plan``: the tile's :func:`tile_read_plan` under ``reads``
    where the caller has it (None: planned here)."""
    from ..io.layouts import STAGE_COST, STREAM_STAGES, layout_parts, layout_runs

    plan = tile_read_plan(tile, reads) if plan is None else plan
    if plan is None or not plan.stream:
        return ()
    runs = layout_runs(tile.scenes, tile.grid)
    if len(runs) == 1:
        return ()
    one = plans_decode(tile, [(p.grid, len(p.indices), plan)
                              for p in layout_parts(tile.scenes, tile.grid)])  # fmt: skip
    scene = tile.grid.height * tile.grid.width * tile.grid.count * 2  # a scene's BOA, decoded
    cost = 0 if len(runs) <= STREAM_STAGES else len(runs) * STAGE_COST * scene
    if cost and one - cost < len(tile.scenes) * scene:
        return ()  # decoding every block once would not save that much: not worth planning
    if reads is None:
        from ..io.cube import DEFAULT_READ_BYTES

        reads = ReadBudget(DEFAULT_READ_BYTES, 1, 0)
    known: dict = {}  # the choices of a stage follow from its grid and its count of scenes
    for run in runs:
        key = (run.grid, len(run.indices))
        if key not in known:
            known[key] = _stage_choices(tile, run, reads)
    choices = [known[(run.grid, len(run.indices))] for run in runs]
    stages = tuple(zip(runs, _least_decoding(choices, reads.state_bytes), strict=True))
    staged = plans_decode(tile, [(run.grid, len(run.indices), own) for run, own in stages])
    return stages if staged <= one - cost else ()


def _stage_choices(tile, run, reads: ReadBudget) -> list[tuple]:
    """``(plan, states, decoded bytes)`` of a stage ``run`` of ``tile`` streamed in 1, 2, ...
    sections of window columns, up to one per column
    (:func:`~treesits_dask.io.bands.streamed_within`)."""
    from ..io.bands import planned_decode, streamed_within

    out: list[tuple] = []
    n = len(run.indices)
    while True:
        k = len(out) + 1
        plan = streamed_within(run.grid, tile.reading, run.grid.count, n, reads.task_bytes,
                               reads.threads, lambda p, k=k: p.sections >= k)  # fmt: skip
        if plan is None or (out and plan.sections <= out[-1][0].sections):
            return out
        out.append((plan, tile_states(tile, plan), planned_decode(run.grid, tile.reading, plan, n)))


def _least_decoding(choices: list[list[tuple]], room: int | None) -> list:
    """One plan per stage of ``choices`` (:func:`_stage_choices`, in stage order): those that
    decode least, with the states of every two adjacent stages within ``room`` (None: no limit);
    where none are, each stage's in the most sections (the least states)."""
    if room is None:
        return [c[0][0] for c in choices]
    # per choice of the stage so far: (decoded, sections, plans) of the best path ending in it
    best = {k: (dec, plan.sections, [plan]) for k, (plan, _, dec) in enumerate(choices[0])}
    for before, here in zip(choices[:-1], choices[1:], strict=True):
        paths = {}
        for k, (plan, states, dec) in enumerate(here):
            fits = [v for k0, v in best.items() if before[k0][1] + states <= room]
            if fits:
                d, s, path = min(fits, key=lambda v: v[:2])
                paths[k] = (d + dec, s + plan.sections, [*path, plan])
        best = paths
    if not best:
        return [c[-1][0] for c in choices]
    return min(best.values(), key=lambda v: v[:2])[2]


def stages_states(tile, plans) -> int:
    """The most memory the model states of ``tile`` streamed by ``plans`` hold at once
    (:func:`tile_states` of each plan, in stage order): one plan's, or where a stage hands its
    windows' states to the next's, the two stages' together (the earlier stage's states of the
    rows a later band crosses live until that band's windows take theirs from them).  Measured
    on a 3000 px tile of 4 striped scenes then 4 COGs, a quarter of its pixels masked in (the
    published LSTM's shapes): the states held 0.50-0.59 GiB at most in stages against 0.22 GiB
    in one plan, whose own count is 0.44 GiB (``benchmarks/stream_layouts.py``)."""
    each = [tile_states(tile, p) for p in plans]
    if len(each) == 1:
        return each[0]
    return max(a + b for a, b in zip(each[:-1], each[1:], strict=True))


def tile_read_plans(tile, reads: ReadBudget | None) -> tuple:
    """``(grid, scenes, plan)`` of each part of ``tile``'s read: one, :func:`tile_read_plan`,
    where its scenes are in one file layout; else one per layout
    (:func:`~treesits_dask.io.layouts.part_plans`, as
    :func:`~treesits_dask.io.cube.tile_cube` plans them); where the tile is streamed, one per
    stage (:func:`stream_stages`), or where it streams in one plan for all its scenes (more runs
    of layouts than stages), that plan with each layout's grid and scene count (its decoded bytes
    are each layout's at its own blocks).  Empty where :func:`tile_read_plan` is None."""
    from ..io.layouts import layout_parts, part_plans

    plan = tile_read_plan(tile, reads)
    if plan is None:
        return ()
    scenes = tile_scenes(tile)
    parts = layout_parts(scenes, tile.grid)
    if plan.stream and len(parts) > 1 and (stages := stream_stages(tile, reads, plan)):
        return tuple((run.grid, len(run.indices), own) for run, own in stages)
    if len(parts) == 1 or plan.stream:
        return tuple((p.grid, len(p.indices), plan) for p in parts)
    planned = part_plans(scenes, tile.grid, tile.reading, reads.task_bytes, reads.threads,
                         reads.held_bytes, reads.spill_bytes, reads.in_memory_bytes)  # fmt: skip
    return tuple((p.grid, len(p.indices), plan) for p, plan, _ in planned)


def mask_states(plan, grid, mask, per_pixel: int) -> int:
    """The most memory the model states (``per_pixel`` bytes each) of a tile of ``grid`` hold at
    once where it is streamed by ``plan``: the pixels of ``mask`` (a
    :class:`~treesits_dask.io.masks.MaskSource`, read once per process), or every pixel without
    one (None)."""
    from ..io.masks import mask_pixels

    pixels = None if mask is None else mask_pixels(mask, grid.height, grid.width)
    return plan.states_bytes(grid.width, per_pixel, pixels)


def tile_spills(tile, reads: ReadBudget | None) -> bool:
    """Whether the read plan of ``tile`` (a :class:`~treesits_dask.pipeline.plan.TilePlan`) spills
    under ``reads`` (:func:`tile_read_plan`): such a tile is read on one reading worker
    (:func:`spill_worker`); where its scenes are in more than one file layout, whether a part's
    plan spills (:func:`tile_read_plans`)."""
    return any(plan.spills for _, _, plan in tile_read_plans(tile, reads))


def tile_ordered(tile, reads: ReadBudget | None) -> bool:
    """Whether ``tile`` is read in sections of window columns, behind a gate or streamed
    (:func:`tile_read_plan`), whose order its graph's priorities give (a section after the
    other; the windows a gate waits for as soon as they are put together; a streamed tile's
    batches one after the other): a graph that must not be optimised (fusion drops them); where
    its scenes are in more than one file layout, a part's plan (:func:`tile_read_plans`)."""
    return any(p.sections > 1 or p.gate > 0 or p.stream for _, _, p in tile_read_plans(tile, reads))


def pinned_worker(graph) -> str | None:
    """The worker that a layer of ``graph`` (a ``HighLevelGraph``) is pinned to (a ``workers``
    annotation: a spilling tile's read, see :func:`spill_worker`), or None."""
    for layer in graph.layers.values():
        workers = (layer.annotations or {}).get("workers")
        if workers:
            return workers[0]
    return None


def memory_and_threads(worker: dict, total: int) -> tuple[int, int]:
    """(memory limit, threads) of a worker; one without a limit counts with ``total``."""
    return int(worker.get("memory_limit") or 0) or total, max(1, int(worker.get("nthreads") or 1))


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
    reading = readers(workers, routing)
    inferring = routed_workers(list(workers.values()), routing.predict)
    states = None
    if inferring:  # the tiles in flight spread over the inference workers
        on_each = max(1, -(-config.tiles_in_flight // len(inferring)))
        least = min(memory_and_threads(w, total)[0] for w in inferring)
        states = int(least * STATE_SHARE) // on_each
    if not reading:
        return ReadBudget(int(total * config.read_memory), 1, total, int(total * HELD_SHARE),
                          state_bytes=states)  # fmt: skip
    limits = [memory_and_threads(w, total) for w in reading]
    task = min(int(limit * config.read_memory) // threads for limit, threads in limits)
    smallest = min(limit for limit, _ in limits)
    # tiles in flight spread over the reading workers; each holds the bands of its share
    per_worker = max(1, -(-config.tiles_in_flight // len(reading)))
    held = int(smallest * HELD_SHARE) // per_worker
    in_memory = int(smallest * IN_MEMORY_SHARE) // per_worker
    spill = None
    if disks is not None:
        spill = int(free_disk(config, reading, disks) * SPILL_SHARE) // per_worker
    return ReadBudget(task, sum(t for _, t in limits), smallest, held, spill, in_memory, states)


#: a tile is read with no other tile in flight beside it on its reading worker where its share of
#: the worker (``tiles_in_flight`` beyond the reading workers) would have its plan decode more than
#: this many times what the worker's whole budget does (:func:`read_alone`)
ALONE_DECODE = 1.1


def reading_workers(workers: dict[str, dict], routing: Routing) -> int:
    """How many of ``workers`` (``scheduler_info()["workers"]``) read under ``routing`` (at least
    one)."""
    return max(1, len(readers(workers, routing)))


def alone_budget(
    config: RunConfig,
    workers: dict[str, dict],
    routing: Routing,
    disks: dict[str, int] | None = None,
) -> ReadBudget | None:
    """The :class:`ReadBudget` of a tile read with no other tile beside it on its reading worker
    (:func:`read_budget` with as many tiles in flight as reading workers), where
    ``tiles_in_flight`` gives a reading worker more than one tile; None where it does not."""
    count = reading_workers(workers, routing)
    if config.tiles_in_flight <= count:
        return None
    alone = config.model_copy(update={"tiles_in_flight": count})
    return read_budget(alone, workers, routing, disks)


def tile_decode(tile, reads: ReadBudget | None) -> int | None:
    """Bytes the read plans of ``tile`` decode under ``reads`` (:func:`tile_read_plans`, each
    scene's blocks in its own layout: :func:`~treesits_dask.io.bands.planned_decode`); None
    without a budget."""
    plans = tile_read_plans(tile, reads)
    return plans_decode(tile, plans) if plans else None


def plans_decode(tile, plans: tuple) -> int:
    """Bytes the read plans ``plans`` of ``tile`` (:func:`tile_read_plans`) decode, each part's
    scenes at their own blocks (:func:`~treesits_dask.io.bands.planned_decode`)."""
    from ..io.bands import planned_decode

    return sum(planned_decode(grid, tile.reading, plan, n) for grid, n, plan in plans)


def read_alone(tile, shared: ReadBudget | None, alone: ReadBudget | None) -> bool:
    """Whether ``tile`` is read with no other tile beside it on its reading worker: where its plan
    under ``shared`` (a tile's share of a reading worker with ``tiles_in_flight``) would decode
    more than :data:`ALONE_DECODE` times what it decodes under ``alone`` (:func:`alone_budget`).
    Reading is bound by decoding: two tiles read at once in 2 sections each decode four tiles'
    bytes where one after the other they decode two (two 1000 px strips tiles of 600 scenes on a
    3 GiB worker: 128.2-135.0 s together in 2 sections behind a gate, decoded x1.860, against
    70.6-75.7 s one after the other behind a gate, x0.942; a 3000 px strips tile of 600 scenes
    on a 12 GiB worker with two tiles in flight would be read in 2 sections, alone behind a gate
    of 2 bands)."""
    if alone is None or shared is None:
        return False
    return tile_decode(tile, shared) > ALONE_DECODE * tile_decode(tile, alone)
