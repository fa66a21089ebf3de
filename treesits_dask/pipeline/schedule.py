"""The scheduling of a run's tiles on the cluster: a bounded number of tiles in flight; the
windows of a tile are written into forks of one session of the map, each merged into the session
as it comes back; when its last window is written the driver checks that the tile's inputs did
not change and commits the tile's pixels and record together, then writes its COGs from that
commit.

:func:`tile_graph` chains the stages' Dask layers: :func:`~treesits_dask.io.cube.tile_cube` reads,
:func:`~treesits_dask.pipeline.predict.predict_layer` predicts,
:func:`~treesits_dask.outputs.store.write_layer` writes.

This module is longer than 400 lines: submitting a tile's graph and following its windows to the
commit and the COGs are one loop over the same state.
"""

from __future__ import annotations

import logging
import time
import traceback

import numpy as np

from ..errors import InputDataError, TreesitsError
from ..io import discovery
from ..io.cube import DEFAULT_READ_BYTES, WindowReader, days_since_epoch, tile_cube
from ..io.datasets import forget_datasets
from ..io.layouts import layout_parts, layouts_text
from ..io.masks import open_mask
from ..io.remote import clear_gdal_cache
from ..outputs import store
from ..outputs.alerts import state_layer
from ..outputs.repo import MapRepo, write_tile_cogs
from ..outputs.schema import SMOOTHED_VARIABLES, OutputGrid
from ..state import ledger
from ..state.lease import Lease
from .alerting import alert_steps
from .cluster import (
    Routing,
    declared_routing,
    needs_for,
    routing_for,
    wait_for_workers,
    worker_environment,
)
from .memory import tiles_that_fit
from .plan import RunPlan, TilePlan
from .plugins import add_worker_plugin, on_workers, register_pinned_reads, worker_plugins
from .postprocess import update_derived
from .predict import Inference, ModelPlugin, annotate, inference_stats, predict_layer
from .preview import decode_warnings, reads_report, state_warnings
from .reading import (
    ReadBudget,
    alone_budget,
    answering,
    idle_reader,
    pinned_worker,
    plans_decode,
    read_alone,
    read_budget,
    readers,
    reading_workers,
    spill_worker,
    stages_states,
    stream_stages,
    tile_bytes,
    tile_decode,
    tile_ordered,
    tile_read_plan,
    tile_scenes,
    tile_spills,
    worker_disks,
)
from .report import RunResult, collect_inference
from .streaming import Kernel, StreamStage, stages_layer, stream_layer

__all__ = ["Job", "RunCallbacks", "run_tiles", "tile_graph"]

#: attempts after the first of a COG task: it reads the map, and a read that broke off mid-body
#: (Icechunk does not retry a manifest cut off like that) fails the task; writing a tile's COGs
#: and then their manifest again is harmless, so Dask runs it again instead of failing the tile
_COG_RETRIES = 3

log = logging.getLogger(__name__)


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


def tile_graph(
    plan: RunPlan,
    tile: TilePlan,
    session,
    routing: Routing | None = None,
    reads: ReadBudget | None = None,
    worker: str | None = None,
):
    """The tasks of one tile: read, predict and write every window into ``session`` (a fork of
    the tile's session of the map).  Returns the keys of the write tasks (each results in the
    fork with the window's changes and the window's statistics) and the graph.

    ``routing`` (default: what the settings declare) gives the resource annotations: on
    heterogeneous clusters reads only where ``CPU`` is advertised, inference only where ``GPU``.
    ``reads``: the memory a read task may fill and the reading threads of the cluster (default:
    :data:`~treesits_dask.io.cube.DEFAULT_READ_BYTES`, one thread).  ``worker``: the reading
    worker that reads the tile and puts its windows together where its read plan spills
    (:func:`~treesits_dask.pipeline.reading.spill_worker`; None: any).
    """
    cfg = plan.config
    routing = routing or declared_routing(cfg) or Routing()
    task_bytes, threads = (reads.task_bytes, reads.threads) if reads else (DEFAULT_READ_BYTES, 1)
    held, spill, in_memory = (
        (reads.held_bytes, reads.spill_bytes, reads.in_memory_bytes) if reads else (None,) * 3
    )
    scenes, steps, prev = tile.scenes, None, None
    if tile.alerts is not None:  # the alert steps may need scenes before the model's window
        scenes = (*tile.alerts.older, *tile.scenes)
        steps = alert_steps(tile.alerts, cfg, tile.scenes)
    reading = tile.reading  # the chunks read and predicted: the windows, or whole COG blocks
    streamed = tile_read_plan(tile, reads)  # the plan the scheduler's decisions came from
    if streamed is not None and streamed.stream:
        stages = stream_stages(tile, reads, streamed)
        packed = _streamed(plan, tile, streamed, routing, threads, stages)
        return _written(plan, tile, packed, session)
    with annotate(routing.read):
        mask = open_mask(tile.mask, tile.grid, reading) if tile.mask else None
        cube = tile_cube(
            scenes, tile.grid, reading, cfg.qai_flags, mask=mask,
            read_bytes=task_bytes, min_read_tasks=threads, held_bytes=held, spill_bytes=spill,
            in_memory_bytes=in_memory,
            checked=scenes,  # the plan's checks read their headers (the alerts' older too)
            worker=worker,
        )  # fmt: skip
        if tile.alerts is not None:
            prev = state_layer(cfg.output, tile.alerts.resume, tile.region, tile.layout)
            prev = prev.rechunk(((3,), *reading.chunks))
    days = days_since_epoch([s.date for s in scenes])
    packed = predict_layer(
        cube.data,
        mask,
        days,
        plan.spec,
        plan.card.n_classes,
        cfg.device,
        cfg.batch_size,
        resources=routing.predict,
        inference=Inference.of(cfg),
        packing=plan.output_grid.packing,
        alerts=steps,
        prev=prev,
    )
    return _written(plan, tile, packed, session)


def _streamed(plan: RunPlan, tile: TilePlan, read_plan, routing: Routing, threads: int,
              stages: tuple = ()):  # fmt: skip
    """The packed outputs of a streamed tile (see
    :func:`~treesits_dask.pipeline.streaming.stream_layer`): its reads may run as many units
    ahead of its steps as a tile in flight has reading threads (at least 2: one batch stepped
    through, the next read).  ``stages``: where its scenes are in runs of file layouts
    (:func:`~treesits_dask.pipeline.reading.stream_stages`), each run and its plan, streamed one
    after the other (:func:`~treesits_dask.pipeline.streaming.stages_layer`).  Its mask is
    opened in the windows each plan steps (crossing no two of its bands)."""
    cfg = plan.config
    kernel = Kernel(plan.spec, cfg.device, Inference.of(cfg), plan.output_grid.packing)
    days = days_since_epoch([s.date for s in tile.scenes])
    ahead = max(2, -(-threads // cfg.tiles_in_flight))
    plans = [own for _, own in stages] or [read_plan]
    scenes, batches = len(tile.scenes), sum(len(p.batches) for p in plans)
    states = stages_states(tile, plans) / 2**30
    sections = max(p.sections for p in plans)
    parts = layout_parts(tile_scenes(tile), tile.grid)
    if len(parts) > 1 and not stages:
        # one plan for all its layouts (more runs of layouts than pay for stages): a layout's
        # blocks that the plan's bands cut are decoded once per band that crosses them
        counted = plans_decode(tile, [(p.grid, len(p.indices), read_plan) for p in parts])
        decoded = (f"{counted / tile_bytes(tile):.2f} times its bytes decoded by the plan's "
                   "count, in one plan for all its file layouts")  # fmt: skip
    elif sections > 1:
        decoded = (f"in {sections} sections of window columns, each block decoded once per "
                   "section that crosses it")  # fmt: skip
    else:
        decoded = "every block decoded once"
    log.info(
        "tile %s: streamed through the model in %s of its %d scenes (%s, nothing of all scenes "
        "held); its windows' model states hold up to %.2f GiB at once (%s)",
        tile.tile, f"{batches} batch{'es' if batches != 1 else ''}", scenes, decoded, states,
        "the pixels of its mask" if tile.mask is not None else "every pixel predicted",
    )  # fmt: skip

    def mask(windows):  # the tile's mask chunked like the windows a plan steps
        if not tile.mask:
            return None
        with annotate(routing.read):
            return open_mask(tile.mask, tile.grid, windows)

    if not stages:
        reader = WindowReader.of_scenes(tile.grid, tile.scenes, cfg.qai_flags, tile.scenes)
        windows = read_plan.windows or tile.reading
        return stream_layer(reader, windows, read_plan, days, kernel, mask(windows), routing,
                            ahead)  # fmt: skip
    log.info(
        "tile %s: streamed in %d stages, one per run of scenes in one file layout (%s), each "
        "read in blocks of its own and stepped in windows of its own, the states of each "
        "stage's windows handed to the next's",
        tile.tile, len(stages), layouts_text([run for run, _ in stages]),
    )  # fmt: skip
    steps = []
    for run, own in stages:
        these = [tile.scenes[i] for i in run.indices]
        reader = WindowReader.of_scenes(run.grid, these, cfg.qai_flags, tile.scenes)
        windows = own.windows or tile.reading
        steps.append(StreamStage(reader, own, windows, run.indices[0], mask(windows)))
    return stages_layer(tuple(steps), days, kernel, routing, ahead)


def _written(plan: RunPlan, tile: TilePlan, packed, session):
    """The write tasks of a tile's packed outputs (rechunked to the map's windows where they
    were read in other chunks) and their graph."""
    if packed.chunks[1:] != tile.layout.chunks:  # the outputs (a few layers) to the map's windows
        packed = packed.rechunk(((packed.shape[0],), *tile.layout.chunks))
    return store.write_layer(
        packed, session, tile.region, tile.layout, plan.output_grid.variables(),
        plan.output_grid.packing,
    )  # fmt: skip


class Job:
    """What the tasks of a run share: the plan, the map's grid, the run id and the lease."""

    def __init__(self, plan: RunPlan, grid: OutputGrid, run_id: str, lease: Lease):
        self.plan, self.grid, self.run_id, self.lease = plan, grid, run_id, lease


class _Scheduler:
    """Submits the tiles of a plan, a bounded number at a time, and follows their futures:
    windows -> commit (driver) -> COGs; COG-only tiles go straight to their COGs."""

    def __init__(
        self,
        job: Job,
        client,
        cb: RunCallbacks,
        result: RunResult,
        clock,
        routing: Routing,
        reads: ReadBudget | None = None,
        alone: ReadBudget | None = None,
        alone_tiles: int = 1,
        disks: dict[str, int] | None = None,
        workers: dict[str, dict] | None = None,
    ):
        from distributed import as_completed

        self.job, self.plan, self.routing, self.reads = job, job.plan, routing, reads
        # the budget of a tile read with no other tile beside it on its reading worker, and how
        # many tiles are in flight at most while such a tile is (the reading workers)
        self.alone, self.alone_tiles, self._alone = alone, alone_tiles, {}
        self.client, self.cb, self.result, self.clock = client, cb, result, clock
        # the reading workers the budgets were derived from (``workers``, default those there now),
        # and the free disk of the workers (see _refresh)
        self._readers = self._reading(workers or client.scheduler_info(n_workers=-1)["workers"])
        self._disks = dict(disks or {})
        self.pending = tiles_that_fit(self.plan, client, routing, cb, result)
        self.state: dict[str, dict] = {}
        self.owner: dict = {}
        self.ac = as_completed()

    def submit(self, tile: TilePlan) -> None:
        from dask.delayed import Delayed

        self.job.lease.check()  # a driver that lost its lease submits nothing more
        session, fork = self.plan.repo.tile_session()
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        worker = spill_worker(workers, self.routing, [s.get("worker") for s in self.state.values()])
        reads, alone = self._budget(tile), self._read_alone(tile)
        if alone:
            log.info(
                "tile %s: read with no other tile beside it on its reading worker: with %d tiles "
                "in flight on %d reading worker(s), its share of a worker would have its plan "
                "decode %.2f times what it decodes with the whole worker's",
                tile.tile, self.plan.config.tiles_in_flight, self.alone_tiles,
                tile_decode(tile, self.reads) / tile_decode(tile, self.alone),
            )  # fmt: skip
        keys, graph = tile_graph(self.plan, tile, fork, self.routing, reads, worker)
        if worker := pinned_worker(graph):  # None where the tile's plan does not spill
            log.info("tile %s spills its bands: read on worker %s alone", tile.tile, worker)
        # annotated graphs must not be optimised: fusion drops or merges the annotations (the
        # resources, a pinned worker, the order of a tile's sections or of its gate)
        annotated = self.routing.gpu or worker or tile_ordered(tile, reads)
        delayed = [Delayed(k, graph, layer=k[0]) for k in keys]
        futures = self.client.compute(delayed, optimize_graph=not annotated)
        self.state[tile.tile] = {
            "plan": tile, "left": len(futures), "stats": [], "session": session,
            "t0": time.perf_counter(), "futures": futures, "worker": worker, "alone": alone,
        }  # fmt: skip
        for f in futures:
            self._follow(f, tile.tile, "window")

    def _read_alone(self, tile: TilePlan) -> bool:
        """Whether ``tile`` is read with no other tile beside it on its reading worker
        (:func:`~treesits_dask.pipeline.reading.read_alone`), found once per tile."""
        if tile.tile not in self._alone:
            self._alone[tile.tile] = read_alone(tile, self.reads, self.alone)
        return self._alone[tile.tile]

    def _budget(self, tile: TilePlan) -> ReadBudget | None:
        """The read budget of ``tile``: the whole reading worker's where it is read alone, else
        its share under ``tiles_in_flight``."""
        return self.alone if self._read_alone(tile) else self.reads

    def _in_flight(self, tile: TilePlan) -> int:
        """How many tiles may be in flight when ``tile`` is next: ``tiles_in_flight``, or the
        reading workers' count while a tile read alone is in flight or ``tile`` is one."""
        most = self.plan.config.tiles_in_flight
        if self._read_alone(tile) or any(s.get("alone") for s in self.state.values()):
            return min(most, self.alone_tiles)
        return most

    def submit_cogs(self, tile: str, record: dict, snapshot: str, variables=None) -> None:
        """COGs of a finished tile from the map at ``snapshot`` (``variables``: default all)."""
        f = self.client.submit(
            write_tile_cogs, self.plan.config.output, snapshot, MapRepo.region(tile, record),
            self.job.grid, record["record_id"], variables, pure=False,
            key=f"cog-{tile}-{time.time_ns()}", retries=_COG_RETRIES,
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
        """All windows of ``tile`` are merged into its session: commit it, then its COGs."""
        st = self.state[tile]
        record = _checked_record(self.job, st)
        self.job.lease.check()  # a driver that lost its lease commits nothing
        metadata = {"run": self.job.run_id, "reasons": list(st["plan"].reasons),
                    "scenes": len(st["plan"].scenes), "model_digest": self.plan.model_digest,
                    "config_digest": self.plan.config_digest}  # fmt: skip
        if st["plan"].alerts is not None:  # what the tile's alert layers are as of
            record["alerts"] = metadata["alerts"] = st["plan"].alerts.section
        snapshot = self.plan.repo.commit_tile(st["session"], [], tile, record, metadata)
        st["record"] = record
        if self.plan.config.cog:  # the smoothed layers follow their smoothing (postprocess)
            variables = [v for v in self.job.grid.variables() if v not in SMOOTHED_VARIABLES]
            self.submit_cogs(tile, record, snapshot, variables)
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
            # merged now, while the tile's other windows compute: a merge checks the manifest
            # splits the session holds (Icechunk 1.x compares every split of each array written
            # with every other, ~0.1 s per window of a 1000 px tile in a national grid), and
            # the tile's commit then waits for none of them.  Nothing is written to the map
            # until the commit, so a tile that fails later still leaves the map as it was
            st["session"].merge(fork)
            st["stats"].append(stats)
            st["left"] -= 1
            self.cb.window_done(tile)
            if not st["left"]:
                self.windows_written(tile)
        elif kind == "cog":
            future.result()
            self.done(tile)

    def _reading(self, workers: dict[str, dict]) -> tuple:
        """The reading workers of ``workers`` (``scheduler_info()["workers"]``): address, memory
        limit and threads of each."""
        return tuple(
            sorted(
                (w["address"], w.get("memory_limit"), w.get("nthreads"))
                for w in readers(workers, self.routing)
            )
        )

    def _refresh(self) -> None:
        """The read budgets derived again where the reading workers changed since they were (an
        adaptive group that scaled, a worker lost or joined), so that a tile started later is
        planned for the workers it is read on: a run that started with the one reading worker it
        waits for kept every tile's share of that worker, and no more tiles in flight than one
        while a tile read alone was, after its group had grown.  Tiles in flight keep theirs."""
        if self.reads is None:
            return
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        readers = self._reading(workers)
        if readers == self._readers:
            return
        new = [address for address, _, _ in readers if address not in self._disks]
        try:  # only the workers that joined: one busy or leaving does not hold the run up
            self._disks.update(worker_disks(self.client, new) if new else {})
        except Exception as exc:  # noqa: BLE001 - a worker leaving as it is asked: next time
            log.warning("reading workers changed, their disks not known yet (%s): the read "
                        "budgets stay as they were for now", exc)  # fmt: skip
            return
        cfg = self.plan.config
        counted = answering(workers, self._disks)  # not one lost before the scheduler noticed
        self.reads = read_budget(cfg, counted, self.routing, self._disks)
        self.alone = alone_budget(cfg, counted, self.routing, self._disks)
        self.alone_tiles, self._alone = reading_workers(counted, self.routing), {}
        log.info(
            "reading workers: %d, were %d: read budgets derived again for the tiles that start "
            "from now on (up to %.0f MiB per read task, %d reading threads)",
            len(readers), len(self._readers), self.reads.task_bytes / 2**20, self.reads.threads,
        )  # fmt: skip
        self._readers = readers

    def fill(self) -> None:
        self._refresh()
        while self.pending:
            if len(self.state) < self._in_flight(self.pending[0]):
                self.submit(self.pending.pop(0))
            elif self._idle_reader(self.pending[0]):
                log.info("tile %s spills its bands and a reading worker reads no tile: started "
                         "beyond tiles_in_flight", self.pending[0].tile)  # fmt: skip
                self.submit(self.pending.pop(0))
            else:
                break

    def _idle_reader(self, tile: TilePlan) -> bool:
        """Whether ``tile``'s read plan spills and a reading worker reads none of the tiles in
        flight.  A spilling tile is read on one reading worker (:func:`spill_worker`), and that
        worker's budget is one tile's while the tiles in flight are no more than the reading
        workers (:func:`read_budget`), so beyond ``tiles_in_flight`` such tiles go on starting, one
        on each idle reading worker; otherwise all but ``tiles_in_flight`` of them stood idle."""
        if not tile_spills(tile, self._budget(tile)):
            return False
        busy = [s.get("worker") for s in self.state.values()]
        return idle_reader(self.client.scheduler_info(n_workers=-1)["workers"], self.routing, busy)

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


def run_tiles(job: Job, client, cb: RunCallbacks, result: RunResult, clock=None) -> None:
    plan = job.plan
    cfg = plan.config
    # GDAL/S3 settings on every worker (also of a cluster this run did not start, and ones that join
    # later); credentials stay in each worker's own environment.  A worker lost as the run sets
    # up (before the scheduler noticed) is left to Dask: a restarted one gets the plugins, has no
    # cache to drop, and counts with no free disk in the read plans made now
    for plugin in worker_plugins(worker_environment(cfg)):
        add_worker_plugin(client, plugin)
    register_pinned_reads(client)  # work stealing leaves a spilling tile's reads on their worker
    # the same routing on every kind of cluster (also a standing one behind scheduler_address),
    # and the groups it needs must have workers before any work waits for them
    routing = routing_for(cfg, client.scheduler_info(n_workers=-1)["workers"])
    wait_for_workers(client, needs_for(cfg, routing), cfg.workers_timeout)
    log.info(
        "routing: reads %s, inference %s", routing.read or "anywhere", routing.predict or "anywhere"
    )
    present, disks = client.scheduler_info(n_workers=-1)["workers"], worker_disks(client)
    workers = answering(present, disks)  # not a worker lost before the scheduler noticed
    reads = read_budget(cfg, workers, routing, disks)
    log.info(
        "reads: up to %.0f MiB of decoded scenes per read task, %d reading threads",
        reads.task_bytes / 2**20,
        reads.threads,
    )
    # workers that outlive a run must not serve scene bytes GDAL cached before files were replaced
    # (nor keep datasets open on them)
    on_workers(client, clear_gdal_cache)
    on_workers(client, forget_datasets)
    resource = next(iter(routing.predict)) if routing.predict else None
    add_worker_plugin(
        client,
        ModelPlugin(
            plan.spec, cfg.device, cfg.threads_per_worker, resource, inference=Inference.of(cfg)
        ),
    )
    cb.start(
        sum(plan.windows_per_tile(t) for t in plan.tiles), getattr(client, "dashboard_link", None)
    )
    # where tiles_in_flight gives a reading worker more than one tile, a tile whose plan decodes
    # more with its share than with the whole worker is read with no other tile beside it
    alone = alone_budget(cfg, workers, routing, disks)
    count = reading_workers(workers, routing)
    # before any tile starts (a tile's own read logs its plan only as it starts, maybe hours in):
    # the tiles whose read plans decode their blocks more than once, and the disk to decode once
    where = "kubernetes.scratch_size" if cfg.cluster == "kubernetes" else "the workers' disks"
    report = reads_report(cfg, workers, disks, routing, where, plan.tiles, (reads, alone))
    for line in decode_warnings(report) + state_warnings(report):
        log.warning("%s", line)
    # the workers there now, a lost one included: the budgets are derived again once it is gone
    _Scheduler(job, client, cb, result, clock, routing, reads, alone, count, disks, present).loop()
    result.inference = collect_inference(client, inference_stats)
    # the layers made from the stored map (smoothing across tiles, overviews), now that the
    # tiles are committed
    result.postprocessed = update_derived(plan.repo, cfg, client, job.run_id, job.lease, routing)


def _checked_record(job: Job, st: dict) -> dict:
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
    blocks = {s.name: tuple(s.block_shape or tp.grid.block_shape) for s in tp.scenes}
    return ledger.tile_record(
        tp.tile, tp.fingerprint, plan.model_digest, plan.config_digest, tp.region, stats,
        job.run_id, tp.reasons, blocks=blocks,
    )  # fmt: skip
