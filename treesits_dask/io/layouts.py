"""Tiles whose scenes are not all in one file layout, read part by part so that every block is
still decoded once.

A FORCE cube kept up to date across FORCE versions holds, in one tile folder, FORCE < 3.8 files
(full-width strips of 300 rows, LZW) for its older scenes and FORCE >= 3.8 COGs (256 x 256 px
blocks, ZSTD) for its newer ones.  A tile's read is planned for its files' blocks
(:mod:`treesits_dask.io.bands`), and a plan for one layout cuts the blocks of the other: read in
bands of whole 300-row strips, a 3000 px COG's 256-row block rows are decoded 1.77 times; read in
chunks of whole COG blocks, a strip is decoded once per run of chunks that crosses it (4.2 times
with 120 scenes on a 12 GiB worker, 12.6 times with 600).  So such a tile is read as one part per
layout (:func:`layout_parts`), each planned for its own blocks into the same chunks, with the
reading worker's memory and disk shared by the bands they hold (:func:`part_plans`), and each
chunk is put together from the pieces of every part in the scenes' order
(:func:`~treesits_dask.io.cube.tile_cube`).  On a 3000 px tile of 40 strips and 80 COGs (one
worker of 2 threads and 12 GiB) that read in 27.6-28.5 s against 51.3-56.5 s in one plan
(decoded x0.912 against x1.894); of 60 and 60, in 33.9-35.2 s against 32.1-32.5 s (x0.920
against x1.306, the COGs' ZSTD blocks being cheap to decode again), with more pieces through the
local disk (``benchmarks/layouts.py``).

A tile streamed through the model (:mod:`treesits_dask.pipeline.streaming`) carries its windows'
states from one batch of scenes to the next in windows that cross no two bands of one plan.  It
is streamed in one stage per run of consecutive scenes in one layout (:func:`layout_runs`),
each read by a plan for its own blocks and stepped in windows of its own, the first windows of a
stage taking their states from the last of the stage before
(:func:`~treesits_dask.pipeline.streaming.stages_layer`).  Where the stages' sections (two
stages' states held at once) would decode more, or beyond :data:`STREAM_STAGES` runs where the
stages would not decode :data:`STAGE_COST` scenes' bytes less each (many short runs), it is
read in one plan, made for the layout of most of its scenes, which decodes the others' blocks
more than once (``plan`` counts it: :func:`~treesits_dask.pipeline.reading.tile_read_plans`).

The driver learns the layouts from the headers it reads anyway and, for the scenes it does not
open again, from the block shapes the tile's record keeps (:func:`with_layouts`,
:func:`~treesits_dask.state.ledger.known_scenes`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Sequence

from .bands import ReadPlan, plan_reads
from .grid import TileGrid, WindowLayout

__all__ = ["STAGE_COST", "STREAM_STAGES", "LayoutPart", "block_shape_of", "layout_parts",
           "layout_runs", "layouts_text", "part_plans", "share", "with_layouts"]  # fmt: skip

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LayoutPart:
    """The scenes of a tile in one file layout: ``grid`` (the tile's grid with their block shape)
    and their positions in the tile's scenes (``indices``, ascending)."""

    grid: TileGrid
    indices: tuple[int, ...]


def layout_parts(scenes: Sequence, grid: TileGrid) -> tuple[LayoutPart, ...]:
    """The parts of a tile's ``scenes`` (:class:`~treesits_dask.io.discovery.Scene`) by the block
    shape of their BOA files (``Scene.block_shape``; None: the tile grid's), in the order of their
    first scenes; one part, with ``grid`` itself, where they are all in one layout."""
    shapes = [tuple(s.block_shape or grid.block_shape) for s in scenes]
    if len(set(shapes)) <= 1:
        return (LayoutPart(grid, tuple(range(len(scenes)))),)
    return tuple(
        LayoutPart(
            dataclasses.replace(grid, block_shape=shape),
            tuple(i for i, s in enumerate(shapes) if s == shape),
        )
        for shape in dict.fromkeys(shapes)
    )


#: a streamed tile is read in one stage per run of consecutive scenes in one file layout where
#: it has at most this many (each run's windows take their states from the run's before): a
#: cube that changed layout once has two; beyond, only where the stages pay (:data:`STAGE_COST`)
STREAM_STAGES = 4

#: beyond :data:`STREAM_STAGES` runs, a streamed tile is read in stages only where they decode
#: at least this many of its scenes' bytes per stage less than one plan for all its scenes: each
#: stage reads its bands and steps every window through at least one batch of its own.  Measured
#: (``benchmarks/stream_layouts.py``, one worker of 2 threads, stages against one plan) on a
#: 1000 px tile of 224 scenes alternating every 28, 14, 7 and 4 scenes (100-row strips, 256 px
#: COGs, 3 GiB, 100 px windows; the stages save 31.6, 15.8, 7.9, 4.5 scenes each): 7 and 8 %
#: faster, 7 and 32 % slower; on 3000 px tiles of 240 scenes alternating every 40 and 32 (8 GiB,
#: 250 px windows; 15.4 and 11.5): 0-5 and 3-5 % faster; of 32 alternating every 4 (1.5): 15-30 %
#: slower.
STAGE_COST = 10


def layout_runs(scenes: Sequence, grid: TileGrid) -> tuple[LayoutPart, ...]:
    """The runs of consecutive ``scenes`` in one file layout (``Scene.block_shape``; None: the
    tile grid's), oldest first, each with its grid (as :func:`layout_parts`); one, with ``grid``
    itself, where they are all in one layout."""
    parts = layout_parts(scenes, grid)
    if len(parts) == 1:
        return parts
    grids = {p.grid.block_shape: p.grid for p in parts}
    runs: list[list] = []
    for i, s in enumerate(scenes):
        shape = tuple(s.block_shape or grid.block_shape)
        if runs and runs[-1][0] == shape:
            runs[-1][1].append(i)
        else:
            runs.append([shape, [i]])
    return tuple(LayoutPart(grids[shape], tuple(indices)) for shape, indices in runs)


def share(nbytes: int | None, part: int, whole: int) -> int | None:
    """``part`` / ``whole`` of ``nbytes`` (None: no limit)."""
    return None if nbytes is None else nbytes * part // max(1, whole)


def part_plans(
    scenes: Sequence,
    grid: TileGrid,
    layout: WindowLayout,
    task_bytes: int,
    min_tasks: int = 1,
    held_bytes: int | None = None,
    spill_bytes: int | None = None,
    in_memory_bytes: int | None = None,
) -> tuple[tuple[LayoutPart, ReadPlan, tuple], ...]:
    """Each part of ``scenes`` (:func:`layout_parts`) with its read plan
    (:func:`~treesits_dask.io.bands.plan_reads`, planned for its own blocks in the chunks of
    ``layout``) and the ``(held_bytes, spill_bytes, in_memory_bytes)`` it was planned with.

    A read task's memory is ``task_bytes`` for every part (a thread reads one task at a time).
    The memory and disk a reading worker may fill with held bands (``held_bytes``,
    ``spill_bytes``, ``in_memory_bytes``) go to the parts whole where the bands that each part's
    plan holds with all of them (:attr:`~treesits_dask.io.bands.ReadPlan.held`) fit together
    (a part read in chunks of whole blocks holds none); else they are shared among the parts by
    those bands, and where a part's share reads it window by window (which holds no band: its
    tasks' memory is ``task_bytes``), its share goes to the parts that hold bands.  On a 3000 px
    tile of 60 strips and 60 COGs (12 GiB, 2 threads, 250 px windows, no disk counted on), the
    strips' share read them a window row per task (each strip once) and the COGs' share read
    them in 3 sections of window columns; with the strips' share the COGs are one plan of bands:
    46.5-52.0 s against 50.6-61.4 s, decoded x0.920 against x0.997, Dask spilling 1.8 GB against
    4.6-8.0 (docs/performance.md, "A part that holds no band gives its share to the others")."""
    parts = layout_parts(scenes, grid)
    budgets = (held_bytes, spill_bytes, in_memory_bytes)

    def planned(part: LayoutPart, of: int, whole: int) -> tuple:
        held, spill, in_memory = own = tuple(share(b, of, whole) for b in budgets)
        plan = plan_reads(
            part.grid, layout, len(part.indices), task_bytes, min_tasks=min_tasks,
            held_bytes=held, spill_bytes=spill, in_memory_bytes=in_memory,
        )  # fmt: skip
        return part, plan, own

    alone = [planned(part, 1, 1) for part in parts]
    needs = [plan.held for _, plan, _ in alone]
    room = None if held_bytes is None else min(held_bytes, in_memory_bytes or held_bytes)
    if len(parts) == 1 or room is None or sum(needs) <= room:
        return tuple(alone)
    shared = [planned(part, need, sum(needs)) for part, need in zip(parts, needs, strict=True)]
    idle = {k for k, (_, plan, _) in enumerate(shared) if plan.by_window}  # hold no band
    if not idle or len(idle) == len(parts):
        return tuple(shared)
    holding = sum(need for k, need in enumerate(needs) if k not in idle)
    return tuple(
        shared[k] if k in idle else planned(part, needs[k], holding) for k, part in enumerate(parts)
    )


def layouts_text(parts: Sequence[LayoutPart]) -> str:
    """``"420 scenes in 300 x 3000 px blocks, 180 in 256 x 256"``: the parts' scenes and blocks."""
    words = [f"{len(p.indices)} in {p.grid.block_shape[0]} x {p.grid.block_shape[1]}"
             for p in parts]  # fmt: skip
    return (
        words[0].replace(" in ", " scenes in ", 1)
        + " px blocks"
        + "".join(f", {w}" for w in words[1:])
    )


def block_shape_of(url: str) -> tuple[int, int]:
    """The block shape (rows, cols) of the first band of a GeoTIFF, from its header
    (:func:`~treesits_dask.io.datasets.open_retrying`: with retries where remote, an
    :class:`~treesits_dask.errors.InputDataError` naming it where it cannot be opened)."""
    from .datasets import open_retrying

    with open_retrying(url) as src:
        return tuple(src.block_shapes[0])


def with_layouts(
    scenes: Sequence, grid: TileGrid, found: dict[str, tuple[int, int]], threads: int = 16
) -> tuple[tuple, TileGrid]:
    """``scenes`` with the block shape of each BOA file (``Scene.block_shape``) where they are not
    all in one layout, and the tile's grid in the layout of most of them (where as many are in
    each, the first scene's); else ``scenes`` and ``grid`` as they are.

    ``grid`` is the first scene's (its block shape that file's); ``found``: the block shapes of
    BOA files whose headers were read already (the driver's checks of the scenes no earlier run
    checked, and those the tile's record keeps of the scenes it holds unchanged: with both, every
    scene's).  The newest scene's header is read where it is not among them: a cube kept up to
    date across FORCE versions changes layout from one scene on, so the newest scene and the new
    ones show it; only where two layouts show are the other scenes' headers read."""
    from concurrent.futures import ThreadPoolExecutor

    if not scenes:
        return tuple(scenes), grid
    shapes = {scenes[0].boa: tuple(grid.block_shape), **found}
    if scenes[-1].boa not in shapes:
        shapes[scenes[-1].boa] = block_shape_of(scenes[-1].boa)
    if len(set(shapes.values())) == 1:
        return tuple(scenes), grid
    missing = [s.boa for s in scenes if s.boa not in shapes]
    if missing:
        with ThreadPoolExecutor(max(1, min(threads, len(missing)))) as pool:
            shapes.update(zip(missing, pool.map(block_shape_of, missing), strict=True))
    per_scene = [shapes[s.boa] for s in scenes]
    counts = collections.Counter(per_scene)
    most = max(counts, key=lambda shape: (counts[shape], shape == tuple(grid.block_shape)))
    out = tuple(
        dataclasses.replace(s, block_shape=b) for s, b in zip(scenes, per_scene, strict=True)
    )
    tile_grid = dataclasses.replace(grid, block_shape=most)
    log.info("tile %s: its scenes are in %d file layouts (%s); each is read in blocks of its own",
             grid.tile, len(counts), layouts_text(layout_parts(out, tile_grid)))  # fmt: skip
    return out, tile_grid
