"""Where a tile read's time goes: the pipeline's read through Dask against the same read tasks run
by a plain thread pool inside a Dask worker of the same shape, alternating in one process, each
read against the decode floors measured just before it (and against the mean of the one-thread
floors just before and just after it), the cube in the page cache.

    python benchmarks/read_ceiling.py --size 600 --scenes 600 --layout cog --window 100 \\
        --threads 2 --memory-limit 3GiB --rounds 2 --json ceiling.json
    python benchmarks/read_ceiling.py --cube /data/cube --window 100 --memory-limit 3GiB

Variants (``--variants``):

- ``dask``: every window read as ``run`` reads it (``bench.measure.decode_run``: read tasks,
  pieces, windows put together, one worker of ``--threads`` threads);
- ``pool-1``: the read tasks of the same plan (per band and batch of scenes, or per group of
  windows) one after the other in one thread of a worker process of the same shape (a second
  LocalCluster, so that the pool's buffers and kept files do not change what the pipeline's worker
  recycles), as a single Dask task: a worker's memory limit, pool of kept files and GDAL cache, but
  no scheduling, no windows put together, and each task's pieces kept in memory and dropped as
  soon as it is done;
- ``pool-N``: the same on ``--threads`` threads;
- ``pool-N-disk``: the same with every piece written to the worker's local disk, as the read
  tasks of a plan that spills do where the worker has no room (plans in bands only).

``pool-1`` against the one-thread floor is the read code's own overhead (opens, QAI, screening,
the pieces' copy, and writing what it decodes to memory: against the floor to memory,
``bench.real.decode_floor``'s ``to_memory``, the rest); ``pool-N`` against ``pool-1`` what
running its threads side by side costs (against the per-core floor on N threads: what the bare
decoding loses so); ``dask`` against ``pool-N`` (or ``pool-N-disk``) what Dask and putting the
windows together add.  Each read also reports ``task_s``: the thread-seconds its read tasks
took (from Dask's task stream for ``dask``: the tasks of a band and batch of scenes or of a group
of windows, not a window read by its own task; timed around each job for a pool), so that the
read tasks themselves can be told apart from what runs between and after them.  Prints one JSON
line per read.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import sys
import tempfile
import time
from pathlib import Path

#: keys of the pipeline's read tasks (``io.cube``: per band and batch of scenes, or per group of
#: windows where windows are read on their own) in Dask's task stream
READ_TASKS = ("('read-band-", "('read-group-")


def _opens() -> int:
    from treesits_dask.io.datasets import OPEN_COUNTER

    return OPEN_COUNTER.count


def pool_read(tile, reads, qai_flags: tuple, threads: int, disk: bool) -> dict:
    """Run in a Dask worker (as a task): the read tasks of ``tile``'s plan under ``reads`` on
    ``threads`` threads of a thread pool, their pieces dropped once read; ``disk``: every piece
    written to local disk.  Seconds, the read tasks' thread-seconds, opens, decoded bytes and
    bytes written."""
    from concurrent.futures import ThreadPoolExecutor

    import treesits_dask.io.reader as reader_module
    from treesits_dask.bench.measure import cold_reads
    from treesits_dask.io import datasets, pieces
    from treesits_dask.pipeline.reading import tile_read_plan

    reader = reader_module.WindowReader.of_scenes(
        tile.grid, tile.scenes, qai_flags, checked=tile.scenes
    )
    plan = tile_read_plan(tile, reads)
    if plan.by_window:
        layout = tile.reading
        jobs = [
            functools.partial(reader.read_windows, tuple(layout.windows[i][j] for i, j in ij))
            for ij in plan.groups
        ]
    else:
        read_band = functools.partial(reader.read_band, own=plan.spills or disk)
        jobs = [
            functools.partial(read_band, band, start, stop)
            for band in plan.bands
            for start, stop in plan.batches
        ]
    durations: list[float] = []

    def timed(job) -> None:
        start = time.perf_counter()
        job()
        durations.append(time.perf_counter() - start)

    cold_reads()
    opens, (_, decoded), written = (
        datasets.OPEN_COUNTER.count,
        datasets.DECODED.snapshot(),
        pieces.WRITTEN.count,
    )
    in_memory = reader_module.in_memory
    if disk:
        reader_module.in_memory = lambda nbytes: False
    try:
        t0 = time.perf_counter()
        # each job in a copy of the task's context, so that the worker is found from the pool's
        # threads too (``get_worker``: the memory limit that the pool of kept files, GDAL's cache
        # and the read buffers are sized by, as in the pipeline's read tasks)
        context = contextvars.copy_context()
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(lambda job: context.copy().run(timed, job), jobs):
                pass
        seconds = time.perf_counter() - t0
    finally:
        reader_module.in_memory = in_memory
    return {
        "seconds": seconds,
        "task_s": sum(durations),
        "read_tasks": len(jobs),
        "opens": datasets.OPEN_COUNTER.count - opens,
        "decoded_bytes": datasets.DECODED.snapshot()[1] - decoded,
        "written_bytes": pieces.WRITTEN.count - written,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cube", default=None, help="an existing FORCE cube (else one is written)")
    p.add_argument("--size", type=int, default=600)
    p.add_argument("--scenes", type=int, default=600)
    p.add_argument("--layout", default="cog", choices=["cog", "strips"])
    p.add_argument("--window", type=int, default=100, help="square windows of this edge")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-limit", default="3GiB")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default="dask,pool-1,pool-N,pool-N-disk")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from distributed import get_task_stream

    from treesits_dask.bench.measure import (
        bench_cluster,
        bench_config,
        benchmark_cube,
        close_bench,
        decode_run,
        emit_row,
    )
    from treesits_dask.bench.pagecache import page_in
    from treesits_dask.bench.real import files_bytes, floor_sample, floors, memory_floor
    from treesits_dask.pipeline.cluster import Routing
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.pipeline.reading import read_budget, worker_disks

    tmp = tempfile.TemporaryDirectory(prefix="read-ceiling-") if args.workdir is None else None
    wd = Path(args.workdir or tmp.name)
    root = benchmark_cube(args.cube, wd, args.size, args.scenes, args.layout)
    plan = make_plan(bench_config(root, wd, args.threads, args.memory_limit, args.window))
    _, total = files_bytes(plan)  # uncompressed bytes
    sample = floor_sample(plan)  # as bench --real's floors
    variants = [v for v in args.variants.split(",") if v]
    report: dict = {"cube": str(root), "window": args.window, "threads": args.threads,
                    "memory_limit": args.memory_limit, "uncompressed_mib": round(total / 2**20),
                    "reads": []}  # fmt: skip
    cluster, client = bench_cluster(1, args.threads, args.memory_limit)
    # the pool's reads run in a worker of their own: run in the pipeline's worker, they changed
    # what its next reads found to recycle (9-16 GB of new memory per read of the 3000 px strips
    # after them, against 0.4-0.7 GB between the pipeline's own reads) and slowed those by 15-20 %
    pools = [v for v in variants if v != "dask"]
    pool_cluster, pool_client = (
        bench_cluster(1, args.threads, args.memory_limit) if pools else (None, None)
    )

    def measure_floors() -> tuple[float, float, float]:
        """MB/s: the one-thread floor, the per-core floor on ``--threads`` and the floor to
        memory, of the sample, now."""
        one, per_core = (f["mb_s"] for f in floors(sample, args.threads))
        return one, per_core, memory_floor(sample)["mb_s"]

    try:
        info = client.scheduler_info(n_workers=-1)["workers"]
        reads = read_budget(plan.config, info, Routing(), worker_disks(client))
        for r in range(args.rounds):
            for variant in variants:
                one, per_core, memory = measure_floors()
                page_in(str(root))
                if variant == "dask":
                    before = sum(client.run(_opens).values())
                    with get_task_stream(client) as stream:
                        run = decode_run(plan, client)
                    run["opens"] = sum(client.run(_opens).values()) - before
                    run["task_s"] = sum(
                        s["stop"] - s["start"]
                        for t in stream.data
                        if str(t["key"]).startswith(READ_TASKS)
                        for s in t["startstops"]
                        if s["action"] == "compute"
                    )
                    threads = args.threads
                else:
                    threads = 1 if variant == "pool-1" else args.threads
                    run = {"seconds": 0.0, "task_s": 0.0, "read_tasks": 0, "opens": 0,
                           "decoded_bytes": 0, "written_bytes": 0}  # fmt: skip
                    for tile in plan.tiles:
                        got = pool_client.submit(
                            pool_read, tile, reads, tuple(plan.config.qai_flags), threads,
                            variant.endswith("-disk"), pure=False,
                        ).result()  # fmt: skip
                        run = {k: run[k] + got[k] for k in run}
                mbs = total / run["seconds"] / 1e6 / threads
                # the floors again just after the read: this VM's decode speed moved by up to
                # 40 % within minutes, so a read is also given against the mean of both
                after, per_core_after, memory_after = measure_floors()
                mean = (one + after) / 2
                row = {"round": r, "variant": variant, "seconds": round(run["seconds"], 2),
                       "task_s": round(run["task_s"], 2),
                       "threads": threads, "read_tasks": run["read_tasks"],
                       "mb_s_per_core": round(mbs, 1),
                       "floor_mb_s": {"one_thread": round(one, 1),
                                      f"per_core_on_{args.threads}": round(per_core, 1),
                                      "one_thread_to_memory": round(memory, 1)},
                       "floor_after_mb_s": {"one_thread": round(after, 1),
                                            f"per_core_on_{args.threads}":
                                                round(per_core_after, 1),
                                            "one_thread_to_memory": round(memory_after, 1)},
                       "over_one_thread_floor": round(mbs / one, 3),
                       "over_per_core_floor": round(mbs / per_core, 3),
                       "over_mean_one_thread_floor": round(mbs / mean, 3),
                       "over_floor_to_memory": round(mbs / memory, 3),
                       "over_mean_floor_to_memory":
                           round(mbs / ((memory + memory_after) / 2), 3),
                       "opens": run["opens"],
                       "decoded_x": round(run["decoded_bytes"] / total, 3),
                       "written_mib": round(run.get("written_bytes", 0) / 2**20),
                       "spilled_mib": round(run.get("spilled_bytes", 0) / 2**20)}  # fmt: skip
                emit_row(report, row, args.json)
    finally:
        close_bench(tmp, pool_client, pool_cluster, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
