"""FORCE QAI bits (REFERENCE.md section 1): which observations a set of flags screens out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["qai_invalid"]

# QAI bit layout (REFERENCE.md section 1): (shift, mask, value that is flagged) per flag name.
_QAI_FIELDS = {
    "NODATA": (0, 1, 1),
    "CLOUD_BUFFER": (1, 3, 1),
    "CLOUD_OPAQUE": (1, 3, 2),
    "CLOUD_CIRRUS": (1, 3, 3),
    "CLOUD_SHADOW": (3, 1, 1),
    "SNOW": (4, 1, 1),
    "WATER": (5, 1, 1),
    "AEROSOL_INT": (6, 3, 1),
    "AEROSOL_HIGH": (6, 3, 2),
    "AEROSOL_FILL": (6, 3, 3),
    "SUBZERO": (8, 1, 1),
    "SATURATION": (9, 1, 1),
    "SUN_LOW": (10, 1, 1),
    "ILLUMINATION_MEDIUM": (11, 3, 1),
    "ILLUMINATION_POOR": (11, 3, 2),
    "ILLUMINATION_SHADOW": (11, 3, 3),
    "SLOPE": (13, 1, 1),
    "WVP_FILL": (14, 1, 1),
}


def qai_invalid(qai: np.ndarray, flags: Sequence[str]) -> np.ndarray:
    """Boolean array: True where any of ``flags`` is set in the FORCE QAI values."""
    q = (
        np.asarray(qai).view(np.uint16)
        if np.asarray(qai).dtype == np.int16
        else np.asarray(qai, np.uint16)
    )
    out = np.zeros(q.shape, dtype=bool)
    for flag in flags:
        shift, mask, value = _QAI_FIELDS[flag]
        out |= ((q >> shift) & mask) == value
    return out
