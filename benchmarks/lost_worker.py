"""A reading worker lost in the middle of a spilling read: the rest of its tile's read pinned to
one other worker (``pipeline.plugins.PinnedReads``, the code now) against the tile's tasks left
to Dask (the plugin's hooks switched off: a loose restriction, which Dask's fallback for a lost
worker spreads over the workers, and work stealing as Dask does it), alternating, each read on a
fresh cluster of its own, the cube in the page cache.

    python benchmarks/lost_worker.py --cube /data/cube --workers 3 --memory-limit 1536MiB \\
        --kill-after 10 --rounds 2 --json lost.json

Every tile of the cube is read as ``run`` reads it (``bench.measure.decode_run``: each spilling
tile on one reading worker); ``--kill-after`` seconds into the read, the worker that reads the
first tile is killed (SIGKILL; its nanny starts a new one, as Kubernetes restarts a pod).  Prints
one JSON line per read: seconds, what Dask spilled, worker restarts (the kill included), or the
error that failed the read.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

#: the hooks of ``PinnedReads`` that the variant without it switches off
_HOOKS = ("transition", "remove_worker", "add_worker")


def _nothing(self, *args, **kwargs) -> None:
    """A hook of ``PinnedReads`` switched off."""


def main(argv=None) -> int:
    from treesits_dask.bench.measure import cube_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cube_arguments(p, workers=3, memory_limit="1536MiB", threads=False)
    p.add_argument("--kill-after", type=float, default=10.0, help="seconds into the read")
    args = p.parse_args(argv)

    from treesits_dask.bench.measure import bench_config, close_bench, cube_workdir, emit_row
    from treesits_dask.bench.pagecache import page_in
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.pipeline.plugins import PinnedReads

    tmp, wd, root = cube_workdir(args, "lost-worker-")
    config = bench_config(root, wd, 1, args.memory_limit, args.window)
    plan = make_plan(config.model_copy(update={"workers": args.workers}))
    report: dict = {"cube": str(root), "tiles": len(plan.tiles), "window": args.window,
                    "workers": args.workers, "memory_limit": args.memory_limit,
                    "kill_after": args.kill_after, "reads": []}  # fmt: skip
    hooks = {name: getattr(PinnedReads, name) for name in _HOOKS}
    try:
        for r in range(args.rounds):
            for moved in (True, False) if r % 2 == 0 else (False, True):
                # the scheduler runs in this process: Dask alone, the plugin's hooks doing nothing
                for name, hook in hooks.items():
                    setattr(PinnedReads, name, hook if moved else _nothing)
                page_in(str(root))
                row = {"round": r, "read_moved_together": moved, **_read(args, plan)}
                emit_row(report, row, args.json)
    finally:
        for name, hook in hooks.items():
            setattr(PinnedReads, name, hook)
        close_bench(tmp)
    return 0


def _read(args, plan) -> dict:
    """One read of every tile on a fresh cluster, the first tile's worker killed on the way."""
    from treesits_dask.bench.measure import bench_cluster, close_bench, decode_run

    cluster, client = bench_cluster(args.workers, 1, args.memory_limit)
    try:
        client.wait_for_workers(args.workers)
        first = sorted(client.scheduler_info()["workers"])[0]  # spill_worker's first choice
        pid = client.run(os.getpid, workers=[first])[first]
        killer = threading.Timer(args.kill_after, os.kill, (pid, signal.SIGKILL))
        killer.start()
        t0 = time.perf_counter()
        try:
            run = decode_run(plan, client, pin=True)
        except Exception as exc:  # noqa: BLE001 - a failed read is a result here
            return {"seconds": round(time.perf_counter() - t0, 2),
                    "failed": f"{type(exc).__name__}: {str(exc)[:200]}"}  # fmt: skip
        finally:
            killer.cancel()
        return {"seconds": round(run["seconds"], 2),
                "spilled_mib": round(run["spilled_bytes"] / 2**20),
                "worker_restarts": run["worker_restarts"]}  # fmt: skip
    finally:
        close_bench(None, client, cluster)


if __name__ == "__main__":
    sys.exit(main())
