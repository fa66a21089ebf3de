"""One place that turns URLs (``/local/path``, ``file://...``, ``s3://bucket/key``) into filesystems.

Every other module passes URLs around as plain strings and asks this module for a filesystem, a
GDAL path or a joined URL.  Remote protocols need the ``s3`` extra (``pip install treesits_dask[s3]``).
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

import fsspec

__all__ = [
    "is_remote", "join", "get_fs", "gdal_path", "strip_protocol", "basename", "s3_environment",
    "apply_environment", "S3_ENV_KEYS",
]

#: Non-secret variables that configure S3 access for s3fs/boto3 and GDAL (never credentials).
S3_ENV_KEYS = (
    "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_S3_ENDPOINT", "AWS_HTTPS",
    "AWS_VIRTUAL_HOSTING", "TREESITS_S3_ADDRESSING", "AWS_PROFILE",
)  # fmt: skip


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
    out["TREESITS_S3_ADDRESSING"] = addressing
    if env.get("AWS_PROFILE"):
        out["AWS_PROFILE"] = env["AWS_PROFILE"]
    return out


def apply_environment(env: dict[str, str]) -> None:
    """Set the given (non-secret) variables in this process; used on the driver and by a worker plugin."""
    os.environ.update(env)


def is_remote(url: str) -> bool:
    """True for URLs with a non-file protocol (``s3://``...)."""
    scheme = urlparse(str(url)).scheme
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
            storage_options = _s3_options()
        try:
            fs = fsspec.filesystem(proto, **storage_options)
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError(
                f"reading {url!r} needs the {proto} filesystem: pip install 'treesits_dask[s3]'"
            ) from exc
        return fs, strip_protocol(url)
    return fsspec.filesystem("file"), strip_protocol(url)


def _s3_options() -> dict:
    """s3fs options from the process environment (set by :func:`apply_environment`)."""
    opts: dict = {"config_kwargs": {"retries": {"max_attempts": 10, "mode": "standard"}}}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    client_kwargs = {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        client_kwargs["region_name"] = region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    addressing = os.environ.get("TREESITS_S3_ADDRESSING", "auto")
    if addressing == "auto":
        addressing = "path" if endpoint else "virtual"
    opts["config_kwargs"]["s3"] = {"addressing_style": addressing}
    return opts


def gdal_path(url: str) -> str:
    """The path GDAL/rasterio opens: local files as they are, ``s3://b/k`` as ``/vsis3/b/k``."""
    url = str(url)
    if url.startswith("s3://"):
        return "/vsis3/" + url[len("s3://") :]
    if is_remote(url):
        raise ValueError(f"GDAL cannot read {url!r}: only local paths and s3:// URLs are supported")
    return strip_protocol(url)
