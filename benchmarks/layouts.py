"""A tile in two file layouts (a FORCE cube kept up to date across FORCE versions: its older
scenes FORCE < 3.8 strips, its newer ones COGs), read two ways alternating in one process (one
worker, the cube in the page cache, each read against the one-thread decode floor measured just
before it): ``parts``, as a run reads it, one part per layout, each planned for its own blocks
(``io.layouts``); ``one-plan``, as before, one plan for all scenes, made for the layout of most.

    python benchmarks/layouts.py --strips STRIPS_CUBE --cogs COG_CUBE --each 60 --window 250 \\
        --memory-limit 12GiB --rounds 2 --workdir /data/wd --json layouts.json
    python benchmarks/layouts.py ... --each 40 --cog-scenes 80   # most scenes COGs

The tile is made of hard links under ``--workdir``: the first ``--each`` Sentinel-2 scenes of
``--strips`` (dated one year before the COGs') and then ``--cog-scenes`` (default: as many) of
``--cogs`` (one tile of the same grid,
``X0069_Y0043`` by default); with ``--alternate K`` the layouts alternate every K scenes
instead (strips first, dated 5 days apart).  Prints one JSON line per read: seconds, read /
one-thread floor, decoded / uncompressed bytes (counted by the reads), read tasks and modes, the
worker's CPU time, the pieces written to local disk, what Dask spilled and the worker's peak RSS
during the read.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
from pathlib import Path


def mixed_cube(
    strips: str, cogs: str, tile: str, each: tuple[int, int], root: Path, alternate: int = 0
) -> Path:
    """Hard links to ``each[0]`` Sentinel-2 scenes of ``strips`` dated a year before and then to
    ``each[1]`` of ``cogs``, as one tile ``tile`` under ``root`` (with the COG cube's .prj);
    ``alternate`` > 0: the layouts alternate every that many scenes instead (strips first, the
    scenes of both cubes in their order, dated 5 days apart from the first strip's day)."""
    folder = root / tile
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy(Path(cogs) / "datacube-definition.prj", root / "datacube-definition.prj")
    if alternate > 0:
        _alternating(strips, cogs, tile, each, folder, alternate)
        return root
    taken: set[str] = set()
    for source, years, wanted in ((strips, -1, each[0]), (cogs, 0, each[1])):
        boas = sorted(p for p in (Path(source) / tile).glob("*_LEVEL2_SEN2?_BOA.tif"))
        linked = 0
        for boa in boas:
            day = dt.datetime.strptime(boa.name[:8], "%Y%m%d").date()
            try:
                day = day.replace(year=day.year + years)
            except ValueError:  # 29 February
                continue
            name = f"{day:%Y%m%d}" + boa.name[8:]
            if name in taken:
                continue
            taken.add(name)
            _link_scene(boa, folder / name)
            linked += 1
            if linked == wanted:
                break
    return root


def _alternating(
    strips: str, cogs: str, tile: str, each: tuple[int, int], folder: Path, k: int
) -> None:
    """Links the scenes of :func:`mixed_cube`'s tile into ``folder``, the layouts alternating
    every ``k`` scenes."""
    sources = [sorted((Path(c) / tile).glob("*_LEVEL2_SEN2?_BOA.tif"))[:n]
               for c, n in ((strips, each[0]), (cogs, each[1]))]  # fmt: skip
    if any(len(s) < n for s, n in zip(sources, each, strict=True)):
        raise SystemExit(f"--each/--cog-scenes ask for more scenes than {strips} or {cogs} hold")
    day = dt.datetime.strptime(sources[0][0].name[:8], "%Y%m%d").date()
    order = sorted(((i // k) * 2 + side, i, side) for side, s in enumerate(sources)
                   for i in range(len(s)))  # fmt: skip
    for n, (_, i, side) in enumerate(order):
        boa = sources[side][i]
        _link_scene(boa, folder / (f"{day + dt.timedelta(days=5 * n):%Y%m%d}" + boa.name[8:]))


def _link_scene(boa: Path, dest: Path) -> None:
    """Hard links ``dest`` to the scene's BOA file ``boa``, and its QAI beside (the same names
    with ``_QAI``)."""
    os.link(boa, dest)
    qai = boa.name.replace("_BOA", "_QAI")
    os.link(boa.with_name(qai), dest.with_name(dest.name.replace("_BOA", "_QAI")))


def mixed_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of a benchmark on a tile of hard links to two cubes (:func:`mixed_tile`),
    read on one worker in rounds."""
    p.add_argument("--strips", required=True, help="a FORCE cube of striped files")
    p.add_argument("--cogs", required=True, help="a FORCE cube of COGs on the same grid")
    p.add_argument("--tile", default="X0069_Y0043")
    p.add_argument("--each", type=int, default=60, help="scenes of each layout")
    p.add_argument("--cog-scenes", type=int, default=None, help="COG scenes (default --each)")
    p.add_argument("--alternate", type=int, default=0,
                   help="the layouts alternate every this many scenes (default 0: all the "
                   "strips, then all the COGs)")  # fmt: skip
    p.add_argument("--window", type=int, default=250, help="square windows of this edge")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-limit", default="12GiB")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", required=True)
    p.add_argument("--json", default=None)


def mixed_tile(args) -> Path:
    """The cube of :func:`mixed_cube` under ``--workdir`` as :func:`mixed_arguments` give it."""
    each = (args.each, args.each if args.cog_scenes is None else args.cog_scenes)
    root = Path(args.workdir) / "cube"
    return mixed_cube(args.strips, args.cogs, args.tile, each, root, args.alternate)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mixed_arguments(p)
    args = p.parse_args(argv)

    import dataclasses

    from treesits_dask.bench.measure import bench_cluster, bench_config, close_bench, emit_row
    from treesits_dask.bench.real import files_bytes, floor_sample, measured_read
    from treesits_dask.io.layouts import layout_parts
    from treesits_dask.pipeline.plan import make_plan

    wd = Path(args.workdir)
    root = mixed_tile(args)
    config = bench_config(root, wd, args.threads, args.memory_limit, args.window)
    parts = make_plan(config)
    (tile,) = parts.tiles
    plain = tuple(dataclasses.replace(s, block_shape=None) for s in tile.scenes)
    plans = {
        "parts": parts,
        "one-plan": dataclasses.replace(parts, tiles=[dataclasses.replace(tile, scenes=plain)]),
    }
    _, total = files_bytes(parts)
    sample = floor_sample(parts)
    report: dict = {
        "cube": str(root), "window": args.window, "threads": args.threads,
        "memory_limit": args.memory_limit, "uncompressed_mib": round(total / 2**20),
        "read_chunk": list(tile.reading.shape), "grid_blocks": list(tile.grid.block_shape),
        "file_blocks": {f"{q.grid.block_shape[0]}x{q.grid.block_shape[1]}": len(q.indices)
                        for q in layout_parts(tile.scenes, tile.grid)},
        "reads": [],
    }  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "reads"}), flush=True)
    cluster, client = bench_cluster(1, args.threads, args.memory_limit)
    try:
        for r in range(args.rounds):
            order = list(plans) if r % 2 == 0 else list(plans)[::-1]
            for variant in order:
                read = measured_read(plans[variant], client, root, sample, total, args.threads)
                emit_row(report, {"round": r, "variant": variant, **read}, args.json)
    finally:
        close_bench(None, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
