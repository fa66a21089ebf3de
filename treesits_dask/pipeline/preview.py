"""How each tile of a run would be read, known before any cluster exists (``plan``'s ``reads``).

A run derives its read budget from the reading workers it finds (their memory limits and threads,
and the free local disk where they spill: :func:`~treesits_dask.pipeline.reading.read_budget`) and
plans each tile's read under it (:func:`~treesits_dask.io.bands.plan_reads`): in bands that decode
every block once, or, where a tile's bands of all scenes fit neither memory nor disk, in sections
of window columns or window by window, which decode blocks more than once (a 3000 px strips tile
of 600 scenes on this VM's default LocalCluster with 19 GiB free: twice).  A national run should
know that before it starts, so here the same budget is derived from the workers the settings
start: a LocalCluster's on this machine (its memory limit as Dask parses it, the free disk of
Dask's temporary directory), or the Kubernetes worker groups' limits and scratch volume.  For a
standing cluster (``scheduler_address``) the workers are known only once a run connects.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from ..config import RunConfig
from ..config.kube_resources import parse_quantity
from ..io.bands import ReadPlan
from ..io.layouts import layout_runs
from .cluster import Routing, declared_routing
from .memory import expected_workers
from .reading import (
    STATE_SHARE,
    ReadBudget,
    alone_budget,
    free_disk,
    memory_and_threads,
    plans_decode,
    read_alone,
    read_budget,
    read_scenes,
    readers,
    reading_workers,
    routed_workers,
    stages_states,
    stream_sections,
    tile_bytes,
    tile_read_plans,
    tile_scenes,
)

__all__ = [
    "DECODE_ONCE",
    "STATE_SHARE",
    "budgets_on",
    "declared_workers",
    "decode_warnings",
    "plan_mode",
    "read_preview",
    "reads_report",
    "state_warnings",
    "tile_reads",
]

#: a tile's read "decodes once" where its plan decodes at most this many times its uncompressed
#: bytes (COG blocks at the tile's edge are decoded whole: 3072 of 3000 px is 1.05)
DECODE_ONCE = 1.1

#: the most free disk per reading worker searched for one on which a tile decodes once (GiB)
_MOST_DISK = 1 << 16


def declared_workers(config: RunConfig) -> tuple[dict[str, dict], dict[str, int], str] | None:
    """The workers the settings start (:func:`~treesits_dask.pipeline.memory.expected_workers`:
    a Kubernetes group with the workers it starts with), the free local disk of each where it
    spills, and where that disk is (for the messages); None for a standing cluster
    (``scheduler_address``), whose workers only a run that connects to it finds.

    A LocalCluster's workers spill under Dask's temporary directory on this machine; Kubernetes
    workers on their scratch volume (``kubernetes.scratch_size``, which a run caps the free disk
    with)."""
    workers = expected_workers(config)
    if workers is None:
        return None
    if config.cluster == "kubernetes":
        scratch = int(parse_quantity(config.kubernetes.scratch_size, "scratch_size"))
        return workers, dict.fromkeys(workers, scratch), "kubernetes.scratch_size"
    import dask

    where = dask.config.get("temporary-directory", None) or tempfile.gettempdir()
    existing = os.path.abspath(where)
    while not os.path.exists(existing):  # made by the first worker: its disk is its parent's
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    return workers, dict.fromkeys(workers, free), where


def plan_mode(plan: ReadPlan) -> str:
    """How a :class:`~treesits_dask.io.bands.ReadPlan` reads its tile, in words that follow
    "read"."""
    if plan.aligned:
        return "in chunks of whole blocks"
    if plan.by_window:
        return "window by window"
    if plan.stream:
        how = f"in {plan.sections} sections of window columns" if plan.sections > 1 else "in bands"
        n = len(plan.batches)
        return f"{how}, streamed through the model in {n} batch{'es' if n > 1 else ''} of scenes"
    how = f"in {plan.sections} sections of window columns" if plan.sections > 1 else "in bands"
    if plan.gate:
        how += f", {plan.gate} band{'s' if plan.gate > 1 else ''} at a time behind a gate"
    if plan.spills:
        how += ", pieces to local disk beyond memory"
    return how


def budgets_on(config: RunConfig, workers: dict, routing: Routing):
    """A function of free local disk (bytes per reading worker) to the read budgets a run derives
    from ``workers`` (``scheduler_info()["workers"]``) with that disk: (a tile's share of a reading
    worker, :func:`~treesits_dask.pipeline.reading.read_budget`; the whole worker's where a tile
    is read alone, :func:`~treesits_dask.pipeline.reading.alone_budget`)."""

    def on(free: int) -> tuple[ReadBudget, ReadBudget | None]:
        disks, settings = dict.fromkeys(workers, free), config
        if config.cluster == "kubernetes":  # a run caps the free disk with the scratch volume
            scratch = config.kubernetes.model_copy(update={"scratch_size": str(free)})
            settings = config.model_copy(update={"kubernetes": scratch})
        return (
            read_budget(settings, workers, routing, disks),
            alone_budget(settings, workers, routing, disks),
        )

    return on


def _decode(tile, shared: ReadBudget, alone: ReadBudget | None) -> tuple[tuple, bool, int]:
    """The read plans of ``tile`` as a run picks them (with the whole reading worker where it is
    read alone; :func:`~treesits_dask.pipeline.reading.tile_read_plans`: one, or one per file
    layout), whether it is read alone, and the bytes they decode by the plans' count (of each
    scene's blocks in its own layout)."""
    by_itself = read_alone(tile, shared, alone)
    plans = tile_read_plans(tile, alone if by_itself else shared)
    return plans, by_itself, plans_decode(tile, plans)


#: how :func:`_mode` names a streamed tile in several file layouts read in one plan (what
#: :func:`decode_warnings` gives its own reason for)
_ONE_PLAN = "in one plan for all its layouts"


def _mode(plans: tuple) -> str:
    """How a tile read by ``plans`` (:func:`_decode`) is read, in words that follow "read"
    (:func:`plan_mode`): where its scenes are in more than one file layout, each layout's part,
    or where it is streamed, each stage (a run of scenes in one layout), or the plan of most of
    them where it streams in one plan for all."""
    first = plans[0][2]
    if len(plans) == 1:
        return plan_mode(first)
    shapes = [
        f"{n} scenes in {g.block_shape[0]} x {g.block_shape[1]} px blocks" for g, n, _ in plans
    ]
    if first.stream and all(p is first for _, _, p in plans):
        return f"{plan_mode(first)}, {_ONE_PLAN} ({', '.join(shapes)})"
    if first.stream:
        return f"in {len(plans)} stages, one per run of scenes in one file layout: " + "; ".join(
            f"{where} {plan_mode(p)}" for where, (_, _, p) in zip(shapes, plans, strict=True)
        )
    return "; ".join(
        f"{where} {plan_mode(p)}" for where, (_, _, p) in zip(shapes, plans, strict=True)
    )


def _disk_to_decode_once(tile, on) -> int | None:
    """The least free local disk per reading worker (whole GiB) on which ``tile``'s read plan
    decodes once (:data:`DECODE_ONCE`) under the budgets ``on`` gives (:func:`budgets_on`); None
    where not even :data:`_MOST_DISK` GiB do."""

    def once(gib: int) -> bool:
        return _decode(tile, *on(gib << 30))[2] <= DECODE_ONCE * tile_bytes(tile)

    if not once(_MOST_DISK):
        return None
    low, high = 0, _MOST_DISK  # once(high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if once(mid) else (mid, high)
    return high


def tile_reads(tiles, shared: ReadBudget, alone: ReadBudget | None, on) -> dict[str, dict]:
    """Per tile of ``tiles`` (:class:`~treesits_dask.pipeline.plan.TilePlan`), how a run with the
    read budgets ``shared`` and ``alone`` (:func:`budgets_on`) reads it: its read plan in words
    (``mode``, :func:`plan_mode`), whether it is read with no other tile beside it on its reading
    worker (``read_alone``), the bytes it decodes by the plan's count over its uncompressed bytes
    (``decoded_over_tile``, before masks and the QAI screening skip blocks), and where that is
    more than :data:`DECODE_ONCE`, the free local disk per reading worker on which it would decode
    once under the budgets ``on`` gives (``decode_once_free_disk_gib``); where it is streamed
    through the model, the most memory its windows' model states hold at once
    (``stream_state_gib``, of its mask's pixels:
    :func:`~treesits_dask.pipeline.reading.tile_states`) and the windows it is read and stepped
    in (``stream_chunk``, :attr:`~treesits_dask.io.bands.ReadPlan.windows`, the outputs rechunked
    to the map's windows).  Tiles of one shape and scene count are planned once (SBERT's masked
    tiles also by whether they stream and in how many sections, :func:`_streamed_as`); the
    states are each tile's."""
    out: dict[str, dict] = {}
    seen: dict[tuple, tuple[dict, ReadPlan | None, tuple]] = {}
    for tile in tiles:
        parts = tuple((p.grid.block_shape, len(p.indices))
                      for p in layout_runs(tile_scenes(tile), tile.grid))  # fmt: skip
        key = (tile.grid.height, tile.grid.width, tuple(tile.grid.block_shape), tile.grid.count,
               tile.reading.shape, len(tile.scenes), read_scenes(tile), tile.stream,
               parts)  # fmt: skip
        if tile.stream in ("fallback", "required") and tile.mask is not None:
            key += _streamed_as(tile, shared, alone)
        if key not in seen:
            plans, by_itself, decoded = _decode(tile, shared, alone)
            read = plans[0][2]  # a streamed tile's plan, or its first stage's (parts: not streamed)
            entry = {
                "mode": _mode(plans),
                "read_alone": by_itself,
                "decoded_over_tile": round(decoded / tile_bytes(tile), 3),
            }
            if decoded > DECODE_ONCE * tile_bytes(tile):
                entry["decode_once_free_disk_gib"] = _disk_to_decode_once(tile, on)
            if read is not None and read.stream:
                entry["stream_chunk"] = list((read.windows or tile.reading).shape)
            seen[key] = (entry, read, plans)
        entry, read, plans = seen[key]
        if read is not None and read.stream:  # of the tile's mask's pixels, two stages' at once
            own = [p for _, _, p in plans]
            if all(p is read for p in own):  # one plan for all its layouts, or one layout
                own = [read]
            states = stages_states(tile, own)
            entry = entry | {"stream_state_gib": round(states / 2**30, 2)}
        out[tile.tile] = entry
    return out


def _streamed_as(tile, shared: ReadBudget, alone: ReadBudget | None) -> tuple:
    """The fewest sections in which the model states of ``tile`` streamed (of its mask's pixels)
    fit the room of ``shared`` and of ``alone`` (:func:`stream_sections`): all that SBERT's plan
    (``fallback``, ``required``) takes from its mask, whatever the free disk
    (:func:`_disk_to_decode_once`).  Planned in full per tile, 100 masked
    SBERT tiles that decode more than once took 23.7 s to plan, against 0.16 s for one."""
    return tuple(stream_sections(tile, b) if b is not None else None for b in (shared, alone))


def reads_report(
    config: RunConfig,
    workers: dict,
    disks: dict,
    routing: Routing,
    where: str,
    tiles,
    budgets: tuple[ReadBudget, ReadBudget | None] | None = None,
) -> dict:
    """The read budget of ``workers`` (``scheduler_info()["workers"]``) with the free local disk
    ``disks`` (by worker) under ``routing`` (``where``: what that disk is, for the messages),
    the inference workers (how many, the smallest memory limit: what :func:`state_warnings`
    weighs streamed tiles' model states against), and :func:`tile_reads` of ``tiles`` under it
    (``tiles``).  ``budgets``: the (shared, alone)
    budgets a run already derived from them (None: derived here)."""
    shared, alone = budgets or (
        read_budget(config, workers, routing, disks),
        alone_budget(config, workers, routing, disks),
    )
    free = free_disk(config, readers(workers, routing), disks)
    gib = 2**30
    import psutil

    total = psutil.virtual_memory().total  # what a worker without a limit counts with
    inferring = routed_workers(list(workers.values()), routing.predict)
    smallest = min((memory_and_threads(w, total)[0] for w in inferring), default=total)
    return {
        "known": True,
        "reading_workers": reading_workers(workers, routing),
        "inference_workers": max(1, len(inferring)),
        "inference_memory_gib": round(smallest / gib, 2),
        "task_mib": round(shared.task_bytes / 2**20),
        "held_gib": round((shared.held_bytes or 0) / gib, 1),
        "spill_gib": round((shared.spill_bytes or 0) / gib, 1),
        "free_disk_gib": round(free / gib, 1),
        "disk": where,
        "tiles_in_flight": config.tiles_in_flight,
        "tiles": tile_reads(tiles, shared, alone, budgets_on(config, workers, routing)),
    }


def read_preview(plan) -> dict:
    """:func:`reads_report` of the tiles of ``plan`` (a
    :class:`~treesits_dask.pipeline.plan.RunPlan`) on the cluster its settings start
    (:func:`declared_workers`); for a standing cluster ``known`` false and why."""
    config = plan.config
    declared = declared_workers(config)
    if declared is None:
        return {
            "known": False,
            "why": "the workers of a standing cluster (scheduler_address) are known only once a "
            "run connects to it; the run logs the tiles whose read would decode more than once",
        }
    workers, disks, where = declared
    return reads_report(config, workers, disks, declared_routing(config), where, plan.tiles)


#: tiles a warning of :func:`decode_warnings` names before it counts the rest
_NAMED = 5


def _named(tiles: list[str]) -> str:
    return ", ".join(tiles[:_NAMED]) + (
        f" and {len(tiles) - _NAMED} more" if len(tiles) > _NAMED else ""
    )


def decode_warnings(reads: dict) -> list[str]:
    """A line per read plan of a :func:`reads_report` that decodes more than once, for all tiles
    read so (a national run's tiles of one scene count share one): the tiles (the first
    :data:`_NAMED`, and how many more), how they are read, how much they decode and what would
    have them decode once."""
    lines: list[str] = []
    if not reads.get("known"):
        return lines
    alike: dict[tuple, list[str]] = {}
    for tile, entry in reads["tiles"].items():
        if entry["decoded_over_tile"] > DECODE_ONCE:
            # a streamed tile's entry holds its windows' shape, a list
            key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                               for k, v in entry.items()))  # fmt: skip
            alike.setdefault(key, []).append(tile)
    for key, tiles in alike.items():
        entry = dict(key)
        need = entry.get("decode_once_free_disk_gib")
        one = len(tiles) == 1
        fix = "give the reading workers more memory"
        if _ONE_PLAN in entry["mode"]:  # streamed: see stream_stages
            fix = (
                "its scenes change file layout too often for a stage per run of one layout to "
                "pay (io.layouts.STAGE_COST), and one layout's blocks are decoded again where "
                "the other's plan cuts them: files of one layout (its strips rewritten as "
                f"COGs) would not be; or {fix}"
            )
        if need is not None:
            fix = (
                f"with {need} GiB of free local disk per reading worker ({reads['disk']}, now "
                f"{reads['free_disk_gib']} GiB) {'it' if one else 'they'} would decode once; "
                f"or {fix}"
            )
        if not entry["read_alone"] and reads["reading_workers"] < reads["tiles_in_flight"]:
            fix += " or fewer tiles in flight each (tiles_in_flight)"
        named = _named(tiles)
        lines.append(
            f"{'tile' if one else f'{len(tiles)} tiles'} {named}: read {entry['mode']}, "
            f"{'it decodes' if one else 'each decodes'} {entry['decoded_over_tile']:.2f} times "
            f"its bytes by the plan's count; {fix}, or read fewer scenes "
            "per run"
        )
    return lines


def state_warnings(reads: dict) -> list[str]:
    """A line per model-state size of a :func:`reads_report`'s streamed tiles whose states, as
    many tiles as ``tiles_in_flight`` gives an inference worker, would fill more than
    :data:`STATE_SHARE` of the smallest inference worker's memory limit (the pixels of each
    tile's mask, or every pixel): Dask would write them to disk and back between batches of
    scenes."""
    lines: list[str] = []
    if not reads.get("known") or "inference_memory_gib" not in reads:
        return lines
    per_worker = -(-reads["tiles_in_flight"] // max(1, reads["inference_workers"]))
    room = STATE_SHARE * reads["inference_memory_gib"]
    alike: dict[float, list[str]] = {}
    for tile, entry in reads["tiles"].items():
        states = entry.get("stream_state_gib")
        if states is not None and states * per_worker > room:
            alike.setdefault(states, []).append(tile)
    for states, tiles in alike.items():
        one = len(tiles) == 1
        whose = "its" if one else "each one's"
        lines.append(
            f"{'tile' if one else f'{len(tiles)} tiles'} {_named(tiles)}: streamed through the "
            f"model, {whose} windows' model states hold up to {states} GiB at once, "
            f"{per_worker} tile(s) in flight per inference worker: more than "
            f"{STATE_SHARE:.0%} of an inference worker's {reads['inference_memory_gib']} GiB, so "
            "Dask would write them to disk and read them back between batches of scenes; give "
            "the inference workers more memory, or fewer tiles in flight each (tiles_in_flight)"
        )
    return lines
