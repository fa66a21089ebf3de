"""The measurements of the throughput benchmark (:mod:`treesits_dask.bench.throughput`): decode
only, forward only on pre-loaded windows, end to end with peak RSS, a second run of a finished
output; models with random weights of the published shapes.

The module is longer than 400 lines: the benchmarks (``bench`` and ``bench --real``) take every
measurement of a run from here, so that their figures (decoded bytes, buffers, restarts, peak
RSS) are counted alike."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..io.buffers import handed_out
from ..io.grid import Window

__all__ = [
    "MostSampled",
    "PeakRSS",
    "bench_cluster",
    "bench_config",
    "close_bench",
    "bench_models",
    "benchmark_cube",
    "cube_arguments",
    "cube_workdir",
    "cold_reads",
    "decode_run",
    "measured_run",
    "no_local_disk",
    "stream_states",
    "decode_seconds",
    "decoded",
    "emit_row",
    "end_to_end",
    "fmt_seconds",
    "forest_block_bytes",
    "forward_inputs",
    "forward_seconds",
    "mib",
    "open_count",
    "paused_times",
    "prefetched",
    "rerun",
    "reset_vm_hwm",
    "vm_hwm",
    "windows_with_forest",
    "worker_pids",
    "worker_restarts",
]


def vm_hwm() -> int | None:
    """This process's peak resident set (``VmHWM`` in /proc/self/status) in bytes; None
    elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_vm_hwm() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux: ``5`` into clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakRSS:
    """Peak RSS of the driver plus the peaks of every worker process of a run, read from the
    kernel's high-water marks after the run (each worker is new; the driver's mark is reset when
    the run starts).  The sum of per-process peaks bounds the peak of their sum from above.

    Nothing samples while the run is timed: a psutil sampler every 50 ms made the LSTM end-to-end
    run 5-10 % slower on 2 cores.
    """

    def __init__(self, client) -> None:
        self.client = client
        self.peak: int | None = None
        self.workers: dict[str, int | None] = {}

    def __enter__(self):
        import psutil

        self.baseline = psutil.Process().memory_info().rss
        self._reset = reset_vm_hwm()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return
        workers = self.client.run(vm_hwm)
        self.workers = dict(workers)
        driver = vm_hwm() if self._reset else None
        if driver is not None and all(v is not None for v in workers.values()):
            self.peak = driver + sum(workers.values())


class MostSampled:
    """The largest value ``measure()`` returned, called every ``every`` seconds in a thread while
    the block runs (``most``); a call that raises (a worker restarting) is skipped."""

    def __init__(self, measure, every: float) -> None:
        import threading

        self.measure, self.every, self.most = measure, every, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while True:
            try:
                self.most = max(self.most, self.measure())
            except Exception:  # noqa: BLE001 - the next sample
                pass
            if self._stop.wait(self.every):
                return

    def __enter__(self):
        import threading

        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bench_cluster(workers: int, threads: int, memory_limit: str | int = "auto"):
    """A LocalCluster of worker processes with the environment `run` gives its workers (GDAL
    and malloc defaults) and their preload (torch imported as they start)."""
    from distributed import Client, LocalCluster

    from ..io import storage
    from ..pipeline import warmup
    from ..pipeline.plugins import PieceFiles, register_pinned_reads

    storage.apply_environment(storage.process_defaults())
    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                           dashboard_address=":0", memory_limit=memory_limit,
                           **warmup.worker_kwargs())  # fmt: skip
    client = Client(cluster)
    client.register_plugin(PieceFiles())  # as run's workers: piece files removed before closing
    register_pinned_reads(client)  # as run: work stealing leaves pinned reads where they are
    return cluster, client


def close_bench(tmp, *closing) -> None:
    """End a benchmark script: close its clients and clusters in the order given (None: not
    started), then remove its temporary work directory (``tmp``; None: a directory given)."""
    for c in closing:
        if c is not None:
            c.close()
    if tmp is not None:
        tmp.cleanup()


def bench_config(cube, workdir: Path, threads: int, memory_limit: str, window: int):
    """The configuration of a read benchmark on ``cube``: every tile, one worker of ``threads``
    threads and ``memory_limit``, square windows of ``window`` px, output under ``workdir`` and
    ``sits-lstm`` with random weights (the reads do not run it)."""
    from ..config import load_config

    return load_config(
        overrides=dict(cube=str(cube), tiles="all", workers=1, threads_per_worker=threads,
                       memory_limit=memory_limit, dashboard_address=":0",
                       window=f"{window}x{window}", output=str(workdir / "out"),
                       **bench_models(workdir, ["sits-lstm"])["sits-lstm"]),
        environ={},
    )  # fmt: skip


def benchmark_cube(
    cube: str | None, workdir: Path, size: int, scenes: int, layout: str, tiles: int = 1
) -> str:
    """The root of a benchmark script's cube: ``cube`` where given, else a synthetic one written
    under ``workdir`` (``tiles`` tiles of ``size`` px x ``scenes`` scenes in ``layout``, seed 5),
    its writing time told on stderr."""
    import sys

    from ..synthetic import make_cube

    if cube:
        return cube
    t0 = time.perf_counter()
    names = tuple(f"X{69 + k:04d}_Y0043" for k in range(tiles))
    root = make_cube(
        workdir / "cube", tiles=names, size=size, n_scenes=scenes, layout=layout, seed=5
    ).root
    print(f"{tiles} tile(s) of {size} px x {scenes} scenes written in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
    return str(root)


def cube_arguments(p, workers: int, memory_limit: str, threads: bool = True) -> None:
    """The arguments that the benchmark scripts on a cube of several 600-scene tiles (given or
    written) share, added to the ``argparse`` parser ``p``: ``--cube``, ``--tiles``, ``--size``,
    ``--scenes``, ``--layout``, ``--window``, ``--workers`` (default ``workers``), ``--threads``
    (where ``threads``; else each worker has one), ``--memory-limit`` (default ``memory_limit``),
    ``--rounds``, ``--workdir``, ``--json``."""
    p.add_argument("--cube", default=None, help="an existing FORCE cube (else one is written)")
    p.add_argument("--tiles", type=int, default=2, help="tiles of the cube written")
    p.add_argument("--size", type=int, default=600)
    p.add_argument("--scenes", type=int, default=600)
    p.add_argument("--layout", default="cog", choices=["cog", "strips"])
    p.add_argument("--window", type=int, default=100, help="square windows of this edge")
    p.add_argument("--workers", type=int, default=workers)
    if threads:
        p.add_argument("--threads", type=int, default=1, help="threads per worker")
    p.add_argument("--memory-limit", default=memory_limit,
                   help="per worker" if threads else "per worker (1 thread each)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)


def cube_workdir(args, prefix: str):
    """``(tmp, workdir, cube root)`` of a script that took :func:`cube_arguments`: ``--workdir``,
    else a temporary directory (``tmp``, to clean up; None otherwise), and the given cube or one
    written there (:func:`benchmark_cube`)."""
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix=prefix) if args.workdir is None else None
    wd = Path(args.workdir or tmp.name)
    return tmp, wd, benchmark_cube(args.cube, wd, args.size, args.scenes, args.layout, args.tiles)


def emit_row(report: dict, row: dict, json_path: str | None) -> None:
    """One read of a benchmark script: added to ``report["reads"]``, printed as a JSON line, and
    the report so far written to ``json_path`` (where given)."""
    import json

    report["reads"].append(row)
    print(json.dumps(row), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(report, indent=1))


def bench_models(workdir: Path, families: list[str]) -> dict[str, dict]:
    """Random weights of the published shapes (speed does not depend on the values)."""
    import torch

    from ..models import ModelCard, save_native
    from .forward import random_sbert_state_dict

    out = {}
    if "sits-lstm" in families:
        from ..models.architectures import LSTMClassifier

        hp = {
            "num_bands": 10,
            "input_size": 32,
            "hidden_size": 64,
            "num_layers": 2,
            "num_classes": 5,
        }
        card = ModelCard(
            family="sits-lstm",
            hyperparameters=hp,
            bands=[
                "BLUE",
                "GREEN",
                "RED",
                "REDEDGE1",
                "REDEDGE2",
                "REDEDGE3",
                "BROADNIR",
                "NIR",
                "SWIR1",
                "SWIR2",
            ],
            class_names=["Spruce", "Beech", "Pine", "Douglas fir", "Oak"],
            output_kind="softmax",
            sequence={"kind": "full"},
        )
        pt, _ = save_native(LSTMClassifier(**hp).eval(), card, str(workdir / "lstm.pt"))
        out["sits-lstm"] = {"model": pt, "model_family": "native"}
    if "sbert" in families:
        path = workdir / "sbert.tar"
        torch.save({"model_state_dict": random_sbert_state_dict(), "epoch": 0}, path)
        out["sbert"] = {"model": str(path), "model_family": "sbert"}
    return out


def mib(x: float | None) -> float | None:
    """MiB rounded for the report; None (no high-water marks on this system) stays None."""
    return round(x, 1) if x else None


def fmt_seconds(seconds: list[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in seconds)


def cold_reads() -> None:
    """Close the datasets this process keeps open and drop GDAL's caches, so that the next read
    decodes from the files (as a run's first read of a tile does)."""
    from ..io.datasets import forget_datasets
    from ..io.remote import clear_gdal_cache

    forget_datasets()
    clear_gdal_cache()


def decoded() -> tuple[int, int, int]:
    """(band-blocks, bytes) this process's reads decoded; BOA bytes left out as all screened."""
    from ..io.datasets import DECODED, SCREENED

    return (*DECODED.snapshot(), SCREENED.snapshot()[1])


def prefetched() -> int:
    """Compressed bytes this process's reads asked the kernel to read ahead (io.prefetch)."""
    from ..io.prefetch import PREFETCHED

    return PREFETCHED.count


def spilled(dask_worker) -> int:
    """Bytes this worker has spilled to disk so far (Dask's own count)."""
    data = getattr(dask_worker, "data", None)
    metrics = getattr(data, "cumulative_metrics", {})
    return int(metrics.get(("disk-write", "bytes"), 0))


def paused_times(dask_worker) -> int:
    """Times this worker was paused for memory so far (its log's "Pausing worker" lines)."""
    return sum("Pausing worker" in line for _, line in dask_worker.get_logs())


def pieces_written() -> int:
    """Bytes of window pieces this process's reads wrote to local disk (io.pieces)."""
    from ..io.pieces import WRITTEN

    return WRITTEN.count


def worker_pids(client) -> dict[str, int]:
    """The process id of each worker that can be reached, by address."""
    import os

    from ..pipeline.plugins import on_workers

    return on_workers(client, os.getpid)


def worker_restarts(before: dict[str, int], after: dict[str, int]) -> int:
    """How many of the workers ``before`` (:func:`worker_pids`) are not the same process
    ``after``: restarted by their nanny (for memory) or lost.  A read during which a worker
    restarted lost what that worker had counted and recomputed its tasks, and its peak RSS is the
    new process's."""
    return sum(1 for w, pid in before.items() if after.get(w) != pid)


def no_local_disk(client, workers: list[str] | None = None) -> dict[str, int]:
    """No free local disk on any worker: in place of
    :func:`~treesits_dask.pipeline.reading.worker_disks`, so that no plan counts on spilling."""
    return dict.fromkeys(workers or client.scheduler_info(n_workers=-1)["workers"], 0)


def stream_states(dask_worker) -> int:
    """Bytes of the streamed model states in this worker's memory: the step tasks' results, and
    those of the tasks that hand a stage's states to the next stage's windows."""
    fast = getattr(getattr(dask_worker, "data", None), "fast", None)
    weights = getattr(fast, "weights", None) or {}
    return sum(v for k, v in list(weights.items())
               if "stream-step-" in str(k) or "stream-windows-" in str(k))  # fmt: skip


def measured_run(client, config, state_digits: int = 2) -> tuple[dict, int | None]:
    """``run(config)`` on ``client``, measured: its seconds (None and the ``error`` where it
    failed), what the workers decoded and Dask spilled to disk, the most the streamed states held
    in memory (sampled every second, GiB to ``state_digits`` digits), the times Dask paused a
    worker for memory, the workers restarted by their nanny and each worker's peak RSS; and the
    bytes decoded (None where a worker restarted: its count started again)."""
    from ..pipeline.run import RunError, run

    pids = worker_pids(client)
    before = sum(v[1] for v in client.run(decoded).values())
    spill = sum(client.run(spilled).values())
    paused = sum(client.run(paused_times).values())
    client.run(reset_vm_hwm)
    error, seconds = None, None
    with MostSampled(lambda: sum(client.run(stream_states).values()), 1.0) as states:
        try:
            seconds = round(run(config, client=client).seconds, 1)
        except RunError as e:
            error = str(e)[:300]
    restarts = worker_restarts(pids, worker_pids(client))
    done = None if restarts else sum(v[1] for v in client.run(decoded).values()) - before
    row = {"seconds": seconds, "error": error,
           "decoded_gb": None if restarts else round(done / 1e9, 2),
           "dask_spilled_gb": None if restarts
           else round((sum(client.run(spilled).values()) - spill) / 1e9, 2),
           "most_states_in_memory_gib": round(states.most / 2**30, state_digits),
           "paused_for_memory": None if restarts
           else sum(client.run(paused_times).values()) - paused,
           "worker_restarts": restarts,
           "peak_worker_rss_gib": {a: round(v / 2**30, 2) if v else None
                                   for a, v in client.run(vm_hwm).items()}}  # fmt: skip
    return row, done


def decode_run(plan, client, pin: bool = True) -> dict:
    """Read every window of the plan's tiles on the cluster (as ``run`` does, no model): seconds,
    what the workers decoded (the datasets they kept open are closed first) and how many of them
    restarted meanwhile (:func:`worker_restarts`).  A tile whose plan spills is read on one
    worker, as ``run`` reads it (:func:`~treesits_dask.pipeline.reading.spill_worker`, the tiles
    spread over the reading workers); ``pin=False``: on any worker, as before (to compare)."""
    from ..io.cube import tile_cube
    from ..io.masks import open_mask
    from ..pipeline.cluster import Routing
    from ..pipeline.plugins import on_workers
    from ..pipeline.reading import (
        pinned_worker,
        read_budget,
        spill_worker,
        tile_ordered,
        worker_disks,
    )

    info = client.scheduler_info(n_workers=-1)["workers"]
    reads = read_budget(plan.config, info, Routing(), worker_disks(client))
    delayed, busy, ordered = [], [], False
    for tile in plan.tiles:
        mask = open_mask(tile.mask, tile.grid, tile.reading) if tile.mask else None
        cube = tile_cube(
            tile.scenes, tile.grid, tile.reading, plan.config.qai_flags, mask=mask,
            read_bytes=reads.task_bytes, min_read_tasks=reads.threads,
            held_bytes=reads.held_bytes, spill_bytes=reads.spill_bytes,
            in_memory_bytes=reads.in_memory_bytes, checked=tile.scenes,
            worker=spill_worker(info, Routing(), busy) if pin else None,
        )  # fmt: skip
        busy.append(pinned_worker(cube.data.__dask_graph__()))
        picked = cube.data.map_blocks(
            lambda b: np.array(int(b[:1, :1].sum()), ndmin=4), chunks=(1, 1, 1, 1), dtype=np.int64
        )
        # a pinned read's graph is not optimised (fusion drops the annotation), nor one read in
        # sections or behind a gate (their order is its priorities), as in ``run``
        keep = busy[-1] is not None or tile_ordered(tile, reads)
        ordered = ordered or keep
        delayed += list(picked.to_delayed(optimize_graph=not keep).ravel())
    on_workers(client, cold_reads)
    pids = worker_pids(client)
    before, spilled_before = on_workers(client, decoded), on_workers(client, spilled)
    written_before = on_workers(client, pieces_written)
    buffers_before, asked_before = on_workers(client, handed_out), on_workers(client, prefetched)
    t0 = time.perf_counter()
    # one task per window that takes a pixel of it, gathered as they are: a reduction tree
    # would add a small task per window that the pipeline does not run
    client.compute(delayed, sync=True, optimize_graph=not ordered)
    seconds = time.perf_counter() - t0
    after, spilled_after = on_workers(client, decoded), on_workers(client, spilled)
    written_after = on_workers(client, pieces_written)
    buffers_after, asked_after = on_workers(client, handed_out), on_workers(client, prefetched)
    modes = [read_mode(tile, reads) for tile in plan.tiles]
    gained, buffers = (
        [int(v) for v in sum(np.subtract(new[w], old.get(w, 0)) for w in new)]
        for new, old in ((after, before), (buffers_after, buffers_before))
    )
    return {
        "seconds": seconds,
        "decoded_blocks": gained[0],
        "decoded_bytes": gained[1],
        "screened_bytes": gained[2],
        "read_tasks": sum(tasks for _, tasks in modes),
        "spilled_bytes": sum(spilled_after[w] - spilled_before.get(w, 0) for w in spilled_after),
        # pieces the read tasks wrote to local disk (io.pieces) where memory was short
        "written_bytes": sum(written_after[w] - written_before.get(w, 0) for w in written_after),
        # read buffers in new memory (page faults) and in memory recycled from earlier reads
        "fresh_buffer_bytes": buffers[0],
        "reused_buffer_bytes": buffers[1],
        # compressed bytes the reads asked the kernel to read from disk ahead (io.prefetch)
        "prefetched_bytes": sum(asked_after[w] - asked_before.get(w, 0) for w in asked_after),
        "read_modes": sorted({mode for mode, _ in modes}),
        "worker_restarts": worker_restarts(pids, worker_pids(client)),
    }


def read_mode(tile, reads) -> tuple[str, int]:
    """How :func:`decode_run` reads a tile under ``reads`` (its plans as
    :func:`~treesits_dask.io.cube.tile_cube` makes them: one per file layout), and in how many
    read tasks: ``blocks`` (chunks of whole COG blocks, :func:`~treesits_dask.io.grid.read_shape`),
    ``windows`` (strip windows of all scenes, or the memory guard's fallback), ``bands`` or
    ``bands+spill``, with ``+sections`` where the guard's fallback reads the tile in sections of
    window columns; the modes of a tile in two file layouts joined by ``/``."""
    from ..io.layouts import part_plans
    from ..pipeline.reading import tile_scenes

    modes, tasks = [], 0
    for _, rp, _ in part_plans(tile_scenes(tile), tile.grid, tile.reading, reads.task_bytes,
                               reads.threads, reads.held_bytes, reads.spill_bytes,
                               reads.in_memory_bytes):  # fmt: skip
        if rp.by_window or all(rp.direct(b) for b in rp.bands):
            if rp.by_window:  # runs of windows side by side, each by one task
                modes.append("blocks" if rp.aligned else "windows")
                tasks += len(rp.groups)
            else:
                modes.append("windows")  # strip windows, each band a window
                tasks += len(tile.reading)
            continue
        modes.append(
            ("bands+spill" if rp.spills else "bands") + ("+sections" if rp.sections > 1 else "")
        )
        tasks += rp.tasks
    return "/".join(modes), tasks


def decode_seconds(plan, client) -> float:
    """Seconds of :func:`decode_run`."""
    return decode_run(plan, client)["seconds"]


def forward_inputs(plan) -> list[tuple]:
    """Per window of the run: the (series, valid, days) that :func:`predict_block` hands to the
    model (the same pixels, the same batches), read once up front."""
    from ..io.cube import days_since_epoch, tile_cube
    from ..io.masks import open_mask
    from ..pipeline.predict import select_pixels

    inputs = []
    for tile in plan.tiles:
        mask = open_mask(tile.mask, tile.grid, tile.reading) if tile.mask else None
        cube = tile_cube(tile.scenes, tile.grid, tile.reading, plan.config.qai_flags, mask=mask)
        block = cube.values  # (T, 10, H, W)
        sel_all = mask.compute() if mask is not None else None
        days = days_since_epoch([s.date for s in tile.scenes])
        for _, _, w in tile.reading:
            sel = None if sel_all is None else sel_all[w.rows, w.cols]
            idx, series, valid = select_pixels(block[:, :, w.rows, w.cols], sel)
            if idx.size:
                inputs.append((series, valid, days))
        del block
    return inputs


def forward_seconds(plan, inputs: list[tuple], cores: int, streams: int) -> float:
    """The model alone on pre-loaded inputs, ``streams`` windows at a time, the cores shared out as
    inference workers do (:func:`treesits_dask.pipeline.predict.threads_for_forward`), with their
    allocator settings: like against like."""
    import functools
    from concurrent.futures import ThreadPoolExecutor

    from ..pipeline.predict import (
        FORWARDS_IN_PROGRESS,
        get_predictor,
        threads_for_forward,
        tune_malloc,
    )

    tune_malloc()
    predictor = get_predictor(plan.spec, "cpu")
    predictor.threads = functools.partial(threads_for_forward, cores)

    def one(x):
        with FORWARDS_IN_PROGRESS:
            predictor.predict(*x, batch_size=plan.config.batch_size)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as ex:
        list(ex.map(one, inputs))
    return time.perf_counter() - t0


def open_count() -> int:
    from ..io.cube import OPEN_COUNTER

    return OPEN_COUNTER.count


def end_to_end(config, workers: int, threads: int, memory_limit: str | int = "auto") -> dict:
    """``run`` on a fresh cluster (so RSS and file-open counts belong to this run alone)."""
    from ..pipeline.plan import make_plan
    from ..pipeline.run import run

    plan = make_plan(config)
    cluster, client = bench_cluster(workers, threads, memory_limit)
    try:
        with PeakRSS(client) as rss:
            t0 = time.perf_counter()
            result = run(config, client=client, plan=plan)
            seconds = time.perf_counter() - t0
        opens = sum(client.run(open_count).values())
        decoded_bytes = sum(v[1] for v in client.run(decoded).values())
    finally:
        client.close()
        cluster.close()
    return {
        "seconds": seconds,
        "pixels": result.pixels_predicted,
        "peak_rss_mib": None if rss.peak is None else rss.peak / 2**20,
        "worker_peak_rss_mib": [None if v is None else v / 2**20 for v in rss.workers.values()],
        "baseline_rss_mib": rss.baseline / 2**20,
        "file_opens": opens,
        "decoded_bytes": decoded_bytes,
        "plan": plan,
    }


def rerun(config, first_seconds: float) -> dict:
    """``run`` again on the finished output: the ledger says every tile is up to date, so no
    cluster is started and no pixel is read (GeoTIFF opens counted in this process)."""
    from ..io.cube import OPEN_COUNTER
    from ..pipeline.run import run

    opens = OPEN_COUNTER.count
    t0 = time.perf_counter()
    result = run(config)
    seconds = time.perf_counter() - t0
    return {
        "first_run_s": round(first_seconds, 2),
        "second_run_s": round(seconds, 3),
        "second_over_first": round(seconds / first_seconds, 4),
        "tiles_skipped": len(result.skipped),
        "tiles_processed": len(result.tiles),
        "geotiff_opens": OPEN_COUNTER.count - opens,
    }


def windows_with_forest(plan) -> tuple[int, int]:
    """(windows holding at least one mask pixel, all windows) of the plan, from the mask files."""
    with_forest = total = 0
    for tile in plan.tiles:
        for _, _, w in tile.layout:
            total += 1
            with_forest += bool(tile.mask.read(w).any()) if tile.mask else 1
    return with_forest, total


def forest_block_bytes(plan) -> int:
    """Uncompressed bytes of the file blocks (BOA and QAI of every scene) that hold a pixel of
    the tiles' masks: what a masked read must decode, and no more."""
    from ..io.bands import block_runs

    total = 0
    for tile in plan.tiles:
        grid = tile.grid
        need = tile.mask.read(Window(0, 0, grid.height, grid.width))
        rects = block_runs(need, (0, grid.height), (0, grid.width), grid.block_shape)
        area = sum(_whole_blocks(r, grid) for r in rects)
        files = grid.count + (1 if plan.config.qai_flags else 0)
        total += area * files * 2 * len(tile.scenes)
    return total


def _whole_blocks(rect, grid) -> int:
    """Pixels of the whole blocks (clipped at the tile's edge) that ``rect`` touches."""
    from ..io.bands import decoded_bytes

    r0, r1, c0, c1 = rect
    return decoded_bytes((r0, r1), (c0, c1), grid.block_shape, (grid.height, grid.width), 1, 1)[1]
