"""The memory guard's read plans, read two ways alternating in one process (one worker, the cube in
the page cache, each read against the one-thread decode floor measured just before it).

For a tile whose bands of all scenes fit neither the reading worker's memory nor its spill disk:
``gate``, as the plan now reads them where fewer bands fit (at least those a window crosses),
over the full width, each band's reads waiting for the windows of an earlier band (every block
decoded once; where not even those fit, as the plan reads it then: in sections, with a gate
where needed); ``sections``, as before the gate, the tile in sections of whole window columns
side by side, each in bands of its own width (a full-width strip decoded once per section);
``runs``, as before the sections, window by window, a run of a window row's windows side by side
per read task (a strip decoded once per run); ``sections-75``, the plan as it was before a
section's bands were held in memory only within half the worker (``in_memory_bytes``; beyond it
they spill, or without a spill disk the sections are narrower): held up to 75 % (``held_bytes``).

For a tile whose windows cross its bands, which fit the memory held bands may fill (75 % of the
worker's) but not half of it: ``whole-50``, as it is now read, as a plan that spills (pieces of
their own, kept in memory while the worker has room); ``whole-75``, as before, its bands held
whole in memory up to 75 % (``pipeline.reading.IN_MEMORY_SHARE`` set to ``HELD_SHARE``).

    python benchmarks/sections.py --size 1000 --scenes 600 --layout strips --window 100 \\
        --memory-limit 3GiB --spill-gib 0 --rounds 2 --json sections.json
    python benchmarks/sections.py --cube /data/cube --layout strips --window 100
    python benchmarks/sections.py --cube /data/cube-3000-120 --layout strips --window 200 \\
        --memory-limit 12GiB --spill-gib 100 --variants whole-50,whole-75

``--spill-gib``: the local disk the plan may count on for spilled pieces, per tile (0: none,
as where the worker's disk is full or small; the default), so that the full-width bands fit
neither.  ``--tiles-in-flight``: the run's setting (1: a tile's bands get 75 % of the worker's
memory, half of it held whole where windows cross them).  ``--variants``: the plans read
(default ``gate,sections``).  Prints one JSON line per read: seconds, read / one-thread floor,
decoded / uncompressed bytes (counted) and as the plan counts them, read tasks and mode, the
worker's CPU time, the pieces written to local disk, what Dask spilled, the most piece files on
disk and data in Dask's memory at once (sampled every 50 ms) and the worker's peak RSS during
the read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys


def _start_sampling(dask_worker) -> None:
    """Sample, every 50 ms until :func:`_stop_sampling`, the bytes of the piece files on the
    worker's local disk and of the data Dask holds in its memory."""
    import os
    import threading
    import time

    state = {"disk": 0, "memory": 0, "both": 0, "run": True}
    directory = os.path.join(dask_worker.local_directory, f"treesits-pieces-{os.getpid()}")

    def files() -> int:
        try:
            return sum(e.stat().st_size for e in os.scandir(directory))
        except FileNotFoundError:  # not made yet, or a file removed while listed
            return 0

    def loop() -> None:
        while state["run"]:
            fast = getattr(dask_worker.data, "fast", None)  # a plain dict: no spilling
            disk, memory = files(), fast.total_weight if fast is not None else 0
            state["disk"], state["memory"] = max(state["disk"], disk), max(state["memory"], memory)
            state["both"] = max(state["both"], disk + memory)
            time.sleep(0.05)

    dask_worker._sections_sampling = state
    threading.Thread(target=loop, daemon=True, name="sections-sampling").start()


def _stop_sampling(dask_worker) -> dict:
    import time

    state = getattr(dask_worker, "_sections_sampling", None)
    if state is None:  # a worker that was restarted during the read: its samples are lost
        return {"disk": 0, "memory": 0, "both": 0}
    state["run"] = False
    time.sleep(0.1)
    return {k: v for k, v in state.items() if k != "run"}


def main(argv=None) -> int:
    from treesits_dask.bench.measure import cube_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cube_arguments(p, workers=1, memory_limit="3GiB")
    p.add_argument("--spill-gib", type=float, default=0.0,
                   help="local disk a tile's spilled pieces may fill (GiB)")  # fmt: skip
    p.add_argument("--tiles-in-flight", type=int, default=1)
    p.add_argument("--variants", default="gate,sections",
                   help="the plans read, comma-separated (gate, sections, runs, sections-75, "
                        "whole-50, whole-75)")  # fmt: skip
    p.set_defaults(tiles=1, size=1000, window=100, threads=2, rounds=2, layout="strips")
    args = p.parse_args(argv)

    from treesits_dask.bench.measure import (
        bench_cluster,
        bench_config,
        close_bench,
        cube_workdir,
        emit_row,
    )
    from treesits_dask.bench.real import files_bytes, floor_sample, measured_read, plan_bytes
    from treesits_dask.io import bands
    from treesits_dask.io.bands import planned_decode
    from treesits_dask.pipeline import reading
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.pipeline.reading import tile_read_plan

    tmp, wd, root = cube_workdir(args, "sections-")
    config = bench_config(root, wd, args.threads, args.memory_limit, args.window)
    plan = make_plan(config.model_copy(update={"tiles_in_flight": args.tiles_in_flight}))
    budget = reading.read_budget

    def read_budget(*a, **k):  # the spill disk the plan counts on, whatever the worker's disk
        return dataclasses.replace(budget(*a, **k), spill_bytes=int(args.spill_gib * 2**30))

    reading.read_budget = read_budget
    # each variant: what it patches, (module, attribute, the value it reads with)
    gate, sectioned, whole = bands._gate, bands._sectioned, reading.IN_MEMORY_SHARE

    def none(*args, **kwargs):
        return None

    def held_75(*args, **kwargs):  # sections held in memory up to HELD_SHARE, as before
        return sectioned(*args, **{**kwargs, "in_memory_bytes": None})

    variants = {
        "gate": [],
        "sections": [(bands, "_gate", none)],
        "runs": [(bands, "_gate", none), (bands, "_sectioned", none)],
        "sections-75": [(bands, "_sectioned", held_75)],
        "whole-50": [(reading, "IN_MEMORY_SHARE", whole)],
        "whole-75": [(reading, "IN_MEMORY_SHARE", reading.HELD_SHARE)],
    }
    variants = {v: variants[v] for v in args.variants.split(",")}
    _, total = files_bytes(plan)
    sample = floor_sample(plan)
    report: dict = {"cube": str(root), "window": args.window, "threads": args.threads,
                    "memory_limit": args.memory_limit, "spill_gib": args.spill_gib,
                    "tiles_in_flight": args.tiles_in_flight,
                    "uncompressed_mib": round(total / 2**20),
                    "chunk": list(plan.tiles[0].reading.shape), "reads": []}  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "reads"}), flush=True)
    cluster, client = bench_cluster(args.workers, args.threads, args.memory_limit)
    try:
        from treesits_dask.pipeline.cluster import Routing

        info = client.scheduler_info(n_workers=-1)["workers"]
        disks = reading.worker_disks(client)
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            for variant in order:
                for target, attribute, value in variants[variant]:
                    setattr(target, attribute, value)
                try:
                    reads = read_budget(plan.config, info, Routing(), disks)
                    plans = [(t, tile_read_plan(t, reads)) for t in plan.tiles]
                    planned = sum(
                        planned_decode(t.grid, t.reading, p, len(t.scenes)) for t, p in plans
                    )
                    client.run(_start_sampling)
                    read = measured_read(plan, client, root, sample, total, args.threads)
                    (sampled,) = client.run(_stop_sampling).values()
                finally:
                    bands._gate, bands._sectioned = gate, sectioned
                    reading.IN_MEMORY_SHARE = whole
                row = {"round": r, "variant": variant, **read,
                       "planned_over_tile": round(planned / plan_bytes(plan), 3),
                       # each tile's plan: sections, bands held at once behind a gate (0: none)
                       "sections": [p.sections for _, p in plans],
                       "gate": [p.gate for _, p in plans],
                       # at once, sampled every 50 ms: piece files on disk, Dask's data in
                       # memory, both together
                       "peak_piece_files_gib": round(sampled["disk"] / 2**30, 2),
                       "peak_managed_gib": round(sampled["memory"] / 2**30, 2),
                       "peak_held_gib": round(sampled["both"] / 2**30, 2)}  # fmt: skip
                emit_row(report, row, args.json)
    finally:
        reading.read_budget = budget
        close_bench(tmp, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
