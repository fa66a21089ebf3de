"""The output schema, declared once: variables, dtypes, nodata, the class axis, the store grid,
and how a window's outputs travel between Dask tasks (packed into one float32 array).

Variables (Zarr store and COGs); the first five are in every map, the others when enabled::

    probability     (class_name, y, x) float32   NaN = not predicted; all classes in one chunk
    class           (y, x) uint8                 255 = not predicted (multi-class models only)
    valid_obs       (y, x) uint16                valid observations used (0 = not predicted)
    last_obs_valid  (y, x) uint8                 1 newest scene valid, 0 screened, 255 not predicted
    last_valid_date (y, x) int32                 newest valid observation used, days since
                                                 1970-01-01 (0 = not predicted)
    entropy, margin, least (y, x) float32        uncertainty of the class probabilities (multi-
                                                 class models; ``uncertainty``), NaN = not predicted
    alert_first_seen (y, x) int32                disturbance alerts (binary models; ``alerts``):
    alert_confirmations (y, x) uint16            first-seen date (days, 0 = none), consecutive
    alert_state     (y, x) uint8                 steps at/above the threshold, state (ALERT_STATES)
    probability_smoothed (class_name, y, x) float32   Bayesian smoothing (``smoothing``)
    class_smoothed  (y, x) uint8                 argmax of probability_smoothed (multi-class)

The class axis is called ``class_name`` and not ``class``: a dimension named like the ``class``
variable makes xarray turn that variable into a 2-D coordinate of every other variable.

The prediction kernel computes every variable but the smoothed ones (those come from the stored
probabilities with a halo, :mod:`treesits_dask.outputs.smoothing`); :class:`Packing` describes
how they travel as one float32 array (integers up to 2**24 are exact in float32).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import OutputError

__all__ = [
    "ALERT_STATES",
    "ALERT_VARIABLES",
    "ALL_VARIABLES",
    "CLASS_DIM",
    "CLASS_NODATA",
    "COG_NODATA",
    "DATE_NODATA",
    "DESCRIPTIONS",
    "DTYPES",
    "KERNEL_LAYERS",
    "NODATA",
    "SMOOTHED_VARIABLES",
    "UNCERTAINTY",
    "VARIABLES",
    "OutputGrid",
    "Packing",
    "TileRegion",
    "canonical_layers",
    "empty_outputs",
    "pack_outputs",
    "predicted_pixels",
    "unpack_outputs",
]

#: the variables of every map (``class`` only for multi-class models)
VARIABLES = ("probability", "class", "valid_obs", "last_obs_valid", "last_valid_date")
#: uncertainty layers of multi-class models (REFERENCE.md section 6)
UNCERTAINTY = ("entropy", "margin", "least")
#: disturbance-alert layers of binary (sigmoid) models
ALERT_VARIABLES = ("alert_first_seen", "alert_confirmations", "alert_state")
#: Bayesian smoothing layers (``class_smoothed`` only for multi-class models)
SMOOTHED_VARIABLES = ("probability_smoothed", "class_smoothed")
#: optional layers the prediction kernel computes, in their canonical order
KERNEL_LAYERS = (*UNCERTAINTY, *ALERT_VARIABLES)
#: every variable a map can hold, in the canonical order
ALL_VARIABLES = (*VARIABLES, *UNCERTAINTY, *ALERT_VARIABLES, *SMOOTHED_VARIABLES)
#: nodata of ``class`` (and the other uint8 layers): class ids start at 0, so 0 cannot be nodata
CLASS_NODATA = 255
#: nodata of the date layers (days since 1970-01-01: no Sentinel-2 scene is that old)
DATE_NODATA = 0
#: values of ``alert_state`` (255 = not predicted)
ALERT_STATES = {"none": 0, "candidate": 1, "confirmed": 2, "retracted": 3}
NODATA = {
    "probability": float("nan"),
    "class": CLASS_NODATA,
    "valid_obs": 0,
    "last_obs_valid": CLASS_NODATA,
    "last_valid_date": DATE_NODATA,
    "entropy": float("nan"),
    "margin": float("nan"),
    "least": float("nan"),
    "alert_first_seen": DATE_NODATA,
    "alert_confirmations": 0,
    "alert_state": CLASS_NODATA,
    "probability_smoothed": float("nan"),
    "class_smoothed": CLASS_NODATA,
}
DTYPES = {
    "probability": "float32",
    "class": "uint8",
    "valid_obs": "uint16",
    "last_obs_valid": "uint8",
    "last_valid_date": "int32",
    "entropy": "float32",
    "margin": "float32",
    "least": "float32",
    "alert_first_seen": "int32",
    "alert_confirmations": "uint16",
    "alert_state": "uint8",
    "probability_smoothed": "float32",
    "class_smoothed": "uint8",
}
#: name of the class axis of ``probability`` (and of the coordinate holding the class names)
CLASS_DIM = "class_name"
#: nodata written into the COGs (None: the band has no nodata value; 0 is a real count)
COG_NODATA = {**NODATA, "valid_obs": None, "alert_confirmations": None}
_STATES = ", ".join(f"{v} {k}" for k, v in ALERT_STATES.items())
DESCRIPTIONS = {
    "probability": "class probability from the model (NaN = not predicted)",
    "class": f"most probable class (index into class_names; {CLASS_NODATA} = not predicted)",
    "valid_obs": "number of valid observations used by the model (0 = not predicted)",
    "last_obs_valid": f"1 = newest scene valid, 0 = screened or nodata, {CLASS_NODATA} = not "
    "predicted",
    "last_valid_date": "date of the newest valid observation the model used, days since "
    f"1970-01-01 ({DATE_NODATA} = not predicted)",
    "entropy": "normalised entropy of the class probabilities: -sum p ln p / ln n (0 certain, "
    "1 uniform; NaN = not predicted)",
    "margin": "1 - (highest - second highest probability) (NaN = not predicted)",
    "least": "least confidence: 1 - highest probability (NaN = not predicted)",
    "alert_first_seen": "date of the acquisition at which the disturbance probability first "
    f"reached the alert threshold, days since 1970-01-01 ({DATE_NODATA} = no alert)",
    "alert_confirmations": "consecutive valid acquisitions at or above the alert threshold since "
    "it was first seen (0 = no alert)",
    "alert_state": f"disturbance alert: {_STATES}, {CLASS_NODATA} = not predicted",
    "probability_smoothed": "class probability after Bayesian smoothing (sits semantics; NaN = "
    "not predicted)",
    "class_smoothed": "most probable class after Bayesian smoothing "
    f"({CLASS_NODATA} = not predicted)",
}


def canonical_layers(layers: Sequence[str]) -> tuple[str, ...]:
    """``layers`` without repeats, in the canonical order of :data:`ALL_VARIABLES`; unknown names
    raise :class:`OutputError`."""
    unknown = sorted(set(layers) - set(ALL_VARIABLES[len(VARIABLES) :]))
    if unknown:
        raise OutputError(
            f"unknown output layer(s) {unknown}; optional layers are "
            f"{', '.join(ALL_VARIABLES[len(VARIABLES) :])}"
        )
    return tuple(v for v in ALL_VARIABLES if v in set(layers))


@dataclass(frozen=True)
class OutputGrid:
    """The store's grid: CRS, upper-left affine, size, chunk (= window shape), classes and the
    optional layers the map holds (uncertainty, alerts, smoothing; canonical order)."""

    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int
    chunk: tuple[int, int]
    class_names: tuple[str, ...]
    multiclass: bool
    layers: tuple[str, ...] = ()

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
        object.__setattr__(self, "layers", canonical_layers(self.layers))
        if not self.multiclass and set(self.layers) & set(UNCERTAINTY):
            raise OutputError(
                "uncertainty layers (entropy, margin, least) need a multi-class (softmax) model; "
                "a binary model has one probability: drop 'uncertainty' from the settings"
            )
        if self.multiclass and set(self.layers) & set(ALERT_VARIABLES):
            raise OutputError(
                "disturbance alerts need a binary (sigmoid) model such as SBERT; drop 'alerts' "
                "from the settings of a multi-class model"
            )

    def variables(self) -> tuple[str, ...]:
        """The variables of the store: :data:`VARIABLES` and the optional layers, without
        ``class`` and ``class_smoothed`` for binary models."""
        names = (*VARIABLES, *self.layers)
        return tuple(v for v in names if self.multiclass or v not in ("class", "class_smoothed"))

    @property
    def kernel_layers(self) -> tuple[str, ...]:
        """The optional layers the prediction kernel computes."""
        return tuple(v for v in self.layers if v in KERNEL_LAYERS)

    @property
    def packing(self) -> Packing:
        """How the kernel's outputs for this grid travel between tasks."""
        return Packing(len(self.class_names), self.kernel_layers)

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
            layers=tuple(attrs.get("layers", ())),
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


#: the one-band variables of every packed window, after the probabilities
_PACKED_BASE = VARIABLES[1:]


@dataclass(frozen=True)
class Packing:
    """The layout of a window's kernel outputs in one float32 array: the ``n_classes``
    probabilities, then ``class``, ``valid_obs``, ``last_obs_valid``, ``last_valid_date`` and the
    optional kernel ``layers`` (canonical order), one band each.  Small and hashable: shipped in
    task graphs."""

    n_classes: int
    layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        bad = [v for v in self.layers if v not in KERNEL_LAYERS]
        if bad:
            raise OutputError(f"{bad} are not computed by the prediction kernel")
        object.__setattr__(self, "layers", canonical_layers(self.layers))

    @property
    def scalars(self) -> tuple[str, ...]:
        """The one-band variables, in their packed order."""
        return (*_PACKED_BASE, *self.layers)

    @property
    def size(self) -> int:
        """Bands of a packed window."""
        return self.n_classes + len(self.scalars)

    def empty(self, shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """The outputs of a window where nothing is predicted: nodata everywhere."""
        out = {}
        for var in ("probability", *self.scalars):
            full = (self.n_classes, *shape) if var == "probability" else shape
            out[var] = np.full(full, NODATA[var], dtype=DTYPES[var])
        return out

    def pack(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """All outputs of a window in one float32 array (:attr:`size`, h, w)."""
        return np.concatenate(
            [outputs["probability"].astype(np.float32, copy=False)]
            + [outputs[v][None].astype(np.float32) for v in self.scalars]
        )

    def unpack(
        self, packed: np.ndarray, variables: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Inverse of :meth:`pack`; only ``variables`` (default: all) are returned."""
        c = self.n_classes
        out = {"probability": packed[:c]}
        for i, var in enumerate(self.scalars):
            out[var] = packed[c + i].astype(DTYPES[var])
        if variables is not None:
            out = {k: v for k, v in out.items() if k in variables}
        return out

    def predicted(self, packed: np.ndarray) -> int:
        """How many pixels of a packed window were predicted (``last_obs_valid`` is not nodata)."""
        band = self.n_classes + self.scalars.index("last_obs_valid")
        return int(np.count_nonzero(packed[band] != NODATA["last_obs_valid"]))


def empty_outputs(
    n_classes: int, shape: tuple[int, int], layers: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """The outputs of a window where nothing is predicted: nodata everywhere."""
    return Packing(n_classes, tuple(layers)).empty(shape)


def _packing_of(outputs: dict[str, np.ndarray]) -> Packing:
    return Packing(len(outputs["probability"]), tuple(v for v in KERNEL_LAYERS if v in outputs))


def pack_outputs(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """All outputs of a window in one float32 array (see :class:`Packing`; its optional layers
    are those present in ``outputs``)."""
    return _packing_of(outputs).pack(outputs)


def unpack_outputs(
    packed: np.ndarray, variables: Sequence[str] | None = None, layers: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_outputs` for a window with the optional kernel ``layers``; only
    ``variables`` (default: all) are returned."""
    n = packed.shape[0] - len(_PACKED_BASE) - len(layers)
    return Packing(n, tuple(layers)).unpack(packed, variables)


def predicted_pixels(packed: np.ndarray, layers: Sequence[str] = ()) -> int:
    """How many pixels of a packed window (with the optional kernel ``layers``) were
    predicted."""
    n = packed.shape[0] - len(_PACKED_BASE) - len(layers)
    return Packing(n, tuple(layers)).predicted(packed)
