"""A lease on an output (``<output>/_lease.json``): one driver at a time.

The driver renews the lease while it runs; a lease whose driver died expires after its time to
live, or at once when its driver was a process on this machine that no longer exists, or an
earlier pod of the same Kubernetes Job (``TREESITS_DRIVER_JOB``, set by the CronJob's pod
template): a Job runs one pod at a time, so the pod that retries a failed run takes over at once
instead of waiting ``lease_ttl``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from ..errors import OutputError
from ..io import storage

__all__ = ["JOB_ENV", "LEASE_NAME", "Lease"]

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
#: The environment variable with the name of the Kubernetes Job that runs this driver (not a
#: setting: the driver pod gets it from its ``job-name`` label)
JOB_ENV = "TREESITS_DRIVER_JOB"


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
    """A lease on an output: one driver at a time; expires ``ttl`` seconds after its last
    renewal."""

    output: str
    ttl: float = 900.0
    owner: str = ""
    job: str | None = None

    def __post_init__(self) -> None:
        self.owner = self.owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.job = self.job or os.environ.get(JOB_ENV) or None
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
            log.warning(
                "the lease %s is not valid JSON; treating the output as not leased", self.url
            )
            return None
        except OSError as exc:  # storage errors left after retries: do not guess "not leased"
            raise OutputError(
                f"cannot read the lease {self.url}: {exc}; check access to the output and run again"
            ) from exc

    def _write(self) -> None:
        now = time.time()
        body = {
            "owner": self.owner,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "job": self.job,
            "renewed": now,
            "expires": now + self.ttl,
            "expires_utc": dt.datetime.fromtimestamp(now + self.ttl, dt.UTC).isoformat(),
        }
        storage.publish_bytes(json.dumps(body).encode(), self.url)

    def acquire(self) -> Lease:
        """Take the lease, or raise :class:`OutputError` naming the driver that holds it.

        A lease is stale when it expired (its driver stopped renewing it) or when its driver was a
        process on this machine that no longer exists; a stale lease is taken over.
        """
        current = self._read()
        if current and current.get("owner") != self.owner:
            expired = current.get("expires", 0) <= time.time()
            dead = _driver_is_dead(current)
            # the Job's earlier pod: a Job runs one pod at a time (the CronJob forbids overlap)
            retry = bool(self.job) and current.get("job") == self.job
            if not (expired or dead or retry):
                raise OutputError(
                    f"output {self.output} is leased by another driver ({current.get('owner')}) "
                    "until "
                    f"{current.get('expires_utc')}; wait for it to finish, or delete {self.url} if "
                    "that "
                    "driver is known to be dead (leases of dead drivers expire on their own)"
                )
            log.warning(
                "taking over the %s lease of %s on %s",
                "expired" if expired else "dead driver's" if dead else f"Job {self.job}'s earlier",
                current.get("owner"),
                self.output,
            )
        self._write()
        time.sleep(0.05)
        again = self._read()
        if not again or again.get("owner") != self.owner:
            raise OutputError(
                f"another driver took the lease on {self.output} at the same time; run again later"
            )
        self._thread = threading.Thread(target=self._renew, daemon=True, name="treesits-lease")
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                current = self._read()
                if current and current.get("owner") != self.owner:
                    log.error(
                        "the lease on %s was taken over by %s (this driver did not renew it in "
                        "time); stop this run",
                        self.output,
                        current.get("owner"),
                    )
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
            log.warning(
                "could not release the lease %s (%s); it expires by itself after %d s",
                self.url,
                exc,
                self.ttl,
            )

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
