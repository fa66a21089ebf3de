"""Run state per tile: ``<output>/_ledger/<tile>.json``, written only after all of a tile's outputs.

A ledger record holds the tile's input fingerprint (scene names, sizes, mtimes/ETags, date window,
mask), the model digest and the config digest.  ``run`` skips tiles whose record matches the
current inputs (``--force`` redoes them); ``update`` explains, per tile, why it will be processed.
A lease object (``<output>/_lease.json``) keeps two drivers off the same output; a lease whose
driver died expires after its time to live.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from . import __version__, storage
from .errors import OutputError

__all__ = [
    "LEDGER_DIR",
    "tile_fingerprint",
    "file_digest",
    "config_digest",
    "read_record",
    "write_record",
    "compare",
    "changed_inputs",
    "Lease",
]

log = logging.getLogger(__name__)

LEDGER_DIR = "_ledger"
LEASE_NAME = "_lease.json"


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


def write_record(output: str, tile: str, record: dict) -> str:
    """Write the record last, atomically where the filesystem allows."""
    url = record_path(output, tile)
    fs, path = storage.get_fs(url)
    body = json.dumps({**record, "treesits_dask_version": __version__}, indent=2, sort_keys=True, default=str)
    if storage.is_remote(url):
        fs.pipe_file(path, body.encode())
    else:
        fs.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "w") as fh:
            fh.write(body)
        os.replace(tmp, path)
    return url


def compare(record: dict | None, fingerprint: dict, model_digest: str | None = None,
            cfg_digest: str | None = None) -> list[str]:
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
        reasons.append(f"{len(added)} new scene(s): {', '.join(added[:3])}{' ...' if len(added) > 3 else ''}")
    if removed:
        reasons.append(f"{len(removed)} scene(s) gone: {', '.join(removed[:3])}")
    if changed:
        reasons.append(f"{len(changed)} scene(s) changed: {', '.join(changed[:3])}")
    if record.get("fingerprint", {}).get("window") != fingerprint["window"]:
        reasons.append(f"date window {record.get('fingerprint', {}).get('window')} -> {fingerprint['window']}")
    if record.get("fingerprint", {}).get("mask") != fingerprint["mask"]:
        reasons.append("mask changed")
    if model_digest is not None and record.get("model_digest") != model_digest:
        reasons.append("new model")
    if cfg_digest is not None and record.get("config_digest") != cfg_digest:
        reasons.append("settings changed")
    return reasons


def changed_inputs(processed: dict, now: dict) -> list[str]:
    """What changed among the inputs a tile was processed with: scenes gone or changed, another
    mask.  Scenes added since are not a change of what was read (the next ``update`` takes them)."""
    old = {s["name"]: s for s in processed["scenes"]}
    new = {s["name"]: s for s in now["scenes"]}
    gone = sorted(set(old) - set(new))
    changed = sorted(n for n in set(old) & set(new) if old[n] != new[n])
    reasons = []
    if gone:
        reasons.append(f"{len(gone)} scene(s) gone: {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''}")
    if changed:
        reasons.append(f"{len(changed)} scene(s) changed: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}")
    if processed.get("mask") != now.get("mask"):
        reasons.append("mask changed")
    return reasons


def _driver_is_dead(lease: dict) -> bool:
    """True when the lease's driver ran on this machine and its process is gone."""
    host, pid = lease.get("host"), lease.get("pid")
    if host is None or pid is None:  # older lease objects: "host:pid:token"
        parts = str(lease.get("owner", "")).split(":")
        host, pid = (parts[0], parts[1]) if len(parts) >= 3 else (None, None)
    if host != socket.gethostname() or not str(pid).isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


@dataclass
class Lease:
    """A lease on an output: one driver at a time; expires ``ttl`` seconds after its last renewal."""

    output: str
    ttl: float = 900.0
    owner: str = ""

    def __post_init__(self) -> None:
        self.owner = self.owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.url = storage.join(self.output, LEASE_NAME)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict | None:
        fs, path = storage.get_fs(self.url)
        try:
            with fs.open(path, "rt") as fh:
                return json.load(fh)
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            log.warning("the lease %s is not valid JSON; treating the output as not leased", self.url)
            return None
        except OSError as exc:  # storage errors left after retries: do not guess "not leased"
            raise OutputError(
                f"cannot read the lease {self.url}: {exc}; check access to the output and run again"
            ) from exc

    def _write(self) -> None:
        fs, path = storage.get_fs(self.url)
        now = time.time()
        body = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "renewed": now,
                "expires": now + self.ttl,
                "expires_utc": dt.datetime.fromtimestamp(now + self.ttl, dt.UTC).isoformat()}
        if not storage.is_remote(self.url):
            fs.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe_file(path, json.dumps(body).encode())

    def acquire(self) -> Lease:
        """Take the lease, or raise :class:`OutputError` naming the driver that holds it.

        A lease is stale when it expired (its driver stopped renewing it) or when its driver was a
        process on this machine that no longer exists; a stale lease is taken over.
        """
        current = self._read()
        if current and current.get("owner") != self.owner:
            expired = current.get("expires", 0) <= time.time()
            dead = _driver_is_dead(current)
            if not (expired or dead):
                raise OutputError(
                    f"output {self.output} is leased by another driver ({current.get('owner')}) until "
                    f"{current.get('expires_utc')}; wait for it to finish, or delete {self.url} if that "
                    "driver is known to be dead (leases of dead drivers expire on their own)"
                )
            log.warning("taking over the %s lease of %s on %s",
                        "expired" if expired else "dead driver's", current.get("owner"), self.output)
        self._write()
        time.sleep(0.05)
        again = self._read()
        if not again or again.get("owner") != self.owner:
            raise OutputError(f"another driver took the lease on {self.output} at the same time; run again later")
        self._thread = threading.Thread(target=self._renew, daemon=True, name="treesits-lease")
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                current = self._read()
                if current and current.get("owner") != self.owner:
                    log.error("the lease on %s was taken over by %s (this driver did not renew it in "
                              "time); stop this run", self.output, current.get("owner"))
                    return
                self._write()
            except Exception as exc:  # noqa: BLE001 - keep renewing; the run itself reports storage errors
                log.warning("could not renew the lease on %s: %s", self.output, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            current = self._read()
            if current and current.get("owner") == self.owner:
                fs, path = storage.get_fs(self.url)
                fs.rm(path)
        except (OutputError, OSError) as exc:
            log.warning("could not release the lease %s (%s); it expires by itself after %d s",
                        self.url, exc, self.ttl)

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
