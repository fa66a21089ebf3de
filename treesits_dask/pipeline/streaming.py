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
  tile has reading threads: a tile of 100 px windows has hundreds of windows, each a task per
  batch otherwise);
- per window the outputs from its last state (:func:`stream_outputs`);
- per run and batch a task that returns nothing once the step is done, and per unit (a group
  of bands tied together by windows, see :meth:`~treesits_dask.io.bands.ReadPlan.band_groups`,
  and a batch) a gate that waits for those: the reads of the unit ``ahead`` units later take it
  as their first argument, so that a tile holds at most ``ahead`` units of read batches that
  its steps have not yet taken, however fast it reads and however slowly it predicts.

Priorities take the units in order: a group's batches one after the other, its steps before
the next batch's reads.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import numpy as np

from ..io.cube import NODATA
from ..io.reader import WindowReader, assemble
from ..models import ModelSpec
from ..outputs.schema import Packing, empty_outputs
from .devices import device_lock, device_pool
from .predict import FORWARDS_IN_PROGRESS, Inference, fill_outputs, get_predictor, last_valid_day

__all__ = [
    "STEP_PIXELS",
    "Kernel",
    "stream_layer",
    "stream_outputs",
    "stream_step",
    "window_step",
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


def window_step(
    state: dict | None,
    shape: tuple[int, int, int, int],
    mask: np.ndarray | None,
    where: tuple,
    days: np.ndarray,
    kernel: Kernel,
    pieces: list,
    first: bool = True,
) -> dict | None:
    """A window's state after one batch of scenes (``state`` None and ``first``: before the
    first batch; None and not ``first``: a window without a mask pixel, which stays None).

    ``shape``: (scenes of the batch, bands, h, w); ``pieces`` the window's pieces of the batch
    (``where[k]``: ``(0, scenes, first row, last row)`` in the window), as
    :func:`~treesits_dask.io.reader.assemble` takes them; ``days`` the batch's days since
    1970-01-01.  The state: ``idx`` (the flat indices of the pixels stepped: the mask's, or
    all), ``model`` (the model's state of each, see
    :meth:`~treesits_dask.models.loading.Predictor.stream_step`: SBERT's is updated in place, so
    a step's input state is its output: the next step is the one task that reads a state, the
    step's ``done`` task returns nothing, and a state lost with its worker is computed again by
    the steps before it), ``n_valid`` (valid observations so far),
    ``last_day`` (the day of the newest one, -1: none) and ``last_valid`` (whether the batch's
    newest scene is valid).  None where the mask has no pixel (nothing is read or predicted).
    """
    t, _, h, w = shape
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
    part = assemble(shape, mask, where, pieces)
    idx = state["idx"]
    series = np.ascontiguousarray(part.reshape(t, shape[1], h * w)[:, :, idx].transpose(2, 0, 1))
    del part
    valid = np.all(series != NODATA, axis=2)
    with _predictor(kernel) as predictor:
        model = predictor.stream_step(state["model"], series, valid, days)
    del series
    seen = valid.any(axis=1)
    last_day = state["last_day"].copy()
    if seen.any():
        last_day[seen] = last_valid_day(valid[seen], days)
    return {
        "idx": idx,
        "model": model,
        "n_valid": state["n_valid"] + valid.sum(axis=1),
        "last_day": last_day,
        "last_valid": valid[:, -1] if t else state["last_valid"],
    }


def stream_step(
    state: list | None, windows: tuple, days: np.ndarray, kernel: Kernel, masks, *picks
) -> list:
    """The states of a run of windows after one batch of scenes (``state`` None: before the
    first batch; see :func:`window_step`).  ``windows``: per window ``(bands, h, w, parts)``,
    ``parts`` per piece of the window ``(pick, at, first row, last row)``: piece ``at`` of
    ``picks[pick]`` (the run's pieces of one band of the batch) holds those rows of the window;
    ``masks``: the window's masks (None: no mask)."""
    t = len(days)
    out = []
    for k, (count, h, w, parts) in enumerate(windows):
        pieces = [picks[pick][at] for pick, at, _, _ in parts]
        where = tuple((0, t, r0, r1) for _, _, r0, r1 in parts)
        mask = masks[k] if masks is not None else None
        prev = state[k] if state is not None else None
        out.append(window_step(prev, (t, count, h, w), mask, where, days, kernel, pieces,
                               first=state is None))  # fmt: skip
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
    and the least number of step tasks per unit (runs of windows, see :func:`_runs`)."""
    import dask
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    grid = reader.grid
    layout = plan.windows or layout
    mname = mask.name if mask is not None else None
    token = tokenize(reader, layout.shape, plan, days, kernel, mname, ahead)
    tile = grid.tile
    name = f"stream-{tile}-{token}"
    rb, pick = f"read-band-stream-{tile}-{token}", f"read-pick-stream-{tile}-{token}"
    step, done, gate = (f"stream-{k}-{tile}-{token}" for k in ("step", "done", "gate"))
    ahead = max(1, int(ahead))
    dsk: dict = {}
    units: dict = {}
    u = 0
    for g, group in enumerate(plan.band_groups()):
        windows = list(dict.fromkeys((p.i, p.j) for b in group for p in plan.bands[b].pieces))
        runs = _runs(windows, layout, ahead)
        # per run: the pieces it picks out of each band's read, and per window where they go
        ks = {(r, b): [] for r in range(len(runs)) for b in group}
        specs = []
        for r, run in enumerate(runs):
            spec = []
            for i, j in run:
                w, parts = layout.windows[i][j], []
                for b, k in plan.of_window[(i, j)]:
                    at = len(ks[(r, b)])
                    ks[(r, b)].append(k)
                    rows = plan.bands[b].pieces[k].window_rows
                    parts.append((group.index(b), at, *rows))
                spec.append((grid.count, w.height, w.width, tuple(parts)))
            specs.append(tuple(spec))
        for s, (start, stop) in enumerate(plan.batches):
            wait = (gate, u - ahead) if u >= ahead else None
            for b in group:
                band = plan.bands[b]
                masks = [(mname, p.i, p.j) for p in band.pieces] if mname else []
                task = (reader.read_band, band, start, stop, *masks)
                dsk[(rb, b, s)] = (_then, wait, *task) if wait else task
                units[(rb, b, s)] = u
                for r in range(len(runs)):
                    dsk[(pick, b, s, r)] = (_pick, (rb, b, s), tuple(ks[(r, b)]))
                    units[(pick, b, s, r)] = u
            for r, run in enumerate(runs):
                masks = [(mname, i, j) for i, j in run] if mname else None
                picks = [(pick, b, s, r) for b in group]
                prev = (step, g, r, s - 1) if s else None
                dsk[(step, g, r, s)] = (
                    stream_step, prev, specs[r], days[start:stop], kernel, masks, *picks,
                )  # fmt: skip
                dsk[(done, g, r, s)] = (_then, (step, g, r, s))
                units[(step, g, r, s)] = units[(done, g, r, s)] = u
            dsk[(gate, u)] = (_then, [(done, g, r, s) for r in range(len(runs))])
            units[(gate, u)] = u
            u += 1
        last = len(plan.batches) - 1
        for r, run in enumerate(runs):
            for k, (i, j) in enumerate(run):
                w = layout.windows[i][j]
                dsk[(name, 0, i, j)] = (stream_outputs, (step, g, r, last), k, (w.height, w.width),
                                        kernel)  # fmt: skip
                units[(name, 0, i, j)] = u - 1
    annotations = {"priority": functools.partial(_priority, units)}
    if routing is not None and (routing.read or routing.predict):
        annotations["resources"] = functools.partial(_resources, routing)
    deps = [mask] if mask is not None else []
    with dask.annotate(**annotations):
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    chunks = ((kernel.packing.size,), *layout.chunks)
    return da.Array(graph, name, chunks, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
