"""``run``, ``plan`` and ``update``: the run settings as flags, and the three commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["add_run_flags", "cmd_plan", "cmd_run", "cmd_update", "run_overrides"]

# flag -> config key; flags that are not given do not override YAML/env values
_RUN_FLAGS = [
    ("--cube", dict(help="FORCE Level-2 datacube root (holds datacube-definition.prj)")),
    (
        "--tiles",
        dict(help="comma-separated tile ids (X0069_Y0043,...), a FORCE tile-list file, or 'all'"),
    ),
    ("--output", dict(help="output directory (map.icechunk, cog/, run.json)")),
    (
        "--model",
        dict(
            help="checkpoint: SITS-NN state dict, SBERT checkpoint, or native .pt "
            "(card .json beside it)"
        ),
    ),
    (
        "--model-family",
        dict(
            choices=["sbert", "sits-lstm", "sits-transformer", "native"],
            help="how to read --model (default native)",
        ),
    ),
    (
        "--model-params",
        dict(help="SITS-NN *_params.json with the hyper-parameters (sits-lstm, sits-transformer)"),
    ),
    (
        "--start-date",
        dict(help="first scene date YYYY-MM-DD (sbert: the window is at most 1460 days)"),
    ),
    ("--end-date", dict(help="last scene date YYYY-MM-DD (default: the newest scene)")),
    ("--sensors", dict(help="comma-separated FORCE sensors (default SEN2A,SEN2B,SEN2C)")),
    ("--mask-dir", dict(help="folder with <tile>/<mask-name> forest masks (value > 0 = predict)")),
    (
        "--mask-name",
        dict(help="mask file name or glob inside <mask-dir>/<tile>/ (default mask.tif)"),
    ),
    (
        "--mask-worldcover",
        dict(
            help="ESA WorldCover folder or s3:// prefix: build missing masks "
            "on the fly into --mask-dir (default <output>/masks)"
        ),
    ),
    (
        "--mask-classes",
        dict(help="WorldCover classes that count as forest (default 10 = tree cover)"),
    ),
    ("--qai", dict(help="QAI screening: default (FORCE's), none, or a comma list of flags")),
    ("--batch-size", dict(type=int, help="pixels per model batch (default 2048)")),
    (
        "--window",
        dict(
            help="window size: auto (default; within what the inference workers can hold of "
            "all scenes), N or ROWSxCOLS pixels; must divide the tile; a map keeps its window"
        ),
    ),
    (
        "--workers",
        dict(type=int, help="LocalCluster worker processes (default: cores / threads-per-worker)"),
    ),
    (
        "--threads-per-worker",
        dict(
            type=int,
            help="threads per worker; on CPU also the cores its "
            "torch forwards share (default min(cores, 4))",
        ),
    ),
    ("--memory-limit", dict(help="memory limit per LocalCluster worker (default auto)")),
    (
        "--scheduler-address",
        dict(
            help="use an existing Dask scheduler (tcp:// or tls://host:8786) instead of starting "
            "a cluster; it is never shut down, and work keeps its GPU/CPU resource routing"
        ),
    ),
    ("--device", dict(help="torch device: auto (CUDA if available), cpu, cuda, cuda:N")),
    (
        "--workers-timeout",
        dict(
            type=float,
            help="seconds to wait for a worker of each group the run needs (GPU, reading; on "
            "Kubernetes each worker group) before stopping with what to check (default 1800)",
        ),
    ),
    (
        "--precision",
        dict(
            choices=["fp32", "tf32", "bf16"],
            help="forward precision: fp32 (default, the parity mode), tf32 (CUDA tensor cores; "
            "fp32 on CPU), bf16 (autocast)",
        ),
    ),
    (
        "--gpu-batch-max",
        dict(
            type=int,
            help="on a GPU: the most pixels per batch; the batch is the largest that fits the "
            "free device memory, up to this (default 65536)",
        ),
    ),
    (
        "--gpu-windows-in-flight",
        dict(
            type=int,
            help="windows a GPU worker holds at once, so that the device never waits for one "
            "window's host work (default 2)",
        ),
    ),
    (
        "--tiles-in-flight",
        dict(
            type=int,
            help="tiles processed at once (default 2); each tile's read gets its share of a "
            "reading worker's memory and spill disk, and a tile that would decode more with its "
            "share than with a whole worker is read alone on its worker; a tile whose read "
            "spills to disk also starts beyond it on a reading worker that reads no tile",
        ),
    ),
    (
        "--uncertainty",
        dict(help="uncertainty layers of multi-class models: comma list of entropy, margin, least"),
    ),
    (
        "--read-memory",
        dict(
            type=float,
            help="share of a reading worker's memory limit that its read tasks may fill with "
            "decoded scenes, shared out among its threads (default 0.25)",
        ),
    ),
    (
        "--stream",
        dict(
            choices=["auto", "always", "never"],
            help="run a one-way LSTM (sits-lstm) or SBERT over a tile's scenes batch by batch, "
            "carrying a state (the LSTM's h and c; SBERT's newest 256 valid observations): every "
            "block decoded once and nothing of all scenes held (auto, the default: where the "
            "tile's bands of all scenes would not be held in a reading worker's memory, for SBERT "
            "only where its plan would otherwise decode blocks more than once; always: wherever "
            "windows are put together from bands; never). Under auto and always, a tile whose "
            "windows of all scenes the inference workers cannot hold is streamed where its "
            "states fit, instead of refused",
        ),
    ),
    ("--dashboard-address", dict(help="LocalCluster dashboard address (default :8787)")),
    (
        "--cluster",
        dict(choices=["local", "kubernetes"], help="where to run: local (default) or kubernetes"),
    ),
    (
        "--s3-endpoint-url",
        dict(help="S3 endpoint (default: $AWS_ENDPOINT_URL), e.g. https://s3.example.org"),
    ),
    ("--s3-region", dict(help="S3 region (default: $AWS_REGION), e.g. RegionOne")),
    (
        "--s3-addressing",
        dict(
            choices=["auto", "path", "virtual"],
            help="S3 addressing style (auto: path-style with a custom endpoint)",
        ),
    ),
]


#: flags of the nested settings: flag -> (setting, key)
_NESTED_FLAGS = [
    ("--smooth-window-size", "smoothing", "window_size",
     dict(type=int, help="Bayesian smoothing: neighbourhood size, odd, >= 5 (default 9)")),
    ("--smooth-neigh-fraction", "smoothing", "neigh_fraction",
     dict(type=float, help="Bayesian smoothing: share of neighbours for the prior (default 0.5)")),
    ("--smooth-smoothness", "smoothing", "smoothness",
     dict(help="Bayesian smoothing: prior variance, one value or one per class (default 20)")),
    ("--alert-start", "alerts", "start",
     dict(help="disturbance alerts (binary models): first acquisition date that can raise one")),
    ("--alert-threshold", "alerts", "threshold",
     dict(type=float, help="disturbance alerts: probability that raises one (default 0.5)")),
    ("--alert-confirm-after", "alerts", "confirm_after",
     dict(type=int, help="disturbance alerts: acquisitions at/above the threshold that confirm "
          "one (default 2)")),
]  # fmt: skip


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The settings of :class:`~treesits_dask.config.RunConfig` as flags (and ``--config``)."""
    p.add_argument(
        "--config",
        help="YAML file with the same settings (keys as flags, '_' for '-'); flags override it",
    )
    for flag, kw in _RUN_FLAGS:
        p.add_argument(flag, **kw)
    p.add_argument(
        "--smoothing",
        action="store_true",
        default=None,
        help="Bayesian smoothing of the probabilities (sits defaults; --smooth-* change them)",
    )
    for flag, _, _, kw in _NESTED_FLAGS:
        p.add_argument(flag, **kw)
    p.add_argument(
        "--no-cog",
        dest="cog",
        action="store_false",
        default=None,
        help="write only the map (the next run with COGs on writes the missing COGs from it)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        default=None,
        help="redo tiles whose record in the map says they are up to date",
    )
    p.add_argument(
        "--torch-compile",
        action="store_true",
        default=None,
        help="run the model through torch.compile (see the README for when it helps)",
    )


def run_overrides(args: argparse.Namespace) -> dict:
    """The settings given as flags (flags not given do not override YAML or environment)."""
    out = {}
    for flag, _ in _RUN_FLAGS:
        key = flag[2:].replace("-", "_")
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    for key in ("cog", "force", "torch_compile"):
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    if getattr(args, "smoothing", None):
        out["smoothing"] = {}
    for flag, setting, key, _ in _NESTED_FLAGS:
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            out.setdefault(setting, {})[key] = value
    return out


def _config(args: argparse.Namespace):
    from ..config import load_config

    return load_config(args.config, run_overrides(args))


class _Announce:
    """``update``: says per tile whether it is skipped or processed, and why, before any work."""

    def planned(self, plan) -> None:
        for tile, why in plan.skipped.items():
            print(f"{tile}: skip ({why})")
        for t in plan.tiles:
            print(f"{t.tile}: process ({'; '.join(t.reasons)})")
        if not plan.tiles:
            print(f"nothing to do: {len(plan.skipped)} tile(s) up to date")


def cmd_run(args: argparse.Namespace) -> int:
    from .. import run
    from ..progress import ProgressBar

    config = _config(args)
    progress = ProgressBar()
    try:
        result = run(config, callbacks=progress)
    finally:
        progress.close()
    skipped = f", {len(result.skipped)} up to date (skipped)" if result.skipped else ""
    print(
        f"done: {len(result.tiles)} tile(s){skipped}, {result.pixels_predicted} pixels predicted "
        f"in {result.seconds:.1f} s; outputs in {config.output} (map.icechunk, cog/, run.json)"
    )
    if result.report_dir:
        print(f"run report: {result.report_dir} (run.json, dask-report.html)")
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    """Process only tiles whose scenes, mask, model or settings changed since their record."""
    from .. import update
    from ..progress import ProgressBar

    config = _config(args)

    class Progress(_Announce, ProgressBar):
        pass

    progress = Progress()
    try:
        result = update(config, callbacks=progress)
    finally:
        progress.close()
    if result.tiles or result.failed:
        print(f"updated {len(result.tiles)} tile(s) in {result.seconds:.1f} s")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """The dry run (JSON on stdout; exit code 2 when a tile cannot be processed); with
    ``--render``, first the Kubernetes manifests, which need no storage access: the dry run then
    follows only where the cube and output can be reached from here."""
    from .. import plan
    from ..errors import TreesitsError

    config = _config(args)
    if args.render:
        from ..kube import render, with_version

        run_yaml = Path(args.config).read_text() if args.config else None
        settings = with_version(config.kubernetes, getattr(args, "kube_version", None))
        files = render(settings, args.render, run_yaml)
        print(f"wrote {len(files)} Kubernetes manifest file(s) to {args.render}:", file=sys.stderr)
        for f in files:
            print(f"  {f}", file=sys.stderr)
        try:
            planned = plan(config)
        except TreesitsError as exc:
            print(f"no dry run from here (the manifests are complete): {exc}", file=sys.stderr)
            return 0
    else:
        planned = plan(config)
    from ..pipeline.preview import decode_warnings, state_warnings

    summary = planned.summary()
    print(json.dumps(summary, indent=2, default=str))
    reads = {**summary["reads"], "tiles": {t["tile"]: t["read"] for t in summary["tiles"]}}
    for line in decode_warnings(reads) + state_warnings(reads):
        print(f"warning: {line}", file=sys.stderr)
    if planned.invalid:
        lines = "; ".join(f"{t}: {e}" for t, e in planned.invalid.items())
        print(
            f"error: {len(planned.invalid)} tile(s) cannot be processed: {lines}", file=sys.stderr
        )
        return 2
    return 0
