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


def _states(dask_worker) -> int:
    """Bytes of the streamed states (the step tasks' results) in this worker's memory now."""
    fast = getattr(getattr(dask_worker, "data", None), "fast", None)
    weights = getattr(fast, "weights", None) or {}
    return sum(v for k, v in list(weights.items()) if "stream-step-" in str(k))


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
        MostSampled,
        bench_cluster,
        bench_config,
        close_bench,
        cube_workdir,
        decoded,
        emit_row,
        paused_times,
        reset_vm_hwm,
        spilled,
        vm_hwm,
        worker_pids,
        worker_restarts,
    )
    from treesits_dask.pipeline import schedule
    from treesits_dask.pipeline.run import RunError, run

    tmp, wd, root = cube_workdir(args, "stream-windows-")
    windows = [int(w) for w in args.windows.split(",")]
    report: dict = {"cube": str(root), "windows": windows, "threads": args.threads,
                    "memory_limit": args.memory_limit, "reads": []}  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "reads"}), flush=True)
    disks = schedule.worker_disks

    def none(client, workers=None):  # no local disk counted on: nothing spills by the plan
        return dict.fromkeys(workers or client.scheduler_info(n_workers=-1)["workers"], 0)

    cluster, client = bench_cluster(args.workers, args.threads, args.memory_limit)
    schedule.worker_disks = none
    try:
        for r in range(args.rounds):
            for window in windows if r % 2 == 0 else windows[::-1]:
                out = wd / f"out-{r}-{window}"
                config = bench_config(root, wd, args.threads, args.memory_limit, window)
                config = config.model_copy(update={"output": str(out), "stream": "always"})
                pids = worker_pids(client)
                before = sum(v[1] for v in client.run(decoded).values())
                spill, paused = (
                    sum(client.run(spilled).values()),
                    sum(client.run(paused_times).values()),
                )
                client.run(reset_vm_hwm)
                error, seconds = None, None
                with MostSampled(lambda: sum(client.run(_states).values()), 1.0) as states:
                    try:
                        seconds = round(run(config, client=client).seconds, 1)
                    except RunError as e:
                        error = str(e)[:300]
                restarts = worker_restarts(pids, worker_pids(client))
                after = sum(v[1] for v in client.run(decoded).values())
                row = {"round": r, "window": window, "seconds": seconds, "error": error,
                       "decoded_gb": None if restarts else round((after - before) / 1e9, 2),
                       "dask_spilled_gb": None if restarts
                       else round((sum(client.run(spilled).values()) - spill) / 1e9, 2),
                       "most_states_in_memory_gib": round(states.most / 2**30, 2),
                       "paused_for_memory": None if restarts
                       else sum(client.run(paused_times).values()) - paused,
                       "worker_restarts": restarts,
                       "peak_worker_rss_gib": {a: round(v / 2**30, 2) if v else None
                                               for a, v in client.run(vm_hwm).items()}}  # fmt: skip
                emit_row(report, row, args.json)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        schedule.worker_disks = disks
        close_bench(tmp, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
