"""Checks on the driver, before any output is created or any cluster is started: everything that
can be known from settings, listings, file headers and the checkpoint itself.

* :func:`check_locations`: every remote input can be read (credentials, permissions, endpoint),
  named with the variables to set;
* :func:`check_model`: the checkpoint loads with ``weights_only=True`` into its family with its
  hyper-parameters (a crafted pickle or a checkpoint of another family is refused here, not in
  the first window on a worker);
* :func:`check_output`: the output can be written, without creating anything;
  :func:`check_not_old_store`: it does not hold a map of the earlier plain-Zarr design;
* :func:`check_tiles`: the scene headers (QAI files included), grid and mask of each tile to
  process, many at once; a tile with problems (:func:`tile_problem`) is left out with its reason
  by :mod:`treesits_dask.pipeline.plan`, the others go on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Sequence

from ..config import RunConfig
from ..errors import DiscoveryError, InputDataError, MaskError, OutputError, TreesitsError
from ..io import masks, storage
from ..io.cube import scene_problems, tile_grid
from ..io.grid import TileGrid
from ..io.layouts import with_layouts
from ..models import ModelCard, ModelSpec

__all__ = [
    "TILE_ERRORS",
    "check_locations",
    "check_model",
    "check_not_old_store",
    "check_output",
    "check_tiles",
    "checked_scenes",
    "tile_problem",
]

log = logging.getLogger(__name__)

#: the errors that fail one tile (the others go on)
TILE_ERRORS = (DiscoveryError, InputDataError, MaskError)
#: problems of one tile quoted in its error (the rest are counted)
_SHOWN_PROBLEMS = 3
#: tiles whose headers are checked at once (each reads many headers at once)
_TILES_CHECKED_AT_ONCE = 4


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


def check_not_old_store(output: str) -> None:
    """Refuse an output that holds a map of the plain-Zarr design (``predictions.zarr``)."""
    old = storage.join(output, "predictions.zarr")
    fs, path = storage.get_fs(old)
    if fs.exists(path):
        raise OutputError(
            f"{output} holds a map written by an older treesits_dask ({old}, plain Zarr); this "
            "version keeps a versioned map (map.icechunk): write to another --output"
        )


def tile_problem(tile: str, problems: list[str]) -> InputDataError:
    """One error for the problems of one tile: the first few quoted, the rest counted."""
    shown = "; ".join(problems[:_SHOWN_PROBLEMS])
    more = len(problems) - _SHOWN_PROBLEMS
    return InputDataError(
        f"tile {tile}: {shown}"
        + (f" (and {more} more problem(s) of the same tile)" if more > 0 else "")
    )


def checked_scenes(
    definition,
    tile: str,
    first,
    scenes: Sequence,
    qai_flags: Sequence[str],
    known: dict[str, tuple[int, int]] | None = None,
) -> tuple[tuple, TileGrid]:
    """``scenes`` of ``tile`` whose headers are right, each with its BOA file's block shape where
    they are in more than one file layout, and the tile's grid (from the header of ``first``,
    checked against the cube's ``definition``; in the layout of most scenes:
    :func:`~treesits_dask.io.layouts.with_layouts`).  Every header is read (many at once) but
    those of the scenes in ``known`` (by name: checked by an earlier run, with their recorded
    block shapes); the problems found raise one :class:`~treesits_dask.errors.InputDataError`
    naming the tile (:func:`tile_problem`)."""
    known = known or {}
    grid = tile_grid(definition, first)
    shapes = {s.boa: known[s.name] for s in scenes if s.name in known}
    shapes[first.boa] = tuple(grid.block_shape)
    problems = scene_problems(scenes, grid, qai_flags, frozenset(known), shapes=shapes)
    if problems:
        raise tile_problem(tile, problems)
    return with_layouts(scenes, grid, shapes)


def check_tiles(config: RunConfig, definition, staged: list, invalid: dict) -> list[tuple]:
    """``(staged tile, grid, mask source)`` of the tiles whose scene headers (QAI files
    included), grid and mask are right; the others go into ``invalid`` with their problems.
    The scenes its read goes through (for alert runs the older ones its steps reach too) are
    checked, but those the tile's record holds unchanged: their block shapes come from the
    record.  Where they are in more than one file layout, its staged scenes carry each one's
    block shape and its grid is in the layout of most of them
    (:func:`~treesits_dask.io.layouts.with_layouts`).
    Tiles are checked a few at a time, each reading many headers at once (remote headers cost a
    round trip each)."""
    from concurrent.futures import ThreadPoolExecutor

    def check(st):
        older = st.alerts.older if st.alerts is not None else ()
        try:
            read, grid = checked_scenes(definition, st.tile, st.scenes[0], st.read,
                                        config.qai_flags, st.known)  # fmt: skip
            mask = masks.mask_source(st.mask_url, grid) if st.mask_url else None
        except TILE_ERRORS as exc:
            return st, exc
        st = dataclasses.replace(st, scenes=read[len(older) :])
        if older:
            st = dataclasses.replace(
                st, alerts=dataclasses.replace(st.alerts, older=read[: len(older)])
            )
        return st, (grid, mask)

    checked = []
    with ThreadPoolExecutor(max(1, min(_TILES_CHECKED_AT_ONCE, len(staged)))) as pool:
        for st, found in pool.map(check, staged):
            if isinstance(found, TreesitsError):
                invalid[st.tile] = found
            else:
                checked.append((st, *found))
    return checked
