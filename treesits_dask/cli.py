"""Command line: ``python -m treesits_dask {run,plan,update,demo,quicklook,bench,train,evaluate}``.

The only place that configures logging and draws progress bars.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from . import __version__
from .errors import TreesitsError

log = logging.getLogger("treesits_dask")

# flag -> config key; flags that are not given do not override YAML/env values
_RUN_FLAGS = [
    ("--cube", dict(help="FORCE Level-2 datacube root (holds datacube-definition.prj)")),
    ("--tiles", dict(help="comma-separated tile ids (X0069_Y0043,...), a FORCE tile-list file, or 'all'")),
    ("--output", dict(help="output directory (predictions.zarr, cog/, run.json)")),
    ("--model", dict(help="checkpoint: SITS-NN state dict, SBERT checkpoint, or native .pt (card .json beside it)")),
    ("--model-family", dict(choices=["sbert", "sits-lstm", "sits-transformer", "native"],
                            help="how to read --model (default native)")),
    ("--model-params", dict(help="SITS-NN *_params.json with the hyper-parameters (sits-lstm, sits-transformer)")),
    ("--start-date", dict(help="first scene date YYYY-MM-DD (sbert: the window is at most 1460 days)")),
    ("--end-date", dict(help="last scene date YYYY-MM-DD (default: the newest scene)")),
    ("--sensors", dict(help="comma-separated FORCE sensors (default SEN2A,SEN2B,SEN2C)")),
    ("--mask-dir", dict(help="folder with <tile>/<mask-name> forest masks (value > 0 = predict)")),
    ("--mask-name", dict(help="mask file name or glob inside <mask-dir>/<tile>/ (default mask.tif)")),
    ("--mask-worldcover", dict(help="ESA WorldCover folder or s3:// prefix: build missing masks on the fly "
                                    "into --mask-dir (default <output>/masks)")),
    ("--mask-classes", dict(help="WorldCover classes that count as forest (default 10 = tree cover)")),
    ("--qai", dict(help="QAI screening: default (FORCE's), none, or a comma list of flags")),
    ("--batch-size", dict(type=int, help="pixels per model batch (default 2048)")),
    ("--window", dict(help="window size: auto (default), N or ROWSxCOLS pixels; must divide the tile")),
    ("--workers", dict(type=int, help="LocalCluster worker processes (default: cores / threads-per-worker)")),
    ("--threads-per-worker", dict(type=int, help="threads per worker; on CPU also the cores its torch forwards share (default min(cores, 4))")),
    ("--memory-limit", dict(help="memory limit per LocalCluster worker (default auto)")),
    ("--scheduler-address", dict(help="use an existing Dask scheduler (tcp://host:8786) instead of a LocalCluster")),
    ("--device", dict(help="torch device: auto (CUDA if available), cpu, cuda, cuda:N")),
    ("--tiles-in-flight", dict(type=int, help="tiles processed at once (default 2)")),
    ("--dashboard-address", dict(help="LocalCluster dashboard address (default :8787)")),
    ("--cluster", dict(choices=["local", "kubernetes"], help="where to run: local (default) or kubernetes")),
    ("--s3-endpoint-url", dict(help="S3 endpoint (default: $AWS_ENDPOINT_URL), e.g. https://s3.example.org")),
    ("--s3-region", dict(help="S3 region (default: $AWS_REGION), e.g. RegionOne")),
    ("--s3-addressing", dict(choices=["auto", "path", "virtual"],
                             help="S3 addressing style (auto: path-style with a custom endpoint)")),
]


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file with the same settings (keys as flags, '_' for '-'); flags override it")
    for flag, kw in _RUN_FLAGS:
        p.add_argument(flag, **kw)
    p.add_argument("--no-cog", dest="cog", action="store_false", default=None, help="write only the Zarr store")
    p.add_argument("--force", action="store_true", default=None,
                   help="redo tiles whose ledger record says they are up to date")


def _overrides(args: argparse.Namespace) -> dict:
    out = {}
    for flag, _ in _RUN_FLAGS:
        key = flag[2:].replace("-", "_")
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    for key in ("cog", "force"):
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    return out


class _Progress:
    """tqdm progress bar over windows, log lines per tile."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, total_windows: int, dashboard_link: str | None) -> None:
        from tqdm.auto import tqdm

        if dashboard_link:
            print(f"Dask dashboard: {dashboard_link}", file=sys.stderr, flush=True)
        self.bar = tqdm(total=total_windows, unit="window", desc="predict", file=sys.stderr)

    def window_done(self, tile: str) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(tile)

    def tile_done(self, tile: str, stats: dict) -> None:
        pass

    def tile_failed(self, tile: str, error: str) -> None:
        pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _missing_worldcover_masks(config) -> list[str]:
    from . import discovery, masks
    from .errors import MaskError

    missing = []
    for tile in discovery.select_tiles(config.cube, config.tiles):
        try:
            masks.find_mask(config.mask_dir, config.mask_name, tile)
        except MaskError:
            missing.append(tile)
    return missing


def _run_with_masks(config, callbacks, plan=None):
    """``run``; with ``mask_worldcover``, first build the missing masks on the same cluster."""
    from .pipeline import run

    missing = _missing_worldcover_masks(config) if config.mask_worldcover else []
    if not missing:
        return run(config, callbacks=callbacks, plan=plan)
    from .cluster import connect
    from .worldcover import build_masks

    with connect(config) as client:
        log.info("building %d forest mask(s) from WorldCover %s", len(missing), config.mask_worldcover)
        build_masks(config.mask_worldcover, config.cube, missing, config.mask_dir,
                    classes=config.mask_classes, client=client)
        return run(config, client=client, callbacks=callbacks, plan=plan)


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config

    config = load_config(args.config, _overrides(args))
    progress = _Progress()
    try:
        result = _run_with_masks(config, progress)
    finally:
        progress.close()
    skipped = f", {len(result.skipped)} up to date (skipped)" if result.skipped else ""
    print(
        f"done: {len(result.tiles)} tile(s){skipped}, {result.pixels_predicted} pixels predicted in "
        f"{result.seconds:.1f} s; outputs in {config.output} (predictions.zarr, cog/, run.json)"
    )
    if result.report_dir:
        print(f"run report: {result.report_dir} (run.json, dask-report.html)")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import load_config
    from .plan import make_plan

    config = load_config(args.config, _overrides(args))
    if args.render:
        from . import kube

        run_yaml = Path(args.config).read_text() if args.config else None
        files = kube.render(config.kubernetes, args.render, run_yaml)
        print(f"wrote {len(files)} Kubernetes manifest file(s) to {args.render}:", file=sys.stderr)
        for f in files:
            print(f"  {f}", file=sys.stderr)
    print(json.dumps(make_plan(config, skip_done=True).summary(), indent=2, default=str))
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    """Process only tiles whose scenes, mask, model or settings changed since their ledger record."""
    from .config import load_config
    from .plan import make_plan

    config = load_config(args.config, _overrides(args))
    if config.mask_worldcover and _missing_worldcover_masks(config):
        plan = None
        print("building missing WorldCover masks first")
        progress = _Progress()
        try:
            result = _run_with_masks(config, progress)
        finally:
            progress.close()
        print(f"updated {len(result.tiles)} tile(s) in {result.seconds:.1f} s")
        return 0
    plan = make_plan(config)
    for tile, why in plan.skipped.items():
        print(f"{tile}: skip ({why})")
    for t in plan.tiles:
        print(f"{t.tile}: process ({'; '.join(t.reasons)})")
    if not plan.tiles:
        print(f"nothing to do: {len(plan.skipped)} tile(s) up to date")
        return 0
    progress = _Progress()
    try:
        result = _run_with_masks(config, progress, plan=plan)
    finally:
        progress.close()
    print(f"updated {len(result.tiles)} tile(s) in {result.seconds:.1f} s")
    return 0


def _cmd_mask(args: argparse.Namespace) -> int:
    from .cluster import connect
    from .config import load_config
    from .worldcover import build_masks

    config = load_config(overrides={
        "cube": args.cube, "output": args.output, "tiles": args.tiles, "workers": args.workers,
        "threads_per_worker": args.threads_per_worker, "dashboard_address": args.dashboard_address,
    })
    classes = [int(c) for c in args.classes.split(",")]
    with connect(config) as client:
        print(f"Dask dashboard: {client.dashboard_link}", file=sys.stderr)
        built = build_masks(args.worldcover, config.cube, config.tiles, config.output, classes=classes,
                            overwrite=args.overwrite, client=client, window=args.window)
    for tile, url in built.items():
        print(f"{tile}: {url}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.workdir, size=args.size, n_scenes=args.scenes, train_seconds=args.train_seconds)
    return 0


def _cmd_quicklook(args: argparse.Namespace) -> int:
    from .quicklook import main as quicklook_main

    return quicklook_main(args.quicklook_args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m treesits_dask",
        description="Tree-species / disturbance maps from FORCE Sentinel-2 datacubes with PyTorch on Dask.",
    )
    parser.add_argument("--version", action="version", version=f"treesits_dask {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="predict tiles and write Zarr + COG outputs")
    _add_run_flags(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("plan", help="dry run: tiles, scenes, windows, memory estimate, cluster (JSON)")
    _add_run_flags(p)
    p.add_argument("--render", metavar="DIR",
                   help="also write every Kubernetes object the run needs (DaskCluster, DaskWorkerGroup, "
                        "RBAC, CronJob, ConfigMap with --config) to DIR")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("update", help="process only tiles with new or changed scenes (or a new model); "
                                      "prints what it does and why")
    _add_run_flags(p)
    p.set_defaults(func=_cmd_update)

    p = sub.add_parser("mask", help="build <output>/<tile>/mask.tif forest masks from ESA WorldCover tiles")
    p.add_argument("--worldcover", required=True, help="folder or s3:// prefix with ESA_WorldCover_10m_*_Map.tif")
    p.add_argument("--cube", required=True, help="FORCE datacube root (its .prj defines the tile grid)")
    p.add_argument("--tiles", default="all", help="tile ids, a FORCE tile-list file, or 'all' (default)")
    p.add_argument("--output", required=True, help="mask folder (use it as --mask-dir of run)")
    p.add_argument("--classes", default="10", help="WorldCover classes that count as forest (default 10)")
    p.add_argument("--overwrite", action="store_true", help="rebuild masks that exist")
    p.add_argument("--window", type=int, default=1000, help="pixels per task edge (default 1000)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads-per-worker", type=int, default=None)
    p.add_argument("--dashboard-address", default=None)
    p.set_defaults(func=_cmd_mask)

    p = sub.add_parser("demo", help="build a synthetic FORCE cube, train a small LSTM, run the pipeline")
    p.add_argument("--workdir", default="demo-output", help="folder for the cube, model and outputs")
    p.add_argument("--size", type=int, default=300, help="tile edge in pixels (default 300)")
    p.add_argument("--scenes", type=int, default=36, help="scenes per tile (default 36)")
    p.add_argument("--train-seconds", type=float, default=60.0, help="training time limit (default 60)")
    p.set_defaults(func=_cmd_demo)

    # add_help=False: `quicklook --help` / `bench --help` show the options of those tools
    p = sub.add_parser("quicklook", add_help=False,
                       help="PNG maps per tile and for the mosaic (+ STAC catalog with --stac); "
                            "see `quicklook --help`")
    p.add_argument("quicklook_args", nargs=argparse.REMAINDER, metavar="OUTPUT [options]")
    p.set_defaults(func=_cmd_quicklook)

    p = sub.add_parser("bench", add_help=False,
                       help="throughput / memory benchmark (JSON); see `bench --help`")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)

    from .train import add_evaluate_arguments, add_train_arguments, run_evaluate, run_train

    p = sub.add_parser("train", help="train or fine-tune a model on reference samples (points or "
                                     "per-sample CSVs); writes a native model + card")
    add_train_arguments(p)
    p.set_defaults(func=run_train)
    p = sub.add_parser("evaluate", help="overall accuracy, per-class precision/recall/F1 and the "
                                        "confusion matrix of a model on reference samples")
    add_evaluate_arguments(p)
    p.set_defaults(func=run_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    passthrough = {"quicklook": "quicklook_args", "bench": "bench_args"}.get(args.command)
    if passthrough:  # e.g. `quicklook --help`: argparse leaves leading options out of REMAINDER
        setattr(args, passthrough, extra + getattr(args, passthrough))
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    import os

    if args.verbose == 0:  # before distributed is imported; spawned workers inherit it
        os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    level = [logging.INFO, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.verbose == 0:
        for noisy in ("distributed", "rasterio", "botocore", "s3fs", "fsspec", "numcodecs"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    import signal

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
