"""Reading remote rasters robustly: GDAL (``/vsis3/``) retries 429/5xx answers and resets before
an answer by itself; what it does not retry (a connection dropped in the middle of a body, which
libtiff may even take for a file without georeference, with only a warning) the readers retry with
:func:`read_retrying`, after :func:`clear_gdal_cache` has dropped what GDAL kept of the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from typing import Self, TypeVar

from .storage import gdal_path, is_remote

__all__ = [
    "IncompleteReadError",
    "clear_gdal_cache",
    "gdal_cache_max",
    "limit_gdal_cache",
    "read_retrying",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


# ------------------------------------------------------------------------------------ GDAL cache
_GDAL_LIB: ctypes.CDLL | None | bool = None
_GDAL_LOCK = threading.Lock()


def _gdal_library():
    """The libgdal that rasterio loaded in this process (``False`` when it cannot be found)."""
    global _GDAL_LIB
    with _GDAL_LOCK:
        if _GDAL_LIB is None:
            import rasterio  # noqa: F401  (loads libgdal)

            path = None
            try:
                with open("/proc/self/maps") as fh:
                    path = next(
                        (line.split()[-1] for line in fh if "libgdal" in line.rsplit("/", 1)[-1]),
                        None,
                    )
            except OSError:  # not Linux
                path = ctypes.util.find_library("gdal")
            try:
                lib = ctypes.CDLL(path) if path else None
                lib.VSICurlPartialClearCache.argtypes = [ctypes.c_char_p]
                lib.VSICurlPartialClearCache.restype = None
                lib.VSICurlClearCache.argtypes = []
                lib.VSICurlClearCache.restype = None
                _GDAL_LIB = lib
            except (OSError, AttributeError):
                log.debug(
                    "libgdal not found in this process; GDAL's /vsis3/ cache cannot be cleared"
                )
                _GDAL_LIB = False
        return _GDAL_LIB


def limit_gdal_cache(nbytes: int) -> bool:
    """Set GDAL's block cache of this process to ``nbytes`` (``GDALSetCacheMax64``: also after
    GDAL read ``GDAL_CACHEMAX``).  False when libgdal could not be reached."""
    lib = _gdal_library()
    if not lib:
        return False
    lib.GDALSetCacheMax64.argtypes = [ctypes.c_int64]
    lib.GDALSetCacheMax64.restype = None
    lib.GDALSetCacheMax64(int(nbytes))
    return True


def gdal_cache_max() -> int | None:
    """GDAL's block cache limit of this process in bytes (``GDALGetCacheMax64``); None when
    libgdal could not be reached."""
    lib = _gdal_library()
    if not lib:
        return None
    lib.GDALGetCacheMax64.argtypes = []
    lib.GDALGetCacheMax64.restype = ctypes.c_int64
    return int(lib.GDALGetCacheMax64())


def clear_gdal_cache(url: str | None = None) -> bool:
    """Forget what GDAL cached (sizes, headers, blocks) of one remote file, or of all files.

    GDAL keeps the bytes of ``/vsis3/`` files for the life of the process: after a transfer broke
    off in the middle, or when a file was replaced since it was first read, the cache would serve
    wrong bytes.  Returns False when libgdal could not be reached (nothing was cleared).
    """
    lib = _gdal_library()
    if not lib:
        return False
    if url is None:
        lib.VSICurlClearCache()
    else:
        lib.VSICurlPartialClearCache(gdal_path(url).encode())
    return True


#: Substrings of GDAL errors that no retry can fix (missing object, no permission).
_PERMANENT = (
    "does not exist",
    "no such file",
    "nosuchkey",
    "nosuchbucket",
    "accessdenied",
    "access denied",
    "permission denied",
    "forbidden",
)

#: GDAL warnings that say a read left something out: when a connection drops in the middle of a
#: body, libtiff only warns ("TIFFFetchNormalTag:IO error during reading of GeoKeyDirectory; tag
#: ignored") and the file opens without its georeference (CRS None, identity transform).
_INCOMPLETE = re.compile(
    r"\bio error\b|read error|error (?:during|while) reading|failed to read|short read",
    re.IGNORECASE,
)


class IncompleteReadError(OSError):
    """GDAL finished a remote read, but warned on the way that it could not read parts of the
    file."""


class _IncompleteReads(logging.Handler):
    """Collects the GDAL warnings of :data:`_INCOMPLETE` that rasterio logs (logger
    ``rasterio._env``, at WARNING) in the current thread while the context is open."""

    _logger = logging.getLogger("rasterio._env")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            message = record.getMessage()
            if _INCOMPLETE.search(message):
                self.messages.append(message)

    def __enter__(self) -> Self:
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)


def read_retrying(
    url: str,
    fn: Callable[[], T],
    what: str = "read",
    attempts: int = 4,
    delay: float = 0.5,
    permanent: tuple[type[BaseException], ...] = (),
) -> T:
    """``fn()`` with retries when ``url`` is remote: GDAL does not retry a connection that drops in
    the middle of a body.  Missing files and permission errors (and ``permanent`` exceptions) are
    raised at once; local files are never retried.  Between attempts GDAL's cache of the file is
    cleared and the wait doubles (with jitter).

    A remote read during which GDAL warned that it could not read parts of the file (see
    :data:`_INCOMPLETE`) counts as failed, even when ``fn`` returned (what it returned is closed if
    it can be) or raised a ``permanent`` exception (a check that failed on incomplete metadata);
    after the last attempt that raises :class:`IncompleteReadError`.
    """
    remote = is_remote(url)
    for attempt in range(1, attempts + 1):
        with _IncompleteReads() if remote else contextlib.nullcontext() as incomplete:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - GDAL/rasterio raise many types; filtered below
                text = str(exc).lower() + " " + str(exc.__cause__ or "").lower()
                gave_up = isinstance(exc, permanent) or any(p in text for p in _PERMANENT)
                if attempt == attempts or not remote or (gave_up and not incomplete.messages):
                    raise
                error: BaseException = exc
            else:
                if incomplete is None or not incomplete.messages:
                    return result
                if hasattr(result, "close"):
                    result.close()
                error = IncompleteReadError(
                    f"{what} of {url} was incomplete: {incomplete.messages[0]}"
                )
                if attempt == attempts:
                    raise error
        clear_gdal_cache(url)
        wait = delay * 2 ** (attempt - 1) * (1 + random.random() / 2)
        log.warning(
            "%s of %s failed (%s); retry %d of %d in %.1f s",
            what,
            url,
            error,
            attempt,
            attempts - 1,
            wait,
        )
        time.sleep(wait)
    raise AssertionError("unreachable")
