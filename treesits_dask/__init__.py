"""treesits_dask: tree-species maps from FORCE Sentinel-2 datacubes with PyTorch on Dask."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("treesits_dask")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0"

__all__ = ["__version__"]
