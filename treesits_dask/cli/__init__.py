"""The command line (``python -m treesits_dask``): :mod:`.main` (parser, logging, dispatch) and
one module per group of commands (:mod:`.run`, :mod:`.training`, :mod:`.tools`)."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
