"""Tiles read together, each with its share of one reading worker, against one after the other,
each with the whole worker, alternating in one process (the cube in the page cache, each read
against the one-thread decode floor measured just before it).

``together``: every tile of the cube read at once, as a run with ``tiles_in_flight`` equal to
the tiles reads them on one worker, each with its share of the worker's memory and spill disk
(``pipeline.reading.read_budget``); ``alone``: the tiles one after the other, each with the whole
worker's, as a run reads a tile whose plan decodes more with its share
(``pipeline.reading.read_alone``).

    python benchmarks/read_alone.py --size 1000 --scenes 600 --tiles 2 --layout strips \\
        --window 100 --memory-limit 6GiB --disk-gib 4 --rounds 2 --json alone.json
    python benchmarks/read_alone.py --cube /data/cube --window 100 --memory-limit 6GiB

``--disk-gib``: the free local disk the worker reports (half of it counted on for spilled pieces,
shared out among the tiles in flight), whatever its disk has.  Prints one JSON line per read:
seconds (of all tiles), read / one-thread floor, decoded / uncompressed bytes (counted) and as the
plans count them, read tasks and modes, the worker's CPU time, each tile's sections, gate and
spilling, pieces written to local disk, what Dask spilled, the worker's peak RSS and restarts
(``bench.real.measured_read``).
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    from treesits_dask.bench.measure import cube_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cube_arguments(p, workers=1, memory_limit="6GiB")
    p.add_argument("--disk-gib", type=float, default=4.0,
                   help="free local disk the worker reports (GiB)")  # fmt: skip
    p.add_argument("--variants", default="together,alone")
    p.set_defaults(tiles=2, size=1000, window=100, threads=2, rounds=2, layout="strips")
    args = p.parse_args(argv)

    from treesits_dask.bench.measure import (
        bench_cluster,
        bench_config,
        close_bench,
        cube_workdir,
        emit_row,
    )
    from treesits_dask.bench.real import files_bytes, floor_sample, measured_read, plan_bytes
    from treesits_dask.pipeline import reading
    from treesits_dask.pipeline.cluster import Routing
    from treesits_dask.pipeline.plan import make_plan

    tmp, wd, root = cube_workdir(args, "alone-")
    config = bench_config(root, wd, args.threads, args.memory_limit, args.window)
    count = len(make_plan(config).tiles)
    together = make_plan(config.model_copy(update={"tiles_in_flight": max(1, count)}))
    if count < 2:
        raise SystemExit(
            "read_alone.py compares tiles read together: give a cube of 2 tiles or more"
        )
    alone = make_plan(config.model_copy(update={"tiles_in_flight": 1}))
    _, total = files_bytes(together)
    sample = floor_sample(together)
    disks = reading.worker_disks
    report: dict = {"cube": str(root), "window": args.window, "threads": args.threads,
                    "memory_limit": args.memory_limit, "disk_gib": args.disk_gib,
                    "tiles": len(together.tiles), "uncompressed_mib": round(total / 2**20),
                    "reads": []}  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "reads"}), flush=True)
    cluster, client = bench_cluster(1, args.threads, args.memory_limit)
    try:
        info = client.scheduler_info(n_workers=-1)["workers"]
        reading.worker_disks = lambda _client: {a: int(args.disk_gib * 2**30) for a in info}
        variants = args.variants.split(",")
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                plan = together if variant == "together" else alone
                reads = reading.read_budget(
                    plan.config, info, Routing(), reading.worker_disks(None)
                )
                plans = [(t, reading.tile_read_plan(t, reads)) for t in plan.tiles]
                read = measured_read(plan, client, root, sample, total, args.threads,
                                     one_by_one=variant == "alone")  # fmt: skip
                planned = sum(reading.tile_decode(t, reads) for t in plan.tiles)
                row = {"round": r, "variant": variant, **read,
                       "planned_over_uncompressed": round(planned / plan_bytes(plan), 3),
                       "sections": [q.sections for _, q in plans],
                       "gate": [q.gate for _, q in plans],
                       "spills": [q.spills for _, q in plans]}  # fmt: skip
                emit_row(report, row, args.json)
    finally:
        reading.worker_disks = disks
        close_bench(tmp, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
