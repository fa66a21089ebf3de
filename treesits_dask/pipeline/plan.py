"""Planning: config -> discovered tiles, scene windows, grids, masks, ledger state and the output
grid.

Runs on the driver before any cluster starts.  Deciding which tiles need work uses listings and file
metadata only; the first BOA of a tile is opened (header only) only when the tile is to be
processed.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from ..config import RunConfig
from ..errors import DiscoveryError, InputDataError, TreesitsError
from ..io import discovery, masks, storage
from ..io.cube import tile_grid
from ..io.grid import TileGrid, WindowLayout, choose_window_shape
from ..models import ModelCard, ModelSpec, effective_window, read_card
from ..outputs.schema import OutputGrid, TileRegion
from ..state import ledger

__all__ = ["RunPlan", "TilePlan", "make_plan"]

log = logging.getLogger(__name__)


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
    store_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.store_url = storage.join(self.config.output, ledger.STORE_NAME)

    def windows_per_tile(self, tile: TilePlan) -> int:
        return len(tile.layout)

    def window_bytes(self, tile: TilePlan) -> int:
        rows, cols = self.window_shape
        return len(tile.scenes) * tile.grid.count * rows * cols * 2

    def summary(self) -> dict:
        """JSON-able description (what ``plan`` prints)."""
        from .cluster import describe

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
                "mask": t.mask.url if t.mask else None,
                "window_mib": round(self.window_bytes(t) / 2**20, 1),
                "why": list(t.reasons),
            }
            for t in self.tiles
        ]
        cluster = describe(self.config)
        max_window = max((self.window_bytes(t) for t in self.tiles), default=0)
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
            "total_windows": sum(self.windows_per_tile(t) for t in self.tiles),
            "memory": {
                "window_mib": round(max_window / 2**20, 1),
                # a window of int16 input, the float32 copy of its selected pixels and the outputs
                "per_task_mib_estimate": round(max_window * 2.5 / 2**20, 1),
                "concurrent_tasks": concurrent,
                "cluster_mib_estimate": round(max_window * 2.5 * concurrent / 2**20, 1),
            },
            "cluster": cluster,
        }


def _settings_digest(config: RunConfig) -> str:
    """The settings that change output values (not chunking, batching or the cluster).

    ``precision`` enters only when it is not ``fp32``, so that the digests of records written
    before the setting existed (all fp32) still match.
    """
    settings = {
        "model_family": config.model_family,
        "qai": list(config.qai_flags),
        "sensors": sorted(config.sensors),
        "start_date": config.start_date,
        "end_date": config.end_date,
    }
    if config.precision != "fp32":
        settings["precision"] = config.precision
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


def _stage(config: RunConfig, tile: str, card: ModelCard, model_digest: str, cfg_digest: str):
    """The tile's scenes in its date window, its mask and ledger state: a :class:`_Staged`, or a
    reason to skip it."""
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
    fingerprint = ledger.tile_fingerprint(kept, start, end, mask_url)
    reasons = (["--force"] if config.force else []) + ledger.compare(
        ledger.read_record(config.output, tile), fingerprint, model_digest, cfg_digest
    )
    return _Staged(tile, kept, start, end, mask_url, fingerprint, tuple(reasons))


def make_plan(config: RunConfig, skip_done: bool | None = None) -> RunPlan:
    """Discover the cube, read the model card, compare with the ledger, check masks and grids.

    ``skip_done`` (default: not ``config.force``) leaves out tiles whose ledger record matches.
    """
    config.require_model()
    skip_done = (not config.force) if skip_done is None else skip_done
    definition = discovery.read_cube_definition(config.cube)
    tiles = discovery.select_tiles(config.cube, config.tiles)
    spec = ModelSpec(uri=config.model, family=config.model_family, params_uri=config.model_params)
    card = read_card(spec)
    digests = {"model_digest": _model_digest(spec, card), "config_digest": _settings_digest(config)}
    common = dict(config=config, definition=definition, spec=spec, card=card, **digests)

    staged, skipped = [], {}
    for tile in tiles:
        st = _stage(config, tile, card, digests["model_digest"], digests["config_digest"])
        if skip_done and not config.force and not st.reasons:
            skipped[tile] = "up to date"
        else:
            staged.append(st)
    if not staged:
        return RunPlan(window_shape=(0, 0), tiles=[], output_grid=None, skipped=skipped, **common)

    grids = {st.tile: tile_grid(definition, st.scenes[0]) for st in staged}
    first = grids[staged[0].tile]
    window_shape = choose_window_shape(
        first, config.window_shape, max(len(st.scenes) for st in staged)
    )
    for grid in grids.values():
        choose_window_shape(grid, window_shape, 1)  # same divisibility check for every tile
    output_grid, regions = _output_grid(definition, tiles, first, grids, window_shape, card)
    plans = [
        TilePlan(
            tile=st.tile,
            scenes=st.scenes,
            grid=grids[st.tile],
            start=st.start,
            end=st.end,
            mask=masks.mask_source(st.mask_url, grids[st.tile]) if st.mask_url else None,
            region=regions[st.tile],
            layout=WindowLayout.of(grids[st.tile], window_shape),
            fingerprint=st.fingerprint,
            reasons=st.reasons,
        )
        for st in staged
    ]
    return RunPlan(
        window_shape=window_shape, tiles=plans, output_grid=output_grid, skipped=skipped, **common
    )


def _output_grid(
    definition,
    tiles: list[str],
    first: TileGrid,
    grids: dict[str, TileGrid],
    window_shape,
    card: ModelCard,
) -> tuple[OutputGrid, dict[str, TileRegion]]:
    """The store covers all selected tiles (processed or not), so it is the same on every run."""
    a, e = first.transform[0], first.transform[4]
    for tile, g in grids.items():
        if (g.width, g.height) != (first.width, first.height) or abs(
            g.transform[0] - a
        ) > 1e-9 * abs(a):
            raise InputDataError(
                f"tile {tile} has {g.width}x{g.height} px of {g.transform[0]} m but tile "
                f"{first.tile} has "
                f"{first.width}x{first.height} px of {a} m; one run needs tiles of one grid (run "
                "the "
                "sensors of another resolution separately)"
            )
    # pixel offsets of every tile relative to the first processed tile, anchored on its real
    # transform
    fx, fy = definition.tile_origin(first.tile)
    offsets = {
        t: (round((x - fx) / a), round((y - fy) / e))
        for t, (x, y) in ((t, definition.tile_origin(t)) for t in tiles)
    }
    min_col = min(c for c, _ in offsets.values())
    min_row = min(r for _, r in offsets.values())
    left = first.transform[2] + min_col * a
    top = first.transform[5] + min_row * e
    regions, width, height = {}, 0, 0
    for tile, (c, r) in offsets.items():
        col, row = c - min_col, r - min_row
        regions[tile] = TileRegion(tile, row, col, first.height, first.width)
        width, height = max(width, col + first.width), max(height, row + first.height)
    grid = OutputGrid(
        crs_wkt=first.crs_wkt,
        transform=(a, 0.0, left, 0.0, e, top),
        width=width,
        height=height,
        chunk=tuple(window_shape),
        class_names=tuple(card.class_names),
        multiclass=card.multiclass,
    )
    return grid, regions
