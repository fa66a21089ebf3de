"""The output schema, declared once: variables, dtypes, nodata, the class axis, the store grid,
and how a window's outputs travel between Dask tasks (packed into one float32 array).

Variables (Zarr store and COGs)::

    probability    (class_name, y, x) float32   NaN = not predicted; all classes in one chunk
    class          (y, x) uint8                 255 = not predicted (multi-class models only)
    valid_obs      (y, x) uint16                valid observations used (0 = not predicted)
    last_obs_valid (y, x) uint8                 1 newest scene valid, 0 screened, 255 not predicted

The class axis is called ``class_name`` and not ``class``: a dimension named like the ``class``
variable makes xarray turn that variable into a 2-D coordinate of every other variable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import OutputError

__all__ = [
    "CLASS_DIM",
    "CLASS_NODATA",
    "COG_NODATA",
    "DESCRIPTIONS",
    "DTYPES",
    "NODATA",
    "VARIABLES",
    "OutputGrid",
    "TileRegion",
    "empty_outputs",
    "pack_outputs",
    "predicted_pixels",
    "unpack_outputs",
]

VARIABLES = ("probability", "class", "valid_obs", "last_obs_valid")
#: nodata of ``class`` (and ``last_obs_valid``): class ids start at 0, so 0 cannot be nodata
CLASS_NODATA = 255
NODATA = {
    "probability": float("nan"),
    "class": CLASS_NODATA,
    "valid_obs": 0,
    "last_obs_valid": CLASS_NODATA,
}
DTYPES = {
    "probability": "float32",
    "class": "uint8",
    "valid_obs": "uint16",
    "last_obs_valid": "uint8",
}
#: name of the class axis of ``probability`` (and of the coordinate holding the class names)
CLASS_DIM = "class_name"
#: nodata written into the COGs (None: the band has no nodata value; 0 is a real count)
COG_NODATA = {
    "probability": float("nan"),
    "class": CLASS_NODATA,
    "valid_obs": None,
    "last_obs_valid": CLASS_NODATA,
}
DESCRIPTIONS = {
    "probability": "class probability from the model (NaN = not predicted)",
    "class": f"most probable class (index into class_names; {CLASS_NODATA} = not predicted)",
    "valid_obs": "number of valid observations used by the model (0 = not predicted)",
    "last_obs_valid": f"1 = newest scene valid, 0 = screened or nodata, {CLASS_NODATA} = not "
    "predicted",
}


@dataclass(frozen=True)
class OutputGrid:
    """The store's grid: CRS, upper-left affine, size, chunk (= window shape) and classes."""

    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int
    chunk: tuple[int, int]
    class_names: tuple[str, ...]
    multiclass: bool

    def __post_init__(self) -> None:
        if min(self.width, self.height, *self.chunk) <= 0 or not self.class_names:
            raise OutputError(
                f"invalid output grid {self}: sizes, chunk and class names must be non-empty"
            )
        if self.multiclass and len(self.class_names) > CLASS_NODATA:
            raise OutputError(
                f"{len(self.class_names)} classes do not fit the uint8 class map (at most "
                f"{CLASS_NODATA}, as {CLASS_NODATA} is its nodata); use a model with fewer classes"
            )

    def variables(self) -> tuple[str, ...]:
        """The variables of the store: :data:`VARIABLES` without ``class`` for binary models."""
        return tuple(v for v in VARIABLES if self.multiclass or v != "class")

    def to_attrs(self) -> dict:
        """JSON-compatible description, stored in the Zarr root attributes."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_attrs(cls, attrs: dict) -> OutputGrid:
        return cls(
            crs_wkt=attrs["crs_wkt"],
            transform=tuple(attrs["transform"]),
            width=int(attrs["width"]),
            height=int(attrs["height"]),
            chunk=tuple(attrs["chunk"]),
            class_names=tuple(attrs["class_names"]),
            multiclass=bool(attrs["multiclass"]),
        )


@dataclass(frozen=True)
class TileRegion:
    """Position of one tile in the store grid (pixels)."""

    tile: str
    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.row_off, self.row_off + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.col_off, self.col_off + self.width)


def empty_outputs(n_classes: int, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """The outputs of a window where nothing is predicted: nodata everywhere."""
    out = {}
    for var in VARIABLES:
        full = (n_classes, *shape) if var == "probability" else shape
        out[var] = np.full(full, NODATA[var], dtype=DTYPES[var])
    return out


def pack_outputs(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """All outputs of a window in one float32 array (C + 3, h, w); integers are exact in float32."""
    return np.concatenate(
        [
            outputs["probability"],
            outputs["class"][None].astype(np.float32),
            outputs["valid_obs"][None].astype(np.float32),
            outputs["last_obs_valid"][None].astype(np.float32),
        ]
    )


def unpack_outputs(
    packed: np.ndarray, variables: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_outputs`; only ``variables`` (default: all) are returned."""
    c = packed.shape[0] - 3
    out = {
        "probability": packed[:c],
        "class": packed[c].astype(DTYPES["class"]),
        "valid_obs": packed[c + 1].astype(DTYPES["valid_obs"]),
        "last_obs_valid": packed[c + 2].astype(DTYPES["last_obs_valid"]),
    }
    if variables is not None:
        out = {k: v for k, v in out.items() if k in variables}
    return out


def predicted_pixels(packed: np.ndarray) -> int:
    """How many pixels of a packed window were predicted (``last_obs_valid`` is not nodata)."""
    return int(np.count_nonzero(packed[-1] != NODATA["last_obs_valid"]))
