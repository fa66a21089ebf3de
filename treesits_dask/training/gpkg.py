"""Minimal GeoPackage point I/O with :mod:`sqlite3` (a GeoPackage is a SQLite file whose
geometries are a small header + standard WKB), so reading reference points needs no GDAL/OGR."""

from __future__ import annotations

import math
import os
import sqlite3
import struct

import numpy as np

from ..errors import ConfigError, InputDataError
from ..io import storage

__all__ = ["read_gpkg_points", "write_gpkg_points"]

_ENVELOPE_BYTES = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}


def _gpkg_point(blob: bytes, what: str) -> tuple[float, float]:
    if blob is None:
        raise InputDataError(f"{what} has no geometry")
    blob = bytes(blob)
    if blob[:2] != b"GP" or len(blob) < 8:
        raise InputDataError(f"{what}: the geometry is not a GeoPackage geometry blob")
    flags = blob[3]
    env = (flags >> 1) & 0x7
    if env not in _ENVELOPE_BYTES:
        raise InputDataError(f"{what}: invalid GeoPackage envelope code {env}")
    if flags & 0x10:
        raise InputDataError(f"{what} has an empty geometry")
    if flags & 0x20:
        raise InputDataError(f"{what}: extended GeoPackage geometries are not supported")
    return _wkb_point(blob[8 + _ENVELOPE_BYTES[env] :], what)


def _wkb_point(wkb: bytes, what: str) -> tuple[float, float]:
    order = "<" if wkb[0] == 1 else ">"
    (kind,) = struct.unpack_from(order + "I", wkb, 1)
    offset = 5
    if kind & 0x20000000:  # EWKB with an SRID
        offset += 4
    base = (kind & 0x0FFFFFFF) % 1000
    if base == 4:  # MultiPoint with a single point
        (n,) = struct.unpack_from(order + "I", wkb, offset)
        if n != 1:
            raise InputDataError(f"{what} is a MultiPoint of {n} points; give one point per sample")
        return _wkb_point(wkb[offset + 4 :], what)
    if base != 1:
        names = {2: "LineString", 3: "Polygon", 5: "MultiLineString", 6: "MultiPolygon"}
        raise InputDataError(
            f"{what} is a {names.get(base, f'WKB type {kind}')} geometry; reference samples "
            "must be points (one pixel each)"
        )
    x, y = struct.unpack_from(order + "dd", wkb, offset)
    if math.isnan(x) or math.isnan(y):
        raise InputDataError(f"{what} has an empty point geometry")
    return x, y


def read_gpkg_points(url: str, label_column: str, id_column: str | None, layer: str | None):
    """``(ids, xs, ys, labels, crs or None)`` of the point layer of a local GeoPackage."""
    _, path = storage.get_fs(url)
    if storage.is_remote(url):
        raise ConfigError(f"{url}: GeoPackages must be local files; copy it or use GeoJSON/CSV")
    try:
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise InputDataError(f"cannot open GeoPackage {url}: {exc}") from None
    try:
        try:
            layers = con.execute(
                "SELECT c.table_name, g.column_name, g.srs_id FROM gpkg_contents c "
                "JOIN gpkg_geometry_columns g ON g.table_name = c.table_name "
                "WHERE c.data_type = 'features'"
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise InputDataError(f"{url} is not a GeoPackage ({exc})") from None
        if not layers:
            raise InputDataError(f"GeoPackage {url} has no feature layer")
        if layer is None and len(layers) > 1:
            raise ConfigError(
                f"GeoPackage {url} has {len(layers)} layers {[r[0] for r in layers]}; set 'layer'"
            )
        chosen = [r for r in layers if layer is None or r[0] == layer]
        if not chosen:
            raise ConfigError(
                f"GeoPackage {url} has no layer {layer!r}; its layers are {[r[0] for r in layers]}"
            )
        table, geom_col, srs_id = chosen[0]
        file_crs = _gpkg_crs(con, srs_id)
        info = con.execute(f'PRAGMA table_info("{table}")').fetchall()
        columns = [r[1] for r in info]
        pk = next((r[1] for r in info if r[5]), None)
        if label_column not in columns:
            raise ConfigError(
                f"GeoPackage {url} layer {table} has no column {label_column!r}; set label_column "
                f"(its columns are {[c for c in columns if c != geom_col]})"
            )
        if id_column and id_column not in columns:
            raise ConfigError(f"GeoPackage {url} layer {table} has no id column {id_column!r}")
        idc = id_column or ("id" if "id" in columns else pk)
        rows = con.execute(
            f"SELECT {_q(idc) if idc else 'rowid'}, {_q(label_column)}, {_q(geom_col)} "
            f"FROM {_q(table)}"
        ).fetchall()
    finally:
        con.close()
    ids, xs, ys, labels = [], [], [], []
    for sid, label, blob in rows:
        sid = str(sid)
        x, y = _gpkg_point(blob, f"{url}: sample {sid}")
        ids.append(sid)
        xs.append(x)
        ys.append(y)
        labels.append(label)
    return ids, xs, ys, labels, file_crs


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _gpkg_crs(con: sqlite3.Connection, srs_id: int) -> str | None:
    row = con.execute(
        "SELECT organization, organization_coordsys_id, definition FROM gpkg_spatial_ref_sys "
        "WHERE srs_id = ?",
        (srs_id,),
    ).fetchone()
    if row is None or srs_id in (0, -1):
        return None
    org, code, definition = row
    if org and str(org).upper() == "EPSG" and code and int(code) > 0:
        return f"EPSG:{int(code)}"
    if definition and str(definition).strip().lower() != "undefined":
        return str(definition)
    return None


def write_gpkg_points(path: str, x, y, labels, ids, crs_obj, label_column: str) -> None:
    """Write a GeoPackage 1.4 with one point layer ``samples`` (id, label) in ``crs_obj``."""
    if os.path.exists(path):
        os.remove(path)
    epsg = crs_obj.to_epsg() or 99999
    label_type = "INTEGER" if all(isinstance(v, (int, np.integer)) for v in labels) else "TEXT"
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA application_id = 1196444487")  # 'GPKG'
        con.execute("PRAGMA user_version = 10400")
        con.execute(
            "CREATE TABLE gpkg_spatial_ref_sys (srs_name TEXT NOT NULL, "
            "srs_id INTEGER PRIMARY KEY, organization TEXT NOT NULL, organization_coordsys_id "
            "INTEGER NOT NULL, "
            "definition TEXT NOT NULL, description TEXT)"
        )
        srs = [
            ("Undefined cartesian SRS", -1, "NONE", -1, "undefined", None),
            ("Undefined geographic SRS", 0, "NONE", 0, "undefined", None),
            ("WGS 84 geodetic", 4326, "EPSG", 4326, _wkt(4326), None),
        ]
        if epsg != 4326:
            srs.append(
                (
                    crs_obj.to_string(),
                    epsg,
                    "EPSG" if crs_obj.to_epsg() else "NONE",
                    epsg,
                    crs_obj.to_wkt(),
                    None,
                )
            )
        con.executemany("INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, ?, ?, ?, ?)", srs)
        con.execute(
            "CREATE TABLE gpkg_contents (table_name TEXT NOT NULL PRIMARY KEY, data_type TEXT NOT "
            "NULL, identifier TEXT UNIQUE, description TEXT DEFAULT '', last_change DATETIME NOT "
            "NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')), min_x DOUBLE, min_y DOUBLE, "
            "max_x DOUBLE, max_y DOUBLE, srs_id INTEGER)"
        )
        con.execute(
            "CREATE TABLE gpkg_geometry_columns (table_name TEXT NOT NULL, column_name TEXT NOT "
            "NULL, geometry_type_name TEXT NOT NULL, srs_id INTEGER NOT NULL, z TINYINT NOT NULL, "
            "m TINYINT NOT NULL, CONSTRAINT pk_geom_cols PRIMARY KEY (table_name, column_name))"
        )
        con.execute(
            f"CREATE TABLE samples (fid INTEGER PRIMARY KEY AUTOINCREMENT, geom POINT, id TEXT, "
            f"{_q(label_column)} {label_type})"
        )
        con.execute(
            "INSERT INTO gpkg_contents (table_name, data_type, identifier, min_x, min_y, max_x, "
            "max_y, srs_id) VALUES ('samples', 'features', 'samples', ?, ?, ?, ?, ?)",
            (float(x.min()), float(y.min()), float(x.max()), float(y.max()), epsg),
        )
        con.execute(
            "INSERT INTO gpkg_geometry_columns VALUES ('samples', 'geom', 'POINT', ?, 0, 0)",
            (epsg,),
        )
        header = b"GP" + bytes([0, 1]) + struct.pack("<i", epsg)  # v1, little endian, no envelope
        con.executemany(
            f"INSERT INTO samples (geom, id, {_q(label_column)}) VALUES (?, ?, ?)",
            [
                (header + struct.pack("<BIdd", 1, 1, float(a), float(b)), i, lab)
                for a, b, i, lab in zip(x, y, ids, labels, strict=True)
            ],
        )
        con.commit()
    finally:
        con.close()


def _wkt(epsg: int) -> str:
    from rasterio.crs import CRS

    return CRS.from_epsg(epsg).to_wkt()
