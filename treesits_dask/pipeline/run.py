"""``run(config)``: the wiring of one run, and its scheduling.

Each stage owns its Dask layer: :func:`~treesits_dask.io.cube.tile_cube` reads,
:func:`~treesits_dask.pipeline.predict.predict_layer` predicts,
:func:`~treesits_dask.outputs.store.write_layer` writes, and :func:`tile_graph` only chains them.

The scheduling here keeps a bounded number of tiles in flight.  The windows of a tile are written
into forks of one session of the map repository (:mod:`treesits_dask.outputs.repo`); when its
last window is written, the driver checks that the tile's inputs did not change, merges the forks
and commits the tile's data and record together (a tile is complete in the map or absent), then
writes its COGs from that commit.  At the end: the mosaics, a version tag for the run, and
``run.json``, which is written whatever happens (also on SIGTERM).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
import traceback

import numpy as np

from ..config import RunConfig
from ..errors import InputDataError, TreesitsError
from ..io import discovery, masks, storage
from ..io.cube import days_since_epoch, tile_cube
from ..io.masks import open_mask
from ..io.remote import clear_gdal_cache
from ..outputs import cog, store
from ..outputs.repo import MapRepo, write_tile_cogs
from ..outputs.schema import OutputGrid
from ..state import ledger
from ..state.lease import Lease
from ..version import __version__
from .cluster import (
    EnvPlugin,
    Routing,
    TaskErrorLog,
    connect,
    declared_routing,
    needs_for,
    routing_for,
    wait_for_workers,
    worker_environment,
)
from .plan import RunPlan, TilePlan, make_plan
from .predict import ModelPlugin, annotate, predict_layer
from .report import RunResult, StageClock, performance_report, write_summary

__all__ = ["RunCallbacks", "RunError", "RunResult", "run", "tile_graph", "update"]

log = logging.getLogger(__name__)


class RunError(TreesitsError):
    """One or more tiles failed; the others finished."""


class RunCallbacks:
    """Progress hooks of :func:`run`; the CLI and notebooks pass their own (tqdm etc.)."""

    def planned(self, plan: RunPlan) -> None:
        """The run is planned: which tiles are processed (and why) and which are skipped."""

    def start(self, total_windows: int, dashboard_link: str | None) -> None:
        """Windows are about to be submitted to the cluster."""

    def window_done(self, tile: str) -> None:
        """One window of ``tile`` was predicted and written."""

    def tile_done(self, tile: str, stats: dict) -> None:
        """All outputs of ``tile`` are written and it is committed to the map."""

    def tile_failed(self, tile: str, error: str) -> None:
        """``tile`` failed; the other tiles go on."""


def tile_graph(plan: RunPlan, tile: TilePlan, session, routing: Routing | None = None):
    """The tasks of one tile: read, predict and write every window into ``session`` (a fork of
    the tile's session of the map).  Returns the keys of the write tasks (each results in the
    fork with the window's changes and the window's statistics) and the graph.

    ``routing`` (default: what the settings declare) gives the resource annotations: on
    heterogeneous clusters reads only where ``CPU`` is advertised, inference only where ``GPU``.
    """
    cfg = plan.config
    routing = routing or declared_routing(cfg) or Routing()
    with annotate(routing.read):
        mask = open_mask(tile.mask, tile.grid, tile.layout) if tile.mask else None
        cube = tile_cube(tile.scenes, tile.grid, tile.layout, cfg.qai_flags, mask=mask)
    days = days_since_epoch([s.date for s in tile.scenes])
    packed = predict_layer(
        cube.data,
        mask,
        days,
        plan.spec,
        plan.card.n_classes,
        cfg.device,
        cfg.batch_size,
        resources=routing.predict,
    )
    return store.write_layer(
        packed, session, tile.region, tile.layout, plan.output_grid.variables()
    )


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
    )
    for tile, error in result.failed.items():
        cb.tile_failed(tile, error)
    if plan.tiles:
        _process(plan, client, cb, result, started, t0)
    elif plan.invalid:  # nothing was created, no cluster was started
        raise _nothing_to_process(plan)
    elif plan.cogs_missing or plan.mosaics_stale:
        _repair(plan, result, started, t0)
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
            )  # fmt: skip
            job = _Job(plan, grid, run_id, lease)
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


def _repair(plan: RunPlan, result: RunResult, started: dt.datetime, t0: float) -> None:
    """Rebuild missing COGs of finished tiles from the map, and stale mosaics, on the driver: no
    scene is read and no cluster is started."""
    config = plan.config
    with Lease(config.output, ttl=config.lease_ttl) as lease:
        try:
            plan.repo.tag_unversioned()
            snapshot = plan.repo.repo.lookup_branch("main")
            grid = plan.repo.grid()
            for tile, record in plan.cogs_missing.items():
                lease.check()
                write_tile_cogs(config.output, snapshot, MapRepo.region(tile, record), grid,
                                    record["record_id"])  # fmt: skip
                result.cogs_rebuilt.append(tile)
            _finish_run(plan, result, _run_id(started), lease)
        finally:
            result.seconds = time.perf_counter() - t0
            write_summary(config.output, result, started)


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
        if tiles and cog.mosaic_tiles(config.output) != tiles:
            cog.write_mosaics(config.output, tiles)
    if result.tiles:
        result.version = plan.repo.tag_run(run_id)


def _run_reported(job: _Job, client, cb: RunCallbacks, result: RunResult) -> None:
    """:func:`_run_tiles` inside a Dask performance report, published to ``result.report_dir``."""
    with performance_report(client, result.report_dir):
        clock = StageClock(client, result.stages)
        _run_tiles(job, client, cb, result, clock)


class _Job:
    """What the tasks of a run share: the plan, the map's grid, the run id and the lease."""

    def __init__(self, plan: RunPlan, grid: OutputGrid, run_id: str, lease: Lease):
        self.plan, self.grid, self.run_id, self.lease = plan, grid, run_id, lease


class _Scheduler:
    """Submits the tiles of a plan, a bounded number at a time, and follows their futures:
    windows -> commit (driver) -> COGs; COG-only tiles go straight to their COGs."""

    def __init__(
        self, job: _Job, client, cb: RunCallbacks, result: RunResult, clock, routing: Routing
    ):
        from distributed import as_completed

        self.job, self.plan, self.routing = job, job.plan, routing
        self.client, self.cb, self.result, self.clock = client, cb, result, clock
        self.pending = list(self.plan.tiles)
        self.state: dict[str, dict] = {}
        self.owner: dict = {}
        self.ac = as_completed()

    def submit(self, tile: TilePlan) -> None:
        from dask.delayed import Delayed

        self.job.lease.check()  # a driver that lost its lease submits nothing more
        gpu = self.routing.gpu
        session, fork = self.plan.repo.tile_session()
        keys, graph = tile_graph(self.plan, tile, fork, self.routing)
        # annotated graphs must not be optimised: fusion drops or merges the resource annotations
        delayed = [Delayed(k, graph, layer=k[0]) for k in keys]
        futures = self.client.compute(delayed, optimize_graph=not gpu)
        self.state[tile.tile] = {
            "plan": tile, "left": len(futures), "stats": [], "forks": [], "session": session,
            "t0": time.perf_counter(), "futures": futures,
        }  # fmt: skip
        for f in futures:
            self._follow(f, tile.tile, "window")

    def submit_cogs(self, tile: str, record: dict, snapshot: str) -> None:
        """COGs of a finished tile from the map at ``snapshot``."""
        f = self.client.submit(
            write_tile_cogs, self.plan.config.output, snapshot, MapRepo.region(tile, record),
            self.job.grid, record["record_id"], pure=False, key=f"cog-{tile}-{time.time_ns()}",
        )  # fmt: skip
        self.state.setdefault(tile, {"futures": [], "t0": time.perf_counter()})
        self.state[tile]["futures"].append(f)
        self._follow(f, tile, "cog")

    def _follow(self, future, tile: str, kind: str) -> None:
        self.owner[future.key] = (tile, kind)
        self.ac.add(future)

    def fail(self, tile: str, exc: BaseException) -> None:
        st = self.state.pop(tile, None)
        if st is None:
            return
        self.client.cancel(st["futures"])
        if isinstance(exc, TreesitsError):  # an input problem: its message names file and fix
            msg = str(exc)
            log.error("tile %s failed: %s", tile, msg)
        else:  # a bug or an environment failure: keep the traceback (log and run report)
            msg = f"{type(exc).__name__}: {exc}"
            self.result.tracebacks[tile] = "".join(traceback.format_exception(exc))
            log.error("tile %s failed: %s", tile, msg, exc_info=exc)
        self.result.failed[tile] = msg
        self.cb.tile_failed(tile, msg)

    def windows_written(self, tile: str) -> None:
        """All windows of ``tile`` are in its forks: commit it, then its COGs."""
        st = self.state[tile]
        record = _checked_record(self.job, st)
        self.job.lease.check()  # a driver that lost its lease commits nothing
        snapshot = self.plan.repo.commit_tile(
            st["session"], st["forks"], tile, record,
            {"run": self.job.run_id, "reasons": list(st["plan"].reasons),
             "scenes": len(st["plan"].scenes), "model_digest": self.plan.model_digest,
             "config_digest": self.plan.config_digest},
        )  # fmt: skip
        st["record"] = record
        if self.plan.config.cog:
            self.submit_cogs(tile, record, snapshot)
        else:
            self.done(tile)

    def done(self, tile: str) -> None:
        st = self.state.pop(tile)
        if "record" in st:  # processed
            stats = {**st["record"]["stats"], "seconds": round(time.perf_counter() - st["t0"], 3)}
            self.result.tiles[tile] = stats
            log.info(
                "tile %s: %d scenes, %d windows, %d pixels predicted, %.1f s",
                tile, stats["scenes"], stats["windows"], stats["pixels_predicted"],
                stats["seconds"],
            )  # fmt: skip
            self.cb.tile_done(tile, stats)
        else:  # COGs rebuilt from the map
            self.result.cogs_rebuilt.append(tile)

    def on_result(self, tile: str, kind: str, future) -> None:
        st = self.state[tile]
        if kind == "window":
            fork, stats = future.result()
            st["forks"].append(fork)
            st["stats"].append(stats)
            st["left"] -= 1
            self.cb.window_done(tile)
            if not st["left"]:
                self.windows_written(tile)
        elif kind == "cog":
            future.result()
            self.done(tile)

    def fill(self) -> None:
        while self.pending and len(self.state) < self.plan.config.tiles_in_flight:
            self.submit(self.pending.pop(0))

    def loop(self) -> None:
        snapshot = None
        for tile, record in self.plan.cogs_missing.items():
            snapshot = snapshot or self.plan.repo.repo.lookup_branch("main")
            self.submit_cogs(tile, record, snapshot)
        self.fill()
        for future in self.ac:
            tile, kind = self.owner.pop(future.key, (None, None))
            if tile not in self.state:
                continue
            try:
                if future.status in ("error", "cancelled"):
                    future.result()  # raises the task's error
                self.on_result(tile, kind, future)
            except Exception as exc:  # noqa: BLE001 - reported per tile, other tiles go on
                self.fail(tile, exc)
            if tile not in self.state:
                if self.clock is not None:
                    self.clock.pull()
                self.fill()


def _run_tiles(job: _Job, client, cb: RunCallbacks, result: RunResult, clock=None) -> None:
    plan = job.plan
    cfg = plan.config
    # GDAL/S3 settings on every worker (also of a cluster this run did not start, and ones that join
    # later); credentials stay in each worker's own environment
    client.register_plugin(EnvPlugin(worker_environment(cfg)))
    client.register_plugin(TaskErrorLog())
    # the same routing on every kind of cluster (also a standing one behind scheduler_address),
    # and the groups it needs must have workers before any work waits for them
    routing = routing_for(cfg, client.scheduler_info(n_workers=-1)["workers"])
    wait_for_workers(client, needs_for(cfg, routing), cfg.workers_timeout)
    log.info(
        "routing: reads %s, inference %s", routing.read or "anywhere", routing.predict or "anywhere"
    )
    # workers that outlive a run must not serve scene bytes GDAL cached before files were replaced
    client.run(clear_gdal_cache)
    resource = next(iter(routing.predict)) if routing.predict else None
    client.register_plugin(ModelPlugin(plan.spec, cfg.device, cfg.threads_per_worker, resource))
    cb.start(
        sum(plan.windows_per_tile(t) for t in plan.tiles), getattr(client, "dashboard_link", None)
    )
    _Scheduler(job, client, cb, result, clock, routing).loop()


def _checked_record(job: _Job, st: dict) -> dict:
    """The record of a tile whose windows are written, after checking that its inputs did not
    change while it was read (else :class:`InputDataError`: nothing is committed)."""
    tp: TilePlan = st["plan"]
    plan = job.plan
    cfg = plan.config
    now = discovery.scene_table(cfg.cube, tp.tile, cfg.sensors, tp.start, tp.end)
    mask = ledger.mask_fingerprint(tp.mask.url if tp.mask else None, tp.fingerprint["mask"])
    fingerprint = ledger.tile_fingerprint(now, tp.start, tp.end, mask)
    diff = ledger.changed_inputs(tp.fingerprint, fingerprint)
    if diff:
        raise InputDataError(
            f"the inputs of tile {tp.tile} changed while it was processed ({'; '.join(diff)}); "
            "nothing of it was committed: run again to process the new state"
        )
    if fingerprint != tp.fingerprint:
        log.info(
            "tile %s: %s since it was planned; the next update will take them",
            tp.tile,
            "; ".join(ledger.compare({"fingerprint": tp.fingerprint}, fingerprint)),
        )
    arr = (
        np.array(st["stats"]).sum(axis=0) if st["stats"] else np.zeros(len(store.WINDOW_STATS), int)
    )
    stats = {
        "scenes": len(tp.scenes),
        "first_scene": str(tp.scenes[0].date),
        "last_scene": str(tp.scenes[-1].date),
        "windows": len(st["stats"]),
        "pixels_predicted": int(arr[0]),
    }
    return ledger.tile_record(
        tp.tile, tp.fingerprint, plan.model_digest, plan.config_digest, tp.region, stats,
        job.run_id,
    )  # fmt: skip
