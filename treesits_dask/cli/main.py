"""Command line: ``python -m treesits_dask
{run,plan,update,versions,export,changes,mask,demo,quicklook,bench,train,evaluate,sample}``.

The only place that configures logging and draws progress bars; each command is a thin layer
over the public API (:mod:`treesits_dask`).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from ..errors import TreesitsError
from ..version import __version__
from .run import add_run_flags, cmd_plan, cmd_run, cmd_update
from .tools import (
    add_mask_arguments,
    add_quicklook_arguments,
    cmd_bench,
    cmd_demo,
    cmd_mask,
    cmd_quicklook,
)
from .training import (
    add_evaluate_arguments,
    add_sample_arguments,
    add_train_arguments,
    cmd_evaluate,
    cmd_sample,
    cmd_train,
)
from .versions import (
    add_changes_arguments,
    add_export_arguments,
    add_versions_arguments,
    cmd_changes,
    cmd_export,
    cmd_versions,
)

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m treesits_dask",
        description="Tree-species / disturbance maps from FORCE Sentinel-2 datacubes with "
        "PyTorch on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"treesits_dask {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "run", help="predict tiles into the versioned map (Zarr in an Icechunk repository) + COGs"
    )
    add_run_flags(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "plan",
        help="dry run: tiles, scenes, windows, memory estimate, cluster, each tile's read plan "
        "(JSON; a warning per tile whose read would decode its blocks more than once)",
    )
    add_run_flags(p)
    p.add_argument(
        "--render",
        metavar="DIR",
        help="also write every Kubernetes object the run needs (DaskCluster, "
        "DaskWorkerGroup, RBAC, CronJob, NetworkPolicies, ConfigMap with --config) to DIR",
    )
    p.add_argument(
        "--kube-version",
        metavar="1.N",
        help="with --render: the Kubernetes version to render for (1.23 or newer; default the "
        "kubernetes.kube_version setting, 1.26); fields it lacks are left out, and before 1.25 "
        "a PodSecurityPolicy is added",
    )
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "update",
        help="process only tiles with new or changed scenes (or a new "
        "model); prints what it does and why",
    )
    add_run_flags(p)
    p.set_defaults(func=cmd_update)

    p = sub.add_parser(
        "mask", help="build <output>/<tile>/mask.tif forest masks from ESA WorldCover tiles"
    )
    add_mask_arguments(p)
    p.set_defaults(func=cmd_mask)

    p = sub.add_parser(
        "demo", help="build a synthetic FORCE cube, train a small LSTM, run the pipeline"
    )
    p.add_argument(
        "--workdir", default="demo-output", help="folder for the cube, model and outputs"
    )
    p.add_argument("--size", type=int, default=300, help="tile edge in pixels (default 300)")
    p.add_argument("--scenes", type=int, default=36, help="scenes per tile (default 36)")
    p.add_argument(
        "--train-seconds", type=float, default=60.0, help="training time limit (default 60)"
    )
    p.set_defaults(func=cmd_demo)

    _add_map_commands(sub)

    p = sub.add_parser(
        "quicklook", help="PNG maps per tile and for the mosaic (+ STAC catalog with --stac)"
    )
    add_quicklook_arguments(p)
    p.set_defaults(func=cmd_quicklook)

    # add_help=False: `bench --help` shows the options of the benchmark itself
    p = sub.add_parser(
        "bench", add_help=False, help="throughput / memory benchmark (JSON); see `bench --help`"
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "train",
        help="train or fine-tune a model on reference samples (points or "
        "per-sample CSVs); writes a native model + card",
    )
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser(
        "evaluate",
        help="overall accuracy, per-class precision/recall/F1 and the "
        "confusion matrix of a model on reference samples",
    )
    add_evaluate_arguments(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser(
        "sample",
        help="a stratified random sample of a map for a field campaign (sizes per class from "
        "target standard errors)",
    )
    add_sample_arguments(p)
    p.set_defaults(func=cmd_sample)
    return parser


def _add_map_commands(sub) -> None:
    """``versions``, ``export``, ``changes``: the history of an output's map."""
    p = sub.add_parser(
        "versions", help="list the versions of an output's map (one per run that changed it)"
    )
    add_versions_arguments(p)
    p.set_defaults(func=cmd_versions)
    p = sub.add_parser(
        "export", help="write the COGs and mosaics of the map as of a version (--as-of)"
    )
    add_export_arguments(p)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "changes",
        help="pixels whose class (or disturbance state) changed between two versions",
    )
    add_changes_arguments(p)
    p.set_defaults(func=cmd_changes)


def _configure_logging(verbose: int) -> None:
    if verbose == 0:  # before distributed is imported; spawned workers inherit it
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    level = [logging.INFO, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose == 0:
        for noisy in ("distributed", "rasterio", "botocore", "s3fs", "fsspec", "numcodecs"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":  # e.g. `bench --help`: argparse leaves leading options out
        args.bench_args = extra + args.bench_args
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _configure_logging(args.verbose)

    def _terminate(signum, frame):  # a CronJob deadline or `kubectl delete`: clean up the cluster
        raise SystemExit(143)

    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not in the main thread (e.g. called from a notebook thread)
        pass
    try:
        return args.func(args)
    except TreesitsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
