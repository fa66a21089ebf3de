"""Planning: config -> discovered tiles, scene windows, grids, masks, ledger state and the output
grid, and every check that can be made on the driver (:mod:`treesits_dask.pipeline.checks`).

Runs on the driver before any output is created and before any cluster starts.  Deciding which
tiles need work uses listings and file metadata only; the scene headers of a tile are read (many
at once) only when the tile is to be processed, and only those not already checked by the run
that finished it.  A tile with a problem of its own (no scenes in the window, a missing QAI file,
a scene or mask on another grid) is left out with its reason (:attr:`RunPlan.invalid`); the other
tiles go on.

This module is longer than 400 lines because deciding what a run does (tiles, windows, records,
COGs and derived layers that are out of date) reads the same listings and records once.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field, replace

from ..config import RunConfig
from ..errors import (
    ConfigError,
    DiscoveryError,
    InputDataError,
    TreesitsError,
)
from ..io import discovery, masks, storage
from ..io.grid import TileGrid, WindowLayout, block_chunk, choose_window_shape, read_shape
from ..models import ModelCard, ModelSpec, effective_window, read_card
from ..outputs import cog
from ..outputs.repo import MapRepo, cogs_up_to_date
from ..outputs.schema import OutputGrid, TileRegion
from ..outputs.store import level_paths
from ..state import ledger
from .alerting import AlertPlan, alert_key, plan_alerts
from .checks import TILE_ERRORS, check_tiles, tile_problem
from .postprocess import DerivedWork, derived_work, smooth_params

#: tiles whose scenes are listed at once while planning (a listing is a round trip on S3)
_TILES_LISTED_AT_ONCE = 16

__all__ = ["TILE_ERRORS", "RunPlan", "TilePlan", "make_plan", "tile_problem"]

log = logging.getLogger(__name__)

#: errors that concern one tile only: the tile is left out with its reason, the others go on
#: problems of one tile quoted in its message (the rest are counted)
#: tiles whose scene headers are checked at the same time (each with many reads at once)


@dataclass(frozen=True)
class TilePlan:
    tile: str
    scenes: tuple[discovery.Scene, ...]
    grid: TileGrid
    start: dt.date
    end: dt.date
    mask: masks.MaskSource | None
    region: TileRegion
    layout: WindowLayout
    fingerprint: dict = field(hash=False, compare=False)
    reasons: tuple[str, ...] = ()
    #: the disturbance alerts of the tile in this run (None: no alerts)
    alerts: AlertPlan | None = None
    #: the chunks the tile is read and predicted in where they differ from its windows (whole
    #: COG blocks, or whole strips high, see :func:`~treesits_dask.io.grid.read_shape`); None:
    #: the windows
    read_layout: WindowLayout | None = None
    #: whether the tile's scenes may go through the model batch by batch (the ``stream``
    #: setting where the model can and the tile has no alert steps, ``auto`` as the model means
    #: it, :attr:`~treesits_dask.models.ModelCard.stream_auto`; else ``never``; ``required``
    #: where its windows of all scenes do not fit the inference workers and it streams instead,
    #: :func:`~treesits_dask.pipeline.memory.streams_instead`; see
    #: :func:`~treesits_dask.io.bands.plan_reads`)
    stream: str = "never"
    #: bytes a streamed pixel's model state holds between batches (the model's
    #: :attr:`~treesits_dask.models.ModelCard.stream_state_bytes`; 0 where it does not stream)
    stream_state: int = 0

    @property
    def reading(self) -> WindowLayout:
        """The chunks the tile's cube is read and predicted in (its outputs are written in
        ``layout``'s windows)."""
        return self.read_layout or self.layout


@dataclass
class RunPlan:
    config: RunConfig
    definition: discovery.CubeDefinition
    spec: ModelSpec
    card: ModelCard
    window_shape: tuple[int, int]
    tiles: list[TilePlan]
    output_grid: OutputGrid | None
    skipped: dict[str, str] = field(default_factory=dict)
    model_digest: str = ""
    config_digest: str = ""
    #: tiles that cannot be processed, with the reason (an error naming the file and the fix)
    invalid: dict[str, TreesitsError] = field(default_factory=dict)
    #: tiles whose map is up to date but whose COGs are missing or older: rebuilt from the map
    cogs_missing: dict[str, dict] = field(default_factory=dict)
    #: tiles with up-to-date COGs (the mosaics hold them)
    cogs_done: list[str] = field(default_factory=list)
    #: derived layers of finished tiles that are out of date (smoothing, overviews)
    derived: DerivedWork = field(default_factory=DerivedWork)
    repo: MapRepo = field(init=False)

    def __post_init__(self) -> None:
        self.repo = MapRepo(self.config.output)

    @property
    def mosaics_stale(self) -> bool:
        """Whether the VRT mosaics do not hold exactly the tiles whose COGs are complete."""
        if not self.config.cog or not self.cogs_done:
            return False
        grid = self.output_grid
        return not cog.mosaics_hold(
            self.config.output, self.cogs_done, grid.variables() if grid else None
        )

    def model_description(self) -> dict:
        """What the map keeps of the run's model for the STAC catalog's model item (the MLM
        extension): card, weights name, location and sha256, framework version."""
        from importlib import metadata

        try:
            framework = metadata.version("torch")
        except metadata.PackageNotFoundError:
            framework = None
        weights = storage.basename(self.spec.uri)
        return {
            "digest": self.model_digest,
            "name": f"{weights.rsplit('.', 1)[0]}-{self.model_digest[:8]}",
            "family": self.spec.family,
            "card": self.card.model_dump(mode="json", exclude={"metrics"}),
            "metrics": self.card.metrics,
            "weights": weights,
            "weights_uri": self.spec.uri,
            "weights_sha256": ledger.file_digest(self.spec.uri),
            "params_sha256": ledger.file_digest(self.spec.params_uri),
            "framework_version": framework,
        }

    def windows_per_tile(self, tile: TilePlan) -> int:
        return len(tile.layout)

    def window_bytes(self, tile: TilePlan) -> int:
        """A chunk of all scenes as the tile is read and predicted (its window, or the whole
        blocks or strips nearest it: :func:`~treesits_dask.io.grid.read_shape`)."""
        rows, cols = tile.reading.shape
        older = len(tile.alerts.older) if tile.alerts else 0
        return (len(tile.scenes) + older) * tile.grid.count * rows * cols * 2

    def summary(self) -> dict:
        """JSON-able description (what ``plan`` prints)."""
        from ..io.layouts import layout_parts
        from .cluster import describe
        from .preview import read_preview
        from .reading import tile_scenes

        reads = read_preview(self)
        tiles = [
            {
                "tile": t.tile,
                "scenes": len(t.scenes),
                "first": str(t.scenes[0].date),
                "last": str(t.scenes[-1].date),
                "window_start": str(t.start),
                "window_end": str(t.end),
                "size_px": [t.grid.height, t.grid.width],
                "windows": self.windows_per_tile(t),
                "read_chunk": list(t.reading.shape),
                "file_blocks": {
                    f"{p.grid.block_shape[0]}x{p.grid.block_shape[1]}": len(p.indices)
                    for p in layout_parts(tile_scenes(t), t.grid)
                },
                "mask": t.mask.url if t.mask else None,
                "window_mib": round(self.window_bytes(t) / 2**20, 1),
                "why": list(t.reasons),
                "read": reads["tiles"][t.tile] if reads["known"] else None,
            }
            for t in self.tiles
        ]
        cluster = describe(self.config)

        def held(t: TilePlan) -> bool:  # a streamed tile never holds a window of all scenes
            if reads["known"]:
                return "stream_chunk" not in reads["tiles"][t.tile]
            return t.stream != "required"

        max_window = max((self.window_bytes(t) for t in self.tiles if held(t)), default=0)
        concurrent = cluster.get("concurrent_tasks", 1)
        return {
            "cube": self.config.cube,
            "output": self.config.output,
            "model": {
                "uri": self.spec.uri,
                "family": self.card.family,
                "classes": self.card.class_names,
            },
            "window_shape": list(self.window_shape),
            "tiles": tiles,
            "skipped": self.skipped,
            "invalid": {t: str(e) for t, e in self.invalid.items()},
            "cogs_missing": sorted(self.cogs_missing),
            "derived_out_of_date": {
                "smoothing": sorted(self.derived.smoothing),
                "overviews": self.derived.overviews,
            },
            "total_windows": sum(self.windows_per_tile(t) for t in self.tiles),
            "memory": {  # of the tiles whose windows of all scenes are put together
                "window_mib": round(max_window / 2**20, 1),
                # a window of int16 input, the float32 copy of its selected pixels and the outputs
                "per_task_mib_estimate": round(max_window * 2.5 / 2**20, 1),
                "concurrent_tasks": concurrent,
                "cluster_mib_estimate": round(max_window * 2.5 * concurrent / 2**20, 1),
            },
            "cluster": cluster,
            "reads": {k: v for k, v in reads.items() if k != "tiles"},
        }


def _settings_digest(config: RunConfig) -> str:
    """The settings that change output values (not chunking, batching or the cluster).

    ``precision`` enters only when it is not ``fp32``.  ``outputs`` names what the prediction
    kernel computes beyond the four layers of the first maps (``last_valid_date`` and the
    uncertainty layers), so a tile finished before a layer existed or was chosen is redone;
    ``alerts`` the alert settings (a change replays the alert history).  Bayesian smoothing is
    not here: it is redone from the stored probabilities, without reading a scene
    (:mod:`treesits_dask.pipeline.postprocess`).
    """
    settings = {
        "model_family": config.model_family,
        "qai": sorted(set(config.qai_flags)),  # the flags as a set: their order means nothing
        "sensors": sorted(config.sensors),
        "start_date": config.start_date,
        "end_date": config.end_date,
        "outputs": ["last_valid_date", *sorted(config.uncertainty)],
    }
    if config.precision != "fp32":
        settings["precision"] = config.precision
    if config.alerts is not None:
        settings["alerts"] = config.alerts.model_dump(mode="json")
    return ledger.config_digest(settings)


def _model_digest(spec: ModelSpec, card: ModelCard) -> str:
    return ledger.config_digest(
        {
            "weights": ledger.file_digest(spec.uri),
            "params": ledger.file_digest(spec.params_uri),
            "card": card.model_dump(exclude={"metrics"}),
        }
    )


@dataclass(frozen=True)
class _Staged:
    """A tile that needs work, before its grid is read."""

    tile: str
    scenes: tuple[discovery.Scene, ...]
    start: dt.date
    end: dt.date
    mask_url: str | None
    fingerprint: dict
    reasons: tuple[str, ...]
    #: scenes unchanged since the ledger record of a finished run (their headers were read then),
    #: by name, with their BOA file's block shape as recorded (:func:`ledger.known_scenes`)
    known: dict[str, tuple[int, int]] = field(default_factory=dict, hash=False, compare=False)
    #: every scene of the tile (of the sensors), in and before the window
    listed: tuple[discovery.Scene, ...] = ()
    #: the tile's alert plan (None without alerts); its ``older`` scenes are read and checked too
    alerts: AlertPlan | None = None

    @property
    def read(self) -> tuple[discovery.Scene, ...]:
        """The scenes the tile's read goes through: the alerts' older ones, then its own."""
        return (*self.alerts.older, *self.scenes) if self.alerts is not None else self.scenes


def _stage(
    config: RunConfig,
    tile: str,
    card: ModelCard,
    model_digest: str,
    cfg_digest: str,
    record: dict | None,
):
    """The tile's scenes in its date window, its mask and what changed since its ``record``."""
    scenes = discovery.scene_table(config.cube, tile, config.sensors)
    if not scenes:
        raise DiscoveryError(
            f"tile {tile} has no BOA scenes of sensors {','.join(config.sensors)} in "
            f"{storage.join(config.cube, tile)}; check --sensors or remove the tile from --tiles"
        )
    try:
        start, end = effective_window(
            card, [s.date for s in scenes], config.start_date, config.end_date
        )
    except TreesitsError:
        start, end = config.start_date or scenes[0].date, config.end_date or scenes[-1].date
    kept = tuple(s for s in scenes if start <= s.date <= end)
    if not kept:
        raise DiscoveryError(
            f"tile {tile} has no scenes between {start} and {end} (its {len(scenes)} scenes span "
            f"{scenes[0].date} .. {scenes[-1].date}); adjust --start-date / --end-date"
        )
    mask_url = masks.find_mask(config.mask_dir, config.mask_name, tile) if config.mask_dir else None
    previous_mask = (record or {}).get("fingerprint", {}).get("mask")
    mask = ledger.mask_fingerprint(mask_url, previous_mask)
    fingerprint = ledger.tile_fingerprint(kept, start, end, mask)
    reasons = (["--force"] if config.force else []) + ledger.compare(
        record, fingerprint, model_digest, cfg_digest
    )
    return _Staged(
        tile,
        kept,
        start,
        end,
        mask_url,
        fingerprint,
        tuple(reasons),
        ledger.known_scenes(record, fingerprint),
        tuple(scenes),
    )


def _sort_tiles(
    config: RunConfig,
    tiles,
    card,
    digests: dict,
    attrs: dict[str, dict],
    skip_done: bool,
    target: OutputGrid | None,
    derived: DerivedWork,
):
    """Stage every selected tile (scene listing, fingerprint; many tiles at once: each costs a
    listing round trip on object stores) and sort them: to process, up to date (with complete
    COGs or COGs to rebuild from the map), or invalid.  ``attrs``: the tiles' attributes in the
    map; ``target``: the map's grid with the layers of ``config``; a tile whose smoothing is out
    of date (``derived``) gets its smoothed COGs from the smoothing stage."""
    from concurrent.futures import ThreadPoolExecutor

    records = {t: a["record"] for t, a in attrs.items() if "record" in a}

    def stage(tile: str):
        try:
            st = _stage(config, tile, card, *digests.values(), records.get(tile))
        except TILE_ERRORS as exc:
            return tile, exc, None
        done = skip_done and not config.force and not st.reasons
        manifest = cog.cog_manifest(config.output, tile) if done and config.cog else None
        return tile, st, manifest

    staged, skipped, invalid, cogs_missing, cogs_done = [], {}, {}, {}, []
    with ThreadPoolExecutor(max(1, min(_TILES_LISTED_AT_ONCE, len(tiles)))) as pool:
        for tile, st, manifest in pool.map(stage, tiles):
            if isinstance(st, TreesitsError):
                invalid[tile] = st
            elif not (skip_done and not config.force and not st.reasons):
                staged.append(st)
            elif not config.cog:
                skipped[tile] = "up to date"
            elif cogs_up_to_date(manifest, attrs[tile], target, tile in derived.smoothing):
                skipped[tile] = "up to date"
                cogs_done.append(tile)
            else:
                skipped[tile] = "up to date; its COGs are rebuilt from the map"
                cogs_missing[tile] = records[tile]
        if config.cog:  # finished tiles outside the selection stay in the mosaics
            others = [t for t in records if t not in set(tiles)]
            found = pool.map(lambda t: cog.cog_manifest(config.output, t), others)
            cogs_done += [t for t, m in zip(others, found, strict=True) if m]
    return staged, skipped, invalid, cogs_missing, cogs_done


def make_plan(config: RunConfig, skip_done: bool | None = None) -> RunPlan:
    """Discover the cube, read the model card, compare with the ledger, check everything that can
    be checked on the driver (see the module's docstring).

    ``skip_done`` (default: not ``config.force``) leaves out tiles whose ledger record matches.
    Problems of the whole run (settings, access, checkpoint, output) raise; problems of one tile
    leave it out (:attr:`RunPlan.invalid`).
    """
    from .checks import check_locations, check_model, check_not_old_store, check_output

    config.require_model()
    skip_done = (not config.force) if skip_done is None else skip_done
    check_locations(config)
    check_not_old_store(config.output)
    definition = discovery.read_cube_definition(config.cube)
    all_tiles = discovery.list_tiles(config.cube)
    tiles = discovery.select_tiles(config.cube, config.tiles)
    spec = ModelSpec(uri=config.model, family=config.model_family, params_uri=config.model_params)
    card = read_card(spec)
    digests = {"model_digest": _model_digest(spec, card), "config_digest": _settings_digest(config)}
    repo = MapRepo(config.output)
    stored = repo.grid()
    attrs = repo.tile_attributes() if stored is not None else {}
    records = {t: a["record"] for t, a in attrs.items() if "record" in a}
    target = (
        OutputGrid(**{**stored.__dict__, "layers": (*stored.layers, *config.layers)})
        if stored is not None
        else None
    )
    derived = DerivedWork()
    if target is not None:
        levels = len(level_paths(repo.zarr_store()))
        derived = derived_work(attrs, target, smooth_params(config, target), levels)
    staged, skipped, invalid, cogs_missing, cogs_done = _sort_tiles(
        config, tiles, card, digests, attrs, skip_done, target, derived
    )
    common = dict(config=config, definition=definition, spec=spec, card=card, skipped=skipped,
                  invalid=invalid, cogs_missing=cogs_missing, cogs_done=sorted(cogs_done),
                  derived=derived, **digests)  # fmt: skip
    if staged:  # the run's own checks, before any per-tile header is read
        check_model(spec)
        check_output(config.output)
    staged = [  # the alerts' older scenes are read too: checked and counted with the tile's
        replace(st, alerts=_alerts(config, card, repo, st, records.get(st.tile), digests))
        for st in staged
    ]
    checked = check_tiles(config, definition, staged, invalid)
    if not checked:
        return RunPlan(window_shape=stored.chunk if stored else (0, 0), tiles=[],
                       output_grid=target, **common)  # fmt: skip
    first = checked[0][1]
    expected = _expected_workers(config)  # (workers, routing) the settings start, or None
    n_scenes = max(len(st.read) for st, _, _ in checked)
    window_shape = _window_shape(config, stored, first, n_scenes, expected)
    for _, grid, _ in checked:
        choose_window_shape(grid, window_shape, 1)  # same divisibility check for every tile
    checked = _windows_fit_workers(config, card, checked, window_shape, invalid, expected)
    if not checked:
        return RunPlan(window_shape=window_shape, tiles=[], output_grid=target, **common)
    grids = {st.tile: grid for st, grid, _, _, _ in checked}
    output_grid, regions = _output_grid(
        definition, all_tiles, first, grids, window_shape, card, config.layers
    )
    plans = [
        TilePlan(
            tile=st.tile,
            scenes=st.scenes,
            grid=grid,
            start=st.start,
            end=st.end,
            mask=mask,
            region=regions[st.tile],
            layout=WindowLayout.of(grid, window_shape),
            read_layout=_read_layout(grid, window_shape, shape),
            fingerprint=st.fingerprint,
            reasons=st.reasons,
            alerts=st.alerts,
            stream=stream,
            stream_state=card.stream_state_bytes,
        )
        for st, grid, mask, shape, stream in checked
    ]
    for tile, exc in invalid.items():
        log.error("tile %s cannot be processed: %s", tile, exc)
    return RunPlan(window_shape=window_shape, tiles=plans, output_grid=output_grid, **common)


def _alerts(config: RunConfig, card, repo: MapRepo, st: _Staged, record, digests):
    """The alert plan of a tile to be processed (None without alerts)."""
    if config.alerts is None:
        return None
    key = alert_key(digests["model_digest"], digests["config_digest"], st.fingerprint["mask"])
    return plan_alerts(repo, config, card, st.tile, st.listed, st.scenes, st.start, key, record)


def _stream(config: RunConfig, card) -> str:
    """A tile's ``stream`` (see :attr:`TilePlan.stream`)."""
    if not card.streams or config.alerts is not None:
        return "never"
    return card.stream_auto if config.stream == "auto" else config.stream


def _read_layout(grid: TileGrid, window_shape, shape) -> WindowLayout | None:
    """The chunks a tile is read in where they differ from its windows (else None)."""
    return None if tuple(shape) == tuple(window_shape) else WindowLayout.of(grid, shape)


def _expected_workers(config: RunConfig):
    """(the workers the settings start, their routing), or None for a standing cluster (see
    :func:`~treesits_dask.pipeline.memory.expected_workers`)."""
    from .cluster import routing_for
    from .memory import expected_workers

    workers = expected_workers(config)
    return (workers, routing_for(config, workers)) if workers else None


def _windows_fit_workers(
    config: RunConfig, card, checked: list, window_shape, invalid: dict, expected
) -> list:
    """The ``checked`` tiles whose chunks of all scenes fit the inference workers the settings
    start (``expected``: :func:`_expected_workers`; see
    :func:`~treesits_dask.pipeline.memory.window_memory_problem`), each with the chunk shape it is
    read and predicted in and its ``stream`` (:attr:`TilePlan.stream`): chunks of whole blocks
    that hold a window where windows are smaller than the blocks and those chunks fit well
    (:func:`~treesits_dask.io.grid.block_chunk`), else :func:`~treesits_dask.io.grid.read_shape`,
    else the window where only the window fits; where not even the window fits, the window,
    streamed through the model (``required``) where the model streams and its states fit
    (:func:`~treesits_dask.pipeline.memory.streams_instead`).  The others go to ``invalid`` with
    the sizes and the settings to change.
    Nothing is left out for a standing cluster (its workers are checked when the run connects)."""
    from .memory import fitting_chunk, streams_instead

    stream = _stream(config, card)
    kept = []
    for st, grid, mask in checked:
        shape = read_shape(grid, window_shape)  # a chunk of all scenes, as it is predicted
        if expected is None:
            kept.append((st, grid, mask, shape, stream))
            continue
        larger = block_chunk(grid, window_shape)  # whole blocks, where windows cut them
        shape, problem = fitting_chunk(
            len(st.read), grid.count, shape, window_shape, *expected, larger=larger
        )
        if problem:
            layout = WindowLayout.of(grid, window_shape)
            tile = (st.tile, grid, layout, len(st.read), mask)
            streams, why = streams_instead(problem, stream, config, card, *expected, tile)
            if not streams:
                invalid[st.tile] = ConfigError(why)
                continue
            shape, stream_of = tuple(window_shape), "required"
        else:
            stream_of = stream
        kept.append((st, grid, mask, shape, stream_of))
    return kept


def _window_shape(
    config: RunConfig, stored: OutputGrid | None, first: TileGrid, n_scenes: int, expected=None
) -> tuple[int, int]:
    """The window (= chunk) shape: the existing map's, whatever the scenes; else chosen (``auto``:
    within what the inference workers the settings start, ``expected`` (see
    :func:`_expected_workers`), can hold: :func:`~treesits_dask.pipeline.memory.window_budget`)."""
    if stored is None:
        from .memory import window_budget

        budget = None
        if config.window_shape is None and expected is not None:
            budget = window_budget(*expected)
        return choose_window_shape(first, config.window_shape, n_scenes, window_bytes=budget)
    if config.window_shape is not None and tuple(config.window_shape) != tuple(stored.chunk):
        rows, cols = stored.chunk
        raise ConfigError(
            f"setting 'window' {config.window} differs from the window shape {rows}x{cols} of the "
            f"map in {config.output}: a map keeps its window (chunk) shape; drop --window or "
            "write to another --output"
        )
    return tuple(stored.chunk)


def _output_grid(
    definition,
    tiles: list[str],
    first: TileGrid,
    grids: dict[str, TileGrid],
    window_shape,
    card: ModelCard,
    layers: tuple[str, ...] = (),
) -> tuple[OutputGrid, dict[str, TileRegion]]:
    """The map's grid: anchored at the upper-left corner of tile ``X0000_Y0000`` and reaching to
    the last tile of the cube (``tiles``: all its tiles), so every tile has a fixed place, whichever
    tiles a run selects; regions of the tiles of ``grids``."""
    a, e = first.transform[0], first.transform[4]
    for tile, g in grids.items():
        if (g.width, g.height) != (first.width, first.height) or abs(
            g.transform[0] - a
        ) > 1e-9 * abs(a):
            raise InputDataError(
                f"tile {tile} has {g.width}x{g.height} px of {g.transform[0]} m but tile "
                f"{first.tile} has {first.width}x{first.height} px of {a} m; one map needs tiles "
                "of one grid (map the sensors of another resolution into another --output)"
            )
    indices = {t: discovery.parse_tile_id(t) for t in {*tiles, *grids}}
    negative = sorted(t for t, (x, y) in indices.items() if x < 0 or y < 0)
    if negative:
        raise DiscoveryError(
            f"tiles {negative[:3]} lie west or north of the grid origin in "
            "datacube-definition.prj; the map is anchored at tile X0000_Y0000"
        )
    fx, fy = indices[first.tile]
    left = first.transform[2] - fx * first.width * a  # the real corner of the first tile, moved
    top = first.transform[5] - fy * first.height * e
    width = (max(x for x, _ in indices.values()) + 1) * first.width
    height = (max(y for _, y in indices.values()) + 1) * first.height
    regions = {
        t: TileRegion(t, indices[t][1] * first.height, indices[t][0] * first.width, first.height,
                      first.width)
        for t in grids
    }  # fmt: skip
    grid = OutputGrid(
        crs_wkt=first.crs_wkt,
        transform=(a, 0.0, left, 0.0, e, top),
        width=width,
        height=height,
        chunk=tuple(window_shape),
        class_names=tuple(card.class_names),
        multiclass=card.multiclass,
        layers=layers,
    )
    return grid, regions
