"""Per-family input preparation, vectorised numpy over a batch of pixels (no torch here).

Both :meth:`Predictor.predict <treesits_dask.models.loading.Predictor.predict>` and training use
these functions, so a model sees the same inputs in training and inference.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputDataError, ModelError

__all__ = [
    "check_inputs",
    "day_index_error",
    "day_of_year",
    "full_inputs",
    "sbert_inputs",
    "sbert_keep",
    "sbert_kept",
    "sbert_state",
]

_EPOCH = np.datetime64("1970-01-01", "D")


def check_inputs(series: np.ndarray, valid: np.ndarray, days: np.ndarray, bands: int = 10) -> None:
    """Shapes of ``series`` (N, T, bands), ``valid`` (N, T) and ``days`` (T,) must agree."""
    if series.ndim != 3 or series.shape[2] != bands:
        raise InputDataError(
            f"expected series of shape (pixels, scenes, {bands}), got {series.shape}"
        )
    if valid.shape != series.shape[:2]:
        raise InputDataError(f"valid has shape {valid.shape}, expected {series.shape[:2]}")
    if days.shape != (series.shape[1],):
        raise InputDataError(f"days has shape {days.shape}, expected ({series.shape[1]},)")


def full_inputs(series: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SITS-NN input (REFERENCE 3b/3c): raw BOA as float32, invalid observations 0 in all bands.

    Returns ``x`` (N, T, 10) float32 and ``n_used`` (N,) int64 (valid observations per pixel).
    """
    x = series.astype(np.float32)
    x *= valid[:, :, None]
    return x, valid.sum(axis=1, dtype=np.int64)


def day_of_year(days: np.ndarray) -> np.ndarray:
    """Day of year (1..366) of days since 1970-01-01."""
    d = _EPOCH + np.asarray(days, dtype="timedelta64[D]")
    return (d - d.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64) + 1


def _fit_position_table(kept: np.ndarray, days: np.ndarray, max_position: int):
    """Drop (in ``kept``, in place) the oldest kept observations of every pixel whose newest one
    would get a day index beyond the position table; returns the index, day and day-of-year of
    each pixel's first kept observation.  ``days``: (N, T), each pixel's own."""
    every = np.arange(kept.shape[0])
    while True:
        first = np.argmax(kept, axis=1)  # index of the oldest kept observation
        last = kept.shape[1] - 1 - np.argmax(kept[:, ::-1], axis=1)  # of the newest
        first_day = days[every, first]
        t0 = day_of_year(first_day)
        over = kept.any(axis=1) & (days[every, last] - first_day + t0 >= max_position)
        if not over.any():
            return first, first_day, t0
        rows = np.flatnonzero(over)
        kept[rows, first[rows]] = False


def day_index_error(top: int, max_position: int) -> ModelError:
    """The error of an SBERT day index ``top`` outside the ``max_position``-row position table."""
    return ModelError(
        f"SBERT day index {top} is beyond the model's {max_position}-row position table "
        "(day-of-year of the first kept observation + days spanned must stay below "
        f"{max_position}): "
        "the window is too long for this model; shorten it with --start-date/--end-date"
    )


def sbert_inputs(
    series: np.ndarray,
    valid: np.ndarray,
    days: np.ndarray,
    seq_len: int = 256,
    max_position: int = 1826,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """SBERT input (REFERENCE 3a) of a batch of pixels.

    Keeps the latest ``seq_len`` valid observations of each pixel, day index relative to the
    day-of-year of the first kept one, per-pixel/band z-score of reflectance / 10000 (ddof 0,
    epsilon added to the std), right-aligned into ``seq_len`` slots with zero padding in front.

    The day index of the newest kept observation must stay below ``max_position`` (the rows of
    the position table): where it would not (a 1460-day window whose first kept observation
    falls late in a leap year reaches 1826), the oldest kept observations are dropped until it
    does; everywhere else the result is the reference's (which would crash there).

    ``days``: (T,) days since 1970-01-01 of the scenes, or (N, T) each pixel's own (the
    observations a streamed pixel kept, :func:`sbert_kept`).

    Returns ``x`` (N, seq_len, 10) float32, ``doy`` (N, seq_len) int64, ``mask`` (N, seq_len)
    bool and ``n_used`` (N,) int64.
    """
    n_pix, _, n_bands = series.shape
    valid = valid.astype(bool, copy=False)
    days = np.broadcast_to(np.asarray(days, dtype=np.int64), valid.shape)
    # rank of each valid observation counted from the newest (1 = newest)
    rank = np.cumsum(valid[:, ::-1], axis=1, dtype=np.int64)[:, ::-1]
    kept = valid & (rank <= seq_len)
    n_used = np.minimum(valid.sum(axis=1, dtype=np.int64), seq_len)
    x = np.zeros((n_pix, seq_len, n_bands), dtype=np.float32)
    doy = np.zeros((n_pix, seq_len), dtype=np.int64)
    mask = np.zeros((n_pix, seq_len), dtype=bool)
    if not kept.any():
        return x, doy, mask, n_used
    first, first_day, t0 = _fit_position_table(kept, days, max_position)
    n_used = kept.sum(axis=1, dtype=np.int64)
    pix, obs = np.nonzero(kept)
    slot = seq_len - rank[pix, obs]
    doy[pix, slot] = days[pix, obs] - first_day[pix] + t0[pix]
    mask[pix, slot] = True
    # the kept observations right-aligned, raw (each moved as one item), then the z-score per
    # pixel and band over them (float64 statistics, ddof 0): the reference's operations over
    # the kept observations in date order, the empty slots adding the zeros that the others
    # did, so the same sums bit for bit in a third of the time of computing over every scene
    raw = np.zeros((n_pix, seq_len, n_bands), dtype=series.dtype)
    _items(raw)[pix * seq_len + slot] = _items(np.ascontiguousarray(series))[
        pix * series.shape[1] + obs
    ]
    weight = mask[:, :, None]
    refl = raw.astype(np.float64)
    del raw
    refl /= 10000.0
    count = np.maximum(n_used, 1)[:, None]
    mean = refl.sum(axis=1) / count
    refl -= mean[:, None, :]
    refl *= weight
    std = np.sqrt(np.einsum("ntb,ntb->nb", refl, refl) / count)
    refl /= (std + 1e-6)[:, None, :]
    np.copyto(x, refl, casting="same_kind", where=weight)
    return x, doy, mask, n_used


# --- SBERT over a series in parts -------------------------------------------------------------
#
# SBERT sees the newest ``seq_len`` valid observations of a pixel and nothing else (their
# statistics, the z-score, are of those alone): a pixel run over its scenes batch by batch, in
# ascending date order, needs only the newest ``seq_len`` valid observations so far, kept in a
# ring buffer, whatever the number of scenes.  ``sbert_kept`` gives them back in date order,
# right-aligned as :func:`sbert_inputs` takes them.


def sbert_state(n: int, seq_len: int, bands: int = 10) -> dict:
    """The state of ``n`` pixels before their first observation: ``values`` (n, seq_len, bands)
    int16 and ``days`` (n, seq_len) int32 of the newest ``seq_len`` valid observations so far
    (slot ``k % seq_len`` holds a pixel's ``k``-th), ``count`` (n,) int64 the valid ones seen."""
    return {
        "values": np.zeros((n, seq_len, bands), dtype=np.int16),
        "days": np.zeros((n, seq_len), dtype=np.int32),
        "count": np.zeros(n, dtype=np.int64),
    }


def sbert_keep(state: dict, series: np.ndarray, valid: np.ndarray, days: np.ndarray) -> dict:
    """``state`` (:func:`sbert_state`) after the next scenes of its pixels, in ascending date
    order: ``series`` (N, t, bands) int16, ``valid`` (N, t), ``days`` (t,).  Updated in place
    (the state of a whole band of a tile is gigabytes: copied per batch, it would cost more than
    decoding the batch) and returned."""
    values, kept_days, count = state["values"], state["days"], state["count"]
    _, seq_len, bands = values.shape
    valid = np.asarray(valid, dtype=bool)
    if valid.size == 0:
        return state
    if series.shape != (*valid.shape, bands):
        raise InputDataError(f"series of shape {series.shape} for a state of {bands} bands and "
                             f"valid of shape {valid.shape}")  # fmt: skip
    for key in ("values", "days"):  # written through flat views below
        if not state[key].flags.c_contiguous:
            state[key] = np.ascontiguousarray(state[key])
    values, kept_days = state["values"], state["days"]
    t = valid.shape[1]
    rank = np.cumsum(valid, axis=1, dtype=np.int64)  # 1 = the batch's oldest valid one
    total = rank[:, -1]
    # of a batch with more valid observations than slots, only the newest ``seq_len`` are
    # written (each slot at most once: no write order to rely on); flat indices, the pixel's
    # observations (``bands`` int16) moved as one item each: a third of the time of indexing
    # (pixel, slot) pairs, for the steps that keep a band's observations batch by batch
    src = np.flatnonzero(valid & (rank > (total - seq_len)[:, None]))
    pix, obs = np.divmod(src, t)
    dst = pix * seq_len + (count[pix] + rank.reshape(-1)[src] - 1) % seq_len
    _items(values)[dst] = _items(np.ascontiguousarray(series, dtype=values.dtype))[src]
    kept_days.reshape(-1)[dst] = np.asarray(days, dtype=np.int64)[obs]
    count += total
    return state


def _items(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array's last axis as one item per element of the others: a flat view."""
    item = np.dtype((np.void, a.itemsize * a.shape[-1]))
    return a.reshape(-1, a.shape[-1]).view(item).reshape(-1)


def sbert_kept(
    state: dict, pixels: np.ndarray | slice | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The observations ``state`` (:func:`sbert_state`) kept of ``pixels`` (default: all), in
    date order and right-aligned into ``seq_len`` slots, as :func:`sbert_inputs` takes them:
    ``series`` (N, seq_len, bands) int16, ``valid`` (N, seq_len) and ``days`` (N, seq_len)
    int64 (0 in the empty slots)."""
    values, kept_days = state["values"], state["days"]
    seq_len = kept_days.shape[1]
    where = np.arange(len(kept_days))[slice(None) if pixels is None else pixels]
    count = state["count"][where]
    held = np.minimum(count, seq_len)
    # the oldest kept observation's slot: 0 until the ring is full, then the next to write
    oldest = np.where(count > seq_len, count % seq_len, 0)
    slots = np.arange(seq_len)
    valid = slots[None, :] >= (seq_len - held)[:, None]
    # each pixel's slots in date order, as flat indices into its state: its observations taken
    # as one item each (no copy of the pixels' states first)
    at = where[:, None] * seq_len + (oldest[:, None] + slots - (seq_len - held)[:, None]) % seq_len
    series = _items(values)[at].view(values.dtype).reshape(*at.shape, values.shape[2])
    series[~valid] = 0
    days = kept_days.reshape(-1)[at].astype(np.int64)
    days[~valid] = 0
    return series, valid, days
