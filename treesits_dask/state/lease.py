"""A lease on an output (``<output>/_lease.json``): one driver at a time, by construction.

Taking the lease is a conditional write: create-if-absent (S3 ``If-None-Match: *``; locally an
exclusive create under a lock), or replace-if-unchanged for a stale lease (S3 ``If-Match: <etag>``;
locally compare-and-replace under the same lock).  Of two drivers that start at the same moment,
exactly one gets it.  The holder renews it (replace-if-unchanged) every ``ttl / 3`` seconds; a
driver whose renewal fails, or that could not renew within ``ttl``, has lost it: :meth:`Lease.check`
raises from then on, so it submits no more tiles and commits nothing.

A lease is stale when it expired, or when its driver is a process known to be gone: same host,
same boot, same PID namespace, and no process with that PID and start time.  Containers that
share a host name, a PID or a boot are told apart by the namespace and the start time.  An
unreadable lease is not taken for free: it is held until it is deleted.  A driver pod of a
Kubernetes Job (``TREESITS_DRIVER_JOB``, set from the pod's ``job-name`` label) takes over the
lease of an earlier pod of the same Job at once: a Job runs one pod at a time, so the pod that
retries a failed run does not wait ``ttl`` for its predecessor's lease to expire.

Object stores must support conditional writes (AWS S3, MinIO, moto, Ceph RGW; check yours as
cluster/README.md says).  Where they do not, exclusion falls back to the renewal check and
the map repository's own conflict detection (cluster/README.md).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..errors import OutputError
from ..io import storage

__all__ = ["JOB_ENV", "LEASE_NAME", "Lease", "LeaseLostError"]

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
_LOCK_NAME = ".lease.lock"
#: The environment variable with the name of the Kubernetes Job that runs this driver (not a
#: setting: the driver pod gets it from its ``job-name`` label)
JOB_ENV = "TREESITS_DRIVER_JOB"


class LeaseLostError(OutputError):
    """This driver no longer holds the output's lease: it stops and marks nothing done."""


def _process_identity(pid: int | None = None) -> dict:
    """What tells this process apart from any other: host, boot, PID namespace, PID, start."""
    pid = os.getpid() if pid is None else pid
    ident = {"host": socket.gethostname(), "pid": pid}
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as fh:
            ident["boot_id"] = fh.read().strip()
    with contextlib.suppress(OSError):
        ident["pid_ns"] = os.readlink("/proc/self/ns/pid")
    start = _start_time(pid)
    if start is not None:
        ident["start_ticks"] = start
    return ident


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an S3 error is a refused conditional write (HTTP 412 ``PreconditionFailed``; s3fs
    passes on only its message, "At least one of the pre-conditions you specified did not
    hold")."""
    return "precondition" in str(exc).lower().replace("-", "")


def _driver_is_dead(lease: dict) -> bool:
    """True when the lease's driver ran in this machine's PID namespace and is gone."""
    me = _process_identity()
    if any(lease.get(k) != me.get(k) for k in ("host", "boot_id", "pid_ns")) or "pid_ns" not in me:
        return False
    pid = lease.get("pid")
    if not isinstance(pid, int):
        return False
    start = _start_time(pid)
    return start is None or start != lease.get("start_ticks")


@dataclass
class Lease:
    """The lease of ``output`` for this driver (a context manager)."""

    output: str
    ttl: float = 900.0
    owner: str = ""
    job: str | None = None
    _etag: str | None = field(default=None, init=False, repr=False)
    _expires: float = field(default=0.0, init=False, repr=False)
    _lost: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.owner = self.owner or uuid.uuid4().hex
        self.job = self.job or os.environ.get(JOB_ENV) or None
        self.url = storage.join(self.output, LEASE_NAME)
        self.remote = storage.is_remote(self.url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ storage primitives
    def _body(self) -> bytes:
        now = time.time()
        body = {
            "owner": self.owner, **_process_identity(), "job": self.job, "renewed": now,
            "expires": now + self.ttl,
            "expires_utc": dt.datetime.fromtimestamp(now + self.ttl, dt.UTC).isoformat(),
        }  # fmt: skip
        return json.dumps(body).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        """The current lease and its version (ETag; locally a content digest), or (None, None)."""
        fs, path = storage.get_fs(self.url)
        try:
            if self.remote:  # the ETag before and after the GET must agree (each body differs)
                for _ in range(5):
                    etag = str(fs.info(path, refresh=True).get("ETag", "")).strip('"') or None
                    data = fs.cat_file(path)
                    if etag == str(fs.info(path, refresh=True).get("ETag", "")).strip('"'):
                        break
            else:
                with open(path, "rb") as fh:
                    data = fh.read()
                etag = hashlib.sha256(data).hexdigest()
        except FileNotFoundError:
            return None, None
        except OSError as exc:  # storage errors left after retries: do not guess "not leased"
            raise OutputError(
                f"cannot read the lease {self.url}: {exc}; check access to the output and run again"
            ) from exc
        try:
            return json.loads(data), etag
        except ValueError:
            raise OutputError(
                f"the lease {self.url} is unreadable; if no driver works on {self.output}, delete "
                "it and run again"
            ) from None

    @contextlib.contextmanager
    def _local_lock(self):
        """Locally, read-compare-write happens under an exclusive lock of ``.lease.lock``."""
        if self.remote:
            yield
            return
        folder = storage.strip_protocol(self.output)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, _LOCK_NAME), "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _put(self, body: bytes, expected: str | None) -> str | None:
        """Write ``body`` if the lease is still at version ``expected`` (None: absent); return the
        new version, or None when another driver changed it first."""
        fs, path = storage.get_fs(self.url)
        if not self.remote:
            _, current = self._read()
            if current != expected:
                return None
            storage.publish_bytes(body, self.url)
            return hashlib.sha256(body).hexdigest()
        bucket, key = path.split("/", 1)
        condition = {"IfNoneMatch": "*"} if expected is None else {"IfMatch": f'"{expected}"'}
        try:
            answer = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)
        except (FileExistsError, OSError) as exc:
            # a retried PUT whose first answer was lost fails its own condition: check the owner
            now, etag = self._read()
            if now and now.get("owner") == self.owner:
                return etag
            if isinstance(exc, FileExistsError) or _precondition_failed(exc):
                return None
            raise OutputError(f"cannot write the lease {self.url}: {exc}") from exc
        return str(answer.get("ETag", "")).strip('"') or None

    # ------------------------------------------------------------------ the lease
    def acquire(self) -> Lease:
        """Take the lease, or raise :class:`OutputError` naming the driver that holds it."""
        with self._local_lock():
            current, etag = self._read()
            if current is not None and current.get("owner") != self.owner:
                expired = current.get("expires", 0) <= time.time()
                dead = _driver_is_dead(current)
                # the same Job's earlier pod: a Job runs one pod at a time
                retry = bool(self.job) and current.get("job") == self.job
                if not (expired or dead or retry):
                    raise OutputError(
                        f"output {self.output} is leased by another driver (on "
                        f"{current.get('host')}, pid {current.get('pid')}) until "
                        f"{current.get('expires_utc')}; wait for it to finish, or delete {self.url}"
                        " if that driver is known to be dead (leases of dead drivers expire on "
                        "their own)"
                    )
                log.warning(
                    "taking over the %s lease of %s on %s",
                    "expired" if expired else "dead driver's" if dead else f"Job {self.job}'s",
                    current.get("host"),
                    self.output,
                )
            body = self._body()
            new = self._put(body, etag if current is not None else None)
        if new is None:
            raise OutputError(
                f"another driver took the lease on {self.output} at the same time; run again later"
            )
        self._etag, self._expires = new, time.time() + self.ttl
        self._thread = threading.Thread(target=self._renew, daemon=True, name="treesits-lease")
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                with self._local_lock():
                    new = self._put(self._body(), self._etag)
            except Exception as exc:  # noqa: BLE001 - retried at the next renewal, until expiry
                log.warning("could not renew the lease on %s: %s", self.output, exc)
                continue
            if new is None:
                self._lost = "another driver replaced it"
                log.error(
                    "the lease on %s was taken by another driver: this run stops", self.output
                )
                return
            self._etag, self._expires = new, time.time() + self.ttl

    def check(self) -> None:
        """Raise :class:`LeaseLostError` when this driver lost the lease (replaced by another
        driver, or not renewed within ``ttl``)."""
        if self._lost is None and self._etag is not None and time.time() > self._expires:
            self._lost = f"it could not be renewed within {self.ttl:g} s"
        if self._lost is not None:
            raise LeaseLostError(
                f"this driver lost the lease on {self.output} ({self._lost}); it stops and "
                "commits nothing more: run again when the other driver is done"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._lost is not None or self._etag is None:
            return
        try:
            with self._local_lock():
                current, _ = self._read()
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
