"""Synthetic FORCE Level-2 datacubes with real folder and file names, for the demo, tests and
benchmarks: :func:`make_cube` (:mod:`.cube`) with species phenologies, clouds and QAI flags
(:mod:`.phenology`), and the known answers (species map, forest mask)."""

from .cube import (
    FORCE_LAEA_WKT,
    ORIGIN,
    PRJ_WKTS,
    SPECIES,
    SyntheticCube,
    make_cube,
    sample_pixels,
)

__all__ = [
    "FORCE_LAEA_WKT",
    "ORIGIN",
    "PRJ_WKTS",
    "SPECIES",
    "SyntheticCube",
    "make_cube",
    "sample_pixels",
]
