"""`run` on a tile streamed through the model (``stream: always``, the published LSTM's shapes
with random weights: 2 layers of 64, about 1 KB of state per pixel) with the map's windows of
several sizes, on one worker that reads and predicts and counts on no local disk: the time, what
Dask spilled to disk, the most memory the windows' model states held in the worker, and its peak.

A streamed tile's windows each carry their model state from the first batch of scenes to the last,
so the windows that cross a band of the tile keep their states while it is read.  The map's
200 x 200 px windows on 300-row strips cross two strips, 1000 px windows three; a streamed tile is
now stepped in windows one band high instead (``io.bands.stream_windows``), its outputs rechunked
to the map's.  Run it from the tree to measure (``PYTHONPATH=TREE``, run from another directory,
measures another tree's code with this script):

    python benchmarks/stream_windows.py --cube CUBE --windows 200,1000 --memory-limit 3GiB \\
        --rounds 1 --json report.json

Prints one JSON line per run: seconds (and the error where the tile failed), bytes decoded, bytes
Dask spilled to the worker's disk, the most the states held in its memory (sampled every second),
the times Dask paused it for memory, the workers restarted by their nanny, and the worker's peak
RSS (its process's high-water mark; that of a restarted worker's new process).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys


def main(argv=None) -> int:
    from treesits_dask.bench.measure import cube_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cube_arguments(p, workers=1, memory_limit="3GiB")
    p.add_argument(
        "--windows",
        default="200,1000",
        help="comma list of square window edges (in place of --window)",
    )
    p.set_defaults(tiles=1, size=3000, scenes=12, threads=2, rounds=1, layout="strips")
    args = p.parse_args(argv)

    from treesits_dask.bench.measure import (
        bench_cluster,
        bench_config,
        close_bench,
        cube_workdir,
        emit_row,
        measured_run,
        no_local_disk,
    )
    from treesits_dask.pipeline import schedule

    tmp, wd, root = cube_workdir(args, "stream-windows-")
    windows = [int(w) for w in args.windows.split(",")]
    report: dict = {"cube": str(root), "windows": windows, "threads": args.threads,
                    "memory_limit": args.memory_limit, "reads": []}  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "reads"}), flush=True)
    disks = schedule.worker_disks
    cluster, client = bench_cluster(args.workers, args.threads, args.memory_limit)
    schedule.worker_disks = no_local_disk  # nothing spills by the plan
    try:
        for r in range(args.rounds):
            for window in windows if r % 2 == 0 else windows[::-1]:
                out = wd / f"out-{r}-{window}"
                config = bench_config(root, wd, args.threads, args.memory_limit, window)
                config = config.model_copy(update={"output": str(out), "stream": "always"})
                measured, _ = measured_run(client, config)
                emit_row(report, {"round": r, "window": window, **measured}, args.json)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        schedule.worker_disks = disks
        close_bench(tmp, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
