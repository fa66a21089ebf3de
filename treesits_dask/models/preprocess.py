"""Per-family input preparation, vectorised numpy over a batch of pixels (no torch here).

Both :meth:`Predictor.predict <treesits_dask.models.loading.Predictor.predict>` and training use
these functions, so a model sees the same inputs in training and inference.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputDataError, ModelError

__all__ = ["check_inputs", "day_index_error", "day_of_year", "full_inputs", "sbert_inputs"]

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
    each pixel's first kept observation."""
    while True:
        first = np.argmax(kept, axis=1)  # index of the oldest kept observation
        last = kept.shape[1] - 1 - np.argmax(kept[:, ::-1], axis=1)  # of the newest
        first_day = days[first]
        t0 = day_of_year(first_day)
        over = kept.any(axis=1) & (days[last] - first_day + t0 >= max_position)
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

    Returns ``x`` (N, seq_len, 10) float32, ``doy`` (N, seq_len) int64, ``mask`` (N, seq_len)
    bool and ``n_used`` (N,) int64.
    """
    n_pix, _, n_bands = series.shape
    valid = valid.astype(bool, copy=False)
    days = np.asarray(days, dtype=np.int64)
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
    day_index = days[obs] - first_day[pix] + t0[pix]
    # z-score per pixel and band over the kept observations (float64 statistics, ddof 0)
    weight = kept[:, :, None]
    refl = series.astype(np.float64)
    refl /= 10000.0
    count = np.maximum(n_used, 1)[:, None]
    mean = np.where(weight, refl, 0.0).sum(axis=1) / count
    refl -= mean[:, None, :]
    refl *= weight
    std = np.sqrt(np.einsum("ntb,ntb->nb", refl, refl) / count)
    refl /= (std + 1e-6)[:, None, :]
    x[pix, slot] = refl[pix, obs]
    doy[pix, slot] = day_index
    mask[pix, slot] = True
    return x, doy, mask, n_used
