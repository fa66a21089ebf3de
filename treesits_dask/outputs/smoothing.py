"""Bayesian smoothing of class probabilities with the semantics of e-sensing/sits
``sits_smooth`` (REFERENCE.md section 6), across window and tile borders.

The kernel (:func:`bayes_smooth`), per pixel and class:

1. probabilities are clamped to ``[1e-6, 1 - 1e-6]``;
2. logit ``x_k = ln(p_k / (sum_j p_j - p_k))`` (a binary model's one probability ``p`` is the
   two-class map ``(p, 1 - p)``: ``x = ln(p / (1 - p))``);
3. the ``window_size`` x ``window_size`` neighbourhood (the pixel included) without NaN; with
   ``neigh_fraction < 1`` the ``ceil(neigh_fraction * count)`` highest logits; their mean ``m0``
   and sample variance ``s0`` (n - 1; a single value has no variance: taken as 0);
4. ``m0`` where the pixel's logit is NaN or ``s0 < 1e-4``, else ``w x0 + (1 - w) m0`` with
   ``w = s0 / (s0 + smoothness_k)``;
5. back with ``exp(v) / (1 + exp(v))``; no renormalisation; the class is the argmax.

Pixels that were not predicted (outside the forest mask, no valid observation) stay not
predicted: they are sits's ``exclusion_mask`` (their neighbours' values fill the neighbourhoods of
others only where they exist).

Where the halo comes from (:func:`padded_region`): inside the map a pixel's neighbourhood reaches
into the neighbouring tiles (no seam at tile edges); only at the edge of the covered area (where
the neighbouring tile is not in the map) indices are mirrored as sits mirrors them at image edges
(``-1 -> 0``, ``-2 -> 1``, ...: the border pixel is repeated once).  A corner outside the covered
area mirrors the side neighbour that exists (the tile above or below first), or the tile itself.
For a rectangular covered area this is exactly sits's mirroring of the mosaic; a tile's smoothed
values depend on its eight neighbours only, so a changed tile changes its own values and a strip
of ``window_size // 2`` pixels along its border in each neighbour (:func:`stale_rectangles`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import OutputError
from .schema import CLASS_NODATA, TileRegion

__all__ = [
    "CLAMP",
    "DIRECTIONS",
    "STATE_ATTR",
    "VARIANCE_GUARD",
    "SmoothParams",
    "bayes_smooth",
    "logits",
    "neighbour_tile",
    "padded_region",
    "present_neighbours",
    "smooth_region",
    "smooth_tile",
    "smoothing_state",
    "smoothing_work",
    "stale_rectangles",
]

#: probabilities are clamped to [CLAMP, 1 - CLAMP] before the logit (current sits)
CLAMP = 1e-6
#: below this prior variance the result is the prior mean (recent sits)
VARIANCE_GUARD = 1e-4
#: the eight neighbour tiles, as (rows, cols) tile offsets
DIRECTIONS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))
#: values per row block of the kernel (bounds its memory: ~8 bytes each, a few copies)
_BLOCK_VALUES = 1 << 22


@dataclass(frozen=True)
class SmoothParams:
    """The smoothing parameters, one smoothness per class."""

    window_size: int
    neigh_fraction: float
    smoothness: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.window_size < 1 or self.window_size % 2 == 0:
            raise OutputError(f"window_size {self.window_size} must be odd and positive")
        if not 0 < self.neigh_fraction <= 1:
            raise OutputError(f"neigh_fraction {self.neigh_fraction} must be in (0, 1]")

    @property
    def leg(self) -> int:
        """Pixels of halo on each side: ``window_size // 2``."""
        return self.window_size // 2

    def to_json(self) -> dict:
        return {
            "window_size": self.window_size,
            "neigh_fraction": self.neigh_fraction,
            "smoothness": list(self.smoothness),
        }


def logits(probs: np.ndarray) -> np.ndarray:
    """sits's logits of probabilities (C, ...) after clamping, float64; NaN stays NaN.  One class
    (a sigmoid model) is the two-class map (p, 1 - p)."""
    p = np.clip(np.asarray(probs, dtype=np.float64), CLAMP, 1.0 - CLAMP)
    if p.shape[0] == 1:
        return np.log(p / (1.0 - p))
    return np.log(p / (p.sum(axis=0, keepdims=True) - p))


def bayes_smooth(padded: np.ndarray, params: SmoothParams) -> np.ndarray:
    """Smoothed logits (C, H, W) float64 of the logits ``padded`` (C, H + 2 leg, W + 2 leg):
    every output pixel with its full neighbourhood inside ``padded`` (NaN = no value)."""
    from numpy.lib.stride_tricks import sliding_window_view

    ws, leg = params.window_size, params.leg
    c_, hp, wp = padded.shape
    h, w = hp - 2 * leg, wp - 2 * leg
    if h <= 0 or w <= 0:
        raise OutputError(f"a padded block of {hp} x {wp} px has no pixel to smooth")
    if len(params.smoothness) != c_:
        raise OutputError(f"{len(params.smoothness)} smoothness values for {c_} classes")
    n = ws * ws
    out = np.empty((c_, h, w), dtype=np.float64)
    rows = max(1, _BLOCK_VALUES // (w * n))
    idx = np.arange(n)
    for k in range(c_):
        x = np.asarray(padded[k], dtype=np.float64)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            win = sliding_window_view(x[r0 : r1 + 2 * leg], (ws, ws)).reshape(r1 - r0, w, n)
            count = n - np.isnan(win).sum(axis=-1)
            vals = np.sort(win, axis=-1)  # ascending, NaN last: the highest are before the NaN
            if params.neigh_fraction < 1:
                keep = np.ceil(params.neigh_fraction * count).astype(np.int64)
            else:
                keep = count
            chosen = (idx >= (count - keep)[..., None]) & (idx < count[..., None])
            with np.errstate(invalid="ignore", divide="ignore"):
                m0 = np.where(chosen, vals, 0.0).sum(axis=-1) / keep
                dev = np.where(chosen, vals - m0[..., None], 0.0)
                s0 = np.where(keep > 1, (dev * dev).sum(axis=-1) / (keep - 1), 0.0)
                x0 = x[r0 + leg : r1 + leg, leg : leg + w]
                wt = s0 / (s0 + params.smoothness[k])
                post = wt * x0 + (1.0 - wt) * m0
            out[k, r0:r1] = np.where(np.isnan(x0) | (s0 < VARIANCE_GUARD), m0, post)
    return out


def smooth_region(padded_probs: np.ndarray, params: SmoothParams) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed probabilities (C, H, W) float32 and classes (H, W) uint8 of the probabilities
    ``padded_probs`` (C, H + 2 leg, W + 2 leg) (float, NaN = not predicted).  Pixels whose own
    probability is NaN stay NaN (class 255)."""
    leg = params.leg
    v = bayes_smooth(logits(padded_probs), params)
    with np.errstate(over="ignore"):
        e = np.exp(v)
        smoothed = e / (1.0 + e)
    smoothed = np.where(np.isinf(e), 1.0, smoothed)
    center = padded_probs[:, leg : padded_probs.shape[1] - leg, leg : padded_probs.shape[2] - leg]
    missing = np.isnan(center).any(axis=0)
    smoothed[:, missing] = np.nan
    classes = np.full(missing.shape, CLASS_NODATA, dtype=np.uint8)
    if len(smoothed) > 1:
        filled = np.where(np.isnan(smoothed), -np.inf, smoothed)
        classes[~missing] = np.argmax(filled, axis=0)[~missing].astype(np.uint8)
    return smoothed.astype(np.float32), classes


def neighbour_tile(tile: str, dy: int, dx: int) -> str | None:
    """The id of the tile ``dy`` rows and ``dx`` columns of tiles away (None west or north of
    the grid origin)."""
    x, y = int(tile[1:5]), int(tile[7:11])
    if x + dx < 0 or y + dy < 0:
        return None
    return f"X{x + dx:04d}_Y{y + dy:04d}"


def _source(index: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile offset (-1, 0, 1) of map indices relative to [lo, hi) and the mirrored index."""
    side = np.where(index < lo, -1, np.where(index >= hi, 1, 0))
    mirrored = np.where(index < lo, 2 * lo - index - 1, np.where(index >= hi, 2 * hi - index - 1,
                                                                index))  # fmt: skip
    return side, mirrored


def padded_region(
    read: Callable[[slice, slice], np.ndarray],
    region: TileRegion,
    rows: slice,
    cols: slice,
    leg: int,
    present: dict[tuple[int, int], bool],
    shape: tuple[int, int],
) -> np.ndarray:
    """The probabilities (C, h + 2 leg, w + 2 leg) around ``rows`` x ``cols`` (relative to the
    tile ``region``) that the smoothing of that rectangle needs: from the map where the tile or
    its neighbour is in it (``present[(dy, dx)]``), mirrored at the edge of the covered area (see
    the module's docstring).  ``read(rows, cols)`` returns (C, h, w) map values of absolute rows
    and columns; ``shape`` is the map's (height, width)."""
    if leg > min(region.height, region.width):
        raise OutputError(
            f"a smoothing window of {2 * leg + 1} px reaches beyond the neighbouring tiles of "
            f"{region.height} x {region.width} px; use a smaller smoothing.window_size"
        )
    top, bottom = region.row_off, region.row_off + region.height
    left, right = region.col_off, region.col_off + region.width
    r_abs = np.arange(top + rows.start - leg, top + rows.stop + leg)
    c_abs = np.arange(left + cols.start - leg, left + cols.stop + leg)
    dy, r_mir = _source(r_abs, top, bottom)
    dx, c_mir = _source(c_abs, left, right)
    src_r = np.empty((len(r_abs), len(c_abs)), dtype=np.int64)
    src_c = np.empty_like(src_r)
    for i in (-1, 0, 1):
        for j in (-1, 0, 1):
            ri, cj = np.flatnonzero(dy == i), np.flatnonzero(dx == j)
            if not ri.size or not cj.size:
                continue
            if present.get((i, j), (i, j) == (0, 0)):
                rr, cc = r_abs[ri], c_abs[cj]
            elif i == 0 or j == 0:  # a side: mirror across the tile's edge
                rr = r_mir[ri] if i else r_abs[ri]
                cc = c_mir[cj] if j else c_abs[cj]
            elif present.get((i, 0), False):  # a corner: the neighbour above/below, mirrored
                rr, cc = r_abs[ri], c_mir[cj]
            elif present.get((0, j), False):  # ... or the neighbour left/right, mirrored
                rr, cc = r_mir[ri], c_abs[cj]
            else:  # ... or the tile itself
                rr, cc = r_mir[ri], c_mir[cj]
            src_r[np.ix_(ri, cj)] = rr[:, None]
            src_c[np.ix_(ri, cj)] = cc[None, :]
    r0, r1 = max(0, int(src_r.min())), min(shape[0], int(src_r.max()) + 1)
    c0, c1 = max(0, int(src_c.min())), min(shape[1], int(src_c.max()) + 1)
    box = np.asarray(read(slice(r0, r1), slice(c0, c1)))
    return box[:, src_r - r0, src_c - c0]


def stale_rectangles(
    region: TileRegion, leg: int, changed: Sequence[tuple[int, int]] | None
) -> list[tuple[slice, slice]]:
    """The rectangles of a tile (relative rows, cols) whose smoothed values change when its
    neighbours in ``changed`` (tile offsets) change; None: the whole tile."""
    if changed is None:
        return [(slice(0, region.height), slice(0, region.width))]
    h, w = region.height, region.width
    span = {-1: slice(0, leg), 0: slice(0, h), 1: slice(h - leg, h)}
    cspan = {-1: slice(0, leg), 0: slice(0, w), 1: slice(w - leg, w)}
    out = []
    for dy, dx in changed:
        rect = (span[dy] if dy else slice(0, h), cspan[dx] if dx else slice(0, w))
        if not any(_inside(rect, o) for o in out):
            out = [o for o in out if not _inside(o, rect)] + [rect]
    return out


def _inside(a: tuple[slice, slice], b: tuple[slice, slice]) -> bool:
    """Whether rectangle ``a`` lies within ``b``."""
    return all(x.start >= y.start and x.stop <= y.stop for x, y in zip(a, b, strict=True))


# --------------------------------------------------------------------------------- in the map
#: attribute of a tile's group (``_tiles/<tile>``) naming what its smoothed values were made from
STATE_ATTR = "smoothing"


def _key(direction: tuple[int, int]) -> str:
    return f"{direction[0]},{direction[1]}"


def smoothing_state(tile: str, records: dict[str, dict], params: SmoothParams) -> dict:
    """What a tile's smoothed values depend on: the parameters, its own record and those of its
    eight neighbours (None where a neighbour is not in the map)."""
    from ..state.ledger import config_digest

    return {
        "params": config_digest(params.to_json()),
        "record": records[tile]["record_id"],
        "neighbours": {
            _key(d): (records.get(neighbour_tile(tile, *d) or "") or {}).get("record_id")
            for d in DIRECTIONS
        },
    }


def smoothing_work(
    records: dict[str, dict], states: dict[str, dict], params: SmoothParams
) -> dict[str, list[tuple[int, int]] | None]:
    """The tiles whose smoothed values are not those of the map as it is: ``tile -> None`` (the
    whole tile: new parameters or a new record of its own) or the neighbour offsets whose record
    changed (only the strips along them change, :func:`stale_rectangles`)."""
    work: dict[str, list[tuple[int, int]] | None] = {}
    for tile in sorted(records):
        new, old = smoothing_state(tile, records, params), states.get(tile)
        if old == new:
            continue
        if not old or old.get("params") != new["params"] or old.get("record") != new["record"]:
            work[tile] = None
        else:
            work[tile] = [
                d for d in DIRECTIONS
                if (old.get("neighbours") or {}).get(_key(d)) != new["neighbours"][_key(d)]
            ]  # fmt: skip
    return work


def smooth_tile(
    session,
    region: TileRegion,
    changed: list[tuple[int, int]] | None,
    present: dict[tuple[int, int], bool],
    params: SmoothParams,
    band_rows: int,
):
    """A task: the smoothed layers of ``region`` (the whole tile, or the strips along the
    neighbours in ``changed``) from the probabilities in ``session`` (a fork of a writable session
    of the map, pickled to the task), written into it, in bands of ``band_rows`` rows (bounded
    memory).  Returns the session, for the driver to merge."""
    from .store import data_group

    group = data_group(session.store, "r+")
    prob = group["probability"]
    shape = prob.shape[-2:]

    def read(rows: slice, cols: slice) -> np.ndarray:
        return prob[:, rows, cols]

    smoothed = group["probability_smoothed"]
    classes = group["class_smoothed"] if "class_smoothed" in group.array_keys() else None
    for rows, cols in stale_rectangles(region, params.leg, changed):
        for r0 in range(rows.start, rows.stop, band_rows):
            band = slice(r0, min(rows.stop, r0 + band_rows))
            p, k = smooth_region(
                padded_region(read, region, band, cols, params.leg, present, shape), params
            )
            r = slice(region.row_off + band.start, region.row_off + band.stop)
            c = slice(region.col_off + cols.start, region.col_off + cols.stop)
            smoothed[:, r, c] = p
            if classes is not None:
                classes[r, c] = k
    return session


def present_neighbours(tile: str, records: dict[str, dict]) -> dict[tuple[int, int], bool]:
    """Which of the tile's neighbours (and itself) are in the map."""
    out = {(0, 0): True}
    for d in DIRECTIONS:
        out[d] = (neighbour_tile(tile, *d) or "") in records
    return out
