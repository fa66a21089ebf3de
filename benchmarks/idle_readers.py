"""Tiles whose read plan spills, run end to end (``run`` on a standing LocalCluster) with fewer
tiles in flight than reading workers, four ways alternating in one process, the cube in the page
cache: ``now``, the scheduler starting such tiles beyond ``tiles_in_flight``, one on each reading
worker that reads no tile, and Dask's work stealing leaving their reads where they are pinned
(``pipeline.plugins.PinnedReads``); ``stealing``, the same without that plugin; ``cap``, the
plugin without the tiles beyond ``tiles_in_flight``; ``before``, neither (the code before:
``tiles_in_flight`` a hard cap, the other reading workers idle, free to steal).

    python benchmarks/idle_readers.py --cube /data/cube --workers 2 --memory-limit 3GiB \
        --tiles-in-flight 1 --rounds 2 --json idle.json
    python benchmarks/idle_readers.py --tiles 2 --size 600 --scenes 600 --layout strips

A spilling tile is read on one reading worker (``pipeline.reading.spill_worker``), so with the
default of 2 tiles in flight a Kubernetes read group of 14 workers read with 2 of them.  On this
2-core machine the same ratio is 2 workers of 1 thread and 1 tile in flight.  Every tile has a
mask with one pixel per window (a forest mask that crosses every file block), so the run decodes
every block of every scene and predicts a few pixels: its time is the read's.  Prints one JSON
line per run: seconds, the seconds of each tile, pixels predicted.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path


def write_masks(plan, mask_dir: Path, window: int) -> None:
    """A mask per tile, ``<mask_dir>/<tile>/mask.tif``, 1 at the centre of every window."""
    import numpy as np
    import rasterio

    for tile in plan.tiles:
        g = tile.grid
        mask = np.zeros((g.height, g.width), np.uint8)
        mask[window // 2 :: window, window // 2 :: window] = 1
        (mask_dir / tile.tile).mkdir(parents=True, exist_ok=True)
        profile = dict(driver="GTiff", width=g.width, height=g.height, count=1, dtype="uint8",
                       crs=g.crs_wkt, transform=g.affine)  # fmt: skip
        with rasterio.open(mask_dir / tile.tile / "mask.tif", "w", **profile) as dst:
            dst.write(mask, 1)


def main(argv=None) -> int:
    from treesits_dask.bench.measure import cube_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cube_arguments(p, workers=2, memory_limit="3GiB")
    p.add_argument("--tiles-in-flight", type=int, default=1)
    args = p.parse_args(argv)

    from treesits_dask.bench.measure import (
        bench_cluster,
        bench_config,
        close_bench,
        cube_workdir,
        emit_row,
    )
    from treesits_dask.bench.pagecache import page_in
    from treesits_dask.pipeline import schedule
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.pipeline.plugins import PinnedReads
    from treesits_dask.pipeline.run import run

    tmp, wd, root = cube_workdir(args, "idle-readers-")
    base = bench_config(root, wd, args.threads, args.memory_limit, args.window)
    base = base.model_copy(update={"workers": args.workers, "cog": False,
                                   "tiles_in_flight": args.tiles_in_flight})  # fmt: skip
    write_masks(make_plan(base), wd / "masks", args.window)
    base = base.model_copy(update={"mask_dir": str(wd / "masks")})
    report: dict = {"cube": str(root), "window": args.window, "workers": args.workers,
                    "threads": args.threads, "memory_limit": args.memory_limit,
                    "tiles_in_flight": args.tiles_in_flight, "reads": []}  # fmt: skip
    idle_reader, register = schedule._Scheduler._idle_reader, schedule.register_pinned_reads
    variants = ("now", "stealing", "cap", "before")
    cluster, client = bench_cluster(args.workers, args.threads, args.memory_limit)
    try:
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                beyond, pinned = variant in ("now", "stealing"), variant in ("now", "cap")
                schedule._Scheduler._idle_reader = idle_reader if beyond else lambda *a: False
                schedule.register_pinned_reads = register if pinned else lambda c: False
                if not pinned:
                    with contextlib.suppress(ValueError):  # registered by the variant before
                        client.unregister_scheduler_plugin(PinnedReads.name)
                out = wd / f"out-{r}-{variant}"
                page_in(str(root))
                t0 = time.perf_counter()
                result = run(base.model_copy(update={"output": str(out)}), client=client)
                seconds = time.perf_counter() - t0
                shutil.rmtree(out, ignore_errors=True)
                if result.failed:
                    raise SystemExit(f"tiles failed: {result.failed}")
                row = {"round": r, "variant": variant, "seconds": round(seconds, 2),
                       "tile_seconds": {t: s["seconds"] for t, s in result.tiles.items()},
                       "pixels_predicted": result.pixels_predicted}  # fmt: skip
                emit_row(report, row, args.json)
    finally:
        schedule._Scheduler._idle_reader, schedule.register_pinned_reads = idle_reader, register
        close_bench(tmp, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
