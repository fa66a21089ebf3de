"""Scene table -> lazy ``xarray.DataArray`` (time, band, y, x) int16, one chunk per window.

A chunk holds ONE spatial window of ALL scenes of a tile (graph size grows with tiles x windows,
not with scenes), read as the tile's read plan says (:mod:`treesits_dask.io.bands`).  QAI
screening happens in the read tasks: screened observations are set to the BOA nodata value
(-9999) in every band, so downstream code sees a single validity rule.

This module is longer than 400 lines: a tile's grid and header checks, its lazy cube and the
read graph with its Dask priorities are what a run asks of a tile's files, kept together.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import operator
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np

from ..errors import InputDataError
from . import storage
from .bands import BANDS_HELD, ReadPlan, planned_decode
from .crs import same_crs, short_crs
from .datasets import (
    OPEN_COUNTER,
    Counter,
    check_header,
    open_error,
    open_raster,
    open_retrying,
)
from .discovery import S2_BANDS, CubeDefinition, Scene
from .grid import TileGrid, WindowLayout
from .layouts import layouts_text, part_plans
from .reader import NODATA, READS_IN_PROGRESS, InProgress, WindowReader, assemble
from .remote import read_retrying

__all__ = [
    "DEFAULT_READ_BYTES",
    "NODATA",
    "OPEN_COUNTER",
    "READS_IN_PROGRESS",
    "Counter",
    "InProgress",
    "WindowReader",
    "check_header",
    "days_since_epoch",
    "open_raster",
    "read_tile",
    "scene_problems",
    "tile_cube",
    "tile_grid",
]

log = logging.getLogger(__name__)

#: memory one read task may fill with decoded scenes when no worker budget is given
DEFAULT_READ_BYTES = 1 << 30


def tile_grid(definition: CubeDefinition, scene: Scene) -> TileGrid:
    """The tile's pixel grid from its first BOA; checked against datacube-definition.prj."""

    with open_retrying(scene.boa) as src:
        tr = src.transform
        grid = TileGrid(
            tile=scene.tile,
            crs_wkt=src.crs.to_wkt() if src.crs else "",
            transform=(tr.a, tr.b, tr.c, tr.d, tr.e, tr.f),
            width=src.width,
            height=src.height,
            block_shape=tuple(src.block_shapes[0]),
            count=src.count,
        )
    left, top = definition.tile_origin(scene.tile)
    if not grid.crs_wkt or not same_crs(grid.crs_wkt, definition.crs_wkt):
        raise InputDataError(
            f"{scene.boa}: its CRS ({short_crs(grid.crs_wkt or None)}) is not the CRS of "
            f"datacube-definition.prj ({short_crs(definition.crs_wkt)}); the tile {scene.tile} "
            "does not belong to this cube"
        )
    res_x, res_y = abs(tr.a), abs(tr.e)
    if abs(tr.c - left) > res_x / 2 or abs(tr.f - top) > res_y / 2:
        raise InputDataError(
            f"{scene.boa}: upper-left corner ({tr.c:.3f}, {tr.f:.3f}) is not the origin of tile "
            f"{scene.tile} ({left:.3f}, {top:.3f}) from datacube-definition.prj; the file is in "
            "the wrong tile folder or the .prj belongs to another cube"
        )
    if grid.count != len(S2_BANDS):
        raise InputDataError(
            f"{scene.boa} has {grid.count} bands, but Sentinel-2 BOA has {len(S2_BANDS)}; "
            "restrict --sensors to Sentinel-2 (SEN2A,SEN2B,SEN2C) or remove the file"
        )
    return grid


def _header_problem(url: str, grid: TileGrid, bands: int, shapes: dict | None = None) -> str | None:
    """The problem of one scene file's header, or None (opened with retries when remote); its
    block shape into ``shapes`` (where given)."""

    def check() -> None:
        with open_raster(url) as src:
            check_header(src, url, grid, bands)
            if shapes is not None:
                shapes[url] = tuple(src.block_shapes[0])

    try:
        read_retrying(url, check, what="reading the header", permanent=(InputDataError,))
    except InputDataError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - not a GeoTIFF, gone, no access
        return str(open_error(url, exc))
    return None


def scene_problems(
    scenes: Sequence[Scene],
    grid: TileGrid,
    qai_flags: Sequence[str] = (),
    known: frozenset[str] = frozenset(),
    threads: int = 16,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> list[str]:
    """What is wrong with the scenes of a tile, from their headers only (many read at once): a
    BOA or QAI file that does not open, has other bands or another grid or CRS than ``grid``, or
    a missing QAI twin while ``qai_flags`` screen.  Scenes named in ``known`` (checked by an earlier
    run and unchanged since) are not opened again.  ``shapes`` (where given) receives the block
    shape of each BOA file opened (:func:`~treesits_dask.io.layouts.with_layouts`)."""
    from concurrent.futures import ThreadPoolExecutor

    problems = []
    files: list[tuple[str, int]] = []
    for scene in scenes:
        if qai_flags and scene.qai is None:
            qai_name = storage.basename(scene.boa).replace("_BOA", "_QAI")
            problems.append(
                f"{scene.boa} has no QAI file ({qai_name}) but QAI screening is on; restore the "
                "QAI file or set --qai none"
            )
        if scene.name in known:
            continue
        files.append((scene.boa, grid.count))
        if qai_flags and scene.qai is not None:
            files.append((scene.qai, 1))
    if files:
        with ThreadPoolExecutor(max(1, min(threads, len(files)))) as pool:
            found = pool.map(
                lambda f: _header_problem(f[0], grid, f[1], shapes if f[1] > 1 else None), files
            )
            problems += [p for p in found if p]
    return problems


def tile_cube(
    scenes: Sequence[Scene],
    grid: TileGrid,
    layout: WindowLayout,
    qai_flags: Sequence[str] = (),
    mask=None,
    read_bytes: int = DEFAULT_READ_BYTES,
    min_read_tasks: int = 1,
    held_bytes: int | None = None,
    spill_bytes: int | None = None,
    in_memory_bytes: int | None = None,
    checked: Sequence[Scene] = (),
    worker: str | None = None,
):
    """Lazy ``xarray.DataArray`` (time, band, y, x) int16 of one tile, one chunk per window.

    ``mask`` (optional dask array (y, x) bool, chunked like ``layout``) lets a window with no
    masked-in pixel skip all reads, and only the file blocks that hold a masked-in pixel are
    decoded (the cube holds nodata in the others).

    Reading is decoupled from the windows (:mod:`treesits_dask.io.bands`): the tile is read in
    bands of whole file blocks, each by one task per batch of scenes (``read_bytes``: the memory
    such a task may fill), so every block of every scene is decoded once; a window is put
    together from the pieces of the bands it crosses.  Where the windows are whole full-width
    bands (strip windows), one task reads one window of all scenes, as the chunk itself; where
    every window starts on a block edge (``layout`` of whole COG blocks, see
    :func:`~treesits_dask.io.grid.read_shape`), each window's own read decodes its blocks, several
    windows of a window row per task (as many as ``read_bytes`` holds).
    ``min_read_tasks``: at least this many read tasks for the tile (see
    :func:`~treesits_dask.io.bands.plan_reads`).  ``held_bytes``: the memory a reading worker
    may fill with bands of all scenes, ``spill_bytes`` the local disk it may fill with them; where
    they do not fit memory, the read tasks write their pieces to the worker's local disk as it
    runs short of memory (logged, :mod:`treesits_dask.io.pieces`); where they do not fit memory
    and disk, the tile is read in sections of window columns side by side whose bands fit, one
    section after the other (every block decoded once per section that crosses it), or window by
    window, in runs of a window row's windows side by side within ``read_bytes`` (every block
    decoded once per run that crosses it), whichever decodes less (logged as a warning).
    ``in_memory_bytes``: the memory a reading worker may fill with bands held whole in memory
    that windows cross (None: ``held_bytes``); such bands that fit ``held_bytes`` but not this
    are read as a plan that spills, where ``spill_bytes`` is known.
    Scenes in another file layout than others (``Scene.block_shape``, FORCE < 3.8 strips and
    FORCE >= 3.8 COGs in one tile) are read as one part per layout, each planned for its own
    blocks into the chunks of ``layout`` (``held_bytes``, ``spill_bytes`` and
    ``in_memory_bytes`` shared among them by the bands they hold), and each chunk is put together
    from the pieces of every part (:mod:`treesits_dask.io.layouts`): every block is still decoded
    once.
    ``checked``: the scenes whose file headers the run's driver
    checked (:func:`scene_problems`): the workers check again only those of their files found
    changed since (see :class:`~treesits_dask.io.reader.WindowReader`).  ``worker``: where the
    plan spills, the address of the reading worker that reads the tile and puts its windows
    together (a loose restriction, which the scheduler's
    :class:`~treesits_dask.pipeline.plugins.PinnedReads` makes strict and moves where that worker
    leaves or stays paused; without it, Dask's fallback; None: any worker).
    Spilled pieces are files on that worker's disk which Dask counts as a few bytes (so that they
    do not count as memory); a window put together on another worker fetches them as arrays, as
    many in one message as fit 50 MB of "a few bytes" each: gigabytes at once
    (:func:`~treesits_dask.pipeline.reading.spill_worker`).
    """
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    parts = part_plans(scenes, grid, layout, read_bytes, min_read_tasks, held_bytes, spill_bytes,
                       in_memory_bytes)  # fmt: skip
    if len(parts) == 1:
        _, plan, budgets = parts[0]
        data = _read_data(scenes, grid, layout, qai_flags, mask, plan, budgets, checked, worker)
    else:
        log.info("tile %s: %s, each read in blocks of its own into the same chunks",
                 grid.tile, layouts_text([p for p, _, _ in parts]))  # fmt: skip
        data = _parts_data(scenes, grid, layout, qai_flags, mask, parts, checked, worker)
    times = np.array([np.datetime64(s.date, "ns") for s in scenes], dtype="datetime64[ns]")
    arr = xr.DataArray(
        data,
        dims=("time", "band", "y", "x"),
        coords={
            "time": times,
            "band": list(S2_BANDS[: grid.count]),
            "y": grid.y_coords(),
            "x": grid.x_coords(),
            "sensor": ("time", [s.sensor for s in scenes]),
        },
        name=grid.tile,
        attrs={"nodata": NODATA, "tile": grid.tile, "_FillValue": NODATA},
    )
    arr = arr.rio.write_crs(grid.crs_wkt).rio.write_transform(grid.affine)
    return arr


def _read_data(
    scenes: Sequence[Scene],
    grid: TileGrid,
    layout: WindowLayout,
    qai_flags: Sequence[str],
    mask,
    plan: ReadPlan,
    budgets: tuple,
    checked: Sequence[Scene] = (),
    worker: str | None = None,
):
    """The dask array (time, band, y, x) of ``scenes``, all in the block layout of ``grid``, read
    by ``plan`` into the chunks of ``layout`` (see :func:`tile_cube`; ``budgets``: the
    ``held_bytes``, ``spill_bytes`` and ``in_memory_bytes`` the plan was made with)."""
    from dask.base import tokenize

    reader = WindowReader.of_scenes(grid, scenes, qai_flags, checked)
    _log_plan(grid, len(scenes), layout, plan, *budgets)
    token = tokenize(reader, layout.shape, plan, mask.name if mask is not None else None)
    name = f"read-{grid.tile}-{token}"
    dsk = _read_graph(reader, layout, plan, name, mask.name if mask is not None else None)
    chunks = ((len(scenes),), (grid.count,), *layout.chunks)
    return _tile_array(name, dsk, chunks, mask, _priority(plan, layout),
                       worker if plan.spills else None)  # fmt: skip


def _tile_array(name: str, dsk: dict, chunks: tuple, mask, priority, worker: str | None):
    """The dask array of a tile's read layer ``name`` (its tasks ``dsk``, after the layer of
    ``mask`` where there is one), its tasks annotated with ``priority`` (a function of a key; None:
    none) and, where ``worker`` is given, to run on it (a loose restriction, see
    :func:`tile_cube`)."""
    import dask
    import dask.array as da
    from dask.highlevelgraph import HighLevelGraph

    annotations: dict = {} if priority is None else {"priority": priority}
    if worker is not None:
        annotations |= {"workers": [worker], "allow_other_workers": True}
    with dask.annotate(**annotations) if annotations else nullcontext():
        graph = HighLevelGraph.from_collections(
            name, dsk, dependencies=[mask] if mask is not None else []
        )
    return da.Array(graph, name, chunks, dtype=np.int16)


def _parts_data(
    scenes: Sequence[Scene],
    grid: TileGrid,
    layout: WindowLayout,
    qai_flags: Sequence[str],
    mask,
    parts: tuple,
    checked: Sequence[Scene] = (),
    worker: str | None = None,
):
    """The dask array of a tile whose ``scenes`` are in more than one file layout: ``parts``
    (:func:`~treesits_dask.io.layouts.part_plans`: each part, its plan and the budgets it was
    planned with), each read by its own plan (:func:`_read_tasks`), and each chunk put together
    from the pieces (or chunks) of every part, in the scenes' order, as one window of one plan
    is: one layer, whose tasks take the priorities of their part's plan (a chunk the most urgent
    of them), all on ``worker`` where a part's plan spills (None: any)."""
    from dask.base import tokenize

    n, mask_name = len(scenes), mask.name if mask is not None else None
    own = []
    for part, plan, budgets in parts:
        _log_plan(part.grid, len(part.indices), layout, plan, *budgets)
        reader = WindowReader.of_scenes(part.grid, [scenes[i] for i in part.indices], qai_flags,
                                        checked)  # fmt: skip
        own.append((part, plan, reader, tokenize(reader, layout.shape, plan, mask_name)))
    name = f"read-{grid.tile}-{tokenize([token for *_, token in own])}"
    dsk: dict = {}
    found: dict = {}
    priorities = []
    for part, plan, reader, token in own:
        part_name = f"read-{grid.tile}-{token}"
        tasks, pieces = _read_tasks(reader, layout, plan, part_name, mask_name, name)
        dsk.update(tasks)
        priorities.append((token, _priority(plan, layout), _task_rows(plan, layout)))
        for i, j, w in layout:  # the part's pieces of the window, or its chunk of the window
            here = pieces.get((i, j)) or [
                ((part_name, 0, 0, i, j), None, (0, len(part.indices), 0, w.height))
            ]
            found.setdefault((i, j), []).extend(
                (key, pick, _in_tile(part.indices, where)) for key, pick, where in here
            )
    for (i, j), pieces in found.items():
        w = layout.windows[i][j]
        dsk[(name, 0, 0, i, j)] = _assembled((n, grid.count, w.height, w.width), mask_name, i, j,
                                             pieces)  # fmt: skip
    rows = tuple(w[0].row_off for w in layout.windows)
    priority = functools.partial(_parts_priority, tuple(priorities), rows)
    spills = any(plan.spills for _, plan, _ in parts)
    return _tile_array(name, dsk, ((n,), (grid.count,), *layout.chunks), mask, priority,
                       worker if spills else None)  # fmt: skip


def _in_tile(indices: tuple[int, ...], where: tuple) -> tuple:
    """A piece's ``where`` (scenes ``[s0, s1)`` of its part, whose positions among the tile's
    scenes are ``indices``) as the tile's: ``(first, last + 1, r0, r1)`` where they are
    consecutive there, else ``(positions, None, r0, r1)``
    (:func:`~treesits_dask.io.reader.assemble`)."""
    s0, s1, r0, r1 = where
    at = indices[s0:s1]
    if at[-1] - at[0] == len(at) - 1:
        return (at[0], at[-1] + 1, r0, r1)
    return (tuple(at), None, r0, r1)


def _priority(plan: ReadPlan, layout: WindowLayout):
    """The priority annotation of the read tasks of ``plan`` (None: none): section after section
    where it is read in sections, else picks first where it spills or has a gate."""
    if plan.sections > 1:
        return functools.partial(
            _by_section, plan.sections, len(plan.bands), _column_sections(plan, layout),
            gated=plan.gate > 0,
        )  # fmt: skip
    if plan.spills or plan.gate:
        return functools.partial(_picks_first, gated=plan.gate > 0)
    return None


def _task_rows(plan: ReadPlan, layout: WindowLayout) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The first row of each band of ``plan``, and of each group of windows read together."""
    groups = tuple(layout.windows[g[0][0]][0].row_off for g in plan.groups)
    return tuple(b.row_off for b in plan.bands), groups


def _parts_priority(priorities: tuple, rows: tuple[int, ...], key) -> int:
    """Dask priority of a task of :func:`_parts_data`: its part's (``priorities``: per part the
    token that ends its task names, its plan's priority function or None, and the first rows of
    its bands and groups of windows, :func:`_task_rows`), and within that, the higher its rows
    in the tile the sooner, so that the parts read the same rows at the same time and a chunk
    does not wait for one part while the other's pieces pile up (``rows``: the first row of
    each window row); a chunk put together from every part's, the most urgent the parts' give
    it."""
    name = str(key[0])
    token = name.rsplit("-", 1)[-1]
    if name.startswith(("read-band-", "read-row-", "read-gate-", "read-group-")):
        found = next(p for p in priorities if p[0] == token)
        band_rows, group_rows = found[2]
        row = (group_rows if name.startswith("read-group-") else band_rows)[key[1]]
        fns = [found[1]]
    else:  # a window of a part or of the tile, or what a gate waits for: (name, [0, 0,] i, j)
        row = rows[key[-2]]
        own = [p for p in priorities if p[0] == token]
        fns = [p[1] for p in (own or priorities)]
    level = max((fn(key) if fn is not None else 0) for fn in fns)
    return level * _ROWS - row  # rows order the tasks of one level


#: more than the rows of any tile: a level of a plan's priorities in :func:`_parts_priority`
_ROWS = 1 << 20


def _log_plan(
    grid: TileGrid,
    n_scenes: int,
    layout: WindowLayout,
    plan: ReadPlan,
    held_bytes: int | None,
    spill_bytes: int | None,
    in_memory_bytes: int | None,
) -> None:
    """What a plan that does not hold every band of all scenes in memory does, logged (a warning
    where it decodes blocks more than once)."""
    # tile, bands held, scenes, GiB they hold, GiB of memory and of spill disk a worker may fill
    sizes = (
        grid.tile, plan.bands_held, n_scenes, plan.held / 2**30,
        (held_bytes or 0) / 2**30, (spill_bytes or 0) / 2**30,
    )  # fmt: skip
    if plan.sections > 1:
        tile_bytes = n_scenes * grid.height * grid.width * grid.count * 2
        log.warning(
            "tile %s: the bands of all %d scenes over its full width fit neither %.1f GiB of a "
            "reading worker's memory nor %.1f GiB of its spill disk: reading it in %d sections "
            "of whole window columns side by side, each in bands of its own width (%d of them "
            "%.1f GiB), which decodes a file block once per section that crosses it (%.2f times "
            "the tile by the plan's count; give the reading workers more memory or local disk, "
            "fewer tiles in flight each (tiles_in_flight: a tile's share of a reading worker's "
            "memory and disk), or fewer scenes per run, to decode once)",
            grid.tile, n_scenes, *sizes[4:], plan.sections, plan.bands_held, plan.held / 2**30,
            planned_decode(grid, layout, plan, n_scenes) / tile_bytes,
        )  # fmt: skip
    elif plan.gate:
        log.info(
            "tile %s: %d bands of all %d scenes over its full width fit neither %.1f GiB of a "
            "reading worker's memory nor %.1f GiB of its spill disk: reading it %d bands at a time "
            "(%.1f GiB; each band's reads wait until the windows of the band %d above it are put "
            "together); every block is still decoded once",
            grid.tile, BANDS_HELD, n_scenes, *sizes[4:], plan.gate, plan.held / 2**30,
            plan.gate,
        )  # fmt: skip
    elif plan.by_window and not plan.aligned:
        log.warning(
            "tile %s: %d bands of all %d scenes (%.1f GiB) fit neither %.1f GiB of a reading "
            "worker's memory nor %.1f GiB of its spill disk: reading window by window, which "
            "decodes file blocks once per run of windows side by side crossing them (%d runs of up "
            "to %d windows; give the reading workers more memory or local disk, fewer tiles in "
            "flight each (tiles_in_flight: a tile's share of a reading worker's memory and disk), "
            "or fewer scenes per run, to decode once)",
            *sizes, len(plan.groups), max(map(len, plan.groups)),
        )  # fmt: skip
    elif plan.spills:
        # beyond the held memory, or beyond what a worker holds whole of bands windows cross
        whole = held_bytes is None or plan.held <= held_bytes
        log.info(
            "tile %s: %d bands of all %d scenes (%.1f GiB) exceed %.1f GiB of a reading worker's "
            "memory%s: the read tasks keep the pieces of the windows in memory while the worker "
            "has room for them and write the rest to the worker's local disk (up to %.1f GiB may "
            "be used); every block is still decoded once",
            *sizes[:4], ((in_memory_bytes if whole else held_bytes) or 0) / 2**30,
            " (what it holds whole of bands that windows cross)" if whole else "", sizes[5],
        )  # fmt: skip


def _read_graph(
    reader: WindowReader, layout: WindowLayout, plan: ReadPlan, name: str, mask: str | None
) -> dict:
    """The tasks of :func:`tile_cube` (:func:`_read_tasks`) and per window a task that puts its
    pieces together."""
    dsk, pieces = _read_tasks(reader, layout, plan, name, mask, name)
    shape = (len(reader.boa), reader.grid.count)
    for (i, j), found in pieces.items():
        w = layout.windows[i][j]
        dsk[(name, 0, 0, i, j)] = _assembled((*shape, w.height, w.width), mask, i, j, found)
    return dsk


def _assembled(shape: tuple, mask: str | None, i: int, j: int, pieces: list) -> tuple:
    """The task that puts window ``(i, j)`` of ``shape`` together from ``pieces`` (``(key, pick,
    where)`` each, see :func:`_read_tasks`)."""
    keys, picks, where = (list(x) for x in zip(*pieces, strict=True))
    return (_assemble_picked, shape, (mask, i, j) if mask else None, tuple(where), tuple(picks),
            keys)  # fmt: skip


def _read_tasks(
    reader: WindowReader,
    layout: WindowLayout,
    plan: ReadPlan,
    name: str,
    mask: str | None,
    windows: str,
) -> tuple[dict, dict]:
    """The tasks of :func:`tile_cube` but the windows put together from pieces, and the pieces of
    each such window: ``{(i, j): [(key, pick, (first scene, last scene + 1, first row, last row +
    1)), ...]}`` (``pick`` the piece's position in the key's result, None where the result is
    the piece).  ``windows``: the name of the windows put together (``name``, or the windows of
    a tile's parts, see :func:`_parts_data`), which a gate waits for.

    Per band and batch of scenes a read task; per window row
    that crosses the band a task that picks the pieces of that row's windows out of it (so that a
    window pulls only its row's share of a band from another worker, and a tile has two of these
    per band, not one per window: each small task costs the worker a dispatch; where the plan
    spills, one per piece); per window a task that puts its pieces together.  A band that is one
    whole window is read by the window's own task.

    A plan read in sections (``plan.sections``) is cut as a spilling plan is: pieces that own
    their memory (on local disk only where it spills), each a task of its own (Dask's order then
    holds a few bands at once, where a window row's picks had it read every band of a tile whose
    windows cross its bands before putting a window together; :func:`tile_cube` orders the
    sections by priority).

    A plan with a gate (``plan.gate``) adds, per window whose pieces a later band's reads wait for,
    a task that runs where the window is put together and returns nothing (so that no window is
    sent anywhere for it), and per such band a task that waits for those: the band's read tasks
    take it as their first argument (:func:`_after`)."""
    bands, rows = name.replace("read-", "read-band-", 1), name.replace("read-", "read-row-", 1)
    n_scenes = len(reader.boa)
    own = plan.spills or plan.sections > 1 or plan.gate > 0
    read_band = reader.read_band
    if own:  # pieces to local disk only where the plan counts on it
        read_band = functools.partial(reader.read_band, own=True, disk=plan.spills)
    dsk: dict = {}
    if plan.by_window:  # windows read on their own, several per task where they are aligned
        group = name.replace("read-", "read-group-", 1)
        for g, ij in enumerate(plan.groups):
            read = tuple(layout.windows[i][j] for i, j in ij)
            masks = [(mask, i, j) for i, j in ij] if mask else []
            if len(ij) == 1:  # the task's result is the window itself
                dsk[(name, 0, 0, *ij[0])] = (reader.read, *read, *masks)
                continue
            dsk[(group, g)] = (reader.read_windows, read, *masks)
            for k, (i, j) in enumerate(ij):
                dsk[(name, 0, 0, i, j)] = (operator.getitem, (group, g), k)
        return dsk, {}
    # (band, piece) -> (its group: a window row, or the piece itself; its position in the group,
    # None where the group's task result is the piece itself)
    grouped: dict[tuple[int, int], tuple[int, int | None]] = {}
    gates, done = name.replace("read-", "read-gate-", 1), name.replace("read-", "read-done-", 1)
    for band in plan.bands:
        waits = plan.gated_by(band.index)
        if waits:
            dsk[(gates, band.index)] = (_after, [(done, i, j) for i, j in waits])
            for i, j in waits:
                dsk[(done, i, j)] = (_after, (windows, 0, 0, i, j))
        masks = [(mask, p.i, p.j) for p in band.pieces] if mask else []
        if plan.direct(band):
            p = band.pieces[0]
            dsk[(name, 0, 0, p.i, p.j)] = (reader.read_band, band, 0, n_scenes, *masks)
            continue
        by_group: dict[int, list[int]] = {}
        for k, p in enumerate(band.pieces):
            # a plan that spills keeps each piece apart, as an array: a window unspills only its
            # own pieces (a window row's group of them tripled what a window unspilled, and the
            # worker at 600 scenes and 3 GiB was restarted at 95 %)
            g = k if own else p.i
            at = len(by_group.setdefault(g, []))
            grouped[(band.index, k)] = (g, None if own else at)
            by_group[g].append(k)
        for s, (start, stop) in enumerate(plan.batches):
            dsk[(bands, band.index, s)] = (
                (_after, (gates, band.index), read_band, band, start, stop, *masks)
                if waits
                else (read_band, band, start, stop, *masks)
            )
            for g, ks in by_group.items():
                dsk[(rows, band.index, s, g)] = (
                    (operator.getitem, (bands, band.index, s), g)  # the piece, as it is
                    if own
                    else (_pick, (bands, band.index, s), tuple(ks))
                )
    pieces: dict = {}
    for i, j, _ in layout:
        if (name, 0, 0, i, j) in dsk:
            continue
        found = pieces[(i, j)] = []
        for b, k in plan.of_window[(i, j)]:
            window_rows = plan.bands[b].pieces[k].window_rows
            group, at = grouped[(b, k)]
            for s, (start, stop) in enumerate(plan.batches):
                found.append(((rows, b, s, group), at, (start, stop, *window_rows)))
    return dsk, pieces


def read_tile(key) -> str | None:
    """The tile of a task of :func:`tile_cube`'s read (Dask key ``read-<tile>-<token>``, or with
    ``read-band-``, ``read-row-``, ``read-group-``, ``read-gate-``, ``read-done-`` for its
    bands, picks, groups and gates, as
    :func:`_read_graph` names them, each maybe in a tuple with the chunk's index); None for the
    key of any other task."""
    name = str(key[0] if isinstance(key, tuple) else key)
    return name.split("-")[-2] if name.startswith("read-") else None


def _picks_first(key, gated: bool = False) -> int:
    """Dask priority of a task of a spilling plan's read: the tasks that pick a piece out of a
    band's batch first, as soon as the batch is read, so that each piece is a key of its own from
    then on (what Dask spills and a window reads back is that piece, not the list of the batch's
    pieces: a window's pick had read the whole list back, and a worker of one thread and 3 GiB
    reading a 600-scene tile spilled 15-70 GiB so in 3 of 11 first reads).  Dask keeps it where
    the graph is computed without optimisation (a pinned tile, GPU routing; fusion drops it).
    ``gated`` (a plan with a gate): a gate's tasks first too, then any task without a priority
    (what takes the windows: their predictions), then the windows, then the reads.  Dask's own
    order put every window a gate waits for first (they lead to the next band's reads), before
    the tasks that take them away: on a 3000 px strips tile of 600 scenes and a 12 GiB worker,
    Dask spilled 27 GB in 3 minutes and the disk filled; with only the reads after the windows
    it spilled 140 GB in a read of 568 s; so ordered, nothing in 355 s."""
    name = str(key[0])
    if name.startswith(("read-row-", "read-gate-", "read-done-")):
        return 1
    if not gated:
        return 0
    return -2 if name.startswith("read-band-") else -1


def _after(_, fn=None, *args):
    """``fn(*args)`` once the first argument (a gate's task, or the windows it waits for) is
    there; None without ``fn``."""
    return fn(*args) if fn is not None else None


def _column_sections(plan: ReadPlan, layout: WindowLayout) -> tuple[int, ...]:
    """The section of each window column of a plan read in sections."""
    found = [0] * len(layout.windows[0])
    for band in plan.bands:
        for p in band.pieces:
            found[p.j] = plan.section_of(band.index)
    return tuple(found)


def _by_section(
    sections: int, n_bands: int, column_sections: tuple[int, ...], key, gated: bool = False
) -> int:
    """Dask priority of a task of a plan read in ``sections`` (``ReadPlan.sections``, of
    ``n_bands`` bands numbered section by section): each section's tasks (its bands' reads and
    picks, and its windows: of the window columns ``column_sections`` gives the section of) after
    the previous section's, so that a reading worker holds one section's bands at a time, not
    the whole width's (Dask's own order went from one section to the other and held 5 of a small
    tile's 6 bands); picks first within a section, and with a gate (``gated``) its reads last
    (see :func:`_picks_first`)."""
    name = str(key[0])
    if name.startswith(("read-band-", "read-row-", "read-gate-")):  # (.., band index, ..)
        section = key[1] * sections // n_bands
    else:  # a window (name, 0, 0, i, j)
        section = column_sections[key[-1]]
    return _picks_first(key, gated) - 4 * section


def _pick(pieces: list, ks: tuple[int, ...]) -> tuple:
    """The pieces ``ks`` of a band's read (one window row's share of the band)."""
    return tuple(pieces[k] for k in ks)


def _assemble_picked(shape, mask, where, picks, groups) -> np.ndarray:
    """:func:`~treesits_dask.io.reader.assemble` from the piece ``picks[k]`` of ``groups[k]``
    (None: ``groups[k]`` is the piece itself)."""
    pieces = [g if k is None else g[k] for g, k in zip(groups, picks, strict=True)]
    return assemble(shape, mask, where, pieces)


def days_since_epoch(dates: Sequence[dt.date]) -> np.ndarray:
    """Days since 1970-01-01 of ``dates`` (int64)."""
    return np.array([(d - dt.date(1970, 1, 1)).days for d in dates], dtype=np.int64)
