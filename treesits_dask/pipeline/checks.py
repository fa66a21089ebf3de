"""Checks on the driver, before any output is created or any cluster is started: everything that
can be known from settings, listings, file headers and the checkpoint itself.

* :func:`check_locations`: every remote input can be read (credentials, permissions, endpoint),
  named with the variables to set;
* :func:`check_model`: the checkpoint loads with ``weights_only=True`` into its family with its
  hyper-parameters (a crafted pickle or a checkpoint of another family is refused here, not in
  the first window on a worker);
* :func:`check_output`: the output can be written, without creating anything.

Per-tile problems (missing QAI files, scene headers on another grid, masks on another grid, no
scenes in the window) are collected by :mod:`treesits_dask.pipeline.plan`, which leaves those
tiles out with their reason.
"""

from __future__ import annotations

import importlib.util
import logging

from ..config import RunConfig
from ..io import storage
from ..models import ModelCard, ModelSpec

__all__ = ["check_locations", "check_model", "check_output"]

log = logging.getLogger(__name__)


def check_locations(config: RunConfig) -> None:
    """Touch every remote location of ``config`` once (metadata only), so that missing
    credentials, refused access or an unreachable endpoint end the run here, with what to set."""
    for url in (config.cube, config.model, config.model_params, config.mask_dir,
                config.mask_worldcover, config.output):  # fmt: skip
        storage.check_readable(url)


def check_model(spec: ModelSpec) -> ModelCard | None:
    """Load the checkpoint once on the driver's CPU (weights only) and fit it into its family:
    the errors a worker would meet in its first window, met here.  Returns the loaded card, or
    None where torch is not installed (the workers check it then)."""
    if importlib.util.find_spec("torch") is None:
        log.warning("torch is not installed here: %s is checked by the workers only", spec.uri)
        return None
    from ..models import load_model

    return load_model(spec, device="cpu").card


def check_output(output: str) -> None:
    """The output can be written (:func:`storage.check_writable`; nothing is left behind)."""
    storage.check_writable(output)
