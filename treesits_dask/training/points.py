"""Labelled reference points: read from GeoPackage, GeoJSON or CSV, written to the same formats.

* GeoPackage: the only point layer (or ``layer``); CRS from ``gpkg_spatial_ref_sys``; id from the
  ``id`` column, else the primary key.
* GeoJSON: a FeatureCollection of Point features; WGS 84 longitude/latitude (RFC 7946) unless a
  legacy ``crs`` member names another CRS; id from the feature ``id`` or the ``id`` property.
* CSV: ``x``/``y`` columns (or ``lon``/``lat``, ``longitude``/``latitude``: then WGS 84 by
  default), optionally ``id`` and ``crs`` (per row, e.g. ``EPSG:3035``).

The ``crs`` argument applies where the file names no CRS; a file whose CRS differs from it is an
error.  Labels are returned as written (integers or names);
:func:`treesits_dask.samples.encode_labels` turns them into class indices.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError, InputDataError
from ..io import storage
from ..io.crs import same_crs
from .gpkg import read_gpkg_points, write_gpkg_points

__all__ = ["ReferencePoints", "read_points", "write_points"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReferencePoints:
    """Labelled points as read from a file (coordinates in their own CRS, labels as written)."""

    ids: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    crs: tuple[str, ...]
    labels: tuple[Any, ...]
    source: str

    def __len__(self) -> int:
        return len(self.ids)

    def describe(self, i: int) -> str:
        """``sample <id> at (x, y) <crs>`` for error messages."""
        return (
            f"sample {self.ids[i]} at ({self.x[i]:.6f}, {self.y[i]:.6f}) {_short_crs(self.crs[i])}"
        )


def read_points(
    url: str,
    label_column: str = "label",
    id_column: str | None = None,
    x_column: str = "x",
    y_column: str = "y",
    crs: str | None = None,
    layer: str | None = None,
) -> ReferencePoints:
    """Read labelled points from a GeoPackage, GeoJSON or CSV file.

    CSV: columns ``x_column``/``y_column`` (or lon/lat), the label, optionally ``id`` and ``crs``
    (per row); ``crs`` is used where the file names none.
    """
    url = str(url)
    suffix = "." + storage.basename(url).rsplit(".", 1)[-1].lower() if "." in url else ""
    fs, path = storage.get_fs(url)
    if not fs.isfile(path):
        raise ConfigError(f"samples file {url} does not exist; check the 'samples' setting")
    if suffix == ".gpkg":
        pts = _read_gpkg(url, label_column, id_column, crs, layer)
    elif suffix in (".geojson", ".json"):
        pts = _read_geojson(url, label_column, id_column, crs)
    elif suffix == ".csv":
        pts = _read_points_csv(url, label_column, id_column, x_column, y_column, crs)
    else:
        raise ConfigError(
            f"samples file {url}: unknown format {suffix!r}; use a GeoPackage (.gpkg), GeoJSON "
            "(.geojson) or CSV (.csv) of points, or a folder of per-sample CSVs"
        )
    bad = [i for i in range(len(pts)) if not (np.isfinite(pts.x[i]) and np.isfinite(pts.y[i]))]
    if bad:
        raise InputDataError(
            f"{url}: samples {[pts.ids[i] for i in bad[:5]]} have no finite coordinates"
        )
    if not len(pts):
        raise InputDataError(f"{url} holds no samples")
    log.info("read %d reference points from %s", len(pts), url)
    return pts


def _short_crs(crs: str) -> str:
    return crs if len(crs) < 40 else crs[:37] + "..."


def _check_crs(value: str, what: str) -> str:
    from rasterio.crs import CRS
    from rasterio.errors import CRSError

    try:
        CRS.from_user_input(value)
    except CRSError as exc:
        raise ConfigError(f"{what}: {value!r} is not a CRS ({exc}); use e.g. EPSG:4326") from None
    return value


def _read_bytes(url: str) -> bytes:
    fs, path = storage.get_fs(url)
    with fs.open(path, "rb") as fh:
        return fh.read()


def _read_points_csv(url, label_column, id_column, x_column, y_column, crs) -> ReferencePoints:
    text = _read_bytes(url).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    columns = {c.strip().lower(): c for c in reader.fieldnames or []}

    def column(name: str | None, *fallbacks: str) -> str | None:
        for n in (name, *fallbacks):
            if n is not None and n.lower() in columns:
                return columns[n.lower()]
        return None

    xc = column(x_column, *(() if x_column != "x" else ("lon", "longitude", "easting")))
    yc = column(y_column, *(() if y_column != "y" else ("lat", "latitude", "northing")))
    lc = column(label_column)
    missing = [n for n, c in ((x_column, xc), (y_column, yc), (label_column, lc)) if c is None]
    if missing:
        raise ConfigError(
            f"samples file {url} lacks the column(s) {missing} (it has {reader.fieldnames}); set "
            "x_column, y_column and label_column"
        )
    ic = column(id_column) if id_column else column("id")
    if id_column and ic is None:
        raise ConfigError(f"samples file {url} has no id column {id_column!r}")
    cc = column("crs")
    lonlat = xc.lower() in ("lon", "longitude") and yc.lower() in ("lat", "latitude")
    ids, xs, ys, crss, labels = [], [], [], [], []
    for line, row in enumerate(reader, start=2):
        sid = row[ic].strip() if ic else f"row{line}"
        try:
            x, y = float(row[xc]), float(row[yc])
        except (TypeError, ValueError):
            raise InputDataError(
                f"{url} line {line} (sample {sid}): coordinates {row[xc]!r}, {row[yc]!r} "
                "are not numbers"
            ) from None
        point_crs = (row.get(cc) or "").strip() if cc else ""
        point_crs = point_crs or crs or ("EPSG:4326" if lonlat else "")
        if not point_crs:
            raise ConfigError(
                f"samples file {url} names no CRS for sample {sid}: add a 'crs' column or set the "
                "'crs' setting (e.g. EPSG:4326 or EPSG:3035)"
            )
        ids.append(sid)
        xs.append(x)
        ys.append(y)
        crss.append(point_crs)
        labels.append(row[lc])
    for c in set(crss):
        _check_crs(c, f"samples file {url}")
    return ReferencePoints(tuple(ids), np.array(xs), np.array(ys), tuple(crss), tuple(labels), url)


def _geojson_crs(obj: dict, url: str) -> str | None:
    member = obj.get("crs")
    if not member:
        return None
    name = (member.get("properties") or {}).get("name") if isinstance(member, dict) else None
    if not name:
        raise InputDataError(f"{url}: the 'crs' member has no properties.name")
    if "CRS84" in name.upper():
        return "OGC:CRS84"
    return _check_crs(name, url)


def _read_geojson(url, label_column, id_column, crs) -> ReferencePoints:
    try:
        obj = json.loads(_read_bytes(url))
    except ValueError as exc:
        raise InputDataError(f"samples file {url} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InputDataError(f"samples file {url} is not a GeoJSON object")
    features = obj.get("features") if obj.get("type") == "FeatureCollection" else [obj]
    # RFC 7946: WGS 84 longitude/latitude unless a (legacy) crs member says otherwise
    file_crs = _geojson_crs(obj, url) or (crs if crs else "OGC:CRS84")
    if crs and _geojson_crs(obj, url) and not same_crs(crs, file_crs):
        raise ConfigError(f"{url} declares CRS {file_crs} but the 'crs' setting is {crs}")
    ids, xs, ys, labels = [], [], [], []
    for i, feat in enumerate(features or []):
        props = feat.get("properties") or {}
        if id_column:
            if id_column not in props:
                raise ConfigError(f"{url}: feature {i} has no property {id_column!r} (id_column)")
            sid = str(props[id_column])
        else:
            sid = str(feat["id"]) if feat.get("id") is not None else str(props.get("id", i))
        if label_column not in props:
            raise ConfigError(
                f"{url}: feature {sid} has no property {label_column!r}; set label_column "
                f"(its properties are {sorted(props)})"
            )
        x, y = _geojson_point(feat.get("geometry"), f"{url}: sample {sid}")
        ids.append(sid)
        xs.append(x)
        ys.append(y)
        labels.append(props[label_column])
    n = len(ids)
    return ReferencePoints(
        tuple(ids), np.array(xs, float), np.array(ys, float), (file_crs,) * n, tuple(labels), url
    )


def _geojson_point(geom: Any, what: str) -> tuple[float, float]:
    if not isinstance(geom, dict):
        raise InputDataError(f"{what} has no geometry")
    kind, coords = geom.get("type"), geom.get("coordinates")
    if kind == "MultiPoint" and isinstance(coords, list) and len(coords) == 1:
        kind, coords = "Point", coords[0]
    if kind != "Point" or not isinstance(coords, list) or len(coords) < 2:
        raise InputDataError(
            f"{what} is a {kind} geometry; reference samples must be points (one pixel each)"
        )
    return float(coords[0]), float(coords[1])


def _read_gpkg(url, label_column, id_column, crs, layer) -> ReferencePoints:
    if storage.is_remote(url):
        raise ConfigError(f"{url}: GeoPackages must be local files; copy it or use GeoJSON/CSV")
    ids, xs, ys, labels, file_crs = read_gpkg_points(url, label_column, id_column, layer)
    if file_crs is None and not crs:
        raise ConfigError(f"GeoPackage {url} has no CRS; set the 'crs' setting")
    if file_crs and crs and not same_crs(file_crs, crs):
        raise ConfigError(f"{url} declares CRS {file_crs} but the 'crs' setting is {crs}")
    point_crs = _check_crs(file_crs or crs, url)
    return ReferencePoints(
        tuple(ids),
        np.array(xs, float),
        np.array(ys, float),
        (point_crs,) * len(ids),
        tuple(labels),
        url,
    )


def write_points(
    url: str,
    x: Sequence[float],
    y: Sequence[float],
    labels: Sequence[Any],
    crs: str,
    ids: Sequence[Any] | None = None,
    label_column: str = "label",
) -> str:
    """Write labelled points as GeoPackage (.gpkg), GeoJSON (.geojson) or CSV (.csv).

    GeoJSON in another CRS than WGS 84 gets the legacy ``crs`` member (GDAL and
    :func:`read_points` read it).
    """
    from rasterio.crs import CRS

    url = str(url)
    x, y = np.asarray(x, float), np.asarray(y, float)
    labels = [v.item() if isinstance(v, np.generic) else v for v in labels]
    ids = [str(i) for i in (ids if ids is not None else range(len(x)))]
    if not (len(x) == len(y) == len(labels) == len(ids)):
        raise ConfigError("x, y, labels and ids must have the same length")
    crs_obj = CRS.from_user_input(crs)
    epsg = crs_obj.to_epsg()
    fs, path = storage.get_fs(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    suffix = url.rsplit(".", 1)[-1].lower()
    if suffix == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["id", "x", "y", "crs", label_column])
        name = f"EPSG:{epsg}" if epsg else crs_obj.to_wkt()
        for row in zip(ids, x, y, labels, strict=True):
            w.writerow([row[0], repr(float(row[1])), repr(float(row[2])), name, row[3]])
        with fs.open(path, "wt") as fh:
            fh.write(buf.getvalue())
    elif suffix in ("geojson", "json"):
        obj: dict[str, Any] = {
            "type": "FeatureCollection",
            "features": [
                {
                    "type": "Feature",
                    "id": i,
                    "properties": {"id": i, label_column: lab},
                    "geometry": {"type": "Point", "coordinates": [float(a), float(b)]},
                }
                for i, a, b, lab in zip(ids, x, y, labels, strict=True)
            ],
        }
        if epsg != 4326:
            obj["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}"}}
        with fs.open(path, "wt") as fh:
            json.dump(obj, fh)
    elif suffix == "gpkg":
        if storage.is_remote(url):
            raise ConfigError(f"{url}: GeoPackages are written to local files only")
        write_gpkg_points(path, x, y, labels, ids, crs_obj, label_column)
    else:
        raise ConfigError(f"{url}: write points as .gpkg, .geojson or .csv")
    log.info("wrote %d points to %s", len(ids), url)
    return url
