"""``run(config)``: the wiring of one run, and its scheduling.

Each stage owns its Dask layer: :func:`~treesits_dask.io.cube.tile_cube` reads,
:func:`~treesits_dask.pipeline.predict.predict_layer` predicts,
:func:`~treesits_dask.outputs.store.write_layer` writes, and :func:`tile_graph` only chains them.
The scheduling here keeps a bounded number of tiles in flight, writes a tile's COGs when its last
window is written, and its ledger record (:mod:`treesits_dask.state.ledger`) only after all of
its outputs.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time

import numpy as np

from ..config import RunConfig
from ..errors import InputDataError, TreesitsError
from ..io import discovery, masks, storage
from ..io.cube import days_since_epoch, tile_cube
from ..io.masks import open_mask
from ..io.remote import clear_gdal_cache
from ..outputs import cog, store
from ..state import ledger
from ..state.lease import Lease
from ..version import __version__
from .cluster import EnvPlugin, connect, worker_environment
from .plan import RunPlan, TilePlan, make_plan
from .predict import Inference, ModelPlugin, annotate, inference_stats, predict_layer
from .report import (
    RunResult,
    StageClock,
    collect_inference,
    performance_report,
    run_settings,
    write_summary,
)

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
        """All outputs and the ledger record of ``tile`` are written."""

    def tile_failed(self, tile: str, error: str) -> None:
        """``tile`` failed; the other tiles go on."""


def tile_graph(plan: RunPlan, tile: TilePlan):
    """Lazy dask array (windows_y, windows_x, 1) of per-window statistics; computing it reads,
    predicts and writes every window of the tile into the Zarr store."""
    cfg = plan.config
    # heterogeneous clusters: reads on CPU workers, inference only where GPU=1 is advertised
    with annotate({"CPU": 1} if cfg.read_on_cpu else None):
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
        gpu=cfg.gpu_task_share if cfg.gpu_group else False,
        inference=Inference.of(cfg),
    )
    return store.write_layer(
        packed, plan.store_url, tile.region, tile.layout, plan.output_grid.variables()
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
    whose ledger record matches their inputs are skipped (``force`` redoes them).  Raises
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
        settings=run_settings(config),
    )
    if not plan.tiles:
        log.info(
            "nothing to do: all %d tile(s) are up to date in %s", len(plan.skipped), config.output
        )
    else:
        _process(plan, client, cb, result, started, t0)
    result.seconds = time.perf_counter() - t0
    if result.failed:
        lines = "; ".join(f"{t}: {e}" for t, e in result.failed.items())
        raise RunError(
            f"{len(result.failed)} of {len(plan.tiles)} tile(s) failed ({lines}). The other tiles "
            "are finished; fix the input and run again (finished tiles are skipped)"
        )
    return result


def _worldcover_masks_to_build(config: RunConfig) -> list[str]:
    """The selected tiles without a mask, when masks are built from WorldCover (else none)."""
    if not config.mask_worldcover:
        return []
    tiles = discovery.select_tiles(config.cube, config.tiles)
    return masks.missing_masks(config.mask_dir, config.mask_name, tiles)


def _process(
    plan: RunPlan, client, cb: RunCallbacks, result: RunResult, started: dt.datetime, t0: float
) -> None:
    """Under the output's lease: create the store, process the tiles on the cluster, write the
    mosaics and the run report."""
    config = plan.config
    for t in plan.tiles:
        log.info("tile %s: process (%s)", t.tile, "; ".join(t.reasons) or "requested")
    store.check_writable(config.output)
    with Lease(config.output, ttl=config.lease_ttl):
        store.create_store(
            plan.store_url,
            plan.output_grid,
            attrs={
                "model_family": plan.card.family,
                "model": storage.basename(plan.spec.uri),
                "treesits_dask_version": __version__,
            },
        )
        run_id = started.strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
        result.report_dir = storage.join(config.output, "_runs", run_id)
        if client is None:
            with connect(config) as c:
                _run_reported(plan, c, cb, result)
        else:
            _run_reported(plan, client, cb, result)
        if config.cog and result.tiles:
            with_cogs = [
                t
                for t in [*plan.skipped, *(t.tile for t in plan.tiles)]
                if t in plan.skipped or t in result.tiles
            ]
            cog.write_mosaics(config.output, sorted(with_cogs))
        result.seconds = time.perf_counter() - t0
        write_summary(config.output, result, started)


def update(config: RunConfig, *, client=None, callbacks: RunCallbacks | None = None) -> RunResult:
    """:func:`run` as the scheduled driver uses it: only tiles whose scenes, mask, model or
    settings changed since their ledger record are processed (``result.reasons`` says why; a
    :meth:`RunCallbacks.planned` hook sees it before any work starts).  When nothing changed,
    listings and file metadata decide it: no pixel is read and no cluster is started."""
    return run(config, client=client, callbacks=callbacks)


def _run_reported(plan: RunPlan, client, cb: RunCallbacks, result: RunResult) -> None:
    """:func:`_run_tiles` inside a Dask performance report, published to ``result.report_dir``."""
    with performance_report(client, result.report_dir):
        clock = StageClock(client, result.stages)
        _run_tiles(plan, client, cb, result, clock)


class _Scheduler:
    """Submits the tiles of a plan, a bounded number at a time, and follows their futures:
    windows -> COGs (when the last window is written) -> ledger record."""

    def __init__(
        self, plan: RunPlan, client, cb: RunCallbacks, result: RunResult, clock: StageClock | None
    ):
        from distributed import as_completed

        self.plan, self.client, self.cb, self.result, self.clock = plan, client, cb, result, clock
        self.pending = list(plan.tiles)
        self.state: dict[str, dict] = {}
        self.owner: dict = {}
        self.ac = as_completed()

    def submit(self, tile: TilePlan) -> None:
        gpu = self.plan.config.gpu_group
        stats = tile_graph(self.plan, tile)
        # annotated graphs must not be optimised: fusion drops or merges the resource annotations
        futures = self.client.compute(
            list(stats.to_delayed(optimize_graph=not gpu).ravel()), optimize_graph=not gpu
        )
        self.state[tile.tile] = {
            "plan": tile,
            "left": len(futures),
            "stats": [],
            "t0": time.perf_counter(),
            "futures": futures,
        }
        for f in futures:
            self._follow(f, tile.tile, "window")

    def _follow(self, future, tile: str, kind: str) -> None:
        self.owner[future.key] = (tile, kind)
        self.ac.add(future)

    def fail(self, tile: str, exc: BaseException) -> None:
        st = self.state.pop(tile, None)
        if st is None:
            return
        self.client.cancel(st["futures"])
        msg = str(exc) if isinstance(exc, TreesitsError) else f"{type(exc).__name__}: {exc}"
        self.result.failed[tile] = msg
        log.error("tile %s failed: %s", tile, msg)
        self.cb.tile_failed(tile, msg)

    def finish(self, tile: str, cogs: dict) -> None:
        try:
            _finish(self.plan, self.state[tile], self.result, self.cb, tile, cogs)
        except TreesitsError as exc:
            self.fail(tile, exc)
        self.state.pop(tile, None)

    def window_written(self, tile: str, stats) -> None:
        st = self.state[tile]
        st["stats"].append(stats.reshape(-1))
        st["left"] -= 1
        self.cb.window_done(tile)
        if st["left"]:
            return
        cfg = self.plan.config
        if not cfg.cog:
            self.finish(tile, {})
            return
        f = self.client.submit(
            cog.write_tile_cogs,
            cfg.output,
            self.plan.store_url,
            st["plan"].region,
            self.plan.output_grid,
            pure=False,
            key=f"cog-{tile}-{time.time_ns()}",
        )
        st["futures"].append(f)
        self._follow(f, tile, "cog")

    def fill(self) -> None:
        while self.pending and len(self.state) < self.plan.config.tiles_in_flight:
            self.submit(self.pending.pop(0))

    def loop(self) -> None:
        self.fill()
        for future in self.ac:
            tile, kind = self.owner.pop(future.key, (None, None))
            if tile not in self.state:
                continue
            if future.status in ("error", "cancelled"):
                try:
                    future.result()
                except Exception as exc:  # noqa: BLE001 - reported per tile, other tiles go on
                    self.fail(tile, exc)
            elif kind == "window":
                self.window_written(tile, future.result())
            elif kind == "cog":
                self.finish(tile, future.result())
            if tile not in self.state:
                if self.clock is not None:
                    self.clock.pull()
                self.fill()


def _run_tiles(
    plan: RunPlan, client, cb: RunCallbacks, result: RunResult, clock: StageClock | None = None
) -> None:
    cfg = plan.config
    # GDAL/S3 settings on every worker (also of a cluster this run did not start, and ones that join
    # later); credentials stay in each worker's own environment
    client.register_plugin(EnvPlugin(worker_environment(cfg)))
    # workers that outlive a run must not serve scene bytes GDAL cached before files were replaced
    client.run(clear_gdal_cache)
    client.register_plugin(
        ModelPlugin(
            plan.spec,
            cfg.device,
            cfg.threads_per_worker,
            resource="GPU" if cfg.gpu_group else None,
            inference=Inference.of(cfg),
        )
    )
    cb.start(
        sum(plan.windows_per_tile(t) for t in plan.tiles), getattr(client, "dashboard_link", None)
    )
    _Scheduler(plan, client, cb, result, clock).loop()
    result.inference = collect_inference(client, inference_stats)


def _finish(
    plan: RunPlan, st: dict, result: RunResult, cb: RunCallbacks, tile: str, cogs: dict
) -> None:
    """Check that the inputs did not change while the tile was read, then write its ledger
    record."""
    tp: TilePlan = st["plan"]
    cfg = plan.config
    now = discovery.scene_table(cfg.cube, tile, cfg.sensors, tp.start, tp.end)
    fingerprint = ledger.tile_fingerprint(now, tp.start, tp.end, tp.mask.url if tp.mask else None)
    diff = ledger.changed_inputs(tp.fingerprint, fingerprint)
    if diff:
        raise InputDataError(
            f"the inputs of tile {tile} changed while it was processed ({'; '.join(diff)}); "
            "its outputs are not marked complete: run again to process the new state"
        )
    if fingerprint != tp.fingerprint:
        log.info(
            "tile %s: %s since it was planned; the next update will take them",
            tile,
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
        "seconds": round(time.perf_counter() - st["t0"], 3),
    }
    record = ledger.tile_record(
        tile, tp.fingerprint, plan.model_digest, plan.config_digest, tp.region, cogs, stats
    )
    ledger.write_record(cfg.output, tile, record)
    result.tiles[tile] = stats
    log.info(
        "tile %s: %d scenes, %d windows, %d pixels predicted, %.1f s",
        tile,
        stats["scenes"],
        stats["windows"],
        stats["pixels_predicted"],
        stats["seconds"],
    )
    cb.tile_done(tile, stats)
