"""Numpy kernels of the synthetic FORCE cube generator (:mod:`treesits_dask.synthetic`).

Smooth random fields (species stands, crop parcels, clouds), per-class phenology curves, and the
rendering of one acquisition into FORCE BOA (int16 reflectance x 10000) and QAI bits.  Everything
is vectorised over the tile; randomness comes only from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

NODATA = -9999
NON_FOREST = 255
N_BANDS = 10

# QAI bits (REFERENCE.md section 1)
Q_NODATA = 1 << 0
Q_CLOUD_BUFFER = 1 << 1  # cloud field (bits 1-2) = 1
Q_CLOUD_OPAQUE = 2 << 1  # = 2
Q_CIRRUS = 3 << 1  # = 3
Q_SHADOW = 1 << 3
Q_SNOW = 1 << 4
Q_AEROSOL_INTERPOLATED = 1 << 6
Q_SUBZERO = 1 << 8

# Reflectance x 10000 in FORCE band order (BLUE GREEN RED RE1 RE2 RE3 BNIR NIR SWIR1 SWIR2):
# dormant (winter) and peak (summer) state per class; row 5 is non-forest (crop / grassland).
_WINTER = np.array(
    [
        [150, 300, 200, 500, 1200, 1500, 1600, 1700, 900, 400],  # 0 Spruce
        [350, 500, 550, 800, 1200, 1400, 1600, 1700, 2000, 1200],  # 1 Beech (leaf-off)
        [250, 420, 360, 700, 1300, 1600, 1700, 1800, 1450, 780],  # 2 Pine
        [120, 250, 150, 420, 1100, 1400, 1500, 1600, 750, 300],  # 3 Douglas fir
        [380, 560, 620, 860, 1250, 1450, 1650, 1750, 2250, 1450],  # 4 Oak (leaf-off)
        [600, 850, 1000, 1300, 1600, 1800, 2000, 2100, 2800, 2200],  # 5 bare soil / stubble
    ],
    dtype=np.float32,
)
_SUMMER = np.array(
    [
        [200, 400, 200, 600, 1600, 2000, 2100, 2250, 1000, 450],
        [250, 560, 280, 860, 2900, 3800, 4000, 4200, 1700, 700],
        [280, 480, 350, 750, 1700, 2100, 2200, 2350, 1500, 800],
        [160, 380, 170, 550, 1950, 2550, 2750, 2900, 850, 330],
        [270, 520, 330, 850, 2400, 3100, 3300, 3450, 1900, 850],
        [300, 600, 300, 900, 3200, 4200, 4500, 4600, 2000, 900],
    ],
    dtype=np.float32,
)
# green-up day of year, senescence day of year, green-up and senescence widths (days)
_TIMING = np.array(
    [
        [135, 285, 12, 15],
        [118, 290, 5, 8],
        [130, 280, 12, 15],
        [125, 290, 10, 12],
        [142, 302, 8, 10],
    ],
    dtype=np.float32,
)

#: a fresh clear-cut (bare soil, slash and stumps): brighter than every forest state in the
#: visible, red-edge 1 and short-wave infrared bands, in every season
CLEARCUT = np.array([950, 1200, 1600, 1750, 1950, 2050, 2200, 2300, 3400, 2900], dtype=np.float32)

_SNOW = np.array([7500, 7400, 7200, 7000, 6800, 6500, 6200, 6000, 600, 400], dtype=np.float32)
_HAZE = np.array([900, 850, 800, 760, 720, 700, 680, 660, 450, 300], dtype=np.float32)
_CIRRUS = np.array([420, 400, 380, 370, 360, 350, 340, 330, 300, 220], dtype=np.float32)
_ATMOS_SD = np.array([40, 30, 25, 20, 15, 15, 15, 15, 10, 10], dtype=np.float32)


def value_noise(
    rng: np.random.Generator, shape: tuple[int, int], scale: float, octaves: int = 2
) -> np.ndarray:
    """Smooth random field (float32, zero mean) with features about ``scale`` pixels wide."""
    h, w = shape
    out = np.zeros(shape, dtype=np.float32)
    amp = 1.0
    for _ in range(octaves):
        s = max(float(scale), 1.0)
        gh, gw = int(np.ceil(h / s)) + 2, int(np.ceil(w / s)) + 2
        grid = rng.standard_normal((gh, gw), dtype=np.float32)
        off_y, off_x = rng.random(2)
        rows = _interp_axis(grid, (np.arange(h) + 0.5) / s + off_y, axis=0)  # (h, gw)
        out += amp * _interp_axis(rows, (np.arange(w) + 0.5) / s + off_x, axis=1)
        amp *= 0.5
        scale = scale / 2
    return out


def _interp_axis(a: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    i0 = np.floor(pos).astype(np.intp)
    t = (pos - i0).astype(np.float32)
    t = t * t * (3 - 2 * t)  # smoothstep: no visible grid lines
    if axis == 0:
        return a[i0] * (1 - t)[:, None] + a[i0 + 1] * t[:, None]
    return a[:, i0] * (1 - t) + a[:, i0 + 1] * t


def top_fraction(field: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask of the ``fraction`` of pixels with the highest values (exact count)."""
    n = field.size
    k = round(min(max(fraction, 0.0), 1.0) * n)
    if k <= 0:
        return np.zeros(field.shape, dtype=bool)
    if k >= n:
        return np.ones(field.shape, dtype=bool)
    thr = np.partition(field.ravel(), n - k)[n - k]
    return field >= thr


def _quantile_mask(field: np.ndarray, fraction: float) -> np.ndarray:
    """Approximate ``top_fraction`` from a subsample (fast, for per-scene clouds)."""
    if fraction <= 0:
        return np.zeros(field.shape, dtype=bool)
    if fraction >= 1:
        return np.ones(field.shape, dtype=bool)
    return field > np.quantile(field[::3, ::3], 1.0 - fraction)


def species_map(
    rng: np.random.Generator,
    size: int,
    forest_fraction: float,
    n_classes: int,
    forest_scale: float | None = None,
) -> np.ndarray:
    """(size, size) uint8 species id in coherent stands, ``NON_FOREST`` (255) elsewhere.

    ``forest_scale``: width of the forest patches in pixels (default ``size / 5``, at most 60).
    """
    shape = (size, size)
    scale = forest_scale if forest_scale else max(6.0, min(size / 5, 60.0))
    forest = top_fraction(value_noise(rng, shape, scale, 3), forest_fraction)
    stand = max(4.0, min(size / 8, 30.0))
    fields = np.stack([value_noise(rng, shape, stand) for _ in range(n_classes)])
    out = np.argmax(fields, axis=0).astype(np.uint8)
    out[~forest] = NON_FOREST
    return out


@dataclass
class TileSignal:
    """Per-pixel phenology parameters of one tile (float32 arrays)."""

    winter: np.ndarray  # (10, H, W) dormant reflectance
    amp: np.ndarray  # (10, H, W) peak - dormant
    sos: np.ndarray  # (H, W) green-up day of year
    eos: np.ndarray  # (H, W) senescence day of year
    k_up: np.ndarray  # (H, W)
    k_down: np.ndarray  # (H, W)
    forest: np.ndarray  # (H, W) bool


def tile_signal(rng: np.random.Generator, species: np.ndarray) -> TileSignal:
    """Per-pixel parameters: class curves + persistent per-pixel brightness and timing offsets."""
    h, w = species.shape
    forest = species != NON_FOREST
    cls = np.where(forest, species, 5).astype(np.intp)
    bright = np.exp(rng.normal(0.0, 0.07, (h, w))).astype(np.float32)
    band_f = 1 + 0.03 * rng.standard_normal((N_BANDS, h, w), dtype=np.float32)
    factor = band_f * bright
    winter = _WINTER.T[:, cls] * factor
    amp = (_SUMMER - _WINTER).T[:, cls] * factor
    timing = _TIMING[np.minimum(cls, 4)]  # non-forest rows are replaced below
    sos = timing[..., 0] + rng.normal(0, 4, (h, w)).astype(np.float32)
    eos = timing[..., 1] + rng.normal(0, 4, (h, w)).astype(np.float32)
    k_up, k_down = timing[..., 2].copy(), timing[..., 3].copy()
    # crops and grassland: rectangular parcels, each with its own sowing / harvest dates and vigour
    parcel = max(4, min(h // 6, 25))
    ph, pw = -(-h // parcel), -(-w // parcel)
    p_sos = rng.uniform(80, 170, (ph, pw)).astype(np.float32)
    p_len = rng.uniform(55, 120, (ph, pw)).astype(np.float32)
    p_vig = rng.uniform(0.45, 1.1, (ph, pw)).astype(np.float32)
    ri, ci = np.arange(h)[:, None] // parcel, np.arange(w)[None, :] // parcel
    nf = ~forest
    sos[nf] = p_sos[ri, ci][nf]
    eos[nf] = (p_sos + p_len)[ri, ci][nf]
    k_up[nf], k_down[nf] = 6.0, 4.0
    amp[:, nf] *= p_vig[ri, ci][nf]
    return TileSignal(winter, amp, sos, eos, k_up, k_down, forest)


@dataclass(frozen=True)
class Weather:
    """Scene-wide conditions of one acquisition date (shared by all tiles)."""

    cover: float  # fraction of pixels flagged as cloud, buffer, cirrus or shadow
    full: bool  # fully clouded
    snow: float  # fraction of clear pixels under snow (winter only)
    edge: float  # 0 or the fraction of the tile beyond the swath edge (nodata)
    aerosol_interpolated: bool
    atmos: tuple[float, ...]  # additive per-band offset
    green_shift: float  # the year's phenology shift (days)


def weather_for_dates(
    rng: np.random.Generator, dates: Sequence[dt.date], cloud_fraction: float
) -> list[Weather]:
    """Per-date weather; the mean flagged fraction over the dates is about ``cloud_fraction``."""
    n = len(dates)
    full = np.zeros(n, dtype=bool)
    if cloud_fraction >= 1:
        full[:] = True
    elif cloud_fraction > 0 and n >= 5:
        n_full = max(1, round(0.06 * n))
        while n_full and (cloud_fraction * n - n_full) / (n - n_full) < 0.02:
            n_full -= 1
        full[rng.choice(n, n_full, replace=False)] = True
    n_rest = int((~full).sum())
    rest_mean = (cloud_fraction * n - full.sum()) / n_rest if n_rest else 0.0
    rest_mean = float(min(max(rest_mean, 0.0), 0.9))
    if rest_mean > 0:
        k = 1.5
        cover = rng.beta(rest_mean * k, (1 - rest_mean) * k, n)
    else:
        cover = np.zeros(n)
    cover = np.clip(cover, 0.0, 0.95)
    years = sorted({d.year for d in dates})
    year_shift = dict(zip(years, rng.normal(0, 4, len(years)), strict=True))
    out = []
    for i, d in enumerate(dates):
        winter = d.month in (12, 1, 2) or (d.month == 3 and d.day <= 15)
        snow = float(rng.uniform(0.2, 0.8)) if winter and rng.random() < 0.35 else 0.0
        edge = float(rng.uniform(0.05, 0.4)) if rng.random() < 0.1 else 0.0
        out.append(
            Weather(
                cover=1.0 if full[i] else float(cover[i]),
                full=bool(full[i]),
                snow=snow,
                edge=edge,
                aerosol_interpolated=bool(rng.random() < 0.3),
                atmos=tuple(float(v) for v in rng.normal(0, 1, N_BANDS) * _ATMOS_SD),
                green_shift=float(year_shift[d.year]),
            )
        )
    return out


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``mask`` moved by (dy, dx) pixels, zero-filled."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def render_scene(
    rng: np.random.Generator,
    sig: TileSignal,
    weather: Weather,
    doy: int,
    cut: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One acquisition: BOA (10, H, W) int16 and QAI (H, W) int16; pixels of ``cut`` (H, W)
    bool were clear-cut before it (bare soil, :data:`CLEARCUT`, no phenology)."""
    h, w = sig.sos.shape
    if weather.full:
        qai = np.full((h, w), Q_NODATA | Q_CLOUD_OPAQUE, dtype=np.uint16)
        return np.full((N_BANDS, h, w), NODATA, dtype=np.int16), qai.view(np.int16)
    t = np.float32(doy - weather.green_shift)
    g = 1 / (1 + np.exp((sig.sos - t) / sig.k_up)) - 1 / (1 + np.exp((sig.eos - t) / sig.k_down))
    val = sig.amp * g
    val += sig.winter  # (the same float32 sums as winter + amp * g, without a temporary)
    if cut is not None and cut.any():  # no random draw: other pixels stay byte-identical
        val[:, cut] = CLEARCUT[:, None]
    noise = rng.standard_normal(val.shape, dtype=np.float32)
    spread = val * np.float32(0.03)
    spread += np.float32(25)
    noise *= spread
    val += noise
    del noise, spread
    val += np.asarray(weather.atmos, dtype=np.float32)[:, None, None]
    qai = np.zeros((h, w), dtype=np.uint16)
    if weather.aerosol_interpolated:
        qai |= Q_AEROSOL_INTERPOLATED
    edge = np.zeros((h, w), dtype=bool)
    if weather.edge > 0:  # beyond the swath edge: a corner cut off diagonally
        yy, xx = np.ogrid[:h, :w]
        edge = (yy / h + xx / w) < 2 * np.sqrt(weather.edge / 2)
    nodata = edge.copy()
    c = weather.cover
    if c > 0:
        scale = max(6.0, min(h / 4, 80.0))
        f = value_noise(rng, (h, w), scale)
        core = _quantile_mask(f, 0.5 * c)
        buffer = _quantile_mask(f, 0.75 * c) & ~core
        cirrus = _quantile_mask(value_noise(rng, (h, w), scale / 2), 0.1 * c) & ~core & ~buffer
        step = max(2, h // 25)
        dy, dx = -int(rng.integers(step, 2 * step + 1)), -int(rng.integers(0, step + 1))
        shadow = _shift(core, dy, dx) & ~core & ~buffer & ~cirrus
        val[:, buffer] += _HAZE[:, None] * np.float32(rng.uniform(0.4, 1.0))
        val[:, cirrus] += _CIRRUS[:, None] * np.float32(rng.uniform(0.5, 1.0))
        val[:, shadow] *= np.float32(rng.uniform(0.3, 0.5))
        qai[buffer] |= Q_CLOUD_BUFFER
        qai[cirrus] |= Q_CIRRUS
        qai[shadow] |= Q_SHADOW
        qai[core] |= Q_CLOUD_OPAQUE
        nodata |= core
    if weather.snow > 0:
        snow = _quantile_mask(value_noise(rng, (h, w), max(6.0, h / 3)), weather.snow)
        snow &= ((qai & 0b1110) == 0) & ~nodata
        cover = np.where(sig.forest, np.float32(0.4), np.float32(0.85))[snow]
        val[:, snow] = val[:, snow] * (1 - cover) + _SNOW[:, None] * cover
        qai[snow] |= Q_SNOW
    np.rint(val, out=val)
    np.clip(val, -1000, 16000, out=val)
    boa = val.astype(np.int16)
    del val
    qai[((boa < 0).any(axis=0)) & ~nodata] |= Q_SUBZERO
    boa[:, nodata] = NODATA
    qai[nodata] |= Q_NODATA
    qai[edge] = Q_NODATA  # no observation at all: nothing else to flag
    return boa, qai.view(np.int16)
