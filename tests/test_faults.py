"""Faults during a run, with real components (LocalCluster worker processes, a driver subprocess,
files on disk): a worker killed mid-run, a driver killed mid-run and resumed, scenes that disappear
or change between planning and reading, and incremental ``update`` runs.

Every finished output is compared with a clean run of the same inputs (Zarr arrays of all variables,
COG pixels).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio

from treesits_dask.cli import main
from treesits_dask.config import load_config
from treesits_dask.io import cube, discovery
from treesits_dask.outputs.repo import MapRepo
from treesits_dask.outputs.schema import TileRegion
from treesits_dask.pipeline import predict, warmup
from treesits_dask.pipeline.cluster import LOST_WORKER_TIMEOUT_S
from treesits_dask.pipeline.plan import make_plan
from treesits_dask.pipeline.run import RunCallbacks, RunError, run
from treesits_dask.state.lease import LEASE_NAME

pytestmark = pytest.mark.slow

TILES = ("X0069_Y0043", "X0070_Y0043", "X0069_Y0044", "X0070_Y0044")
VARIABLES = ("probability", "class", "valid_obs", "last_obs_valid")
WINDOW = "20x60"  # 3 windows per 60 x 60 px tile
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def fault_cube(tmp_path_factory):
    """Four 60 x 60 px tiles (2 x 2), 12 scenes each, with forest masks."""
    from treesits_dask.synthetic import make_cube

    root = tmp_path_factory.mktemp("faultcube")
    return make_cube(
        root / "cube",
        tiles=TILES,
        size=60,
        n_scenes=12,
        mask_dir=str(root / "masks"),
        truth_dir=str(root / "truth"),
        seed=5,
    )


def _config(cube_root, mask_dir, model, output, **kw):
    return load_config(
        overrides=dict(
            cube=str(cube_root),
            mask_dir=str(mask_dir),
            model=model,
            output=str(output),
            window=WINDOW,
            batch_size=500,
            dashboard_address=":0",
            **kw,
        ),
        environ={},
    )


@pytest.fixture(scope="module")
def clean_run(fault_cube, native_lstm, client, tmp_path_factory):
    """A run of the whole cube without faults: the reference outputs."""
    out = tmp_path_factory.mktemp("clean") / "out"
    result = run(_config(fault_cube.root, fault_cube.mask_dir, native_lstm, out), client=client)
    assert set(result.tiles) == set(TILES) and not result.failed
    return out


def _copy_cube(fault_cube, dest: Path) -> Path:
    """A private copy of the cube's folder (tests that change scenes must not touch the shared
    one)."""
    shutil.copytree(fault_cube.root, dest)
    return dest


def _assert_same_outputs(out: Path, ref: Path, tiles=TILES) -> None:
    """Map arrays of all variables (the bounding box of the finished tiles, same coordinates) and
    the COG pixels of ``tiles`` are identical."""
    a = MapRepo(str(out)).open_dataset()
    b = MapRepo(str(ref)).open_dataset()
    assert a.sizes == b.sizes
    np.testing.assert_array_equal(a.x.values, b.x.values)
    np.testing.assert_array_equal(a.y.values, b.y.values)
    for var in VARIABLES:
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=f"map {var}")
    for tile in tiles:
        for var in VARIABLES:
            with (
                rasterio.open(out / "cog" / tile / f"{var}.tif") as x,
                rasterio.open(ref / "cog" / tile / f"{var}.tif") as y,
            ):
                np.testing.assert_array_equal(x.read(), y.read(), err_msg=f"cog {tile} {var}")
                assert x.transform == y.transform and x.crs == y.crs


def _records(out: Path) -> set[str]:
    return set(MapRepo(str(out)).records())


def _tile_values(out: Path, tile: str, var: str) -> np.ndarray:
    repo = MapRepo(str(out))
    record = repo.records()[tile]["region"]
    region = TileRegion(tile, record["rows"][0], record["cols"][0], 60, 60)
    return repo.read_region(region, var)


# --------------------------------------------------------------------------------- 1. worker killed
class _KillWorker(RunCallbacks):
    """Kills (SIGKILL) one worker process of the cluster once ``after`` windows are done."""

    def __init__(self, client, after: int):
        self.client, self.after, self.done, self.killed = client, after, 0, None

    def window_done(self, tile: str) -> None:
        self.done += 1
        if self.done == self.after and self.killed is None:
            pids = self.client.run(os.getpid)
            addr = max(pids)
            self.killed = (addr, pids[addr])
            os.kill(pids[addr], signal.SIGKILL)


@pytest.fixture
def own_client(fault_cube, native_lstm, tmp_path):
    """A cluster of its own for the test that kills a worker, so that the module's cluster, which
    the later tests share, does not depend on how that restart went. (A CI run hung in this test,
    and the next test on the same cluster hung too.) It is the LocalCluster ``run`` starts
    (``connect``), with the shape of the module's: two single-threaded worker processes."""
    from treesits_dask.pipeline.cluster import connect

    config = _config(
        fault_cube.root, fault_cube.mask_dir, native_lstm, tmp_path / "unused",
        workers=2, threads_per_worker=1,
    )  # fmt: skip
    with connect(config) as c:
        yield c


@pytest.mark.timeout(300)
def test_worker_killed_mid_run(fault_cube, native_lstm, own_client, clean_run, tmp_path):
    client = own_client
    out = tmp_path / "out"
    before = client.run(os.getpid)
    assert len(before) == 2
    cb = _KillWorker(client, after=2)
    result = run(
        _config(fault_cube.root, fault_cube.mask_dir, native_lstm, out), client=client, callbacks=cb
    )
    assert cb.killed is not None, "the worker was never killed"
    assert set(result.tiles) == set(TILES) and not result.failed
    assert _records(out) == set(TILES)
    _assert_same_outputs(out, clean_run)

    # the nanny restarted the worker: a new process, with both plugins applied and the model loaded
    client.wait_for_workers(2, timeout=180)
    after = client.run(os.getpid)
    assert cb.killed[1] not in after.values()
    assert len(set(after.values()) - set(before.values())) == 1

    def state(dask_worker):
        return sorted(dask_worker.plugins), predict.load_count()

    # both plugins are set up on the new worker too: ModelPlugin.setup loaded the model there
    # (once), even if no task of the run reached it (polled: a worker registers before its plugins
    # are set up)
    deadline = time.monotonic() + 60
    while True:
        states = client.run(state)
        ok = all(
            {"treesits-model", "treesits-env"} <= set(names) and loads == 1
            for names, loads in states.values()
        )
        if ok or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ok, states


@pytest.mark.timeout(300)
def test_a_worker_lost_as_a_run_sets_up_is_left_to_dask(
    fault_cube, native_lstm, own_client, clean_run, tmp_path
):
    """A worker killed (an OOM kill, a preempted node) as a run sets up, before the scheduler has
    noticed: the set-up asks every worker for its free disk, to drop GDAL's cache and to take the
    run's plugins, and one that could not be reached failed the whole run (CommClosedError)
    although Dask reschedules its tasks.  The set-up now goes on with the workers that answer,
    and its read budgets count only them: the lost one's missing disk made the least free disk of
    the reading workers nothing, so that the tiles that started first counted on no spilling."""
    import dask

    from treesits_dask.pipeline.cluster import Routing
    from treesits_dask.pipeline.plugins import EnvPlugin, add_worker_plugin, on_workers
    from treesits_dask.pipeline.reading import answering, read_budget, worker_disks

    client = own_client
    pids = client.run(os.getpid)
    info = client.scheduler_info(n_workers=-1)["workers"]  # what the set-up saw first
    dead, alive = max(pids), min(pids)
    os.kill(pids[dead], signal.SIGKILL)
    # the dead worker's address asked directly, whether the scheduler has noticed or not (once
    # its port is closed, the scheduler tries to connect until the connect timeout)
    with dask.config.set({"distributed.comm.timeouts.connect": "3s"}):
        disks = worker_disks(client, [dead, alive])
        assert set(disks) == {alive}
        assert on_workers(client, os.getpid, [dead, alive]) == {alive: pids[alive]}
    config = _config(fault_cube.root, fault_cube.mask_dir, native_lstm, tmp_path / "unused")
    counted = read_budget(config, answering(info, disks), Routing(), disks)
    assert counted.spill_bytes > 0 and counted.threads == info[alive]["nthreads"]
    assert read_budget(config, info, Routing(), disks).spill_bytes == 0  # the lost one counted
    assert answering(info, {}) == info  # none answered: all counted, with no disk (as before)
    add_worker_plugin(client, EnvPlugin({"TREESITS_LOST_AT_SET_UP": "1"}))
    # ... an error of the function itself still fails
    with pytest.raises(ZeroDivisionError):
        on_workers(client, lambda: 1 / 0, [alive])
    out = tmp_path / "out"
    result = run(_config(fault_cube.root, fault_cube.mask_dir, native_lstm, out), client=client)
    assert set(result.tiles) == set(TILES) and not result.failed
    _assert_same_outputs(out, clean_run)
    # the restarted worker got the plugin registered while it was away
    client.wait_for_workers(2, timeout=180)
    deadline = time.monotonic() + 60
    while True:
        seen = client.run(lambda: os.environ.get("TREESITS_LOST_AT_SET_UP"))
        if set(seen.values()) == {"1"} or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert set(seen.values()) == {"1"} and len(seen) == 2, seen


def test_a_worker_whose_restart_is_slow_comes_back(fault_cube, native_lstm, tmp_path):
    """The run's own LocalCluster (``connect``) keeps a killed worker's nanny while the worker
    restarts slowly: held back 20 s here (a worker preload), more than distributed's 15 s
    ``lost-worker-timeout``, after which LocalCluster used to close the nanny for good."""
    import dask

    from treesits_dask.pipeline.cluster import connect

    assert LOST_WORKER_TIMEOUT_S > 20
    flag = tmp_path / "slow"
    preload = tmp_path / "slow_restart.py"
    preload.write_text(
        "import os, time\n"
        "def dask_setup(worker):\n"
        f"    if os.path.exists({str(flag)!r}):\n"
        "        time.sleep(20)\n"
    )
    config = _config(
        fault_cube.root, fault_cube.mask_dir, native_lstm, tmp_path / "out",
        workers=2, threads_per_worker=1,
    )  # fmt: skip
    with dask.config.set({"distributed.worker.preload": [str(preload)]}), connect(config) as client:
        before = client.run(os.getpid)
        assert len(before) == 2
        # the configured preload stays beside the workers' own (torch imported as they start)
        names = client.run(lambda dask_worker: [p.name for p in dask_worker.preloads])
        assert all(n == [str(preload), warmup.PRELOAD] for n in names.values()), names
        flag.touch()
        victim = max(before)
        os.kill(before[victim], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while len(client.scheduler_info()["workers"]) != 1 and time.monotonic() < deadline:
            time.sleep(0.1)  # the scheduler has seen the death
        client.wait_for_workers(2, timeout=120)
        after = client.run(os.getpid)
        assert len(after) == 2 and before[victim] not in after.values()
        # still two workers a moment later: with the 15 s default, LocalCluster's timer for the
        # lost worker had fired before the restart registered, and closed its nanny just after
        time.sleep(2)
        assert len(client.run(os.getpid)) == 2


# --------------------------------------------------------------------------------- 2. driver killed
def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_driver_killed_and_resumed(fault_cube, native_lstm, client, clean_run, tmp_path, caplog):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "treesits_dask",
        "run",
        "--cube",
        fault_cube.root,
        "--tiles",
        "all",
        "--output",
        str(out),
        "--model",
        native_lstm,
        "--mask-dir",
        fault_cube.mask_dir,
        "--window",
        WINDOW,
        "--batch-size",
        "500",
        "--tiles-in-flight",
        "1",
        "--workers",
        "1",
        "--threads-per-worker",
        "1",
        "--dashboard-address",
        ":0",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREESITS_")}
    log_path = tmp_path / "driver.log"
    with open(log_path, "wb") as log_fh:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_fh, stderr=subprocess.STDOUT)
    children = []
    try:
        deadline = time.monotonic() + 120
        while not _records(out):
            if proc.poll() is not None:
                pytest.fail(
                    f"the driver exited ({proc.returncode}) before a tile was done:\n"
                    f"{log_path.read_text()[-3000:]}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no tile finished within 120 s:\n{log_path.read_text()[-3000:]}")
            children = _descendants(proc.pid) or children
            time.sleep(0.02)
        children = _descendants(proc.pid) or children
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)  # reaped: its pid no longer exists
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        # the LocalCluster worker processes of the dead driver exit when their parent is gone
        import psutil

        _, alive = psutil.wait_procs(children, timeout=30)
        for p in alive:
            p.kill()
    assert not alive, (
        f"worker processes of the killed driver were still running 30 s later: {alive}"
    )

    done = _records(out)
    assert 1 <= len(done) < len(TILES), f"kill came too late: {sorted(done)} were all done"
    lease = json.loads((out / LEASE_NAME).read_text())
    assert lease["pid"] == proc.pid  # the dead driver's lease is still there
    assert not (out / "run.json").exists()
    records = MapRepo(str(out)).records()

    # a second run takes the lease over at once (not waiting for it to expire)
    # and does the rest only
    config = _config(fault_cube.root, fault_cube.mask_dir, native_lstm, out, tiles_in_flight=1)
    with caplog.at_level(logging.WARNING, logger="treesits_dask"):
        t0 = time.monotonic()
        result = run(config, client=client)
    assert time.monotonic() - t0 < 60
    assert "taking over the dead driver's lease" in caplog.text
    assert set(result.tiles) == set(TILES) - done
    assert len(result.tiles) == len(TILES) - len(done)
    assert set(result.skipped) == done and not result.failed
    assert _records(out) == set(TILES)
    now = MapRepo(str(out)).records()
    assert {t: now[t] for t in done} == {t: records[t] for t in done}  # finished tiles untouched
    assert not (out / LEASE_NAME).exists()  # released
    _assert_same_outputs(out, clean_run)
    for var in VARIABLES:
        with (
            rasterio.open(out / "cog" / f"{var}.vrt") as x,
            rasterio.open(clean_run / "cog" / f"{var}.vrt") as y,
        ):
            np.testing.assert_array_equal(x.read(), y.read())


# ----------------------------------------------------------- 3. scenes vanish/change after planning
def _rewrite_scene(boa: Path) -> None:
    """Same grid and bands, other pixel values and another file size."""
    with rasterio.open(boa) as src:
        data, profile = src.read(), src.profile
    profile.update(compress="deflate", predictor=1)
    data = np.where(data == -9999, data, data // 2 + 7).astype(np.int16)
    boa.unlink()
    with rasterio.open(boa, "w", **profile) as dst:
        dst.write(data)


@pytest.mark.parametrize("fault", ["disappears", "changes"])
def test_scene_vanishes_or_changes_after_planning(
    fault_cube, native_lstm, client, clean_run, tmp_path, fault
):
    root = _copy_cube(fault_cube, tmp_path / "cube")
    out = tmp_path / "out"
    bad_tile, good_tile = TILES[1], TILES[0]
    config = _config(root, fault_cube.mask_dir, native_lstm, out, tiles=f"{good_tile},{bad_tile}")
    plan = make_plan(config)
    assert [t.tile for t in plan.tiles] == [good_tile, bad_tile]
    boa = Path(discovery.scene_table(str(root), bad_tile)[5].boa)
    size = boa.stat().st_size
    if fault == "disappears":
        boa.unlink()
    else:
        _rewrite_scene(boa)
        assert boa.stat().st_size != size
    with pytest.raises(RunError) as info:
        run(config, plan=plan, client=client)
    msg = str(info.value)
    assert bad_tile in msg and boa.name in msg, msg
    assert "1 of 2 tile(s) failed" in msg
    # the worker's InputDataError reached the driver as such (not as a bare Exception(repr))
    assert f"{bad_tile}: Exception" not in msg and "InputDataError(" not in msg, msg
    if fault == "disappears":
        assert str(boa) in msg and (
            "no such file" in msg.lower() or "does not exist" in msg.lower()
        ), msg
    else:
        assert "changed while it was processed" in msg and "1 scene(s) changed" in msg, msg
    # the failed tile is not marked done; the other one is finished, with the clean run's values
    assert _records(out) == {good_tile}
    for var in VARIABLES:
        np.testing.assert_array_equal(
            _tile_values(out, good_tile, var), _tile_values(clean_run, good_tile, var), err_msg=var
        )
    for var in VARIABLES:
        with (
            rasterio.open(out / "cog" / good_tile / f"{var}.tif") as x,
            rasterio.open(clean_run / "cog" / good_tile / f"{var}.tif") as y,
        ):
            np.testing.assert_array_equal(x.read(), y.read())
    summary = json.loads((out / "run.json").read_text())
    assert not summary["complete"] and set(summary["failed"]) == {bad_tile}
    # the next run plans the failed tile again (and only that one)
    again = make_plan(config)
    assert [t.tile for t in again.tiles] == [bad_tile] and set(again.skipped) == {good_tile}


def test_worker_errors_keep_their_type_across_the_wire(tmp_path):
    """A TreesitsError raised from a rasterio error (whose CPLE_* cause cannot be unpickled)
    survives distributed's serialisation of task errors, with the text of its cause."""
    from distributed import protocol
    from distributed.core import error_message

    from treesits_dask.errors import InputDataError

    missing = tmp_path / "gone_BOA.tif"
    scene = discovery.Scene("X0000_Y0000", dt.date(2020, 1, 1), "SEN2A", str(missing))
    definition = discovery.CubeDefinition("", 0.0, 0.0, 0.0, 0.0, 30000.0, 30000.0)
    with pytest.raises(InputDataError) as info:
        cube.tile_grid(definition, scene)  # opens the scene's header
    exc = protocol.pickle.loads(error_message(info.value)["exception"].data)
    assert type(exc) is InputDataError and str(exc) == str(info.value)
    assert "RasterioIOError" in str(exc.__cause__) and str(missing) in str(exc.__cause__)


# ---------------------------------------------------------------------------- 4. incremental update
def test_update_takes_only_the_changed_tile(
    fault_cube, native_lstm, client, tmp_path, capsys, monkeypatch
):
    root = _copy_cube(fault_cube, tmp_path / "cube")
    out = tmp_path / "out"
    tiles = f"{TILES[0]},{TILES[1]}"
    config = _config(root, fault_cube.mask_dir, native_lstm, out, tiles=tiles)
    first = run(config, client=client)
    assert set(first.tiles) == {TILES[0], TILES[1]}
    records = MapRepo(str(out)).records()
    before = {t: _tile_values(out, t, "valid_obs") for t in TILES[:2]}

    # a new, later scene (BOA + QAI) for one tile: a perturbed copy of its newest scene
    changed = TILES[1]
    newest = discovery.scene_table(str(root), changed)[-1]
    new_date = max(fault_cube.dates) + dt.timedelta(days=14)
    stem = f"{new_date:%Y%m%d}_LEVEL2_SEN2A"
    with rasterio.open(newest.boa) as src:
        data, profile = src.read(), src.profile
    data = np.where(data == -9999, data, data + 25).astype(np.int16)
    with rasterio.open(root / changed / f"{stem}_BOA.tif", "w", **profile) as dst:
        dst.write(data)
    shutil.copyfile(newest.qai, root / changed / f"{stem}_QAI.tif")

    args = [
        "update",
        "--cube",
        str(root),
        "--tiles",
        tiles,
        "--output",
        str(out),
        "--model",
        native_lstm,
        "--mask-dir",
        fault_cube.mask_dir,
        "--window",
        WINDOW,
        "--batch-size",
        "500",
        "--scheduler-address",
        client.scheduler.address,
    ]
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"{TILES[0]}: skip (up to date)" in printed, printed
    assert f"{changed}: process (1 new scene(s): {stem}_BOA.tif; date window" in printed, printed
    assert printed.count(": process (") == 1
    assert "updated 1 tile(s)" in printed, printed
    now = MapRepo(str(out)).records()
    assert now[TILES[0]] == records[TILES[0]]
    rec = now[changed]
    assert rec["stats"]["scenes"] == 13 and rec["stats"]["last_scene"] == str(new_date)
    after = {t: _tile_values(out, t, "valid_obs") for t in TILES[:2]}
    np.testing.assert_array_equal(after[TILES[0]], before[TILES[0]])  # the skipped tile
    assert (after[changed] >= before[changed]).all() and (after[changed] > before[changed]).any()

    # the updated tile equals a fresh run of the new inputs
    ref = tmp_path / "ref"
    run(_config(root, fault_cube.mask_dir, native_lstm, ref, tiles=tiles), client=client)
    _assert_same_outputs(out, ref, tiles=TILES[:2])

    # nothing changed: no pixel read, no cluster started (not even a connection to the scheduler)
    import distributed

    import treesits_dask.pipeline.run

    def no_cluster(*a, **k):
        raise AssertionError("update started or connected to a cluster with nothing to do")

    monkeypatch.setattr(treesits_dask.pipeline.run, "connect", no_cluster)
    monkeypatch.setattr(distributed.LocalCluster, "__init__", no_cluster)
    monkeypatch.setattr(distributed.Client, "__init__", no_cluster)
    opens = cube.OPEN_COUNTER.count
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert cube.OPEN_COUNTER.count == opens
    assert "nothing to do: 2 tile(s) up to date" in printed, printed
    assert f"{changed}: skip (up to date)" in printed
