"""The map store on S3: an Icechunk repository (one commit per tile) against plain Zarr plus a
per-tile ledger record (the design before it), on a moto server behind a proxy that adds a round
trip latency to every request.

    python -m treesits_dask.bench.store [--tiles 4] [--size 1000] [--window 250] [--latency 0.02]

Both designs write the same windows (the four map variables, 5 classes, values like a map's:
blocks of one class with smooth probabilities) with the same code (``outputs.store.write_window``),
two windows at a time as two worker threads would.  Per tile it times the window writes and the
step that makes the tile count as done: for Zarr + ledger, deleting the tile's record before the
first write and putting it after the last; for Icechunk, merging the windows' forks and
committing.  Then how a user opens the map: ``xr.open_zarr`` of the store and reading one tile's
class layer (and, for Icechunk only, the same of an earlier version).  Requests are counted by the
proxy.  Prints one JSON report.  Needs the test extra (moto's server).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import pickle
import statistics
import sys
import time

import numpy as np

from ..outputs.schema import OutputGrid, TileRegion
from ..outputs.store import create_layout, write_window

__all__ = ["main"]

CLASSES = ("Spruce", "Beech", "Pine", "Douglas fir", "Oak")
WKT = (
    'PROJCS["ETRS89 / LAEA Europe",GEOGCS["ETRS89",DATUM["ETRS89",SPHEROID["GRS 1980",6378137,'
    '298.257222101]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],'
    'PROJECTION["Lambert_Azimuthal_Equal_Area"],PARAMETER["latitude_of_center",52],'
    'PARAMETER["longitude_of_center",10],PARAMETER["false_easting",4321000],'
    'PARAMETER["false_northing",3210000],UNIT["metre",1],AUTHORITY["EPSG","3035"]]'
)


def _window_values(rng: np.random.Generator, h: int, w: int) -> dict[str, np.ndarray]:
    """Outputs of one window that compress like a map's: 10 x 10 px blocks of one class."""
    small = rng.dirichlet(np.ones(len(CLASSES)), size=(h // 10 + 1, w // 10 + 1)).astype("f4")
    prob = np.repeat(np.repeat(small, 10, 0), 10, 1)[:h, :w].transpose(2, 0, 1)
    prob = np.ascontiguousarray(prob + rng.normal(0, 0.01, prob.shape).astype("f4"))
    return {
        "probability": prob,
        "class": prob.argmax(0).astype(np.uint8),
        "valid_obs": rng.integers(40, 60, (h, w)).astype(np.uint16),
        "last_obs_valid": (rng.random((h, w)) < 0.7).astype(np.uint8),
    }


def _windows(region: TileRegion, window: int):
    for r in range(region.row_off, region.row_off + region.height, window):
        for c in range(region.col_off, region.col_off + region.width, window):
            yield slice(r, r + window), slice(c, c + window)


class _Zarr:
    """Plain Zarr (zarr's fsspec store on s3fs) + a ledger record per tile."""

    name = "zarr+ledger"

    def __init__(self, url: str):
        import zarr

        from ..io import storage

        self.fs, self.path = storage.get_fs(url)
        self.zstore = zarr.storage.FsspecStore.from_mapper(
            self.fs.get_mapper(f"{self.path}/map.zarr")
        )

    def create(self, grid: OutputGrid, tile_px: int) -> None:
        create_layout(self.zstore, grid, {})

    def _record(self, tile: str) -> str:
        return f"{self.path}/_ledger/{tile}.json"

    def begin(self, tile: str):
        """Retract the tile's record before its first write (a rerun must not stay "done")."""
        try:
            self.fs.rm(self._record(tile))
        except FileNotFoundError:
            pass

    def write(self, handle, rows, cols, values):
        write_window(self.zstore, rows, cols, values)
        return None

    def commit(self, tile: str, handle, results) -> None:
        record = {"tile": tile, "scenes": 240, "model_digest": "0" * 64}
        self.fs.pipe_file(self._record(tile), json.dumps(record).encode())

    def dataset(self, version=None):
        import xarray as xr

        if version is not None:
            return None  # plain Zarr keeps no earlier versions
        return xr.open_zarr(self.zstore, consolidated=False, mask_and_scale=False)


class _Icechunk:
    """The map repository of the pipeline (:class:`~treesits_dask.outputs.repo.MapRepo`)."""

    name = "icechunk"

    def __init__(self, url: str):
        from ..outputs.repo import MapRepo

        self.repo = MapRepo(url)
        self.first = None

    def create(self, grid: OutputGrid, tile_px: int) -> None:
        self.repo.ensure_layout(grid, {}, (tile_px, tile_px))  # manifests split by tile

    def begin(self, tile: str):
        return self.repo.tile_session()

    def write(self, handle, rows, cols, values):
        fork = pickle.loads(pickle.dumps(handle[1]))  # as a window task receives it
        write_window(fork.store, rows, cols, values)
        return pickle.dumps(fork)  # as the task returns it

    def commit(self, tile: str, handle, results) -> None:
        forks = [pickle.loads(r) for r in results]
        snapshot = self.repo.commit_tile(handle[0], forks, tile, {"tile": tile}, {"tile": tile})
        self.first = self.first or snapshot

    def dataset(self, version=None):
        import xarray as xr

        return xr.open_zarr(self.repo.zarr_store(version), consolidated=False, mask_and_scale=False)


def _bench(design, grid: OutputGrid, regions, window: int, proxy) -> dict:
    rng = np.random.default_rng(0)
    counts = {}

    def requests():
        return proxy.requests

    t0, n0 = time.perf_counter(), requests()
    design.create(grid, regions[0].height)
    counts["create"] = {"seconds": time.perf_counter() - t0, "requests": requests() - n0}
    per_tile = []
    with cf.ThreadPoolExecutor(2) as pool:  # two windows at a time, as two worker threads
        for region in regions:
            values = [
                (r, c, _window_values(rng, window, window)) for r, c in _windows(region, window)
            ]
            nbytes = sum(v.nbytes for _, _, vals in values for v in vals.values())
            t0, n0 = time.perf_counter(), requests()
            handle = design.begin(region.tile)
            begin_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            results = list(
                pool.map(design.write, [handle] * len(values), *zip(*values, strict=True))
            )
            write_s = time.perf_counter() - t1
            n_write = requests() - n0
            t2 = time.perf_counter()
            design.commit(region.tile, handle, results)
            commit_s = time.perf_counter() - t2
            per_tile.append({
                "begin_s": begin_s, "write_s": write_s, "commit_s": commit_s,
                "write_mb_per_s": nbytes / 2**20 / write_s, "requests": requests() - n0,
                "write_requests": n_write,
            })  # fmt: skip
    out = {"create": counts["create"]}
    for key in ("begin_s", "write_s", "commit_s", "write_mb_per_s", "requests"):
        out[f"tile_{key}_median"] = round(statistics.median(t[key] for t in per_tile), 4)
    out["per_tile"] = per_tile
    region = regions[0]
    t0, n0 = time.perf_counter(), requests()
    ds = design.dataset()
    out["open_s"] = time.perf_counter() - t0
    assert ds["class"][region.rows, region.cols].values.shape == (region.height, region.width)
    out["open_and_read_tile_s"] = time.perf_counter() - t0
    out["open_and_read_requests"] = requests() - n0
    if getattr(design, "first", None):
        t0 = time.perf_counter()
        old = design.dataset(design.first)
        assert old["class"][region.rows, region.cols].values.shape == (region.height, region.width)
        out["open_and_read_first_version_s"] = time.perf_counter() - t0
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m treesits_dask.bench.store", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--tiles", type=int, default=4, help="tiles written (default 4, a 2 x 2 block)")
    p.add_argument("--size", type=int, default=1000, help="tile edge in px (default 1000)")
    p.add_argument("--window", type=int, default=250, help="window = chunk edge (default 250)")
    p.add_argument("--latency", type=float, default=0.02, help="seconds added per request (0.02)")
    p.add_argument("--repeat", type=int, default=1, help="runs of each design, alternating")
    return p


def main(argv=None) -> int:
    from ..io import storage
    from .proxy import FaultProxy
    from .s3_read import start_moto

    args = _parser().parse_args(argv)
    side = int(np.ceil(np.sqrt(args.tiles)))
    regions = [
        TileRegion(f"X{k % side:04d}_Y{k // side:04d}", (k // side) * args.size,
                   (k % side) * args.size, args.size, args.size)
        for k in range(args.tiles)
    ]  # fmt: skip
    grid = OutputGrid(
        crs_wkt=WKT, transform=(10.0, 0.0, 4e6, 0.0, -10.0, 3e6), width=side * args.size,
        height=side * args.size, chunk=(args.window, args.window), class_names=CLASSES,
        multiclass=True,
    )  # fmt: skip
    moto, endpoint = start_moto()
    report = {"settings": vars(args), "runs": []}
    try:
        with FaultProxy(endpoint, latency=args.latency) as proxy:
            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret")
            os.environ.update(
                storage.s3_environment(endpoint_url=proxy.url, region="RegionOne", environ={})
            )
            import boto3

            s3 = boto3.client("s3", endpoint_url=endpoint, region_name="RegionOne")
            for k in range(args.repeat):
                for cls in (_Icechunk, _Zarr) if k % 2 else (_Zarr, _Icechunk):
                    bucket = f"bench-{cls.name.replace('+', '-')}-{k}"
                    s3.create_bucket(
                        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "RegionOne"}
                    )
                    result = _bench(cls(f"s3://{bucket}/out"), grid, regions, args.window, proxy)
                    report["runs"].append({"design": cls.name, **result})
                    brief = {k: v for k, v in result.items() if k != "per_tile"}
                    print(f"{cls.name}: {json.dumps(brief)}", file=sys.stderr)
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    summary = {}
    for name in ("zarr+ledger", "icechunk"):
        runs = [r for r in report["runs"] if r["design"] == name]
        summary[name] = {  # the best of the repeats: least seconds and requests, most MB/s
            key: round((max if key.endswith("per_s_median") else min)(r[key] for r in runs), 3)
            for key in runs[0]
            if key not in ("design", "per_tile", "create")
        }
    report["summary"] = summary
    print(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
