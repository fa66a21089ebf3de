"""``run(config)``: the wiring of one run, from its plan to its report.

Each stage owns its Dask layer: :func:`~treesits_dask.io.cube.tile_cube` reads,
:func:`~treesits_dask.pipeline.predict.predict_layer` predicts,
:func:`~treesits_dask.outputs.store.write_layer` writes, and :func:`tile_graph` only chains them.

The scheduling (:mod:`treesits_dask.pipeline.schedule`) keeps a bounded number of tiles in
flight.  The windows of a tile are written into forks of one session of the map repository
(:mod:`treesits_dask.outputs.repo`), merged into it as they come back; when its last window is
written, the driver checks that the tile's inputs did not change and commits the tile's data and
record together (a tile is complete in the map or absent), then writes its COGs from that commit.
Here: the lease, the map's layout, at the end the mosaics and a version tag for the run, and
``run.json``, which is written whatever happens (also on SIGTERM).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time

from ..config import RunConfig
from ..errors import InputDataError, TreesitsError
from ..io import discovery, masks, storage
from ..outputs import cog
from ..outputs.repo import MapRepo, stale_cogs, write_tile_cogs
from ..state.lease import Lease
from ..version import __version__
from .cluster import (
    connect,
    worker_environment,
)
from .plan import RunPlan, make_plan
from .postprocess import update_derived
from .report import (
    RunResult,
    StageClock,
    performance_report,
    run_settings,
    write_summary,
)
from .schedule import Job, RunCallbacks, run_tiles, tile_graph

__all__ = ["RunCallbacks", "RunError", "RunResult", "run", "tile_graph", "update"]

log = logging.getLogger(__name__)


class RunError(TreesitsError):
    """One or more tiles failed; the others finished."""


def run(
    config: RunConfig,
    *,
    client=None,
    callbacks: RunCallbacks | None = None,
    plan: RunPlan | None = None,
) -> RunResult:
    """Run the whole job described by ``config``; returns per-tile statistics.

    With ``mask_worldcover``, missing forest masks are built first, on the same cluster.  Tiles
    whose record in the map matches their inputs are skipped (``force`` redoes them); their
    missing COGs and mosaics are rebuilt from the map without reading a scene.  Raises
    :class:`RunError` (after finishing the other tiles) when any tile failed.  ``client``: an
    existing Dask client (default: the cluster ``config`` describes, started and closed here).
    """
    t0 = time.perf_counter()
    started = dt.datetime.now(dt.UTC)
    cb = callbacks or RunCallbacks()
    storage.apply_environment(worker_environment(config))
    tiles_without_mask = _worldcover_masks_to_build(config)
    if tiles_without_mask:
        if client is None:  # masks are built on the cluster of the run
            with connect(config) as c:
                return run(config, client=c, callbacks=callbacks)
        masks.ensure_masks(
            config.mask_dir,
            config.mask_name,
            tiles_without_mask,
            config.mask_worldcover,
            config.cube,
            config.mask_classes,
            client=client,
        )
        plan = None  # the new masks are inputs of their tiles: plan again
    plan = plan or make_plan(config)
    if hasattr(cb, "planned"):  # callbacks that do not subclass RunCallbacks may lack this hook
        cb.planned(plan)
    result = RunResult(
        output=config.output,
        skipped=dict(plan.skipped),
        reasons={t.tile: list(t.reasons) for t in plan.tiles},
        failed={t: str(e) for t, e in plan.invalid.items()},
        settings=run_settings(config),
    )
    for tile, error in result.failed.items():
        cb.tile_failed(tile, error)
    if plan.tiles:
        _process(plan, client, cb, result, started, t0)
    elif plan.invalid:  # nothing was created, no cluster was started
        raise _nothing_to_process(plan)
    elif plan.cogs_missing or plan.mosaics_stale or plan.derived:
        _repair(plan, client, result, started, t0)
    else:
        log.info(
            "nothing to do: all %d tile(s) are up to date in %s", len(plan.skipped), config.output
        )
    result.seconds = time.perf_counter() - t0
    if result.failed:
        lines = "; ".join(f"{t}: {e}" for t, e in result.failed.items())
        raise RunError(
            f"{len(result.failed)} of {len(plan.tiles) + len(plan.invalid)} tile(s) failed "
            f"({lines}). The other tiles are finished; fix the input and run again (finished "
            "tiles are skipped)"
        )
    return result


def update(config: RunConfig, *, client=None, callbacks: RunCallbacks | None = None) -> RunResult:
    """:func:`run` as the scheduled driver uses it: only tiles whose scenes, mask, model or
    settings changed since their record are processed (``result.reasons`` says why; a
    :meth:`RunCallbacks.planned` hook sees it before any work starts).  When nothing changed,
    listings and file metadata decide it: no pixel is read and no cluster is started."""
    return run(config, client=client, callbacks=callbacks)


def _nothing_to_process(plan: RunPlan) -> TreesitsError:
    """The error of a run none of whose tiles can be processed: the tile's own error, or one
    that names every tile and its problem."""
    if len(plan.invalid) == 1:
        return next(iter(plan.invalid.values()))
    lines = "; ".join(f"{t}: {e}" for t, e in plan.invalid.items())
    return InputDataError(
        f"none of the {len(plan.invalid)} tile(s) to process can be processed: {lines}. Nothing "
        "was written; fix the inputs and run again"
    )


def _worldcover_masks_to_build(config: RunConfig) -> list[str]:
    """The selected tiles without a mask, when masks are built from WorldCover (else none)."""
    if not config.mask_worldcover:
        return []
    tiles = discovery.select_tiles(config.cube, config.tiles)
    return masks.missing_masks(config.mask_dir, config.mask_name, tiles)


def _run_id(started: dt.datetime) -> str:
    return started.strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"


def _process(
    plan: RunPlan, client, cb: RunCallbacks, result: RunResult, started: dt.datetime, t0: float
) -> None:
    """Under the output's lease: create or extend the map, process the tiles on the cluster,
    then the mosaics, the run's version tag and the run report (written whatever happens)."""
    config = plan.config
    for t in plan.tiles:
        log.info("tile %s: process (%s)", t.tile, "; ".join(t.reasons) or "requested")
    with Lease(config.output, ttl=config.lease_ttl) as lease:
        run_id = _run_id(started)
        result.report_dir = storage.join(config.output, "_runs", run_id)
        try:
            plan.repo.tag_unversioned()  # commits of a driver killed before its version tag
            grid = plan.repo.ensure_layout(
                plan.output_grid,
                {"model_family": plan.card.family, "model": storage.basename(plan.spec.uri),
                 "treesits_dask_version": __version__},
                plan.model_description(),
                tile_px=(plan.tiles[0].region.height, plan.tiles[0].region.width),
            )  # fmt: skip
            job = Job(plan, grid, run_id, lease)
            if client is None:
                with connect(config) as c:
                    _run_reported(job, c, cb, result)
            else:
                _run_reported(job, client, cb, result)
            _finish_run(plan, result, run_id, lease)
        except BaseException as exc:  # a signal, a lost lease...: say so in run.json, then stop
            result.interrupted = f"{type(exc).__name__}: {exc}"
            _tag_committed(plan, result, run_id)
            raise
        finally:
            result.seconds = time.perf_counter() - t0
            write_summary(config.output, result, started)


def _repair(plan: RunPlan, client, result: RunResult, started: dt.datetime, t0: float) -> None:
    """Bring finished tiles up to date without reading a scene: their derived layers (smoothing,
    overviews; on the cluster, started only for them), then missing COGs (from the map, on the
    driver) and stale mosaics."""
    config = plan.config
    run_id = _run_id(started)
    with Lease(config.output, ttl=config.lease_ttl) as lease:
        try:
            plan.repo.tag_unversioned()
            if plan.derived:
                plan.repo.ensure_layout(plan.output_grid, {})  # layers enabled since
                if client is None:
                    with connect(config) as c:
                        result.postprocessed = update_derived(plan.repo, config, c, run_id, lease)
                else:
                    result.postprocessed = update_derived(plan.repo, config, client, run_id, lease)
            snapshot = plan.repo.repo.lookup_branch("main")
            grid = plan.repo.grid()
            attrs = plan.repo.tile_attributes()
            for tile, record in plan.cogs_missing.items():
                lease.check()
                # all COGs of the tile, or only the smoothed ones when only they are stale
                variables = stale_cogs(cog.cog_manifest(config.output, tile), attrs[tile], grid)
                write_tile_cogs(
                    config.output, snapshot, MapRepo.region(tile, record), grid,
                    record["record_id"], variables or None, attrs[tile].get("smoothing"),
                )  # fmt: skip
                result.cogs_rebuilt.append(tile)
            _finish_run(plan, result, run_id, lease)
        finally:
            result.seconds = time.perf_counter() - t0
            write_summary(config.output, result, started)


def _run_reported(job: Job, client, cb: RunCallbacks, result: RunResult) -> None:
    """:func:`~treesits_dask.pipeline.schedule.run_tiles` inside a Dask performance report,
    published to ``result.report_dir``."""
    with performance_report(client, result.report_dir):
        clock = StageClock(client, result.stages)
        run_tiles(job, client, cb, result, clock)


def _tag_committed(plan: RunPlan, result: RunResult, run_id: str) -> None:
    """An interrupted run's committed tiles are a version too (never fails)."""
    if result.tiles and result.version is None:
        try:
            result.version = plan.repo.tag_run(run_id)
        except Exception as exc:  # noqa: BLE001 - the run is already failing for another reason
            log.warning("could not tag the version of run %s: %s", run_id, exc)


def _finish_run(plan: RunPlan, result: RunResult, run_id: str, lease: Lease) -> None:
    """Mosaics of every tile with complete COGs, and the version tag of the run."""
    config = plan.config
    lease.check()
    if config.cog:
        tiles = sorted({*plan.cogs_done, *result.cogs_rebuilt, *result.tiles})
        variables = plan.repo.grid().variables()
        if tiles and not cog.mosaics_hold(config.output, tiles, variables):
            cog.write_mosaics(config.output, tiles)
    if result.tiles or result.postprocessed:
        result.version = plan.repo.tag_run(run_id)
