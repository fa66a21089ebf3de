"""The layers made from the stored map, brought up to date after a run's tiles are committed:
Bayesian smoothing (:mod:`treesits_dask.outputs.smoothing`: whole changed tiles and the strips of
their neighbours that reach into them) and the overviews (:mod:`treesits_dask.outputs.overviews`:
the footprints of tiles whose values changed, level by level).

What is out of date is decided from the map alone: each tile's group holds what its smoothed
values and its overview footprint were made from (records of itself and its neighbours, the
smoothing parameters), so a run that was killed, a subset rerun, a tile that appears or new
smoothing parameters all leave work that the next run finds and does, without reading a scene.
Each tile's smoothing is one commit (with its new state); each overview level is one commit,
except the coarse levels whose stale chunks fit one task: those are made in one task and one
commit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..config import RunConfig
from ..outputs import geozarr, overviews, smoothing
from ..outputs.repo import MapRepo, write_tile_cogs
from ..outputs.schema import SMOOTHED_VARIABLES, OutputGrid
from ..outputs.store import level_paths

__all__ = ["DerivedWork", "derived_work", "smooth_params", "update_derived"]

log = logging.getLogger(__name__)

#: level chunks per overview task
_CHUNKS_PER_TASK = 16
#: attempts after the first of a derived-layer task: a read of the map that broke off (Icechunk
#: does not retry a manifest whose body was cut off) fails the task, and the task is idempotent
#: (a fork of the map in, a fork out), so Dask runs it again instead of failing the run
_RETRIES = 3


@dataclass
class DerivedWork:
    """What is out of date in the derived layers of a map."""

    #: tile -> None (the whole tile) or the neighbour offsets whose strips are stale
    smoothing: dict[str, list | None] = field(default_factory=dict)
    #: tiles whose footprint in the overviews is stale
    overviews: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.smoothing or self.overviews)


def smooth_params(config: RunConfig, grid: OutputGrid) -> smoothing.SmoothParams | None:
    """The smoothing parameters of ``config`` for the map's classes (None: no smoothing)."""
    if config.smoothing is None or "probability_smoothed" not in grid.variables():
        return None
    s = config.smoothing
    return smoothing.SmoothParams(
        s.window_size, s.neigh_fraction, s.smoothness_for(len(grid.class_names))
    )


def derived_work(
    attrs: dict[str, dict], grid: OutputGrid | None, params, levels: int
) -> DerivedWork:
    """What is out of date, from the tiles' attributes in the map (``levels``: the map's
    resolution levels; 0 or 1: no overviews)."""
    work = DerivedWork()
    if grid is None:
        return work
    records = {t: a["record"] for t, a in attrs.items() if "record" in a}
    states = {t: attrs[t].get(smoothing.STATE_ATTR) for t in records}
    if params is not None:
        work.smoothing = smoothing.smoothing_work(records, states, params)
    if levels > 1:
        for tile, record in sorted(records.items()):
            state = states[tile]
            if tile in work.smoothing:
                state = smoothing.smoothing_state(tile, records, params)
            new = overviews.overview_state(record, state, levels)
            if attrs[tile].get(overviews.STATE_ATTR) != new:
                work.overviews.append(tile)
    return work


def _overview_steps(regions, grid: OutputGrid, levels: int) -> list[list[tuple[int, list]]]:
    """The overview levels of a run in commits: ``[[(level, stale chunks)], ...]``, one level per
    commit while its stale chunks take more than one task, then all the coarser levels together
    (a level has at most as many stale chunks as the one before it)."""
    steps: list[list[tuple[int, list]]] = []
    for level in range(1, levels):
        g = geozarr.level_grid(grid, level)
        chunks = overviews.stale_chunks(regions, level, grid.chunk, (g.height, g.width))
        small = len(chunks) <= _CHUNKS_PER_TASK
        if small and steps and len(steps[-1][-1][1]) <= _CHUNKS_PER_TASK:
            steps[-1].append((level, chunks))
        else:
            steps.append([(level, chunks)])
    return steps


def update_derived(
    repo: MapRepo, config: RunConfig, client, run_id: str, lease, routing=None
) -> dict[str, list[str]]:
    """Make the out-of-date derived layers of the map again on the cluster of ``client`` and
    commit them (the lease is checked before each commit); COGs of the smoothed layers follow.
    Returns ``{"smoothed": tiles, "overviews": tiles}`` (what was done)."""
    from distributed import as_completed

    grid = repo.grid()
    levels = len(level_paths(repo.zarr_store()))
    params = smooth_params(config, grid)
    attrs = repo.tile_attributes()
    work = derived_work(attrs, grid, params, levels)
    done: dict[str, list[str]] = {}
    if not work:
        return done
    records = {t: a["record"] for t, a in attrs.items() if "record" in a}
    resources = (getattr(routing, "read", None) or None) if routing is not None else None
    new_states = {t: attrs[t].get(smoothing.STATE_ATTR) for t in records}
    cogs = []
    if work.smoothing:
        pending = {}
        for tile, changed in work.smoothing.items():
            session = repo.writable_session()
            region = MapRepo.region(tile, records[tile])
            future = client.submit(
                smoothing.smooth_tile, session.fork(), region, changed,
                smoothing.present_neighbours(tile, records), params, grid.chunk[0],
                key=f"smooth-{tile}-{run_id}", resources=resources, pure=False, retries=_RETRIES,
            )  # fmt: skip
            pending[future] = (tile, session)
        for future in as_completed(list(pending)):
            tile, session = pending.pop(future)
            fork = future.result()
            state = smoothing.smoothing_state(tile, records, params)
            lease.check()
            snapshot = repo.commit_derived(
                session, [fork], {tile: {smoothing.STATE_ATTR: state}}, f"smooth {tile}",
                {"smoothed": tile, "run": run_id},
            )  # fmt: skip
            new_states[tile] = state
            if config.cog:
                variables = [v for v in grid.variables() if v in SMOOTHED_VARIABLES]
                cogs.append(client.submit(
                    write_tile_cogs, config.output, snapshot, MapRepo.region(tile, records[tile]),
                    grid, records[tile]["record_id"], variables, state,
                    key=f"cog-smoothed-{tile}-{run_id}", pure=False, retries=_RETRIES,
                ))  # fmt: skip
        done["smoothed"] = sorted(work.smoothing)
        log.info("smoothed %d tile(s) (or their strips): %s", len(work.smoothing),
                 ", ".join(sorted(work.smoothing)))  # fmt: skip
    if work.overviews:
        regions = [MapRepo.region(t, records[t]) for t in work.overviews]
        variables = grid.variables()
        for group in _overview_steps(regions, grid, levels):
            level = group[-1][0]
            session = repo.writable_session()
            fork = session.fork()
            if len(group) > 1:  # the coarse levels, a few chunks each: one task, one commit
                tasks = {f"overview-{group[0][0]}-to-{level}": group}
            else:  # one level, _CHUNKS_PER_TASK chunks per task
                chunks = group[0][1]
                tasks = {
                    f"overview-{level}-{i}": [(level, chunks[i : i + _CHUNKS_PER_TASK])]
                    for i in range(0, len(chunks), _CHUNKS_PER_TASK)
                }
            futures = [
                client.submit(
                    overviews.downsample_levels,
                    fork,
                    steps,
                    variables,
                    key=f"{name}-{run_id}",
                    resources=resources,
                    pure=False,
                    retries=_RETRIES,
                )
                for name, steps in tasks.items()
            ]
            forks = client.gather(futures)
            states = {}
            if level == levels - 1:
                states = {
                    t: {overviews.STATE_ATTR: overviews.overview_state(
                        records[t], new_states.get(t), levels)}
                    for t in work.overviews
                }  # fmt: skip
            lease.check()
            name = f"{group[0][0]}" if len(group) == 1 else f"{group[0][0]}-{level}"
            repo.commit_derived(session, forks, states, f"overviews level {name}",
                                {"overviews": level, "run": run_id})  # fmt: skip
        done["overviews"] = list(work.overviews)
        log.info("overviews of %d tile(s) made again (%d levels)", len(work.overviews), levels - 1)
    client.gather(cogs)
    return done
