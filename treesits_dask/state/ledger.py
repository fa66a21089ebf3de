"""What a finished tile was computed from: its record, written into the map repository together
with the tile's data (:meth:`treesits_dask.outputs.repo.MapRepo.commit_tile`).

A record (:func:`tile_record`) holds the tile's input fingerprint (:func:`tile_fingerprint`:
scene names, sizes and modification times or ETags of BOA and QAI files, the date window, the
mask's content digest), the block shape of each scene's BOA file (its file layout, from the
headers the driver read), the model digest, the settings digest, where its outputs are and its
statistics.  ``run`` skips tiles whose record matches the current inputs (``--force`` redoes
them); ``update`` explains, per tile, why it will be processed (:func:`compare`).  Everything
here reads listings and file metadata only (and masks whose size or time changed).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import uuid
from collections.abc import Iterable

from ..io import storage
from ..version import __version__

__all__ = [
    "changed_inputs",
    "compare",
    "config_digest",
    "file_digest",
    "known_scenes",
    "mask_fingerprint",
    "same_mask",
    "tile_fingerprint",
    "tile_record",
]

log = logging.getLogger(__name__)


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


def mask_fingerprint(mask_url: str | None, previous: dict | None = None) -> dict | None:
    """The mask's name, size, time (or ETag) and content digest; the digest of ``previous`` (the
    mask entry of the tile's record) is reused when size and time are unchanged."""
    if not mask_url:
        return None
    out = {"name": storage.basename(mask_url), **_stat(mask_url)}
    same = previous and all(previous.get(k) == v for k, v in out.items()) and previous.get("sha256")
    out["sha256"] = previous["sha256"] if same else file_digest(mask_url)
    return out


def tile_fingerprint(scenes: Iterable, start, end, mask: dict | None) -> dict:
    """What a tile's outputs depend on, from listings and file metadata only (no pixel reads):
    every scene's BOA and QAI name, size and time (or ETag), the date window and the mask
    (:func:`mask_fingerprint`)."""
    rows = []
    for s in scenes:
        row = {"name": storage.basename(s.boa), "size": s.size, "mtime": s.mtime}
        if s.qai:
            row.update(qai=storage.basename(s.qai), qai_size=s.qai_size, qai_mtime=s.qai_mtime)
        rows.append(row)
    return {"scenes": rows, "window": [str(start), str(end)], "mask": mask}


def config_digest(settings: dict) -> str:
    return _sha256(settings)


def tile_record(
    tile: str,
    fingerprint: dict,
    model_digest: str,
    config_digest: str,
    region,
    stats: dict,
    run_id: str,
    reasons: list[str] | tuple[str, ...] = (),
    blocks: dict[str, tuple[int, int]] | None = None,
) -> dict:
    """The record of a finished tile: what it was computed from, where its data is in the map
    (``region``: its rows and columns), its statistics, the run, why it was processed and a
    unique ``record_id`` (the tile's COGs name the record they were made from).

    ``blocks``: the block shape of each scene's BOA file by scene name, kept as the shape of most
    scenes and the others' (``{"shape": [300, 3000], "others": {name: [256, 256]}}``), so
    that a later run knows the file layout of the scenes it does not open again
    (:func:`known_scenes`)."""
    record = {
        "tile": tile,
        "record_id": uuid.uuid4().hex,
        "run": run_id,
        "reasons": list(reasons),
        "fingerprint": fingerprint,
        "model_digest": model_digest,
        "config_digest": config_digest,
        "region": {
            "rows": [region.row_off, region.row_off + region.height],
            "cols": [region.col_off, region.col_off + region.width],
        },
        "stats": stats,
        "treesits_dask_version": __version__,
    }
    if blocks:
        counts = collections.Counter(blocks.values())
        shape = max(counts, key=counts.__getitem__)
        record["blocks"] = {
            "shape": list(shape),
            "others": {name: list(b) for name, b in blocks.items() if tuple(b) != tuple(shape)},
        }
    return record


def same_mask(a: dict | None, b: dict | None) -> bool:
    """Whether two mask fingerprints name the same mask content (times may differ)."""
    if a is None or b is None:
        return a is b
    return (a.get("name"), a.get("sha256")) == (b.get("name"), b.get("sha256"))


def compare(
    record: dict | None,
    fingerprint: dict,
    model_digest: str | None = None,
    cfg_digest: str | None = None,
) -> list[str]:
    """Reasons to (re)process a tile; empty when its record matches (digests given as None are
    not compared)."""
    if record is None:
        return ["no record (never finished)"]
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
    if not same_mask(record.get("fingerprint", {}).get("mask"), fingerprint["mask"]):
        reasons.append("mask changed")
    if model_digest is not None and record.get("model_digest") != model_digest:
        reasons.append("new model")
    if cfg_digest is not None and record.get("config_digest") != cfg_digest:
        reasons.append("settings changed")
    return reasons


def known_scenes(record: dict | None, fingerprint: dict) -> dict[str, tuple[int, int]]:
    """The scenes of ``fingerprint`` that a finished tile's ``record`` holds with the same size and
    modification time (or ETag) and QAI twin, by name, with their BOA file's block shape: their
    headers were read without a problem then, and need not be read again.  A record written
    before block shapes were recorded knows none (their headers are read once more, for their
    file layout)."""
    if record is None or "blocks" not in record:
        return {}
    old = {s["name"]: s for s in record.get("fingerprint", {}).get("scenes", [])}
    shape, others = tuple(record["blocks"]["shape"]), record["blocks"].get("others", {})
    return {
        s["name"]: tuple(others.get(s["name"], shape))
        for s in fingerprint["scenes"]
        if old.get(s["name"]) == s
    }


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
    if not same_mask(processed.get("mask"), now.get("mask")):
        reasons.append("mask changed")
    return reasons
