"""The public API: what notebooks and other programs use (``from treesits_dask import ...``).

Each function here is a thin layer over the stage that does the work; the command line
(:mod:`treesits_dask.cli`) is a thin layer over these functions.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .config import InputSettings, RunConfig
from .errors import DiscoveryError
from .io import discovery, storage

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

    from .pipeline.plan import RunPlan

__all__ = ["changes", "export_map", "open_cube", "open_map", "plan", "versions"]


def open_cube(
    cube: str,
    tile: str,
    *,
    sensors: str | Sequence[str] = ("SEN2A", "SEN2B", "SEN2C"),
    start_date: str | dt.date | None = None,
    end_date: str | dt.date | None = None,
    qai: str | Sequence[str] = "default",
    window: str = "auto",
) -> xr.DataArray:
    """One tile of a FORCE Level-2 cube as a lazy ``xarray.DataArray`` (time, band, y, x) int16.

    -9999 where an observation is nodata or screened by QAI (``qai``: ``default`` = FORCE's
    screening, ``none``, or a list of flags); coordinates ``time``, ``band`` (FORCE band names),
    ``y``, ``x`` and ``sensor``; CRS and transform through ``.rio``.  One Dask chunk per window of
    all scenes (``window``: ``auto``, ``N`` or ``ROWSxCOLS``), read exactly as a run reads it.

    Every scene's header (and QAI twin) is read here, many at once, as a run's driver reads
    them: a file of another grid, CRS or band count raises an
    :class:`~treesits_dask.errors.InputDataError` naming it, and each scene's file layout is
    known, so that a tile whose scenes are in two layouts reads each in blocks of its own.
    """
    from .io.cube import tile_cube
    from .io.grid import WindowLayout, choose_window_shape
    from .pipeline.checks import checked_scenes

    settings = InputSettings(
        cube=cube, sensors=sensors, start_date=start_date, end_date=end_date, qai=qai, window=window
    )
    definition = discovery.read_cube_definition(cube)
    scenes = discovery.scene_table(
        cube, tile, settings.sensors, settings.start_date, settings.end_date
    )
    if not scenes:
        raise DiscoveryError(
            f"tile {tile} of {cube} has no BOA scenes of sensors {','.join(settings.sensors)} "
            "in the date window; check the tile, sensors, start_date and end_date"
        )
    scenes, grid = checked_scenes(definition, tile, scenes[0], scenes, settings.qai_flags)
    shape = choose_window_shape(grid, settings.window_shape, len(scenes))
    return tile_cube(scenes, grid, WindowLayout.of(grid, shape), settings.qai_flags, checked=scenes)


def plan(config: RunConfig) -> RunPlan:
    """What :func:`~treesits_dask.run` would do with ``config``, decided without a cluster: tiles
    to process (and why), tiles up to date, scenes, windows, the output grid.
    ``plan(config).summary()`` is what ``python -m treesits_dask plan`` prints."""
    from .pipeline.plan import make_plan

    return make_plan(config)


def open_map(output: str, as_of=None, mask_and_scale: bool = False) -> xr.Dataset:
    """The map of an output as a lazy ``xarray.Dataset``: ``probability`` (class_name, y, x),
    ``class``, ``valid_obs``, ``last_obs_valid``, with the CRS (``.rio``), cropped to its finished
    tiles.  ``as_of``: a version of the map (:func:`versions`: its number, run id or snapshot, or
    a datetime: the map as it was then); default the latest.  ``mask_and_scale=False`` keeps
    the integer layers as stored (255 = not predicted).  S3 outputs use the endpoint settings of
    the environment (``AWS_*``)."""
    from .outputs.repo import MapRepo

    _environment(output)
    return MapRepo(output).open_dataset(as_of, mask_and_scale=mask_and_scale)


def versions(output: str) -> list[dict]:
    """The versions of an output's map, oldest first: one per run that changed it, with its
    run id, time, snapshot and the tiles it (re)computed and why."""
    from .outputs.repo import MapRepo

    _environment(output)
    return MapRepo(output).versions()


def changes(output: str, before, after=None) -> xr.Dataset:
    """The pixels whose class (or, for binary models, disturbance state) differs between two
    versions of the map (``after`` default: the latest): ``before``, ``after``, ``changed``."""
    from .outputs.repo import MapRepo

    _environment(output)
    return MapRepo(output).changes(before, after)


def export_map(output: str, dest: str, as_of=None, tiles=None) -> list[str]:
    """Write the COGs (``<dest>/cog/<tile>/<variable>.tif``) and VRT mosaics of an output's map as
    of a version (:func:`versions`; default the latest) to ``dest``, for ``tiles`` (default all
    finished tiles).  Returns the written URLs."""
    from .outputs.repo import MapRepo

    _environment(output)
    return MapRepo(output).export_cogs(dest, as_of, tiles)


def _environment(output: str) -> None:
    if storage.is_remote(output):
        storage.apply_environment(storage.s3_environment())
