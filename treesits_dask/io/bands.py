"""How a tile is read: the READ units (bands of whole file blocks x batches of scenes), decoupled
from the output windows (the map's chunks), so that every compressed block of every scene is
decoded once per tile, whatever the window.

A FORCE < 3.8 file is cut in full-width strips (300 rows of a 3000 px tile) and LZW decodes a strip
only as a whole; a FORCE >= 3.8 COG in 256 x 256 blocks, which 3000 px tiles and their windows
(divisors of 3000) never align with.  Reading window by window therefore decodes a strip once
per window that crosses it (12x for 250 x 250 windows on a 3000 px tile) and most COG blocks up to
four times.  Here a tile is read in :class:`Band`\\ s, runs of whole block rows over the full
width, each by one task per batch of scenes; the task cuts what it decoded into the pieces of the
windows that cross the band, and a window is put together from its pieces (see
:func:`treesits_dask.io.cube.tile_cube`).  Each block belongs to exactly one band, so it is
decoded once.  The scenes of a band are read in batches sized from a memory budget
(:func:`plan_reads`), so a task's memory does not grow with the scene count; when a window row is
a band on its own and one batch holds every scene, the band's task IS the window (no pieces).
A striped tile whose windows cut its strips is chunked whole strips high
(:func:`~treesits_dask.io.grid.read_shape`), so that each band is one row of chunks and its pieces
are whole chunks, all of one size (their buffers are recycled for each other).

Where the bands of all scenes fit neither a reading worker's memory nor its spill disk, the tile
is read fewer bands at a time, each band's reads waiting for the windows of an earlier band
(:attr:`ReadPlan.gate`), which still decodes every block once; where not even that fits, window
by window, or in sections of whole window columns side by side whose bands do fit
(:func:`plan_reads`), whichever decodes less.

Where every window starts on a block edge, each block lies in one window and the window's own
read decodes it once, into the window: nothing is held or put together.  The pipeline chunks COG
tiles so (:func:`~treesits_dask.io.grid.read_shape`: whole blocks near the window's size, the
outputs rechunked to the windows); their read tasks each read a run of a window row's windows
(:func:`window_groups`), scene by scene, so that a task opens each file once.

:func:`decoded_bytes` counts what a read decodes (whole blocks intersecting it), for the decode
amplification the benchmark reports.

This module is longer than 400 lines: a tile's read plan (bands, scene batches, sections, runs of
windows) and the counts it is chosen by are one decision, measured as one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .grid import TileGrid, WindowLayout

__all__ = [
    "BAND_ROWS",
    "BANDS_HELD",
    "GATE_DECODE",
    "STREAM_WINDOW_PIXELS",
    "Band",
    "Piece",
    "ReadPlan",
    "balanced_batches",
    "block_runs",
    "decoded_bytes",
    "plan_reads",
    "planned_decode",
    "scene_batches",
    "stream_windows",
    "streamed_within",
    "turn_share",
    "window_groups",
]


#: bands are at least this many rows high (or a whole window row, if lower), even when the file's
#: blocks are lower; smaller bands let windows start earlier (their bands are read sooner)
BAND_ROWS = 128


#: bands of all scenes a reading worker holds at once while windows are put together from them
#: (measured: 9.1 GiB peak RSS for 2.2 GB bands, 3000 px x 120 scenes, 2 threads): the memory
#: guard of :func:`plan_reads` counts this many
BANDS_HELD = 4


@dataclass(frozen=True)
class Piece:
    """The part of window ``(i, j)`` that lies in a band: rows ``band_rows`` of the band (relative
    to it) are rows ``window_rows`` of the window; columns ``col_off`` .. ``col_off + width`` of the
    tile."""

    i: int
    j: int
    band_rows: tuple[int, int]
    window_rows: tuple[int, int]
    col_off: int
    width: int


@dataclass(frozen=True)
class Band:
    """Rows ``row_off`` .. ``row_off + height`` of a tile, over its full width (``cols`` None) or
    over the columns ``cols`` ``[start, stop)`` of a section of the tile (see :func:`plan_reads`):
    whole block rows of the files, read by one task per batch of scenes.  ``pieces``: the windows
    that cross it."""

    index: int
    row_off: int
    height: int
    pieces: tuple[Piece, ...]
    cols: tuple[int, int] | None = None

    def columns(self, width: int) -> tuple[int, int]:
        """``[start, stop)`` of the band's columns in a tile ``width`` px wide."""
        return self.cols if self.cols is not None else (0, width)


@dataclass(frozen=True)
class ReadPlan:
    """The read units of one tile: its ``bands`` and the scene ``batches`` (index ranges
    ``[start, stop)``) each band is read in.  ``of_window[(i, j)]``: (band index, piece index) of
    each piece of window ``(i, j)``, top to bottom."""

    bands: tuple[Band, ...]
    batches: tuple[tuple[int, int], ...]
    of_window: dict = None  # type: ignore[assignment]  # filled in __post_init__
    #: each window is read on its own (``bands`` empty): where the bands of all scenes fit neither
    #: the reading worker's memory nor its spill disk, decoding the blocks it crosses once per
    #: window; where the windows are ``aligned``, decoding each block once
    by_window: bool = False
    #: the bands of all scenes do not fit the reading worker's memory but its disk: the read tasks
    #: hand out pieces that own their memory (a view would keep its whole band in memory), or,
    #: where the worker has no room for them, their own file on its local disk
    #: (:mod:`~treesits_dask.io.pieces`)
    spills: bool = False
    #: bytes of the :data:`BANDS_HELD` bands of all scenes a reading worker holds (the memory
    #: guard's figure; ``gate`` bands where the plan has one; of a section's width where
    #: ``sections``; 0 where every band is a whole window)
    held: int = 0
    #: every window starts on a block edge, so each block lies in one window: each window reads
    #: its own blocks into itself (``by_window``), nothing is put together or held
    aligned: bool = False
    #: where ``by_window``: the windows ``(i, j)`` each read task reads, scene by scene, so that
    #: a task opens each file once and decodes each block once for all of them: consecutive
    #: windows of a window row, as many as the task's memory allows
    groups: tuple[tuple[tuple[int, int], ...], ...] = ()
    #: the tile is read in this many sections of whole window columns side by side, each in
    #: bands of its own width (numbered after the previous section's): where the bands
    #: of the full width fit neither the reading worker's memory nor its spill disk, a section's
    #: do (a full-width strip is decoded once per section)
    sections: int = 1
    #: where not 0, the reads of band ``b`` wait until every window with a piece in band
    #: ``b - gate`` is put together (:meth:`gated_by`; each such window crosses only bands above
    #: ``b``), so that a reading worker holds the pieces of at most ``gate`` bands, not the
    #: :data:`BANDS_HELD` that Dask's order held: where those fit neither its memory nor its
    #: spill disk, ``gate`` bands may, and every block is still decoded once
    gate: int = 0
    #: the tile's scenes go through the model batch by batch, each window's model state carried
    #: from one batch to the next (a one-way LSTM or SBERT, see
    #: :mod:`treesits_dask.pipeline.streaming`):
    #: the bands are read as ``batches`` of scenes, each batch of a band decoded once and
    #: dropped once its windows stepped through it; nothing of all scenes is held (``held`` 0)
    stream: bool = False
    #: where not None (a streamed plan): the windows its pieces cut, none of them crossing two
    #: bands: the layout it was planned for, or where those windows tie bands together or are
    #: large, windows one band high (:func:`stream_windows`; the outputs are rechunked to the
    #: layout's).  A window's model state lives from its group's first batch to its outputs, so
    #: the tile holds the states of at most two bands' pixels (:meth:`states_bytes`)
    windows: WindowLayout | None = None

    def __post_init__(self) -> None:
        found: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for band in self.bands:
            for k, p in enumerate(band.pieces):
                found.setdefault((p.i, p.j), []).append((band.index, k))
        object.__setattr__(self, "of_window", {key: tuple(v) for key, v in found.items()})

    def __hash__(self) -> int:  # of_window follows from the bands
        return hash(self._identity())

    def _identity(self) -> tuple:
        return (
            self.bands, self.batches, self.by_window, self.spills, self.groups, self.sections,
            self.gate, self.stream, self.windows,
        )  # fmt: skip

    def __eq__(self, other) -> bool:
        return isinstance(other, ReadPlan) and self._identity() == other._identity()

    def direct(self, band: Band) -> bool:
        """Whether ``band`` is exactly one whole window read in one batch: its task's result is
        the window itself."""
        if len(self.batches) != 1 or len(band.pieces) != 1:
            return False
        p = band.pieces[0]
        return p.band_rows == (0, band.height) and p.window_rows == (0, band.height)

    @property
    def tasks(self) -> int:
        """Read tasks of the tile (bands x batches)."""
        return len(self.bands) * len(self.batches)

    def band_groups(self) -> tuple[tuple[int, ...], ...]:
        """The bands (indices, top to bottom) that windows tie together: a window's bands are in
        one group, and a band crossed by two window rows joins their groups.  Where each window
        row is whole bands (a striped tile chunked whole strips high), a group is a window row's
        bands."""
        groups: list[list[int]] = []
        above: set[int] = set()  # the window rows crossing the band above
        for band in self.bands:  # full-width bands, top to bottom: a group is a run of them
            rows = {p.i for p in band.pieces}
            if groups and rows & above:
                groups[-1].append(band.index)
            else:
                groups.append([band.index])
            above = rows
        return tuple(tuple(g) for g in groups)

    def states_bytes(self, width: int, per_pixel: int, pixels=None) -> int:
        """Where the plan streams: the most memory the windows' model states hold at once,
        ``per_pixel`` bytes each (bands of a tile ``width`` px wide, or of their sections), every
        pixel predicted, or where ``pixels`` (the tile's mask's:
        :class:`~treesits_dask.io.masks.MaskPixels`) is given, those: the states of its two
        largest groups of bands (a group's states live from its first batch to its outputs, and
        the next group's first batches are read and stepped while its last ones are; see
        :mod:`treesits_dask.pipeline.streaming`; a section's after the previous section's)."""

        def count(b: Band) -> int:
            rows, cols = (b.row_off, b.row_off + b.height), b.columns(width)
            return b.height * (cols[1] - cols[0]) if pixels is None else pixels.count(rows, cols)

        band = {b.index: count(b) for b in self.bands}
        sizes = sorted((sum(band[b] for b in g) for g in self.band_groups()), reverse=True)
        return sum(sizes[:2]) * per_pixel

    @property
    def bands_held(self) -> int:
        """Bands of all scenes the guard counts a reading worker to hold at once (``held``)."""
        return self.gate or BANDS_HELD

    def gated_by(self, band_index: int) -> tuple[tuple[int, int], ...]:
        """The windows ``(i, j)`` that must be put together before band ``band_index`` is read:
        those with a piece in band ``band_index - gate`` (none without a gate, or for the first
        ``gate`` bands)."""
        if not self.gate or band_index < self.gate:
            return ()
        above = self.bands[band_index - self.gate]
        return tuple(dict.fromkeys((p.i, p.j) for p in above.pieces))

    def section_of(self, band_index: int) -> int:
        """The section (0 .. ``sections`` - 1) whose columns band ``band_index`` covers."""
        return band_index * self.sections // max(1, len(self.bands))


def _band_rows(grid: TileGrid, layout: WindowLayout) -> list[tuple[int, int]]:
    """Row ranges of the bands: each ends at the first block edge that is a window-row edge or
    lies at least ``min(window height, BAND_ROWS)`` rows below its start: a whole window row where
    the windows are block-aligned, else one block row (at least :data:`BAND_ROWS` rows, so files
    of one-row strips do not make one-row bands)."""
    bh = max(1, grid.block_shape[0])
    target = max(1, min(layout.shape[0], BAND_ROWS))
    window_edges = {w.row_off for w in (row[0] for row in layout.windows)} | {grid.height}
    edges = [*range(bh, grid.height, bh), grid.height]
    out: list[tuple[int, int]] = []
    start = 0
    for edge in edges:
        if edge in window_edges or edge - start >= target or edge == grid.height:
            out.append((start, edge))
            start = edge
    return out


#: the read tasks of a tile's bands should fill at least this share of the reading threads' turns
#: (equal tasks taken in turns): 20 tasks on 6 threads take 4 turns and keep 2 of 6 threads busy in
#: the fourth, 20 of 24 thread-turns (0.83); 30 fill 5 turns, and read the 3000 px x 120-scene
#: strips tile in 28.9-30.2 s against 31.2-32.0 s on a 16-core machine (6 threads, as the
#: Kubernetes read workers)
FULL_TURNS = 0.9


def turn_share(tasks: int, threads: int) -> float:
    """The share of ``threads`` x turns that ``tasks`` equal tasks keep busy (1: full turns)."""
    threads = max(1, threads)
    return tasks / (threads * math.ceil(tasks / threads)) if tasks > 0 else 1.0


def balanced_batches(n_bands: int, fewest: int, n_scenes: int, threads: int) -> int:
    """How many scene batches the ``n_bands`` bands of a tile are read in: at least ``fewest``
    (what the memory budget needs), and the fewest from there whose ``n_bands x batches`` read tasks
    keep :data:`FULL_TURNS` of ``threads`` busy (at most 4 x ``fewest`` batches, one scene each at
    most); the batch count that comes closest where none does."""
    fewest = max(1, min(fewest, n_scenes))
    candidates = range(fewest, max(fewest, min(n_scenes, 4 * fewest)) + 1)
    for b in candidates:
        if turn_share(n_bands * b, threads) >= FULL_TURNS:
            return b
    return max(candidates, key=lambda b: (turn_share(n_bands * b, threads), -b))


def scene_batches(
    n_scenes: int, per_scene: int, budget: int, min_batches: int = 1, n_bands: int = 1,
    threads: int = 1,
):  # fmt: skip
    """``[start, stop)`` index ranges covering ``n_scenes``: as few batches as keep
    ``per_scene x batch`` bytes within ``budget`` (at least one scene each), at least
    ``min_batches`` of them, of equal sizes (differing by one at most); more where the read
    tasks of ``n_bands`` bands would leave ``threads`` idle in their last turn
    (:func:`balanced_batches`)."""
    if n_scenes <= 0:
        return ((0, 0),)
    fit = max(1, budget // max(1, per_scene))
    n = min(n_scenes, max(min_batches, math.ceil(n_scenes / fit)))
    n = balanced_batches(n_bands, n, n_scenes, threads)
    edges = np.linspace(0, n_scenes, n + 1).round().astype(int)
    return tuple((int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True))


def plan_reads(
    grid: TileGrid,
    layout: WindowLayout,
    n_scenes: int,
    task_bytes: int,
    bands: int | None = None,
    min_tasks: int = 1,
    held_bytes: int | None = None,
    spill_bytes: int | None = None,
    in_memory_bytes: int | None = None,
    stream: str = "never",
    state_room: int | None = None,
    states=None,
) -> ReadPlan:
    """The read plan of a tile whose windows are ``layout``.

    ``task_bytes``: the memory one read task may fill with decoded scenes (the reading worker's
    budget shared out among its threads); a band is read in as few batches of scenes as fit it.
    Where every band is a whole window row (full-width windows of whole strips), each band is
    read in one task of all scenes, whose result is the window; where every window starts on a
    block edge (whole COG blocks, see :func:`~treesits_dask.io.grid.read_shape`), each window is
    read by its own task (``aligned``), which decodes each block once too.
    ``bands`` (default: the grid's count) bands per scene are held, plus a QAI row that is screened
    away at once.  ``min_tasks``: at least this many read tasks per tile (more batches), so that a
    cluster with many reading threads has work for each (only where windows are put together from
    pieces anyway).
    ``held_bytes``: the memory a reading worker may fill with the bands it holds while windows
    are put together (None: no limit); ``spill_bytes``: the local disk it may fill with pieces
    that do not fit memory (None: none).  Where :data:`BANDS_HELD` bands of all scenes exceed
    ``held_bytes`` but fit with ``spill_bytes``, the plan ``spills``: the read tasks write what
    the worker's memory has no room for to its local disk (:mod:`~treesits_dask.io.pieces`), so
    memory stays within the worker's limit whatever the scene count, and every block is still
    decoded once.  Where they do not fit even so, but fewer bands do (at least as many as a
    window crosses) in ``spill_bytes`` alone (they may all be on disk at once), the plan has a
    ``gate`` and spills: the reads of each band wait until the windows of the band that many
    above it are put together, so that a reading worker holds no more bands than that, and every
    block is still decoded once (a 3000 px strips tile of 600 scenes whose 4 bands of 10 GiB fit
    neither memory nor disk on a 12 GiB worker was read in 2 sections, decoding its strips 1.87
    times), where the plan without a gate (below) would decode more than :data:`GATE_DECODE` times
    as much. Otherwise the plan reads window by window (``by_window``), a run of a window row's
    windows side by side per task, as many as fit ``task_bytes`` (at least one): memory per task is
    the read budget, at the price of decoding a block once per run crossing it; or, where that
    decodes less (:func:`planned_decode`), in ``sections``: the fewest sections of whole window
    columns side by side whose bands of all scenes fit memory and disk together (with a gate where
    :data:`BANDS_HELD` bands of a section's width do not, and more sections without one would decode
    more than :data:`GATE_DECODE` times as much), each read in bands of its own width, section after
    section, which decodes a block once per section that crosses it (a full-width strip once per
    section, where a 3000 px strips tile of 600 scenes on a 12 GiB worker with two tiles in flight
    read window by window decoded 10 times).  A section's bands are held in memory only within
    ``in_memory_bytes``; beyond it they spill, and without a spill disk they must fit it.
    ``in_memory_bytes`` (None: ``held_bytes``): the memory a reading worker may fill with bands
    held whole in memory whose windows cross them (a window put together from two bands or more),
    whose pieces are views of them: where :data:`BANDS_HELD` such bands fit ``held_bytes`` but
    not this, and ``spill_bytes`` is known, the plan ``spills`` all the same (pieces that own
    their memory, kept in memory while the worker has room for them).  Held whole up to 75 % of
    a 12 GiB worker, the bands of a 3000 px strips tile of 120 scenes in 200 px windows took it
    past Dask's 60 % target, and Dask spilled 1.4-4.7 GB of views per read, which frees nothing;
    spilling, the same read had nothing spilled by Dask and 3-4 GiB less peak RSS.  Bands that
    are each a row of whole windows are held whole as before: Dask spilled nothing of them, and
    spilling them gained only memory (4 % more time where a tile was read alone).
    ``stream`` (the model carries its state from one batch of scenes to the next, see
    :mod:`treesits_dask.pipeline.streaming`): ``auto`` streams the tile (``ReadPlan.stream``)
    where its bands of all scenes would not be held whole in memory (the plans that spill, or
    are read behind a gate, in sections or window by window), ``always`` wherever windows are
    put together from bands; ``fallback`` (SBERT's ``auto``, whose state is as large as a band
    of 300 scenes) only where the plan would otherwise decode blocks more than once (in sections
    or window by window, :func:`planned_decode`) and the streamed tile's model states
    (``states``, a function of the streamed plan: its bytes, see :meth:`ReadPlan.states_bytes`)
    fit ``state_room`` (None: no limit), in the fewest sections of window columns side by side
    whose states do (each section's bands one after the other: an unmasked 3000 px tile's SBERT
    states of two bands are 10.4 GiB), where those decode less; ``required`` (a tile whose
    windows of all scenes the inference workers cannot hold,
    :func:`~treesits_dask.pipeline.memory.streams_instead`) streams whatever its layout, even
    where its windows are whole window rows or blocks, in the fewest sections whose states fit
    (where none do, in one per window column: the caller refuses it); ``never`` (models that
    cannot) does not.  A streamed tile decodes every block once (a striped tile's strips once
    per section) and holds a few batches of its bands, whatever its scene count, and is read
    and stepped in windows that cross no two bands (:attr:`ReadPlan.windows`: the layout's, or
    one band high where those cross bands, :func:`stream_windows`).
    """
    count = grid.count if bands is None else bands

    def fits(plan: ReadPlan) -> bool:  # its model states within the room for them
        return state_room is None or states is None or states(plan) <= state_room

    if stream == "required":  # its windows of all scenes cannot be held: never put together
        within = streamed_within(grid, layout, count, n_scenes, task_bytes, min_tasks, fits)
        most = len(_stream_layout(grid, layout).windows[0])  # the least states, where none fit
        return within or _streamed(grid, layout, count, n_scenes, task_bytes, min_tasks, most)
    out = _bands(grid, layout)
    whole = ReadPlan(tuple(out), ((0, n_scenes),))
    if all(whole.direct(b) for b in whole.bands):
        # every band is a whole window row: its task is the window, of all scenes, which the
        # prediction holds anyway (batches would only add a copy)
        return whole
    if layout.block_aligned(grid.block_shape):
        # each block lies in one window (COG windows of whole blocks, see grid.read_shape): the
        # window's own read decodes it once, into the window, whatever the scene count
        groups = window_groups(layout, n_scenes * count * 2, task_bytes, min_tasks)
        return ReadPlan((), ((0, n_scenes),), by_window=True, aligned=True, groups=groups)
    highest = max(b.height for b in out)
    held = _held(highest, grid.width, count, n_scenes)
    spills = held_bytes is not None and held > held_bytes
    # bands that windows cross, which fit the worker's memory but not the share it holds whole
    # without Dask spilling views of them: pieces of their own, kept in memory while there is room
    views = in_memory_bytes is not None and held > in_memory_bytes and spill_bytes is not None
    views = views and any(
        len(pieces) > 1 for pieces in whole.of_window.values()
    )  # a piece per band
    if stream == "always" or (stream == "auto" and (spills or views)):
        return _streamed(grid, layout, count, n_scenes, task_bytes, min_tasks)
    if stream == "fallback" and spills:
        held_so, most = _held_plan(grid, layout, n_scenes, task_bytes, bands, min_tasks,
                                   held_bytes, spill_bytes, in_memory_bytes)  # fmt: skip
        streamed = streamed_within(grid, layout, count, n_scenes, task_bytes, min_tasks, fits,
                                    most)  # fmt: skip
        return streamed or held_so
    if spills and (spill_bytes is None or held > held_bytes + spill_bytes):
        # fewer bands held at once, each band's reads after the windows of an earlier band are
        # put together: every block still decoded once.  A gate's bands are held whole, where
        # the guard's count without one is reached at the peak only: its pieces go to local disk
        # as the worker runs short of memory, never to Dask's spill (a 1000 px tile of 600 scenes
        # held in 2 bands, then in 1, of 1.1 GiB on a 3 GiB worker with no disk: Dask spilled 42
        # and 12 GB, the next read was restarted at 95 %), and all of them may be on disk at
        # once (there, with a disk: 2.24 GiB of files for 2.24 GiB held), so they must fit it
        crossed = max(map(len, whole.of_window.values()))
        fewer, gated = _gate(crossed, highest, grid.width, count, n_scenes, spill_bytes or 0), None
        if fewer is not None:
            gate, gate_held = fewer
            per_scene = highest * grid.width * count * 2
            # the reading threads take the tasks of ``gate`` bands at a time: full turns of those
            batches = _batches(gate, per_scene, n_scenes, task_bytes, min_tasks, True)
            gated = ReadPlan(tuple(out), batches, spills=True, held=gate_held, gate=gate)
        # the plans without a gate: windows read on their own, a run of a window row's windows
        # side by side per task as the read budget allows (a block is decoded once per run that
        # crosses it, not once per window: a 300-row strip of a 3000 px tile 15 times per 200 px
        # window row, not 3 times per row of 3 runs of 5), or the tile in sections of window
        # columns side by side whose bands fit, where those decode less (a strip once per
        # section); the gate where those decode more than GATE_DECODE times what it does
        groups = window_groups(layout, n_scenes * count * 2, task_bytes, min_tasks)
        runs = ReadPlan((), ((0, n_scenes),), by_window=True, held=held, groups=groups)
        in_memory = held_bytes if in_memory_bytes is None else min(in_memory_bytes, held_bytes)
        sectioned = _sectioned(grid, layout, n_scenes, count, task_bytes, min_tasks, held_bytes,
                               spill_bytes or 0, crossed, in_memory_bytes=in_memory)  # fmt: skip
        decode = functools.partial(planned_decode, grid, layout, n_scenes=n_scenes, count=count)
        best = runs
        if sectioned is not None and decode(sectioned) < decode(runs):
            best = sectioned
        return _gated_if_worth(gated, best, decode)
    spills = spills or views
    per_scene = highest * grid.width * count * 2
    batches = _batches(len(out), per_scene, n_scenes, task_bytes, min_tasks, spills)
    return ReadPlan(tuple(out), batches, spills=spills, held=held)


@functools.lru_cache(maxsize=256)  # the same for each masked tile of a shape
def _held_plan(grid, layout, n_scenes, task_bytes, bands, min_tasks, held, spill, in_memory):
    """The plan of a streamable tile without streaming (:func:`plan_reads`), and the bytes it
    decodes (:func:`planned_decode`)."""
    plan = plan_reads(grid, layout, n_scenes, task_bytes, bands, min_tasks, held, spill, in_memory)
    count = grid.count if bands is None else bands
    return plan, planned_decode(grid, layout, plan, n_scenes, count)


def _bands(
    grid: TileGrid, layout: WindowLayout, cols: tuple[int, int] | None = None, first: int = 0
) -> list[Band]:
    """The bands of a tile's full width (``cols`` None) or of the section ``cols`` (whole window
    columns), numbered from ``first``, each with the pieces of the windows that cross it."""
    c0, c1 = cols if cols is not None else (0, grid.width)
    out = []
    for index, (r0, r1) in enumerate(_band_rows(grid, layout)):
        pieces = []
        for i, row in enumerate(layout.windows):
            w0 = row[0]
            lo, hi = max(r0, w0.row_off), min(r1, w0.row_off + w0.height)
            if lo >= hi:
                continue
            for j, w in enumerate(row):
                if c0 <= w.col_off < c1:
                    pieces.append(
                        Piece(i, j, (lo - r0, hi - r0), (lo - w.row_off, hi - w.row_off),
                              w.col_off, w.width)
                    )  # fmt: skip
        out.append(Band(first + index, r0, r1 - r0, tuple(pieces), cols))
    return out


def _held(height: int, width: int, count: int, n_scenes: int, bands: int = BANDS_HELD) -> int:
    """What the memory guard counts a reading worker to hold of bands at most ``height`` rows
    high and ``width`` px wide: ``bands`` of them (default :data:`BANDS_HELD`), of all scenes."""
    return bands * height * width * count * 2 * n_scenes


def _gate(
    crossed: int, height: int, width: int, count: int, n_scenes: int, fits: int
) -> tuple[int, int] | None:
    """The most bands (fewer than :data:`BANDS_HELD`, at least the ``crossed`` bands a window
    crosses, so that a band never waits for a window that waits for it) at most ``height`` rows
    high and ``width`` px wide, of all scenes, that fit ``fits`` bytes: (bands, their bytes), or
    None where not even ``crossed`` bands do."""
    for gate in range(BANDS_HELD - 1, max(1, crossed) - 1, -1):
        held = _held(height, width, count, n_scenes, gate)
        if held <= fits:
            return gate, held
    return None


#: a plan behind a gate is taken over one without only where that decodes more than this many
#: times what the gate's does: a gated read cost 1.22-1.29 times as much per byte decoded (its
#: bands wait for the windows of earlier ones; its pieces go through the disk).  Measured on a
#: 12 GiB worker, 3000 px strips tile of 595 scenes: 309.6 s decoding x0.948 behind a gate
#: against 499.5 s decoding x1.869 in 2 sections; on a 6 GiB worker, 3000 px COG of 595 scenes
#: in 150 px windows: 190.9 s x0.905 behind a gate against 160.5 s x0.980 in 2 sections (whose
#: edges cut only the blocks they cross)
GATE_DECODE = 1.3


def _gated_if_worth(gated: ReadPlan | None, other: ReadPlan | None, decode) -> ReadPlan | None:
    """``gated`` (a plan behind a gate, or None) where ``other`` (a plan without one, or None)
    decodes more than :data:`GATE_DECODE` times as much by ``decode`` (a plan's bytes); else
    ``other``."""
    if gated is None or (other is not None and decode(other) <= GATE_DECODE * decode(gated)):
        return other
    return gated


#: the most pixels of a window a streamed tile is stepped in (:func:`stream_windows`): a step
#: holds its windows' states twice, before and after the batch (about 1 KB per pixel each for
#: the published LSTM)
STREAM_WINDOW_PIXELS = 1 << 18


def stream_windows(grid: TileGrid, layout: WindowLayout) -> WindowLayout:
    """The windows a streamed tile is read and stepped in: one band high (whole block rows, at
    least ``min(window height, BAND_ROWS)``, as the bands of ``layout`` are: one 300-row strip,
    one row of 256 px COG blocks), as wide as the windows of ``layout`` (tiled files: the whole
    blocks nearest that width, so that sections of window columns, :func:`_streamed`, cut no
    block) or, where such a window would pass :data:`STREAM_WINDOW_PIXELS`, that width cut in
    equal parts.  Each band is then
    one window row, so no window ties two bands together (:meth:`ReadPlan.band_groups`), and a
    tile's windows hold the model states of two bands' pixels at most.  With the map's windows
    instead, 200 x 200 px windows on 300-row strips tied two strips together (3.52 GiB of states
    of the published LSTM for a 3000 px tile, against 1.76 one strip high) and 1000 px windows
    three (5.28 GiB, a step of one 1000 x 900 px window holding 0.9 GiB of states twice).
    Measured on that tile (12 scenes, unmasked, COGs) on a 3 GiB worker of 2 threads with
    ``benchmarks/stream_windows.py``: 200 px windows 110.3 and 121.9 s, Dask writing 39-42 GB of
    spilled data to disk, against 102.5 s twice and 3-4 GB; 1000 px windows failed twice (the
    worker passed 95 % of its memory four times), against 102.3 and 101.2 s
    (``docs/performance.md``, "Streamed in windows one band high")."""
    bh, bw = max(1, grid.block_shape[0]), max(1, grid.block_shape[1])
    rows = min(grid.height, bh * max(1, -(-min(layout.shape[0], BAND_ROWS) // bh)))
    width = min(layout.shape[1], grid.width)
    if not grid.striped:  # tiled files: whole blocks wide, so that sections cut no block
        most = max(1, STREAM_WINDOW_PIXELS // (rows * bw))
        width = min(grid.width, bw * min(most, max(1, round(width / bw))))
    width = -(-width // max(1, -(-rows * width // STREAM_WINDOW_PIXELS)))
    return WindowLayout.of(grid, (rows, width))


@functools.lru_cache(maxsize=256)  # planned for each count of sections, per tile of a shape
def _streamed(
    grid: TileGrid,
    layout: WindowLayout,
    count: int,
    n_scenes: int,
    task_bytes: int,
    min_tasks: int,
    sections: int = 1,
) -> ReadPlan:
    """The streamed plan of a tile whose map is read in ``layout``: its bands, cut into the
    windows of ``layout`` where those tie no bands together and are at most
    :data:`STREAM_WINDOW_PIXELS`, else into those of :func:`stream_windows`, read as batches of
    scenes whose band fits half of ``task_bytes`` (a few batches are held at once: one stepped
    through, the next ones read); in ``sections`` of those windows' columns side by side (each
    in bands of its own width, section after section, so that the states of two bands of a
    section are held at once, not of two bands of the tile's width), where more than one."""
    windows = _stream_layout(grid, layout)
    bands = tuple(_bands(grid, windows))
    sections = min(sections, len(windows.windows[0]))
    widest = grid.width
    if sections > 1:
        spans = _spans(windows, sections)
        bands = tuple(_section_bands(grid, windows, spans))
        widest = max(c1 - c0 for c0, c1 in spans)
    tallest = max(b.height for b in bands)
    per_scene = tallest * widest * count * 2
    batches = _batches(len(bands), per_scene, n_scenes, task_bytes, min_tasks, True)
    return ReadPlan(bands, batches, stream=True, windows=windows, sections=sections)


@functools.lru_cache(maxsize=256)
def _stream_layout(grid: TileGrid, layout: WindowLayout) -> WindowLayout:
    """The windows a tile whose map is read in ``layout`` is streamed in: those of ``layout``
    where they tie no bands together and are at most :data:`STREAM_WINDOW_PIXELS`, else
    :func:`stream_windows`."""
    bands = tuple(_bands(grid, layout))
    small = layout.shape[0] * layout.shape[1] <= STREAM_WINDOW_PIXELS
    if small and all(len(g) == 1 for g in ReadPlan(bands, ((0, 1),)).band_groups()):
        return layout
    return stream_windows(grid, layout)


def streamed_within(
    grid: TileGrid,
    layout: WindowLayout,
    count: int,
    n_scenes: int,
    task_bytes: int,
    min_tasks: int,
    fits,
    most: int | None = None,
) -> ReadPlan | None:
    """The streamed plan (:func:`_streamed`) in the fewest sections whose model states ``fits``
    (a function of a plan: whether its states fit the room), decoding at most ``most`` bytes
    (:func:`planned_decode`; None: any); None where none does.  A striped tile's sections each
    decode its full-width strips; a COG's cut only the blocks at their edges."""
    decode = functools.partial(planned_decode, grid, layout, n_scenes=n_scenes, count=count)
    for k in range(1, len(_stream_layout(grid, layout).windows[0]) + 1):
        plan = _streamed(grid, layout, count, n_scenes, task_bytes, min_tasks, k)
        if most is not None and decode(plan) >= most:
            return None
        if fits(plan):
            return plan
    return None


def _batches(n_bands, per_scene, n_scenes, task_bytes, min_tasks, spills):
    """The scene batches of a plan whose reading threads take the tasks of ``n_bands`` bands at
    a time (see :func:`scene_batches`)."""
    wanted = math.ceil(min_tasks / n_bands)
    # half the batch where the plan spills: a task decodes into its pieces scene by scene, and
    # the whole batch measured no faster (strips, 3000 px x 120 scenes), with 0-0.6 GiB more peak
    # RSS
    budget = task_bytes // 2 if spills else task_bytes
    return scene_batches(n_scenes, per_scene, budget, wanted, n_bands, min_tasks)


def _spans(layout: WindowLayout, k: int) -> list[tuple[int, int]]:
    """Columns ``[start, stop)`` of ``k`` sections of about equal width of whole window columns
    of ``layout``, side by side."""
    columns = layout.windows[0]
    edges = np.linspace(0, len(columns), k + 1).round().astype(int)
    return [
        (columns[a].col_off, columns[b - 1].col_off + columns[b - 1].width)
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    ]


def _section_bands(grid: TileGrid, layout: WindowLayout, spans) -> list[Band]:
    """The bands of the sections ``spans`` (:func:`_spans`), numbered section after section."""
    out: list[Band] = []
    for span in spans:
        out += _bands(grid, layout, span, len(out))
    return out


def _sectioned(
    grid: TileGrid,
    layout: WindowLayout,
    n_scenes: int,
    count: int,
    task_bytes: int,
    min_tasks: int,
    held_bytes: int,
    spill_bytes: int,
    crossed: int,
    in_memory_bytes: int | None = None,
) -> ReadPlan | None:
    """The tile read in the fewest sections of whole window columns side by side (2 or more, of
    about equal width) whose bands of all scenes fit ``held_bytes`` of memory and ``spill_bytes``
    of spill disk together, spilling beyond ``in_memory_bytes`` (None: ``held_bytes``), what a
    reading worker holds in memory of bands that windows cross; without a spill disk, whose bands
    fit ``in_memory_bytes``; None where not even one window column's do.  The guard counts
    :data:`BANDS_HELD` bands of a section's width, or fewer behind a gate where those do not fit
    and fewer fit the spill disk alone (:func:`_gate`; ``crossed``: the bands a window crosses;
    see :func:`plan_reads`): the read goes through the tile section by section
    (:func:`~treesits_dask.io.cube.tile_cube` gives each section's tasks a lower priority than
    the previous section's)."""
    memory = held_bytes if in_memory_bytes is None else in_memory_bytes
    columns = layout.windows[0]
    highest = max(r1 - r0 for r0, r1 in _band_rows(grid, layout))
    decode = functools.partial(planned_decode, grid, layout, n_scenes=n_scenes, count=count)
    first_gated: ReadPlan | None = None  # the fewest sections behind a gate
    for k in range(2, len(columns) + 1):
        spans = _spans(layout, k)
        widest = max(c1 - c0 for c0, c1 in spans)
        gate, held = 0, _held(highest, widest, count, n_scenes)
        # held in memory only within ``memory``: beyond it, on a 3 GiB worker without a disk,
        # Dask spilled and the nanny restarted the worker (4 bands of 2.2 GiB counted against
        # 2.25 of held memory); beyond it the pieces go to disk as the worker runs short
        spills = held > held_bytes or (held > memory and spill_bytes > 0)
        fits = held_bytes + spill_bytes if spill_bytes > 0 else memory
        if held > fits:  # behind a gate only where its pieces fit the disk (see plan_reads)
            gated = _gate(crossed, highest, widest, count, n_scenes, spill_bytes)
            if gated is None or first_gated is not None:
                continue
            (gate, held), spills = gated, True
        out = _section_bands(grid, layout, spans)
        per_scene = highest * widest * count * 2
        in_turn = gate or len(out)  # the bands whose tasks the threads take at a time
        batches = _batches(in_turn, per_scene, n_scenes, task_bytes, min_tasks, spills)
        plan = ReadPlan(tuple(out), batches, spills=spills, held=held, sections=k, gate=gate)
        if not gate:  # the fewest sections without a gate, or the gated ones where worth it
            return _gated_if_worth(first_gated, plan, decode)
        first_gated = plan
    return first_gated


def planned_decode(
    grid: TileGrid, layout: WindowLayout, plan: ReadPlan, n_scenes: int, count: int | None = None
) -> int:
    """Bytes the reads of ``plan`` decode for ``n_scenes`` scenes of ``count`` bands (default:
    the grid's) where every window has a mask pixel (see :func:`decoded_bytes`): what
    :func:`plan_reads` compares its fallbacks by (QAI, and the blocks QAI screens whole, left
    out)."""
    count = grid.count if count is None else count
    size = (grid.height, grid.width)
    rects = [((b.row_off, b.row_off + b.height), b.columns(grid.width)) for b in plan.bands]
    for group in plan.groups:
        first, last = (layout.windows[i][j] for i, j in (group[0], group[-1]))
        rects.append(
            ((first.row_off, first.row_off + first.height),
             (first.col_off, last.col_off + last.width))
        )  # fmt: skip
    return n_scenes * sum(decoded_bytes(r, c, grid.block_shape, size, count)[1] for r, c in rects)


def window_groups(
    layout: WindowLayout, per_pixel: int, task_bytes: int, min_tasks: int = 1
) -> tuple[tuple[tuple[int, int], ...], ...]:
    """The windows ``(i, j)`` of ``layout`` read by each task of an aligned plan: runs of
    consecutive windows of a window row, of about equal length, as long as their scenes
    (``per_pixel`` bytes per pixel) fit ``task_bytes`` together (at least one window each), and
    at least ``min_tasks`` runs where the tile has as many windows."""
    rows, cols = len(layout.windows), len(layout.windows[0])
    biggest = layout.windows[0][0]
    fit = max(1, task_bytes // max(1, per_pixel * biggest.height * biggest.width))
    per_row = min(cols, max(math.ceil(cols / fit), math.ceil(min_tasks / rows)))
    edges = np.linspace(0, cols, per_row + 1).round().astype(int)
    return tuple(
        tuple((i, j) for j in range(int(a), int(b)))
        for i in range(rows)
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    )


def block_runs(
    need: np.ndarray | None,
    rows: tuple[int, int],
    cols: tuple[int, int],
    block_shape: tuple[int, int],
) -> list[tuple[int, int, int, int]]:
    """Rectangles ``(row0, row1, col0, col1)`` (relative to the rectangle ``rows`` x ``cols`` of the
    file) to read: per block row, the runs of consecutive blocks that hold a pixel of ``need`` (a
    bool array of the rectangle's shape; None: every pixel), clipped to the rectangle.  Empty when
    nothing is needed."""
    bh, bw = max(1, block_shape[0]), max(1, block_shape[1])
    (r_off, r_end), (c_off, c_end) = rows, cols
    width = c_end - c_off
    first = c_off // bw
    out = []
    for top in range(r_off - r_off % bh, r_end, bh):
        r0, r1 = max(top, r_off) - r_off, min(top + bh, r_end) - r_off
        if need is None:
            out.append((r0, r1, 0, width))
            continue
        wanted = need[r0:r1].any(axis=0)
        if not wanted.any():
            continue
        hit = np.zeros((c_end - 1) // bw - first + 1, bool)
        hit[(c_off + np.flatnonzero(wanted)) // bw - first] = True
        for start, stop in _runs(hit):
            c0 = max((first + start) * bw, c_off) - c_off
            c1 = min((first + stop) * bw, c_end) - c_off
            out.append((r0, r1, c0, c1))
    return out


def _runs(flags: np.ndarray) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` of the runs of True in a 1-d bool array."""
    d = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    yield from zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True)


def decoded_bytes(
    rows: tuple[int, int],
    cols: tuple[int, int],
    block_shape: tuple[int, int],
    size: tuple[int, int],
    bands: int,
    itemsize: int = 2,
) -> tuple[int, int]:
    """(band-blocks, bytes) that decoding the pixels ``rows`` x ``cols`` of ``bands`` bands of a
    file of ``size`` (height, width) costs: every block it touches is decoded whole (clipped at
    the file's edge).  Band-blocks count a block once per band (a pixel-interleaved block holds
    all bands; its bytes are the same)."""
    (r0, r1), (c0, c1) = rows, cols
    if r1 <= r0 or c1 <= c0:
        return 0, 0
    bh, bw = max(1, block_shape[0]), max(1, block_shape[1])
    height, width = size
    br = range(r0 // bh, (r1 - 1) // bh + 1)
    bc = range(c0 // bw, (c1 - 1) // bw + 1)
    h = sum(min(bh, height - b * bh) for b in br)
    w = sum(min(bw, width - b * bw) for b in bc)
    blocks = len(br) * len(bc)
    nbytes = h * w * bands * itemsize
    return blocks * bands, nbytes
