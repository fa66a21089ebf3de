"""The map of an output as a versioned Zarr store: an Icechunk repository at
``<output>/map.icechunk`` (local folder or ``s3://`` prefix).

Every tile is one commit on branch ``main``: its windows (written by the workers into forks of the
tile's session, merged on the driver) and its record (what it was computed from) become visible
together or not at all, so a tile is never half written, and a run that dies leaves the map as
it was.  Each run that changed the map is tagged ``run-<run id>``: the versions of the map.
Commits use Icechunk's conflict detection (conditional writes on object stores); tiles write
disjoint chunks, so concurrent tile commits of one run rebase onto each other.

Why Icechunk and not plain Zarr plus a ledger: see the README's "Output store" section (measured
write and commit costs, and what each needs for atomic tiles and versions).

This module is longer than 400 lines because ``MapRepo`` is one object read top to bottom: how a
map is opened, written a tile at a time, its derived layers committed, tagged, read back at a
version and compared between versions all rest on the same repository handle, session handling
and record layout.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import threading
import time
from typing import Any

from ..errors import OutputError
from ..io import storage
from .cog import COG_MANIFEST, cog_manifest, tile_cogs, write_mosaics
from .schema import SMOOTHED_VARIABLES, OutputGrid, TileRegion
from .store import create_layout, data_path, extend_layout, grid_differences, stored_grid

__all__ = [
    "BRANCH", "MAX_SHARDS", "MODELS_GROUP", "REPO_NAME", "TILES_GROUP", "MapRepo",
    "cogs_up_to_date", "repo_config", "repo_storage", "shard_chunks", "stale_cogs",
    "write_tile_cogs",
]  # fmt: skip

log = logging.getLogger(__name__)

REPO_NAME = "map.icechunk"
BRANCH = "main"
#: group whose child groups hold one tile record each (attribute ``record``)
TILES_GROUP = "_tiles"
#: group whose child groups (named by model digest) describe the models of the map
MODELS_GROUP = "_models"
_RUN_TAG = "run-"
#: the most manifest shards per array of a new map (see :func:`repo_config`)
MAX_SHARDS = 400
#: tries of a commit whose rebase read broke off (:func:`commit_rebasing`)
COMMIT_TRIES = 5
_LOGS = threading.Lock()
_LOGS_SET = False


def _quiet_icechunk() -> None:
    """Icechunk warns on every open that its local-filesystem storage is not safe for concurrent
    commits: the output's lease (:mod:`treesits_dask.state.lease`) is what keeps drivers apart."""
    global _LOGS_SET
    with _LOGS:
        if not _LOGS_SET:
            import icechunk

            icechunk.set_logs_filter(os.environ.get("ICECHUNK_LOG", "error"))
            _LOGS_SET = True


def commit_rebasing(session, message: str, metadata: dict) -> str:
    """Commit ``session``, rebased onto commits made since it opened (other tiles of the run);
    returns the snapshot id.

    To rebase, Icechunk reads the branch tip's snapshot and the transaction log of each newer
    commit.  Icechunk 1.1 streams both without retrying a read that breaks off in the middle of
    its body (``session error: I/O error`` in ``icechunk::session::rebase``), so a dropped
    connection would fail a tile after all its work.  Such a commit is tried again, up to
    :data:`COMMIT_TRIES` times: a failed rebase leaves the session consistent (on the last commit
    it got past) and nothing of it on the branch, so it cannot land twice.  Other errors
    (conflicts the solver cannot settle, a commit that failed past its rebase) are raised."""
    import icechunk

    for attempt in range(1, COMMIT_TRIES + 1):
        try:
            return session.commit(
                message, metadata=metadata, rebase_with=icechunk.BasicConflictSolver()
            )
        except icechunk.IcechunkError as exc:
            text = str(exc)
            broke_off = "I/O error" in text and "icechunk::session::rebase" in text
            if not broke_off or attempt == COMMIT_TRIES:
                raise
            log.warning(
                "%s: a read of the map broke off while rebasing onto newer commits; retrying "
                "the commit (try %d of %d)", message, attempt + 1, COMMIT_TRIES,
            )  # fmt: skip
            time.sleep(0.2 * 2**attempt)


def repo_storage(url: str):
    """Icechunk storage for a local folder or an ``s3://bucket/prefix`` URL; S3 endpoint, region
    and addressing come from the environment (:func:`treesits_dask.io.storage.s3_environment`),
    credentials from the environment or profile of each process, never from arguments."""
    import icechunk

    _quiet_icechunk()
    if not storage.is_remote(url):
        return icechunk.local_filesystem_storage(storage.strip_protocol(url))
    if not url.startswith("s3://"):
        raise OutputError(f"{url}: the map store can live on a local disk or on S3 (s3://)")
    bucket, _, prefix = storage.strip_protocol(url).partition("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return icechunk.s3_storage(
        bucket=bucket,
        prefix=prefix or None,
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        endpoint_url=endpoint,
        allow_http=bool(endpoint and endpoint.startswith("http://")),
        force_path_style=storage.s3_addressing() == "path",
        from_env=True,
    )


def shard_chunks(grid: OutputGrid, tile_px: tuple[int, int]) -> tuple[int, int]:
    """Chunks along ``y`` and ``x`` of a manifest shard: ``k x k`` tiles (``tile_px`` / chunk
    chunks each way), ``k`` the smallest that keeps :data:`MAX_SHARDS` shards or fewer per array
    of ``grid`` (1, a shard per tile, on a grid of 3000 px tiles up to 20 x 20 tiles)."""
    rows, cols = (max(1, t // c) for t, c in zip(tile_px, grid.chunk, strict=True))
    ny, nx = math.ceil(grid.height / grid.chunk[0]), math.ceil(grid.width / grid.chunk[1])
    k = 1
    while math.ceil(ny / (k * rows)) * math.ceil(nx / (k * cols)) > MAX_SHARDS:
        k += 1
    return k * rows, k * cols


def repo_config(grid: OutputGrid, tile_px: tuple[int, int] | None = None):
    """The repository configuration of a new map: manifests split in shards of whole tiles
    (:func:`shard_chunks`; tiles start at the grid's origin, so a tile lies in one shard).

    Without splitting every commit rewrites the whole manifest of each array it touches: a tile
    commit into a map of N tiles would write (and read) O(N) chunk references, so the first run
    of a national map would write O(N^2).  Split, a commit writes the shards of its tile only
    (measured in the README's "Output store" section).  A shard holds more than one tile where
    the grid has more than :data:`MAX_SHARDS` tiles: Icechunk 1.x compares every shard of an
    array with every other each time a window's fork is merged into the tile's session, 0.1 s
    per merge with 3080 shards (1000 px tiles in a 44000 x 70000 px grid), 2 ms with 360.  The
    condition matches every array with ``y`` and ``x`` dimensions: the map's in group ``0`` and
    the overviews' in groups ``1``, ``2``, ... (same chunk size), where a shard spans ``2**level``
    times as many tiles each way: as many chunk references as a shard at full resolution, and an
    overview level is one commit per run.  Kept in the repository's ``config.yaml``; later opens
    use it."""
    import icechunk

    config = icechunk.RepositoryConfig.default()
    if tile_px:
        rows, cols = shard_chunks(grid, tile_px)
        dim = icechunk.ManifestSplitDimCondition.DimensionName
        config.manifest = icechunk.ManifestConfig(
            splitting=icechunk.ManifestSplittingConfig.from_dict(
                {icechunk.ManifestSplitCondition.AnyArray(): {dim("y"): rows, dim("x"): cols}}
            )
        )
    return config


class MapRepo:
    """The Icechunk repository of one output (opened lazily; nothing is created until
    :meth:`ensure_layout`)."""

    def __init__(self, output: str):
        self.output = output
        self.url = storage.join(output, REPO_NAME)
        self._repo = None

    # ------------------------------------------------------------------------------ repository
    def exists(self) -> bool:
        import icechunk

        if not storage.is_remote(self.url):  # icechunk would create the folder to look into it
            if not os.path.isdir(storage.strip_protocol(self.url)):
                return False
        return icechunk.Repository.exists(repo_storage(self.url))

    def _refuse_foreign_folder(self) -> None:
        fs, path = storage.get_fs(self.url)
        if fs.exists(path) and fs.ls(path):
            raise OutputError(
                f"{self.url} exists and is not a treesits_dask map (an Icechunk repository); "
                "delete it or write to another --output"
            )

    @property
    def repo(self):
        if self._repo is None:
            import icechunk

            if not self.exists():
                raise OutputError(
                    f"no map at {self.url}: run the pipeline into {self.output} first"
                )
            self._repo = icechunk.Repository.open(repo_storage(self.url))
        return self._repo

    def _readonly(self, snapshot: str | None = None, as_of: dt.datetime | None = None):
        if snapshot:
            return self.repo.readonly_session(snapshot_id=snapshot)
        if as_of is not None:
            return self.repo.readonly_session(BRANCH, as_of=as_of)
        return self.repo.readonly_session(BRANCH)

    def attributes(self) -> dict:
        """The root attributes of the map on ``main`` (model family, model, version...)."""
        import zarr

        return dict(zarr.open_group(self._readonly().store, mode="r").attrs)

    def grid(self) -> OutputGrid | None:
        """The grid of the map on ``main``; None when there is no map yet."""
        if not self.exists():
            return None
        return stored_grid(self._readonly().store)

    def ensure_layout(
        self,
        grid: OutputGrid,
        attrs: dict,
        model: dict | None = None,
        tile_px: tuple[int, int] | None = None,
    ) -> OutputGrid:
        """Create the map for ``grid`` (first run; ``tile_px``: the cube's tile size, which
        sets the manifest splitting, see :func:`repo_config`), or extend it to cover ``grid``
        (tiles that appeared, layers enabled); ``model``: the description of the run's model
        (kept under ``_models/<digest>`` for the STAC catalog's model items).  One commit when
        anything changed.  Returns the grid now stored."""
        import icechunk
        import zarr

        def create(session) -> OutputGrid:
            create_layout(session.store, grid, attrs)
            zarr.open_group(session.store, mode="r+").require_group(TILES_GROUP)
            _keep_model(session.store, model)
            session.commit("create the map", metadata={"kind": "layout"})
            return grid

        if not self.exists():
            self._refuse_foreign_folder()
            config = repo_config(grid, tile_px)
            self._repo = icechunk.Repository.create(repo_storage(self.url), config=config)
            return create(self._repo.writable_session(BRANCH))
        session = self.repo.writable_session(BRANCH)
        stored = stored_grid(session.store)
        if stored is None and len(list(self.repo.ancestry(branch=BRANCH))) == 1:
            return create(session)  # a driver died before the first commit: still empty
        if stored is None:
            raise OutputError(f"{self.url} is an Icechunk repository without a treesits_dask map")
        diffs = grid_differences(stored, grid)
        if diffs:
            raise OutputError(
                f"the map {self.url} exists with a different {'; '.join(diffs)}. Write to another "
                "--output, or delete it to start over"
            )
        grown = extend_layout(session.store, stored, grid)
        _keep_model(session.store, model)
        if session.has_uncommitted_changes:
            added = [v for v in grown.layers if v not in stored.layers]
            session.commit(
                f"extend the map to {grown.width} x {grown.height} px"
                + (f" and the layers {', '.join(added)}" if added else ""),
                metadata={"kind": "layout"},
            )
        return grown

    def models(self, snapshot: str | None = None) -> dict[str, dict]:
        """The descriptions of the models that made the map's tiles, by model digest."""
        import zarr

        if not self.exists():
            return {}
        root = zarr.open_group(self._readonly(snapshot).store, mode="r")
        if MODELS_GROUP not in root:
            return {}
        return {
            name: json.loads(group.attrs["model"])
            for name, group in root[MODELS_GROUP].groups()
            if "model" in group.attrs
        }

    # ------------------------------------------------------------------------------ tiles
    def records(self, snapshot: str | None = None) -> dict[str, dict]:
        """The records of the tiles finished on ``main`` (or at ``snapshot``)."""
        return {
            tile: attrs["record"]
            for tile, attrs in self.tile_attributes(snapshot).items()
            if "record" in attrs
        }

    def tile_attributes(self, snapshot: str | None = None) -> dict[str, dict]:
        """Every tile group's attributes on ``main`` (or at ``snapshot``), JSON-decoded: its
        ``record`` and what its derived layers were made from (``smoothing``, ``overviews``)."""
        import zarr

        if not self.exists():
            return {}
        try:  # a repository created a moment ago has no map group until its first commit
            root = zarr.open_group(self._readonly(snapshot).store, mode="r")
        except zarr.errors.GroupNotFoundError:
            return {}
        if TILES_GROUP not in root:
            return {}
        return {
            name: {k: json.loads(v) if isinstance(v, str) else v for k, v in group.attrs.items()}
            for name, group in root[TILES_GROUP].groups()
        }

    def writable_session(self):
        """A writable session of ``main`` (for the derived layers: smoothing, overviews)."""
        return self.repo.writable_session(BRANCH)

    @staticmethod
    def commit_derived(session, forks, states: dict[str, dict], message: str, metadata: dict):
        """Merge the forks of derived-layer tasks and commit them with the tiles' new states
        (``{tile: {attribute: value}}``, e.g. what a tile's smoothed values were made from).
        Returns the snapshot id."""
        import zarr

        if forks:
            session.merge(*forks)
        root = zarr.open_group(session.store, mode="r+")
        tiles = root.require_group(TILES_GROUP)
        for tile, attrs in states.items():
            group = tiles.require_group(tile)
            for key, value in attrs.items():
                group.attrs[key] = json.dumps(value, sort_keys=True, default=str)
        return commit_rebasing(session, message, metadata)

    @staticmethod
    def region(tile: str, record: dict) -> TileRegion:
        """The region of the map a tile's record covers."""
        (r0, r1), (c0, c1) = record["region"]["rows"], record["region"]["cols"]
        return TileRegion(tile, r0, c0, r1 - r0, c1 - c0)

    def export_cogs(self, dest: str, version: Any = None, tiles=None) -> list[str]:
        """COGs (``<dest>/cog/<tile>/<variable>.tif``) and VRT mosaics of the map as of
        ``version`` (default the latest), for ``tiles`` (default all its finished tiles): the
        GeoTIFF face of an older version.  Returns the written URLs."""

        if not self.exists():
            raise OutputError(f"no map at {self.url}: run the pipeline into {self.output} first")
        snapshot = self.resolve(version) if version is not None else None
        zstore = self.zarr_store(snapshot)
        grid = stored_grid(zstore)
        records = self.records(snapshot)
        chosen = sorted(records) if tiles is None else list(tiles)
        missing = [t for t in chosen if t not in records]
        if missing or not chosen:
            raise OutputError(
                f"the map {self.url} (version {version or 'latest'}) has no finished tile "
                f"{', '.join(missing) or '(none finished)'}; its tiles: "
                f"{', '.join(sorted(records)) or 'none'}"
            )
        written = []
        for tile in chosen:
            written += tile_cogs(dest, zstore, self.region(tile, records[tile]), grid).values()
        written += write_mosaics(dest, chosen).values()
        return written

    def tile_session(self):
        """A writable session for one tile and a fork of it for the window tasks."""
        session = self.repo.writable_session(BRANCH)
        return session, session.fork()

    @staticmethod
    def commit_tile(session, forks, tile: str, record: dict, metadata: dict) -> str:
        """Merge the window forks not merged yet (the run merges each as it comes back), add the
        tile's record, commit: the tile's data and record become visible together.  Returns the
        snapshot id."""
        import zarr

        if forks:
            session.merge(*forks)
        root = zarr.open_group(session.store, mode="r+")
        group = root.require_group(TILES_GROUP).require_group(tile)
        group.attrs["record"] = json.dumps(record, sort_keys=True, default=str)
        return commit_rebasing(session, f"tile {tile}", {"tile": tile, **metadata})

    def _last_tile_run(self) -> str | None:
        """The run of the newest tile commit on ``main`` (layout commits skipped), or None."""
        for info in self.repo.ancestry(branch=BRANCH):  # newest first; stops at the first tile
            if info.metadata.get("tile"):
                return info.metadata.get("run")
        return None

    def tag_unversioned(self) -> str | None:
        """Tag tile commits at the head of ``main`` that no version holds yet (a driver that was
        killed after committing tiles, before its tag) as the version of the run that made them.
        Returns the tagged snapshot, or None.  Reads the head's few newest commits and the tag
        names, whatever the length of the history: each run's commits carry its run id, and a
        run's tag is created at its last commit."""
        if not self.exists():
            return None
        run = self._last_tile_run()
        if run is None or f"{_RUN_TAG}{run}" in self.repo.list_tags():
            return None
        head = self.repo.lookup_branch(BRANCH)
        self.repo.create_tag(f"{_RUN_TAG}{run}", head)
        log.warning(
            "tagged tiles committed by run %s (which did not finish) as a version of %s",
            run, self.url,
        )  # fmt: skip
        return head

    def tag_run(self, run_id: str) -> str | None:
        """Tag the head of ``main`` as the version of run ``run_id`` (when the run committed
        tiles and is not tagged yet)."""
        if f"{_RUN_TAG}{run_id}" in self.repo.list_tags():
            return None
        head = self.repo.lookup_branch(BRANCH)
        self.repo.create_tag(f"{_RUN_TAG}{run_id}", head)
        return head

    # ------------------------------------------------------------------------------ reading
    def zarr_store(self, snapshot: str | None = None, as_of: dt.datetime | None = None):
        """A read-only zarr store of the map (``main``, a snapshot or the state at ``as_of``)."""
        return self._readonly(snapshot, as_of).store

    def read_region(self, region: TileRegion, variable: str, snapshot: str | None = None):
        from .store import read_region

        return read_region(self.zarr_store(snapshot), region, variable)

    def open_dataset(
        self, version: Any = None, mask_and_scale: bool = False, crop: bool = True, level: int = 0
    ):
        """The map as a lazy ``xarray.Dataset`` with its CRS (``.rio``): of ``main``, or as it was
        at ``version`` (:meth:`resolve`).  ``crop`` keeps the bounding box of its finished tiles
        (the store itself reaches from tile X0000_Y0000 to the last tile of the cube).
        ``mask_and_scale=False`` keeps every layer as stored (dates as days since 1970-01-01);
        ``True`` decodes nodata to NaN and the dates to datetime64 (NaT).  ``level``: an overview
        level (1 = half the resolution, ...; the crop is scaled)."""
        import rioxarray  # noqa: F401  (registers the .rio accessor)
        import xarray as xr
        from rasterio.windows import Window

        if not self.exists():
            raise OutputError(f"no map at {self.url}: run the pipeline into {self.output} first")
        snapshot = self.resolve(version) if version is not None else None
        zstore = self.zarr_store(snapshot)
        group = str(level) if level else data_path(zstore) or None
        if level and group not in {str(k) for k in range(1, 64)} & set(_groups(zstore)):
            raise OutputError(f"the map {self.url} has no overview level {level}")
        ds = xr.open_zarr(
            zstore, group=group, consolidated=False, mask_and_scale=mask_and_scale,
            decode_times=mask_and_scale,
        )  # fmt: skip
        regions = [r["region"] for r in self.records(snapshot).values()]
        if crop and regions:
            f = 2**level
            r0, r1 = min(r["rows"][0] for r in regions), max(r["rows"][1] for r in regions)
            c0, c1 = min(r["cols"][0] for r in regions), max(r["cols"][1] for r in regions)
            r0, c0, r1, c1 = r0 // f, c0 // f, -(-r1 // f), -(-c1 // f)
            ds = ds.rio.isel_window(Window(c0, r0, c1 - c0, r1 - r0))
        return ds

    def changes(self, before: Any, after: Any = None):
        """Where the map changed between two versions (``after`` default: ``main``): a lazy
        Dataset with the class (multi-class maps) or disturbance state (binary maps: probability
        >= 0.5) ``before`` and ``after`` (255 = not predicted) and ``changed``, over the bounding
        box of the tiles finished in either version."""
        import numpy as np
        import xarray as xr
        from rasterio.windows import Window

        from .schema import CLASS_NODATA

        snapshots = [self.resolve(v) if v is not None else None for v in (before, after)]
        states, regions = [], []
        for snapshot in snapshots:
            ds = self.open_dataset(snapshot, crop=False)
            if "class" in ds:
                state = ds["class"]
            else:
                p = ds["probability"].isel(class_name=0)
                state = (p >= 0.5).astype(np.uint8).where(p.notnull(), CLASS_NODATA)
            states.append(state.astype(np.uint8).drop_vars("class_name", errors="ignore"))
            regions += [r["region"] for r in self.records(snapshot).values()]
        # the map only grows (east and south of a fixed origin): both on the larger grid
        x = max((st.x for st in states), key=len)
        y = max((st.y for st in states), key=len)
        old, new = (st.reindex(x=x, y=y, fill_value=CLASS_NODATA) for st in states)
        result = xr.Dataset(
            {"before": old, "after": new, "changed": old != new},
            coords={"spatial_ref": states[-1].coords["spatial_ref"]},
        )
        if regions:
            r0, r1 = min(r["rows"][0] for r in regions), max(r["rows"][1] for r in regions)
            c0, c1 = min(r["cols"][0] for r in regions), max(r["cols"][1] for r in regions)
            result = result.rio.isel_window(Window(c0, r0, c1 - c0, r1 - r0))
        return result

    def versions(self) -> list[dict[str, Any]]:
        """The versions of the map, oldest first: one per run that changed it, with the tiles it
        changed (their reasons, scene counts, model and settings digests).

        Read from the tagged snapshots only (their tile records, compared with the previous
        version's), a few at a time: two requests per version, however many tile commits the
        map's history holds."""
        from concurrent.futures import ThreadPoolExecutor

        tags = [t for t in self.repo.list_tags() if t.startswith(_RUN_TAG)]

        def read(tag: str):
            snapshot = self.repo.lookup_tag(tag)
            written = self.repo.lookup_snapshot(snapshot).written_at
            return written, tag, snapshot, self.records(snapshot)

        with ThreadPoolExecutor(max(1, min(8, len(tags)))) as pool:
            found = sorted(pool.map(read, tags))
        out, before = [], {}
        for written, tag, snapshot, records in found:
            tiles = [
                {"tile": tile, "reasons": rec.get("reasons", []),
                 "scenes": rec.get("stats", {}).get("scenes"),
                 "model_digest": rec.get("model_digest"), "config_digest": rec.get("config_digest")}
                for tile, rec in sorted(records.items())
                if before.get(tile, {}).get("record_id") != rec.get("record_id")
            ]  # fmt: skip
            out.append({
                "version": len(out) + 1, "run": tag.removeprefix(_RUN_TAG), "snapshot": snapshot,
                "written_at": written.isoformat(), "tiles": tiles,
            })  # fmt: skip
            before = records
        return out

    def resolve(self, version: Any) -> str:
        """The snapshot of ``version``: a version number (1 = the first run), a run id, a tag, a
        snapshot id or a datetime (the last version written at or before it)."""
        versions = self.versions()
        if isinstance(version, dt.datetime):
            when = version if version.tzinfo else version.replace(tzinfo=dt.UTC)
            older = [v for v in versions if dt.datetime.fromisoformat(v["written_at"]) <= when]
            if not older:
                raise OutputError(f"the map {self.url} has no version written before {version}")
            return older[-1]["snapshot"]
        text = str(version)
        for v in versions:
            if text in (str(v["version"]), v["run"], _RUN_TAG + v["run"], v["snapshot"]):
                return v["snapshot"]
        known = ", ".join(f"{v['version']} (run {v['run']})" for v in versions) or "none"
        raise OutputError(f"the map {self.url} has no version {version!r}; its versions: {known}")


def _keep_model(zstore, model: dict | None) -> None:
    """Store the description of a model under ``_models/<digest>`` (once)."""
    import zarr

    if not model:
        return
    group = zarr.open_group(zstore, mode="r+").require_group(MODELS_GROUP)
    if model["digest"] not in group:
        child = group.require_group(model["digest"])
        child.attrs["model"] = json.dumps(model, sort_keys=True, default=str)


def _groups(zstore) -> list[str]:
    import zarr

    return list(zarr.open_group(zstore, mode="r").group_keys())


def write_tile_cogs(
    output: str,
    snapshot: str,
    region: TileRegion,
    grid: OutputGrid,
    record_id: str,
    variables=None,
    smoothing: dict | None = None,
) -> dict[str, str]:
    """The tile's COGs (of ``variables``, default all of the grid) from the map as committed in
    ``snapshot`` (a task of a run), then the manifest that says which record (and, for the
    smoothed layers, which smoothing state) they show, written last: COGs without it are rebuilt.
    A manifest of the same record keeps the variables written before."""
    written = tile_cogs(
        output, MapRepo(output).zarr_store(snapshot), region, grid, variables=variables
    )
    old = cog_manifest(output, region.tile) or {}
    if variables is None or old.get("record_id") != record_id:
        old = {}
    manifest = {
        "record_id": record_id,
        "snapshot": snapshot,
        "variables": sorted({*old.get("variables", []), *written}),
        "smoothing": old.get("smoothing"),
    }
    if set(written) & set(SMOOTHED_VARIABLES):
        manifest["smoothing"] = _state_digest(smoothing)
    url = storage.join(output, "cog", region.tile, COG_MANIFEST)
    storage.publish_bytes(json.dumps(manifest, indent=1).encode(), url)
    return written


def _state_digest(state: dict | None) -> str | None:
    from ..state.ledger import config_digest

    return config_digest(state) if state else None


def cogs_up_to_date(
    manifest: dict | None, attrs: dict, grid: OutputGrid, smoothing_pending: bool = False
) -> bool:
    """Whether a tile's COGs show its record (and its smoothed layers its smoothing state, unless
    the smoothing stage is about to make them again: ``smoothing_pending``).  ``attrs``: the
    tile's attributes in the map (:meth:`MapRepo.tile_attributes`)."""
    stale = stale_cogs(manifest, attrs, grid, smoothing_pending)
    return stale is not None and not stale


def stale_cogs(
    manifest: dict | None, attrs: dict, grid: OutputGrid, smoothing_pending: bool = False
) -> list[str] | None:
    """The variables whose COGs do not show the tile's state: ``None`` for all of them (another
    record), else the smoothed layers when only they are out of date (or ``[]``)."""
    if not manifest or manifest.get("record_id") != attrs["record"].get("record_id"):
        return None
    have = set(manifest.get("variables") or grid.variables())  # older manifests list them all
    base = [v for v in grid.variables() if v not in SMOOTHED_VARIABLES]
    smoothed = [v for v in grid.variables() if v in SMOOTHED_VARIABLES]
    if not set(base) <= have:
        return None
    if not smoothed or smoothing_pending:
        return []
    if set(smoothed) <= have and manifest.get("smoothing") == _state_digest(attrs.get("smoothing")):
        return []
    return smoothed
