"""A tile in two file layouts (FORCE < 3.8 strips for its older scenes, FORCE >= 3.8 COGs for its
newer ones) streamed through the model (``stream: always``), two ways alternating on one worker:
``stages``, as a run streams it, one stage per run of scenes in one layout, each read in blocks
of its own and stepped in windows of its own (``pipeline.streaming.stages_layer``);
``one-plan``, as before, one streamed plan for all scenes, made for the layout of most.

    python benchmarks/stream_layouts.py --strips STRIPS_CUBE --cogs COG_CUBE --each 60 \\
        --window 250 --memory-limit 12GiB --rounds 2 --workdir /data/wd --json report.json
    python benchmarks/stream_layouts.py ... --each 40 --cog-scenes 80 --required  # most COGs
    python benchmarks/stream_layouts.py ... --each 16 --alternate 4 --max-stages 8  # 8 runs

The tile is made of hard links as ``benchmarks/layouts.py`` makes it (``--alternate``: its
layouts alternate every that many scenes; ``--max-stages``: the ``stages`` variant streams in
stages up to that many runs, ``io.layouts.STREAM_STAGES``, beyond which it streams as a run
does: in stages only where they pay, ``io.layouts.STAGE_COST``; the report's ``run_streams``
says which way a run streams the tile as it is).  Its mask holds one pixel every ``--every`` px
in both directions (0.4 % of the tile at 16), so that every block of every file holds a
masked-in pixel (the read decodes all of them, as an unmasked one) while the model (``sits-lstm``
of the published shapes, random weights) steps few pixels: the run measures the reading and the
streaming, not the LSTM on 9 million pixels.  Prints one JSON line per run: its
seconds, the bytes the worker decoded (BOA and QAI files) over those files' uncompressed bytes
(counted; blocks whose masked pixels the QAI flags are not decoded), the plans' count of the
BOAs' over theirs, what Dask spilled, the most the states held and the worker's peak RSS
(``bench.measure.measured_run``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def lattice_mask(root: Path, tile: str, every: int, out: Path) -> str:
    """A mask directory under ``out`` for ``tile`` of the cube at ``root``: 1 on the pixels
    ``(every // 2 + k * every, every // 2 + l * every)``, else 0, on the tile's grid."""
    import numpy as np
    import rasterio

    boa = next((root / tile).glob("*_BOA.tif"))
    with rasterio.open(boa) as src:
        profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 1,
                   "dtype": "uint8", "crs": src.crs, "transform": src.transform,
                   "compress": "deflate", "tiled": True}  # fmt: skip
    mask = np.zeros((profile["height"], profile["width"]), np.uint8)
    mask[every // 2 :: every, every // 2 :: every] = 1
    (out / tile).mkdir(parents=True, exist_ok=True)
    with rasterio.open(out / tile / "mask.tif", "w", **profile) as dst:
        dst.write(mask[None])
    return str(out)


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from layouts import mixed_arguments, mixed_tile

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mixed_arguments(p)
    p.add_argument("--every", type=int, default=16, help="a mask pixel every this many px")
    p.add_argument("--max-stages", type=int, default=None,
                   help="stream in stages up to this many runs of scenes in one layout "
                   "(default: io.layouts.STREAM_STAGES); beyond, as a run does")  # fmt: skip
    p.add_argument("--required", action="store_true",
                   help="stream the tile as one whose windows of all scenes the inference "
                   "workers cannot hold (``required``): a tile of most scenes COGs, read in "
                   "chunks of whole blocks, is streamed only so")  # fmt: skip
    args = p.parse_args(argv)

    from treesits_dask.bench.measure import (
        bench_cluster,
        bench_config,
        close_bench,
        emit_row,
        measured_run,
    )
    from treesits_dask.bench.real import files_bytes
    from treesits_dask.io import layouts
    from treesits_dask.io.layouts import layout_runs
    from treesits_dask.pipeline import plan as planning
    from treesits_dask.pipeline import reading, schedule
    from treesits_dask.pipeline.plan import make_plan

    stream, cap = planning._stream, layouts.STREAM_STAGES
    if args.max_stages is not None:
        layouts.STREAM_STAGES = args.max_stages
    if args.required:
        planning._stream = lambda config, card: "required"

    wd = Path(args.workdir)
    root = mixed_tile(args)
    masks = lattice_mask(root, args.tile, args.every, wd / "masks")
    config = bench_config(root, wd, args.threads, args.memory_limit, args.window)
    config = config.model_copy(update={"stream": "always", "mask_dir": masks, "cog": False})
    plan = make_plan(config)
    (tile,) = plan.tiles
    files, total = files_bytes(plan)
    boa = sum(n for f, n in files if f.endswith("_BOA.tif"))
    report: dict = {
        "cube": str(root), "window": args.window, "threads": args.threads,
        "memory_limit": args.memory_limit, "uncompressed_gb": round(total / 1e9, 2),
        "mask_every_px": args.every, "grid_blocks": list(tile.grid.block_shape),
        "alternate": args.alternate, "max_stages": layouts.STREAM_STAGES,
        "stream": tile.stream,
        "runs": [[f"{r.grid.block_shape[0]}x{r.grid.block_shape[1]}", len(r.indices)]
                 for r in layout_runs(tile.scenes, tile.grid)],
        "reads": [],
    }  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "reads"}), flush=True)
    own = reading.stream_stages

    def variant_on(name: str) -> None:
        fn = own if name == "stages" else (lambda tile, reads, plan=None: ())
        reading.stream_stages = schedule.stream_stages = fn

    cluster, client = bench_cluster(1, args.threads, args.memory_limit)
    try:
        reads = schedule.read_budget(
            config,
            client.scheduler_info(n_workers=-1)["workers"],
            schedule.declared_routing(config) or schedule.Routing(),
        )
        layouts.STREAM_STAGES = cap  # what a run does with this tile (STAGE_COST beyond the cap)
        report["run_streams"] = "stages" if own(tile, reads) else "one-plan"
        layouts.STREAM_STAGES = cap if args.max_stages is None else args.max_stages
        print(json.dumps({"run_streams": report["run_streams"]}), flush=True)
        for r in range(args.rounds):
            for name in ("stages", "one-plan") if r % 2 == 0 else ("one-plan", "stages"):
                variant_on(name)
                out = wd / f"out-{r}-{name}"
                measured, done = measured_run(
                    client, config.model_copy(update={"output": str(out)})
                )
                planned = reading.tile_decode(tile, reads)
                row = {"round": r, "variant": name, **measured,
                       "decoded_over_files": None if done is None else round(done / total, 3),
                       "planned_over_boa": round(planned / boa, 3)}  # fmt: skip
                emit_row(report, row, args.json)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        variant_on("stages")
        planning._stream, layouts.STREAM_STAGES = stream, cap
        close_bench(None, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
