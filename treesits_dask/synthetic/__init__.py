"""Synthetic FORCE Level-2 datacubes with real folder and file names, for the demo, tests and
benchmarks: :func:`make_cube` (:mod:`.cube`) with species phenologies, clouds and QAI flags
(:mod:`.phenology`), clear-cuts on known dates (:class:`ClearCut`), and the known answers
(species map, forest mask, disturbance dates)."""

from .cube import (
    FORCE_LAEA_WKT,
    ORIGIN,
    PRJ_WKTS,
    SPECIES,
    ClearCut,
    SyntheticCube,
    make_cube,
    sample_pixels,
)

__all__ = [
    "FORCE_LAEA_WKT",
    "ORIGIN",
    "PRJ_WKTS",
    "SPECIES",
    "ClearCut",
    "SyntheticCube",
    "make_cube",
    "sample_pixels",
]
