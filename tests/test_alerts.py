"""Disturbance alerts over many updates: a synthetic clear-cut on a known date, watched by a
hand-set SITS-BERT detector (:mod:`treesits_dask.models.detector`, whose probability has a closed
form).  The alert layers equal an independent pixel-by-pixel computation (the detector's formula
on each pixel's window as of each valid acquisition, the state machine written out here), flag
every cut pixel at its first valid acquisition after the cut, confirm it, raise nothing elsewhere,
and are identical whether the scenes arrive in one update or in many small ones, one of them late.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from treesits_dask import open_map, versions
from treesits_dask.config import load_config
from treesits_dask.io import discovery
from treesits_dask.io.cube import tile_cube, tile_grid
from treesits_dask.io.grid import WindowLayout
from treesits_dask.models.detector import detector_probability, save_detector
from treesits_dask.outputs.repo import MapRepo
from treesits_dask.pipeline.plan import make_plan
from treesits_dask.pipeline.run import run

pytestmark = pytest.mark.slow

A, B = "X0069_Y0043", "X0070_Y0043"
CUT = dt.date(2022, 5, 10)
START = dt.date(2022, 3, 1)
LEVEL, GAIN, THRESHOLD, CONFIRM = 14.5, 2.0, 0.5, 3
EPOCH = dt.date(1970, 1, 1)
ALERT_LAYERS = ("alert_first_seen", "alert_confirmations", "alert_state")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from treesits_dask.synthetic import ClearCut, make_cube

    root = tmp_path_factory.mktemp("alerts")
    cube = make_cube(
        root / "cube", tiles=(A, B), size=30, n_scenes=100, start="2019-01-01",
        end="2022-07-31", clear_cuts=[ClearCut(A, CUT, 5, 5, 12, 18)], forest_fraction=0.8,
        seed=4,
    )  # fmt: skip
    model = save_detector(str(root / "detector.pt"), level=LEVEL, gain=GAIN)
    return cube, model, root


def _config(cube_root: str, mask_dir: str, model: str, output: Path):
    return load_config(
        overrides=dict(
            cube=cube_root, mask_dir=mask_dir, model=model, output=str(output),
            model_family="native", window="15x30", dashboard_address=":0",
            alerts={"start": str(START), "threshold": THRESHOLD, "confirm_after": CONFIRM},
        ),
        environ={},
    )  # fmt: skip


def _deliver(src: Path, dst: Path, scenes) -> None:
    """Put ``scenes`` (BOA + QAI) of the full cube into the growing cube (hard links: the same
    files, sizes and times)."""
    for s in scenes:
        for path in (s.boa, s.qai):
            target = dst / s.tile / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)


def _expected(cube, tile: str) -> dict[str, np.ndarray]:
    """The alert layers of ``tile`` computed pixel by pixel: at each acquisition from START on
    with a valid observation, the detector's probability on the pixel's valid observations of the
    1460 days up to it, and the state machine of outputs/alerts.py written out anew."""
    scenes = discovery.scene_table(cube.root, tile)
    grid = tile_grid(discovery.read_cube_definition(cube.root), scenes[0])
    data = tile_cube(scenes, grid, WindowLayout.of(grid, (30, 30)), _flags()).data.compute()
    valid = (data != -9999).all(axis=1)
    days = np.array([(s.date - EPOCH).days for s in scenes])
    forest = cube.forest(tile)
    out = {
        "alert_first_seen": np.zeros((30, 30), np.int64),
        "alert_confirmations": np.zeros((30, 30), np.int64),
        "alert_state": np.full((30, 30), 255, np.int64),
    }
    for i in range(30):
        for j in range(30):
            if not forest[i, j] or not valid[:, i, j].any():
                continue  # outside the mask, or never observed
            state, first, run_ = "none", 0, 0
            for t, s in enumerate(scenes):
                if s.date < START or not valid[t, i, j]:
                    continue
                window = valid[: t + 1, i, j] & (days[: t + 1] >= days[t] - 1460)
                q = detector_probability(data[: t + 1][window][:, :, i, j], LEVEL, GAIN)
                if q >= THRESHOLD:
                    run_ += 1
                    if state in ("none", "retracted"):
                        state, first = "candidate", days[t]
                    if state == "candidate" and run_ >= CONFIRM:
                        state = "confirmed"
                else:
                    run_ = 0
                    if state == "candidate":
                        state = "retracted"
            code = {"none": 0, "candidate": 1, "confirmed": 2, "retracted": 3}[state]
            out["alert_first_seen"][i, j] = first
            out["alert_confirmations"][i, j] = run_
            out["alert_state"][i, j] = code
    return out


def _flags():
    from treesits_dask.config import DEFAULT_QAI_FLAGS

    return DEFAULT_QAI_FLAGS


def _truth(cube, tile: str) -> dict[str, np.ndarray]:
    """What the alerts must say of a clear-cut: first seen at the first valid acquisition on or
    after the cut, confirmed after three, every later one counted; nothing where nothing
    happened."""
    scenes = discovery.scene_table(cube.root, tile)
    grid = tile_grid(discovery.read_cube_definition(cube.root), scenes[0])
    data = tile_cube(scenes, grid, WindowLayout.of(grid, (30, 30)), _flags()).data.compute()
    valid = (data != -9999).all(axis=1)
    days = np.array([(s.date - EPOCH).days for s in scenes])
    cut = cube.disturbance(tile)
    first = np.zeros((30, 30), np.int64)
    count = np.zeros((30, 30), np.int64)
    for i, j in zip(*np.nonzero(cut), strict=True):
        after = np.flatnonzero(valid[:, i, j] & (days >= cut[i, j]))
        first[i, j] = days[after[0]] if after.size else 0
        count[i, j] = after.size
    return {"first": first, "count": count, "cut": cut > 0}


def test_alerts_over_many_updates_equal_one_update_and_the_truth(world, client, tmp_path):
    cube, model, root = world
    # one big update: every scene at once
    big = tmp_path / "big"
    result = run(_config(cube.root, cube.mask_dir, model, big), client=client)
    assert set(result.tiles) == {A, B} and not result.failed
    one = open_map(str(big))

    # many small updates: the scenes before START first, then one to three at a time, one of
    # them late (the first after the cut arrives after two scenes dated later than itself)
    growing = root / "growing"
    growing.mkdir(exist_ok=True)
    shutil.copy(Path(cube.root) / "datacube-definition.prj", growing)
    small = tmp_path / "small"
    by_date = sorted({s.date for t in (A, B) for s in discovery.scene_table(cube.root, t)})
    before = [d for d in by_date if d < START]
    after = [d for d in by_date if d >= START]
    k = next(i for i, d in enumerate(after) if d >= CUT)
    assert 2 <= k <= len(after) - 4
    late = after[k]
    batches = [before, after[:2], after[2:k], after[k + 1 : k + 3], [late],
               *[[d] for d in after[k + 3 :]]]  # fmt: skip
    batches = [b for b in batches if b]
    for batch in batches:
        scenes = [s for t in (A, B) for s in discovery.scene_table(cube.root, t) if s.date in batch]
        _deliver(Path(cube.root), growing, scenes)
        config = _config(str(growing), cube.mask_dir, model, small)
        if batch == [late]:  # goes back to the version before the late scene's date
            planned = {t.tile: t.alerts for t in make_plan(config).tiles}
            assert planned[A].resume is not None and planned[A].through < late
            assert [d for d, _ in planned[A].steps][0] == late
        step = run(config, client=client)
        assert not step.failed and step.tiles
    assert len(versions(str(small))) == len(batches)
    many = open_map(str(small))

    # identical layers, whatever the updates
    for var in (*ALERT_LAYERS, "probability", "last_valid_date", "valid_obs"):
        np.testing.assert_array_equal(one[var].values, many[var].values, err_msg=var)

    for k, tile in enumerate((A, B)):
        cols = slice(30 * k, 30 * k + 30)
        got = {v: one[v].values[:, cols].astype(np.int64) for v in ALERT_LAYERS}
        # the independent computation
        want = _expected(cube, tile)
        for var in ALERT_LAYERS:
            np.testing.assert_array_equal(got[var], want[var], err_msg=f"{tile} {var}")
        # and what a clear-cut means
        truth = _truth(cube, tile)
        cut = truth["cut"]
        assert cut.any() == (tile == A)
        np.testing.assert_array_equal(got["alert_first_seen"][cut], truth["first"][cut])
        np.testing.assert_array_equal(got["alert_confirmations"][cut], truth["count"][cut])
        np.testing.assert_array_equal(
            got["alert_state"][cut], np.where(truth["count"][cut] >= CONFIRM, 2, 1)
        )
        forest = cube.forest(tile)
        assert (got["alert_state"][forest & ~cut] == 0).all()  # no alert where nothing happened
        assert (got["alert_state"][~forest] == 255).all()  # outside the mask
        assert (got["alert_first_seen"][~cut] == 0).all()
    assert (one["alert_state"].values == 2).sum() > 100  # the stand is confirmed

    # the late scene made the run that brought it go back to the version before its date
    records = MapRepo(str(small)).records()
    assert records[A]["alerts"]["through"] == str(after[-1])


def _as_cogs(src: Path, dst: Path, block: int) -> None:
    """``src`` cube with every BOA and QAI rewritten as a COG of ``block`` px blocks."""
    import rasterio

    shutil.copy(src / "datacube-definition.prj", dst / "datacube-definition.prj")
    for path in sorted(src.glob("X*/*_[BQ][OA][AI].tif")):
        with rasterio.open(path) as f:
            data, profile = f.read(), f.profile
        (dst / path.parent.name).mkdir(exist_ok=True)
        profile.update(driver="COG", blocksize=block, compress="zstd", overviews="NONE")
        for key in ("tiled", "blockxsize", "blockysize", "interleave"):
            profile.pop(key, None)
        with rasterio.open(dst / path.parent.name / path.name, "w", **profile) as out:
            out.write(data)


def test_alerts_of_cogs_read_in_chunks_of_whole_blocks_equal_the_truth(world, client, tmp_path):
    """The same scenes as COGs of 16 px blocks, which the 15 x 30 px windows cut: each tile is
    read and predicted in chunks of whole blocks (16 x 30 px), the alert layers a run goes on from
    are rechunked to them and its outputs back to the windows; over two updates (the scenes before
    START, then the rest) the layers equal the pixel-by-pixel computation."""
    from types import SimpleNamespace

    cube, model, _ = world
    cogs, growing, out = tmp_path / "cogs", tmp_path / "growing", tmp_path / "out"
    cogs.mkdir()
    growing.mkdir()
    _as_cogs(Path(cube.root), cogs, 16)
    shutil.copy(cogs / "datacube-definition.prj", growing)
    tables = {t: discovery.scene_table(str(cogs), t) for t in (A, B)}
    for early in (True, False):
        _deliver(cogs, growing, [s for t in (A, B) for s in tables[t] if (s.date < START) == early])
        config = _config(str(growing), cube.mask_dir, model, out)
        tiles = make_plan(config).tiles
        assert [(t.layout.shape, t.reading.shape) for t in tiles] == [((15, 30), (16, 30))] * 2
        assert [t.alerts.resume is not None for t in tiles] == [not early] * 2
        result = run(config, client=client)
        assert set(result.tiles) == {A, B} and not result.failed
    got = open_map(str(out))
    for k, tile in enumerate((A, B)):
        want = _expected(SimpleNamespace(root=str(cogs), forest=cube.forest), tile)
        for var in ALERT_LAYERS:
            layer = got[var].values[:, 30 * k : 30 * k + 30].astype(np.int64)
            np.testing.assert_array_equal(layer, want[var], err_msg=f"{tile} {var}")
    assert (got["alert_state"].values[:, :30] == 2).any()  # the clear-cut is confirmed


def test_the_alerts_older_scenes_are_checked_on_the_driver_and_read_in_their_layout(
    world, client, tmp_path
):
    """An alert run also reads the scenes before the model's window that its first steps' windows
    reach (``alerts.older``).  The driver checks their headers with the tile's, before any
    output exists, and learns their file layout: here the older scenes are FORCE < 3.8 strips and
    the model's window FORCE >= 3.8 COGs of 16 px blocks, so each part is read in blocks of its
    own, and the layers equal those of the same scenes all in strips.  An older scene of another
    grid leaves the tile out, named, where the run used to start and fail on a worker."""
    import rasterio

    from treesits_dask.synthetic import ClearCut, make_cube

    _, model, _ = world
    strips = make_cube(
        tmp_path / "strips", tiles=(A,), size=30, n_scenes=36, start="2017-09-01",
        end="2022-07-31", clear_cuts=[ClearCut(A, CUT, 5, 5, 12, 18)], forest_fraction=0.8,
        seed=7,
    )  # fmt: skip
    cogs, mixed = tmp_path / "cogs", tmp_path / "mixed"
    cogs.mkdir()
    _as_cogs(Path(strips.root), cogs, 16)
    shutil.copytree(strips.root, mixed)

    config = _config(str(mixed), strips.mask_dir, model, tmp_path / "probe")
    (probe,) = make_plan(config).tiles
    older = {s.name for s in probe.alerts.older}
    assert older and probe.scenes  # the steps' windows reach before the model's window
    for s in probe.scenes:  # the model's window in COGs, the older scenes in strips
        for path in (s.boa, s.qai):
            shutil.copy(cogs / A / Path(path).name, path)

    out = tmp_path / "mixed-out"
    plan = make_plan(_config(str(mixed), strips.mask_dir, model, out))
    (tile,) = plan.tiles
    assert {s.name for s in tile.alerts.older} == older
    assert {s.block_shape for s in tile.alerts.older} == {(3, 30)}
    assert {s.block_shape for s in tile.scenes} == {(16, 16)}
    (summary,) = plan.summary()["tiles"]
    assert summary["file_blocks"] == {"3x30": len(older), "16x16": len(tile.scenes)}

    mixed_run = run(_config(str(mixed), strips.mask_dir, model, out), client=client)
    assert set(mixed_run.tiles) == {A} and not mixed_run.failed
    plain = tmp_path / "plain-out"
    plain_run = run(_config(strips.root, strips.mask_dir, model, plain), client=client)
    assert set(plain_run.tiles) == {A} and not plain_run.failed
    got, want = open_map(str(out)), open_map(str(plain))
    for var in (*ALERT_LAYERS, "valid_obs"):
        np.testing.assert_array_equal(got[var].values, want[var].values, err_msg=var)
    # other chunks (16 x 30 px, whole COG blocks) batch the pixels otherwise: float32 rounding
    np.testing.assert_allclose(got["probability"].values, want["probability"].values, rtol=1e-5)
    assert np.isin(want["alert_state"].values, (1, 2)).any()  # the clear-cut is seen

    # the older scenes count where a chunk of all scenes must fit the workers the settings start:
    # inference workers of 2 threads with room for the model's window, not for the older scenes
    from treesits_dask.pipeline.memory import WINDOW_SHARE, WINDOWS_PER_THREAD

    def limited(n_scenes: float):
        limit = WINDOWS_PER_THREAD * 2 * n_scenes * 10 * 15 * 30 * 2 / WINDOW_SHARE
        return load_config(
            overrides=dict(
                cube=strips.root, mask_dir=strips.mask_dir, model=model,
                output=str(tmp_path / "new"),
                model_family="native", window="15x30", workers=1, threads_per_worker=2,
                memory_limit=str(int(limit)),
                alerts={"start": str(START), "threshold": THRESHOLD, "confirm_after": CONFIRM},
            ),
            environ={},
        )  # fmt: skip

    n = len(tile.scenes) + len(older)
    refused = make_plan(limited(n - len(older) / 2))
    assert not refused.tiles and f"a window of all {n} scenes" in str(refused.invalid[A])
    assert [t.tile for t in make_plan(limited(n + 1)).tiles] == [A]

    # an older scene replaced by a file of another grid: the tile is left out before any output
    bad = next(s for s in probe.alerts.older)
    with rasterio.open(bad.boa) as f:
        profile = f.profile
    profile.update(width=20, height=20)
    with rasterio.open(bad.boa, "w", **profile) as f:
        f.write(np.zeros((profile["count"], 20, 20), profile["dtype"]))
    later = tmp_path / "later-out"
    plan = make_plan(_config(str(mixed), strips.mask_dir, model, later))
    assert not plan.tiles and Path(bad.boa).name in str(plan.invalid[A])
    assert not later.exists()
