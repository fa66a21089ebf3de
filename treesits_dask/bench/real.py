"""Real-size reading benchmark (``python -m treesits_dask bench --real``).

FORCE tiles are 3000 x 3000 px with 150 (SITS-NN: every scene) to 600 (SBERT's 4 years) scenes.
For each case and file layout (``strips``: FORCE < 3.8, LZW strips of 300 rows; ``cog``: FORCE
>= 3.8, ZSTD 256 px blocks) this writes a synthetic tile (in parallel processes) and reports:

- ``decode_floor_mb_s_per_core``: one thread decoding every block of a sample of the same files
  once (BOA and QAI, whole block rows into a reused buffer, :data:`FLOOR_GDAL_CACHE`, the files
  read into the page cache just before: decoding alone; ``--floor-scenes`` scenes, more where
  they hold less than ``--floor-mib``): a core at best;
  ``decode_floor_parallel_mb_s_per_core``: the same sample on the benchmark's threads at once, split
  evenly by bytes: what a core decodes while every core decodes;
  ``decode_floor_to_memory_mb_s_per_core``: one thread decoding the sample into memory beyond the
  CPU's cache instead of a reused buffer, as a read that keeps what it decodes must
  (:func:`decode_floor`'s ``to_memory``); ``*_paired``: each read against the floors measured
  just before it;
- ``read``: the pipeline's reads of every window of the tile on a LocalCluster (one worker, the
  threads ``run`` uses, the given memory limit), no model: seconds, uncompressed MB/s per core and
  its share of the floor, the bytes the reads decoded (blocks counted as the reads ask GDAL for
  them) over the uncompressed bytes of the files (the decode amplification; below 1 by the BOA
  blocks that QAI screens whole, which are not decoded: ``screened_share``), the read tasks, the
  read buffers handed out in new memory and in memory recycled from earlier reads
  (``io.buffers``: a worker's first read faults its buffers in), the peak RSS of the worker
  against its memory limit and the read budget, and the worker's restarts during each read (a
  restart, for memory, puts the peak RSS out of the limit);
- ``end_to_end``: ``run`` with ``sits-lstm`` and ``sbert`` (random weights of the published shapes)
  on a small forest mask (the model would take hours on a whole tile here): seconds, pixels,
  px/s, what the masked reads decoded, peak RSS per worker.

Cases: ``real`` (``--size``, ``--scenes``; ``window: auto``) and ``600`` (``--regime-size``,
``--regime-scenes``: the 600-scene regime at reduced size).  At 3000 px ``window: auto`` keeps
full-width strip windows only while a window of all scenes fits 2 GiB (119 scenes); the ``600``
case lowers that window budget by the area ratio (2 GiB x (size / 3000)^2), so that it takes the
same decision a 3000 px tile of that many scenes takes (250 x 250 px windows), and runs with a
lower memory limit (``--regime-memory-limit``), so that a band of all scenes does not fit one read
task and is read in batches of scenes.  Both cases also keep a window of all scenes within what the
worker can hold, as ``run`` does with the same settings (``pipeline.memory.window_budget``: 100 x
100 px at 600 scenes on a 3 GiB, 2-thread worker).

Floor and reads alternate ``--repeat`` times; the fastest of each is kept (shared machine);
``--page-in`` reads the cube's files into the page cache before each read, ``--cold`` drops them
from it (the reads then come from disk, with the next scenes' bytes asked for ahead,
:mod:`treesits_dask.io.prefetch`).  Cubes are deleted
after their case unless ``--keep``.  Prints JSON.

The module is longer than 400 lines: the floors, the reads and the report of each case are one
measurement, whose figures are only comparable when taken together, as they are here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .measure import bench_cluster, bench_models, decode_run, end_to_end, reset_vm_hwm, vm_hwm
from .pagecache import page_in, page_out

__all__ = [
    "cpu_times",
    "decode_floor",
    "main",
    "measured_read",
    "memory_floor",
    "parallel_floor",
    "plan_bytes",
    "split_even",
]

WINDOW_BUDGET = 2 * 1024**3  # choose_window_shape's default
#: GDAL's block cache of the floors' process: at GDAL's default (5 % of memory) closing each file
#: cost the floor 1.1 s of system time per 1.7 GiB of the 3000 px COG (20-40 % of its speed)
FLOOR_GDAL_CACHE = 16 * 2**20


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


#: least bytes of the ring of buffers that :func:`decode_floor` decodes into ``to_memory``: more
#: than the CPU's last-level cache (300 MiB on this VM; 4 times it where larger), so that every
#: block row goes to memory beyond the cache, as a read that keeps what it decodes writes it.  The
#: same 8 files of the 3000 px COG decoded 9-18 % faster into one reused buffer (which stays in
#: the cache) than into such a ring, in 8 alternating rounds each of 3000 and 512 px wide calls
MEMORY_RING_BYTES = 2**30

_RING: list = []  # the ring, allocated and faulted in once per process


def _ring() -> np.ndarray:
    """The int16 ring of :data:`MEMORY_RING_BYTES` (or 4 times the last-level cache), written
    once so that its pages are in memory before any timing."""
    if not _RING:
        try:
            cache = max(0, os.sysconf("SC_LEVEL3_CACHE_SIZE"))
        except (ValueError, OSError, AttributeError):  # not reported on this platform
            cache = 0
        ring = np.empty(max(MEMORY_RING_BYTES, 4 * cache) // 2, np.int16)
        ring.fill(0)
        _RING.append(ring)
    return _RING[0]


def decode_floor(files: list[str], seconds: float = 0.0, to_memory: bool = False) -> dict:
    """One thread decoding every block of ``files`` once, whole block rows at a time into a reused
    buffer: uncompressed MB/s (the decode speed of one core).  ``to_memory``: each block row into
    the next part of a ring of buffers larger than the CPU's cache (:data:`MEMORY_RING_BYTES`)
    instead: the decode speed of one core that keeps what it decodes, as every read of the
    pipeline does (a reused buffer stays in the cache, and writing it costs less)."""
    import rasterio
    from rasterio.windows import Window

    ring, at = _ring() if to_memory else None, 0
    nbytes, t0 = 0, time.perf_counter()
    buffers: dict = {}
    for path in files:
        with rasterio.open(path) as src:
            bh = src.block_shapes[0][0]
            for top in range(0, src.height, bh):
                h = min(bh, src.height - top)
                shape = (src.count, h, src.width)
                size = math.prod(shape)
                if ring is not None and size <= ring.size:
                    at = 0 if at + size > ring.size else at
                    out, at = ring[at : at + size].reshape(shape), at + size
                else:  # a reused buffer (a block row larger than the ring: none here)
                    out = buffers.get(shape)
                    if out is None:
                        out = buffers[shape] = np.empty(shape, np.int16)
                src.read(window=Window(0, top, src.width, h), out=out)
                nbytes += out.nbytes
        if seconds and time.perf_counter() - t0 > seconds:
            break
    dt = time.perf_counter() - t0
    return {"mb_s": nbytes / dt / 1e6, "mib": round(nbytes / 2**20, 1), "seconds": round(dt, 2)}


def split_even(files: list[tuple[str, int]], parts: int) -> list[list[str]]:
    """``files`` (path, uncompressed bytes) in ``parts`` groups of about equal bytes (largest file
    first to the lightest group).  A plain ``files[i::parts]`` of a BOA, QAI, BOA, QAI... list
    gives one thread every BOA (10 bands) and the other every QAI (1 band): the second is done
    after a tenth of the time and the first then decodes alone."""
    groups: list[list[str]] = [[] for _ in range(max(1, parts))]
    load = [0] * len(groups)
    for path, nbytes in sorted(files, key=lambda f: -f[1]):
        k = load.index(min(load))
        groups[k].append(path)
        load[k] += nbytes
    return [g for g in groups if g]


def parallel_floor(files: list[tuple[str, int]], threads: int) -> dict:
    """:func:`decode_floor` on ``threads`` threads at once, the ``files`` (path, uncompressed
    bytes) split evenly by bytes (:func:`split_even`): the decode speed per core when every core
    decodes, under the same load from other processes as the pipeline's reads."""
    from concurrent.futures import ThreadPoolExecutor

    groups = split_even(files, threads)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(groups)) as pool:
        parts = list(pool.map(decode_floor, groups))
    dt = time.perf_counter() - t0
    mib = sum(p["mib"] for p in parts)
    return {
        "mb_s": mib * 2**20 / dt / 1e6 / len(groups),
        "mib": round(mib, 1),
        "seconds": round(dt, 2),
        "thread_seconds": [p["seconds"] for p in parts],
    }


def files_bytes(plan, scenes: int | None = None) -> tuple[list[tuple[str, int]], int]:
    """The scene files of the plan (of its first ``scenes`` scenes per tile; None: all) with their
    uncompressed bytes (every band of every pixel), and the sum of these."""
    files = []
    for t in plan.tiles:
        px = t.grid.width * t.grid.height * 2
        for s in t.scenes[:scenes]:
            files.append((s.boa, px * t.grid.count))
            if s.qai and plan.config.qai_flags:
                files.append((s.qai, px))
    return files, sum(n for _, n in files)


def floor_sample(plan, scenes: int = 8, mib: float = 1536.0) -> list[tuple[str, int]]:
    """The files (path, uncompressed bytes) the floors decode: the first ``scenes`` scenes, more
    where they hold less than ``mib`` MiB uncompressed (a small tile's sample of 8 scenes, 60 MiB
    at 600 px, took a fraction of a second on two threads)."""
    _, total = files_bytes(plan)
    per_scene = total / max(1, max(len(t.scenes) for t in plan.tiles))
    n = max(scenes, math.ceil(mib * 2**20 / max(1.0, per_scene)))
    return files_bytes(plan, n)[0]


def floors(sample: list[tuple[str, int]], threads: int) -> tuple[dict, dict]:
    """:func:`decode_floor` and :func:`parallel_floor` on ``threads`` threads of ``sample``, read
    into the page cache just before (the decode alone: this machine evicts files not read for a
    minute, and --cold drops them), with this process's GDAL block cache at
    :data:`FLOOR_GDAL_CACHE`."""
    from ..io.remote import limit_gdal_cache

    limit_gdal_cache(FLOOR_GDAL_CACHE)
    page_in([f for f, _ in sample])
    return decode_floor([f for f, _ in sample]), parallel_floor(sample, threads)


def memory_floor(sample: list[tuple[str, int]]) -> dict:
    """:func:`decode_floor` of ``sample`` ``to_memory``, with this process's GDAL block cache at
    :data:`FLOOR_GDAL_CACHE`; called just after :func:`floors`, which read it into the page
    cache."""
    from ..io.remote import limit_gdal_cache

    limit_gdal_cache(FLOOR_GDAL_CACHE)
    return decode_floor([f for f, _ in sample], to_memory=True)


def cpu_times() -> tuple[float, float]:
    """(user, system) CPU seconds of this process so far (run on a worker by ``client.run``)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def measured_read(
    plan, client, root, sample, total: int, threads: int, one_by_one: bool = False
) -> dict:
    """One read of the benchmark scripts that alternate plans on one worker: the one-thread decode
    floor of ``sample`` (:func:`floor_sample`) measured just before, the cube under ``root`` paged
    in, :func:`~treesits_dask.bench.measure.decode_run` of ``plan`` (``one_by_one``: of each of its
    tiles, one after the other); the row's common figures, of all its tiles (seconds, read / floor
    for ``total`` uncompressed bytes on ``threads`` threads, decoded / uncompressed, read tasks and
    modes, the worker's CPU time, pieces written, what Dask spilled, the worker's peak RSS,
    restarts)."""
    import dataclasses

    one = floors(sample, threads)[0]["mb_s"]
    page_in(str(root))
    (before,) = client.run(cpu_times).values()
    client.run(reset_vm_hwm)
    parts = [dataclasses.replace(plan, tiles=[t]) for t in plan.tiles] if one_by_one else [plan]
    runs = [decode_run(part, client) for part in parts]
    (after,) = client.run(cpu_times).values()
    peak = max(client.run(vm_hwm).values())

    def summed(key: str):
        return sum(r[key] for r in runs)

    mbs = total / summed("seconds") / 1e6 / threads
    return {"seconds": round(summed("seconds"), 2), "floor_mb_s": round(one),
            "read_over_floor": round(mbs / one, 3),
            "decoded_over_uncompressed": round(summed("decoded_bytes") / total, 3),
            "read_tasks": summed("read_tasks"),
            "read_modes": sorted({m for r in runs for m in r["read_modes"]}),
            "user_s": round(after[0] - before[0], 1), "system_s": round(after[1] - before[1], 1),
            "written_gb": round(summed("written_bytes") / 1e9, 2),
            "spilled_gb": round(summed("spilled_bytes") / 1e9, 2),
            "peak_rss_gib": round(peak / 2**30, 2) if peak else None,
            "worker_restarts": summed("worker_restarts")}  # fmt: skip


def plan_bytes(plan) -> int:
    """Uncompressed bytes of the BOA of every scene of every tile of ``plan`` (what
    :func:`~treesits_dask.io.bands.planned_decode` counts against)."""
    return sum(len(t.scenes) * t.grid.height * t.grid.width * t.grid.count * 2 for t in plan.tiles)


def _reads(plan, args, memory_limit: str, cores: int, cube_root: str) -> dict:
    """Floor and pipeline reads, alternating ``args.repeat`` times (module docstring: --page-in)."""
    from ..pipeline.cluster import Routing
    from ..pipeline.reading import read_budget, worker_disks

    files, total = files_bytes(plan)
    sample = floor_sample(plan, args.floor_scenes, args.floor_mib)
    ones, pfloors, mems, runs, peaks = [], [], [], [], []
    cluster, client = bench_cluster(1, args.threads, memory_limit)
    try:
        info = client.scheduler_info(n_workers=-1)["workers"]
        limit = next(iter(info.values()))["memory_limit"]
        budget = read_budget(plan.config, info, Routing(), worker_disks(client))
        for i in range(args.repeat):
            one, per_core = floors(sample, cores)
            ones.append(one)
            pfloors.append(per_core)
            mems.append(memory_floor(sample))
            _log(
                f"  floor {ones[-1]['mb_s']:.0f} MB/s one thread, {pfloors[-1]['mb_s']:.0f} "
                f"MB/s per core on {cores} threads, {mems[-1]['mb_s']:.0f} MB/s one thread to "
                f"memory ({ones[-1]['mib']} MiB)"
            )
            if args.page_in:
                _log(f"  {page_in(cube_root) / 2**30:.2f} GiB of the cube read")
            elif args.cold:
                _log(f"  {page_out(cube_root) / 2**30:.2f} GiB of the cube out of the page cache")
            client.run(reset_vm_hwm)
            runs.append(decode_run(plan, client))
            peaks.append(max(v or 0 for v in client.run(vm_hwm).values()))
            r = runs[-1]
            _log(
                f"  read {i + 1}: {r['seconds']:.1f} s, {total / r['seconds'] / 1e6 / cores:.0f} "
                f"MB/s per core, decoded x{r['decoded_bytes'] / total:.3f} (screened whole, not "
                f"decoded x{r['screened_bytes'] / total:.3f}), {r['read_tasks']} "
                f"read tasks ({'/'.join(r['read_modes'])}), peak RSS {peaks[-1] / 2**20:.0f} MiB, "
                f"spilled {r['spilled_bytes'] / 2**20:.0f} MiB, pieces written to disk "
                f"{r['written_bytes'] / 2**20:.0f} MiB, buffers "
                f"{r['fresh_buffer_bytes'] / 2**20:.0f} MiB new / "
                f"{r['reused_buffer_bytes'] / 2**20:.0f} MiB recycled, "
                f"{r['prefetched_bytes'] / 2**20:.0f} MiB read ahead, "
                f"{r['worker_restarts']} worker restart(s)"
            )
    finally:
        client.close()
        cluster.close()
    best = min(runs, key=lambda r: r["seconds"])
    floor = max(f["mb_s"] for f in ones)
    pfloor = max(f["mb_s"] for f in pfloors)
    mfloor = max(f["mb_s"] for f in mems)
    per_core = total / best["seconds"] / 1e6 / cores
    # each read against the floors measured just before it (a shared machine's speed drifts)
    rounds = [total / r["seconds"] / 1e6 / cores for r in runs]
    return {
        "uncompressed_mib": round(total / 2**20, 1),
        "files": len(files),
        "decode_floor_mb_s_per_core": round(floor, 1),
        "decode_floor_runs": [round(f["mb_s"], 1) for f in ones],
        "decode_floor_sample_mib": ones[0]["mib"],
        "page_in": args.page_in,
        "cold": args.cold,
        # compressed bytes the reads asked the kernel to read ahead (io.prefetch)
        "prefetched_mib_runs": [round(r["prefetched_bytes"] / 2**20, 1) for r in runs],
        "read_s": round(best["seconds"], 2),
        "read_s_runs": [round(r["seconds"], 2) for r in runs],
        "read_mb_s_per_core": round(per_core, 1),
        "read_over_floor": round(per_core / floor, 3),
        "decode_floor_parallel_mb_s_per_core": round(pfloor, 1),
        "decode_floor_parallel_runs": [round(f["mb_s"], 1) for f in pfloors],
        "read_over_parallel_floor": round(per_core / pfloor, 3),
        # one thread decoding into memory beyond the CPU's cache, as the reads keep what they
        # decode (decode_floor's to_memory)
        "decode_floor_to_memory_mb_s_per_core": round(mfloor, 1),
        "decode_floor_to_memory_runs": [round(f["mb_s"], 1) for f in mems],
        "read_over_floor_to_memory": round(per_core / mfloor, 3),
        "fresh_buffer_mib_runs": [round(r["fresh_buffer_bytes"] / 2**20, 1) for r in runs],
        "reused_buffer_mib_runs": [round(r["reused_buffer_bytes"] / 2**20, 1) for r in runs],
        "read_over_floor_paired": [
            round(v / f["mb_s"], 3) for v, f in zip(rounds, ones, strict=True)
        ],
        "read_over_parallel_floor_paired": [
            round(v / f["mb_s"], 3) for v, f in zip(rounds, pfloors, strict=True)
        ],
        "read_over_floor_to_memory_paired": [
            round(v / f["mb_s"], 3) for v, f in zip(rounds, mems, strict=True)
        ],
        "decoded_mib": round(best["decoded_bytes"] / 2**20, 1),
        "decode_amplification": round(best["decoded_bytes"] / total, 4),
        "screened_share": round(best["screened_bytes"] / total, 4),
        "read_tasks": best["read_tasks"],
        "read_modes": best["read_modes"],
        "spilled_mib": round(best["spilled_bytes"] / 2**20, 1),
        # pieces the read tasks wrote to the worker's local disk themselves (io.pieces)
        "pieces_written_mib": round(best["written_bytes"] / 2**20, 1),
        "spill_budget_mib": None
        if budget.spill_bytes is None
        else round(budget.spill_bytes / 2**20),
        "read_task_budget_mib": round(budget.task_bytes / 2**20, 1),
        "worker_memory_limit_mib": round(limit / 2**20, 1),
        "worker_peak_rss_mib": round(max(peaks) / 2**20, 1),
        # a restarted worker's peak is its new process's: not within the limit
        "worker_restarts_runs": [r["worker_restarts"] for r in runs],
        "peak_rss_within_limit": max(peaks) <= limit
        and not any(r["worker_restarts"] for r in runs),
    }


def _sbert_mask(cube, fraction: float, seed: int = 7) -> str:
    """A mask of ``fraction`` of the tile: a random subset of the cube's forest pixels."""
    import rasterio

    out_dir = Path(cube.mask_dir).parent / (Path(cube.mask_dir).name + "-sbert")
    for tile in cube.tiles:
        src_path = Path(cube.mask_dir) / tile / "mask.tif"
        with rasterio.open(src_path) as src:
            forest = src.read(1) > 0
            profile = src.profile
        rng = np.random.default_rng(seed)
        keep = rng.random(forest.shape) < fraction / max(forest.mean(), 1e-9)
        (out_dir / tile).mkdir(parents=True, exist_ok=True)
        with rasterio.open(out_dir / tile / "mask.tif", "w", **profile) as dst:
            dst.write((forest & keep).astype(np.uint8)[None])
    return str(out_dir)


def _case(args, name: str, size: int, scenes: int, layout: str, memory_limit: str, workdir: Path):
    from ..config import load_config
    from ..io.grid import choose_window_shape
    from ..pipeline.cluster import routing_for
    from ..pipeline.memory import expected_workers, window_budget
    from ..pipeline.plan import make_plan
    from ..pipeline.run import RunError
    from ..synthetic import make_cube
    from ..synthetic.parallel import auto_processes

    cores = args.threads
    root = workdir / f"cube-{name}-{layout}"
    t0 = time.perf_counter()
    cube = make_cube(
        root / "cube", size=size, n_scenes=scenes, layout=layout, seed=5,
        forest_fraction=args.lstm_forest, forest_scale=args.forest_scale,
        mask_dir=str(root / "masks"), truth_dir=str(root / "truth"),
    )  # fmt: skip
    generated = time.perf_counter() - t0
    on_disk = sum(p.stat().st_size for p in (root / "cube").rglob("*.tif"))
    _log(f"[{name} {layout}] {size} px x {scenes} scenes written in {generated:.0f} s")
    models = bench_models(workdir, ["sits-lstm", "sbert"])
    base = dict(cube=cube.root, tiles="all", workers=1, threads_per_worker=args.threads,
                memory_limit=memory_limit, dashboard_address=":0",
                **models["sits-lstm"])  # fmt: skip
    probe = make_plan(load_config(overrides=dict(base, output=str(root / "probe")), environ={}))
    budget = int(WINDOW_BUDGET * (size / 3000) ** 2)
    # as `run` chooses with these settings: within what the worker can hold of all scenes
    workers = expected_workers(probe.config)
    window_bytes = window_budget(workers, routing_for(probe.config, workers))
    window = choose_window_shape(
        probe.tiles[0].grid, None, scenes, max_bytes=budget, window_bytes=window_bytes
    )
    base["window"] = f"{window[0]}x{window[1]}"
    plan = make_plan(load_config(overrides=dict(base, output=str(root / "o")), environ={}))
    out = {
        "size": size,
        "scenes": scenes,
        "layout": layout,
        "block_shape": list(plan.tiles[0].grid.block_shape),
        "window": list(window),
        "read_chunk": list(plan.tiles[0].reading.shape),
        "window_budget_mib": round(budget / 2**20, 1),
        "window_bytes_budget_mib": round(window_bytes / 2**20, 1),
        "window_mib": round(
            scenes * plan.tiles[0].grid.count * window[0] * window[1] * 2 / 2**20, 1
        ),
        "windows": len(plan.tiles[0].layout),
        "generated_s": round(generated, 1),
        "generator_processes": auto_processes(size, scenes),
        "on_disk_mib": round(on_disk / 2**20, 1),
    }
    out["read"] = _reads(plan, args, memory_limit, cores, cube.root)
    out["end_to_end"] = {}
    for family, forest in (("sits-lstm", args.lstm_forest), ("sbert", args.sbert_forest)):
        if family not in args.families:
            continue
        mask_dir = cube.mask_dir if family == "sits-lstm" else _sbert_mask(cube, forest)
        cfg = load_config(
            overrides=dict(base, **models[family], output=str(root / f"out-{family}"),
                           mask_dir=mask_dir),
            environ={},
        )  # fmt: skip
        try:
            e2e = end_to_end(cfg, 1, args.threads, memory_limit)
        except RunError as exc:  # e.g. windows of all scenes that the worker cannot hold
            out["end_to_end"][family] = {"forest_fraction": forest, "error": str(exc)}
            _log(f"[{name} {layout}] {family}: not run: {exc}")
            continue
        out["end_to_end"][family] = {
            "forest_fraction": forest,
            "seconds": round(e2e["seconds"], 2),
            "pixels_predicted": e2e["pixels"],
            "px_per_s": round(e2e["pixels"] / e2e["seconds"], 1),
            "decoded_mib": round(e2e["decoded_bytes"] / 2**20, 1),
            "worker_peak_rss_mib": [round(v, 1) for v in e2e["worker_peak_rss_mib"] if v],
        }
        _log(
            f"[{name} {layout}] {family}: {e2e['pixels']} px in {e2e['seconds']:.1f} s "
            f"({e2e['pixels'] / e2e['seconds']:.0f} px/s)"
        )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treesits_dask bench --real", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--size", type=int, default=3000, help="tile edge of the real case (3000)")
    p.add_argument("--scenes", type=int, default=120, help="scenes of the real case (120)")
    p.add_argument("--memory-limit", default="12GiB", help="worker memory limit, real case")
    p.add_argument("--regime-size", type=int, default=1000, help="tile edge, 600 case (1000)")
    p.add_argument("--regime-scenes", type=int, default=600, help="scenes, 600 case (600)")
    p.add_argument(
        "--regime-memory-limit", default="4GiB", help="worker memory limit, 600 case (4GiB)"
    )
    p.add_argument("--cases", default="real,600", help="which cases (real, 600)")
    p.add_argument("--layouts", default="strips,cog")
    p.add_argument("--families", default="sits-lstm,sbert")
    p.add_argument("--lstm-forest", type=float, default=0.02, help="forest share for sits-lstm")
    p.add_argument("--sbert-forest", type=float, default=0.002, help="mask share for sbert")
    p.add_argument("--forest-scale", type=float, default=250.0, help="forest patch width (px)")
    p.add_argument("--floor-scenes", type=int, default=8, help="scenes of the decode floor sample")
    p.add_argument(
        "--floor-mib", type=float, default=1536.0,
        help="the floor sample holds at least this many MiB uncompressed (more scenes if needed)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="default: as `run` (min(cores, 4))")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument(
        "--page-in", action="store_true",
        help="read the cube's files into the page cache before each timed read (as the floor's)",
    )  # fmt: skip
    p.add_argument(
        "--cold", action="store_true",
        help="drop the cube's files from the page cache before each timed read (as a national "
        "cube is read: from disk)",
    )  # fmt: skip
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true", help="keep the cubes")
    p.add_argument("--json", default=None, help="also write the report to this file")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    cores = os.cpu_count() or 1
    args.threads = args.threads or min(cores, 4)
    args.families = [f for f in args.families.split(",") if f]
    tmp = tempfile.TemporaryDirectory(prefix="treesits-real-") if args.workdir is None else None
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "machine": {"cores": cores, "threads": args.threads, "load_average": os.getloadavg()},
        "cases": {},
    }
    cases = {
        "real": (args.size, args.scenes, args.memory_limit),
        "600": (args.regime_size, args.regime_scenes, args.regime_memory_limit),
    }
    try:
        for name in [c for c in args.cases.split(",") if c]:
            size, scenes, limit = cases[name]
            for layout in [x for x in args.layouts.split(",") if x]:
                key = f"{name}-{layout}"
                report["cases"][key] = _case(args, name, size, scenes, layout, limit, workdir)
                report["cases"][key]["load_average"] = os.getloadavg()
    finally:
        if tmp is not None:
            tmp.cleanup()
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
