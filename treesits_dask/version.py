"""The installed version of treesits_dask (recorded in ledger records, reports and stores)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("treesits_dask")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
