"""Uncertainty of class probabilities, as e-sensing/sits defines it (REFERENCE.md section 6).

For the class probabilities ``p_1 .. p_n`` of a pixel:

* ``entropy``: ``-sum_{p_i > 0} p_i ln(p_i) / ln(n)`` (0 = certain, 1 = uniform);
* ``margin``: ``1 - (p_max - p_second)``;
* ``least`` (least confidence): ``1 - p_max``.

Computed in the prediction kernel from the probabilities it has just made (no second read of
the cube or the map), in float64, stored as float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import OutputError
from .schema import UNCERTAINTY

__all__ = ["uncertainty"]


def uncertainty(probs: np.ndarray, layers: Sequence[str] = UNCERTAINTY) -> dict[str, np.ndarray]:
    """The uncertainty ``layers`` of ``probs`` (N, n_classes), each (N,) float32."""
    unknown = [v for v in layers if v not in UNCERTAINTY]
    if unknown:
        raise OutputError(f"unknown uncertainty layer(s) {unknown}; use {', '.join(UNCERTAINTY)}")
    p = np.asarray(probs, dtype=np.float64)
    n = p.shape[1]
    if n < 2:
        raise OutputError("uncertainty needs at least two classes")
    out = {}
    if "entropy" in layers:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        out["entropy"] = (-terms.sum(axis=1) / np.log(n)).astype(np.float32)
    if "margin" in layers or "least" in layers:
        top2 = np.partition(p, n - 2, axis=1)[:, n - 2 :]  # (second, highest)
        if "margin" in layers:
            out["margin"] = (1.0 - (top2[:, 1] - top2[:, 0])).astype(np.float32)
        if "least" in layers:
            out["least"] = (1.0 - top2[:, 1]).astype(np.float32)
    return {v: out[v] for v in layers}
