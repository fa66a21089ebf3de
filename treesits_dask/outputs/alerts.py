"""Disturbance alerts of a binary (sigmoid) model: a per-pixel state machine kept in the map.

The clock of the machine is the acquisition, not the run: a pixel takes one step at every scene
of its tile dated on or after ``alerts.start`` in which it has a valid observation, with the
probability the model gives on the observations up to and including that scene (its window as
of that date: for SBERT the 1460 days before it).  So the layers are the same whether a year of
scenes arrives in one update or in fifty, in date order or late (the run that meets a late scene
goes back to the last version of the map whose state does not depend on it; see
:mod:`treesits_dask.pipeline.alerting`).

One step of a pixel with probability ``q`` on day ``d`` (:func:`step`)::

    q >= threshold: confirmations += 1
        none, retracted -> candidate, alert_first_seen = d
        candidate       -> confirmed when confirmations >= confirm_after
        confirmed       -> confirmed
    q <  threshold: confirmations = 0
        candidate       -> retracted
        none, confirmed, retracted: unchanged (a confirmed disturbance stays confirmed)

``alert_confirmations`` is thus the number of consecutive steps at or above the threshold up to
the newest (0 after a step below it), ``alert_first_seen`` the date of the step that opened the
current (or last) alert.  A pixel is ``none`` from its first prediction on and 255 (not predicted)
before, and outside the forest mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schema import ALERT_STATES, ALERT_VARIABLES, CLASS_NODATA, DTYPES, NODATA, TileRegion

__all__ = [
    "CANDIDATE", "CONFIRMED", "NONE", "RETRACTED", "AlertSteps", "fresh_state", "read_state",
    "state_layer", "step",
]  # fmt: skip

NONE, CANDIDATE = ALERT_STATES["none"], ALERT_STATES["candidate"]
CONFIRMED, RETRACTED = ALERT_STATES["confirmed"], ALERT_STATES["retracted"]
_MAX_CONFIRMATIONS = np.iinfo(DTYPES["alert_confirmations"]).max


def fresh_state(shape: tuple[int, int]) -> np.ndarray:
    """The state of pixels that have no history: (3, h, w) int64 of the alert layers' nodata."""
    return np.stack([np.full(shape, NODATA[v], dtype=np.int64) for v in ALERT_VARIABLES])


def step(
    first_seen: np.ndarray,
    confirmations: np.ndarray,
    state: np.ndarray,
    above: np.ndarray,
    day: int,
    confirm_after: int,
) -> None:
    """One step, in place, of the pixels of these arrays (all the same shape; ``above``: the
    probability reached the threshold)."""
    state[state == CLASS_NODATA] = NONE
    opened = above & ((state == NONE) | (state == RETRACTED))
    first_seen[opened] = day
    state[opened] = CANDIDATE
    confirmations[:] = np.where(above, np.minimum(confirmations + 1, _MAX_CONFIRMATIONS), 0)
    state[(state == CANDIDATE) & above & (confirmations >= confirm_after)] = CONFIRMED
    state[(state == CANDIDATE) & ~above] = RETRACTED


def read_state(output: str, snapshot: str | None, region: TileRegion, rows: slice, cols: slice):
    """A task: the alert layers (3, h, w) int64 of one window (``rows``, ``cols`` relative to the
    tile ``region``) as they were in ``snapshot`` of the map of ``output`` (None: no history)."""
    shape = (rows.stop - rows.start, cols.stop - cols.start)
    if snapshot is None:
        return fresh_state(shape)
    from .repo import MapRepo
    from .store import data_group

    group = data_group(MapRepo(output).zarr_store(snapshot))
    r = slice(region.row_off + rows.start, region.row_off + rows.stop)
    c = slice(region.col_off + cols.start, region.col_off + cols.stop)
    return np.stack([np.asarray(group[v][r, c], dtype=np.int64) for v in ALERT_VARIABLES])


@dataclass(frozen=True)
class AlertSteps:
    """What the prediction kernel does for the alerts of one tile (small, hashable: shipped in
    the task graph): the scenes of its window from index ``model_lo`` on make the map's
    probability; each ``(t, lo)`` of ``steps`` is one step at scene ``t`` with the model on
    scenes ``lo .. t`` (the window as of that date)."""

    threshold: float
    confirm_after: int
    model_lo: int
    steps: tuple[tuple[int, int], ...]


def state_layer(output: str, snapshot: str | None, region: TileRegion, layout):
    """Lazy dask array (3, y, x) int64 of a tile's alert layers in ``snapshot`` (None: no
    history), one chunk per window of ``layout`` (a
    :class:`~treesits_dask.io.grid.WindowLayout`)."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    name = f"alertstate-{region.tile}-" + tokenize(output, snapshot, region, layout.shape)
    dsk = {
        (name, 0, i, j): (read_state, output, snapshot, region, w.rows, w.cols)
        for i, j, w in layout
    }
    graph = HighLevelGraph.from_collections(name, dsk)
    return da.Array(graph, name, ((3,), *layout.chunks), dtype=np.int64)
