"""One exception tree.  Every message names the input (file, tile, setting) and says how to fix it.

The CLI turns any :class:`TreesitsError` into a one-paragraph message and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "TreesitsError",
    "ClusterError",
    "ConfigError",
    "DiscoveryError",
    "InputDataError",
    "MaskError",
    "ModelError",
    "OutputError",
    "StorageError",
]


class TreesitsError(Exception):
    """Base class of all errors that are the user's input or environment, not a bug."""

    exit_code = 2

    def __reduce__(self):
        # Dask sends a task's exception to the driver pickled with its __cause__/__context__ chain
        # (tblib reads the chain after calling this method).  When a link cannot be unpickled
        # (rasterio's CPLE_* errors, the causes of every RasterioIOError, cannot), distributed
        # sends a
        # bare Exception(repr) instead and the driver no longer sees a TreesitsError.  Links that
        # are
        # not known to be portable are replaced by stand-ins with their text and traceback.
        self.__cause__ = _portable(self.__cause__)
        self.__context__ = _portable(self.__context__)
        return type(self), self.args, self.__dict__ or None


class ConfigError(TreesitsError, ValueError):
    """A setting is missing, unknown or has an invalid value."""


class ClusterError(TreesitsError):
    """The Dask cluster cannot run the work: it did not start, or a worker group that the work
    needs (GPU workers, reading workers) has no worker."""


class DiscoveryError(TreesitsError):
    """The FORCE cube (root, datacube-definition.prj, tiles, scenes) cannot be used as given."""


class InputDataError(TreesitsError):
    """A scene file is unreadable, truncated, or does not match the tile (bands, CRS, grid)."""


class MaskError(TreesitsError):
    """A forest mask is missing or does not match the tile grid."""


class ModelError(TreesitsError):
    """A checkpoint, params file or model card cannot be used with the requested model family."""


class OutputError(TreesitsError):
    """The output location is not writable or holds an incompatible store."""


class StorageError(TreesitsError):
    """A location cannot be accessed: no credentials, access denied, endpoint unreachable."""


def _portable(exc: BaseException | None) -> BaseException | None:
    """``exc`` if it pickles with its chain (errors of this package, plain builtin exceptions),
    otherwise
    a ``RuntimeError`` with its type, text and traceback."""
    if exc is None or isinstance(exc, TreesitsError):
        return exc
    if type(exc).__module__ == "builtins" and exc.__cause__ is None and exc.__context__ is None:
        return exc
    stand_in = RuntimeError(f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
    return stand_in.with_traceback(exc.__traceback__)
