"""Run state per tile: ``<output>/_ledger/<tile>.json``, written only after all of a tile's outputs.

A ledger record (:func:`tile_record`) holds the tile's input fingerprint (scene names, sizes,
mtimes/ETags, date window, mask), the model digest, the settings digest, where its outputs are and
its statistics.  ``run`` skips tiles whose record matches the current inputs (``--force`` redoes
them); ``update`` explains, per tile, why it will be processed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable

from ..io import storage
from ..version import __version__

__all__ = [
    "LEDGER_DIR",
    "STORE_NAME",
    "changed_inputs",
    "compare",
    "config_digest",
    "file_digest",
    "read_record",
    "record_path",
    "tile_fingerprint",
    "tile_record",
    "unchanged_scenes",
    "write_record",
]

log = logging.getLogger(__name__)

LEDGER_DIR = "_ledger"
#: the Zarr store of an output, relative to it
STORE_NAME = "predictions.zarr"


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(url: str | None) -> str | None:
    """sha256 of a (small) file's bytes: checkpoints, params, model cards."""
    if not url:
        return None
    fs, path = storage.get_fs(url)
    h = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat(url: str) -> dict:
    fs, path = storage.get_fs(url)
    info = fs.info(path)
    out = {"size": info.get("size")}
    for key in ("ETag", "etag"):
        if info.get(key):
            out["etag"] = str(info[key]).strip('"')
            break
    else:
        mtime = info.get("mtime") or info.get("LastModified")
        out["mtime"] = str(mtime)
    return out


def tile_fingerprint(scenes: Iterable, start, end, mask_url: str | None) -> dict:
    """What a tile's outputs depend on, from listings and file metadata only (no pixel reads)."""
    rows = []
    for s in scenes:
        row = {"name": storage.basename(s.boa), "size": s.size, "mtime": s.mtime}
        if s.qai:
            row["qai"] = storage.basename(s.qai)
        rows.append(row)
    return {
        "scenes": rows,
        "window": [str(start), str(end)],
        "mask": {"name": storage.basename(mask_url), **_stat(mask_url)} if mask_url else None,
    }


def config_digest(settings: dict) -> str:
    return _sha256(settings)


def record_path(output: str, tile: str) -> str:
    return storage.join(output, LEDGER_DIR, f"{tile}.json")


def read_record(output: str, tile: str) -> dict | None:
    fs, path = storage.get_fs(record_path(output, tile))
    try:
        with fs.open(path, "rt") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError) as exc:
        log.warning("ledger record %s is unreadable (%s); the tile will be redone", path, exc)
        return None


def tile_record(
    tile: str,
    fingerprint: dict,
    model_digest: str,
    config_digest: str,
    region,
    cogs: dict[str, str],
    stats: dict,
) -> dict:
    """The ledger record of a finished tile: what it was computed from, where its outputs are
    (``region``: the tile's rows and columns in the Zarr store; ``cogs``: variable -> COG URL)
    and its statistics."""
    return {
        "tile": tile,
        "fingerprint": fingerprint,
        "model_digest": model_digest,
        "config_digest": config_digest,
        "outputs": {
            "zarr": {
                "store": STORE_NAME,
                "rows": [region.row_off, region.row_off + region.height],
                "cols": [region.col_off, region.col_off + region.width],
            },
            "cog": {k: storage.basename(v) for k, v in cogs.items()},
        },
        "stats": stats,
    }


def write_record(output: str, tile: str, record: dict) -> str:
    """Write the record last, atomically (:func:`storage.publish_bytes`)."""
    url = record_path(output, tile)
    body = json.dumps(
        {**record, "treesits_dask_version": __version__}, indent=2, sort_keys=True, default=str
    )
    storage.publish_bytes(body.encode(), url)
    return url


def compare(
    record: dict | None,
    fingerprint: dict,
    model_digest: str | None = None,
    cfg_digest: str | None = None,
) -> list[str]:
    """Reasons to (re)process a tile; empty when its ledger record matches (digests given as None
    are not compared)."""
    if record is None:
        return ["no ledger record (never finished)"]
    reasons = []
    old = {s["name"]: s for s in record.get("fingerprint", {}).get("scenes", [])}
    new = {s["name"]: s for s in fingerprint["scenes"]}
    added = sorted(set(new) - set(old))
    removed = sorted(set(old) - set(new))
    changed = sorted(n for n in set(new) & set(old) if new[n] != old[n])
    if added:
        reasons.append(
            f"{len(added)} new scene(s): {', '.join(added[:3])}{' ...' if len(added) > 3 else ''}"
        )
    if removed:
        reasons.append(f"{len(removed)} scene(s) gone: {', '.join(removed[:3])}")
    if changed:
        reasons.append(f"{len(changed)} scene(s) changed: {', '.join(changed[:3])}")
    if record.get("fingerprint", {}).get("window") != fingerprint["window"]:
        reasons.append(
            f"date window {record.get('fingerprint', {}).get('window')} -> {fingerprint['window']}"
        )
    if record.get("fingerprint", {}).get("mask") != fingerprint["mask"]:
        reasons.append("mask changed")
    if model_digest is not None and record.get("model_digest") != model_digest:
        reasons.append("new model")
    if cfg_digest is not None and record.get("config_digest") != cfg_digest:
        reasons.append("settings changed")
    return reasons


def unchanged_scenes(record: dict | None, fingerprint: dict) -> frozenset[str]:
    """Names of the scenes of ``fingerprint`` that a finished tile's ``record`` holds with the same
    size and modification time (or ETag) and QAI twin: they were read without a problem then."""
    if record is None:
        return frozenset()
    old = {s["name"]: s for s in record.get("fingerprint", {}).get("scenes", [])}
    return frozenset(s["name"] for s in fingerprint["scenes"] if old.get(s["name"]) == s)


def changed_inputs(processed: dict, now: dict) -> list[str]:
    """What changed among the inputs a tile was processed with: scenes gone or changed, another
    mask.  Scenes added since are not a change of what was read (the next ``update`` takes them)."""
    old = {s["name"]: s for s in processed["scenes"]}
    new = {s["name"]: s for s in now["scenes"]}
    gone = sorted(set(old) - set(new))
    changed = sorted(n for n in set(old) & set(new) if old[n] != new[n])
    reasons = []
    if gone:
        reasons.append(
            f"{len(gone)} scene(s) gone: {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}"
        )
    if changed:
        reasons.append(
            f"{len(changed)} scene(s) changed: "
            f"{', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}"
        )
    if processed.get("mask") != now.get("mask"):
        reasons.append("mask changed")
    return reasons
