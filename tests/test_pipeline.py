"""End-to-end runs on a real LocalCluster; outputs checked by opening them with xarray /
rasterio."""

import json

import numpy as np
import pytest
import rasterio

from treesits_dask import open_map
from treesits_dask.cli import main
from treesits_dask.config import DEFAULT_QAI_FLAGS, load_config
from treesits_dask.io import discovery
from treesits_dask.io.qai import qai_invalid
from treesits_dask.outputs.repo import MapRepo
from treesits_dask.pipeline import predict
from treesits_dask.pipeline.run import run

pytestmark = pytest.mark.slow


def _raw_valid(cube_root, tile, flags):
    """(T, H, W) validity straight from the files: all bands != -9999 and QAI not flagged."""
    out = []
    for s in discovery.scene_table(cube_root, tile):
        with rasterio.open(s.boa) as src:
            v = (src.read() != -9999).all(axis=0)
        if flags:
            with rasterio.open(s.qai) as src:
                v &= ~qai_invalid(src.read(1), flags)
        out.append(v)
    return np.array(out)


def test_run_synthetic(small_cube, native_lstm, tmp_path, client):
    out = tmp_path / "out"
    config = load_config(
        overrides=dict(
            cube=small_cube.root,
            tiles="all",
            output=str(out),
            model=native_lstm,
            model_family="native",
            mask_dir=small_cube.mask_dir,
            window="30x60",
            batch_size=100,
        ),
        environ={},
    )
    result = run(config, client=client)
    assert set(result.tiles) == set(small_cube.tiles)

    ds = open_map(str(out))
    assert ds.rio.crs.to_epsg() == 3035
    assert list(ds.probability.coords["class_name"].values) == list(small_cube.class_names)
    assert ds.probability.dims == ("class_name", "y", "x") and ds.probability.dtype == np.float32
    assert ds["class"].dtype == np.uint8 and ds.valid_obs.dtype == np.uint16
    assert ds.sizes["x"] == 120 and ds.sizes["y"] == 60  # two tiles side by side

    predicted_total = 0
    for k, tile in enumerate(small_cube.tiles):
        forest = small_cube.forest(tile)
        valid = _raw_valid(small_cube.root, tile, DEFAULT_QAI_FLAGS)
        expect_pred = forest & valid.any(axis=0)
        sl = dict(y=slice(0, 60), x=slice(60 * k, 60 * (k + 1)))
        prob = ds.probability.isel(**sl).values
        cls = ds["class"].isel(**sl).values
        vobs = ds.valid_obs.isel(**sl).values
        last = ds.last_obs_valid.isel(**sl).values
        np.testing.assert_array_equal(~np.isnan(prob[0]), expect_pred)
        np.testing.assert_array_equal(cls != 255, expect_pred)
        np.testing.assert_allclose(prob[:, expect_pred].sum(axis=0), 1.0, atol=1e-5)
        np.testing.assert_array_equal(cls[expect_pred], prob[:, expect_pred].argmax(axis=0))
        np.testing.assert_array_equal(vobs, np.where(expect_pred, valid.sum(axis=0), 0))
        np.testing.assert_array_equal(last, np.where(expect_pred, valid[-1], 255))
        predicted_total += int(expect_pred.sum())
        # COGs hold the same values, and are valid COGs
        from rio_cogeo.cogeo import cog_validate

        for var, arr in (
            ("probability", prob),
            ("class", cls),
            ("valid_obs", vobs),
            ("last_obs_valid", last),
        ):
            path = out / "cog" / tile / f"{var}.tif"
            ok, errors, _ = cog_validate(str(path))
            assert ok, errors
            with rasterio.open(path) as src:
                data = src.read()
                assert src.crs.to_epsg() == 3035
                if var == "probability":
                    assert src.descriptions == tuple(small_cube.class_names)
                np.testing.assert_array_equal(data.reshape(arr.shape), arr)
    assert result.pixels_predicted == predicted_total
    summary = json.loads((out / "run.json").read_text())
    assert summary["complete"] and summary["pixels_predicted"] == predicted_total
    # run report: seconds per stage from the task stream, throughput, a Dask performance report
    stages = summary["stages"]
    windows = sum(t["windows"] for t in summary["tiles"].values())
    assert windows == 4 and summary["throughput"]["windows"] == windows
    read = stages["read"]
    assert read["tasks"] == windows and read["seconds"] > 0
    predict_stage = next(v for k, v in stages.items() if k.startswith("predict"))
    assert predict_stage["tasks"] == windows and predict_stage["seconds"] > 0
    assert stages["cog"]["tasks"] == 2
    assert summary["throughput"]["pixels_per_second"] == pytest.approx(
        predicted_total / summary["seconds"], rel=0.01
    )
    report = out / "_runs" / result.report_dir.rsplit("/", 1)[-1]
    assert json.loads((report / "run.json").read_text()) == summary
    # how the model ran: the settings, and per worker the device path it took
    assert summary["settings"]["precision"] == "fp32" and summary["settings"]["device"] == "auto"
    assert len(summary["inference"]) == 2
    for stats in summary["inference"].values():
        assert [(s["device"], s["precision"], s["feed"]) for s in stats] == [
            ("cpu", "fp32", "host")
        ]
    html = (report / "dask-report.html").read_text()
    assert summary["performance_report"].endswith("dask-report.html") and len(html) > 10_000
    assert "Dask Performance Report" in html and "Task Stream" in html
    # the mosaic reads back both tiles
    with rasterio.open(out / "cog" / "class.vrt") as src:
        assert src.width == 120
        np.testing.assert_array_equal(src.read(1), ds["class"].values)
    # the model was loaded exactly once in each worker process
    loads = client.run(predict.load_count)
    assert sorted(loads.values()) == [1, 1]
    # ... and its allocator keeps torch temporaries on the heap (nanny workers start with
    # MALLOC_TRIM_THRESHOLD_ set, which would mmap every one of them afresh)
    assert all(client.run(predict.malloc_tuned).values())
    # ... which gives what it keeps back to the system above Dask's target, every second
    trims = client.run(
        lambda dask_worker: dask_worker.periodic_callbacks["treesits-give-back-memory"].is_running()
    )
    assert all(trims.values()), trims
    # ... and its CPU model shares the worker's cores out among the reads and forwards in progress
    budgets = client.run(
        lambda: [
            getattr(p.threads, "func", None) is predict.threads_for_forward
            for p in predict._CACHE.values()
        ]
    )
    assert all(v == [True] for v in budgets.values()), budgets


def _recycle_from(client, nbytes: int) -> None:
    """Every worker recycles read buffers of at least ``nbytes`` (``io.buffers.MIN_BYTES``)."""
    client.run(
        lambda: setattr(__import__("treesits_dask.io.buffers").io.buffers, "MIN_BYTES", nbytes)
    )


@pytest.mark.parametrize("recycled", [False, True], ids=["plain", "recycled-buffers"])
def test_pipeline_equals_direct_prediction(small_cube, native_lstm, tmp_path, client, recycled):
    """The distributed result equals the kernel applied to the whole tile in one piece; also with
    every band and window of the run in recycled buffers (``io.buffers``; the test's arrays are
    below the size it recycles from, so the threshold is lowered on the workers), in a second run
    that gets its buffers from the first."""
    from treesits_dask.io import buffers

    def config(out):
        return load_config(
            overrides=dict(cube=small_cube.root, tiles="X0069_Y0043", output=str(out),
                           model=native_lstm, window="20x30", qai="none", cog=False),
            environ={},
        )  # fmt: skip

    outs = [tmp_path / "out", tmp_path / "again"][: 1 + recycled]
    before = sum(r for _, r in client.run(buffers.handed_out).values())
    if recycled:
        _recycle_from(client, 1)
    try:
        for out in outs:
            run(config(out), client=client)
    finally:
        _recycle_from(client, buffers.MIN_BYTES)
    reused = sum(r for _, r in client.run(buffers.handed_out).values()) - before
    assert (reused > 0) == recycled
    scenes = discovery.scene_table(small_cube.root, "X0069_Y0043")
    block = np.array([rasterio.open(s.boa).read() for s in scenes])
    from treesits_dask.io.cube import days_since_epoch
    from treesits_dask.models import ModelSpec, load_model

    predictor = load_model(ModelSpec(native_lstm, "native"), device="cpu")
    direct = predict.predict_block(
        block, None, days_since_epoch([s.date for s in scenes]), predictor
    )
    for out in outs:
        ds = open_map(str(out))
        np.testing.assert_allclose(
            ds.probability.values, direct["probability"], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_array_equal(ds["class"].values, direct["class"])
        np.testing.assert_array_equal(ds.valid_obs.values, direct["valid_obs"])


@pytest.mark.parametrize("family", ["sits-lstm", "sits-transformer"])
def test_real_sitsnn_weights_on_real_tile(shared_data, tmp_path, family, capsys):
    """Published SITS-NN weights run on the real Sentinel-2 tile through `run` (CLI,
    LocalCluster)."""
    stem = "lstm_5pure" if family == "sits-lstm" else "transformer_5pure"
    weights = shared_data / "sitsnn-weights" / "04"
    out = tmp_path / "out"
    rc = main(
        [
            "run",
            "--cube",
            str(shared_data / "real-s2-eolearn"),
            "--tiles",
            "X0000_Y0000",
            "--model",
            str(weights / f"{stem}.pth"),
            "--model-family",
            family,
            "--model-params",
            str(weights / f"{stem}_params.json"),
            "--mask-dir",
            str(shared_data / "real-s2-eolearn-masks"),
            "--qai",
            "none",
            "--output",
            str(out),
            "--workers",
            "1",
            "--dashboard-address",
            ":0",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    ds = open_map(str(out))
    with rasterio.open(shared_data / "real-s2-eolearn-masks" / "X0000_Y0000" / "mask.tif") as src:
        forest = src.read(1) > 0
    predicted = ds["class"].values != 255
    np.testing.assert_array_equal(
        predicted, forest
    )  # every forest pixel has valid observations here
    assert set(np.unique(ds["class"].values[predicted])) <= set(range(5))
    prob = ds.probability.values[:, predicted]
    np.testing.assert_allclose(prob.sum(axis=0), 1, atol=1e-4)
    assert list(ds.probability.coords["class_name"].values) == [
        "Spruce",
        "Beech",
        "Pine",
        "Douglas fir",
        "Oak",
    ]
    # 3 of the 5 scenes are valid at most pixels: two dates are fully clouded
    assert ds.valid_obs.values[predicted].max() == 3


def test_precision_is_recorded_in_run_report_and_settings_digest(
    small_cube, native_lstm, tmp_path, client
):
    """``precision`` reaches the workers, the run report and the ledger's settings digest (a
    change of precision redoes a tile); fp32 keeps the digest of records written before the
    setting existed."""
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.state import ledger

    out = tmp_path / "out"
    common = dict(
        cube=small_cube.root,
        tiles="X0069_Y0043",
        output=str(out),
        model=native_lstm,
        window="30x60",
        cog=False,
    )
    config = load_config(overrides={**common, "precision": "bf16"}, environ={})
    run(config, client=client)
    summary = json.loads((out / "run.json").read_text())
    assert summary["settings"]["precision"] == "bf16"
    precisions = {s["precision"] for v in summary["inference"].values() for s in v}
    assert "bf16" in precisions
    record = MapRepo(str(out)).records()["X0069_Y0043"]
    assert record["config_digest"] == make_plan(config).config_digest
    # the same settings are up to date; another precision redoes the tile
    assert make_plan(config).skipped == {"X0069_Y0043": "up to date"}
    fp32 = load_config(overrides={**common, "precision": "fp32"}, environ={})
    plan = make_plan(fp32)
    assert [t.reasons for t in plan.tiles] == [("settings changed",)]
    legacy = ledger.config_digest(
        {
            "model_family": "native",
            "qai": sorted(set(fp32.qai_flags)),
            "sensors": sorted(fp32.sensors),
            "start_date": None,
            "end_date": None,
            "outputs": ["last_valid_date"],  # the kernel layers beyond the first maps' four
        }
    )
    assert plan.config_digest == legacy != record["config_digest"]
    tf32 = load_config(overrides={**common, "precision": "tf32"}, environ={})
    assert len({make_plan(c).config_digest for c in (config, fp32, tf32)}) == 3


def _standing_config(cube, model, out, client, window, stream="never"):
    """A run of ``cube`` on the standing cluster of ``client`` in ``window`` windows (the LSTM
    read as models that cannot stream are: these tests are about windows of all scenes, which a
    streamed tile never holds, see tests/test_streaming.py)."""
    return load_config(
        overrides=dict(cube=cube.root, tiles="all", output=str(out), model=model,
                       model_family="native", mask_dir=cube.mask_dir, window=window,
                       scheduler_address=client.scheduler.address, stream=stream),
        environ={},
    )  # fmt: skip


def test_a_tile_whose_windows_do_not_fit_the_workers_is_refused_before_reading(
    small_cube, native_lstm, tmp_path, client, monkeypatch
):
    """Where the windows of all scenes do not fit the memory of a standing cluster's inference
    workers (see ``test_cube.py::test_windows_of_all_scenes_must_fit_the_inference_workers``; here
    the share they may fill is made tiny so that the 60 px test windows overflow it), each tile
    fails at once with the sizes and the settings to change, nothing is read or recorded, and the
    run exits with an error instead of restarting workers until Dask gives up."""
    from treesits_dask.bench.measure import decoded
    from treesits_dask.pipeline import memory
    from treesits_dask.pipeline.run import RunError

    monkeypatch.setattr(memory, "WINDOW_SHARE", 1e-6)
    out = tmp_path / "out"
    # a standing cluster: only its workers know their memory, so the plan cannot check it
    config = _standing_config(small_cube, native_lstm, out, client, "60x60")
    before = sum(v[1] for v in client.run(decoded).values())
    with pytest.raises(RunError) as err:
        run(config, client=client)
    assert sum(v[1] for v in client.run(decoded).values()) == before  # nothing read
    text = str(err.value)
    for tile in small_cube.tiles:
        assert f"{tile}: a window of all 10 scenes is 60x60 px" in text
    assert "--memory-limit" in text and "--window" in text
    assert "(--stream auto)" in text  # the LSTM could be streamed instead
    assert MapRepo(str(out)).records() == {}


def test_a_standing_cluster_that_holds_the_windows_but_not_the_chunks_reads_the_windows(
    small_cube, native_lstm, tmp_path, client, monkeypatch, caplog
):
    """On a standing cluster (its workers' memory known only when the run connects), a striped
    tile whose chunks of whole strips (6 x 30 px for 5 x 30 px windows of 6-row strips) do not fit
    the inference workers but whose windows do is read in its windows, as the plan does where it
    knows the workers, instead of failing: 3 x 10 scenes x 10 bands x 5 (6) x 30 px x 2 bytes =
    90 (108) kB per 1-thread worker, against a share of its memory limit of 99 kB."""
    import logging

    from treesits_dask.pipeline import memory
    from treesits_dask.pipeline.plan import make_plan

    workers = client.scheduler_info(n_workers=-1)["workers"].values()
    assert {w["nthreads"] for w in workers} == {1}
    monkeypatch.setattr(memory, "WINDOW_SHARE", 99_000 / min(w["memory_limit"] for w in workers))
    out = tmp_path / "out"
    config = _standing_config(small_cube, native_lstm, out, client, "5x30")
    assert {t.reading.shape for t in make_plan(config).tiles} == {(6, 30)}
    with caplog.at_level(logging.INFO, logger="treesits_dask.pipeline.memory"):
        run(config, client=client)
    for tile in small_cube.tiles:
        assert f"tile {tile}: chunks of 6x30 px of all scenes do not fit" in caplog.text
    assert set(MapRepo(str(out)).records()) == set(small_cube.tiles)
    assert open_map(str(out)).probability.notnull().any()


def test_windows_that_do_not_fit_the_local_workers_are_refused_by_the_plan(
    small_cube, native_lstm, tmp_path, monkeypatch
):
    """On a cluster the settings start (here a LocalCluster of 2-thread workers with a 4 MiB memory
    limit, never started), the plan refuses the tiles whose windows of all scenes do not fit: the
    run fails before any cluster or output exists, naming the sizes and what to change."""
    from treesits_dask.errors import ConfigError, TreesitsError
    from treesits_dask.pipeline.plan import make_plan

    out = tmp_path / "out"

    def config(limit, window="60x60", stream="never"):
        return load_config(
            overrides=dict(cube=small_cube.root, tiles="all", output=str(out), model=native_lstm,
                           model_family="native", mask_dir=small_cube.mask_dir, window=window,
                           workers=1, threads_per_worker=2, memory_limit=limit, stream=stream),
            environ={},
        )  # fmt: skip

    # 3 windows x 2 threads x 10 scenes x 10 bands x 60 x 60 px x 2 bytes = 4.1 MiB
    plan = make_plan(config("4MiB"))
    assert plan.tiles == [] and set(plan.invalid) == set(small_cube.tiles)
    assert all(isinstance(e, ConfigError) for e in plan.invalid.values())
    assert "a window of all 10 scenes is 60x60 px x 10 bands" in str(plan.invalid["X0069_Y0043"])
    assert "(--stream auto)" in str(plan.invalid["X0069_Y0043"])
    # the LSTM streamed instead (``stream: auto``): no window of all scenes is ever held, and its
    # states (153 bytes per mask pixel) fit half of the worker over the 2 tiles in flight
    streamed = make_plan(config("4MiB", stream="auto"))
    assert not streamed.invalid and [t.stream for t in streamed.tiles] == ["required"] * 2
    assert [t.reading.shape for t in streamed.tiles] == [(60, 60)] * 2
    # but not where the states do not fit either: 400 kB leaves 100 kB of states per tile
    tight = make_plan(config("400kB", stream="auto"))
    assert tight.tiles == [] and set(tight.invalid) == set(small_cube.tiles)
    why = str(tight.invalid["X0069_Y0043"])
    assert "a window of all 10 scenes" in why and "Streamed through the model instead" in why
    assert "more than the 97.66 kiB an inference worker has room for" in why
    import distributed

    def no_cluster(*args, **kwargs):
        raise AssertionError("a cluster was started for a run the plan refuses")

    with monkeypatch.context() as m:
        m.setattr("treesits_dask.pipeline.run.connect", no_cluster)
        m.setattr(distributed.LocalCluster, "__init__", no_cluster)
        with pytest.raises(TreesitsError, match="--memory-limit"):
            run(config("4MiB"))
    assert not out.exists()  # no output either
    assert [t.tile for t in make_plan(config("8MiB")).tiles] == list(small_cube.tiles)
    # a new map with `window: auto` takes windows that fit instead (with room for the series to
    # grow): strips of fewer rows, not whole tiles
    from treesits_dask.pipeline.memory import AUTO_WINDOW_SHARE, WINDOWS_PER_THREAD

    assert make_plan(config("1GiB", window="auto")).window_shape == (60, 60)
    auto = make_plan(config("4MiB", window="auto"))
    rows, cols = auto.window_shape
    assert cols == 60 and rows < 60 and 60 % rows == 0 and not auto.invalid
    assert WINDOWS_PER_THREAD * 2 * rows * cols * 10 * 10 * 2 <= AUTO_WINDOW_SHARE * 4 * 2**20
    assert [t.tile for t in auto.tiles] == list(small_cube.tiles)
    # windows that cut the 6-row strips are read in chunks of whole strips where those fit the
    # workers (6 x 30 px for 5 x 30 px windows), else in the windows themselves: 3 x 2 threads x
    # 10 scenes x 10 bands x 5 (6) x 30 px x 2 bytes = 180 (216) kB, against 60 % of 330 kB
    n = len(small_cube.tiles)
    roomy, tight = make_plan(config("1GiB", "5x30")), make_plan(config("330kB", "5x30"))
    assert [t.reading.shape for t in roomy.tiles] == [(6, 30)] * n
    assert [t.reading.shape for t in tight.tiles] == [(5, 30)] * n and not tight.invalid
    assert [t.layout.shape for t in roomy.tiles + tight.tiles] == [(5, 30)] * 2 * n


def _window_config(cube, model, out):
    """A run over every tile of the synthetic ``cube`` (with its forest masks) in 100 px windows
    into ``out``, no COGs; the LSTM read as the other models are (``stream: never``: these
    tests are about the read plans of tiles whose bands do not fit; tests/test_streaming.py
    streams them)."""
    return load_config(
        overrides=dict(cube=cube.root, tiles="all", output=str(out), model=model,
                       window="100x100", mask_dir=cube.mask_dir, cog=False, stream="never"),
        environ={},
    )  # fmt: skip


def _assert_same_maps(a, b) -> None:
    """The maps under ``a`` and ``b`` hold some probability and the same probability, class and
    valid observations."""
    a, b = open_map(str(a)), open_map(str(b))
    assert a.probability.notnull().any()
    np.testing.assert_array_equal(a.probability.values, b.probability.values)
    np.testing.assert_array_equal(a["class"].values, b["class"].values)
    np.testing.assert_array_equal(a.valid_obs.values, b.valid_obs.values)


def test_chunks_of_whole_blocks_fall_back_to_the_windows_on_workers_that_cannot_hold_them(
    native_lstm, tmp_path, client, monkeypatch, caplog
):
    """The plan reads a COG tile whose 100 px windows cut its 256 px blocks in chunks of whole
    blocks where the workers the settings start hold them; run on workers that do not (here the
    share those chunks may fill made tiny when the run checks its cluster), the tile is read in
    its windows (in bands) instead, says so, and maps the same values."""
    import logging

    from treesits_dask.pipeline import memory, schedule
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.synthetic import make_cube

    cube = make_cube(tmp_path / "cube", size=500, n_scenes=5, layout="cog", seed=4,
                     mask_dir=str(tmp_path / "masks"))  # fmt: skip

    def config(out):
        return _window_config(cube, native_lstm, out)

    (t,) = make_plan(config(tmp_path / "a")).tiles
    assert t.layout.shape == (100, 100) and t.reading.shape == (256, 256)
    run(config(tmp_path / "a"), client=client)
    checked = schedule.tiles_that_fit

    def smaller_workers(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(memory, "BLOCK_CHUNK_SHARE", 1e-9)
            return checked(*args, **kwargs)

    monkeypatch.setattr(schedule, "tiles_that_fit", smaller_workers)
    with caplog.at_level(logging.INFO, logger="treesits_dask.pipeline.memory"):
        run(config(tmp_path / "b"), client=client)
    assert (
        f"tile {t.tile}: chunks of 256x256 px of all scenes do not fit the inference workers, "
        "chunks of 100x100 px do: read in those" in caplog.text
    )
    _assert_same_maps(tmp_path / "a", tmp_path / "b")


@pytest.mark.parametrize("disk", [0.5, 0.0], ids=["gate", "sections"])
def test_a_tile_whose_bands_fit_only_fewer_or_in_sections_maps_the_same_values(
    native_lstm, tmp_path, client, monkeypatch, caplog, disk
):
    """A striped tile whose 4 bands of all scenes over its full width fit neither the reading
    workers' memory nor their disk (the budget the run finds on its cluster cut to 30 % of what
    they hold and 50 % on disk; or to 60 % and no disk), but 2 of them fit the disk, is read
    2 bands at a time behind a gate, on one reading worker (a plan that spills); without a disk
    in 2 sections of window columns; either says so, and maps the same values as a run that
    reads it in full-width bands, on the test's LocalCluster."""
    import dataclasses
    import logging

    from treesits_dask.io.bands import plan_reads
    from treesits_dask.pipeline import schedule
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.synthetic import make_cube

    cube = make_cube(tmp_path / "cube", size=600, n_scenes=5, layout="strips", seed=4,
                     mask_dir=str(tmp_path / "masks"))  # fmt: skip

    def config(out):
        return _window_config(cube, native_lstm, out)

    (t,) = make_plan(config(tmp_path / "a")).tiles
    run(config(tmp_path / "a"), client=client)
    held = plan_reads(t.grid, t.reading, len(t.scenes), 1 << 40).held
    per_window = t.reading.shape[0] * t.reading.shape[1] * t.grid.count * 2 * len(t.scenes)
    budget = schedule.read_budget

    memory, spill = int(held * (0.3 if disk else 0.6)), int(held * disk)
    plan = plan_reads(t.grid, t.reading, len(t.scenes), per_window, held_bytes=memory,
                      spill_bytes=spill)  # fmt: skip
    assert (plan.sections, plan.gate, plan.spills) == ((1, 2, True) if disk else (2, 0, False))

    def small(*args, **kwargs):  # one window per read task, part of the bands, some disk or none
        got = budget(*args, **kwargs)
        return dataclasses.replace(got, task_bytes=per_window, held_bytes=memory,
                                   spill_bytes=spill)  # fmt: skip

    monkeypatch.setattr(schedule, "read_budget", small)
    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        run(config(tmp_path / "b"), client=client)
    if disk:
        assert f"tile {t.tile} spills its bands: read on worker" in caplog.text
        assert f"tile {t.tile}: 4 bands of all 5 scenes over its full width" in caplog.text
        assert "reading it 2 bands at a time" in caplog.text
        assert "times its bytes by the plan's count" not in caplog.text  # decoded once
    else:
        started = caplog.text.index(f"tile {t.tile}: the bands of all 5 scenes over its full width")
        assert "in 2 sections of whole window columns" in caplog.text
        # said before any tile started, with the disk that would have it decode once
        said = caplog.text.index(
            f"tile {t.tile}: read in 2 sections of window columns, it decodes 2.00 times its bytes "
            "by the plan's count; with "
        )
        assert said < started and "GiB of free local disk per reading worker" in caplog.text
    _assert_same_maps(tmp_path / "a", tmp_path / "b")


def test_read_budgets_follow_reading_workers_that_join_during_a_run(
    native_lstm, tmp_path, client, monkeypatch, caplog
):
    """A run that starts on the one reading worker it waits for (an adaptive group at its minimum)
    and gains a second while it runs derives its read budgets again for the tiles that start
    after: their reading threads and the tiles in flight while one is read alone follow the
    workers they are read on, not those of the run's start; the maps are the same."""
    import logging

    from distributed import Client, LocalCluster

    from treesits_dask.pipeline import schedule
    from treesits_dask.pipeline.schedule import RunCallbacks
    from treesits_dask.synthetic import make_cube

    names = ("X0069_Y0043", "X0070_Y0043", "X0071_Y0043")
    cube = make_cube(tmp_path / "cube", tiles=names, size=300, n_scenes=5, layout="strips", seed=4,
                     mask_dir=str(tmp_path / "masks"))  # fmt: skip

    def config(out):
        return _window_config(cube, native_lstm, out).model_copy(update={"tiles_in_flight": 2})

    run(config(tmp_path / "a"), client=client)
    started = []
    submit = schedule._Scheduler.submit

    def recorded(self, tile):
        started.append((self.reads.threads, self.alone_tiles, self.alone is None))
        submit(self, tile)

    monkeypatch.setattr(schedule._Scheduler, "submit", recorded)
    with (
        LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                     dashboard_address=":0") as cluster,
        Client(cluster) as grown,
    ):  # fmt: skip

        class Grow(RunCallbacks):  # a second reading worker joins when the first tile is done
            def tile_done(self, tile, stats):
                if len(grown.scheduler_info(n_workers=-1)["workers"]) < 2:
                    cluster.scale(2)
                    grown.wait_for_workers(2, timeout=120)

        with caplog.at_level(logging.INFO, logger="treesits_dask"):
            run(config(tmp_path / "b"), client=grown, callbacks=Grow())
    # two tiles on one worker (2 tiles in flight beyond it: a budget for a tile read alone), the
    # third on two (no more tiles in flight than reading workers: none)
    assert started == [(1, 1, False), (1, 1, False), (2, 2, True)]
    assert "reading workers: 2, were 1: read budgets derived again" in caplog.text
    _assert_same_maps(tmp_path / "a", tmp_path / "b")


def test_a_worker_that_does_not_answer_the_set_up_is_left_out_of_the_read_budgets(
    small_cube, native_lstm, tmp_path, client, monkeypatch
):
    """A worker lost as a run sets up, after the set-up listed the workers and before it asked
    them for their free disk (the scheduler has not noticed yet), does not answer (one of the
    test's two answers dropped here): the tiles that start first are planned with the workers
    that answered, their threads and disk, not with the lost one's threads and no disk (the least
    free disk of the reading workers, which made the plans count on no spilling)."""
    from treesits_dask.pipeline import schedule

    answers = schedule.worker_disks

    def one_lost(client, workers=None):
        disks = answers(client, workers)
        assert len(disks) == 2
        return dict(sorted(disks.items())[:1])

    started = []
    submit = schedule._Scheduler.submit

    def recorded(self, tile):
        started.append(self.reads)
        submit(self, tile)

    monkeypatch.setattr(schedule, "worker_disks", one_lost)
    monkeypatch.setattr(schedule._Scheduler, "submit", recorded)
    config = _window_config(small_cube, native_lstm, tmp_path / "out")
    result = run(config.model_copy(update={"window": "60x60"}), client=client)
    assert set(result.tiles) == set(small_cube.tiles) and not result.failed
    assert len(started) == 2
    assert all(r.threads == 1 and r.spill_bytes > 0 for r in started), started


def test_a_tile_that_decodes_less_alone_is_read_with_no_other_tile_beside_it(
    native_lstm, tmp_path, client, monkeypatch, caplog
):
    """Where ``tiles_in_flight`` gives a reading worker more than one tile (4 tiles on the test's 2
    workers) and a tile's share of a worker (half) would have it read in sections, decoding each
    strip twice, where the whole worker's budget reads it in full-width bands: the tile is read
    with the whole worker's budget and no more tiles in flight than reading workers while it is,
    says so, and maps the same values."""
    import dataclasses
    import logging

    from treesits_dask.io.bands import plan_reads
    from treesits_dask.pipeline import reading, schedule
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.synthetic import make_cube

    names = ("X0069_Y0043", "X0070_Y0043", "X0071_Y0043")
    cube = make_cube(tmp_path / "cube", tiles=names, size=300, n_scenes=5, layout="strips", seed=4,
                     mask_dir=str(tmp_path / "masks"))  # fmt: skip

    def config(out, **kw):
        return _window_config(cube, native_lstm, out).model_copy(update=kw)

    t = make_plan(config(tmp_path / "a")).tiles[0]
    run(config(tmp_path / "a"), client=client)
    held = plan_reads(t.grid, t.reading, len(t.scenes), 1 << 40).held
    per_window = t.reading.shape[0] * t.reading.shape[1] * t.grid.count * 2 * len(t.scenes)
    budget = reading.read_budget

    def halved(cfg, *args, **kwargs):  # a tile's share: 4 bands fit with 2 tiles per worker only
        got = budget(cfg, *args, **kwargs)
        memory = held * 7 // 10 if cfg.tiles_in_flight > 2 else held * 2
        return dataclasses.replace(got, task_bytes=per_window, held_bytes=memory,
                                   spill_bytes=None, in_memory_bytes=memory)  # fmt: skip

    monkeypatch.setattr(schedule, "read_budget", halved)
    monkeypatch.setattr(reading, "read_budget", halved)
    shared, whole = (
        halved(config(tmp_path, tiles_in_flight=n), {}, schedule.Routing()) for n in (4, 2)
    )
    assert (tile_plan := reading.tile_read_plan(t, shared)).sections == 2 and not tile_plan.gate
    assert reading.tile_read_plan(t, whole).sections == 1
    assert reading.read_alone(t, shared, whole) and not reading.read_alone(t, whole, whole)
    in_flight = []
    submit = schedule._Scheduler.submit

    def counted(self, tile):
        submit(self, tile)
        in_flight.append(len(self.state))

    monkeypatch.setattr(schedule._Scheduler, "submit", counted)
    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        run(config(tmp_path / "b", tiles_in_flight=4), client=client)
    for name in names:
        assert (
            f"tile {name}: read with no other tile beside it on its reading worker" in caplog.text
        )
    assert "decode 2.00 times what it decodes with the whole worker's" in caplog.text
    assert "sections of whole window columns" not in caplog.text
    assert len(in_flight) == 3 and max(in_flight) <= 2  # the reading workers, not 4
    _assert_same_maps(tmp_path / "a", tmp_path / "b")


def test_a_cube_kept_up_to_date_across_force_versions_maps_what_one_layout_maps(
    native_lstm, tmp_path, client, caplog
):
    """A tile read by a first run in FORCE < 3.8 strips, then grown by scenes that a newer FORCE
    wrote as COGs (the same pixels): the second run finds the new scenes' layout in the headers it
    checks and the older ones' by reading theirs again, reads each layout in blocks of its own
    (the plan counts each block once, where one plan for all, the strips', decodes the COGs'
    blocks more than 1.5 times), says so, and maps what a run over the same scenes all in strips
    maps."""
    import dataclasses
    import logging

    from tests.two_layouts import to_cogs, two_layouts
    from treesits_dask.io.bands import plan_reads, planned_decode
    from treesits_dask.pipeline.plan import make_plan

    cubes, folder = two_layouts(tmp_path)
    grown = folder.parent
    newest = sorted(folder.glob("*_SEN2?_BOA.tif"))[-3:]
    for boa in newest:
        for name in (boa.name, boa.name.replace("_BOA", "_QAI")):
            (folder / name).unlink()

    def config(root, out):
        return load_config(
            overrides=dict(cube=str(root), tiles="all", output=str(out), model=native_lstm,
                           window="100x100", mask_dir=cubes["strips"].mask_dir, cog=False),
            environ={},
        )  # fmt: skip

    run(config(grown, tmp_path / "map"), client=client)
    to_cogs(cubes, folder, [boa.name for boa in newest])  # the newer FORCE's, same scenes
    plan = make_plan(config(grown, tmp_path / "map"))
    (tile,) = plan.tiles
    assert [s.block_shape for s in tile.scenes] == [(30, 300)] * 6 + [(256, 256)] * 3
    assert tile.grid.block_shape == (30, 300)
    (summary,) = plan.summary()["tiles"]
    assert summary["file_blocks"] == {"30x300": 6, "256x256": 3}
    assert summary["read"]["decoded_over_tile"] <= 1.0
    assert "256 x 256 px blocks in bands" in summary["read"]["mode"]
    one = plan_reads(tile.grid, tile.reading, 9, 1 << 40)  # one plan for all, the strips'
    cog = dataclasses.replace(tile.grid, block_shape=(256, 256))
    assert planned_decode(cog, tile.reading, one, 3) > 1.5 * 3 * 300 * 300 * 10 * 2
    with caplog.at_level(logging.INFO, logger="treesits_dask.io.cube"):
        run(config(grown, tmp_path / "map"), client=client)
    assert "6 scenes in 30 x 300 px blocks, 3 in 256 x 256, each read in blocks of its own" in (
        caplog.text
    )
    run(config(cubes["strips"].root, tmp_path / "reference"), client=client)
    _assert_same_maps(tmp_path / "map", tmp_path / "reference")


def test_the_file_layout_of_scenes_not_opened_again_comes_from_the_tile_record(
    native_lstm, tmp_path, client, monkeypatch
):
    """A tile mapped from FORCE < 3.8 strips, whose oldest and newest scenes a newer FORCE then
    wrote again as COGs (the same pixels): the next run opens only those two scenes' headers
    (the others are unchanged since the tile's record), and the record keeps every scene's block
    shape, so the run still finds the two layouts (the first and the newest scene alone would
    show COGs only, and the strips would be read in COG blocks) and maps what the strips map.  A
    third run opens no scene header at all and finds them again; a record written before block
    shapes were kept knows no scene."""
    from tests.two_layouts import to_cogs, two_layouts
    from treesits_dask.io import cube as cube_module
    from treesits_dask.io import layouts
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.state import ledger

    cubes, folder = two_layouts(tmp_path)
    grown = folder.parent

    def config(root, out):
        return load_config(
            overrides=dict(cube=str(root), tiles="all", output=str(out), model=native_lstm,
                           window="100x100", mask_dir=cubes["strips"].mask_dir, cog=False),
            environ={},
        )  # fmt: skip

    run(config(grown, tmp_path / "map"), client=client)
    (record,) = MapRepo(str(tmp_path / "map")).records().values()
    assert record["blocks"] == {"shape": [30, 300], "others": {}}
    names = [s["name"] for s in record["fingerprint"]["scenes"]]
    assert ledger.known_scenes(record, record["fingerprint"]) == dict.fromkeys(names, (30, 300))
    older = {k: v for k, v in record.items() if k != "blocks"}
    assert ledger.known_scenes(older, record["fingerprint"]) == {}

    reprocessed = [names[0], names[-1]]
    to_cogs(cubes, folder, reprocessed)  # the newer FORCE's COGs of the same scenes
    opened = []
    real_open = cube_module.open_raster
    monkeypatch.setattr(
        cube_module, "open_raster", lambda url: opened.append(url) or real_open(url)
    )
    monkeypatch.setattr(layouts, "block_shape_of", lambda url: pytest.fail(f"read again: {url}"))

    def planned():
        opened.clear()
        (tile,) = make_plan(config(grown, tmp_path / "map"), skip_done=False).tiles
        assert [s.block_shape for s in tile.scenes] == [(256, 256)] + [(30, 300)] * 7 + [(256, 256)]
        assert tile.grid.block_shape == (30, 300)
        return sorted(u.rsplit("/", 1)[-1].replace("_QAI", "_BOA") for u in opened)

    assert planned() == sorted(reprocessed * 2)  # BOA and QAI of the two, no other scene
    run(config(grown, tmp_path / "map"), client=client)
    run(config(cubes["strips"].root, tmp_path / "reference"), client=client)
    _assert_same_maps(tmp_path / "map", tmp_path / "reference")
    (record,) = MapRepo(str(tmp_path / "map")).records().values()
    assert record["blocks"] == {
        "shape": [30, 300], "others": dict.fromkeys(reprocessed, [256, 256])
    }  # fmt: skip
    assert planned() == []


@pytest.mark.parametrize(
    "layout,size,window,chunk,chunks,windows",
    [
        ("cog", 500, "250x250", (256, 256), ((256, 244), (256, 244)), 4),
        # windows smaller than the blocks: chunks of whole blocks where they fit the workers
        ("cog", 500, "100x100", (256, 256), ((256, 244), (256, 244)), 25),
        ("strips", 600, "100x300", (120, 300), ((120,) * 5, (300, 300)), 12),
    ],
)
def test_windows_that_cut_blocks_are_read_and_predicted_in_whole_blocks(
    native_lstm, tmp_path, client, layout, size, window, chunk, chunks, windows
):
    """A COG tile of 256 px blocks in 250 px windows (the map's chunks) or in 100 px windows (which
    the chunks of whole blocks hold), a striped tile of 60-row strips in 100-row windows: the plan
    reads and predicts each in chunks of whole blocks (COG:
    each decoded once, by one task; strips: each band of strips is one row of chunks, so its
    pieces are whole chunks), and the outputs, rechunked to the windows, equal the kernel applied
    to the whole tile in one piece (forest mask included)."""
    from treesits_dask.io.bands import plan_reads
    from treesits_dask.io.cube import days_since_epoch
    from treesits_dask.models import ModelSpec, load_model
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.synthetic import make_cube

    cube = make_cube(tmp_path / "cube", size=size, n_scenes=5, layout=layout, seed=4,
                     mask_dir=str(tmp_path / "masks"))  # fmt: skip
    tile = cube.tiles[0]
    out = tmp_path / "out"
    config = load_config(
        overrides=dict(cube=cube.root, tiles="all", output=str(out), model=native_lstm,
                       window=window, qai="none", mask_dir=cube.mask_dir, cog=False),
        environ={},
    )  # fmt: skip
    plan = make_plan(config)
    (t,) = plan.tiles
    assert t.reading.shape == chunk and t.reading.chunks == chunks
    assert plan.summary()["tiles"][0]["read_chunk"] == list(chunk)
    run(config, client=client)

    scenes = discovery.scene_table(cube.root, tile)
    block = np.array([rasterio.open(s.boa).read() for s in scenes])
    with rasterio.open(tmp_path / "masks" / tile / "mask.tif") as src:
        forest = src.read(1) > 0
    assert 0 < forest.mean() < 1
    predictor = load_model(ModelSpec(native_lstm, "native"), device="cpu")
    direct = predict.predict_block(
        block, forest, days_since_epoch([s.date for s in scenes]), predictor
    )
    ds = open_map(str(out))
    assert ds.sizes["x"] == ds.sizes["y"] == size
    assert ds.probability.encoding["chunks"][-2:] == tuple(map(int, window.split("x")))
    np.testing.assert_allclose(ds.probability.values, direct["probability"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ds["class"].values, direct["class"])
    np.testing.assert_array_equal(ds.valid_obs.values, direct["valid_obs"])
    summary = json.loads((out / "run.json").read_text())
    assert summary["tiles"][tile]["windows"] == windows
    reads = plan_reads(t.grid, t.reading, len(t.scenes), 1 << 30, min_tasks=2)
    if layout == "cog":  # each chunk of whole blocks read once, by tasks of a window row each
        assert reads.aligned and reads.groups == (((0, 0), (0, 1)), ((1, 0), (1, 1)))
    else:  # a band per row of chunks, whose pieces are the chunks whole
        assert [(b.row_off, b.height) for b in reads.bands] == [
            (r, 120) for r in range(0, 600, 120)
        ]
        for b in reads.bands:
            assert {(p.i, p.band_rows, p.window_rows) for p in b.pieces} == {
                (b.index, (0, 120), (0, 120))
            }
