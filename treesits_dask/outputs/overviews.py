"""The overviews of the map (GeoZarr ``multiscales`` levels ``1``, ``2``, ...), kept up to date
tile by tile.

Level ``k`` is made from level ``k - 1`` by 2 x 2 blocks (:func:`downsample`): probabilities,
smoothed probabilities and uncertainty by the mean of the block's valid pixels, every other layer
by the block's upper-left pixel (a class, count, date or state that is in the map; GDAL's
``nearest``), so level ``k`` is level 0 decimated by ``2**k``.  When tiles change (their record,
or their smoothed values), only the level chunks over their footprints are made again, level by
level (:func:`stale_chunks`, :func:`downsample_chunk`); a tile's attribute ``overviews`` names the
record and smoothing state its footprint was made from (:func:`overview_state`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .schema import DTYPES, NODATA, TileRegion
from .store import RESAMPLING

__all__ = [
    "STATE_ATTR", "downsample", "downsample_chunk", "downsample_levels", "overview_state",
    "stale_chunks",
]  # fmt: skip

#: attribute of a tile's group naming what its footprint in the overviews was made from
STATE_ATTR = "overviews"


def overview_state(record: dict, smoothing: dict | None, levels: int) -> dict:
    """What a tile's footprint in the overviews depends on."""
    from ..state.ledger import config_digest

    return {
        "record": record["record_id"],
        "smoothing": config_digest(smoothing) if smoothing else None,
        "levels": levels,
    }


def downsample(values: np.ndarray, variable: str) -> np.ndarray:
    """``values`` (..., h, w) of one level to the next: (..., ceil(h / 2), ceil(w / 2))."""
    h, w = values.shape[-2:]
    if RESAMPLING[variable] == "nearest":
        return values[..., ::2, ::2].copy()
    padded = np.full((*values.shape[:-2], 2 * math.ceil(h / 2), 2 * math.ceil(w / 2)), np.nan,
                     dtype=np.float64)  # fmt: skip
    padded[..., :h, :w] = values
    blocks = padded.reshape(*values.shape[:-2], padded.shape[-2] // 2, 2, padded.shape[-1] // 2, 2)
    n = (~np.isnan(blocks)).sum(axis=(-3, -1))
    with np.errstate(invalid="ignore"):
        mean = np.nansum(blocks, axis=(-3, -1)) / n
    return np.where(n > 0, mean, NODATA[variable]).astype(DTYPES[variable])


def stale_chunks(
    regions: Iterable[TileRegion], level: int, chunk: tuple[int, int], shape: tuple[int, int]
) -> list[tuple[slice, slice]]:
    """The chunks of level ``level`` (chunk shape ``chunk``, array ``shape``) over the
    footprints of the tile ``regions`` (level-0 pixels)."""
    f = 2**level
    ch, cw = chunk
    out = set()
    for region in regions:
        r0, r1 = region.row_off // f, math.ceil((region.row_off + region.height) / f)
        c0, c1 = region.col_off // f, math.ceil((region.col_off + region.width) / f)
        for r in range(r0 - r0 % ch, min(r1, shape[0]), ch):
            for c in range(c0 - c0 % cw, min(c1, shape[1]), cw):
                out.add((r, c))
    return [
        (slice(r, min(r + ch, shape[0])), slice(c, min(c + cw, shape[1]))) for r, c in sorted(out)
    ]


def downsample_levels(session, levels: list[tuple[int, list[tuple[slice, slice]]]], variables):
    """A task: :func:`downsample_chunk` for each ``(level, chunks)`` in turn, finest first, in
    one ``session``: each level reads the one before it from the session's own writes.  A task
    of the overviews: some chunks of one level, or the coarse levels of a map together, whose
    stale chunks are few (one task and one commit instead of one per level).  Returns the
    session."""
    for level, chunks in levels:
        downsample_chunk(session, level, chunks, variables)
    return session


def downsample_chunk(session, level: int, chunks: list[tuple[slice, slice]], variables):
    """A task: the ``chunks`` of level ``level`` from level ``level - 1``, for ``variables``,
    in ``session`` (a fork of a writable session of the map).  Returns the session."""
    import zarr

    root = zarr.open_group(session.store, mode="r+")
    src, dst = root[str(level - 1)], root[str(level)]
    for rows, cols in chunks:
        r = slice(2 * rows.start, 2 * rows.stop)
        c = slice(2 * cols.start, 2 * cols.stop)
        for var in variables:
            small = downsample(src[var][..., r, c], var)
            h, w = rows.stop - rows.start, cols.stop - cols.start
            dst[var][..., rows, cols] = small[..., :h, :w]
    return session
