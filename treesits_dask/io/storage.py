"""One place that turns URLs (a local path, ``file://...``, ``s3://bucket/key``) into filesystems.

Every other module passes URLs around as plain strings and asks this module for a filesystem, a
GDAL path or a joined URL.  Remote protocols need the ``s3`` extra
(``pip install treesits_dask[s3]``).

Object stores: s3fs retries throttling, 5xx answers and dropped connections (botocore "standard"
retries with backoff, plus s3fs's own retries of interrupted body reads); listings are never
cached, so a scene added or replaced while a driver runs is seen by its next listing; uploads
above ``2 * UPLOAD_PART_SIZE`` are multipart (:func:`upload`).  GDAL (``/vsis3/``) retries 429/5xx
answers and resets before an answer by itself; what it does not retry is
:mod:`treesits_dask.io.remote`'s business.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import tempfile
import uuid
from urllib.parse import urlparse

import fsspec

from ..errors import OutputError, StorageError

__all__ = [
    "GDAL_DEFAULTS",
    "MALLOC_DEFAULTS",
    "S3_ENV_KEYS",
    "UPLOAD_PART_SIZE",
    "access_problem",
    "apply_environment",
    "basename",
    "check_readable",
    "check_writable",
    "gdal_path",
    "get_fs",
    "is_remote",
    "join",
    "process_defaults",
    "publish_bytes",
    "publish_file",
    "s3_addressing",
    "s3_environment",
    "s3_options",
    "strip_protocol",
    "upload",
]

log = logging.getLogger(__name__)

#: Part size of multipart uploads: files of at least twice this size are uploaded in parts
#: (s3fs uploads smaller files with one PUT).  S3 needs parts of at least 5 MiB.
UPLOAD_PART_SIZE = 32 * 2**20

#: GDAL settings for reading many GeoTIFFs (no directory listing per open, retries on HTTP
#: errors); every process of a run gets them as environment variables.
#: ``GDAL_MAX_RAW_BLOCK_CACHE_SIZE``: GDAL fetches the compressed blocks of one read of a remote
#: file in merged byte ranges up to this many bytes (default 10 MB), the rest block by block with
#: read-ahead.  A full-width row of 256 px blocks of a 3000 px, 10-band FORCE COG is 8-16 MB:
#: with the default, reading a tile in bands took 87 GETs and 1.32x the file's bytes from S3
#: (2 scenes, moto), with 32 MiB 54 GETs (one per block row and file, and the headers) and 1.00x
#: (``python -m treesits_dask.bench.s3_read --size 3000 --scenes 2 --layout cog``)
GDAL_DEFAULTS = {
    "GDAL_MAX_RAW_BLOCK_CACHE_SIZE": str(32 * 2**20),
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_HTTP_MAX_RETRY": "8",
    "GDAL_HTTP_RETRY_DELAY": "0.5",
    "GDAL_HTTP_RETRY_CODES": "ALL",
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.tiff,.vrt,.json",
    "CPL_VSIL_USE_TEMP_FILE_FOR_RANDOM_WRITE": "YES",
}

#: glibc malloc of the processes that read scenes (set before they start: the nanny of a Dask
#: worker passes them on).  Dask's own default (``MALLOC_TRIM_THRESHOLD_=65536``) also switches
#: off glibc's adaptive mmap threshold, so every decode buffer of GDAL (a 256 x 256 block of 10
#: bands is 1.3 MB, a 3000 px strip of one band 1.8 MB) was a fresh mmap with page faults: a
#: 3000 px COG tile read at 129-134 MB/s per core on a LocalCluster worker, 206-253 with these
#: (buffers under 4 MiB come from the heap; freed memory above 16 MiB at the top of a heap is
#: given back).  Larger thresholds (64 / 32 MiB) were no faster and kept more memory: a 3 GiB
#: worker reading a 600-scene tile was restarted at 95 %.  One arena: a worker thread's own arena
#: maps and unmaps heaps (64 MiB at most) as a forward's temporaries come and go, so each window
#: faulted its memory in afresh (docs/performance.md, "One malloc arena": 103 -> 84 s)
MALLOC_DEFAULTS = {
    "MALLOC_TRIM_THRESHOLD_": str(16 * 2**20),
    "MALLOC_MMAP_THRESHOLD_": str(4 * 2**20),
    "MALLOC_ARENA_MAX": "1",
}

#: Non-secret variables that configure S3 access for s3fs/boto3 and GDAL (never credentials).
S3_ENV_KEYS = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_S3_ENDPOINT",
    "AWS_HTTPS",
    "AWS_VIRTUAL_HOSTING",
    "AWS_PROFILE",
)


def s3_environment(
    endpoint_url: str | None = None,
    region: str | None = None,
    addressing: str = "auto",
    environ: dict | None = None,
) -> dict[str, str]:
    """Non-secret environment for S3 access, derived once from settings and ``AWS_*`` variables.

    s3fs/boto3 read ``AWS_ENDPOINT_URL``; GDAL ignores it and needs ``AWS_S3_ENDPOINT`` (host:port),
    ``AWS_HTTPS`` and ``AWS_VIRTUAL_HOSTING``.  ``addressing``: ``path``, ``virtual`` or ``auto``
    (path-style when a custom endpoint is set, as OpenStack/Ceph object stores need).

    The addressing travels as ``AWS_VIRTUAL_HOSTING`` alone (s3fs reads it too, see
    :func:`s3_options`): no ``TREESITS_*`` variable, which would override the run's settings in
    every process that loads them (a driver pod).
    """
    env = dict(os.environ if environ is None else environ)
    out: dict[str, str] = {}
    endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if addressing == "auto":
        addressing = "path" if endpoint else "virtual"
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        out["AWS_ENDPOINT_URL"] = f"{parsed.scheme}://{parsed.netloc}{parsed.path.rstrip('/')}"
        out["AWS_S3_ENDPOINT"] = parsed.netloc + parsed.path.rstrip("/")
        out["AWS_HTTPS"] = "YES" if parsed.scheme == "https" else "NO"
    if region:
        out["AWS_REGION"] = out["AWS_DEFAULT_REGION"] = region
    out["AWS_VIRTUAL_HOSTING"] = "FALSE" if addressing == "path" else "TRUE"
    if env.get("AWS_PROFILE"):
        out["AWS_PROFILE"] = env["AWS_PROFILE"]
    return out


def process_defaults() -> dict[str, str]:
    """The environment of every process that reads scenes: :data:`GDAL_DEFAULTS` (what this
    process's environment sets wins) and :data:`MALLOC_DEFAULTS` (always: every Dask nanny
    started in this process has put its own ``MALLOC_TRIM_THRESHOLD_`` into its environment)."""
    env = {k: os.environ.get(k, v) for k, v in GDAL_DEFAULTS.items()}
    return {**env, **MALLOC_DEFAULTS}


def apply_environment(env: dict[str, str]) -> None:
    """Set the given (non-secret) variables in this process; used on the driver and by a worker
    plugin."""
    os.environ.update(env)


def is_remote(url: str) -> bool:
    """True for URLs with a non-file protocol (``s3://``...); a path without a colon is local."""
    url = str(url)
    scheme = urlparse(url).scheme if ":" in url else ""
    return bool(scheme) and scheme not in ("file", "local") and len(scheme) > 1


def strip_protocol(url: str) -> str:
    """``file:///a/b`` -> ``/a/b``; ``s3://b/k`` -> ``b/k``; local paths are made absolute."""
    url = str(url)
    if is_remote(url):
        return url.split("://", 1)[1]
    if url.startswith("file://"):
        url = url[len("file://") :]
    return os.path.abspath(os.path.expanduser(url))


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL, keeping its protocol."""
    url = str(url)
    if is_remote(url):
        proto, rest = url.split("://", 1)
        return f"{proto}://" + posixpath.join(rest.rstrip("/"), *parts)
    return os.path.join(url, *parts)


def basename(url: str) -> str:
    return posixpath.basename(str(url).rstrip("/"))


def get_fs(url: str, **storage_options) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a URL; the path is what that filesystem expects."""
    url = str(url)
    if is_remote(url):
        proto = url.split("://", 1)[0]
        if proto in ("s3", "s3a") and not storage_options:
            storage_options = s3_options()
        try:
            fs = fsspec.filesystem(proto, **storage_options)
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError(
                f"reading {url!r} needs the {proto} filesystem: pip install 'treesits_dask[s3]'"
            ) from exc
        return fs, strip_protocol(url)
    return fsspec.filesystem("file"), strip_protocol(url)


def s3_addressing() -> str:
    """``path`` or ``virtual``: the S3 addressing of this process, from ``AWS_VIRTUAL_HOSTING``
    (derived by :func:`s3_environment`), else path-style when a custom endpoint is set."""
    hosting = os.environ.get("AWS_VIRTUAL_HOSTING", "").upper()
    if hosting in ("FALSE", "NO", "OFF", "0"):
        return "path"
    if hosting in ("TRUE", "YES", "ON", "1"):
        return "virtual"
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return "path" if endpoint else "virtual"


def s3_options() -> dict:
    """s3fs options from the process environment (set by :func:`apply_environment`).

    No credentials: s3fs/botocore find them in the environment, a profile or the pod's role.
    Listings are not cached (a cached listing would hide scenes added or replaced since).
    """
    opts: dict = {
        "config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}},
        "use_listings_cache": False,
    }
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    opts["config_kwargs"]["s3"] = {"addressing_style": s3_addressing()}
    return opts


def gdal_path(url: str) -> str:
    """The path GDAL/rasterio opens: local files as they are, ``s3://b/k`` as ``/vsis3/b/k``."""
    url = str(url)
    if url.startswith("s3://"):
        return "/vsis3/" + url[len("s3://") :]
    if is_remote(url):
        raise ValueError(f"GDAL cannot read {url!r}: only local paths and s3:// URLs are supported")
    return strip_protocol(url)


def upload(local_path: str, url: str, part_size: int | None = None) -> None:
    """Copy a local file to ``url``; on object stores files of at least ``2 * part_size``
    (default :data:`UPLOAD_PART_SIZE`) go up as a multipart upload, so an S3 object appears whole
    or not at all either way."""
    fs, path = get_fs(url)
    if str(url).split("://", 1)[0] in ("s3", "s3a"):
        part = int(part_size or UPLOAD_PART_SIZE)
        if part < 5 * 2**20:
            raise ValueError(f"S3 multipart parts must be at least 5 MiB, not {part} bytes")
        fs.put_file(local_path, path, chunksize=part)
    else:
        fs.put_file(local_path, path)


def publish_file(local_path: str, url: str, part_size: int | None = None) -> None:
    """Copy a finished local file to ``url`` so that no partial file ever has the final name.

    Local disks: a copy next to the target, then an atomic rename.  Object stores: one PUT, or a
    multipart upload for files of at least ``2 * part_size`` (default :data:`UPLOAD_PART_SIZE`);
    the object appears only when the upload is complete.  :class:`OutputError` if impossible.
    """
    fs, path = get_fs(url)
    try:
        if is_remote(url):
            upload(local_path, url, part_size)
            return
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        partial = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.partial")
        try:
            shutil.copyfile(local_path, partial)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    except OSError as exc:
        raise OutputError(
            f"cannot write {url}: {exc}; check that the output location is writable"
        ) from exc


def publish_bytes(data: bytes, url: str, tmp_dir: str | None = None) -> None:
    """Write ``data`` to ``url`` atomically (see :func:`publish_file`): the one way this package
    writes a whole file (ledger records, leases, run reports, VRTs)."""
    with tempfile.TemporaryDirectory(prefix="treesits-out-", dir=tmp_dir) as tmp:
        local = os.path.join(tmp, "file")
        with open(local, "wb") as fh:
            fh.write(data)
        publish_file(local, url)


# ------------------------------------------------------------------------------- access checks
#: what to set when an object store refuses a request for lack of credentials
CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment of the "
    "driver and the workers (on Kubernetes: the Secret named by kubernetes.s3_secret)"
)


def _chain(exc: BaseException | None):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def access_problem(url: str, exc: BaseException, write: bool = False) -> StorageError | None:
    """A :class:`StorageError` saying what to fix when ``exc`` is a missing-credentials, refused
    or unreachable-endpoint problem of ``url`` (naming its bucket); None for anything else."""
    chain = list(_chain(exc))
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    verb = "write" if write else "read"
    bucket = strip_protocol(url).split("/", 1)[0] if is_remote(url) else None
    where = f"bucket {bucket!r}" if bucket else url
    if (
        names & {"NoCredentialsError", "PartialCredentialsError"}
        or "unable to locate credentials" in text
    ):
        return StorageError(
            f"cannot {verb} {url}: no S3 credentials were found; {CREDENTIALS_HINT}"
        )
    denied = ("accessdenied", "access denied", "forbidden", "invalidaccesskeyid",
              "signaturedoesnotmatch")  # fmt: skip
    if "PermissionError" in names or any(d in text for d in denied):
        return StorageError(
            f"cannot {verb} {url}: access denied ({str(chain[0])[:200]}); check that the "
            f"credentials in the environment (AWS_ACCESS_KEY_ID / AWS_PROFILE) may {verb} {where}"
        )
    unreachable = (
        "could not connect to the endpoint",
        "connection refused",
        "name or service not known",
    )
    if "EndpointConnectionError" in names or any(u in text for u in unreachable):
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the AWS default endpoint"
        return StorageError(
            f"cannot {verb} {url}: the S3 endpoint {endpoint} cannot be reached "
            f"({str(chain[0])[:200]}); check s3_endpoint_url / AWS_ENDPOINT_URL and the network"
        )
    return None


def check_readable(url: str | None) -> None:
    """Touch a remote ``url`` once (metadata only), so that missing credentials, refused access or
    an unreachable endpoint are reported now, with what to set; a missing object is left to the
    caller (which names it with its own advice).  Local paths are not touched."""
    if not url or not is_remote(url):
        return
    fresh = {}
    if url.split("://", 1)[0] in ("s3", "s3a"):  # the credentials of now, not of a cached client
        fresh = {**s3_options(), "skip_instance_cache": True}
    fs, path = get_fs(url, **fresh)
    try:
        fs.info(path)
    except FileNotFoundError:
        return
    except Exception as exc:  # noqa: BLE001 - botocore / aiohttp raise many kinds
        problem = access_problem(url, exc)
        if problem is not None:
            raise problem from None
        raise


def check_writable(output: str) -> None:
    """Raise :class:`OutputError` (or :class:`StorageError`) if ``output`` cannot be written,
    without leaving anything behind: local folders are not created (the nearest existing folder
    must be writable); on object stores a probe object is written and deleted."""
    if not is_remote(output):
        path = strip_protocol(output)
        probe = path
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
            what = "is a file" if not os.path.isdir(probe) else "is not writable"
            raise OutputError(
                f"the output location {output} cannot be written ({probe} {what}); choose "
                "another --output or fix its permissions"
            )
        return
    fs, path = get_fs(output)
    probe = join(output, f".treesits-write-probe-{uuid.uuid4().hex}")
    _, probe_path = get_fs(probe)
    try:
        fs.pipe_file(probe_path, b"treesits_dask write probe\n")
        fs.rm_file(probe_path)
    except Exception as exc:  # any failure means "not writable"; reported with its cause
        problem = access_problem(output, exc, write=True)
        if problem is not None:
            raise problem from None
        raise OutputError(
            f"the output location {output} cannot be written ({type(exc).__name__}: {exc}); "
            "choose another --output or fix its permissions / credentials"
        ) from exc
