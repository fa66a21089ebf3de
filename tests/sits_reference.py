"""Independent, straightforward implementations of the sits post-processing formulas of
REFERENCE.md section 6 (pixel loops, Python floats): what the tests compare the vectorised code
of :mod:`treesits_dask.outputs` with.  Nothing here is imported from the package."""

from __future__ import annotations

import math

import numpy as np


def entropy(p: list[float]) -> float:
    """-sum_{p_i > 0} p_i ln(p_i) / ln(n)."""
    return -sum(x * math.log(x) for x in p if x > 0) / math.log(len(p))


def margin(p: list[float]) -> float:
    """1 - (p_max - p_second)."""
    s = sorted(p, reverse=True)
    return 1.0 - (s[0] - s[1])


def least(p: list[float]) -> float:
    """1 - p_max."""
    return 1.0 - max(p)


def uncertainty_maps(probs: np.ndarray) -> dict[str, np.ndarray]:
    """entropy, margin and least (H, W) of probabilities (C, H, W); NaN where not predicted."""
    c, h, w = probs.shape
    out = {k: np.full((h, w), np.nan) for k in ("entropy", "margin", "least")}
    for i in range(h):
        for j in range(w):
            p = [float(probs[k, i, j]) for k in range(c)]
            if any(math.isnan(x) for x in p):
                continue
            out["entropy"][i, j] = entropy(p)
            out["margin"][i, j] = margin(p)
            out["least"][i, j] = least(p)
    return out


def _mirror(i: int, size: int, leg: int) -> int:
    """sits's index of padded position ``i`` (REFERENCE.md 6: for i < leg: leg - i - 1; past the
    end: 2 * size + leg - i - 1)."""
    if i < leg:
        return leg - i - 1
    if i >= size + leg:
        return 2 * size + leg - i - 1
    return i - leg


def bayes_smooth(
    probs: np.ndarray, window_size: int, neigh_fraction: float, smoothness: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """``sits_smooth`` of one image (C, H, W) mirrored at its edges: smoothed probabilities and
    the argmax class (255 where the pixel has no probability: the exclusion mask)."""
    c, h, w = probs.shape
    leg = window_size // 2
    # 1. clamp, 2. logit per class: ln(p_k / (sum_j p_j - p_k)); one class: (p, 1 - p)
    logit = np.full((c, h, w), np.nan)
    for i in range(h):
        for j in range(w):
            p = [float(probs[k, i, j]) for k in range(c)]
            if any(math.isnan(x) for x in p):
                continue
            p = [min(max(x, 0.000001), 0.999999) for x in p]
            total = sum(p) if c > 1 else 1.0
            for k in range(c):
                logit[k, i, j] = math.log(p[k] / (total - p[k]))
    out = np.full((c, h, w), np.nan)
    for k in range(c):
        for i in range(h):
            for j in range(w):
                # 3. the neighbourhood (mirrored at the image edge), without NaN
                neigh = []
                for a in range(i, i + window_size):
                    for b in range(j, j + window_size):
                        v = logit[k, _mirror(a, h, leg), _mirror(b, w, leg)]
                        if not math.isnan(v):
                            neigh.append(float(v))
                if not neigh:
                    continue
                if neigh_fraction < 1:
                    neigh = sorted(neigh, reverse=True)[: math.ceil(neigh_fraction * len(neigh))]
                m0 = sum(neigh) / len(neigh)
                # sample variance (n - 1); one value has none (taken as 0, see the module)
                s0 = sum((x - m0) ** 2 for x in neigh) / (len(neigh) - 1) if len(neigh) > 1 else 0.0
                x0 = float(logit[k, i, j])
                # 4. the prior mean where x0 is NaN or the variance is tiny, else the posterior
                if math.isnan(x0) or s0 < 1e-4:
                    v = m0
                else:
                    wgt = s0 / (s0 + smoothness[k])
                    v = wgt * x0 + (1 - wgt) * m0
                # 5. inverse logit, no renormalisation
                out[k, i, j] = math.exp(v) / (1 + math.exp(v))
    excluded = np.isnan(probs).any(axis=0)
    out[:, excluded] = np.nan
    classes = np.full((h, w), 255, dtype=np.uint8)
    if c > 1:
        for i in range(h):
            for j in range(w):
                if not excluded[i, j]:
                    classes[i, j] = int(np.argmax(out[:, i, j]))
    return out, classes
