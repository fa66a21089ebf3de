"""Tiles whose read plan spills, on a cluster of several reading workers: each tile read and its
windows put together on one worker (``run``'s way, ``pipeline.reading.spill_worker``) against
the same reads left to Dask's placement (the code before), alternating in one process, each read
against the decode floors measured just before it, the cube in the page cache.

    python benchmarks/spill_workers.py --tiles 2 --size 600 --scenes 600 --window 100 \\
        --workers 2 --threads 1 --memory-limit 1536MiB --rounds 2 --json spill.json
    python benchmarks/spill_workers.py --cube /data/cube --workers 2 --memory-limit 3GiB

A spilling plan writes the pieces of its bands to the local disk of the worker that reads them
and hands Dask a name it counts as a few bytes (``io.pieces``).  A window put together on another
worker fetches those pieces as arrays, as many in one message as Dask's 50 MB message limit
allows of pieces it thinks are a few bytes each.  Prints one JSON line per read: seconds, what
Dask spilled, what the read tasks wrote to local disk, worker restarts, MB/s per core against the
one-thread floor and the per-core floor.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from treesits_dask.bench.measure import cube_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cube_arguments(p, workers=2, memory_limit="1536MiB")
    args = p.parse_args(argv)

    from treesits_dask.bench.measure import (
        bench_cluster,
        bench_config,
        close_bench,
        cube_workdir,
        decode_run,
        emit_row,
    )
    from treesits_dask.bench.pagecache import page_in
    from treesits_dask.bench.real import files_bytes, floor_sample, floors
    from treesits_dask.pipeline.plan import make_plan

    tmp, wd, root = cube_workdir(args, "spill-workers-")
    config = bench_config(root, wd, args.threads, args.memory_limit, args.window)
    plan = make_plan(config.model_copy(update={"workers": args.workers}))
    _, total = files_bytes(plan)
    sample = floor_sample(plan)
    cores = args.workers * args.threads
    report: dict = {"cube": str(root), "tiles": len(plan.tiles), "window": args.window,
                    "workers": args.workers, "threads": args.threads,
                    "memory_limit": args.memory_limit, "uncompressed_mib": round(total / 2**20),
                    "reads": []}  # fmt: skip
    cluster, client = bench_cluster(args.workers, args.threads, args.memory_limit)
    try:
        for r in range(args.rounds):
            for pin in (True, False) if r % 2 == 0 else (False, True):
                one, per_core = (f["mb_s"] for f in floors(sample, cores))
                page_in(str(root))
                run = decode_run(plan, client, pin=pin)
                mbs = total / run["seconds"] / 1e6 / cores
                row = {"round": r, "tile_on_one_worker": pin, "seconds": round(run["seconds"], 2),
                       "read_modes": run["read_modes"],
                       "spilled_mib": round(run["spilled_bytes"] / 2**20),
                       "written_mib": round(run["written_bytes"] / 2**20),
                       "worker_restarts": run["worker_restarts"],
                       "decoded_x": round(run["decoded_bytes"] / total, 3),
                       "mb_s_per_core": round(mbs, 1),
                       "over_one_thread_floor": round(mbs / one, 3),
                       "over_per_core_floor": round(mbs / per_core, 3)}  # fmt: skip
                emit_row(report, row, args.json)
    finally:
        close_bench(tmp, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
