"""A static STAC catalog of a finished output: one Item per tile, its COGs as assets, and one
Item per model that made the tiles, described with the STAC Machine Learning Model extension
(MLM: input bands and preprocessing, output classes, framework, weights and their sha256), which
every tile item links to (``derived_from``, as the MLM specification asks).

``<output>/stac/catalog.json`` is self-contained (relative links and asset hrefs), so the whole
output folder can be copied or synced to S3 and still resolves.  Items carry the footprint in
EPSG:4326, the ``proj`` (grid), ``raster`` (dtype, nodata) and, for the class layers,
``classification`` extensions, plus the quicklook PNGs when present.  Output is deterministic:
no wall-clock timestamps; item times come from the scene dates in the tiles' ledger records and
``run.json``.

This module is longer than 400 lines because tile items and model items share the catalog's
conventions (hrefs, times, validation).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import OutputError
from ..io import storage
from .quicklook import class_colors, find_tiles
from .repo import MapRepo
from .schema import ALERT_STATES, CLASS_NODATA, DESCRIPTIONS

__all__ = ["write_stac"]

log = logging.getLogger(__name__)

_ASSETS = {
    "probability": (
        "Class probability",
        "probability per class, one band per class (NaN = not predicted)",
    ),
    "class": ("Class", f"most probable class ({CLASS_NODATA} = not predicted)"),
    "valid_obs": ("Valid observations", "valid observations used by the model (0 = not predicted)"),
    "last_obs_valid": (
        "Newest scene valid",
        f"1 = newest scene valid, 0 = screened, {CLASS_NODATA} = not predicted",
    ),
    "last_valid_date": ("Newest valid observation", DESCRIPTIONS["last_valid_date"]),
    "entropy": ("Entropy", DESCRIPTIONS["entropy"]),
    "margin": ("Margin", DESCRIPTIONS["margin"]),
    "least": ("Least confidence", DESCRIPTIONS["least"]),
    "alert_first_seen": ("Alert first seen", DESCRIPTIONS["alert_first_seen"]),
    "alert_confirmations": ("Alert confirmations", DESCRIPTIONS["alert_confirmations"]),
    "alert_state": ("Alert state", DESCRIPTIONS["alert_state"]),
    "probability_smoothed": ("Smoothed probability", DESCRIPTIONS["probability_smoothed"]),
    "class_smoothed": ("Smoothed class", DESCRIPTIONS["class_smoothed"]),
}
_QUICKLOOKS = ("class", "probability", "valid_obs", "class_smoothed", "probability_smoothed",
               "entropy", "margin", "least", "alert_state")  # fmt: skip
#: item time when neither the arguments nor run.json give one (deterministic, flagged in the log)
_UNKNOWN_TIME = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _stac_io():
    """A pystac StacIO that reads and writes through fsspec (local paths and s3:// alike)."""
    import pystac

    class FsspecStacIO(pystac.StacIO):
        def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
            fs, path = storage.get_fs(str(source))
            with fs.open(path, "r", encoding="utf-8") as fh:
                return fh.read()

        def write_text(self, dest: Any, txt: str, *args: Any, **kwargs: Any) -> None:
            fs, path = storage.get_fs(str(dest))
            if not storage.is_remote(str(dest)):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            fs.pipe_file(path, txt.encode("utf-8"))

    return FsspecStacIO()


def _href(url: str) -> str:
    """What pystac gets as an href: absolute local path or the remote URL."""
    return url if storage.is_remote(url) else storage.strip_protocol(url)


def _read_json(url: str) -> dict:
    fs, path = storage.get_fs(url)
    if not fs.exists(path):
        return {}
    with fs.open(path, "r", encoding="utf-8") as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise OutputError(f"{url} is not valid JSON ({exc}); rerun the pipeline") from exc


def _parse_time(value: Any, end: bool = False) -> dt.datetime | None:
    """UTC datetime from a date, datetime or ISO string; a bare date ends at 23:59:59 if ``end``."""
    if value is None:
        return None
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value) if "T" in value else dt.date.fromisoformat(value)
    if not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time(23, 59, 59) if end else dt.time(0))
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def _times(
    tiles: Sequence[str], run: dict, start: Any, end: Any
) -> dict[str, tuple[dt.datetime, dt.datetime]]:
    """(start, end) per tile: the arguments, else the tile's scene dates in run.json, else the
    range over all tiles in run.json, else 1970-01-01 (with a warning)."""
    given = (_parse_time(start), _parse_time(end, end=True))
    stats = run.get("tiles") or {}
    known = {
        t: (_parse_time(s["first_scene"]), _parse_time(s["last_scene"], end=True))
        for t, s in stats.items()
        if isinstance(s, dict) and s.get("first_scene") and s.get("last_scene")
    }
    overall = (
        (min(v[0] for v in known.values()), max(v[1] for v in known.values())) if known else None
    )
    out = {}
    for tile in tiles:
        s, e = known.get(tile) or overall or (None, None)
        s, e = given[0] or s, given[1] or e
        if s is None or e is None:
            log.warning("no date for tile %s (no run.json scene dates); using 1970-01-01", tile)
            s, e = s or e or _UNKNOWN_TIME, e or s or _UNKNOWN_TIME
        if s > e:
            raise OutputError(f"STAC item {tile}: start {s} is after end {e}")
        out[tile] = (s, e)
    return out


def _footprint(src) -> tuple[dict, list[float]]:
    """GeoJSON polygon (EPSG:4326, edges densified) and bbox of a raster's extent."""
    from rasterio.crs import CRS
    from rasterio.warp import transform, transform_bounds

    left, bottom, right, top = src.bounds
    n = 4
    xs, ys = [], []
    for i in range(n):  # counter-clockwise: bottom, right, top, left edge
        xs.append(left + (right - left) * i / n)
        ys.append(bottom)
    for i in range(n):
        xs.append(right)
        ys.append(bottom + (top - bottom) * i / n)
    for i in range(n):
        xs.append(right - (right - left) * i / n)
        ys.append(top)
    for i in range(n):
        xs.append(left)
        ys.append(top - (top - bottom) * i / n)
    wgs84 = CRS.from_epsg(4326)
    lons, lats = transform(src.crs, wgs84, xs, ys)
    ring = [[round(x, 7), round(y, 7)] for x, y in zip(lons, lats, strict=True)]
    ring.append(ring[0])
    bbox = [round(v, 7) for v in transform_bounds(src.crs, wgs84, *src.bounds, densify_pts=21)]
    return {"type": "Polygon", "coordinates": [ring]}, bbox


def _raster_bands(src) -> list:
    from pystac.extensions.raster import DataType, NoDataStrings, RasterBand

    bands = []
    for dtype in src.dtypes:
        nodata: Any = src.nodata
        if nodata is not None and math.isnan(nodata):
            nodata = NoDataStrings.NAN
        elif nodata is not None:
            nodata = int(nodata) if float(nodata).is_integer() else float(nodata)
        bands.append(
            RasterBand.create(
                nodata=nodata, data_type=DataType(dtype), spatial_resolution=abs(src.transform.a)
            )
        )
    return bands


def _classification(names: Sequence[str], variable: str) -> list:
    from pystac.extensions.classification import Classification

    if variable == "last_obs_valid":
        classes = [
            Classification.create(value=0, name="screened", description="newest scene screened"),
            Classification.create(value=1, name="valid", description="newest scene valid"),
        ]
    elif variable == "alert_state":
        classes = [Classification.create(value=v, name=k) for k, v in ALERT_STATES.items()]
    else:
        classes = [
            Classification.create(
                value=i,
                name=re.sub(r"[^0-9A-Za-z_-]+", "_", name).strip("_") or f"class_{i}",
                title=name,
                color_hint=color.lstrip("#").upper(),
            )
            for i, (name, color) in enumerate(zip(names, class_colors(len(names)), strict=True))
        ]
    classes.append(Classification.create(value=CLASS_NODATA, name="not_predicted", nodata=True))
    return classes


def _tile_item(
    output: str,
    tile: str,
    times: tuple[dt.datetime, dt.datetime],
    stats: dict,
    quicklook_dir: str,
    extra: dict,
):
    import pystac
    import rasterio
    from pystac.extensions.classification import ClassificationExtension
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import RasterExtension

    folder = storage.join(output, "cog", tile)
    prob_url = storage.join(folder, "probability.tif")
    with rasterio.open(storage.gdal_path(prob_url)) as src:
        geometry, bbox = _footprint(src)
        crs, tr, shape, bounds = src.crs, src.transform, [src.height, src.width], src.bounds
        names = [d or f"class {i}" for i, d in enumerate(src.descriptions)]
    start, end = times
    props: dict[str, Any] = dict(extra)
    for key in ("scenes", "pixels_predicted"):
        if key in stats:
            props[f"treesits_dask:{key}"] = stats[key]
    item = pystac.Item(
        id=tile,
        geometry=geometry,
        bbox=bbox,
        datetime=None,
        properties=props,
        start_datetime=start,
        end_datetime=end,
    )
    item.common_metadata.gsd = abs(tr.a)
    epsg = crs.to_epsg()
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=f"EPSG:{epsg}" if epsg else None,
        wkt2=None if epsg else crs.to_wkt(version="WKT2_2019"),
        shape=shape,
        transform=[tr.a, tr.b, tr.c, tr.d, tr.e, tr.f],
        bbox=list(bounds),
    )
    for var, (title, description) in _ASSETS.items():
        url = storage.join(folder, f"{var}.tif")
        fs, path = storage.get_fs(url)
        if not fs.exists(path):
            continue
        if var in ("probability", "probability_smoothed"):
            description += f"; bands: {', '.join(names)}"
        asset = pystac.Asset(
            href=_href(url),
            media_type=pystac.MediaType.COG,
            roles=["data"],
            title=title,
            description=description,
        )
        item.add_asset(var, asset)
        with rasterio.open(storage.gdal_path(url)) as src:
            RasterExtension.ext(asset, add_if_missing=True).apply(bands=_raster_bands(src))
        if var in ("class", "class_smoothed", "last_obs_valid", "alert_state"):
            ClassificationExtension.ext(asset, add_if_missing=True).apply(
                classes=_classification(names, var)
            )
    _add_quicklooks(item, tile, quicklook_dir)
    return item


def _add_quicklooks(item, tile: str, quicklook_dir: str) -> None:
    import pystac

    for var in _QUICKLOOKS:
        url = storage.join(quicklook_dir, f"{tile}_{var}.png")
        fs, path = storage.get_fs(url)
        if not fs.exists(path):
            continue
        key, roles = f"{var}_quicklook", ["overview"]
        if "thumbnail" not in item.assets:  # the class map (binary models: the probability map)
            key, roles = "thumbnail", ["thumbnail", "overview"]
        item.add_asset(
            key,
            pystac.Asset(
                href=_href(url),
                media_type=pystac.MediaType.PNG,
                roles=roles,
                title=f"{_ASSETS[var][0]} quicklook",
            ),
        )


def _validate(objects: Sequence) -> None:
    """Check each object against the core STAC schema shipped with pystac (no network); extension
    schemas would have to be downloaded and are skipped.  No-op without jsonschema."""
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        log.info("jsonschema is not installed; STAC items are not validated")
        return
    import pystac
    from pystac.validation.stac_validator import JsonSchemaSTACValidator

    validator = JsonSchemaSTACValidator()
    for obj in objects:
        try:
            validator.validate_core(
                obj.to_dict(), obj.STAC_OBJECT_TYPE, obj.to_dict()["stac_version"]
            )
        except pystac.STACValidationError as exc:
            raise OutputError(f"STAC object {obj.id} is not valid ({exc}); this is a bug") from exc


def write_stac(
    output: str,
    *,
    tiles: Sequence[str] | None = None,
    quicklook_dir: str | None = None,
    catalog_id: str = "treesits-dask",
    title: str | None = None,
    description: str | None = None,
    start_datetime: str | dt.date | dt.datetime | None = None,
    end_datetime: str | dt.date | dt.datetime | None = None,
    validate: bool = True,
) -> str:
    """Write ``<output>/stac/catalog.json`` with one Item per tile COG folder; returns its URL.

    Item times: ``start_datetime`` / ``end_datetime`` if given, else the tile's first and last
    scene from ``<output>/run.json``.  Quicklook PNGs (``quicklook_dir``, default
    ``<output>/quicklook``) become ``thumbnail`` / ``overview`` assets.  ``validate`` checks the
    objects against the core STAC schemas (offline; needs jsonschema).  Rewriting is idempotent.
    """
    try:
        import pystac
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise ImportError("STAC catalogs need pystac: pip install pystac") from exc

    tiles = sorted(tiles) if tiles is not None else find_tiles(output)
    if not tiles:
        raise OutputError(
            f"no tile COGs under {storage.join(output, 'cog')}; run the pipeline with COG output "
            "before writing a STAC catalog"
        )
    quicklook_dir = quicklook_dir or storage.join(output, "quicklook")
    run = _read_json(storage.join(output, "run.json"))
    # run.json covers only the tiles of the latest run (an update may process one tile); every
    # finished tile's record in the map has its own scene dates
    repo = MapRepo(output)
    records = repo.records() if repo.exists() else {}
    for tile in tiles:
        record = records.get(tile)
        if record and isinstance(record.get("stats"), dict):
            run.setdefault("tiles", {})[tile] = record["stats"]
    store_attrs = repo.attributes() if repo.exists() else {}
    extra = {
        f"treesits_dask:{k}": store_attrs[k] for k in ("model_family", "model") if k in store_attrs
    }
    times = _times(tiles, run, start_datetime, end_datetime)
    catalog = pystac.Catalog(
        id=catalog_id,
        title=title or "treesits_dask predictions",
        description=description
        or f"Per-pixel model predictions on {len(tiles)} FORCE tile(s) as COGs: class probability, "
        "class (multi-class models), valid observations and newest-scene validity",
    )
    items = []
    for tile in tiles:
        stats = (run.get("tiles") or {}).get(tile) or {}
        items.append(_tile_item(output, tile, times[tile], stats, quicklook_dir, extra))
    catalog.add_items(items)
    models = _link_models(repo, records, items, times) if repo.exists() else []
    if models:
        catalog.add_items(models)
    root = _href(storage.join(output, "stac"))
    catalog.normalize_hrefs(root)
    catalog.make_all_asset_hrefs_relative()
    if validate:
        _validate([catalog, *items, *models])
    catalog.save(pystac.CatalogType.SELF_CONTAINED, stac_io=_stac_io())
    url = storage.join(output, "stac", "catalog.json")
    log.info("wrote STAC catalog %s (%d items)", url, len(items))
    return url


# ------------------------------------------------------------------------------ models (MLM)
#: the STAC Machine Learning Model extension
MLM_SCHEMA = "https://stac-extensions.github.io/mlm/v1.4.0/schema.json"
_ARCHITECTURES = {"sbert": "SITS-BERT", "sits-lstm": "LSTM", "sits-transformer": "Transformer"}
_PREPROCESSING = {
    "sbert": (
        "treesits_dask.models.preprocess:sbert_inputs",
        "the latest 256 valid observations of the 1460 days up to the window end (one pixel), "
        "reflectance / 10000, z-score per pixel and band over them (ddof 0, std + 1e-6), "
        "right-aligned, positions = day index from the day of year of the first kept observation",
    ),
    "full": (
        "treesits_dask.models.preprocess:full_inputs",
        "every scene of the window in date order, raw BOA integers (reflectance x 10000) as "
        "float, invalid observations (nodata or QAI-screened) 0 in all bands",
    ),
}


def _model_item(info: dict, geometry, bbox, times):
    """A STAC Item with the MLM extension describing one model of the map (what a run kept in
    the map: its card, weights name, location and sha256, framework version)."""
    import pystac

    from ..io.discovery import S2_BANDS

    card = info["card"]
    seq = card["sequence"]
    sbert = seq.get("kind") == "sbert"
    function, description = _PREPROCESSING["sbert" if sbert else "full"]
    # classification v1.1.0 (what MLM 1.4.0 refers to): value and description required
    colors = class_colors(len(card["class_names"]))
    classes = [
        {"value": i, "name": re.sub(r"[^0-9A-Za-z_-]+", "_", name).strip("_") or f"class_{i}",
         "description": name, "color_hint": colors[i].lstrip("#").upper()}
        for i, name in enumerate(card["class_names"])
    ]  # fmt: skip
    sigmoid = card["output_kind"] == "sigmoid"
    props: dict[str, Any] = {
        "mlm:name": info["name"],
        "mlm:architecture": _ARCHITECTURES.get(card["family"], card["family"]),
        "mlm:tasks": ["classification"],
        "mlm:framework": "PyTorch",
        "mlm:input": [{
            "name": "Sentinel-2 Level-2 time series (FORCE BOA)",
            "bands": list(S2_BANDS),
            "input": {"shape": [-1, int(seq["seq_len"]) if sbert else -1, len(S2_BANDS)],
                      "dim_order": ["batch", "time", "bands"], "data_type": "float32"},
            "description": description,
            "value_scaling": None,
            "resize_type": None,
            "pre_processing_function": {"format": "python", "expression": function},
        }],
        "mlm:output": [{
            "name": "probability",
            "tasks": ["classification"],
            "result": {"shape": [-1, len(classes)], "dim_order": ["batch", "class"],
                       "data_type": "float32"},
            "description": "probability of the class (sigmoid of one logit)" if sigmoid
            else "class probabilities (softmax); the map's class is their argmax",
            "classification:classes": classes,
        }],
        "mlm:hyperparameters": card["hyperparameters"],
        "bands": [{"name": b} for b in S2_BANDS],
        "treesits_dask:model_digest": info["digest"],
        "treesits_dask:family": info["family"],
    }  # fmt: skip
    if info.get("framework_version"):
        props["mlm:framework_version"] = info["framework_version"]
    if info.get("metrics"):
        props["treesits_dask:validation_metrics"] = info["metrics"]
    item = pystac.Item(
        id=f"model-{info['digest'][:12]}", geometry=geometry, bbox=bbox, datetime=None,
        properties=props, start_datetime=times[0], end_datetime=times[1],
        stac_extensions=[MLM_SCHEMA],
    )  # fmt: skip
    # STAC 1.1 allows item-level bands only beside assets that carry them: the model's input
    extra = {"mlm:artifact_type": "torch.save", "treesits_dask:sha256": info["weights_sha256"],
             "bands": [{"name": b} for b in S2_BANDS]}  # fmt: skip
    item.add_asset("weights", pystac.Asset(
        href=_href(info["weights_uri"]), media_type="application/octet-stream",
        roles=["mlm:model", "mlm:weights", "data"], title=f"{info['weights']} (state dict)",
        description="plain state dict: load with torch.load(weights_only=True)",
        extra_fields=extra,
    ))  # fmt: skip
    return item


def _link_models(repo: MapRepo, records: dict, items: list, times: dict) -> list:
    """A model item (MLM) per model that made the catalog's tiles; each tile item links to its
    model (``derived_from``, with the model's ``mlm:name``)."""
    import pystac

    models = repo.models()
    by_digest: dict[str, list] = {}
    for item in items:
        digest = (records.get(item.id) or {}).get("model_digest")
        if digest in models:
            by_digest.setdefault(digest, []).append(item)
    out = []
    for digest, linked in sorted(by_digest.items()):
        boxes = np.array([i.bbox for i in linked])
        bbox = [float(boxes[:, 0].min()), float(boxes[:, 1].min()), float(boxes[:, 2].max()),
                float(boxes[:, 3].max())]  # fmt: skip
        ring = [[bbox[0], bbox[1]], [bbox[2], bbox[1]], [bbox[2], bbox[3]], [bbox[0], bbox[3]],
                [bbox[0], bbox[1]]]  # fmt: skip
        span = [times[i.id] for i in linked]
        when = (min(s for s, _ in span), max(e for _, e in span))
        model = _model_item(models[digest], {"type": "Polygon", "coordinates": [ring]}, bbox,
                            when)  # fmt: skip
        for item in linked:
            item.add_link(pystac.Link(
                "derived_from", model, media_type=pystac.MediaType.GEOJSON,
                title=f"model {models[digest]['name']}",
                extra_fields={"mlm:name": models[digest]["name"]},
            ))  # fmt: skip
        out.append(model)
    return out
