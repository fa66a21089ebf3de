"""FORCE Level-2 datacube discovery: ``datacube-definition.prj``, tile ids, tile lists, scene
tables.

Everything here runs once on the driver and returns small frozen descriptors that are shipped to
the workers.  FORCE file names are parsed by one regular expression (:data:`FORCE_NAME`).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import DiscoveryError
from . import storage

__all__ = [
    "FORCE_NAME",
    "TILE_ID",
    "S2_BANDS",
    "LANDSAT_BANDS",
    "CubeDefinition",
    "Scene",
    "parse_scene_name",
    "parse_tile_id",
    "read_cube_definition",
    "parse_cube_definition",
    "list_tiles",
    "select_tiles",
    "read_tile_list",
    "scene_table",
]

log = logging.getLogger(__name__)

#: FORCE Level-2 file basename, e.g. ``20230830_LEVEL2_SEN2C_BOA.tif``.
FORCE_NAME = re.compile(
    r"^(?P<date>\d{8})_LEVEL2_(?P<sensor>SEN2[A-D]|LND0[4-9])_"
    r"(?P<product>BOA|QAI|CLD|AOD|WVP|VZN|HOT|TOA|OVV|DST|VZN)\.(?P<ext>tif|jpg)$"
)
#: FORCE tile id, ``X0069_Y0043``.
TILE_ID = re.compile(r"^X(?P<x>-?\d{4})_Y(?P<y>-?\d{4})$")

#: Sentinel-2 BOA band names in FORCE order.
S2_BANDS = (
    "BLUE",
    "GREEN",
    "RED",
    "REDEDGE1",
    "REDEDGE2",
    "REDEDGE3",
    "BROADNIR",
    "NIR",
    "SWIR1",
    "SWIR2",
)
LANDSAT_BANDS = ("BLUE", "GREEN", "RED", "NIR", "SWIR1", "SWIR2")

DEFAULT_SENSORS = ("SEN2A", "SEN2B", "SEN2C")


@dataclass(frozen=True)
class CubeDefinition:
    """The contents of ``datacube-definition.prj`` (both the old 7-line and the ``KEY = value``
    format)."""

    crs_wkt: str
    origin_lon: float
    origin_lat: float
    origin_x: float
    origin_y: float
    tile_size_x: float
    tile_size_y: float
    block_size: float | None = None

    def tile_origin(self, tile: str) -> tuple[float, float]:
        """Upper-left map coordinate of a tile."""
        tx, ty = parse_tile_id(tile)
        return self.origin_x + tx * self.tile_size_x, self.origin_y - ty * self.tile_size_y

    def tile_bounds(self, tile: str) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` of a tile in map units."""
        left, top = self.tile_origin(tile)
        return left, top - self.tile_size_y, left + self.tile_size_x, top

    def tile_of(self, x: float, y: float) -> str:
        """The id of the tile that contains map coordinate ``(x, y)``."""
        tx = math.floor((x - self.origin_x) / self.tile_size_x)
        ty = math.floor((self.origin_y - y) / self.tile_size_y)
        return format_tile_id(tx, ty)


@dataclass(frozen=True)
class Scene:
    """One acquisition of one tile: the BOA file and (if present) its QAI twin."""

    tile: str
    date: dt.date
    sensor: str
    boa: str
    qai: str | None = None
    size: int | None = field(default=None, compare=False)
    mtime: str | None = field(default=None, compare=False)
    qai_size: int | None = field(default=None, compare=False)
    qai_mtime: str | None = field(default=None, compare=False)
    #: the BOA file's block shape (rows, cols), where the run's driver read it from the header and
    #: the tile's scenes are not all in one layout (:func:`~treesits_dask.io.layouts.with_layouts`);
    #: None: the tile grid's
    block_shape: tuple[int, int] | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        return storage.basename(self.boa)


def format_tile_id(tx: int, ty: int) -> str:
    return f"X{tx:04d}_Y{ty:04d}"


def parse_tile_id(tile: str) -> tuple[int, int]:
    """``"X0069_Y0043"`` -> ``(69, 43)``; anything else is a :class:`DiscoveryError`."""
    m = TILE_ID.match(str(tile).strip())
    if not m:
        raise DiscoveryError(
            f"{tile!r} is not a FORCE tile id; expected the form X0069_Y0043 (X%04d_Y%04d)"
        )
    return int(m["x"]), int(m["y"])


def parse_scene_name(name: str) -> dict | None:
    """Parse a FORCE Level-2 basename; returns ``None`` for names that are not FORCE files.

    Only the basename is looked at, never the directories above it.
    """
    m = FORCE_NAME.match(storage.basename(name))
    if not m:
        return None
    try:
        date = dt.datetime.strptime(m["date"], "%Y%m%d").date()
    except ValueError:
        return None
    return {"date": date, "sensor": m["sensor"], "product": m["product"], "ext": m["ext"]}


def parse_cube_definition(text: str, source: str = "datacube-definition.prj") -> CubeDefinition:
    """Parse either format of ``datacube-definition.prj``."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DiscoveryError(f"{source} is empty; it must hold the FORCE datacube definition")
    try:
        if "=" in lines[0] and lines[0].split("=", 1)[0].strip().isupper():
            kv = {}
            for ln in lines:
                if "=" not in ln:
                    continue
                k, v = ln.split("=", 1)
                kv[k.strip().upper()] = v.strip()
            missing = [
                k
                for k in (
                    "PROJECTION",
                    "ORIGIN_MAP_X",
                    "ORIGIN_MAP_Y",
                    "TILE_SIZE_X",
                    "TILE_SIZE_Y",
                )
                if k not in kv
            ]
            if missing:
                raise DiscoveryError(
                    f"{source} lacks the keys {', '.join(missing)}; the KEY = value format needs "
                    "PROJECTION, ORIGIN_GEO_X/Y, ORIGIN_MAP_X/Y and TILE_SIZE_X/Y"
                )
            return CubeDefinition(
                crs_wkt=kv["PROJECTION"],
                origin_lon=float(kv.get("ORIGIN_GEO_X", "nan")),
                origin_lat=float(kv.get("ORIGIN_GEO_Y", "nan")),
                origin_x=float(kv["ORIGIN_MAP_X"]),
                origin_y=float(kv["ORIGIN_MAP_Y"]),
                tile_size_x=float(kv["TILE_SIZE_X"]),
                tile_size_y=float(kv["TILE_SIZE_Y"]),
                block_size=float(kv["BLOCK_SIZE"]) if "BLOCK_SIZE" in kv else None,
            )
        if len(lines) < 6:
            raise DiscoveryError(
                f"{source} has {len(lines)} lines; the old format has 7: WKT, origin lon, origin "
                "lat, "
                "origin x, origin y, tile size, block size"
            )
        return CubeDefinition(
            crs_wkt=lines[0],
            origin_lon=float(lines[1]),
            origin_lat=float(lines[2]),
            origin_x=float(lines[3]),
            origin_y=float(lines[4]),
            tile_size_x=float(lines[5]),
            tile_size_y=float(lines[5]),
            block_size=float(lines[6]) if len(lines) > 6 else None,
        )
    except ValueError as exc:
        raise DiscoveryError(f"{source} could not be parsed: {exc}") from exc


def read_cube_definition(root: str) -> CubeDefinition:
    """Read ``<root>/datacube-definition.prj``; clear errors for a missing root or file."""
    fs, path = storage.get_fs(root)
    if not fs.isdir(path):
        raise DiscoveryError(
            f"cube root {root!r} does not exist or is not a directory; set --cube to the FORCE "
            "Level-2 datacube folder (the one holding datacube-definition.prj and X*_Y* tiles)"
        )
    prj = storage.join(root, "datacube-definition.prj")
    fs, prj_path = storage.get_fs(prj)
    if not fs.exists(prj_path):
        raise DiscoveryError(
            f"{prj} not found: {root!r} is not a FORCE datacube root (every FORCE Level-2 cube "
            "has a datacube-definition.prj at its top)"
        )
    with fs.open(prj_path, "rt") as fh:
        return parse_cube_definition(fh.read(), source=prj)


def list_tiles(root: str) -> list[str]:
    """All tile folders of the cube, sorted; other entries (tile-list files, ``mosaic/`` VRTs,
    logs) are ignored and named in the log."""
    fs, path = storage.get_fs(root)
    entries = fs.ls(path, detail=True)
    tiles, other = [], []
    for entry in entries:
        name = storage.basename(entry["name"])
        if entry.get("type") == "directory" and TILE_ID.match(name):
            tiles.append(name)
        elif name != "datacube-definition.prj":
            other.append(name + ("/" if entry.get("type") == "directory" else ""))
    if other:
        shown = ", ".join(sorted(other)[:8]) + (" ..." if len(other) > 8 else "")
        log.info(
            "cube %s: ignored %d entries that are not tile folders (%s)", root, len(other), shown
        )
    return sorted(tiles)


def read_tile_list(url: str) -> list[str]:
    """FORCE tile-list file: first line the count, then one tile id per line."""
    fs, path = storage.get_fs(url)
    with fs.open(path, "rt") as fh:
        lines = [ln.strip() for ln in fh.read().splitlines() if ln.strip()]
    if not lines:
        raise DiscoveryError(f"tile list {url} is empty")
    try:
        count = int(lines[0])
    except ValueError:
        raise DiscoveryError(
            f"tile list {url}: the first line must be the number of tiles, got {lines[0]!r}"
        ) from None
    tiles = lines[1:]
    if count != len(tiles):
        raise DiscoveryError(f"tile list {url} announces {count} tiles but lists {len(tiles)}")
    for t in tiles:
        parse_tile_id(t)
    return tiles


def select_tiles(root: str, tiles: str | Sequence[str]) -> list[str]:
    """Resolve ``--tiles``: ``"all"``, a comma-separated list, a list, or a FORCE tile-list file."""
    available = list_tiles(root)
    if isinstance(tiles, str):
        spec = tiles.strip()
        if spec.lower() == "all":
            if not available:
                raise DiscoveryError(f"cube {root} has no tile folders (X????_Y????)")
            return available
        fs, path = (
            storage.get_fs(spec) if not TILE_ID.match(spec.split(",")[0].strip()) else (None, None)
        )
        if fs is not None and fs.isfile(path):
            wanted = read_tile_list(spec)
        else:
            wanted = [t.strip() for t in spec.split(",") if t.strip()]
    else:
        wanted = [str(t).strip() for t in tiles]
    if not wanted:
        raise DiscoveryError(
            "no tiles selected; pass --tiles X0069_Y0043,... or a tile-list file or 'all'"
        )
    seen: list[str] = []
    for t in wanted:
        parse_tile_id(t)
        if t not in available:
            raise DiscoveryError(
                f"tile {t} is not in cube {root} (it has {len(available)} tiles"
                + (f", e.g. {', '.join(available[:5])}" if available else "")
                + "); check --tiles"
            )
        if t not in seen:
            seen.append(t)
    return seen


def scene_table(
    root: str,
    tile: str,
    sensors: Iterable[str] = DEFAULT_SENSORS,
    start: dt.date | None = None,
    end: dt.date | None = None,
    with_details: bool = True,
    skipped: Counter | None = None,
) -> list[Scene]:
    """BOA scenes of one tile (ascending date, then sensor), with their QAI twin where present.

    ``start``/``end`` are inclusive.  Only basenames are parsed.  Everything else FORCE writes
    into a tile folder (CLD, HOT, VZN, AOD, WVP, DST, OVV quicklooks, ``.aux.xml``, scenes of
    other sensors) is ignored; ``skipped`` (a ``Counter``), when given, counts it per kind.
    """
    sensors = tuple(sensors)
    tile_url = storage.join(root, tile)
    fs, path = storage.get_fs(tile_url)
    if not fs.isdir(path):
        raise DiscoveryError(f"tile folder {tile_url} does not exist; check --tiles and --cube")
    entries = fs.ls(path, detail=True)
    by_name = {storage.basename(e["name"]): e for e in entries}
    scenes: list[Scene] = []
    ignored: Counter[str] = Counter()
    for name, entry in sorted(by_name.items()):
        info = parse_scene_name(name)
        if info is None:
            ignored[
                "not FORCE Level-2 files" if entry.get("type") != "directory" else "folders"
            ] += 1
            continue
        if info["product"] != "BOA" or info["ext"] != "tif":
            if info["product"] != "QAI":  # QAI files are the BOAs' twins
                ignored[f"{info['product']} files"] += 1
            continue
        if info["sensor"] not in sensors:
            ignored[f"{info['sensor']} scenes (not in sensors)"] += 1
            continue
        if start is not None and info["date"] < start:
            continue
        if end is not None and info["date"] > end:
            continue
        qai_name = name.replace("_BOA.tif", "_QAI.tif")
        qai_entry = by_name.get(qai_name)
        scenes.append(
            Scene(
                tile=tile,
                date=info["date"],
                sensor=info["sensor"],
                boa=storage.join(tile_url, name),
                qai=storage.join(tile_url, qai_name) if qai_entry else None,
                size=entry.get("size") if with_details else None,
                mtime=_mtime(entry) if with_details else None,
                qai_size=qai_entry.get("size") if with_details and qai_entry else None,
                qai_mtime=_mtime(qai_entry) if with_details and qai_entry else None,
            )
        )
    scenes.sort(key=lambda s: (s.date, s.sensor))
    if ignored:
        log.debug(
            "tile %s: ignored %s", tile, ", ".join(f"{n} {k}" for k, n in sorted(ignored.items()))
        )
        if skipped is not None:
            skipped.update(ignored)
    return scenes


def _mtime(entry: dict) -> str | None:
    for key in ("mtime", "LastModified", "ETag", "last_modified"):
        if key in entry and entry[key] is not None:
            return str(entry[key])
    return None
