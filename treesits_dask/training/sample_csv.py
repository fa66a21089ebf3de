"""SITS-NN-style per-sample CSVs (the layout read by SITS-NN's ``utils/csv.py``)::

    <folder>/labels.csv      columns: id, <label column> (integer or name), other columns ignored
    <folder>/<id>.csv        one file per sample: a ``date`` column (YYYY-MM-DD or YYYYMMDD), the 10
                             bands by FORCE name (BLUE ... SWIR2) or Sentinel-2 id (B2 ... B12;
                             BROADNIR = B8, NIR = B8A), optionally ``sensor``; raw BOA integers
                             (reflectance x 10000); one row per observation. Rows with an empty,
                             NaN or -9999 band are invalid observations (their date stays a time
                             step, like a scene with a gap); other columns are ignored.

All samples share one time axis: the union of their (date, sensor) steps in ascending order; a
step a sample does not have is an invalid observation.  :func:`write_sample_csvs` writes this
layout (FORCE band names, a ``sensor`` column, every step of the time axis: empty band cells
where an observation is invalid).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import math
from collections.abc import Sequence

import numpy as np

from ..errors import ConfigError, InputDataError
from ..io import storage
from ..io.cube import NODATA
from ..io.discovery import S2_BANDS
from .samples import SampleSet, encode_labels

__all__ = ["S2_BAND_IDS", "read_sample_csvs", "write_sample_csvs"]

log = logging.getLogger(__name__)

#: Sentinel-2 band ids in FORCE band order (BROADNIR is B8, NIR is the narrow B8A).
S2_BAND_IDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
_BAND_ALIASES = {
    **{b.upper(): i for i, b in enumerate(S2_BANDS)},
    **{b: i for i, b in enumerate(S2_BAND_IDS)},
    **{f"B{int(b[1:]):02d}": i for i, b in enumerate(S2_BAND_IDS) if b != "B8A"},
    "B08A": 7,
}
_LABEL_FILES = ("labels.csv", "label.csv")


def _read_bytes(url: str) -> bytes:
    fs, path = storage.get_fs(url)
    with fs.open(path, "rb") as fh:
        return fh.read()


def _parse_date(text: str, what: str) -> dt.date:
    t = text.strip()
    for fmt in ("%Y-%m-%d", "%Y%m%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"):
        try:
            return dt.datetime.strptime(t[:19] if "T" in t or " " in t else t, fmt).date()
        except ValueError:
            continue
    raise InputDataError(f"{what}: {text!r} is not a date (YYYY-MM-DD or YYYYMMDD)")


def _band_value(text: str | None) -> int | None:
    if text is None:
        return None
    t = text.strip()
    if not t or t.lower() in ("nan", "na", "null", "none"):
        return None
    v = float(t)
    if math.isnan(v) or v == NODATA:
        return None
    return round(v)


def read_sample_csvs(
    folder: str,
    label_column: str = "label",
    id_column: str | None = None,
    class_names: Sequence[str] | None = None,
    sensors: Sequence[str] | None = None,
    start: dt.date | None = None,
    end: dt.date | None = None,
) -> SampleSet:
    """Read a SITS-NN-style folder of per-sample CSVs (see the module docstring)."""
    folder = str(folder).rstrip("/")
    fs, path = storage.get_fs(folder)
    labels_url = next(
        (storage.join(folder, n) for n in _LABEL_FILES if fs.isfile(f"{path}/{n}")), None
    )
    if labels_url is None:
        raise ConfigError(
            f"sample folder {folder} has no labels.csv (columns id, {label_column}); "
            "per-sample CSVs need one row per sample with its id and label"
        )
    reader = csv.DictReader(io.StringIO(_read_bytes(labels_url).decode("utf-8-sig")))
    fields = reader.fieldnames or []
    idc = id_column or ("id" if "id" in fields else None)
    if idc not in fields or label_column not in fields:
        raise ConfigError(
            f"{labels_url} needs the columns {idc or 'id'!r} and {label_column!r} "
            f"(it has {fields}); set id_column / label_column"
        )
    rows = list(reader)
    ids = [r[idc].strip() for r in rows]
    codes, names = encode_labels([r[label_column] for r in rows], class_names, ids, labels_url)
    per_sample: list[dict[tuple[int, str], list[int]]] = []
    wanted = set(sensors) if sensors else None
    for sid in ids:
        url = storage.join(folder, f"{sid}.csv")
        if not fs.isfile(f"{path}/{sid}.csv"):
            raise InputDataError(f"sample {sid} is listed in {labels_url} but {url} does not exist")
        per_sample.append(_read_one_sample(url, wanted, start, end))
    union = sorted({s for obs in per_sample for s in obs})
    position = {s: k for k, s in enumerate(union)}
    series = np.full((len(ids), len(union), len(S2_BANDS)), NODATA, dtype=np.int16)
    for i, obs in enumerate(per_sample):
        for step, values in obs.items():
            series[i, position[step]] = values
    log.info("read %d per-sample CSVs from %s (%d time steps)", len(ids), folder, len(union))
    return SampleSet(
        series=series,
        valid=(series != NODATA).all(axis=2),
        days=np.array([d for d, _ in union], dtype=np.int64),
        sensors=tuple(s for _, s in union),
        labels=codes,
        class_names=names,
        ids=tuple(ids),
        tiles=("",) * len(ids),
        source=folder,
    )


def _read_one_sample(url, wanted, start, end) -> dict[tuple[int, str], list[int]]:
    reader = csv.DictReader(io.StringIO(_read_bytes(url).decode("utf-8-sig")))
    fields = reader.fieldnames or []
    by_upper = {f.strip().upper(): f for f in fields}
    band_cols: dict[int, str] = {}
    for upper, f in by_upper.items():
        if upper in _BAND_ALIASES:
            band_cols.setdefault(_BAND_ALIASES[upper], f)
    missing = [S2_BANDS[b] for b in range(len(S2_BANDS)) if b not in band_cols]
    if missing or "DATE" not in by_upper:
        raise InputDataError(
            f"{url} needs a 'date' column and the 10 bands (FORCE names {', '.join(S2_BANDS)} or "
            f"Sentinel-2 ids {', '.join(S2_BAND_IDS)}); missing: "
            + ", ".join((["date"] if "DATE" not in by_upper else []) + missing)
        )
    date_col, sensor_col = by_upper["DATE"], by_upper.get("SENSOR")
    out: dict[tuple[int, str], list[int]] = {}
    for line, row in enumerate(reader, start=2):
        what = f"{url} line {line}"
        date = _parse_date(row[date_col] or "", what)
        sensor = (row.get(sensor_col) or "").strip() if sensor_col else ""
        if (start and date < start) or (end and date > end):
            continue
        if wanted and sensor and sensor not in wanted:
            continue
        try:
            values = [_band_value(row[band_cols[b]]) for b in range(len(S2_BANDS))]
        except ValueError:
            raise InputDataError(f"{what}: band values must be numbers") from None
        step = ((date - dt.date(1970, 1, 1)).days, sensor)
        if any(v is None for v in values):  # an invalid observation: keeps its time step
            out.setdefault(step, [NODATA] * len(S2_BANDS))
            continue
        if any(not -32768 <= v <= 32767 for v in values):
            raise InputDataError(f"{what}: band values must be int16 BOA integers (x 10000)")
        out[step] = values
    return out


def write_sample_csvs(samples: SampleSet, folder: str, label_column: str = "label") -> str:
    """Write ``samples`` as a per-sample CSV folder (see the module docstring)."""
    folder = str(folder).rstrip("/")
    fs, path = storage.get_fs(folder)
    fs.makedirs(path, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", label_column, "tile"])
    for sid, code, tile in zip(samples.ids, samples.labels, samples.tiles, strict=True):
        w.writerow([sid, samples.class_names[code], tile])
    with fs.open(f"{path}/labels.csv", "wt") as fh:
        fh.write(buf.getvalue())
    dates = samples.dates
    for i, sid in enumerate(samples.ids):
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["date", "sensor", *S2_BANDS])
        for t in range(len(dates)):  # invalid observations: empty band cells
            values = samples.series[i, t].tolist() if samples.valid[i, t] else [""] * len(S2_BANDS)
            w.writerow([dates[t].isoformat(), samples.sensors[t], *values])
        with fs.open(f"{path}/{sid}.csv", "wt") as fh:
            fh.write(buf.getvalue())
    log.info("wrote %d per-sample CSVs to %s", len(samples), folder)
    return folder
