"""Streamed tiles: the scenes go through the model batch by batch, each window's model state
carried from one batch to the next, so that nothing of all scenes is ever held.

A one-way LSTM (the SITS-NN LSTM) sees one observation per step, from a zero state, and its
output is its state after the last step: run over the scenes in batches, carrying ``(h, c)``,
it gives the same result as over all of them at once
(:meth:`~treesits_dask.models.loading.Predictor.stream_step`).  A tile read so needs neither its
bands of all scenes in memory nor on disk (what :mod:`treesits_dask.io.bands` otherwise counts
on, or decodes blocks more than once without): each band is read as batches of scenes (every
block decoded once), each window steps its state through its pieces of a batch, and the batch
is dropped.  A 3000 px strips tile of 600 scenes, whose 300-row bands of all scenes are 10 GiB
each, is read so within the read budget of any worker.

The graph of a tile (:func:`stream_layer`), one layer with per-task annotations (reads where
reads go, steps where inference goes):

- per band and batch of scenes a read task (``read-band-stream-``), and per piece of it a task
  that picks it out (so that a window's step fetches its own piece, not the band);
- per window and batch a step task: the window's state after that batch;
- per window the outputs from its last state (:func:`stream_outputs`);
- per window and batch a task that returns nothing once the step is done, and per unit (a group
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
from ..outputs.schema import DTYPES, UNCERTAINTY, Packing, empty_outputs
from ..outputs.uncertainty import uncertainty
from .devices import device_lock, device_pool
from .predict import FORWARDS_IN_PROGRESS, Inference, get_predictor, last_valid_day

__all__ = ["Kernel", "stream_layer", "stream_outputs", "stream_step"]


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


def stream_step(
    state: dict | None,
    shape: tuple[int, int, int, int],
    mask: np.ndarray | None,
    where: tuple,
    days: np.ndarray,
    kernel: Kernel,
    *pieces,
) -> dict | None:
    """A window's state after one batch of scenes (``state`` None: before the first batch).

    ``shape``: (scenes of the batch, bands, h, w); ``pieces`` the window's pieces of the batch
    (``where[k]``: ``(0, scenes, first row, last row)`` in the window), as
    :func:`~treesits_dask.io.reader.assemble` takes them; ``days`` the batch's days since
    1970-01-01.  The state: ``idx`` (the flat indices of the pixels stepped: the mask's, or
    all), ``hc`` (the model's state of each), ``n_valid`` (valid observations so far),
    ``last_day`` (the day of the newest one, -1: none) and ``last_valid`` (whether the batch's
    newest scene is valid).  None where the mask has no pixel (nothing is read or predicted).
    """
    t, _, h, w = shape
    if state is None:
        if mask is not None and not mask.any():
            return None
        idx = np.flatnonzero(mask) if mask is not None else np.arange(h * w)
        with _predictor(kernel) as predictor:
            hc = predictor.stream_state(idx.size)
        state = {
            "idx": idx,
            "hc": hc,
            "n_valid": np.zeros(idx.size, np.int64),
            "last_day": np.full(idx.size, -1, np.int64),
            "last_valid": np.zeros(idx.size, bool),
        }
    part = assemble(shape, mask, where, list(pieces))
    idx = state["idx"]
    series = np.ascontiguousarray(part.reshape(t, shape[1], h * w)[:, :, idx].transpose(2, 0, 1))
    del part
    valid = np.all(series != NODATA, axis=2)
    with _predictor(kernel) as predictor:
        hc = predictor.stream_step(state["hc"], series, valid)
    del series
    seen = valid.any(axis=1)
    last_day = state["last_day"].copy()
    if seen.any():
        last_day[seen] = last_valid_day(valid[seen], days)
    return {
        "idx": idx,
        "hc": hc,
        "n_valid": state["n_valid"] + valid.sum(axis=1),
        "last_day": last_day,
        "last_valid": valid[:, -1] if t else state["last_valid"],
    }


def stream_outputs(state: dict | None, hw: tuple[int, int], kernel: Kernel) -> np.ndarray:
    """The packed outputs of a window from its state after the last batch (see
    :func:`~treesits_dask.pipeline.predict.predict_block`: the same variables, nodata where the
    mask has no pixel or a pixel no valid observation)."""
    packing = kernel.packing
    n_classes = packing.n_classes
    out = empty_outputs(n_classes, hw, packing.layers)
    if state is not None and (now := state["n_valid"] > 0).any():
        sel = state["idx"][now]
        with _predictor(kernel) as predictor:
            probs = predictor.stream_probs(np.ascontiguousarray(state["hc"][:, :, now]))
        prob = out["probability"].reshape(n_classes, -1)
        prob[:, sel] = probs.T
        if n_classes > 1:
            out["class"].reshape(-1)[sel] = np.argmax(probs, axis=1).astype(DTYPES["class"])
        most = np.iinfo(DTYPES["valid_obs"]).max
        used = np.minimum(state["n_valid"][now], most)
        out["valid_obs"].reshape(-1)[sel] = used.astype(DTYPES["valid_obs"])
        lov = state["last_valid"][now].astype(DTYPES["last_obs_valid"])
        out["last_obs_valid"].reshape(-1)[sel] = lov
        lvd = state["last_day"][now].astype(DTYPES["last_valid_date"])
        out["last_valid_date"].reshape(-1)[sel] = lvd
        wanted = [v for v in packing.layers if v in UNCERTAINTY]
        if wanted:
            for var, values in uncertainty(probs, wanted).items():
                out[var].reshape(-1)[sel] = values
    return packing.pack(out)


def _then(_, fn=None, *args):
    """``fn(*args)`` once the first argument (a gate, or the step it waits for) is there; None
    without ``fn``."""
    return fn(*args) if fn is not None else None


def _piece(pieces, k: int):
    """Piece ``k`` of a band's read (a list; a band that is one whole window is the window)."""
    return pieces if isinstance(pieces, np.ndarray) else pieces[k]


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
    chunks the tile is read in) from the streamed ``plan``
    (:func:`~treesits_dask.io.bands.plan_reads` with ``stream``), its scenes read by ``reader``.
    ``mask`` (dask array (y, x) bool chunked like ``layout``, or None); ``routing``
    (:class:`~treesits_dask.pipeline.cluster.Routing`): resources of reads and of steps;
    ``ahead``: units of read batches a tile may hold before its steps took them (at least 1)."""
    import dask
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    grid = reader.grid
    token = tokenize(
        reader, layout.shape, plan, days, kernel, mask.name if mask is not None else None
    )
    tile = grid.tile
    name, rb, pick = (
        f"stream-{tile}-{token}",
        f"read-band-stream-{tile}-{token}",
        f"read-pick-stream-{tile}-{token}",
    )
    step, done, gate = (f"stream-{k}-{tile}-{token}" for k in ("step", "done", "gate"))
    mname = mask.name if mask is not None else None
    dsk: dict = {}
    units: dict = {}
    order = [(g, s) for g in plan.band_groups() for s in range(len(plan.batches))]
    ahead = max(1, int(ahead))
    rows_of = {}  # window -> its pieces: (band, piece index)
    for (i, j), found in plan.of_window.items():
        rows_of[(i, j)] = found
    for u, (group, s) in enumerate(order):
        start, stop = plan.batches[s]
        wait = (gate, u - ahead) if u >= ahead else None
        windows = []
        for b in group:
            band = plan.bands[b]
            masks = [(mname, p.i, p.j) for p in band.pieces] if mname else []
            task = (reader.read_band, band, start, stop, *masks)
            dsk[(rb, b, s)] = (_then, wait, *task) if wait else task
            units[(rb, b, s)] = u
            for k, p in enumerate(band.pieces):
                dsk[(pick, b, s, k)] = (_piece, (rb, b, s), k)
                units[(pick, b, s, k)] = u
                windows.append((p.i, p.j))
        windows = list(dict.fromkeys(windows))
        for i, j in windows:
            w = layout.windows[i][j]
            keys, where = [], []
            for b, k in rows_of[(i, j)]:
                keys.append((pick, b, s, k))
                where.append((0, stop - start, *plan.bands[b].pieces[k].window_rows))
            prev = (step, i, j, s - 1) if s else None
            dsk[(step, i, j, s)] = (
                stream_step, prev, (stop - start, grid.count, w.height, w.width),
                (mname, i, j) if mname else None, tuple(where), days[start:stop], kernel, *keys,
            )  # fmt: skip
            dsk[(done, i, j, s)] = (_then, (step, i, j, s))
            units[(step, i, j, s)] = units[(done, i, j, s)] = u
        dsk[(gate, u)] = (_then, [(done, i, j, s) for i, j in windows])
        units[(gate, u)] = u
    last = len(plan.batches) - 1
    for i, j, w in layout:
        dsk[(name, 0, i, j)] = (stream_outputs, (step, i, j, last), (w.height, w.width), kernel)
        units[(name, 0, i, j)] = units[(step, i, j, last)]
    annotations = {"priority": functools.partial(_priority, units)}
    if routing is not None and (routing.read or routing.predict):
        annotations["resources"] = functools.partial(_resources, routing)
    deps = [mask] if mask is not None else []
    with dask.annotate(**annotations):
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=deps)
    chunks = ((kernel.packing.size,), *layout.chunks)
    return da.Array(graph, name, chunks, dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
