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

import numpy as np

__all__ = ["main"]


def _vm_hwm() -> int | None:
    """This process's peak resident set (``VmHWM`` in /proc/self/status) in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux: ``5`` into clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _PeakRSS:
    """Peak RSS of the driver plus the peaks of every worker process of a run, read from the
    kernel's high-water marks after the run (each worker is new; the driver's mark is reset when
    the run starts).  The sum of per-process peaks bounds the peak of their sum from above.

    Nothing samples while the run is timed: a psutil sampler every 50 ms made the LSTM end-to-end
    run 5-10 % slower on 2 cores.
    """

    def __init__(self, client) -> None:
        self.client = client
        self.peak: int | None = None

    def __enter__(self):
        import psutil

        self.baseline = psutil.Process().memory_info().rss
        self._reset = _reset_vm_hwm()
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            return
        workers = self.client.run(_vm_hwm)
        driver = _vm_hwm() if self._reset else None
        if driver is not None and all(v is not None for v in workers.values()):
            self.peak = driver + sum(workers.values())


def _cluster(workers: int, threads: int):
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                           dashboard_address=":0")
    return cluster, Client(cluster)


def _models(workdir: Path, families: list[str]) -> dict[str, dict]:
    """Random weights of the published shapes (speed does not depend on the values)."""
    import torch

    from ..models import ModelCard, save_native
    from .forward import random_sbert_state_dict

    out = {}
    if "sits-lstm" in families:
        from ..models.architectures import LSTMClassifier

        hp = {"num_bands": 10, "input_size": 32, "hidden_size": 64, "num_layers": 2, "num_classes": 5}
        card = ModelCard(family="sits-lstm", hyperparameters=hp,
                         bands=["BLUE", "GREEN", "RED", "REDEDGE1", "REDEDGE2", "REDEDGE3", "BROADNIR",
                                "NIR", "SWIR1", "SWIR2"],
                         class_names=["Spruce", "Beech", "Pine", "Douglas fir", "Oak"],
                         output_kind="softmax", sequence={"kind": "full"})
        pt, _ = save_native(LSTMClassifier(**hp).eval(), card, str(workdir / "lstm.pt"))
        out["sits-lstm"] = {"model": pt, "model_family": "native"}
    if "sbert" in families:
        path = workdir / "sbert.tar"
        torch.save({"model_state_dict": random_sbert_state_dict(), "epoch": 0}, path)
        out["sbert"] = {"model": str(path), "model_family": "sbert"}
    return out


def _mib(x: float | None) -> float | None:
    """MiB rounded for the report; None (no high-water marks on this system) stays None."""
    return round(x, 1) if x else None


def _fmt(seconds: list[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in seconds)


def _decode(plan, client) -> float:
    from ..io.cube import tile_cube
    from ..io.masks import open_mask

    arrays = []
    for tile in plan.tiles:
        mask = open_mask(tile.mask, tile.grid, tile.layout) if tile.mask else None
        cube = tile_cube(tile.scenes, tile.grid, tile.layout, plan.config.qai_flags, mask=mask)
        arrays.append(cube.data.map_blocks(
            lambda b: np.array(int(b[:1, :1].sum()), ndmin=4), chunks=(1, 1, 1, 1), dtype=np.int64))
    t0 = time.perf_counter()
    client.compute([a.sum() for a in arrays], sync=True) if arrays else None
    return time.perf_counter() - t0


def _forward_inputs(plan) -> list[tuple]:
    """Per window of the run: the (series, valid, days) that :func:`predict_block` hands to the
    model (the same pixels, the same batches), read once up front."""
    from ..io.cube import days_since_epoch, tile_cube
    from ..io.masks import open_mask
    from ..pipeline.predict import select_pixels

    inputs = []
    for tile in plan.tiles:
        mask = open_mask(tile.mask, tile.grid, tile.layout) if tile.mask else None
        cube = tile_cube(tile.scenes, tile.grid, tile.layout, plan.config.qai_flags, mask=mask)
        block = cube.values  # (T, 10, H, W)
        sel_all = mask.compute() if mask is not None else None
        days = days_since_epoch([s.date for s in tile.scenes])
        for _, _, w in tile.layout:
            sel = None if sel_all is None else sel_all[w.rows, w.cols]
            idx, series, valid = select_pixels(block[:, :, w.rows, w.cols], sel)
            if idx.size:
                inputs.append((series, valid, days))
        del block
    return inputs


def _forward(plan, inputs: list[tuple], cores: int, streams: int) -> float:
    """The model alone on pre-loaded inputs, ``streams`` windows at a time, the cores shared out as
    inference workers do (:func:`treesits_dask.pipeline.predict.threads_for_forward`), with their
    allocator settings: like against like."""
    import functools
    from concurrent.futures import ThreadPoolExecutor

    from ..pipeline.predict import (
        FORWARDS_IN_PROGRESS,
        get_predictor,
        threads_for_forward,
        tune_malloc,
    )

    tune_malloc()
    predictor = get_predictor(plan.spec, "cpu")
    predictor.threads = functools.partial(threads_for_forward, cores)

    def one(x):
        with FORWARDS_IN_PROGRESS:
            predictor.predict(*x, batch_size=plan.config.batch_size)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as ex:
        list(ex.map(one, inputs))
    return time.perf_counter() - t0


def _open_count() -> int:
    from ..io.cube import OPEN_COUNTER

    return OPEN_COUNTER.count


def _end_to_end(config, workers: int, threads: int) -> dict:
    """``run`` on a fresh cluster (so RSS and file-open counts belong to this run alone)."""
    from ..pipeline.plan import make_plan
    from ..pipeline.run import run

    plan = make_plan(config)
    cluster, client = _cluster(workers, threads)
    try:
        with _PeakRSS(client) as rss:
            t0 = time.perf_counter()
            result = run(config, client=client, plan=plan)
            seconds = time.perf_counter() - t0
        opens = sum(client.run(_open_count).values())
    finally:
        client.close()
        cluster.close()
    return {"seconds": seconds, "pixels": result.pixels_predicted,
            "peak_rss_mib": None if rss.peak is None else rss.peak / 2**20,
            "baseline_rss_mib": rss.baseline / 2**20, "file_opens": opens, "plan": plan}


def _rerun(config, first_seconds: float) -> dict:
    """``run`` again on the finished output: the ledger says every tile is up to date, so no
    cluster is started and no pixel is read (GeoTIFF opens counted in this process)."""
    from ..io.cube import OPEN_COUNTER
    from ..pipeline.run import run

    opens = OPEN_COUNTER.count
    t0 = time.perf_counter()
    result = run(config)
    seconds = time.perf_counter() - t0
    return {"first_run_s": round(first_seconds, 2), "second_run_s": round(seconds, 3),
            "second_over_first": round(seconds / first_seconds, 4), "tiles_skipped": len(result.skipped),
            "tiles_processed": len(result.tiles), "geotiff_opens": OPEN_COUNTER.count - opens}


def _windows_with_forest(plan) -> tuple[int, int]:
    """(windows holding at least one mask pixel, all windows) of the plan, from the mask files."""
    with_forest = total = 0
    for tile in plan.tiles:
        for _, _, w in tile.layout:
            total += 1
            with_forest += bool(tile.mask.read(w).any()) if tile.mask else 1
    return with_forest, total


def _masked(args, workdir: Path, models: dict, workers: int, log) -> dict:
    """Same tile, with and without a forest mask of ``args.masked_forest`` share (in blobs).

    Times: both runs with the default (strip-aligned) windows of ``run``.  File opens: a third run
    with small windows (``args.masked_window``), so that some windows hold no forest at all.
    """
    from ..config import load_config
    from ..synthetic import make_cube

    cube = make_cube(workdir / "cube-masked", size=args.size, n_scenes=args.scenes,
                     forest_fraction=args.masked_forest, forest_scale=args.forest_scale,
                     mask_dir=str(workdir / "masks-masked"),
                     truth_dir=str(workdir / "truth-masked"), seed=3)
    out = {"forest_fraction": args.masked_forest, "forest_scale_px": args.forest_scale}
    modes = {"unmasked": None, "masked": None, "masked_small_windows": args.masked_window}
    # the two timed modes alternate over the repeats (drift hits both alike); small windows run once
    order = [m for _ in range(args.repeat) for m in ("unmasked", "masked")] + ["masked_small_windows"]
    last: dict = {}
    for i, mode in enumerate(order):
        config = load_config(overrides=dict(
            cube=cube.root, tiles="all", output=str(workdir / f"out-masked-{mode}-{i}"), workers=workers,
            threads_per_worker=args.threads_per_worker, dashboard_address=":0", window=modes[mode],
            mask_dir=None if mode == "unmasked" else cube.mask_dir, **models["sits-lstm"]), environ={})
        e2e = _end_to_end(config, workers, args.threads_per_worker)
        out.setdefault(mode, {"end_to_end_s_runs": []})["end_to_end_s_runs"].append(round(e2e["seconds"], 2))
        last[mode] = (config, e2e)
        log(f"[masked] {mode} (window {e2e['plan'].window_shape}): {e2e['seconds']:.1f} s, "
            f"{e2e['file_opens']} file opens")
    for mode, (config, e2e) in last.items():
        plan = e2e["plan"]
        with_forest, total = _windows_with_forest(plan)
        per_window = sum(len(t.scenes) * (1 + bool(config.qai_flags)) for t in plan.tiles) // len(plan.tiles)
        out[mode].update({"window": list(plan.window_shape), "end_to_end_s": min(out[mode]["end_to_end_s_runs"]),
                          "pixels_predicted": e2e["pixels"], "windows": total, "windows_with_forest": with_forest,
                          "file_opens": e2e["file_opens"],
                          "file_opens_if_forest_windows_only": with_forest * per_window,
                          "file_opens_if_all_windows": total * per_window})
        log(f"[masked] {mode}: {with_forest}/{total} windows with forest")
    out["masked_over_unmasked"] = round(out["masked"]["end_to_end_s"] / out["unmasked"]["end_to_end_s"], 3)
    out["masked_over_unmasked_worst"] = round(  # slowest masked sample over fastest unmasked one
        max(out["masked"]["end_to_end_s_runs"]) / out["unmasked"]["end_to_end_s"], 3)
    small = out["masked_small_windows"]
    out["windows_without_forest_opened_files"] = small["file_opens"] - small["file_opens_if_forest_windows_only"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="treesits_dask bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1000, help="tile edge in pixels (default 1000)")
    p.add_argument("--scenes", type=int, default=60, help="scenes (default 60)")
    p.add_argument("--families", default="sits-lstm,sbert")
    p.add_argument("--sbert-forest", type=float, default=0.05,
                   help="forest share of the tile for the sbert run (default 0.05; its forward is "
                        "~100x the LSTM's, so a whole tile would take hours here)")
    p.add_argument("--rss-sizes", default="1000,500", help="tile sizes for the memory comparison")
    p.add_argument("--rss-window", default="250x250", help="fixed window for the memory comparison")
    p.add_argument("--masked-forest", type=float, default=0.25,
                   help="forest share for the masked-vs-unmasked comparison (0 skips it)")
    p.add_argument("--masked-window", default="100x100",
                   help="small window for the file-open count of the masked mode (default 100x100)")
    p.add_argument("--forest-scale", type=float, default=250.0,
                   help="width of forest patches (px) in the masked comparison (default 250 = 2.5 km)")
    p.add_argument("--workers", type=int, default=None, help="default: cores / threads")
    p.add_argument("--threads-per-worker", type=int, default=None, help="default: as `run` (min(cores, 4))")
    p.add_argument("--repeat", type=int, default=2,
                   help="measure decode and end-to-end times this many times and keep the fastest "
                        "(default 2; the forward is measured before and after the runs)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--skip-sbert-pxps", action="store_true")
    p.add_argument("--json", default=None, help="also write the report to this file")
    args = p.parse_args(argv)

    from ..config import load_config
    from ..pipeline.plan import make_plan
    from ..synthetic import make_cube

    cores = os.cpu_count() or 1
    args.threads_per_worker = args.threads_per_worker or min(cores, 4)  # the defaults of `run`
    workers = args.workers or max(1, cores // args.threads_per_worker)
    families = [f for f in args.families.split(",") if f]
    tmp = tempfile.TemporaryDirectory(prefix="treesits-bench-") if args.workdir is None else None
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": {"cores": cores, "workers": workers, "threads_per_worker": args.threads_per_worker},
                    "tile": {"size": args.size, "scenes": args.scenes}, "families": {}}

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    models = _models(workdir, families)
    for family in families:
        forest = args.sbert_forest if family == "sbert" else 1.0
        t0 = time.perf_counter()
        cube = make_cube(workdir / f"cube-{family}", size=args.size, n_scenes=args.scenes,
                         forest_fraction=forest, mask_dir=str(workdir / f"masks-{family}"),
                         truth_dir=str(workdir / f"truth-{family}"), seed=1)
        log(f"[{family}] generated {args.size}x{args.size} px x {args.scenes} scenes in "
            f"{time.perf_counter() - t0:.1f} s")
        config = load_config(overrides=dict(
            cube=cube.root, tiles="all", output=str(workdir / f"out-{family}"), workers=workers,
            threads_per_worker=args.threads_per_worker, dashboard_address=":0",
            mask_dir=cube.mask_dir if family == "sbert" else None, **models[family]), environ={})
        plan = make_plan(config)
        cluster, client = _cluster(workers, args.threads_per_worker)
        try:
            decodes = [_decode(plan, client) for _ in range(args.repeat)]
        finally:
            client.close()
            cluster.close()
        log(f"[{family}] decode-only {_fmt(decodes)} s")
        inputs = _forward_inputs(plan)
        n_fwd = sum(len(x[0]) for x in inputs)
        streams = workers * args.threads_per_worker  # windows predicted at once in `run`
        forward_one = _forward(plan, inputs, cores, 1)
        forward = _forward(plan, inputs, cores, streams)
        log(f"[{family}] forward-only {forward_one:.1f} s one window at a time (all cores), "
            f"{forward:.1f} s {streams} at a time, for {n_fwd} px")
        runs = []
        for i in range(args.repeat):  # each run into a fresh output (a finished one would be skipped)
            cfg_i = config if i == 0 else config.model_copy(update={"output": f"{config.output}-{i}"})
            runs.append(_end_to_end(cfg_i, workers, args.threads_per_worker))
        seconds = [r["seconds"] for r in runs]
        log(f"[{family}] end-to-end {_fmt(seconds)} s")
        forward_after = _forward(plan, inputs, cores, streams)
        del inputs
        log(f"[{family}] forward-only again {forward_after:.1f} s {streams} at a time")
        # the fastest forward of all, whichever way it ran
        decode, fwd = min(decodes), min(forward_one, forward, forward_after)
        best = min(runs, key=lambda r: r["seconds"])
        if family == families[0]:
            report["rerun"] = _rerun(config, runs[0]["seconds"])
            log(f"[{family}] second run of the finished output {report['rerun']['second_run_s']:.2f} s")
        report["families"][family] = {
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
            # pessimistic: the slowest end-to-end sample over the fastest parts (how far noise moves it)
            "efficiency_worst": round(max(seconds) / (decode + fwd), 3),
            "peak_rss_mib": _mib(max((r["peak_rss_mib"] or 0) for r in runs)),
        }

    if args.masked_forest and "sits-lstm" in models:
        report["masked"] = _masked(args, workdir, models, workers, log)

    if args.rss_sizes and "sits-lstm" in models:
        report["memory"] = {"window": args.rss_window, "runs": []}
        for size in [int(s) for s in args.rss_sizes.split(",")]:
            cube = make_cube(workdir / f"cube-rss-{size}", size=size, n_scenes=args.scenes,
                             mask_dir=str(workdir / f"masks-rss-{size}"), truth_dir=str(workdir / f"t-{size}"),
                             seed=2)
            config = load_config(overrides=dict(
                cube=cube.root, tiles="all", output=str(workdir / f"out-rss-{size}"), workers=workers,
                threads_per_worker=args.threads_per_worker, dashboard_address=":0", window=args.rss_window,
                **models["sits-lstm"]), environ={})
            e2e = _end_to_end(config, workers, args.threads_per_worker)
            report["memory"]["runs"].append({"size": size, "scenes": args.scenes,
                                             "peak_rss_mib": _mib(e2e["peak_rss_mib"]),
                                             "end_to_end_s": round(e2e["seconds"], 2)})
            log(f"[memory] {size} px: peak RSS {_mib(e2e['peak_rss_mib'])} MiB")
        peaks = [r["peak_rss_mib"] for r in report["memory"]["runs"]]
        report["memory"]["max_over_min"] = round(max(peaks) / min(peaks), 3) if all(peaks) else None

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
