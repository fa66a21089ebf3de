"""Read tasks per tile: one worker reads a striped tile in bands of scene batches, alternating
plans in one process (the machine's speed drifts between processes), with the cube in the page
cache before each read.

    python benchmarks/read_tasks.py --size 3000 --scenes 120 --threads 6 --memory-limit 48GiB \\
        --min-tasks 0,30,60 --rounds 2 --json tasks.json
    python benchmarks/read_tasks.py --size 1000 --scenes 60 --window 250 --threads 2 \\
        --memory-limit 12GiB --full-turns 0,0.9 --rounds 4

``--min-tasks``: the plan's least read tasks per tile (0: what the pipeline plans);
``--full-turns``: ``io.bands.FULL_TURNS`` instead (0: no batches added for the threads' turns).
Prints one JSON line per read (seconds, read tasks, MB/s per core against the one-thread floor
and the per-core floor on the worker's threads, measured once before the reads as ``bench --real``
measures them: ``bench.real.floors``, GDAL's block cache at 16 MiB).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=3000)
    p.add_argument("--scenes", type=int, default=120)
    p.add_argument("--window", type=int, default=250, help="square windows of this edge")
    p.add_argument("--threads", type=int, default=6)
    p.add_argument("--memory-limit", default="48GiB")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--min-tasks", default="0", help="comma-separated: plans to alternate")
    p.add_argument("--full-turns", default=None, help="comma-separated FULL_TURNS to alternate")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import treesits_dask.io.bands as bands
    import treesits_dask.io.layouts as layouts
    from treesits_dask.bench.measure import (
        bench_cluster,
        bench_config,
        benchmark_cube,
        close_bench,
        decode_run,
        emit_row,
    )
    from treesits_dask.bench.pagecache import page_in
    from treesits_dask.bench.real import files_bytes, floor_sample, floors
    from treesits_dask.pipeline.plan import make_plan

    tmp = tempfile.TemporaryDirectory(prefix="read-tasks-") if args.workdir is None else None
    wd = Path(args.workdir or tmp.name)
    root = benchmark_cube(None, wd, args.size, args.scenes, "strips")
    plan = make_plan(bench_config(root, wd, args.threads, args.memory_limit, args.window))
    files, total = files_bytes(plan)  # uncompressed bytes
    sample = floor_sample(plan)  # as bench --real's floors
    forced = {"min": 0, "tasks": None}
    original, full_turns = bands.plan_reads, bands.FULL_TURNS

    def plan_reads(*a, **k):
        if forced["min"]:
            k["min_tasks"] = forced["min"]
        got = original(*a, **k)
        forced["tasks"] = got.tasks
        return got

    # the tile's graph plans its reads through io.layouts (one plan per file layout), the read
    # mode reported through io.bands: both take the forced least tasks
    layouts.plan_reads = bands.plan_reads = plan_reads
    modes = (
        [("full_turns", float(v)) for v in args.full_turns.split(",")]
        if args.full_turns
        else [("min_tasks", int(v)) for v in args.min_tasks.split(",")]
    )
    report = {"size": args.size, "scenes": args.scenes, "window": args.window,
              "threads": args.threads, "memory_limit": args.memory_limit,
              "compressed_mib": round(sum(Path(f).stat().st_size for f, _ in files) / 2**20),
              "reads": []}  # fmt: skip
    cluster, client = bench_cluster(1, args.threads, args.memory_limit)
    try:
        one, per_core = (f["mb_s"] for f in floors(sample, args.threads))
        report["floor_mb_s"] = {"one_thread": one, f"per_core_on_{args.threads}": per_core}
        _log(f"floor {one:.0f} MB/s one thread, {per_core:.0f} per core on {args.threads}")
        for r in range(args.rounds):
            for key, value in modes:
                if key == "full_turns":
                    bands.FULL_TURNS = value
                else:
                    forced["min"] = value
                page_in(root)
                run = decode_run(plan, client)
                mbs = total / run["seconds"] / 1e6 / args.threads
                row = {"round": r, key: value, "seconds": round(run["seconds"], 2),
                       "read_tasks": forced["tasks"], "mb_s_per_core": round(mbs, 1),
                       "over_one_thread_floor": round(mbs / one, 3),
                       "over_per_core_floor": round(mbs / per_core, 3),
                       "decoded_x": round(run["decoded_bytes"] / total, 3),
                       "read_modes": run["read_modes"],
                       "spilled_mib": round(run["spilled_bytes"] / 2**20)}  # fmt: skip
                emit_row(report, row, args.json)
    finally:
        layouts.plan_reads = bands.plan_reads = original
        bands.FULL_TURNS = full_turns
        close_bench(tmp, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
