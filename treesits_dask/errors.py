"""One exception tree.  Every message names the input (file, tile, setting) and says how to fix it.

The CLI turns any :class:`TreesitsError` into a one-paragraph message and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "TreesitsError",
    "ConfigError",
    "DiscoveryError",
    "InputDataError",
    "MaskError",
    "ModelError",
    "OutputError",
]


class TreesitsError(Exception):
    """Base class of all errors that are the user's input or environment, not a bug."""

    exit_code = 2


class ConfigError(TreesitsError, ValueError):
    """A setting is missing, unknown or has an invalid value."""


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
