"""Coordinate reference systems compared by meaning, not by name.

``rasterio.crs.CRS ==`` and ``pyproj.CRS.equals`` compare names too: the WKT that FORCE writes
into ``datacube-definition.prj`` for EPSG:3035 ("ETRS89 / LAEA Europe", with ``TOWGS84[0,...]``)
and the same GeoTIFF read back by PROJ >= 9 ("ETRS89-extended / LAEA Europe") compare unequal,
although their PROJ definitions are identical.  :func:`same_crs` compares what places pixels on
the Earth: the projection method and its parameters, the ellipsoid, the datum shift, the prime
meridian and the units (axis order and names are ignored).  :func:`short_crs` names a CRS for
messages (its EPSG code where one exists, else its PROJ string).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

__all__ = ["same_crs", "short_crs"]

#: PROJ keys that do not change where a coordinate lies
_IGNORED = {"no_defs", "type", "wktext", "axis", "datum", "ellps", "towgs84", "units", "to_meter",
            "pm"}  # fmt: skip
#: values PROJ assumes for parameters that a definition leaves out
_DEFAULTS = {"k": 1.0, "k_0": 1.0, "x_0": 0.0, "y_0": 0.0, "lat_0": 0.0, "lon_0": 0.0}
_UNITS = {"m": 1.0, "km": 1000.0, "cm": 0.01, "ft": 0.3048, "us-ft": 1200 / 3937}
_PRIME_MERIDIANS = {"greenwich": 0.0, "paris": 2.33722917, "ferro": -17.66666666666667}


@functools.lru_cache(maxsize=256)
def _parse(text: str):
    import pyproj

    return pyproj.CRS.from_user_input(text)


@functools.lru_cache(maxsize=256)
def _signature(text: str) -> dict[str, Any] | None:
    """What places coordinates: projection parameters, ellipsoid, datum shift, units, meridian."""
    crs = _parse(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "you will likely lose important projection information"
        try:
            proj = crs.to_dict()
        except Exception:  # noqa: BLE001 - pyproj raises CRSError and others for exotic CRSs
            return None
    if not proj or "proj" not in proj:
        return None
    ellipsoid = crs.ellipsoid
    towgs84 = proj.get("towgs84")
    if isinstance(towgs84, str):
        towgs84 = [float(v) for v in towgs84.split(",")]
    if towgs84 is not None and not any(towgs84):
        towgs84 = None  # a zero shift is no shift
    units = proj.get("to_meter", _UNITS.get(str(proj.get("units", "m")), proj.get("units")))
    pm = proj.get("pm", 0.0)
    params = {k: v for k, v in proj.items() if k not in _IGNORED}
    for key, default in _DEFAULTS.items():
        params.setdefault(key, default)
    return {
        "params": params,
        "ellipsoid": (ellipsoid.semi_major_metre, ellipsoid.inverse_flattening)
        if ellipsoid
        else None,
        "towgs84": towgs84,
        "units": units,
        "pm": _PRIME_MERIDIANS.get(str(pm).lower(), pm),
    }


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return a == b


def same_crs(a: Any, b: Any) -> bool:
    """Whether two CRSs (WKT, ``EPSG:n``, PROJ strings, rasterio or pyproj CRS objects) place
    every coordinate at the same spot: equal projection method and parameters, ellipsoid, datum
    shift, prime meridian and units; names, authority codes and axis order do not matter."""
    if a is None or b is None:
        return a is b
    ta, tb = _text(a), _text(b)
    if ta == tb:
        return True
    sa, sb = _signature(ta), _signature(tb)
    if sa is None or sb is None:  # no PROJ form: fall back to pyproj's comparison
        return _parse(ta).equals(_parse(tb), ignore_axis_order=True)
    return _close(sa, sb)


def short_crs(crs: Any) -> str:
    """``EPSG:3035`` where the CRS matches an EPSG code, else its PROJ string (for messages)."""
    if crs is None:
        return "no CRS"
    text = _text(crs)
    parsed = _parse(text)
    code = parsed.to_epsg(min_confidence=70)
    if code is None:  # FORCE's WKT with TOWGS84: match by meaning against the named projection
        code = _epsg_by_meaning(text, parsed)
    if code is not None:
        return f"EPSG:{code}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return parsed.to_proj4() or parsed.name


def _epsg_by_meaning(text: str, parsed) -> int | None:
    """An EPSG code PROJ proposes for the CRS (for a BoundCRS: its source CRS) that
    :func:`same_crs` confirms."""
    base = parsed.source_crs if parsed.is_bound and parsed.source_crs is not None else parsed
    for candidate in base.list_authority(auth_name="EPSG", min_confidence=0):
        if same_crs(text, f"EPSG:{candidate.code}"):
            return int(candidate.code)
    return None


def _text(crs: Any) -> str:
    if isinstance(crs, str):
        return crs
    to_wkt = getattr(crs, "to_wkt", None)
    if to_wkt is not None:
        return to_wkt()
    return str(crs)
