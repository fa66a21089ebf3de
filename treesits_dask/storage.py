"""One place that turns URLs (``/local/path``, ``file://...``, ``s3://bucket/key``) into filesystems.

Every other module passes URLs around as plain strings and asks this module for a filesystem, a
GDAL path or a joined URL.  Remote protocols need the ``s3`` extra (``pip install treesits_dask[s3]``).
"""

from __future__ import annotations

import os
import posixpath
from urllib.parse import urlparse

import fsspec

__all__ = ["is_remote", "join", "get_fs", "gdal_path", "strip_protocol", "basename"]


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
        try:
            fs = fsspec.filesystem(proto, **storage_options)
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise ImportError(
                f"reading {url!r} needs the {proto} filesystem: pip install 'treesits_dask[s3]'"
            ) from exc
        return fs, strip_protocol(url)
    return fsspec.filesystem("file"), strip_protocol(url)


def gdal_path(url: str) -> str:
    """The path GDAL/rasterio opens: local files as they are, ``s3://b/k`` as ``/vsis3/b/k``."""
    url = str(url)
    if url.startswith("s3://"):
        return "/vsis3/" + url[len("s3://") :]
    if is_remote(url):
        raise ValueError(f"GDAL cannot read {url!r}: only local paths and s3:// URLs are supported")
    return strip_protocol(url)
