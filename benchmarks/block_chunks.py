"""COG windows smaller than the file blocks, read two ways alternating in one process (one worker,
the cube in the page cache, each read against the one-thread decode floor measured just before
it): ``blocks``, as the plan now reads them where the inference workers hold them, in chunks of
whole blocks that hold a window (``io.grid.block_chunk``: 256 x 256 px for 200 x 200 px windows);
``bands``, as before, in bands of whole block rows cut into the windows' pieces (which go
through the worker's local disk where its memory has no room for them).

    python benchmarks/block_chunks.py --size 1000 --scenes 600 --window 200 \\
        --memory-limit 12GiB --rounds 4 --json block_chunks.json
    python benchmarks/block_chunks.py --cube /data/cube --window 200 --memory-limit 12GiB

Prints one JSON line per read: seconds, read / one-thread floor, decoded / uncompressed bytes,
read tasks and mode, the worker's CPU time, the pieces written to local disk, what Dask spilled
and the worker's peak RSS during the read.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from treesits_dask.bench.measure import cube_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cube_arguments(p, workers=1, memory_limit="12GiB")
    p.set_defaults(tiles=1, size=1000, window=200, threads=2, rounds=4)
    args = p.parse_args(argv)
    if args.layout != "cog":
        p.error("--layout: only COG windows cut blocks into chunks of their own (strips: one plan)")

    from treesits_dask.bench.measure import (
        bench_cluster,
        bench_config,
        close_bench,
        cube_workdir,
        emit_row,
    )
    from treesits_dask.bench.real import files_bytes, floor_sample, measured_read
    from treesits_dask.pipeline import plan as plan_module
    from treesits_dask.pipeline.plan import make_plan

    tmp, wd, root = cube_workdir(args, "block-chunks-")
    config = bench_config(root, wd, args.threads, args.memory_limit, args.window)
    plans = {"blocks": make_plan(config)}
    chosen = plan_module.block_chunk
    plan_module.block_chunk = lambda grid, window: None  # the plan before: bands
    try:
        plans["bands"] = make_plan(config)
    finally:
        plan_module.block_chunk = chosen
    _, total = files_bytes(plans["blocks"])
    sample = floor_sample(plans["blocks"])
    report: dict = {"cube": str(root), "window": args.window, "threads": args.threads,
                    "memory_limit": args.memory_limit, "uncompressed_mib": round(total / 2**20),
                    "chunks": {k: list(v.tiles[0].reading.shape) for k, v in plans.items()},
                    "reads": []}  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "reads"}), flush=True)
    cluster, client = bench_cluster(args.workers, args.threads, args.memory_limit)
    try:
        for r in range(args.rounds):
            order = list(plans) if r % 2 == 0 else list(plans)[::-1]
            for variant in order:
                read = measured_read(plans[variant], client, root, sample, total, args.threads)
                row = {"round": r, "variant": variant, **read}
                emit_row(report, row, args.json)
    finally:
        close_bench(tmp, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
