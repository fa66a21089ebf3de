"""How should the cube code read scenes from S3: GDAL ``/vsis3/`` or fsspec (s3fs) file objects?

Writes a synthetic FORCE cube (one tile, Sentinel-2 BOA + QAI, the default ``strips`` layout),
uploads it to a moto S3 server on 127.0.0.1 (a subprocess) and reads every window of the tile, for
all scenes, with :class:`treesits_dask.io.cube.WindowReader` (the pipeline's reader: one open per
file and window, QAI screening as configured), once per method:

* ``gdal-vsis3``: the package as it is: ``rasterio.open("/vsis3/bucket/key")`` with
  ``storage.GDAL_DEFAULTS`` and ``storage.s3_environment(endpoint, region, "path")`` applied,
  the tile read as :func:`~treesits_dask.io.cube.tile_cube` reads it (bands of whole file blocks,
  each block requested once, datasets kept open);
* ``gdal-vsis3-ordinary``: the same, but no BOA file opened for GDAL's multi-threaded read
  (``NUM_THREADS``) where the pool of kept datasets runs short (as before S3 COGs were opened
  so; see ``--kept-mib``);
* ``gdal-vsis3-windows``: the same GDAL reader, but every window read on its own (all scenes, the
  blocks of the window only: a strip crossed by several windows is requested by each), datasets
  kept open;
* ``gdal-vsis3-windows-reopen``: window by window, every file opened again for every window (how
  the package read before datasets were kept open and tiles read in bands);
* ``fsspec-fileobj``: ``rasterio.open(s3fs_file_object)``, s3fs's default cache (``readahead``,
  50 MiB blocks).  NB: rasterio 1.4 reads such an object whole into a ``MemoryFile``;
* ``fsspec-opener``: ``rasterio.open(url, opener=fs)`` (``fs`` from ``storage.get_fs``): GDAL
  reads byte ranges through s3fs file objects (rasterio's Python VSI plugin), one at a time, with
  s3fs's default cache (which fetches whole files up to 50 MiB at the first read);
* ``fsspec-opener-tuned``: the same with ``--tuned-cache`` (default ``readahead`` with 64 KiB
  blocks: only about the byte ranges a window needs; the best of ``none``, ``bytes``,
  ``readahead`` and ``blockcache`` with 64-256 KiB blocks in a trial).

The fsspec variants (window by window, datasets kept open) replace ``datasets.open_raster`` (the
one function that opens a scene), so everything else is the same cube code.  Each run is a fresh
Python process (no GDAL / s3fs cache from an earlier run); methods are interleaved over
``--repeats`` rounds and the median reported.  Every request goes through
:class:`treesits_dask.bench.proxy.FaultProxy` (no faults, TCP_NODELAY), which counts requests and
body bytes and adds ``--latency`` seconds per request (a WAN round trip) and, with
``--bandwidth``, the time the body takes on a link of that many MB/s shared by all connections.
The moto server keeps each object's bytes in memory between GETs (moto itself re-reads the whole
object for every ranged GET, which real S3 does not).  The window arrays of every run are compared
(SHA-256) with a local-disk read of the same files.

Prints JSON (with a one-paragraph ``conclusion``) on stdout, progress and the conclusion on stderr.

    python -m treesits_dask.bench.s3_read     # 500 px, 20 scenes, 20 ms, unlimited bandwidth
    python -m treesits_dask.bench.s3_read --size 3000 --scenes 2 --bandwidth 100   # FORCE-sized

It needs the test extra (moto's server): ``pip install 'treesits_dask[test]'``.

This module is longer than the 400-line guideline because it is one benchmark that should be
read as a whole: the parent (cube, upload, proxy, rounds), the child measurement and the report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

METHODS = (
    "gdal-vsis3",
    "gdal-vsis3-ordinary",
    "gdal-vsis3-windows",
    "gdal-vsis3-windows-reopen",
    "fsspec-fileobj",
    "fsspec-opener",
    "fsspec-opener-tuned",
)
#: methods that read the tile window by window (the others read it as the pipeline does)
_BY_WINDOW = ("gdal-vsis3-windows", "gdal-vsis3-windows-reopen")
TILE = "X0069_Y0043"
REGION = "RegionOne"
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-value"}


# --------------------------------------------------------------------------------------- child
def _cache_options(spec: str) -> dict:
    """``blockcache:256k`` -> ``{"cache_type": "blockcache", "block_size": 262144}``."""
    kind, _, size = spec.partition(":")
    out: dict = {"cache_type": kind}
    if size:
        units = {"k": 2**10, "m": 2**20}
        size = size.lower().rstrip("ib")
        out["block_size"] = (
            int(float(size[:-1]) * units[size[-1]]) if size[-1] in units else int(size)
        )
    return out


def _child(spec: dict) -> dict:
    """One timed read of every window of the tile, in this (fresh) process."""
    import numpy as np
    import rasterio

    from treesits_dask.io import cube, datasets, storage
    from treesits_dask.io.discovery import Scene
    from treesits_dask.io.grid import TileGrid, WindowLayout

    storage.apply_environment(dict(storage.GDAL_DEFAULTS))
    storage.apply_environment(dict(spec.get("gdal_options", {})))
    if spec["endpoint"]:
        storage.apply_environment(
            storage.s3_environment(spec["endpoint"], REGION, "path", environ={})
        )
    method = spec["method"]
    if spec.get("kept_mib"):  # the pool's budget, as a worker's share (KEPT_SHARE) would be
        datasets.set_memory_budget(int(spec["kept_mib"] * 2**20))
    if method == "gdal-vsis3-ordinary":
        from treesits_dask.io import reader as reader_module

        dataset = reader_module.dataset

        def ordinary(url, version, check, verified=False, lean=False):
            return dataset(url, version, check, verified, lean=False)

        reader_module.dataset = ordinary
    if method.startswith("fsspec"):
        fs, _ = storage.get_fs(spec["boa"][0])
        if method == "fsspec-fileobj":

            def open_raw(url: str, georeferenced: bool = True):
                datasets.OPEN_COUNTER.add()
                options = datasets.open_options(georeferenced)
                with fs.open(storage.strip_protocol(url), "rb") as fh:  # default cache
                    return rasterio.open(fh, **options)  # rasterio 1.4: into a MemoryFile

        else:
            opener = fs  # an fsspec filesystem: rasterio adapts it (_FilesystemContainer)
            if method == "fsspec-opener-tuned":
                import fsspec

                cache = _cache_options(spec["tuned_cache"])
                opener = fsspec.filesystem(
                    "s3",
                    **storage.s3_options(),
                    default_cache_type=cache["cache_type"],
                    **(
                        {"default_block_size": cache["block_size"]} if "block_size" in cache else {}
                    ),
                )

            def open_raw(url: str, georeferenced: bool = True):
                datasets.OPEN_COUNTER.add()
                return rasterio.open(url, opener=opener, **datasets.open_options(georeferenced))

        # the one function that opens scenes (as datasets.open_raster); the rest as is
        datasets.open_raster = open_raw

    g = spec["grid"]
    grid = TileGrid(
        tile=g["tile"],
        crs_wkt=g["crs_wkt"],
        transform=tuple(g["transform"]),
        width=g["width"],
        height=g["height"],
        block_shape=tuple(g["block_shape"]),
        count=g["count"],
    )
    reader = cube.WindowReader(
        grid=grid,
        boa=tuple(spec["boa"]),
        qai=tuple(spec["qai"]),
        qai_flags=tuple(spec["qai_flags"]),
    )
    layout = WindowLayout.of(grid, tuple(spec["window"]))
    windows = [w for _, _, w in layout]
    # warm-up outside the measurement: imports, GDAL/curl and s3fs/aiobotocore session set-up, on
    # another object; then wait until the driver has reset the proxy's counters
    from rasterio.windows import Window as RioWindow

    with datasets.open_raster(spec["warmup"]) as src:
        src.read(1, window=RioWindow(0, 0, 1, 1))
    datasets.OPEN_COUNTER.count = 0
    print("ready", flush=True)
    sys.stdin.readline()
    digest = hashlib.sha256()
    valid = 0
    t0 = time.perf_counter()
    if method.startswith("gdal") and method not in _BY_WINDOW:
        import dask

        day = __import__("datetime").date(2000, 1, 1)
        pairs = zip(reader.boa, reader.qai, strict=True)
        scenes = [Scene(grid.tile, day, "SEN2A", b, q) for b, q in pairs]
        data = cube.tile_cube(scenes, grid, layout, reader.qai_flags).data
        blocks = [data.blocks[0, 0, i, j] for i, j, _ in layout]
        arrays = dask.compute(*blocks, scheduler="synchronous")
    else:
        arrays = (_read_window(reader, w, method) for w in windows)
    for arr in arrays:
        digest.update(np.ascontiguousarray(arr).tobytes())
        valid += int(np.count_nonzero(arr[:, 0] != cube.NODATA))
    seconds = time.perf_counter() - t0
    pool = datasets.pool_state()
    return {
        "seconds": seconds,
        "sha256": digest.hexdigest(),
        "windows": len(windows),
        "valid_observations": valid,
        "opens": datasets.OPEN_COUNTER.count,
        # whether the pool ran short of memory, and opened files for GDAL's threads
        "pool_short": pool["ran_short"],
        "opened_for_threads": pool["threads_started"],
    }


def _read_window(reader, window, method: str):
    """One window of all scenes; ``...-reopen``: every file opened again for it."""
    from treesits_dask.io import datasets

    if method.endswith("-reopen"):
        datasets.forget_datasets()
    return reader.read(window)


# -------------------------------------------------------------------------------------- driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: moto keeps an object in a (spooled, above 5 MiB on-disk) buffer and reads ALL of it for every
#: GET, ranged or not: a 100 KiB range of a 130 MiB file costs ~0.1 s, which would penalise the
#: readers that make many range requests.  Real S3 does not; the launcher keeps each object's bytes.
_MOTO_LAUNCHER = """
import sys
import moto.s3.models as m
from moto.server import main
plain = m.FakeKey.value

def _get(self):
    data = self.__dict__.get("_bench_bytes")
    if data is None:
        data = self.__dict__["_bench_bytes"] = plain.fget(self)
    return data

def _set(self, value):
    self.__dict__.pop("_bench_bytes", None)
    plain.fset(self, value)

m.FakeKey.value = property(_get, _set)
main(["-H", "127.0.0.1", "-p", sys.argv[1]])
"""


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's server as a subprocess (GDAL deadlocks against an in-process server)."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _MOTO_LAUNCHER, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(400):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode}")
        time.sleep(0.05)
    proc.terminate()
    raise RuntimeError(f"moto server did not start on port {port}")


def _child_env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "GDAL_", "CPL_", "TREESITS_"))
    }
    env.update(FAKE_CREDENTIALS, AWS_EC2_METADATA_DISABLED="true")
    return env


def _run_child(spec: dict, before_go=None) -> dict:
    """Run one measurement in a fresh process; ``before_go()`` runs once it has warmed up."""
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "treesits_dask.bench.s3_read", "--child"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=_child_env(),
        )
        try:
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.flush()
            ready = proc.stdout.readline().strip()
            if ready == "ready":
                if before_go:
                    before_go()
                proc.stdin.write("go\n")
                proc.stdin.flush()
            out = proc.stdout.read()
            proc.wait(timeout=1800)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode or ready != "ready":
            err.seek(0)
            raise RuntimeError(f"{spec['method']} failed:\n{err.read()[-4000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _layout(path: str) -> dict:
    import rasterio

    with open(path, "rb") as fh:
        bigtiff = fh.read(4)[2:4] == b"\x2b\x00"
    with rasterio.open(path) as src:
        tags = src.tags(ns="IMAGE_STRUCTURE")
        return {
            "tiled": src.profile.get("tiled", False),
            "block_shape": list(src.block_shapes[0]),
            "compression": src.compression.value if src.compression else None,
            "predictor": tags.get("PREDICTOR"),
            "interleave": src.interleaving.value if src.interleaving else None,
            "bigtiff": bigtiff,
        }


def _link_proxy(base):
    """``FaultProxy`` whose answers also take ``len(body) / bandwidth`` seconds on ONE link shared
    by all connections (a WAN link: parallel requests share its bandwidth)."""

    class LinkProxy(base):
        def __init__(self, upstream, bandwidth: float = 0.0, **kwargs):
            super().__init__(upstream, **kwargs)
            self.bandwidth = bandwidth  # bytes per second; 0: unlimited
            self._link_free = 0.0
            self._link_lock = threading.Lock()

        def _forward(self, method, path, headers, body):
            answer = super()._forward(method, path, headers, body)
            size = len(answer[3])
            if self.bandwidth and size:
                with self._link_lock:
                    now = time.monotonic()
                    self._link_free = max(now, self._link_free) + size / self.bandwidth
                    wait = self._link_free - now
                time.sleep(wait)
            return answer

    return LinkProxy


def _median(values):
    return statistics.median(values) if values else None


def _conclusion(result: dict) -> str:
    m = result["methods"]
    gdal = m.get("gdal-vsis3")
    bands = _bands_verdict(m)
    others = {
        k: v for k, v in m.items() if k.startswith("fsspec") and v.get("seconds_median") is not None
    }
    if not gdal or not others:
        return bands or "Not enough methods ran to compare."
    best_name, best = min(others.items(), key=lambda kv: kv[1]["seconds_median"])
    ratio = best["seconds_median"] / gdal["seconds_median"]
    same = result["identical_to_local_disk"]

    def fig(name, v):
        if "requests_median" not in v:
            return f"{name} {v['seconds_median']:.2f} s"
        return (
            f"{name} {v['seconds_median']:.2f} s, {v['requests_median']:.0f} requests, "
            f"{v['mib_down_median']:.1f} MiB"
        )

    figures = "; ".join(fig(k, v) for k, v in m.items())
    if ratio > 1.1:
        verdict = (
            f"GDAL /vsis3/ is the faster reader: the best fsspec variant ({best_name}) takes "
            f"{ratio:.1f}x as long"
        )
    elif ratio < 0.9:
        verdict = f"fsspec ({best_name}) is faster than GDAL /vsis3/ ({1 / ratio:.1f}x)"
    else:
        verdict = (
            f"GDAL /vsis3/ and the best fsspec variant ({best_name}) are within 10% of each other"
        )
    more = best.get("mib_down_median", 0) / max(gdal.get("mib_down_median", 0), 1e-9)
    if ratio < 1.1 and more > 2:
        verdict += (
            f", but it downloads {more:.1f}x the bytes (every window re-reads whole files): its "
            "lead holds only while a file costs less than a few round trips to download and "
            "shrinks with larger files or a slower link (--size, --bandwidth)"
        )
    fewer = [
        k
        for k, v in others.items()
        if v.get("mib_down_median", 1e9) < 2 * gdal.get("mib_down_median", 0)
    ]
    if fewer:
        quickest = min(fewer, key=lambda k: others[k]["seconds_median"])
        verdict += (
            f"; of the fsspec variants that read only about the bytes GDAL reads, {quickest} is "
            "the "
            f"quickest at {others[quickest]['seconds_median'] / gdal['seconds_median']:.1f}x "
            "GDAL's time, with "
            f"{others[quickest]['requests_median'] / max(gdal['requests_median'], 1):.1f}x "
            "its requests"
        )
    w = result["setup"]
    link = f" and a {w['bandwidth_mb_s']:g} MB/s link" if w["bandwidth_mb_s"] else ""
    if w["latency_s"] < 0:
        route, link = "straight from moto (no proxy, no request counts)", ""
    else:
        route = f"through a proxy adding {w['latency_s'] * 1000:.0f} ms per request"
    return (
        f"Reading all {w['windows']} windows ({w['window'][0]}x{w['window'][1]} px) of a "
        f"{w['size']} px tile x {w['scenes']} scenes (BOA + QAI, {w['layout']['compression']} "
        f"{'tiles' if w['layout']['tiled'] else 'strips'}, {w['object_mib']:.1f} MiB on S3) {route}"
        f"{link}, median of {w['repeats']}: "
        f"{figures}. {verdict}. {bands} Arrays are "
        + (
            "identical across methods and equal to local-disk reads."
            if same
            else "NOT identical (see runs)."
        )
    )


def _bands_verdict(m: dict) -> str:
    """How reading in bands compares with reading window by window (GDAL both)."""
    gdal = m.get("gdal-vsis3")
    parts = []
    for name in ("gdal-vsis3-ordinary", *_BY_WINDOW):
        v = m.get(name)
        if not gdal or not v or "requests_median" not in v or "requests_median" not in gdal:
            continue
        time_x = v["seconds_median"] / gdal["seconds_median"]
        requests_x = v["requests_median"] / max(gdal["requests_median"], 1)
        bytes_x = v["mib_down_median"] / max(gdal["mib_down_median"], 1e-9)
        parts.append(
            f"{name} takes {time_x:.2f}x the time of gdal-vsis3 (bands) with {requests_x:.2f}x "
            f"its requests, {bytes_x:.2f}x its bytes and {v['opens_median']:.0f} opens against "
            f"{gdal['opens_median']:.0f}"
        )
    return "; ".join(parts) + ("." if parts else "")


def _gdal_option(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` of ``--gdal-option`` as a pair."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. GDAL_NUM_THREADS=2)")
    return key.strip(), value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Measure GDAL /vsis3/ against fsspec (s3fs) file objects for reading FORCE "
        "scenes window by window from a local moto S3 server (behind a latency-adding proxy); "
        "prints JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size", type=int, default=500, help="tile size in pixels (size x size)")
    parser.add_argument("--scenes", type=int, default=20, help="scenes in the tile")
    parser.add_argument(
        "--layout",
        default="strips",
        choices=("strips", "cog"),
        help="synthetic GeoTIFF layout: strips (FORCE < 3.8, LZW) or cog (256 px tiles, ZSTD)",
    )
    parser.add_argument(
        "--window",
        default="auto",
        help="window ROWSxCOLS, or 'auto' (the pipeline's choose_window_shape)",
    )
    parser.add_argument(
        "--qai",
        default="default",
        choices=("default", "none"),
        help="QAI screening as in the pipeline ('default': the QAI files are read too)",
    )
    parser.add_argument(
        "--latency",
        type=float,
        default=0.02,
        help="seconds the proxy adds to every request (emulated WAN round trip); "
        "a negative value bypasses the proxy (no request counts)",
    )
    parser.add_argument(
        "--bandwidth",
        type=float,
        default=0.0,
        help="MB/s of the emulated link, shared by all connections (0: unlimited, "
        "i.e. whatever moto and the proxy manage on this machine)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per method (median reported)")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}"
    )
    parser.add_argument(
        "--tuned-cache",
        default="readahead:64k",
        help="s3fs cache of fsspec-opener-tuned: CACHE_TYPE[:BLOCK_SIZE] (e.g. readahead:1m, "
        "bytes:512k)",
    )
    parser.add_argument(
        "--workdir",
        default=None,
        help="where to write the local cube (default: a temporary folder)",
    )
    parser.add_argument(
        "--gdal-option",
        action="append",
        type=_gdal_option,
        default=[],
        metavar="KEY=VALUE",
        help="GDAL configuration option for the readers (repeatable; the child processes do not "
        "inherit GDAL_* / CPL_* variables)",
    )
    parser.add_argument(
        "--kept-mib",
        type=float,
        default=0.0,
        help="memory the readers' pool of kept datasets may hold (MiB; 0: its share of this "
        "machine's memory): a small one makes it close and open files again, as a worker's does "
        "at hundreds of scenes",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _local_cube(args, tmp: str) -> dict:
    """The synthetic cube on local disk, the reader's settings, and what the files weigh."""
    from treesits_dask.config import DEFAULT_QAI_FLAGS
    from treesits_dask.io import cube, discovery
    from treesits_dask.io.grid import choose_window_shape
    from treesits_dask.synthetic import make_cube

    t0 = time.perf_counter()
    made = make_cube(
        Path(tmp) / "cube",
        tiles=(TILE,),
        size=args.size,
        n_scenes=args.scenes,
        layout=args.layout,
        seed=1,
    )
    _say(f"cube written in {time.perf_counter() - t0:.1f} s")
    definition = discovery.read_cube_definition(made.root)
    scenes = discovery.scene_table(made.root, TILE)
    grid = cube.tile_grid(definition, scenes[0])
    window = (
        choose_window_shape(grid, None, len(scenes))
        if args.window == "auto"
        else tuple(int(v) for v in args.window.lower().split("x"))
    )
    qai_flags = DEFAULT_QAI_FLAGS if args.qai == "default" else ()
    grid_spec = {
        "tile": grid.tile,
        "crs_wkt": grid.crs_wkt,
        "transform": list(grid.transform),
        "width": grid.width,
        "height": grid.height,
        "block_shape": list(grid.block_shape),
        "count": grid.count,
    }
    files = [p for s in scenes for p in (s.boa, s.qai) if p]
    return {
        "made": made,
        "scenes": scenes,
        "window": window,
        "qai_flags": qai_flags,
        "base": {
            "grid": grid_spec,
            "window": list(window),
            "qai_flags": list(qai_flags),
            "tuned_cache": args.tuned_cache,
            "kept_mib": args.kept_mib,
            "gdal_options": dict(args.gdal_option),
        },
        "files": files,
        "object_bytes": sum(os.path.getsize(p) for p in files),
        "layout": _layout(scenes[0].boa),
    }


def _upload(local: dict, endpoint: str) -> tuple[str, list]:
    """Copy the cube (and a warm-up file) to a bucket on ``endpoint``; its S3 scene table."""
    import boto3

    from treesits_dask.io import discovery, storage

    bucket = "force-bench"
    boto3.client("s3", endpoint_url=endpoint, region_name=REGION).create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    cube_url = f"s3://{bucket}/level2"
    fs, path = storage.get_fs(cube_url)
    t0 = time.perf_counter()
    fs.put(local["made"].root, path, recursive=True)
    fs.put_file(_warmup_file(local), f"{bucket}/warmup/species.tif")
    s3_scenes = discovery.scene_table(cube_url, TILE)
    _say(
        f"uploaded {len(local['files'])} files ({local['object_bytes'] / 2**20:.1f} MiB) in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    assert [s.name for s in s3_scenes] == [s.name for s in local["scenes"]]
    return f"s3://{bucket}/warmup/species.tif", s3_scenes


def _warmup_file(local: dict) -> str:
    return str(Path(local["made"].truth_dir) / TILE / "species.tif")


def _measure(args, local: dict, methods: list[str]) -> tuple[dict[str, list[dict]], bool]:
    """Every method ``--repeats`` times (interleaved), each run in a fresh process, against moto
    behind the latency proxy; returns the runs per method and whether a proxy counted."""
    from treesits_dask.bench.proxy import FaultProxy
    from treesits_dask.io import storage

    moto, endpoint = start_moto()
    proxy = None
    saved_env = dict(os.environ)
    try:
        os.environ.update(FAKE_CREDENTIALS)
        storage.apply_environment(storage.s3_environment(endpoint, REGION, "path", environ={}))
        warmup, s3_scenes = _upload(local, endpoint)
        if args.latency >= 0:
            proxy = _link_proxy(FaultProxy)(
                endpoint, every=0, latency=args.latency, bandwidth=args.bandwidth * 1e6
            ).start()
        s3_spec = dict(
            local["base"],
            endpoint=proxy.url if proxy else endpoint,
            warmup=warmup,
            boa=[s.boa for s in s3_scenes],
            qai=[s.qai for s in s3_scenes],
        )
        local_spec = dict(
            local["base"],
            endpoint=None,
            method="local",
            warmup=_warmup_file(local),
            boa=[s.boa for s in local["scenes"]],
            qai=[s.qai for s in local["scenes"]],
        )
        runs: dict[str, list[dict]] = {m: [] for m in ["local", *methods]}
        for rnd in range(args.repeats):
            for method in ["local", *methods]:
                out = _run_child(
                    local_spec if method == "local" else dict(s3_spec, method=method),
                    proxy.reset_counts if proxy else None,
                )
                if proxy and method != "local":
                    out.update(
                        requests=proxy.requests,
                        by_method=dict(proxy.by_method),
                        bytes_down=proxy.bytes_down,
                    )
                runs[method].append(out)
                counted = (
                    f"{out.get('requests', 0):6d} requests "
                    f"{out.get('bytes_down', 0) / 2**20:8.1f} MiB"
                )
                _say(
                    f"round {rnd + 1} {method:20s} {out['seconds']:7.2f} s "
                    + (counted if method != "local" else "")
                )
    finally:
        if proxy:
            proxy.stop()
        moto.terminate()
        moto.wait(timeout=10)
        os.environ.clear()
        os.environ.update(saved_env)
    return runs, proxy is not None


def _summary(args, runs: dict[str, list[dict]], counted: bool) -> dict:
    reference = runs["local"][0]["sha256"]
    summary = {}
    for method, rs in runs.items():
        summary[method] = {
            "seconds_median": round(_median([r["seconds"] for r in rs]), 3),
            "seconds_all": [round(r["seconds"], 3) for r in rs],
            "identical_to_local": all(r["sha256"] == reference for r in rs),
            "opens_median": _median([r["opens"] for r in rs]),
            "pool_short": any(r.get("pool_short") for r in rs),
            "opened_for_threads": any(r.get("opened_for_threads") for r in rs),
        }
        if method != "local" and counted:
            summary[method].update(
                requests_median=_median([r["requests"] for r in rs]),
                by_method=rs[-1]["by_method"],
                mib_down_median=round(_median([r["bytes_down"] for r in rs]) / 2**20, 2),
                requests_per_file_open=round(
                    _median([r["requests"] for r in rs]) / rs[-1]["opens"], 2
                ),
            )
    if "fsspec-opener-tuned" in summary:
        summary["fsspec-opener-tuned"]["cache"] = _cache_options(args.tuned_cache)
    return summary


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(sys.stdin.readline()))), flush=True)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    with tempfile.TemporaryDirectory(prefix="s3-read-bench-", dir=args.workdir) as tmp:
        local = _local_cube(args, tmp)
        runs, counted = _measure(args, local, methods)
    summary = _summary(args, runs, counted)
    first = runs["local"][0]
    result = {
        "setup": {
            "size": args.size,
            "scenes": args.scenes,
            "tile": TILE,
            "window": list(local["window"]),
            "windows": first["windows"],
            "file_opens_per_run": first["opens"],
            "qai_flags": list(local["qai_flags"]),
            "kept_mib": args.kept_mib or None,
            "latency_s": args.latency,
            "repeats": args.repeats,
            "bandwidth_mb_s": args.bandwidth or None,
            "layout": dict(local["layout"], synthetic_layout=args.layout),
            "files": len(local["files"]),
            "object_mib": round(local["object_bytes"] / 2**20, 2),
            "valid_observations": first["valid_observations"],
            "cpus": os.cpu_count(),
        },
        "versions": _versions(),
        "methods": summary,
        "identical_to_local_disk": all(v["identical_to_local"] for v in summary.values()),
    }
    result["conclusion"] = _conclusion(result)
    print(json.dumps(result, indent=2))
    _say("\n" + result["conclusion"])
    return 0 if result["identical_to_local_disk"] else 1


def _versions() -> dict:
    import fsspec
    import rasterio
    import s3fs

    return {
        "rasterio": rasterio.__version__,
        "gdal": rasterio.__gdal_version__,
        "s3fs": s3fs.__version__,
        "fsspec": fsspec.__version__,
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    sys.exit(main())
