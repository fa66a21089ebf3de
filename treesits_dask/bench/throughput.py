"""Throughput and memory benchmark (``python -m treesits_dask bench``).

Prints one JSON document.  All ratios come from one run on one machine:

- ``decode_s``: reading every window of the tile (all scenes) on the cluster, no model;
- ``forward_s``: the model alone on pre-loaded inputs of the same windows and pixels, the fastest
  of one window at a time on all cores and as many windows at a time as ``run`` predicts (the cores
  shared out as in the workers), with the allocator settings of the inference workers;
- ``end_to_end_s``: :func:`treesits_dask.pipeline.run.run` on a started LocalCluster (read, screen,
  predict, Zarr + COG writes);
- ``efficiency`` = end_to_end / (decode + forward); ``px_per_s`` = predicted pixels / end_to_end;
- ``peak_rss_mib``: the driver's peak RSS during the run plus the peak RSS of each worker process
  (kernel high-water marks, read after the run; Linux only).

Shared machines are noisy (the same end-to-end run has taken 44 s and 55 s an hour apart), so each
time is measured ``--repeat`` times and the fastest is kept, as ``timeit`` does: slower samples are
other tenants, not this code.  The forward is measured before and after the runs.  Every sample is
in the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .measure import (
    bench_cluster,
    bench_models,
    decode_seconds,
    end_to_end,
    fmt_seconds,
    forest_block_bytes,
    forward_inputs,
    forward_seconds,
    mib,
    rerun,
    windows_with_forest,
)
from .pagecache import page_in

__all__ = ["main"]


def _masked(args, workdir: Path, models: dict, workers: int, log, layout: str = "strips") -> dict:
    """Same tile (``layout``), with and without a forest mask of ``args.masked_forest`` share (in
    blobs).

    Times: both runs with the default windows of ``run``.  File opens: a third run with small
    windows (``args.masked_window``), so that some windows hold no forest at all.  Decoded bytes:
    what the masked runs decoded against the bytes of the file blocks that hold a forest pixel
    (at most 1.0: no other block was decoded, and windows or bands without forest opened nothing;
    below 1.0 by the forest blocks whose BOA QAI screens whole, which are not decoded).
    """
    from ..config import load_config
    from ..synthetic import make_cube

    cube = make_cube(
        workdir / f"cube-masked-{layout}",
        size=args.size,
        n_scenes=args.scenes,
        layout=layout,
        forest_fraction=args.masked_forest,
        forest_scale=args.forest_scale,
        mask_dir=str(workdir / f"masks-masked-{layout}"),
        truth_dir=str(workdir / f"truth-masked-{layout}"),
        seed=3,
    )
    out = {
        "layout": layout,
        "forest_fraction": args.masked_forest,
        "forest_scale_px": args.forest_scale,
        "page_in": args.page_in,
    }
    modes = {"unmasked": None, "masked": None, "masked_small_windows": args.masked_window}
    # the two timed modes alternate over the repeats (drift hits both alike); small windows run once
    order = [m for _ in range(args.repeat) for m in ("unmasked", "masked")] + [
        "masked_small_windows"
    ]
    last: dict = {}
    for i, mode in enumerate(order):
        config = load_config(
            overrides=dict(
                cube=cube.root,
                tiles="all",
                output=str(workdir / f"out-masked-{layout}-{mode}-{i}"),
                workers=workers,
                threads_per_worker=args.threads_per_worker,
                dashboard_address=":0",
                window=modes[mode],
                mask_dir=None if mode == "unmasked" else cube.mask_dir,
                **models["sits-lstm"],
            ),
            environ={},
        )
        if args.page_in:
            log(f"[masked {layout}] {page_in(cube.root) / 2**30:.2f} GiB of the cube read")
        e2e = end_to_end(config, workers, args.threads_per_worker)
        out.setdefault(mode, {"end_to_end_s_runs": []})["end_to_end_s_runs"].append(
            round(e2e["seconds"], 2)
        )
        last[mode] = (config, e2e)
        log(
            f"[masked {layout}] {mode} (window {e2e['plan'].window_shape}): "
            f"{e2e['seconds']:.1f} s, {e2e['file_opens']} file opens"
        )
    for mode, (_config, e2e) in last.items():
        plan = e2e["plan"]
        with_forest, total = windows_with_forest(plan)
        forest_bytes = forest_block_bytes(plan) if mode != "unmasked" else None
        forest_mib = None if forest_bytes is None else round(forest_bytes / 2**20, 1)
        out[mode].update(
            {
                "window": list(plan.window_shape),
                "end_to_end_s": min(out[mode]["end_to_end_s_runs"]),
                "pixels_predicted": e2e["pixels"],
                "windows": total,
                "windows_with_forest": with_forest,
                "file_opens": e2e["file_opens"],
                "decoded_mib": round(e2e["decoded_bytes"] / 2**20, 1),
                "forest_block_mib": forest_mib,
                "decoded_over_forest_blocks": None
                if not forest_bytes
                else round(e2e["decoded_bytes"] / forest_bytes, 4),
            }
        )
        log(f"[masked {layout}] {mode}: {with_forest}/{total} windows with forest")
    out["masked_over_unmasked"] = round(
        out["masked"]["end_to_end_s"] / out["unmasked"]["end_to_end_s"], 3
    )
    out["masked_over_unmasked_worst"] = round(  # slowest masked sample over fastest unmasked one
        max(out["masked"]["end_to_end_s_runs"]) / out["unmasked"]["end_to_end_s"], 3
    )
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="treesits_dask bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1000, help="tile edge in pixels (default 1000)")
    p.add_argument("--scenes", type=int, default=60, help="scenes (default 60)")
    p.add_argument(
        "--families",
        default="sits-lstm,sbert",
        help='families whose decode, forward and end-to-end times are measured ("": none; the '
        "masked comparison and the memory runs use sits-lstm whatever this says)",
    )
    p.add_argument(
        "--sbert-forest",
        type=float,
        default=0.05,
        help="forest share of the tile for the sbert run (default 0.05; its forward is "
        "~100x the LSTM's, so a whole tile would take hours here)",
    )
    p.add_argument("--rss-sizes", default="1000,500", help="tile sizes for the memory comparison")
    p.add_argument("--rss-window", default="250x250", help="fixed window for the memory comparison")
    p.add_argument(
        "--masked-forest",
        type=float,
        default=0.25,
        help="forest share for the masked-vs-unmasked comparison (0 skips it)",
    )
    p.add_argument(
        "--masked-layouts",
        default="strips,cog",
        help="file layouts of the masked comparison (strips: FORCE < 3.8, cog: FORCE >= 3.8)",
    )
    p.add_argument(
        "--masked-window",
        default="100x100",
        help="small window for the file-open count of the masked mode (default 100x100)",
    )
    p.add_argument(
        "--forest-scale",
        type=float,
        default=250.0,
        help="width of forest patches (px) in the masked comparison (default 250 = 2.5 km)",
    )
    p.add_argument(
        "--page-in",
        action="store_true",
        help="masked comparison: read the cube's files before each timed run, so that every run "
        "reads them from the page cache (not some from the disk)",
    )
    p.add_argument("--workers", type=int, default=None, help="default: cores / threads")
    p.add_argument(
        "--threads-per-worker", type=int, default=None, help="default: as `run` (min(cores, 4))"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="measure decode and end-to-end times this many times and keep the fastest "
        "(default 2; the forward is measured before and after the runs)",
    )
    p.add_argument("--workdir", default=None)
    p.add_argument("--skip-sbert-pxps", action="store_true")
    p.add_argument("--json", default=None, help="also write the report to this file")
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _family_config(args, workdir: Path, family: str, models: dict, workers: int):
    """A cube for ``family`` (the whole tile forest for the LSTM, ``--sbert-forest`` for SBERT)
    and the run config on it."""
    from ..config import load_config
    from ..synthetic import make_cube

    forest = args.sbert_forest if family == "sbert" else 1.0
    t0 = time.perf_counter()
    cube = make_cube(
        workdir / f"cube-{family}",
        size=args.size,
        n_scenes=args.scenes,
        forest_fraction=forest,
        mask_dir=str(workdir / f"masks-{family}"),
        truth_dir=str(workdir / f"truth-{family}"),
        seed=1,
    )
    _log(
        f"[{family}] generated {args.size}x{args.size} px x {args.scenes} scenes in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    config = load_config(
        overrides=dict(
            cube=cube.root,
            tiles="all",
            output=str(workdir / f"out-{family}"),
            workers=workers,
            threads_per_worker=args.threads_per_worker,
            dashboard_address=":0",
            mask_dir=cube.mask_dir if family == "sbert" else None,
            **models[family],
        ),
        environ={},
    )
    return config, forest


def _family(args, workdir: Path, family: str, models: dict, workers: int) -> tuple[dict, dict]:
    """Decode, forward and end-to-end times of one family (each the fastest of ``--repeat``
    samples), the efficiency, and the first run (for the second-run figure)."""
    from ..pipeline.plan import make_plan

    cores = os.cpu_count() or 1
    config, forest = _family_config(args, workdir, family, models, workers)
    plan = make_plan(config)
    cluster, client = bench_cluster(workers, args.threads_per_worker)
    try:
        decodes = [decode_seconds(plan, client) for _ in range(args.repeat)]
    finally:
        client.close()
        cluster.close()
    _log(f"[{family}] decode-only {fmt_seconds(decodes)} s")
    inputs = forward_inputs(plan)
    n_fwd = sum(len(x[0]) for x in inputs)
    streams = workers * args.threads_per_worker  # windows predicted at once in `run`
    forward_one = forward_seconds(plan, inputs, cores, 1)
    forward = forward_seconds(plan, inputs, cores, streams)
    _log(
        f"[{family}] forward-only {forward_one:.1f} s one window at a time (all cores), "
        f"{forward:.1f} s {streams} at a time, for {n_fwd} px"
    )
    runs = []
    for i in range(args.repeat):  # each run into a fresh output (a finished one would be skipped)
        cfg_i = config if i == 0 else config.model_copy(update={"output": f"{config.output}-{i}"})
        runs.append(end_to_end(cfg_i, workers, args.threads_per_worker))
    seconds = [r["seconds"] for r in runs]
    _log(f"[{family}] end-to-end {fmt_seconds(seconds)} s")
    forward_after = forward_seconds(plan, inputs, cores, streams)
    del inputs
    _log(f"[{family}] forward-only again {forward_after:.1f} s {streams} at a time")
    # the fastest forward of all, whichever way it ran
    decode, fwd = min(decodes), min(forward_one, forward, forward_after)
    best = min(runs, key=lambda r: r["seconds"])
    report = {
        "window_shape": list(plan.window_shape),
        "windows": sum(plan.windows_per_tile(t) for t in plan.tiles),
        "forest_fraction": forest,
        "decode_s": round(decode, 3),
        "decode_s_runs": [round(x, 3) for x in decodes],
        "forward_s": round(fwd, 3),
        "forward_s_before_after": [round(forward, 3), round(forward_after, 3)],
        "forward_streams": streams,
        "forward_one_stream_s": round(forward_one, 3),
        "forward_pixels": n_fwd,
        "end_to_end_s": round(best["seconds"], 3),
        "end_to_end_s_runs": [round(x, 3) for x in seconds],
        "pixels_predicted": best["pixels"],
        "px_per_s": round(best["pixels"] / best["seconds"], 1),
        "efficiency": round(best["seconds"] / (decode + fwd), 3),
        # pessimistic: the slowest end-to-end sample over the fastest parts (how far noise
        # moves it)
        "efficiency_worst": round(max(seconds) / (decode + fwd), 3),
        "peak_rss_mib": mib(max((r["peak_rss_mib"] or 0) for r in runs)),
    }
    return report, {"config": config, "seconds": runs[0]["seconds"]}


def _memory(args, workdir: Path, models: dict, workers: int) -> dict:
    """Peak RSS of runs with a fixed window on tiles of ``--rss-sizes``: memory follows the
    window, not the tile."""
    from ..config import load_config
    from ..synthetic import make_cube

    report: dict = {"window": args.rss_window, "runs": []}
    for size in [int(s) for s in args.rss_sizes.split(",")]:
        cube = make_cube(
            workdir / f"cube-rss-{size}",
            size=size,
            n_scenes=args.scenes,
            mask_dir=str(workdir / f"masks-rss-{size}"),
            truth_dir=str(workdir / f"t-{size}"),
            seed=2,
        )
        config = load_config(
            overrides=dict(
                cube=cube.root,
                tiles="all",
                output=str(workdir / f"out-rss-{size}"),
                workers=workers,
                threads_per_worker=args.threads_per_worker,
                dashboard_address=":0",
                window=args.rss_window,
                **models["sits-lstm"],
            ),
            environ={},
        )
        e2e = end_to_end(config, workers, args.threads_per_worker)
        report["runs"].append(
            {
                "size": size,
                "scenes": args.scenes,
                "peak_rss_mib": mib(e2e["peak_rss_mib"]),
                "end_to_end_s": round(e2e["seconds"], 2),
            }
        )
        _log(f"[memory] {size} px: peak RSS {mib(e2e['peak_rss_mib'])} MiB")
    peaks = [r["peak_rss_mib"] for r in report["runs"]]
    report["max_over_min"] = round(max(peaks) / min(peaks), 3) if all(peaks) else None
    return report


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cores = os.cpu_count() or 1
    args.threads_per_worker = args.threads_per_worker or min(cores, 4)  # the defaults of `run`
    workers = args.workers or max(1, cores // args.threads_per_worker)
    families = [f for f in args.families.split(",") if f]
    tmp = tempfile.TemporaryDirectory(prefix="treesits-bench-") if args.workdir is None else None
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "machine": {
            "cores": cores,
            "workers": workers,
            "threads_per_worker": args.threads_per_worker,
        },
        "tile": {"size": args.size, "scenes": args.scenes},
        "families": {},
    }
    lstm = ["sits-lstm"] if args.masked_forest or args.rss_sizes else []
    models = bench_models(workdir, sorted({*families, *lstm}))
    for family in families:
        report["families"][family], first = _family(args, workdir, family, models, workers)
        if family == families[0]:
            report["rerun"] = rerun(first["config"], first["seconds"])
            _log(
                f"[{family}] second run of the finished output "
                f"{report['rerun']['second_run_s']:.2f} s"
            )
    if args.masked_forest:
        report["masked"] = {
            layout: _masked(args, workdir, models, workers, _log, layout)
            for layout in args.masked_layouts.split(",")
            if layout
        }
    if args.rss_sizes:
        report["memory"] = _memory(args, workdir, models, workers)
    if "sbert" in families and not args.skip_sbert_pxps:
        from .forward import sbert_forward_pxps

        report["sbert_forward"] = sbert_forward_pxps(batch=256, seq_len=256, threads=min(2, cores))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
