"""Reference samples as training and evaluation see them: :class:`SampleSet` (labelled time
series on one time axis) and label encoding.  Reading them is :mod:`treesits_dask.training.extract`
(points from the cube) and :mod:`treesits_dask.training.sample_csv` (per-sample CSVs).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import ConfigError, InputDataError

__all__ = ["SampleSet", "encode_labels", "pixel_centres"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ data types
@dataclass(frozen=True)
class SampleSet:
    """Labelled time series on one time axis, ready for training and evaluation.

    ``series`` (N, T, 10) int16 raw BOA, -9999 where invalid; ``valid`` (N, T) bool; ``days`` (T,)
    int64 days since 1970-01-01 (ascending); ``sensors`` (T,) the FORCE sensor of each step
    (``""`` unknown); ``labels`` (N,) int64 indices into ``class_names``; ``ids`` and ``tiles``
    (``""`` for per-sample CSVs) per sample.
    """

    series: np.ndarray
    valid: np.ndarray
    days: np.ndarray
    sensors: tuple[str, ...]
    labels: np.ndarray
    class_names: tuple[str, ...]
    ids: tuple[str, ...]
    tiles: tuple[str, ...]
    source: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dates(self) -> list[dt.date]:
        return [dt.date(1970, 1, 1) + dt.timedelta(days=int(d)) for d in self.days]

    def subset(self, index: Sequence[int] | np.ndarray) -> SampleSet:
        """The samples at ``index`` (same time axis and classes)."""
        idx = np.asarray(index, dtype=np.int64)
        return replace(
            self,
            series=self.series[idx],
            valid=self.valid[idx],
            labels=self.labels[idx],
            ids=tuple(self.ids[i] for i in idx),
            tiles=tuple(self.tiles[i] for i in idx),
        )

    def with_classes(self, class_names: Sequence[str]) -> SampleSet:
        """The same samples with labels re-indexed into ``class_names`` (matched by name)."""
        names = tuple(class_names)
        if names == self.class_names:
            return self
        lookup = {n: i for i, n in enumerate(names)}
        missing = sorted({self.class_names[k] for k in np.unique(self.labels)} - set(lookup))
        if missing:
            raise ConfigError(
                f"samples of {self.source or 'the sample set'} are labelled {missing}, which the "
                f"model does not know (its classes: {list(names)}); relabel them or train a model "
                "with these classes"
            )
        remap = np.array([lookup.get(n, -1) for n in self.class_names], dtype=np.int64)
        return replace(self, labels=remap[self.labels], class_names=names)

    def drop_empty(self) -> SampleSet:
        """Leave out samples without a valid observation (inference never predicts those)."""
        keep = self.valid.any(axis=1)
        if keep.all():
            return self
        empty = [self.ids[i] for i in np.flatnonzero(~keep)]
        log.warning(
            "%d of %d samples have no valid observation in the window and are left out (%s%s)",
            len(empty),
            len(self),
            ", ".join(empty[:5]),
            ", ..." if len(empty) > 5 else "",
        )
        return self.subset(np.flatnonzero(keep))


# ------------------------------------------------------------------------------------ labels
def _as_label(value: Any) -> Any:
    """int for integer-like values, stripped str for names, None for missing."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return None
        return int(value) if float(value).is_integer() else str(value)
    text = str(value).strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        f = float(text)
    except ValueError:
        return text
    return int(f) if f.is_integer() else text


def encode_labels(
    labels: Sequence[Any],
    class_names: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    source: str = "samples",
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels (integers or names) -> ``(codes (N,) int64, class_names)``.

    Integer labels are class indices (``class_names`` default ``class_0 ...``); names are looked
    up in ``class_names`` (default: the sorted distinct names).
    """
    values = [_as_label(v) for v in labels]
    names_of = ids or [str(i) for i in range(len(values))]
    missing = [names_of[i] for i, v in enumerate(values) if v is None]
    if missing:
        raise InputDataError(
            f"{source}: samples {missing[:5]} have no label; fill the label column or remove them"
        )
    kinds = {type(v) for v in values}
    if kinds == {int}:
        codes = np.array(values, dtype=np.int64)
        if class_names is None:
            if codes.size and codes.min() < 0:
                raise InputDataError(f"{source}: integer labels must be >= 0, got {codes.min()}")
            n = int(codes.max()) + 1 if codes.size else 0
            return codes, tuple(f"class_{i}" for i in range(n))
        names = tuple(class_names)
        bad = [names_of[i] for i in np.flatnonzero((codes < 0) | (codes >= len(names)))]
        if bad:
            raise InputDataError(
                f"{source}: samples {bad[:5]} have integer labels outside 0..{len(names) - 1} "
                f"(the classes are {list(names)})"
            )
        return codes, names
    if kinds == {str} or not values:
        names = tuple(class_names) if class_names is not None else tuple(sorted(set(values)))
        lookup = {n: i for i, n in enumerate(names)}
        unknown = sorted({v for v in values if v not in lookup})
        if unknown:
            raise InputDataError(
                f"{source}: labels {unknown[:10]} are not among the classes {list(names)}; "
                "fix the labels or the class_names setting"
            )
        return np.array([lookup[v] for v in values], dtype=np.int64), names
    raise InputDataError(
        f"{source}: the label column mixes integers and names; use one kind (class indices "
        "0..C-1 or class names)"
    )


def pixel_centres(grid, rows: Sequence[int], cols: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Map coordinates (cube CRS) of pixel centres ``(rows, cols)`` of a tile grid."""
    a, _, c, _, e, f = grid.transform
    return c + a * (np.asarray(cols) + 0.5), f + e * (np.asarray(rows) + 0.5)
