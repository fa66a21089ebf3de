"""``mask``, ``demo``, ``quicklook`` and ``bench``: flags and commands."""

from __future__ import annotations

import argparse
import sys

__all__ = [
    "add_mask_arguments",
    "add_quicklook_arguments",
    "cmd_bench",
    "cmd_demo",
    "cmd_mask",
    "cmd_quicklook",
]


def add_mask_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--worldcover",
        required=True,
        help="folder or s3:// prefix with ESA_WorldCover_10m_*_Map.tif",
    )
    p.add_argument(
        "--cube", required=True, help="FORCE datacube root (its .prj defines the tile grid)"
    )
    p.add_argument(
        "--tiles", default="all", help="tile ids, a FORCE tile-list file, or 'all' (default)"
    )
    p.add_argument("--output", required=True, help="mask folder (use it as --mask-dir of run)")
    p.add_argument(
        "--classes", default="10", help="WorldCover classes that count as forest (default 10)"
    )
    p.add_argument("--overwrite", action="store_true", help="rebuild masks that exist")
    p.add_argument("--window", type=int, default=1000, help="pixels per task edge (default 1000)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads-per-worker", type=int, default=None)
    p.add_argument("--dashboard-address", default=None)


def cmd_mask(args: argparse.Namespace) -> int:
    from .. import build_masks, connect
    from ..config import load_config

    config = load_config(
        overrides={
            "cube": args.cube,
            "output": args.output,
            "tiles": args.tiles,
            "workers": args.workers,
            "threads_per_worker": args.threads_per_worker,
            "dashboard_address": args.dashboard_address,
        }
    )
    classes = [int(c) for c in args.classes.split(",")]
    with connect(config) as client:
        print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        built = build_masks(
            args.worldcover,
            config.cube,
            config.tiles,
            config.output,
            classes=classes,
            overwrite=args.overwrite,
            client=client,
            window=args.window,
        )
    for tile, url in built.items():
        print(f"{tile}: {url}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    run_demo(args.workdir, size=args.size, n_scenes=args.scenes, train_seconds=args.train_seconds)
    return 0


def add_quicklook_arguments(p: argparse.ArgumentParser) -> None:
    from ..outputs.quicklook import MAX_SIZE

    p.add_argument("output", help="the run's output location (local path or s3:// URL)")
    p.add_argument(
        "--out-dir", default=None, help="folder for the PNGs (default <output>/quicklook)"
    )
    p.add_argument("--tiles", default=None, help="comma-separated tiles (default: all under cog/)")
    p.add_argument("--no-mosaic", action="store_true", help="skip the mosaic quicklooks")
    p.add_argument(
        "--max-size",
        type=int,
        default=MAX_SIZE,
        help=f"long side in pixels of the raster read per map (default {MAX_SIZE})",
    )
    p.add_argument("--stac", action="store_true", help="also write <output>/stac/catalog.json")


def cmd_quicklook(args: argparse.Namespace) -> int:
    """PNG quicklooks per tile and for the mosaic; ``--stac`` also writes the STAC catalog."""
    from .. import quicklook, write_stac

    tiles = [t for t in args.tiles.split(",") if t] if args.tiles else None
    written = quicklook(
        args.output, args.out_dir, tiles=tiles, mosaic=not args.no_mosaic, max_size=args.max_size
    )
    if args.stac:
        written.append(write_stac(args.output, quicklook_dir=args.out_dir))
    for url in written:  # the command's result, for scripts: one written URL per line
        print(url)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if "--gpu" in args.bench_args:  # the device check (issue 15): its own flags
        from ..bench.gpu_check import main as gpu_main

        return gpu_main([a for a in args.bench_args if a != "--gpu"])
    if "--real" in args.bench_args:  # real-size reading (issue 14): its own flags
        from ..bench.real import main as real_main

        return real_main([a for a in args.bench_args if a != "--real"])
    from ..bench.throughput import main as bench_main

    return bench_main(args.bench_args)
