"""Streamed tiles: the scenes go through the model batch by batch, each window's model state
carried from one batch to the next, so that nothing of all scenes is ever held.

A one-way LSTM (the SITS-NN LSTM) sees one observation per step, from a zero state, and its
output is its state after the last step: run over the scenes in batches, carrying ``(h, c)``,
it gives the same result as over all of them at once
(:meth:`~treesits_dask.models.loading.Predictor.stream_step`).  SBERT sees the newest 256 valid
observations of a pixel and nothing else: its state is those, kept in a ring buffer of 6 KB per
pixel whatever the scene count, and fed to the model after the last batch as it would have been
fed them all at once (:func:`~treesits_dask.models.preprocess.sbert_keep`).  A tile read so
needs neither its
bands of all scenes in memory nor on disk (what :mod:`treesits_dask.io.bands` otherwise counts
on, or decodes blocks more than once without): each band is read as batches of scenes (every
block decoded once), each window steps its state through its pieces of a batch, and the batch
is dropped.  A 3000 px strips tile of 600 scenes, whose 300-row bands of all scenes are 10 GiB
each, is read so within the read budget of any worker.

A streamed tile is read and stepped in windows that cross no two bands
(:attr:`~treesits_dask.io.bands.ReadPlan.windows`): the map's where they are so, else windows of
its own, one band high (whole block rows, :func:`~treesits_dask.io.bands.stream_windows`), its
outputs rechunked to the map's windows.  A window's state lives from its first batch to its
outputs, and the map's windows may cross two or three bands (200 x 200 px windows on 300-row
strips), whose states would then all live together.

The graph of a tile (:func:`stream_layer`), one layer with per-task annotations (reads where
reads go, steps where inference goes):

- per band and batch of scenes a read task (``read-band-stream-``), and per run of windows a
  task that picks the run's pieces out of it (so that a step fetches its own pieces, not the
  band);
- per run of windows and batch a step task: the states of the run's windows after that batch
  (runs of consecutive windows of about :data:`STEP_PIXELS`, at least as many per unit as a
  tile has reading threads where its groups are read in more than one batch: a tile of 100 px
  windows has hundreds of windows, each a task per batch otherwise; a group read in one batch,
  as a stage of a few scenes is, is stepped in as few runs as :data:`STEP_PIXELS` allows);
- per window the outputs from its last state (:func:`stream_outputs`);
- per run and batch a task that returns nothing once the step is done, and per unit (a group
  of bands tied together by windows, see :meth:`~treesits_dask.io.bands.ReadPlan.band_groups`,
  and a batch) a gate that waits for those: the reads of the unit ``ahead`` units later take it
  as their first argument, so that a tile holds at most ``ahead`` units of read batches that
  its steps have not yet taken, however fast it reads and however slowly it predicts.

Priorities take the units in order: a group's batches one after the other, its steps before
the next batch's reads.

A tile whose scenes are in two file layouts (FORCE < 3.8 strips for its older scenes, FORCE >= 3.8
COGs for its newer ones) is streamed in stages (:func:`stages_layer`): one per run of consecutive
scenes in one layout, each read by a plan for its own blocks and stepped in windows of its own
(one 300-row strip high, one row of 256 px blocks high).  The first batch of a stage's windows
takes their states from the last states of the earlier stage's windows that share their pixels
(:func:`window_states`), and the earlier stage's bands go first (:func:`_order`), so each block
of each file is decoded once; in one plan for all scenes, one layout's bands cut the other's
blocks (a 3000 px COG's decoded 1.77 times in 300-row strip windows).

This module is longer than 400 lines: the tasks of a streamed tile (reads, steps, gates, the
states handed from stage to stage) are one graph whose parts share its names and priorities.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np

from ..io.cube import NODATA
from ..io.pieces import DiskPiece
from ..io.reader import WindowReader
from ..models import ModelSpec
from ..outputs.schema import Packing, empty_outputs
from .devices import device_lock, device_pool
from .predict import (
    FORWARDS_IN_PROGRESS,
    Inference,
    fill_outputs,
    get_predictor,
    last_valid_day,
    valid_observations,
)

__all__ = [
    "STEP_CALL_ELEMENTS",
    "STEP_PIXELS",
    "Kernel",
    "StreamStage",
    "stages_layer",
    "stream_layer",
    "stream_outputs",
    "stream_step",
    "window_states",
]


@dataclass(frozen=True)
class Kernel:
    """The model a streamed tile's steps run: small and hashable, shipped in its tasks."""

    spec: ModelSpec
    device: str
    inference: Inference
    packing: Packing


@contextlib.contextmanager
def _predictor(kernel: Kernel):
    """The model of ``kernel`` on the least busy device of this worker, one forward at a time
    per accelerator; on CPU counted among the forwards that share the worker's cores."""
    pool = device_pool(kernel.device)
    with pool.take() if pool is not None else contextlib.nullcontext(kernel.device) as one:
        predictor = get_predictor(kernel.spec, one, kernel.inference)
        dev = getattr(predictor, "device", None)
        on_cpu = getattr(dev, "type", "cpu") == "cpu"
        with FORWARDS_IN_PROGRESS if on_cpu else device_lock(str(dev)):
            yield predictor


#: elements (pixels x scenes x bands) of the windows of a step task stepped through the model in
#: one call, where they are that few (a sparse mask): a call costs about 0.5 ms whatever its size
#: (the published LSTM's shapes on this VM's CPU: 26 windows of 39 pixels and 4 scenes took
#: 14.5 ms one by one, 5.7 ms in one call), and those windows' series are held together
STEP_CALL_ELEMENTS = 1 << 21


def _window_input(state, shape, mask, where, kernel: Kernel, pieces, first: bool):
    """``(state, series, valid)`` of a window before a batch of scenes (see :func:`stream_step`):
    its state (a new one before its first batch; ``state`` None and not ``first``: a window
    without a mask pixel, which stays None), its mask pixels' series (N, t, bands) int16 and
    their valid observations (N, t); None where it has no mask pixel.  ``shape``: (scenes of the
    batch, bands, h, w); ``pieces`` the window's pieces of the batch (``where[k]``: ``(0,
    scenes, first row, last row)`` in the window), as :func:`~treesits_dask.io.reader.assemble`
    takes them."""
    _, _, h, w = shape
    if state is None:
        if not first or (mask is not None and not mask.any()):
            return None
        idx = np.flatnonzero(mask) if mask is not None else np.arange(h * w)
        with _predictor(kernel) as predictor:
            model = predictor.stream_state(idx.size)
        state = {
            "idx": idx,
            "model": model,
            "n_valid": np.zeros(idx.size, np.int64),
            "last_day": np.full(idx.size, -1, np.int64),
            "last_valid": np.zeros(idx.size, bool),
        }
    return (state, *_pixel_series(shape, state["idx"], where, pieces))


def _pixel_series(shape, idx: np.ndarray, where, pieces) -> tuple[np.ndarray, np.ndarray]:
    """The series (N, t, bands) int16 of a window's pixels ``idx`` (flat indices, in any order:
    the mask's, all, or those a stage handed on) and their validity (N, t), taken from the
    window's pieces of a batch (see :func:`_window_input`) piece by piece, where putting the
    window together first (:func:`~treesits_dask.io.reader.assemble`) copied all of it once more
    before a mask's pixels were taken out of it."""
    t, bands, _, w = shape
    series = np.empty((idx.size, t, bands), dtype=np.int16)
    valid = np.empty((idx.size, t), dtype=bool)
    for (_, _, r0, r1), piece in zip(where, pieces, strict=True):
        at = np.flatnonzero((idx >= r0 * w) & (idx < r1 * w))
        if not at.size:
            continue
        if piece is None:  # nothing read there
            series[at], valid[at] = NODATA, False
            continue
        if isinstance(piece, DiskPiece):
            piece = piece.load()
        local = idx[at] - r0 * w
        rows = slice(at[0], at[-1] + 1) if at[-1] - at[0] + 1 == at.size else at
        if (
            isinstance(rows, slice)
            and local.size == piece.shape[2] * piece.shape[3]
            and (local == np.arange(local.size)).all()
        ):  # all of the piece's pixels in order (no mask): straight into their rows
            valid[rows] = valid_observations(piece).reshape(t, -1).T
            series[rows].reshape(*piece.shape[2:], t, bands)[...] = piece.transpose(2, 3, 0, 1)
            continue
        if piece.flags.c_contiguous:  # numpy lays this gather out pixel-major
            got = piece.reshape(t, bands, -1)[:, :, local]
        else:
            got = piece[:, :, local // w, local % w]
        valid[rows] = valid_observations(got).T
        series[rows] = got.transpose(2, 0, 1)
    return series, valid


def _window_after(state: dict, model, valid: np.ndarray, days: np.ndarray) -> dict:
    """A window's state after a batch of scenes whose model state is ``model`` (see
    :func:`stream_step`)."""
    seen = valid.any(axis=1)
    last_day = state["last_day"].copy()
    if seen.any():
        last_day[seen] = last_valid_day(valid[seen], days)
    return {
        "idx": state["idx"],
        "model": model,
        "n_valid": state["n_valid"] + valid.sum(axis=1),
        "last_day": last_day,
        "last_valid": valid[:, -1] if len(days) else state["last_valid"],
    }


def _models_after(kernel: Kernel, inputs: list, days: np.ndarray) -> list:
    """The model state of each window of ``inputs`` (:func:`_window_input`) after the batch:
    LSTM states (arrays whose third axis is the pixels) in one call for them all, SBERT's
    (updated in place) window by window."""
    with _predictor(kernel) as predictor:
        if len(inputs) > 1 and all(isinstance(x[0]["model"], np.ndarray) for x in inputs):
            sizes = [x[1].shape[0] for x in inputs]
            model = predictor.stream_step(
                np.concatenate([x[0]["model"] for x in inputs], axis=2),
                np.concatenate([x[1] for x in inputs]),
                np.concatenate([x[2] for x in inputs]),
                days,
            )
            return np.split(model, np.cumsum(sizes)[:-1], axis=2)
        return [predictor.stream_step(x[0]["model"], x[1], x[2], days) for x in inputs]


def stream_step(
    state: list | None, windows: tuple, days: np.ndarray, kernel: Kernel, masks, *picks
) -> list:
    """The states of a run of windows after one batch of scenes (``state`` None: before the
    first batch).  ``windows``: per window ``(bands, h, w, parts)``, ``parts`` per piece of the
    window ``(pick, at, first row, last row)``: piece ``at`` of ``picks[pick]`` (the run's
    pieces of one band of the batch) holds those rows of the window; ``days`` the batch's days
    since 1970-01-01; ``masks``: the window's masks (None: no mask).  Consecutive windows of at
    most :data:`STEP_CALL_ELEMENTS` together go through the model in one call.

    A window's state: ``idx`` (the flat indices of the pixels stepped: the mask's, or all),
    ``model`` (the model's state of each, see
    :meth:`~treesits_dask.models.loading.Predictor.stream_step`: SBERT's is updated in place, so
    a step's input state is its output: the next step is the one task that reads a state, the
    step's ``done`` task returns nothing, and a state lost with its worker is computed again by
    the steps before it), ``n_valid`` (valid observations so far), ``last_day`` (the day of the
    newest one, -1: none) and ``last_valid`` (whether the batch's newest scene is valid).  None
    where the mask has no pixel (nothing is read or predicted)."""
    t = len(days)
    out: list = [None] * len(windows)
    group: list = []  # (k, window input) of the windows stepped in the next call

    def step() -> None:
        models = _models_after(kernel, [x for _, x in group], days)
        for (k, (before, _, valid)), model in zip(group, models, strict=True):
            out[k] = _window_after(before, model, valid, days)
        group.clear()

    for k, (count, h, w, parts) in enumerate(windows):
        pieces = [picks[pick][at] for pick, at, _, _ in parts]
        where = tuple((0, t, r0, r1) for _, _, r0, r1 in parts)
        mask = masks[k] if masks is not None else None
        prev = state[k] if state is not None else None
        got = _window_input(prev, (t, count, h, w), mask, where, kernel, pieces, state is None)
        if got is None:
            continue
        if group and sum(x[1].size for _, x in group) + got[1].size > STEP_CALL_ELEMENTS:
            step()
        group.append((k, got))
    if group:
        step()
    return out


def stream_outputs(states: list, k: int, hw: tuple[int, int], kernel: Kernel) -> np.ndarray:
    """The packed outputs of window ``k`` of a run from its state after the last batch (see
    :func:`~treesits_dask.pipeline.predict.predict_block`: the same variables, nodata where the
    mask has no pixel or a pixel no valid observation)."""
    state = states[k]
    packing = kernel.packing
    n_classes = packing.n_classes
    out = empty_outputs(n_classes, hw, packing.layers)
    if state is not None and (now := state["n_valid"] > 0).any():
        with _predictor(kernel) as predictor:
            probs, used = predictor.stream_probs(state["model"], np.flatnonzero(now))
        used = state["n_valid"][now] if used is None else used
        fill_outputs(out, state["idx"][now], probs, used, state["last_valid"][now],
                     state["last_day"][now], packing.layers)  # fmt: skip
    return packing.pack(out)


def _then(_, fn=None, *args):
    """``fn(*args)`` once the first argument (a gate, or the step it waits for) is there; None
    without ``fn``."""
    return fn(*args) if fn is not None else None


def _pick(pieces, ks: tuple[int, ...]) -> tuple:
    """The pieces ``ks`` of a band's read (a list; a band that is one whole window is the
    window)."""
    if isinstance(pieces, np.ndarray):
        return (pieces,)
    return tuple(pieces[k] for k in ks)


#: pixels of the windows one step task takes at most (more tasks where a tile's reading threads
#: would otherwise wait): a 300-row band of a 3000 px tile in 4 runs
STEP_PIXELS = 1 << 18

#: the tasks of a streamed tile, by their name's start: (reads or steps, their priority offset)
_KINDS = {
    "read-band-stream-": ("read", 0),
    "read-pick-stream-": ("read", 1),
    "stream-step-": ("predict", 1),
    "stream-done-": ("predict", 1),
    "stream-gate-": (None, 1),
    "stream-": ("predict", 1),
}


def _kind(key) -> tuple[str | None, int]:
    name = str(key[0] if isinstance(key, tuple) else key)
    for start, kind in _KINDS.items():
        if name.startswith(start):
            return kind
    return None, 0


def _resources(routing, key):
    """The resources of a streamed tile's task: reads where reads go, steps where inference."""
    kind = _kind(key)[0]
    return None if kind is None else getattr(routing, kind)


def _priority(units: dict, key) -> int:
    """Dask priority of a streamed tile's task: earlier units first (``units``: the unit of each
    task key), a unit's steps before the next unit's reads."""
    return -2 * units[key] + _kind(key)[1]


def _runs(windows: list, layout, parts: int) -> list[list]:
    """``windows`` (in order) cut into runs of consecutive ones of about equal pixels, at least
    ``parts`` of them (as many windows at most), each at most :data:`STEP_PIXELS` where the
    windows allow."""
    sizes = [layout.windows[i][j].height * layout.windows[i][j].width for i, j in windows]
    n = max(-(-sum(sizes) // STEP_PIXELS), min(len(windows), parts), 1)
    edges = np.linspace(0, len(windows), min(n, len(windows)) + 1).round().astype(int)
    return [windows[a:b] for a, b in zip(edges[:-1], edges[1:], strict=True)]


@dataclass(frozen=True)
class StreamStage:
    """Consecutive scenes of a streamed tile in one file layout: read by ``reader`` (their grid,
    its block shape theirs) under ``plan`` (streamed, planned for those blocks), stepped in
    ``layout`` (the plan's windows, or the map's); ``start``: the position of their first among
    the tile's scenes; ``mask``: the tile's mask (dask array (y, x) bool) chunked like
    ``layout``, or None."""

    reader: WindowReader
    plan: object
    layout: object
    start: int = 0
    mask: object = None


def stream_layer(
    reader: WindowReader,
    layout,
    plan,
    days: np.ndarray,
    kernel: Kernel,
    mask=None,
    routing=None,
    ahead: int = 2,
):
    """Lazy dask array (k, y, x) float32: the packed outputs of every window of ``layout`` (the
    chunks the tile is read in; the plan's own windows where it has them,
    :attr:`~treesits_dask.io.bands.ReadPlan.windows`) from the streamed ``plan``
    (:func:`~treesits_dask.io.bands.plan_reads` with ``stream``), its scenes read by ``reader``.
    ``mask`` (dask array (y, x) bool chunked like those windows, or None); ``routing``
    (:class:`~treesits_dask.pipeline.cluster.Routing`): resources of reads and of steps;
    ``ahead``: units of read batches a tile may hold before its steps took them (at least 1),
    and the least number of step tasks per unit (runs of windows, see :func:`_runs`) where its
    groups are read in more than one batch."""
    stage = StreamStage(reader, plan, plan.windows or layout, 0, mask)
    return stages_layer((stage,), days, kernel, routing, ahead)


@dataclass
class _Stage:
    """What the graph of one stage is built from: per group of bands its windows' runs, the
    pieces each run picks out of each band's read and the steps' window specs."""

    stage: StreamStage
    names: tuple[str, ...]
    runs: list  # per group: runs of windows (i, j)
    ks: list  # per group: {(run, band): piece indices}
    specs: list  # per group: per run the windows' specs (see stream_step)
    at: dict  # window (i, j) -> (group, run, position in the run)


def _stage(stage: StreamStage, tile: str, token: str, n: int, ahead: int) -> _Stage:
    """The :class:`_Stage` of ``stage``, the ``n``-th of a tile: its tasks named
    ``<kind>-<tile>-<token>`` as a tile's read tasks are (see
    :func:`~treesits_dask.io.cube.read_tile`), the token the stage's own."""
    from dask.base import tokenize

    plan, layout, grid = stage.plan, stage.layout, stage.reader.grid
    own = tokenize(token, n)
    kinds = ("read-band-stream", "read-pick-stream", "stream-step", "stream-done", "stream-windows")
    names = tuple(f"{kind}-{tile}-{own}" for kind in kinds)
    out = _Stage(stage, names, [], [], [], {})
    for g, group in enumerate(plan.band_groups()):
        windows = list(dict.fromkeys((p.i, p.j) for b in group for p in plan.bands[b].pieces))
        # a group read in one batch is stepped once: its units do not wait on one another, and
        # those in flight (``ahead``) keep the threads busy; runs would only add tasks
        runs = _runs(windows, layout, ahead if len(plan.batches) > 1 else 1)
        ks = {(r, b): [] for r in range(len(runs)) for b in group}
        specs = []
        for r, run in enumerate(runs):
            spec = []
            for k, (i, j) in enumerate(run):
                w, parts = layout.windows[i][j], []
                for b, piece in plan.of_window[(i, j)]:
                    at = len(ks[(r, b)])
                    ks[(r, b)].append(piece)
                    rows = plan.bands[b].pieces[piece].window_rows
                    parts.append((group.index(b), at, *rows))
                spec.append((grid.count, w.height, w.width, tuple(parts)))
                out.at[(i, j)] = (g, r, k)
            specs.append(tuple(spec))
        out.runs.append(runs)
        out.ks.append(ks)
        out.specs.append(specs)
    return out


def _overlapping(layout, w) -> list[tuple[int, int]]:
    """The windows ``(i, j)`` of ``layout`` that share a pixel with the window ``w``."""
    rows = [
        i
        for i, row in enumerate(layout.windows)
        if row[0].row_off < w.row_off + w.height and w.row_off < row[0].row_off + row[0].height
    ]
    cols = [j for j, c in enumerate(layout.windows[0])
            if c.col_off < w.col_off + w.width and w.col_off < c.col_off + c.width]  # fmt: skip
    return [(i, j) for i in rows for j in cols]


def _sources(before: _Stage, after: _Stage, g: int, r: int) -> tuple[list, tuple, tuple]:
    """What run ``r`` of group ``g`` of ``after`` takes its windows' states from: the runs
    ``(group, run)`` of ``before`` (the stage before) that step a window sharing a pixel with
    one of them, the run's windows (row, column, height, width) and per window its sources'
    ``(run's position in those, window's position in its run, row, column, height, width)``."""
    runs: list = []
    targets, parts = [], []
    for i, j in after.runs[g][r]:
        w = after.stage.layout.windows[i][j]
        targets.append((w.row_off, w.col_off, w.height, w.width))
        mine = []
        for key in _overlapping(before.stage.layout, w):
            sg, sr, k = before.at[key]
            if (sg, sr) not in runs:
                runs.append((sg, sr))
            v = before.stage.layout.windows[key[0]][key[1]]
            mine.append((runs.index((sg, sr)), k, v.row_off, v.col_off, v.height, v.width))
        parts.append(tuple(mine))
    return runs, tuple(targets), tuple(parts)


def window_states(targets: tuple, sources: tuple, *states) -> list:
    """The states (see :func:`stream_step`) of windows ``targets`` (row, column, height, width in
    the tile) from those of the windows of an earlier stage that share their pixels:
    ``sources[k]`` of target ``k``: ``(run, position, row, column, height, width)``, the state
    ``states[run][position]`` of the window at that place.  Each target's pixels source by
    source (a window's state may list its pixels in any order), their model states gathered
    (:func:`~treesits_dask.models.loading.gather_stream_states`); None where none of its sources
    has a pixel in it (no mask pixel)."""
    from ..models.loading import gather_stream_states

    out = []
    for (tr, tc, th, tw), parts in zip(targets, sources, strict=True):
        got = []
        for run, k, sr, sc, _, sw in parts:
            state = states[run][k]
            if state is None:
                continue
            rows = state["idx"] // sw + (sr - tr)
            cols = state["idx"] % sw + (sc - tc)
            inside = np.flatnonzero((rows >= 0) & (rows < th) & (cols >= 0) & (cols < tw))
            if inside.size:
                got.append((state, inside, rows[inside] * tw + cols[inside]))
        if not got:
            out.append(None)
            continue
        taken = {k: np.concatenate([s[k][inside] for s, inside, _ in got])
                 for k in ("n_valid", "last_day", "last_valid")}  # fmt: skip
        out.append({
            "idx": np.concatenate([where for *_, where in got]),
            "model": gather_stream_states([(s["model"], inside) for s, inside, _ in got]),
        } | taken)  # fmt: skip
    return out


def _order(stages: list[_Stage]) -> list[tuple[int, int]]:
    """The groups ``(stage, group)`` in the order their units go: the last stage's groups top to
    bottom, each after the groups of the stages before whose windows its windows take their
    states from (and those after theirs)."""
    order: list = []
    seen: set = set()

    def visit(n: int, g: int) -> None:
        if (n, g) in seen:
            return
        seen.add((n, g))
        if n:
            for r in range(len(stages[n].runs[g])):
                for sg, _ in _sources(stages[n - 1], stages[n], g, r)[0]:
                    visit(n - 1, sg)
        order.append((n, g))

    for n in range(len(stages) - 1, -1, -1):  # the last stage's, then any left of the others
        for g in range(len(stages[n].runs)):
            visit(n, g)
    return order


def stages_layer(stages, days: np.ndarray, kernel: Kernel, routing=None, ahead: int = 2):
    """Lazy dask array (k, y, x) float32: the packed outputs of every window of the last stage's
    layout, from a tile streamed in ``stages`` (:class:`StreamStage`, in the order of their
    scenes: one, or one per run of consecutive scenes in one file layout, each read by its own
    plan so that each block is decoded once).  The first batch of a later stage's windows takes
    their states from the last of the earlier stage's windows that share their pixels
    (:func:`window_states`, a task per run of windows); the earlier stage's bands go first (see
    :func:`_order`).  ``days``: of all the tile's scenes; ``routing`` and ``ahead`` as
    :func:`stream_layer` takes them."""
    import dask
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    tile = stages[-1].reader.grid.tile
    masks_of = [st.mask.name if st.mask is not None else None for st in stages]
    token = tokenize([(st.reader, st.layout.shape, st.plan, st.start) for st in stages], days,
                     kernel, masks_of, ahead)  # fmt: skip
    name, gate = f"stream-{tile}-{token}", f"stream-gate-{tile}-{token}"
    ahead = max(1, int(ahead))
    built = [_stage(st, tile, token, n, ahead) for n, st in enumerate(stages)]
    last = len(stages) - 1
    dsk: dict = {}
    units: dict = {}
    u = 0
    for n, g in _order(built):
        here, mname = built[n], masks_of[n]
        plan, layout, reader = here.stage.plan, here.stage.layout, here.stage.reader
        rb, pick, step, done, windows = here.names
        group, runs = plan.band_groups()[g], here.runs[g]
        for s, (start, stop) in enumerate(plan.batches):
            wait = (gate, u - ahead) if u >= ahead else None
            for b in group:
                band = plan.bands[b]
                masks = [(mname, p.i, p.j) for p in band.pieces] if mname else []
                task = (reader.read_band, band, start, stop, *masks)
                dsk[(rb, b, s)] = (_then, wait, *task) if wait else task
                units[(rb, b, s)] = u
                for r in range(len(runs)):
                    dsk[(pick, b, s, r)] = (_pick, (rb, b, s), tuple(here.ks[g][(r, b)]))
                    units[(pick, b, s, r)] = u
            for r, run in enumerate(runs):
                masks = [(mname, i, j) for i, j in run] if mname else None
                picks = [(pick, b, s, r) for b in group]
                prev = (step, g, r, s - 1) if s else None
                if not s and n:  # the states of the stage before, in this stage's windows
                    before = built[n - 1]
                    sources, targets, parts = _sources(before, here, g, r)
                    final = len(before.stage.plan.batches) - 1
                    prev = (windows, g, r)
                    dsk[prev] = (
                        window_states,
                        targets,
                        parts,
                        *[(before.names[2], sg, sr, final) for sg, sr in sources],
                    )
                    units[prev] = u
                at = here.stage.start
                dsk[(step, g, r, s)] = (
                    stream_step, prev, here.specs[g][r], days[at + start:at + stop], kernel,
                    masks, *picks,
                )  # fmt: skip
                dsk[(done, g, r, s)] = (_then, (step, g, r, s))
                units[(step, g, r, s)] = units[(done, g, r, s)] = u
            dsk[(gate, u)] = (_then, [(done, g, r, s) for r in range(len(runs))])
            units[(gate, u)] = u
            u += 1
        if n < last:
            continue
        final = len(plan.batches) - 1
        for r, run in enumerate(runs):
            for k, (i, j) in enumerate(run):
                w = layout.windows[i][j]
                dsk[(name, 0, i, j)] = (stream_outputs, (step, g, r, final), k,
                                        (w.height, w.width), kernel)  # fmt: skip
                units[(name, 0, i, j)] = u - 1
    annotations = {"priority": functools.partial(_priority, units)}
    if routing is not None and (routing.read or routing.predict):
        annotations["resources"] = functools.partial(_resources, routing)
    deps = [st.mask for st in stages if st.mask is not None]
    with dask.annotate(**annotations):
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    chunks = ((kernel.packing.size,), *stages[-1].layout.chunks)
    return da.Array(graph, name, chunks, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
