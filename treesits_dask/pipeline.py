"""``run(config)``: wires discovery -> cube -> predict -> sinks on a Dask cluster.  Holds no logic
of its own beyond scheduling: a bounded number of tiles in flight, one task chain per window.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import __version__, discovery, ledger, sinks, storage
from .config import RunConfig
from .cube import days_since_epoch, open_cube, plan_windows
from .errors import InputDataError, TreesitsError
from .masks import open_mask
from .plan import RunPlan, TilePlan, make_plan
from .predict import ModelPlugin, get_predictor, pack_outputs, predict_block, unpack_outputs

__all__ = ["run", "tile_graph", "RunResult", "RunError"]

log = logging.getLogger(__name__)

#: per-window statistics returned by the write tasks
_STATS = ("pixels_predicted",)

#: task-name prefixes -> stage of the run report (see :func:`stage_seconds`)
_STAGES = {"read": "read", "mask": "mask", "predict_packed": "predict", "predict_packed_nomask": "predict",
           "write": "write", "cog": "cog"}


class RunError(TreesitsError):
    """One or more tiles failed; the others finished."""


@dataclass
class RunResult:
    output: str
    tiles: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    #: seconds of task compute time per stage (read, mask, predict, write, cog), summed over threads
    stages: dict[str, dict] = field(default_factory=dict)
    #: ``<output>/_runs/<run id>/``: this run's ``run.json`` and Dask performance report
    report_dir: str | None = None

    @property
    def pixels_predicted(self) -> int:
        return sum(t["pixels_predicted"] for t in self.tiles.values())


def _predict_packed(block, mask, days, spec, device, batch_size):
    predictor = get_predictor(spec, device)
    return pack_outputs(predict_block(block, mask, days, predictor, batch_size=batch_size))


def _predict_packed_nomask(block, days, spec, device, batch_size):
    return _predict_packed(block, None, days, spec, device, batch_size)


def _write_packed(packed, store_url, rows, cols, variables):
    sinks.write_window(store_url, rows, cols, unpack_outputs(packed, variables))
    c = packed.shape[0] - 3
    predicted = int(np.count_nonzero(packed[c + 2] != 255))
    return np.array([[[predicted]]], dtype=np.int64)


def _annotate(resources: dict | None):
    import contextlib

    import dask

    return dask.annotate(resources=resources) if resources else contextlib.nullcontext()


def _predict_layer(data, mask, n_out: int, common: dict):
    import dask.array as da

    meta = np.empty((0, 0, 0), np.float32)
    if mask is not None:
        return da.blockwise(_predict_packed, "kyx", data, "tbyx", mask, "yx", new_axes={"k": n_out},
                            dtype=np.float32, concatenate=True, meta=meta, **common)
    return da.blockwise(_predict_packed_nomask, "kyx", data, "tbyx", new_axes={"k": n_out},
                        dtype=np.float32, concatenate=True, meta=meta, **common)


def tile_graph(plan: RunPlan, tile: TilePlan):
    """Lazy dask array (windows_y, windows_x, 3) of per-window statistics; computing it reads,
    predicts and writes every window of the tile into the Zarr store."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    cfg = plan.config
    shape = plan.window_shape
    # heterogeneous clusters: reads on CPU workers, inference only where GPU=1 is advertised
    with _annotate({"CPU": 1} if cfg.read_on_cpu else None):
        mask = open_mask(tile.mask, tile.grid, shape) if tile.mask else None
        cube = open_cube(tile.scenes, tile.grid, shape, cfg.qai_flags, mask=mask)
    days = days_since_epoch([s.date for s in tile.scenes])
    n_out = plan.card.n_classes + 3
    common = dict(days=days, spec=plan.spec, device=cfg.device, batch_size=cfg.batch_size)
    with _annotate({"GPU": 1} if cfg.gpu_group else None):
        packed = _predict_layer(cube.data, mask, n_out, common)
    windows = plan_windows(tile.grid, shape)
    region = tile.region
    variables = plan.output_grid.variables()
    name = f"write-{tile.tile}-" + tokenize(packed.name, plan.store_url, region)
    dsk = {}
    for i, row in enumerate(windows):
        for j, w in enumerate(row):
            rows = slice(region.row_off + w.row_off, region.row_off + w.row_off + w.height)
            cols = slice(region.col_off + w.col_off, region.col_off + w.col_off + w.width)
            dsk[(name, i, j, 0)] = (_write_packed, (packed.name, 0, i, j), plan.store_url, rows, cols, variables)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[packed])
    chunks = ((1,) * len(windows), (1,) * len(windows[0]), (len(_STATS),))
    return da.Array(graph, name, chunks, dtype=np.int64)


class _Callbacks:
    """Progress hooks; the CLI and notebooks pass their own (tqdm etc.)."""

    def start(self, total_windows: int, dashboard_link: str | None) -> None: ...
    def window_done(self, tile: str) -> None: ...
    def tile_done(self, tile: str, stats: dict) -> None: ...
    def tile_failed(self, tile: str, error: str) -> None: ...


def run(
    config: RunConfig,
    *,
    client=None,
    callbacks: _Callbacks | None = None,
    plan: RunPlan | None = None,
) -> RunResult:
    """Run the whole job described by ``config``; returns per-tile statistics.

    Tiles whose ledger record matches their inputs are skipped (``force`` redoes them).  Raises
    :class:`RunError` (after finishing the other tiles) when any tile failed.
    """
    from .cluster import connect, worker_environment

    t0 = time.perf_counter()
    started = dt.datetime.now(dt.UTC)
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + f"-{os.getpid()}"
    cb = callbacks or _Callbacks()
    storage.apply_environment(worker_environment(config))
    plan = plan or make_plan(config)
    result = RunResult(output=config.output, skipped=dict(plan.skipped))
    if not plan.tiles:
        log.info("nothing to do: all %d tile(s) are up to date in %s", len(plan.skipped), config.output)
        result.seconds = time.perf_counter() - t0
        return result
    for t in plan.tiles:
        log.info("tile %s: process (%s)", t.tile, "; ".join(t.reasons) or "requested")
    sinks.check_writable(config.output)
    with ledger.Lease(config.output, ttl=config.lease_ttl):
        sinks.create_store(
            plan.store_url,
            plan.output_grid,
            attrs={"model_family": plan.card.family, "model": storage.basename(plan.spec.uri),
                   "treesits_dask_version": __version__},
        )
        result.report_dir = storage.join(config.output, "_runs", run_id)
        if client is None:
            with connect(config) as c:
                _run_reported(plan, c, cb, result)
        else:
            _run_reported(plan, client, cb, result)
        if config.cog and result.tiles:
            with_cogs = [t for t in [*plan.skipped, *(t.tile for t in plan.tiles)]
                         if t in plan.skipped or t in result.tiles]
            sinks.write_mosaics(config.output, sorted(with_cogs))
        result.seconds = time.perf_counter() - t0
        _write_summary(plan, result, started)
    if result.failed:
        lines = "; ".join(f"{t}: {e}" for t, e in result.failed.items())
        raise RunError(
            f"{len(result.failed)} of {len(plan.tiles)} tile(s) failed ({lines}). The other tiles are "
            "finished; fix the input and run again (finished tiles are skipped)"
        )
    return result


def _write_summary(plan: RunPlan, result: RunResult, started: dt.datetime) -> None:
    """``<output>/run.json`` (the latest run) and ``<output>/_runs/<run id>/run.json``."""
    windows = sum(t.get("windows", 0) for t in result.tiles.values())
    summary = {
        "treesits_dask_version": __version__,
        "started_utc": started.isoformat(timespec="seconds"),
        "seconds": round(result.seconds, 3),
        "tiles_processed": len(result.tiles),
        "pixels_predicted": result.pixels_predicted,
        "throughput": {
            "pixels_per_second": round(result.pixels_predicted / result.seconds, 1) if result.seconds else None,
            "windows": windows,
            "windows_per_second": round(windows / result.seconds, 3) if result.seconds else None,
        },
        # task compute seconds per stage, summed over all worker threads (not wall-clock time)
        "stages": result.stages,
        "performance_report": storage.join(result.report_dir, "dask-report.html") if result.report_dir else None,
        "tiles": result.tiles,
        "skipped": result.skipped,
        "failed": result.failed,
        "complete": not result.failed,
    }
    text = json.dumps(summary, indent=2, default=str)
    targets = [storage.join(plan.config.output, "run.json")]
    if result.report_dir:
        targets.append(storage.join(result.report_dir, "run.json"))
    for url in targets:
        fs, path = storage.get_fs(url)
        if not storage.is_remote(url):
            fs.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe_file(path, text.encode())


def stage_seconds(records, totals: dict | None = None) -> dict[str, dict]:
    """Add task-stream records (``distributed`` ``startstops``) up per stage of the pipeline."""
    totals = {} if totals is None else totals
    for rec in records:
        key = rec["key"]
        name = key[0] if isinstance(key, tuple) else str(key)
        # tasks that Dask fused carry all their names ("predict_packed-write-<tile>-<token>")
        parts = [_STAGES[p] for p in name.split("-") if p in _STAGES]
        stage = "+".join(dict.fromkeys(parts)) or "other"
        t = totals.setdefault(stage, {"tasks": 0, "seconds": 0.0, "transfer_seconds": 0.0})
        t["tasks"] += 1
        for ss in rec["startstops"]:
            if ss["action"] == "compute":
                t["seconds"] += ss["stop"] - ss["start"]
            elif ss["action"] == "transfer":
                t["transfer_seconds"] += ss["stop"] - ss["start"]
    return totals


def _task_stream_since(start_index: int | None, dask_scheduler=None):
    """On the scheduler: stage totals of the tasks finished since ``start_index`` (None: only
    make sure the task stream is recorded), and the index to continue from."""
    from distributed.diagnostics.task_stream import TaskStreamPlugin

    plugin = dask_scheduler.plugins.get(TaskStreamPlugin.name)
    if plugin is None:
        plugin = TaskStreamPlugin(dask_scheduler)
        dask_scheduler.add_plugin(plugin)
    if start_index is None:
        return {}, plugin.index
    return stage_seconds(plugin.collect(start_index=start_index)), plugin.index


class _StageClock:
    """Collects per-stage task seconds from the scheduler's task stream, a tile at a time (so the
    stream's bounded buffer never drops records of a long run).  Never fails the run."""

    def __init__(self, client, totals: dict):
        self.client, self.totals, self.index = client, totals, None
        try:
            _, self.index = client.run_on_scheduler(_task_stream_since, None)
        except Exception as exc:  # noqa: BLE001 - e.g. a scheduler without treesits_dask installed
            log.warning("no per-stage timings in run.json: %s", exc)

    def pull(self) -> None:
        if self.index is None:
            return
        try:
            part, self.index = self.client.run_on_scheduler(_task_stream_since, self.index)
        except Exception as exc:  # noqa: BLE001
            log.warning("no per-stage timings in run.json: %s", exc)
            self.index = None
            return
        for stage, t in part.items():
            mine = self.totals.setdefault(stage, {"tasks": 0, "seconds": 0.0, "transfer_seconds": 0.0})
            for k, v in t.items():
                mine[k] = round(mine[k] + v, 3)


def _run_reported(plan: RunPlan, client, cb: _Callbacks, result: RunResult) -> None:
    """:func:`_run_tiles` inside a Dask performance report, published to ``result.report_dir``."""
    import tempfile

    from distributed import performance_report

    from ._cog import publish_file

    with tempfile.TemporaryDirectory(prefix="treesits-report-") as tmp:
        html = os.path.join(tmp, "dask-report.html")
        with client.as_current():
            report = performance_report(filename=html, stacklevel=2)
            try:
                report.__enter__()
            except Exception as exc:  # noqa: BLE001 - a report is nice to have, never a reason to fail
                log.warning("no Dask performance report for this run: %s", exc)
                report = None
            clock = _StageClock(client, result.stages)
            _run_tiles(plan, client, cb, result, clock)
            if report is not None:
                try:
                    t0 = time.perf_counter()
                    report.__exit__(None, None, None)
                    publish_file(html, storage.join(result.report_dir, "dask-report.html"))
                    log.info("Dask performance report written in %.1f s", time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001
                    log.warning("could not write the Dask performance report: %s", exc)


def _run_tiles(plan: RunPlan, client, cb: _Callbacks, result: RunResult, clock: _StageClock | None = None) -> None:
    from distributed import as_completed

    from .cluster import EnvPlugin, worker_environment

    cfg = plan.config
    # GDAL/S3 settings on every worker (also of a cluster this run did not start, and ones that join
    # later); credentials stay in each worker's own environment
    client.register_plugin(EnvPlugin(worker_environment(cfg)))
    # workers that outlive a run must not serve scene bytes GDAL cached before files were replaced
    client.run(storage.clear_gdal_cache)
    client.register_plugin(ModelPlugin(plan.spec, cfg.device, cfg.threads_per_worker,
                                       resource="GPU" if cfg.gpu_group else None))
    cb.start(sum(plan.windows_per_tile(t) for t in plan.tiles), getattr(client, "dashboard_link", None))
    pending = list(plan.tiles)
    state: dict[str, dict] = {}
    owner: dict = {}
    ac = as_completed()

    def submit(tile: TilePlan) -> None:
        stats = tile_graph(plan, tile)
        # annotated graphs must not be optimised: fusion drops or merges the resource annotations
        futures = client.compute(list(stats.to_delayed(optimize_graph=not cfg.gpu_group).ravel()),
                                 optimize_graph=not cfg.gpu_group)
        state[tile.tile] = {"plan": tile, "left": len(futures), "stats": [], "t0": time.perf_counter(),
                            "futures": futures}
        for f in futures:
            owner[f.key] = (tile.tile, "window")
            ac.add(f)

    def fail(tile: str, exc: BaseException) -> None:
        st = state.pop(tile, None)
        if st is None:
            return
        client.cancel(st["futures"])
        msg = str(exc) if isinstance(exc, TreesitsError) else f"{type(exc).__name__}: {exc}"
        result.failed[tile] = msg
        log.error("tile %s failed: %s", tile, msg)
        cb.tile_failed(tile, msg)

    while pending and len(state) < cfg.tiles_in_flight:
        submit(pending.pop(0))
    for future in ac:
        tile, kind = owner.pop(future.key, (None, None))
        if tile not in state:
            continue
        st = state[tile]
        if future.status == "error" or future.status == "cancelled":
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - reported per tile, other tiles go on
                fail(tile, exc)
        elif kind == "window":
            st["stats"].append(future.result().reshape(-1))
            st["left"] -= 1
            cb.window_done(tile)
            if st["left"] == 0:
                if cfg.cog:
                    f = client.submit(
                        sinks.write_tile_cogs, cfg.output, plan.store_url, st["plan"].region,
                        plan.output_grid, pure=False, key=f"cog-{tile}-{time.time_ns()}",
                    )
                    st["futures"].append(f)
                    owner[f.key] = (tile, "cog")
                    ac.add(f)
                else:
                    _finish_or_fail(plan, st, result, cb, tile, {}, fail)
                    state.pop(tile, None)
        elif kind == "cog":
            _finish_or_fail(plan, st, result, cb, tile, future.result(), fail)
            state.pop(tile, None)
        if tile not in state:
            if clock is not None:
                clock.pull()
            while pending and len(state) < cfg.tiles_in_flight:
                submit(pending.pop(0))


def _finish_or_fail(plan, st, result, cb, tile, cogs, fail) -> None:
    try:
        _finish(plan, st, result, cb, tile, cogs)
    except TreesitsError as exc:
        fail(tile, exc)


def _finish(plan: RunPlan, st: dict, result: RunResult, cb: _Callbacks, tile: str, cogs: dict) -> None:
    """Check that the inputs did not change while the tile was read, then write its ledger record."""
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
        log.info("tile %s: %s since it was planned; the next update will take them", tile,
                 "; ".join(ledger.compare({"fingerprint": tp.fingerprint}, fingerprint)))
    arr = np.array(st["stats"]).sum(axis=0) if st["stats"] else np.zeros(len(_STATS), int)
    stats = {
        "scenes": len(tp.scenes),
        "first_scene": str(tp.scenes[0].date),
        "last_scene": str(tp.scenes[-1].date),
        "windows": len(st["stats"]),
        "pixels_predicted": int(arr[0]),
        "seconds": round(time.perf_counter() - st["t0"], 3),
    }
    region = tp.region
    ledger.write_record(cfg.output, tile, {
        "tile": tile,
        "fingerprint": tp.fingerprint,
        "model_digest": plan.model_digest,
        "config_digest": plan.config_digest,
        "outputs": {
            "zarr": {"store": "predictions.zarr", "rows": [region.row_off, region.row_off + region.height],
                     "cols": [region.col_off, region.col_off + region.width]},
            "cog": {k: storage.basename(v) for k, v in cogs.items()},
        },
        "stats": stats,
    })
    result.tiles[tile] = stats
    log.info(
        "tile %s: %d scenes, %d windows, %d pixels predicted, %.1f s",
        tile, stats["scenes"], stats["windows"], stats["pixels_predicted"], stats["seconds"],
    )
    cb.tile_done(tile, stats)
