"""Streamed tiles: a one-way LSTM run over the scenes batch by batch, its state carried
(pipeline.streaming), maps what it maps over all scenes at once, decoding every block once where
the bands of all scenes fit neither memory nor disk."""

from __future__ import annotations

import dataclasses
import functools
import logging
import re

import numpy as np
import pytest
import torch

from treesits_dask.api import open_map
from treesits_dask.config import load_config
from treesits_dask.io.bands import ReadPlan, plan_reads
from treesits_dask.models import ModelCard
from treesits_dask.models.architectures import LSTMClassifier
from treesits_dask.models.loading import Predictor
from treesits_dask.pipeline.run import run

BANDS = ["BLUE", "GREEN", "RED", "REDEDGE1", "REDEDGE2", "REDEDGE3", "BROADNIR", "NIR", "SWIR1",
         "SWIR2"]  # fmt: skip


def _lstm(layers: int = 2, bidirectional: bool = False) -> Predictor:
    torch.manual_seed(3)
    hp = {"num_bands": 10, "input_size": 12, "hidden_size": 20, "num_layers": layers,
          "num_classes": 4, "bidirectional": bidirectional}  # fmt: skip
    module = LSTMClassifier(**hp).eval()
    with torch.no_grad():  # a head whose BatchNorm is not the identity
        module.fc[2].running_mean.uniform_(-0.5, 0.5)
        module.fc[2].running_var.uniform_(0.5, 2.0)
    card = ModelCard(family="sits-lstm", hyperparameters=hp, bands=BANDS,
                     class_names=["a", "b", "c", "d"], output_kind="softmax",
                     sequence={"kind": "full"})  # fmt: skip
    return Predictor(module, card)


def test_stream_steps_give_the_result_over_the_whole_series():
    """Three steps over parts of 7, 9 and 7 scenes give the probabilities of one forward over all
    23 (raw values, invalid observations 0, zero initial state)."""
    rng = np.random.default_rng(0)
    n, t = 700, 23  # more than one CPU call of 512 pixels
    series = rng.integers(0, 6000, (n, t, 10)).astype(np.int16)
    valid = rng.random((n, t)) > 0.4
    valid[:, 0] = True
    series[~valid] = -9999
    days = np.arange(t, dtype=np.int64) * 5 + 19000
    predictor = _lstm()
    assert predictor.streams
    whole, _ = predictor.predict(series, valid, days)
    state = predictor.stream_state(n)
    assert state.shape == (2, 2, n, 20) and not state.any()
    for lo, hi in ((0, 7), (7, 16), (16, 23)):
        state = predictor.stream_step(state, series[:, lo:hi], valid[:, lo:hi], days[lo:hi])
    parts, used = predictor.stream_probs(state, np.arange(n))
    np.testing.assert_allclose(parts, whole, rtol=0, atol=2e-6)
    assert used is None  # every valid observation
    some, _ = predictor.stream_probs(state, np.arange(1, n, 3))
    np.testing.assert_array_equal(some, parts[1::3])
    # one step of no scenes changes nothing
    again = predictor.stream_step(state, series[:, :0], valid[:, :0], days[:0])
    np.testing.assert_array_equal(again, state)


def test_only_a_one_way_lstm_streams():
    """... and a streamed pixel's state is its (h, c) per layer as float32 and 25 bytes of its
    counts (1049 bytes for the published 2-layer, 64-wide LSTM)."""
    assert _lstm().card.stream_state_bytes == 2 * 2 * 20 * 4 + 25
    assert not _lstm(bidirectional=True).streams
    assert _lstm(bidirectional=True).card.stream_state_bytes == 0
    hp = {"num_bands": 10, "num_classes": 2, "d_model": 8, "nhead": 2, "num_layers": 1,
          "dim_feedforward": 16}  # fmt: skip
    card = ModelCard(family="sits-transformer", bands=BANDS, class_names=["a", "b"],
                     output_kind="softmax", sequence={"kind": "full"},
                     hyperparameters=hp)  # fmt: skip
    assert not card.streams


def test_plan_streams_only_the_tiles_whose_bands_are_not_held(tmp_path):
    """``auto`` streams a tile whose bands of all scenes would spill or be read in sections, in
    batches within half a read task's budget, and keeps one whose bands fit memory as it is;
    ``always`` streams both; ``never`` neither."""
    from treesits_dask.io import discovery
    from treesits_dask.io.cube import tile_grid
    from treesits_dask.io.grid import WindowLayout, read_shape
    from treesits_dask.synthetic import make_cube

    cube = make_cube(tmp_path / "cube", size=600, n_scenes=8, layout="strips", seed=4)
    definition = discovery.read_cube_definition(str(cube.root))
    scenes = discovery.scene_table(str(cube.root), "X0069_Y0043")
    grid = tile_grid(definition, scenes[0])
    layout = WindowLayout.of(grid, read_shape(grid, (100, 100)))  # 120 px: whole 60-row strips
    n = len(scenes)
    held = plan_reads(grid, layout, n, 1 << 40).held
    per_scene = 100 * grid.width * grid.count * 2
    for stream, tight, fits in (("auto", True, False), ("always", True, True),
                                ("never", False, False)):  # fmt: skip
        small = plan_reads(grid, layout, n, 3 * per_scene, held_bytes=held // 2, stream=stream)
        big = plan_reads(grid, layout, n, 3 * per_scene, held_bytes=held, stream=stream)
        assert small.stream is tight and big.stream is fits
    streamed = plan_reads(grid, layout, n, 3 * per_scene, held_bytes=0, stream="auto")
    # read and stepped in its layout's windows, one band high already (2 strips of 60 rows): a
    # group of one band each, batches of one scene (a band's scene is more than half the task's
    # budget)
    assert streamed.windows == layout
    assert streamed.band_groups() == tuple((b.index,) for b in streamed.bands)
    assert [stop - start for start, stop in streamed.batches] == [1] * n
    assert streamed.held == 0 and not streamed.spills and streamed.sections == 1
    # the states of its two largest groups at once: 2 x 120 rows of 600 px
    assert streamed.states_bytes(600, 153) == 2 * 120 * 600 * 153
    # 100 px windows, whose rows cross the bands of two strips, read as they are, tie 300 rows
    # together; streamed in windows one band high (120 x 100 px), they tie none (states of 2 x
    # 120 rows, not of 2 x 300)
    crossing = WindowLayout.of(grid, (100, 100))
    held_so = plan_reads(grid, crossing, n, 1 << 40)
    assert [len(g) for g in held_so.band_groups()] == [3, 3]
    crossed = plan_reads(grid, crossing, n, 1, stream="always")
    assert crossed.windows == WindowLayout.of(grid, (120, 100))
    assert [(b.row_off, b.height) for b in crossed.bands] == [(r, 120) for r in range(0, 600, 120)]
    assert crossed.band_groups() == tuple((b.index,) for b in crossed.bands)
    assert crossed.states_bytes(600, 100) == 2 * 120 * 600 * 100


def _config(cube, model, out, stream, window="100x100", uncertainty=("entropy", "margin")):
    return load_config(
        overrides=dict(cube=cube.root, tiles="all", output=str(out), model=model,
                       window=window, mask_dir=cube.mask_dir, cog=False, stream=stream,
                       uncertainty=list(uncertainty)),
        environ={},
    )  # fmt: skip


def _cut_budget(monkeypatch, t) -> None:
    """Runs read tile ``t`` with one window of all scenes per read task, 60 % of its bands' memory
    and no disk: its bands fit neither (read in 2 sections without streaming)."""
    from treesits_dask.pipeline import schedule

    held = plan_reads(t.grid, t.reading, len(t.scenes), 1 << 40).held
    per_window = t.reading.shape[0] * t.reading.shape[1] * t.grid.count * 2 * len(t.scenes)
    budget = schedule.read_budget

    def small(*args, **kwargs):
        got = budget(*args, **kwargs)
        return dataclasses.replace(got, task_bytes=per_window, held_bytes=int(held * 0.6),
                                   spill_bytes=None)  # fmt: skip

    monkeypatch.setattr(schedule, "read_budget", small)


def _decoded_here() -> int:
    from treesits_dask.io.datasets import DECODED

    return DECODED.snapshot()[1]


def _decoded(client) -> int:
    """Bytes the workers decoded so far."""
    return sum(client.run(_decoded_here).values())


@pytest.fixture(scope="module")
def striped(tmp_path_factory):
    """The 600 px tile of 7 scenes in 60-row strips, with a mask, that several tests stream
    (none changes it)."""
    from treesits_dask.synthetic import make_cube

    root = tmp_path_factory.mktemp("striped")
    return make_cube(root / "cube", size=600, n_scenes=7, layout="strips", seed=4,
                     mask_dir=str(root / "masks"))  # fmt: skip


@pytest.fixture(scope="module")
def held_run(client, tmp_path_factory):
    """``held_run(config)``: the run of ``config`` (on the module's cluster, before a test cuts
    its budgets), its output folder and the bytes the workers decoded for it, made once for the
    module (the tests that compare a streamed run with the same run that holds its bands share
    it).  ``config``'s output is replaced by one of the module's own."""
    done: dict[str, tuple] = {}
    root = tmp_path_factory.mktemp("held")

    def held(config) -> tuple[str, int]:
        key = config.model_copy(update={"output": "", "scheduler_address": None}).model_dump_json()
        if key not in done:
            out = str(root / f"run{len(done)}")
            before = _decoded(client)
            run(config.model_copy(update={"output": out}), client=client)
            done[key] = (out, _decoded(client) - before)
        return done[key]

    return held


@pytest.mark.parametrize("stream", ["auto", "always"])
def test_a_streamed_tile_maps_the_values_of_one_read_over_all_scenes(
    native_lstm, striped, held_run, tmp_path, client, monkeypatch, caplog, stream
):
    """A striped tile whose bands of all scenes fit neither the reading workers' memory nor
    their disk (the budget cut to 60 % of what its bands hold, no disk: read in 2 sections
    without streaming, decoding its strips twice) is streamed under ``auto`` (and ``always``),
    in batches of scenes: it decodes what a run that holds its bands decodes (each block once),
    against about twice that read in sections, and maps the same values (probabilities to float
    rounding) on the test's LocalCluster."""
    from treesits_dask.pipeline.plan import make_plan

    cube = striped
    (t,) = make_plan(_config(cube, native_lstm, tmp_path / "a", "never")).tiles
    assert t.stream == "never"
    held, whole = held_run(_config(cube, native_lstm, tmp_path / "a", "never"))
    _cut_budget(monkeypatch, t)
    if stream == "auto":
        before = _decoded(client)
        run(_config(cube, native_lstm, tmp_path / "s", "never"), client=client)
        sections = _decoded(client) - before
        assert sections > 1.5 * whole  # the full-width strips decoded once per section
    (t,) = make_plan(_config(cube, native_lstm, tmp_path / "b", stream)).tiles
    assert t.stream == stream
    before = _decoded(client)
    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        run(_config(cube, native_lstm, tmp_path / "b", stream), client=client)
    assert _decoded(client) - before == whole
    assert f"tile {t.tile}: streamed through the model in " in caplog.text
    assert "sections" not in caplog.text.split(f"tile {t.tile}: streamed")[1]
    a, b = open_map(held), open_map(str(tmp_path / "b"))
    assert a.probability.notnull().any()
    np.testing.assert_allclose(b.probability.values, a.probability.values, rtol=0, atol=1e-5)
    for var in ("class", "valid_obs", "last_obs_valid", "last_valid_date"):
        np.testing.assert_array_equal(b[var].values, a[var].values, err_msg=var)
    for var in ("entropy", "margin"):  # the uncertainty layers of the same probabilities
        assert a[var].notnull().any(), var
        np.testing.assert_allclose(b[var].values, a[var].values, rtol=0, atol=1e-4, err_msg=var)


def test_a_streamed_graph_bounds_the_batches_its_reads_run_ahead(tmp_path):
    """The graph of a streamed tile: per band and batch one read, per run of windows and batch
    one step (at least ``ahead`` runs per unit where the tile has as many windows, not one per
    window), and the reads of each unit from the ``ahead``-th on wait for the gate of the unit
    ``ahead`` before them, which waits for that unit's steps: a tile holds at most ``ahead``
    units of batches its steps have not taken."""
    from dask.core import get_dependencies

    from treesits_dask.io import discovery
    from treesits_dask.io.cube import days_since_epoch, tile_grid
    from treesits_dask.io.grid import WindowLayout
    from treesits_dask.io.reader import WindowReader
    from treesits_dask.models import ModelSpec
    from treesits_dask.outputs.schema import Packing
    from treesits_dask.pipeline.predict import Inference
    from treesits_dask.pipeline.streaming import Kernel, stream_layer

    cube = make_cube_once(tmp_path)
    definition = discovery.read_cube_definition(str(cube.root))
    scenes = discovery.scene_table(str(cube.root), "X0069_Y0043")
    grid = tile_grid(definition, scenes[0])
    layout = WindowLayout.of(grid, (60, 50))  # 12 windows per row
    plan = plan_reads(grid, layout, len(scenes), 1, stream="always")  # one scene per batch
    assert plan.windows == layout and len(plan.bands) == 10  # a window row per 60-row strip
    kernel = Kernel(ModelSpec("unused.pt", "native"), "cpu", Inference(), Packing(3))
    days = days_since_epoch([s.date for s in scenes])
    reader = WindowReader.of_scenes(grid, scenes)
    arr = stream_layer(reader, layout, plan, days, kernel, ahead=3)
    dsk = dict(arr.__dask_graph__())
    kinds: dict[str, list] = {}
    for key in dsk:
        kinds.setdefault(key[0].split("-X0069")[0], []).append(key)
    units = len(plan.bands) * len(plan.batches)  # a group per band (one window row each)
    assert len(kinds["read-band-stream"]) == units
    assert len(kinds["stream-step"]) == 3 * units  # 3 runs of 4 windows per unit
    assert len(kinds["stream"]) == 10 * 12  # the outputs: one per window
    gates = sorted(kinds["stream-gate"])
    order = [(b, s) for b in range(len(plan.bands)) for s in range(len(plan.batches))]
    for u, (b, s) in enumerate(order):
        read = next(k for k in kinds["read-band-stream"] if k[1:] == (b, s))
        waits = [d for d in get_dependencies(dsk, read) if d[0].startswith("stream-gate")]
        assert waits == ([gates[u - 3]] if u >= 3 else []), (u, waits)
    steps_of_gate = get_dependencies(dsk, gates[0])
    assert len(steps_of_gate) == 3 and all(d[0].startswith("stream-done") for d in steps_of_gate)

    # a group read in one batch (a stage of a few scenes) is stepped in one run: its units do not
    # wait on one another, so runs would only add tasks
    whole = plan_reads(grid, layout, len(scenes), 1 << 40, stream="always")
    assert len(whole.batches) == 1 and len(whole.bands) == 10
    dsk = dict(stream_layer(reader, layout, whole, days, kernel, ahead=3).__dask_graph__())
    steps = [k for k in dsk if k[0].startswith("stream-step")]
    assert len(steps) == len(whole.bands)


def make_cube_once(tmp_path):
    from treesits_dask.synthetic import make_cube

    return make_cube(tmp_path / "cube", size=600, n_scenes=4, layout="strips", seed=4)


def test_a_worker_gives_back_the_memory_its_allocator_keeps_only_above_its_target():
    """give_back_memory trims glibc's heaps where the process holds more than Dask's target
    share of its memory limit, and leaves them alone below it."""
    from types import SimpleNamespace

    from treesits_dask.pipeline import predict

    if not predict.tune_malloc():
        pytest.skip("glibc's malloc is not there to tune (not Linux)")
    rss = [0]

    def worker(limit):
        manager = SimpleNamespace(memory_limit=limit, memory_target_fraction=0.6)
        monitor = SimpleNamespace(get_process_memory=lambda: rss[0])
        return SimpleNamespace(memory_manager=manager, monitor=monitor)

    rss[0] = 500
    before = predict.TRIMMED[0]
    assert not predict.give_back_memory(worker(1000))  # 50 % of its limit
    assert not predict.give_back_memory(worker(None))  # no limit: Dask pauses nothing
    rss[0] = 700
    assert predict.give_back_memory(worker(1000)) and predict.TRIMMED[0] == before + 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("model", ["native_lstm", "native_sbert"])
def test_a_worker_killed_mid_stream_leaves_the_map_of_a_run_without_it(model, tmp_path, request):
    """A streamed tile whose worker is killed (SIGKILL) once a third of its steps are done: the
    states it held are lost, Dask computes them again from their reads (the steps, picks, gates
    and reads of earlier batches), and the run finishes with the map of the same run without the
    kill (every variable, probabilities exactly: the same steps in the same order).  SBERT's
    steps update their state in place: a state lost or moved is computed again or copied, never
    stepped twice."""
    import os
    import signal
    import threading
    import time

    from treesits_dask.pipeline.cluster import connect
    from treesits_dask.synthetic import make_cube

    cube = make_cube(tmp_path / "cube", size=300, n_scenes=24, layout="strips", seed=4)
    path = request.getfixturevalue(model)

    def config(out):  # 3 MiB per read task: 12 batches of 2 scenes
        return load_config(
            overrides=dict(cube=cube.root, tiles="all", output=str(tmp_path / out),
                           model=path, window="100x100", cog=False, stream="always",
                           read_memory=0.002, workers=2, threads_per_worker=1,
                           memory_limit="1.5GiB", dashboard_address=":0"),
            environ={},
        )  # fmt: skip

    def steps(dask_scheduler) -> tuple[int, int]:
        names = [(str(k[0] if isinstance(k, tuple) else k), ts.state)
                 for k, ts in dask_scheduler.tasks.items()]  # fmt: skip
        mine = [state for name, state in names if name.startswith("stream-step-")]
        return sum(s in ("memory", "released", "forgotten") for s in mine), len(mine)

    with connect(config("a")) as client:
        run(config("a"), client=client)
        killed: list = []

        def kill_at_a_third():
            deadline = time.monotonic() + 120
            while not killed and time.monotonic() < deadline:
                done, total = client.run_on_scheduler(steps)
                if total and done >= total // 3:
                    pids = client.run(os.getpid)
                    os.kill(pids[max(pids)], signal.SIGKILL)
                    killed.append((done, total))
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_at_a_third, daemon=True)
        killer.start()
        result = run(config("b"), client=client)
        killer.join(timeout=10)
    assert killed, "the worker was never killed"
    done, total = killed[0]
    assert total >= 12 and done < total, f"killed after {done} of {total} steps, not mid-stream"
    assert not result.failed
    a, b = open_map(str(tmp_path / "a")), open_map(str(tmp_path / "b"))
    assert a.probability.notnull().any() and {"valid_obs", "last_valid_date"} <= set(a.data_vars)
    for var in a.data_vars:  # the SBERT map (binary) has no class
        np.testing.assert_array_equal(b[var].values, a[var].values, err_msg=var)


def test_a_streamed_tile_is_stepped_in_windows_one_band_high_of_bounded_pixels():
    """Whatever the map's windows, a streamed tile's windows tie no bands together and hold at
    most STREAM_WINDOW_PIXELS, so that a tile holds two bands' states and a step a bounded state:
    the map's windows where they are so, else windows one band high (whole block rows, at least
    min(window height, BAND_ROWS)) as wide as the map's (a COG's: whole blocks), or that width
    cut in equal parts."""
    from treesits_dask.io.bands import BAND_ROWS, STREAM_WINDOW_PIXELS, stream_windows
    from treesits_dask.io.grid import TileGrid, WindowLayout

    def grid(block):
        return TileGrid("X0069_Y0043", "", (0, 10, 0, 0, 0, -10), 3000, 3000, block, 10)

    strips, cog, rows = grid((300, 3000)), grid((256, 256)), grid((1, 3000))
    cases = [(strips, (1000, 1000), (300, 500)), (strips, (200, 200), (300, 200)),
             (strips, (250, 250), (300, 250)), (strips, (100, 100), None),
             (cog, (1000, 1000), (256, 1024)), (cog, (250, 250), (256, 256)),
             (cog, (100, 100), (256, 256)),
             (rows, (100, 100), None), (rows, (500, 500), (BAND_ROWS, 500))]  # fmt: skip
    for g, window, expected in cases:
        layout = WindowLayout.of(g, window)
        plan = plan_reads(g, layout, 600, 1 << 28, stream="always")
        assert plan.stream
        if expected is None:  # the map's windows tie no bands together: kept
            assert plan.windows == layout, (g.block_shape, window)
        else:
            assert plan.windows == stream_windows(g, layout), (g.block_shape, window)
            assert plan.windows.shape == expected, (g.block_shape, window, plan.windows.shape)
        assert plan.windows.shape[0] * plan.windows.shape[1] <= STREAM_WINDOW_PIXELS
        assert plan.band_groups() == tuple((b.index,) for b in plan.bands)
    # strip windows of all scenes: each band is a whole window, whose read is the window itself
    whole = plan_reads(strips, WindowLayout.of(strips, (300, 3000)), 600, 1 << 28, stream="always")
    assert not whole.stream and whole.windows is None
    assert stream_windows(strips, WindowLayout.of(strips, (300, 3000))).shape == (300, 750)


def test_a_tile_streamed_in_windows_of_its_own_maps_the_values_of_one_read_over_all_scenes(
    native_lstm, striped, held_run, tmp_path, client
):
    """The map's 300 x 300 px windows on 60-row strips tie two bands (180 and 120 rows) together;
    streamed, the tile is stepped in windows one band high (180 x 300 px) instead, its mask
    opened in them and its outputs rechunked to the map's windows: it decodes what the run that
    holds its bands decodes (each block once) and maps the same values."""
    from treesits_dask.pipeline.plan import make_plan

    cube = striped
    (t,) = make_plan(_config(cube, native_lstm, tmp_path / "a", "always", "300x300")).tiles
    held = plan_reads(t.grid, t.reading, len(t.scenes), 1 << 40)
    assert t.reading.shape == (300, 300) and [len(g) for g in held.band_groups()] == [2, 2]
    streamed = plan_reads(t.grid, t.reading, len(t.scenes), 1 << 20, stream="always")
    assert streamed.windows.shape == (180, 300)
    ref, whole = held_run(_config(cube, native_lstm, tmp_path / "a", "never", "300x300"))
    before = _decoded(client)
    run(_config(cube, native_lstm, tmp_path / "b", "always", "300x300"), client=client)
    assert _decoded(client) - before == whole
    a, b = open_map(ref), open_map(str(tmp_path / "b"))
    assert a.probability.notnull().any() and a.probability.isnull().any()  # the mask's holes
    np.testing.assert_allclose(b.probability.values, a.probability.values, rtol=0, atol=1e-5)
    for var in ("class", "valid_obs", "last_obs_valid", "last_valid_date"):
        np.testing.assert_array_equal(b[var].values, a[var].values, err_msg=var)


@pytest.mark.parametrize("standing", [False, True], ids=["planned", "standing"])
def test_a_map_whose_series_outgrew_its_windows_goes_on_streamed(
    native_lstm, striped, held_run, tmp_path, client, monkeypatch, caplog, standing
):
    """A map's windows stay its own while its series grows. Made of 3 scenes in full-width
    windows of whole strips (60 x 600 px, read as one task of all scenes each), the tile gets 4
    new scenes, and now its windows of all scenes do not fit the inference workers (the share
    they may fill made tiny): the update is not refused but streamed through the model
    (``required``, planned where the settings say which workers and checked again on the
    cluster), in the map's own windows. It decodes what a run of all 7 scenes on roomy workers
    decodes (each block once) and maps its values. On a standing cluster (``standing``) the plan
    cannot know the workers, and the run streams the tile once it finds them."""
    import os
    import shutil
    from pathlib import Path

    from treesits_dask.io import discovery
    from treesits_dask.pipeline import memory
    from treesits_dask.pipeline.plan import make_plan

    cube = striped
    (tile,) = cube.tiles
    scenes = discovery.scene_table(cube.root, tile)
    growing = tmp_path / "growing"
    (growing / tile).mkdir(parents=True)
    shutil.copy(Path(cube.root) / "datacube-definition.prj", growing)

    def deliver(part):  # hard links: the same files, sizes and times
        for s in part:
            for path in (s.boa, s.qai):
                os.link(path, growing / tile / Path(path).name)

    def config(root, out):
        update = {"cube": str(root)}
        if standing:
            update["scheduler_address"] = client.scheduler.address
        return _config(cube, native_lstm, out, "auto", "60x600").model_copy(update=update)

    held, whole = held_run(config(cube.root, tmp_path / "a"))  # all scenes, windows held whole
    deliver(scenes[:3])
    run(config(growing, tmp_path / "b"), client=client)
    assert make_plan(config(growing, tmp_path / "b")).tiles == []  # up to date
    deliver(scenes[3:])
    monkeypatch.setattr(memory, "WINDOW_SHARE", 1e-9)
    (t,) = make_plan(config(growing, tmp_path / "b")).tiles
    assert t.stream == ("auto" if standing else "required") and len(t.scenes) == 7
    assert t.reading.shape == (60, 600)
    before = _decoded(client)
    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        run(config(growing, tmp_path / "b"), client=client)
    assert _decoded(client) - before == whole
    assert (
        f"tile {tile}: its windows of all 7 scenes (60x600 px) do not fit the inference workers; "
        "streamed through the model instead" in caplog.text
    )
    assert f"tile {tile}: streamed through the model in " in caplog.text
    a, b = open_map(held), open_map(str(tmp_path / "b"))
    assert a.probability.notnull().any() and a.probability.isnull().any()  # the mask's holes
    np.testing.assert_allclose(b.probability.values, a.probability.values, rtol=0, atol=1e-5)
    for var in ("class", "valid_obs", "last_obs_valid", "last_valid_date"):
        np.testing.assert_array_equal(b[var].values, a[var].values, err_msg=var)


# --- SBERT: the newest valid observations kept, batch by batch ----------------------------------


def _sbert_card(seq_len: int) -> ModelCard:
    from treesits_dask.models.card import SBERT_SEQUENCE

    hp = {"num_features": 10, "hidden": 16, "n_layers": 1, "attn_heads": 2, "dropout": 0.3,
          "num_classes": 1, "max_position": 1826}  # fmt: skip
    return ModelCard(family="sbert", hyperparameters=hp, bands=BANDS,
                     class_names=["disturbance"], output_kind="sigmoid",
                     sequence=dict(SBERT_SEQUENCE, seq_len=seq_len))  # fmt: skip


def _sbert(seq_len: int) -> Predictor:
    from treesits_dask.models.architectures import SBERTClassifier

    torch.manual_seed(5)
    card = _sbert_card(seq_len)
    return Predictor(SBERTClassifier(**card.hyperparameters).eval(), card)


@pytest.fixture(scope="module")
def native_sbert(tmp_path_factory) -> str:
    """A small native SBERT with random weights that keeps the newest 4 valid observations (the
    test cubes have 7 scenes and more: the ring of kept observations wraps)."""
    from treesits_dask.models import save_native

    predictor = _sbert(4)
    pt, _ = save_native(
        predictor.module, predictor.card, str(tmp_path_factory.mktemp("m") / "s.pt")
    )
    return pt


def test_sbert_stream_steps_give_the_result_over_the_whole_series():
    """SBERT's state is the newest ``seq_len`` valid observations of each pixel: kept over parts
    of 1, 6, 17 and 16 scenes (pixels with more valid ones than the 8 slots, fewer, none, one;
    a part with more than 8 valid ones), they give the probabilities and the observations used
    of one pass over all 40 scenes, also where the newest kept one is beyond the position table
    (its oldest ones dropped), and the state holds 8 observations whatever the scene count."""
    from treesits_dask.models.preprocess import sbert_kept

    rng = np.random.default_rng(1)
    n, t = 600, 40
    series = rng.integers(-300, 9000, (n, t, 10)).astype(np.int16)
    valid = rng.random((n, t)) < rng.uniform(0.02, 0.98, (n, 1))
    valid[0] = False  # none
    valid[1] = True  # every one
    valid[2] = False
    valid[2, 0] = True  # only the oldest
    valid[3] = False
    valid[3, [0, -1]] = True  # the oldest and the newest, 1900 days apart
    series[~valid] = -9999
    days = 18500 + np.sort(rng.choice(np.arange(1200), t, replace=False)).astype(np.int64)
    days[-1] = days[0] + 1900  # the newest scene is beyond a 1826-row table from the oldest
    predictor = _sbert(8)
    assert predictor.streams and predictor.card.stream_auto == "fallback"
    some = valid.any(axis=1)
    whole, used_whole = predictor.predict(series[some], valid[some], days)
    state = predictor.stream_state(n)
    for lo, hi in ((0, 1), (1, 7), (7, 24), (24, 40)):
        state = predictor.stream_step(state, series[:, lo:hi], valid[:, lo:hi], days[lo:hi])
    assert state["values"].shape == (n, 8, 10)
    np.testing.assert_array_equal(state["count"], valid.sum(axis=1))
    kept, kept_valid, kept_days = sbert_kept(state, [1, 2])
    np.testing.assert_array_equal(kept[0], series[1, -8:])  # every one: the newest 8
    np.testing.assert_array_equal(kept_days[0], days[-8:])
    assert kept_valid[1].sum() == 1 and kept_days[1, -1] == days[0] and not kept[1, :-1].any()
    probs, used = predictor.stream_probs(state, np.flatnonzero(some))
    np.testing.assert_allclose(probs, whole, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(used, used_whole)
    assert used[0] == 8 and used[2] == 1  # pixel 3's oldest dropped: beyond the table
    # a step of no scenes changes nothing
    before = {k: v.copy() for k, v in state.items()}
    state = predictor.stream_step(state, series[:, :0], valid[:, :0], days[:0])
    for key, value in before.items():
        np.testing.assert_array_equal(state[key], value, err_msg=key)


def test_a_windows_pixels_are_taken_from_its_pieces_as_from_the_window_put_together():
    """A step takes its pixels' series and validity straight from the window's pieces of a batch:
    the same as from the window put together (``assemble``), for all pixels in order, a mask's,
    pixels handed on in another order across two pieces, pieces that are views of a band, and a
    piece where nothing was read (nodata)."""
    from treesits_dask.io.reader import assemble
    from treesits_dask.pipeline.streaming import _pixel_series

    rng = np.random.default_rng(3)
    t, bands, h, w = 5, 10, 12, 9
    band = rng.integers(-50, 3000, (t, bands, h, 30)).astype(np.int16)
    band[rng.random(band.shape) < 0.05] = -9999  # one band invalid: the observation is
    band[np.broadcast_to((rng.random((t, h, 30)) < 0.4)[:, None], band.shape)] = -9999
    cases = {
        "all, contiguous": (((0, t, 0, h),), [np.ascontiguousarray(band[..., 3:12])],
                            np.arange(h * w)),
        "all, a view": (((0, t, 0, h),), [band[..., 3:12]], np.arange(h * w)),
        "a mask, a view": (((0, t, 0, h),), [band[..., 3:12]],
                           np.flatnonzero(rng.random(h * w) < 0.3)),
        "shuffled, two pieces": (((0, t, 0, 5), (0, t, 5, h)),
                                 [band[:, :, :5, 3:12], np.ascontiguousarray(band[:, :, 5:, 3:12])],
                                 rng.permutation(h * w)[:70]),
        "nothing read": (((0, t, 0, 5), (0, t, 5, h)), [None, band[:, :, 5:, 3:12]],
                         rng.permutation(h * w)),
    }  # fmt: skip
    for name, (where, pieces, idx) in cases.items():
        series, valid = _pixel_series((t, bands, h, w), idx, where, pieces)
        window = assemble((t, bands, h, w), None, where, pieces).reshape(t, bands, h * w)
        want = window[:, :, idx].transpose(2, 0, 1)
        assert series.dtype == np.int16 and series.flags.c_contiguous, name
        np.testing.assert_array_equal(series, want, err_msg=name)
        np.testing.assert_array_equal(valid, (want != -9999).all(axis=2), err_msg=name)
        assert (~valid).any() and valid.any(), name


def test_sbert_keeps_each_pixels_newest_valid_observations_in_its_ring():
    """``sbert_keep`` over batches of 0, 1, 5, 30 and 9 scenes leaves in each pixel's ring what a
    pixel-by-pixel loop puts there (its ``k``-th valid observation in slot ``k % seq_len``, the
    newest ``seq_len`` only), also in a state whose arrays are views of larger ones (their
    values kept, written to in the state), and refuses series of other bands."""
    from treesits_dask.errors import InputDataError
    from treesits_dask.models.preprocess import sbert_keep, sbert_state

    rng = np.random.default_rng(7)
    n, t, seq_len = 50, 45, 6
    series = rng.integers(-9999, 9000, (n, t, 10)).astype(np.int16)
    valid = rng.random((n, t)) < rng.uniform(0.0, 1.0, (n, 1))
    valid[:3] = False  # none, one, fewer than the slots
    valid[1, 20] = True
    valid[2, [3, 10, 40]] = True
    days = 18000 + np.arange(t, dtype=np.int64) * 3
    wide = sbert_state(2 * n, seq_len)
    wide["values"][1::2] = 77
    strided = {k: v[1::2] for k, v in wide.items()}  # not contiguous
    for state in (sbert_state(n, seq_len), strided):
        want = {k: v.copy() for k, v in state.items()}
        for p in range(n):
            for k, o in enumerate(np.flatnonzero(valid[p])):
                want["values"][p, k % seq_len] = series[p, o]
                want["days"][p, k % seq_len] = days[o]
            want["count"][p] = valid[p].sum()
        for lo, hi in ((0, 0), (0, 1), (1, 6), (6, 36), (36, 45)):
            state = sbert_keep(state, series[:, lo:hi], valid[:, lo:hi], days[lo:hi])
        assert (valid.sum(axis=1) > seq_len).any() and (valid.sum(axis=1) == 0).any()
        for key in ("values", "days", "count"):
            np.testing.assert_array_equal(state[key], want[key], err_msg=key)
    assert (strided["values"][~valid.any(axis=1)] == 77).all()
    with pytest.raises(InputDataError, match="bands"):
        sbert_keep(sbert_state(n, seq_len), series[:, :, :9], valid, days)


def test_sbert_streams_only_where_its_tile_would_decode_more_than_once(tmp_path):
    """SBERT's state (6 KB per pixel of 256 observations) is as large as a band of 308 scenes:
    its ``auto`` (``fallback``) streams a tile only where the plan that holds its bands would
    decode blocks more than once (in sections, no disk), not where they spill to a disk that
    holds them, nor where they fit memory, nor where its states would not fit the room given
    (an inference worker's share)."""
    from treesits_dask.io import discovery
    from treesits_dask.io.bands import planned_decode
    from treesits_dask.io.cube import tile_grid
    from treesits_dask.io.grid import WindowLayout, read_shape
    from treesits_dask.synthetic import make_cube

    assert _sbert_card(256).stream_state_bytes == 256 * (10 * 2 + 4) + 8 + 25
    cube = make_cube(tmp_path / "cube", size=600, n_scenes=8, layout="strips", seed=4)
    definition = discovery.read_cube_definition(str(cube.root))
    scenes = discovery.scene_table(str(cube.root), "X0069_Y0043")
    grid = tile_grid(definition, scenes[0])
    layout = WindowLayout.of(grid, read_shape(grid, (100, 100)))
    n = len(scenes)
    held = plan_reads(grid, layout, n, 1 << 40).held
    task = 100 * grid.width * grid.count * 2 * n  # a window row of all scenes
    fits = plan_reads(grid, layout, n, task, held_bytes=held, stream="fallback")
    to_disk = plan_reads(grid, layout, n, task, held_bytes=held // 2, spill_bytes=held,
                         stream="fallback")  # fmt: skip
    no_disk = plan_reads(grid, layout, n, task, held_bytes=held // 2, stream="fallback")
    without = plan_reads(grid, layout, n, task, held_bytes=held // 2)
    assert not fits.stream and not to_disk.stream and to_disk.spills
    assert no_disk.stream and not without.stream
    # ... where its states fit the room an inference worker has for them
    states = no_disk.states_bytes(grid.width, 6177)
    assert states == 2 * 120 * 600 * 6177  # two bands of 120 rows, every pixel
    of_plan = functools.partial(ReadPlan.states_bytes, width=grid.width, per_pixel=6177)
    for room, streams in ((states, True), (states - 1, False)):
        got = plan_reads(grid, layout, n, task, held_bytes=held // 2, stream="fallback",
                         state_room=room, states=of_plan)  # fmt: skip
        assert got.stream is streams and got == (no_disk if streams else without)
    # with a mask, the states of its pixels: 7 in the rows of the first band, 1 in the rest
    from treesits_dask.io.masks import MaskPixels

    mask = np.zeros((grid.height, grid.width), bool)
    mask[[3, 50, 50, 119, 119, 119, 119, 599], [0, 1, 2, 3, 4, 5, 599, 0]] = True
    pixels = MaskPixels(np.packbits(mask, axis=1), grid.width)
    assert pixels.count((0, 120), (0, 600)) == 7 and pixels.count((0, 120), (300, 600)) == 1
    assert no_disk.states_bytes(grid.width, 6177, pixels) == (7 + 1) * 6177
    # the column sums it keeps are bounded; the counts stay right when they are forgotten
    from treesits_dask.io.masks import ROW_RANGES_KEPT

    for r in range(ROW_RANGES_KEPT + 5):
        assert pixels.count((r, r + 1), (0, 600)) == int(mask[r].sum())
        assert len(pixels._columns) <= ROW_RANGES_KEPT
    assert pixels.count((0, 120), (0, 600)) == 7
    decode = [planned_decode(grid, layout, p, n) for p in (to_disk, no_disk, without)]
    assert decode[0] == decode[1] < decode[2]


def test_sbert_streams_in_sections_where_the_states_of_whole_bands_do_not_fit():
    """Where the states of two full-width bands do not fit the room (an unmasked 3000 px tile's
    SBERT states: 10.4 GiB), SBERT is streamed in the fewest sections of window columns whose
    states do, where that decodes less than the plan that holds its bands: a COG's sections are
    whole blocks wide (its windows one block row high and one block wide), so every block is
    still decoded once; a striped tile's full-width strips are decoded once per section."""
    from treesits_dask.io.bands import planned_decode
    from treesits_dask.io.grid import TileGrid, WindowLayout

    def grid(block):
        return TileGrid("X0069_Y0043", "", (0, 10, 0, 0, 0, -10), 3000, 3000, block, 10)

    n, per_px = 600, 6177
    of_plan = functools.partial(ReadPlan.states_bytes, width=3000, per_pixel=per_px)
    for g, sections in ((grid((256, 256)), 12), (grid((300, 3000)), 4)):
        layout = WindowLayout.of(g, (100, 100))
        task = 100 * 100 * 10 * 2 * n
        held = plan_reads(g, layout, n, 1 << 40).held // 100  # neither memory nor disk
        decode = functools.partial(planned_decode, g, layout, n_scenes=n)
        without = plan_reads(g, layout, n, task, held_bytes=held)
        whole = plan_reads(g, layout, n, task, held_bytes=held, stream="fallback")
        assert whole.stream and whole.sections == 1
        band = whole.bands[0].height
        room = 2 * band * (256 if sections == 12 else 800) * per_px  # 4 x 7-8 columns
        got = plan_reads(g, layout, n, task, held_bytes=held, stream="fallback", state_room=room,
                         states=of_plan)  # fmt: skip
        assert got.stream and got.sections == sections and of_plan(got) <= room
        assert decode(got) == sections // (12 if sections == 12 else 1) * decode(whole)
        assert decode(got) < decode(without)
        if sections == 12:  # COG: windows and sections of whole blocks
            assert got.windows.shape == (256, 256)
            assert all(b.columns(3000)[0] % 256 == 0 for b in got.bands)
        # ``required`` (windows of all scenes that do not fit): the same sections
        required = plan_reads(g, layout, n, task, held_bytes=held, stream="required",
                              state_room=room, states=of_plan)  # fmt: skip
        assert required == got
        # no room for even one window column's states: not streamed (required: one section
        # per window column, which the caller refuses)
        tiny = plan_reads(g, layout, n, task, held_bytes=held, stream="fallback", state_room=1,
                          states=of_plan)  # fmt: skip
        assert tiny == without
        least = plan_reads(g, layout, n, task, stream="required", state_room=1, states=of_plan)
        assert least.sections == len(got.windows.windows[0]) and of_plan(least) > 1


@pytest.mark.parametrize("stream", ["auto", "always"])
def test_a_streamed_sbert_tile_maps_the_values_of_one_read_over_all_scenes(
    native_sbert, striped, held_run, tmp_path, client, monkeypatch, caplog, stream
):
    """SBERT (4 observations kept of 7 scenes) on a striped tile whose bands fit neither memory
    nor disk (as in the LSTM's test above): streamed under ``auto`` (and ``always``), it decodes
    what the run that holds its bands decodes, and maps its values: probabilities to float
    rounding, the observations used (at most 4), the newest scene's validity and day exactly."""
    from treesits_dask.pipeline.plan import make_plan

    cube = striped
    (t,) = make_plan(_config(cube, native_sbert, tmp_path / "a", "never", uncertainty=())).tiles
    held, whole = held_run(_config(cube, native_sbert, tmp_path / "a", "never", uncertainty=()))
    _cut_budget(monkeypatch, t)
    (t,) = make_plan(_config(cube, native_sbert, tmp_path / "b", stream, uncertainty=())).tiles
    assert t.stream == ("fallback" if stream == "auto" else stream)
    before = _decoded(client)
    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        run(_config(cube, native_sbert, tmp_path / "b", stream, uncertainty=()), client=client)
    assert _decoded(client) - before == whole
    assert f"tile {t.tile}: streamed through the model in " in caplog.text
    assert "(the pixels of its mask)" in caplog.text
    a, b = open_map(held), open_map(str(tmp_path / "b"))
    assert a.probability.notnull().any() and a.probability.isnull().any()  # the mask's holes
    assert int(a.valid_obs.max()) == 4
    np.testing.assert_allclose(b.probability.values, a.probability.values, rtol=0, atol=1e-5)
    for var in ("valid_obs", "last_obs_valid", "last_valid_date"):
        np.testing.assert_array_equal(b[var].values, a[var].values, err_msg=var)


def test_a_cog_tile_streamed_in_sections_maps_the_values_of_one_read_over_all_scenes(
    native_sbert, tmp_path, client, monkeypatch, caplog
):
    """SBERT on a COG tile whose windows of all scenes the workers cannot hold (their share made
    tiny) and whose states of two full-width bands do not fit the room for them (made 60 % of
    those) is streamed in sections of whole blocks (decided by the run on a standing cluster):
    it decodes what the run that holds its windows decodes (each block once) and maps its
    values."""
    from treesits_dask.pipeline import memory, reading
    from treesits_dask.pipeline.cluster import Routing
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.synthetic import make_cube

    cube = make_cube(tmp_path / "cube", size=600, n_scenes=7, layout="cog", seed=4,
                     mask_dir=str(tmp_path / "masks"))  # fmt: skip

    def config(out, stream):
        c = _config(cube, native_sbert, out, stream, uncertainty=())
        return c.model_copy(update={"scheduler_address": client.scheduler.address})

    before = _decoded(client)
    run(config(tmp_path / "a", "never"), client=client)
    whole = _decoded(client) - before
    (t,) = make_plan(config(tmp_path / "b", "auto")).tiles
    full = plan_reads(t.grid, t.layout, len(t.scenes), 1 << 30, stream="required")
    states = reading.mask_states(full, t.grid, t.mask, t.stream_state)
    workers = client.scheduler_info(n_workers=-1)["workers"]
    monkeypatch.setattr(reading, "STATE_SHARE", 1.0)
    room = reading.read_budget(config(tmp_path / "b", "auto"), workers, Routing()).state_bytes
    monkeypatch.setattr(reading, "STATE_SHARE", 0.6 * states / room)
    monkeypatch.setattr(memory, "WINDOW_SHARE", 1e-9)
    before = _decoded(client)
    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        run(config(tmp_path / "b", "auto"), client=client)
    assert _decoded(client) - before == whole
    assert "streamed through the model instead" in caplog.text
    line = caplog.text.split(f"tile {t.tile}: streamed through the model in ")[1]
    assert "sections of window columns, each block decoded once per section" in line
    a, b = open_map(str(tmp_path / "a")), open_map(str(tmp_path / "b"))
    assert a.probability.notnull().any() and a.probability.isnull().any()  # the mask's holes
    np.testing.assert_allclose(b.probability.values, a.probability.values, rtol=0, atol=1e-5)
    for var in ("valid_obs", "last_obs_valid", "last_valid_date"):
        np.testing.assert_array_equal(b[var].values, a[var].values, err_msg=var)


def test_plan_weighs_each_masked_sbert_tiles_states(native_sbert, striped, tmp_path):
    """``plan``'s read report plans SBERT's masked tiles by whether their states fit, not once
    per mask: of two tiles of one shape on a worker with room for the states of a few pixels, the
    one whose mask holds 2 pixels is streamed (every block decoded once, its own states), the one
    whose mask holds every pixel is read as it would be without streaming (also where the states
    of a section would fit: a striped tile streamed in sections decodes as much)."""
    import rasterio

    from treesits_dask.io.masks import MaskSource
    from treesits_dask.pipeline.cluster import Routing
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.pipeline.preview import budgets_on, tile_reads

    config = _config(striped, native_sbert, tmp_path / "o", "auto", uncertainty=())
    (t,) = make_plan(config).tiles
    assert t.stream == "fallback" and t.mask is not None
    masks = {}
    with rasterio.open(t.mask.url) as src:
        profile = src.profile
    for name, fill in (("few", False), ("all", True)):
        data = np.full((600, 600), fill, np.uint8)
        data[[5, 300], [7, 9]] = 1
        path = tmp_path / f"{name}.tif"
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data[None])
        masks[name] = dataclasses.replace(t, tile=name, mask=MaskSource(str(path)))
    held = plan_reads(t.grid, t.reading, len(t.scenes), 1 << 40).held
    per_window = t.reading.shape[0] * t.reading.shape[1] * t.grid.count * 2 * len(t.scenes)

    def budget(room):  # bands fit neither memory nor disk; ``room`` bytes of states
        def on(free):
            workers = {"w": {"memory_limit": 8 << 30, "nthreads": 2}}
            shared, _ = budgets_on(config, workers, Routing())(0)
            small = dataclasses.replace(shared, task_bytes=per_window, held_bytes=held // 2,
                                        spill_bytes=free or None, state_bytes=room)  # fmt: skip
            return small, None

        return (*on(0), on)

    reads = tile_reads(list(masks.values()), *budget(1024))
    few, every = reads["few"], reads["all"]
    assert "streamed through the model" in few["mode"] and few["decoded_over_tile"] == 1.0
    assert "streamed" not in every["mode"] and every["decoded_over_tile"] > 1.0
    assert "stream_state_gib" not in every
    # with room for all: both streamed alike, each with the states of its own mask
    reads = tile_reads(list(masks.values()), *budget(None))
    assert reads["few"]["mode"] == reads["all"]["mode"] == few["mode"]
    assert reads["few"]["stream_state_gib"] == 0.0
    assert reads["all"]["stream_state_gib"] == round(2 * 120 * 600 * t.stream_state / 2**30, 2) > 0
    # with room for half of those: the one of every pixel would stream in 2 sections, which
    # decodes its strips twice, as the plan without streaming does (2 sections): not streamed
    reads = tile_reads(list(masks.values()), *budget(120 * 600 * t.stream_state))
    assert reads["all"]["mode"] == "in 2 sections of window columns"
    assert reads["few"]["mode"].startswith("in bands, streamed")
    assert reads["all"]["decoded_over_tile"] == 2.0 and reads["few"]["decoded_over_tile"] == 1.0


def _grown(tmp_path, cog_positions: tuple[int, ...], size: int = 300, n: int = 9):
    """A striped cube of ``n`` scenes whose scenes at ``cog_positions`` (oldest first) are the
    newer FORCE's COGs of the same pixels: a cube kept up to date across FORCE versions."""
    from tests.two_layouts import to_cogs, two_layouts

    cubes, folder = two_layouts(tmp_path, size, n)
    boas = sorted(folder.glob("*_SEN2?_BOA.tif"))
    to_cogs(cubes, folder, [boas[k].name for k in cog_positions])
    return dataclasses.replace(cubes["strips"], root=str(folder.parent)), cubes["strips"]


@pytest.mark.parametrize(
    "family,cogs,masked",
    [
        ("lstm", (6, 7, 8), False),  # strips, then COGs: two stages
        ("lstm", (2, 3, 8), True),  # strips, COGs, strips, a COG: four stages
        ("sbert", (5, 6, 7, 8), True),
    ],
    ids=["lstm-strips-then-cogs", "lstm-interleaved-masked", "sbert-strips-then-cogs-masked"],
)
def test_a_streamed_tile_in_two_file_layouts_decodes_each_block_once(
    native_lstm, native_sbert, tmp_path, client, caplog, family, cogs, masked
):
    """A streamed tile whose scenes are FORCE < 3.8 strips and FORCE >= 3.8 COGs is streamed in
    one stage per run of scenes in one layout, each read in blocks of its own and stepped in
    windows of its own (30-row strips: the map's 90 x 100 px windows; 256 px COG blocks: 256 x
    256), each
    stage's windows taking their states from the stage before: it decodes what the run that
    holds its windows decodes (every block of every file once at most), where one plan for all
    decodes the COGs' blocks more than once, and maps the same values as that run and as a run
    over the same scenes all in strips."""
    from treesits_dask.io.bands import planned_decode
    from treesits_dask.io.layouts import layout_runs
    from treesits_dask.pipeline import reading
    from treesits_dask.pipeline.plan import make_plan

    grown, strips = _grown(tmp_path, cogs)
    model = native_lstm if family == "lstm" else native_sbert
    extra = {} if family == "lstm" else {"uncertainty": ()}

    def config(cube, out, stream):
        c = _config(cube, model, out, stream, **extra)
        return c if masked else c.model_copy(update={"mask_dir": None})

    plan = make_plan(config(grown, tmp_path / "s", "always"))
    (t,) = plan.tiles
    runs = layout_runs(t.scenes, t.grid)
    (summary,) = plan.summary()["tiles"]
    assert summary["read"]["mode"].startswith(f"in {len(runs)} stages, one per run of scenes")
    assert summary["read"]["decoded_over_tile"] <= 1.0
    assert len(runs) == (2 if cogs[0] > 3 else 4)
    budget = reading.ReadBudget(1 << 24, 2, 0)
    stages = reading.stream_stages(t, budget)
    assert [run.grid.block_shape for run, _ in stages] == [r.grid.block_shape for r in runs]
    assert t.reading.shape == (90, 100)  # 3 strips of 30 rows: one band, stepped as they are
    assert [p.windows.shape for _, p in stages] == [
        (256, 256) if run.grid.block_shape == (256, 256) else (90, 100) for run, _ in stages
    ]
    one = reading.tile_read_plan(t, budget)  # one plan for all scenes, the strips'
    cog_grid = runs[1].grid
    stage_cogs = sum(planned_decode(run.grid, t.reading, p, len(run.indices))
                     for run, p in stages if run.grid == cog_grid)  # fmt: skip
    assert stage_cogs == len(cogs) * 300 * 300 * 10 * 2  # each block once
    assert planned_decode(cog_grid, t.reading, one, len(cogs)) > 1.1 * stage_cogs

    before = _decoded(client)
    run(config(grown, tmp_path / "held", "never"), client=client)
    held = _decoded(client) - before
    before = _decoded(client)
    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        run(config(grown, tmp_path / "s", "always"), client=client)
    streamed = _decoded(client) - before
    assert f"streamed in {len(runs)} stages, one per run of scenes in one file layout" in (
        caplog.text
    )
    assert streamed == held
    assert streamed <= 9 * 300 * 300 * 10 * 2  # every block of every file once at most (a
    # block whose pixels are all flagged in the QAI is not decoded)
    run(config(strips, tmp_path / "strips", "always"), client=client)
    a = open_map(str(tmp_path / "held"))
    assert a.probability.notnull().any()
    for other in ("s", "strips"):
        b = open_map(str(tmp_path / other))
        np.testing.assert_allclose(b.probability.values, a.probability.values, rtol=0, atol=1e-5)
        for var in ("valid_obs", "last_obs_valid", "last_valid_date"):
            np.testing.assert_array_equal(b[var].values, a[var].values, err_msg=(other, var))
    if masked:
        assert a.probability.isnull().any()  # the mask's holes


def _maps_what_one_run_maps(cube, model, one, out, client) -> None:
    """The map ``out``, made over a sequence of runs, holds what one streamed run over all of
    ``cube``'s scenes into ``one`` maps, in the same chunks."""
    run(_config(cube, model, one, "always"), client=client)
    a, b = open_map(str(one)), open_map(str(out))
    assert a.probability.notnull().any()
    assert b.probability.encoding["chunks"] == a.probability.encoding["chunks"]
    np.testing.assert_allclose(b.probability.values, a.probability.values, rtol=0, atol=1e-5)
    for var in ("valid_obs", "last_obs_valid", "last_valid_date"):
        np.testing.assert_array_equal(b[var].values, a[var].values, err_msg=var)


def test_a_streamed_tile_grown_by_scenes_in_another_layout_maps_what_one_run_maps(
    native_lstm, tmp_path, client, caplog
):
    """A sequence of runs on one map: a streamed tile of 6 FORCE < 3.8 strips, then 3 scenes more
    that a newer FORCE wrote as COGs.  The second run finds the new layout, streams the tile in 2
    stages (each block decoded once at most), keeps the map's windows, and maps what one run over
    all 9 scenes maps."""
    import shutil

    from treesits_dask import versions

    grown, _ = _grown(tmp_path, (6, 7, 8))
    seq = tmp_path / "seq"
    shutil.copytree(grown.root, seq)
    folder = seq / "X0069_Y0043"
    newest = sorted(folder.glob("*_SEN2?_BOA.tif"))[-3:]
    for boa in newest:
        for name in (boa.name, boa.name.replace("_BOA", "_QAI")):
            (folder / name).unlink()
    cube = dataclasses.replace(grown, root=str(seq))
    out = tmp_path / "map"

    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        first = run(_config(cube, native_lstm, out, "always"), client=client)
    assert list(first.tiles) == ["X0069_Y0043"] and not first.failed
    assert "tile X0069_Y0043: streamed through the model in" in caplog.text
    assert "stages, one per run of scenes" not in caplog.text
    for boa in newest:  # the newer FORCE's COGs arrive
        for name in (boa.name, boa.name.replace("_BOA", "_QAI")):
            shutil.copy(f"{grown.root}/X0069_Y0043/{name}", folder / name)
    caplog.clear()
    before = _decoded(client)
    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        second = run(_config(cube, native_lstm, out, "always"), client=client)
    decoded = _decoded(client) - before
    assert list(second.tiles) == ["X0069_Y0043"] and not second.failed
    assert "streamed in 2 stages, one per run of scenes in one file layout" in caplog.text
    assert 0 < decoded <= 9 * 300 * 300 * 10 * 2  # every block of every file once at most
    assert len(versions(str(out))) == 2

    _maps_what_one_run_maps(grown, native_lstm, tmp_path / "one", out, client)


def test_a_staged_tile_grown_past_the_runs_always_staged_maps_what_one_run_maps(
    native_lstm, tmp_path, client, caplog
):
    """A sequence of runs on one map where a tile's runs of scenes in one file layout grow past
    ``STREAM_STAGES``: 6 scenes in 4 runs (strips, a COG, strips, a COG) are streamed in 4
    stages; 3 strips more make 5 runs, and the next run re-plans the tile from its scenes (the
    layouts of the 6 it does not open again from the tile's record): one plan for all its
    layouts, as ``STAGE_COST`` has it for this tile, in the map's windows, mapping what one run
    over all 9 scenes maps."""
    import shutil

    from treesits_dask import versions
    from treesits_dask.io import layouts

    grown, _ = _grown(tmp_path, (2, 5))  # S S C S S C S S S: 5 runs
    seq = tmp_path / "seq"
    shutil.copytree(grown.root, seq)
    folder = seq / "X0069_Y0043"
    newest = sorted(folder.glob("*_SEN2?_BOA.tif"))[-3:]  # the strips of the fifth run
    for boa in newest:
        for name in (boa.name, boa.name.replace("_BOA", "_QAI")):
            (folder / name).unlink()
    cube = dataclasses.replace(grown, root=str(seq))
    out = tmp_path / "map"
    assert layouts.STREAM_STAGES == 4

    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        first = run(_config(cube, native_lstm, out, "always"), client=client)
    assert list(first.tiles) == ["X0069_Y0043"] and not first.failed
    assert "streamed in 4 stages, one per run of scenes in one file layout" in caplog.text
    for boa in newest:  # the strips of a fifth run arrive
        for name in (boa.name, boa.name.replace("_BOA", "_QAI")):
            shutil.copy(f"{grown.root}/X0069_Y0043/{name}", folder / name)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        second = run(_config(cube, native_lstm, out, "always"), client=client)
    assert list(second.tiles) == ["X0069_Y0043"] and not second.failed
    assert (
        "tile X0069_Y0043: streamed through the model in 1 batch of its 9 scenes (" in caplog.text
    )
    assert "stages, one per run of scenes" not in caplog.text  # one plan for all its layouts
    # and what that plan decodes, as the warning before it has it, not "every block decoded
    # once": the COGs' blocks once per band that crosses them
    (ratio,) = re.findall(r"it decodes ([0-9.]+) times its bytes by the plan's count", caplog.text)
    assert float(ratio) > 1.1
    assert f"{ratio} times its bytes decoded by the plan's count, in one plan for" in caplog.text
    assert len(versions(str(out))) == 2

    _maps_what_one_run_maps(grown, native_lstm, tmp_path / "one", out, client)


def test_the_stages_of_a_streamed_tile_hold_two_stages_states_within_the_room(
    native_lstm, tmp_path
):
    """Where a stage hands its windows' states to the next, both stages' states are held: their
    count is two adjacent stages' together, the stages plan their sections in shares of the room
    for states so that those fit it, and where the sections that needs would decode more than
    one plan for all the scenes (a striped stage's full-width strips once per section), the tile
    is streamed in that one plan."""
    from treesits_dask.pipeline import reading
    from treesits_dask.pipeline.plan import make_plan

    grown, _ = _grown(tmp_path, (6, 7, 8))
    (t,) = make_plan(_config(grown, native_lstm, tmp_path / "o", "always")).tiles
    free = reading.ReadBudget(1 << 24, 2, 0)
    runs = [run for run, _ in reading.stream_stages(t, free)]
    plans = [p for _, p in reading.stream_stages(t, free)]
    assert len(plans) == 2 and all(p.sections == 1 for p in plans)
    each = [reading.tile_states(t, p) for p in plans]
    assert reading.stages_states(t, plans) == sum(each) > max(each)
    roomy = dataclasses.replace(free, state_bytes=sum(each))
    assert [p for _, p in reading.stream_stages(t, roomy)] == plans  # both fit: one section

    def decode(these) -> int:
        staged = zip(runs, these, strict=True)
        return reading.plans_decode(t, tuple((r.grid, len(r.indices), p) for r, p in staged))

    chosen = set()
    for room in (sum(each) - 1, max(each), sum(each) // 2, min(each) // 2):
        tight = dataclasses.replace(free, state_bytes=room)
        one = reading.tile_read_plan(t, tight)  # one plan for all its scenes, the strips'
        got = [p for _, p in reading.stream_stages(t, tight)]
        chosen.add(bool(got))
        if got:
            assert max(p.sections for p in got) > 1  # in sections: both do not fit in one
            assert decode(got) <= decode([one, one])
            assert reading.stages_states(t, got) <= room or all(
                p.sections == len(p.windows.windows[0]) for p in got
            )  # within the room, or in as many sections as window columns
        else:  # read and counted in the one plan, each layout at its own blocks
            assert [p for _, _, p in reading.tile_read_plans(t, tight)] == [one, one]
    assert chosen == {True, False}  # both happen


def test_a_tile_in_more_runs_of_layouts_than_always_staged_is_staged_where_it_pays(
    native_lstm, held_run, tmp_path, client, monkeypatch, caplog
):
    """Beyond ``STREAM_STAGES`` runs of scenes in one file layout, a streamed tile is streamed in
    a stage per run only where the stages decode at least ``STAGE_COST`` of its scenes' bytes per
    stage less than one plan for all its scenes (each stage reads and steps at least one batch
    of its own: 56 stages of 4 scenes took 32 % longer than the one plan that decoded twice as
    much); within ``STREAM_STAGES`` runs it is staged whatever they save.  Staged, the tile maps
    what a run that holds its bands maps, decoding the same bytes."""
    from treesits_dask.io import layouts
    from treesits_dask.pipeline import preview, reading
    from treesits_dask.pipeline.plan import make_plan

    grown, _ = _grown(tmp_path, (1, 2, 5, 6))  # a strip, COGs, strips, COGs, strips: 5 runs
    (t,) = make_plan(_config(grown, native_lstm, tmp_path / "o", "always")).tiles
    runs = layouts.layout_runs(t.scenes, t.grid)
    assert [len(r.indices) for r in runs] == [1, 2, 2, 2, 2] and layouts.STREAM_STAGES == 4
    free = reading.ReadBudget(1 << 24, 2, 0)
    one = reading.tile_read_plan(t, free)
    monkeypatch.setattr(layouts, "STREAM_STAGES", 5)  # every run a stage, whatever it saves
    stages = reading.stream_stages(t, free)
    assert [run for run, _ in stages] == list(runs)
    staged = reading.plans_decode(t, [(r.grid, len(r.indices), p) for r, p in stages])
    in_one = [(p.grid, len(p.indices), one) for p in layouts.layout_parts(t.scenes, t.grid)]
    saved = reading.plans_decode(t, in_one) - staged
    scene = t.grid.height * t.grid.width * t.grid.count * 2
    assert staged == len(t.scenes) * scene  # each block once, where one plan decodes more
    assert saved >= len(runs) * scene  # this small tile saves a scene's bytes per stage
    monkeypatch.setattr(layouts, "STREAM_STAGES", 4)
    assert layouts.STAGE_COST > saved // (len(runs) * scene)  # as it is: one plan
    assert reading.stream_stages(t, free) == ()
    assert [p for _, _, p in reading.tile_read_plans(t, free)] == [one, one]
    entry = preview.tile_reads([t], free, None, lambda gib: (free, None))[t.tile]
    assert "in one plan for all its layouts" in entry["mode"]
    report = {"known": True, "tiles": {t.tile: entry}, "disk": "/tmp", "free_disk_gib": 1,
              "reading_workers": 1, "tiles_in_flight": 1}  # fmt: skip
    (line,) = preview.decode_warnings(report)
    assert "change file layout too often for a stage per run" in line, line
    for cost in (saved // (len(runs) * scene), saved // (len(runs) * scene) + 1):
        monkeypatch.setattr(layouts, "STAGE_COST", cost)
        got = reading.stream_stages(t, free)
        assert (got == stages) == (len(runs) * cost * scene <= saved), cost
        assert bool(got) == (len(runs) * cost * scene <= saved), cost

    # staged (the cost at what it saves): 5 stages map what the run that holds its bands maps
    monkeypatch.setattr(layouts, "STAGE_COST", 1)
    held, held_decoded = held_run(_config(grown, native_lstm, tmp_path / "h", "never"))
    before = _decoded(client)
    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        run(_config(grown, native_lstm, tmp_path / "s", "always"), client=client)
    assert "streamed in 5 stages, one per run of scenes in one file layout" in caplog.text
    assert _decoded(client) - before == held_decoded  # every block once at most, as held
    a, b = open_map(held), open_map(str(tmp_path / "s"))
    assert a.probability.notnull().any()
    np.testing.assert_allclose(b.probability.values, a.probability.values, rtol=0, atol=1e-5)
    for var in ("valid_obs", "last_obs_valid", "last_valid_date"):
        np.testing.assert_array_equal(b[var].values, a[var].values, err_msg=var)


def test_the_windows_of_a_step_go_through_the_model_together_where_they_are_small(
    native_lstm, monkeypatch
):
    """A step task's windows of few mask pixels go through the LSTM in one call (a call costs
    about 0.5 ms whatever its size), in groups of at most ``STEP_CALL_ELEMENTS``: their states
    after two batches are those of the windows stepped one by one, to float rounding, and a
    window without a mask pixel stays None."""
    from treesits_dask.models import ModelSpec
    from treesits_dask.outputs.schema import Packing
    from treesits_dask.pipeline import streaming
    from treesits_dask.pipeline.predict import Inference

    kernel = streaming.Kernel(ModelSpec(native_lstm, "native"), "cpu", Inference(), Packing(5))
    rng = np.random.default_rng(1)
    masks = [rng.random((4, 5)) < 0.4 for _ in range(4)]
    masks[2][:] = False  # no mask pixel
    windows = tuple((10, 4, 5, ((0, k, 0, 4),)) for k in range(4))
    batches = []
    for t in (3, 3):
        pieces = rng.integers(100, 3000, (4, t, 10, 4, 5)).astype(np.int16)
        pieces[0, 1, :, 1] = -9999  # a scene without a valid observation in a row
        batches.append((np.arange(t) * 5 + 18000 + 20 * len(batches), tuple(pieces)))
    calls = []
    step = Predictor.stream_step
    monkeypatch.setattr(Predictor, "stream_step",
                        lambda self, *a: calls.append(len(a[1])) or step(self, *a))  # fmt: skip

    def states(elements: int) -> list:
        monkeypatch.setattr(streaming, "STEP_CALL_ELEMENTS", elements)
        state = None
        for days, picks in batches:
            state = streaming.stream_step(state, windows, days, kernel, masks, picks)
        return state

    one_by_one = states(1)
    assert len(calls) == 6  # 3 windows with mask pixels, 2 batches
    calls.clear()
    together = states(1 << 21)
    assert calls == [sum(int(m.sum()) for m in masks)] * 2
    calls.clear()
    in_two = states(3 * 10 * int(masks[0].sum() + masks[1].sum()))  # the first two windows
    assert calls == [int(masks[0].sum() + masks[1].sum()), int(masks[3].sum())] * 2
    assert one_by_one[2] is None and together[2] is None and in_two[2] is None
    for k in (0, 1, 3):
        for other in (together, in_two):
            np.testing.assert_allclose(other[k]["model"], one_by_one[k]["model"], atol=1e-6)
            for key in ("idx", "n_valid", "last_day", "last_valid"):
                np.testing.assert_array_equal(other[k][key], one_by_one[k][key], err_msg=key)
    assert one_by_one[0]["n_valid"].max() <= 6 and one_by_one[0]["last_day"].max() == 18030


def test_a_streamed_tiles_read_tasks_name_their_tile(tmp_path):
    """The read tasks of a streamed tile, of each of its stages, are named as a tile's read tasks
    are, ``read-...-<tile>-<token>``, so that the scheduler's plugin finds their tile
    (:func:`~treesits_dask.io.cube.read_tile`)."""
    from treesits_dask.io import discovery
    from treesits_dask.io.cube import days_since_epoch, read_tile, tile_grid
    from treesits_dask.io.grid import WindowLayout
    from treesits_dask.io.reader import WindowReader
    from treesits_dask.models import ModelSpec
    from treesits_dask.outputs.schema import Packing
    from treesits_dask.pipeline.predict import Inference
    from treesits_dask.pipeline.streaming import Kernel, StreamStage, stages_layer

    cube = make_cube_once(tmp_path)
    scenes = discovery.scene_table(str(cube.root), "X0069_Y0043")
    grid = tile_grid(discovery.read_cube_definition(str(cube.root)), scenes[0])
    layout = WindowLayout.of(grid, (60, 50))
    plan = plan_reads(grid, layout, 2, 1, stream="always")
    kernel = Kernel(ModelSpec("unused.pt", "native"), "cpu", Inference(), Packing(3))
    stages = tuple(StreamStage(WindowReader.of_scenes(grid, scenes[k:k + 2]), plan, layout, k)
                   for k in (0, 2))  # fmt: skip
    arr = stages_layer(stages, days_since_epoch([s.date for s in scenes]), kernel)
    reads = [k for k in dict(arr.__dask_graph__()) if str(k[0]).startswith("read-")]
    assert reads and {read_tile(k) for k in reads} == {"X0069_Y0043"}
    assert len({k[0] for k in reads}) == 4  # the band reads and picks of each stage


def test_a_streamed_tile_in_two_file_layouts_in_sections_maps_the_values_of_one_read(
    native_lstm, tmp_path, client, monkeypatch, caplog
):
    """Where two stages' states do not fit the room for them in one section each, the stages are
    read in sections of window columns (those that decode least, each stage's first windows of a
    section taking their states from the stage before's windows of the same pixels): the map is
    the one a run that holds the tile's windows maps."""
    from treesits_dask.pipeline import reading, schedule
    from treesits_dask.pipeline.plan import make_plan

    grown, _ = _grown(tmp_path, (5, 6, 7, 8))
    config = _config(grown, native_lstm, tmp_path / "s", "always")
    (t,) = make_plan(config).tiles
    free = reading.ReadBudget(1 << 24, 2, 0)
    each = [reading.tile_states(t, p) for _, p in reading.stream_stages(t, free)]
    room = None
    for r in range(sum(each), 0, -max(1, sum(each) // 50)):  # the largest room that cuts both
        got = reading.stream_stages(t, dataclasses.replace(free, state_bytes=r))
        if got and all(p.sections > 1 for _, p in got):
            room = r
            break
    assert room is not None
    budget = schedule.read_budget
    monkeypatch.setattr(schedule, "read_budget", lambda *a, **k: dataclasses.replace(
        budget(*a, **k), state_bytes=room))  # fmt: skip
    run(_config(grown, native_lstm, tmp_path / "held", "never"), client=client)
    with caplog.at_level(logging.INFO, logger="treesits_dask"):
        run(config, client=client)
    assert "streamed in 2 stages, one per run of scenes in one file layout" in caplog.text
    assert "sections of window columns" in caplog.text.split(f"tile {t.tile}: streamed")[1]
    a, b = open_map(str(tmp_path / "held")), open_map(str(tmp_path / "s"))
    assert a.probability.notnull().any()
    np.testing.assert_allclose(b.probability.values, a.probability.values, rtol=0, atol=1e-5)
    for var in ("class", "valid_obs", "last_obs_valid", "last_valid_date"):
        np.testing.assert_array_equal(b[var].values, a[var].values, err_msg=var)


def test_the_states_of_pixels_are_gathered_from_several_states():
    """``gather_stream_states`` joins the states of the pixels picked of each state in order:
    the LSTM's (h, c) per layer along the pixels, SBERT's kept observations, days and counts;
    a gathered state steps on as the states it was taken from."""
    from treesits_dask.models.loading import gather_stream_states
    from treesits_dask.models.preprocess import sbert_keep, sbert_state

    rng = np.random.default_rng(5)
    lstm = [rng.random((2, 3, n, 8)).astype(np.float32) for n in (7, 11)]
    picks = [np.array([6, 0, 3]), np.array([10, 2])]
    got = gather_stream_states(list(zip(lstm, picks, strict=True)))
    want = np.concatenate([s[:, :, i] for s, i in zip(lstm, picks, strict=True)], axis=2)
    np.testing.assert_array_equal(got, want)
    states = []
    for n in (7, 11):
        series = rng.integers(0, 5000, (n, 6, 10)).astype(np.int16)
        states.append(sbert_keep(sbert_state(n, 4), series, rng.random((n, 6)) > 0.3,
                                 np.arange(6) * 5))  # fmt: skip
    got = gather_stream_states(list(zip(states, picks, strict=True)))
    for k in ("values", "days", "count"):
        want = np.concatenate([s[k][i] for s, i in zip(states, picks, strict=True)])
        np.testing.assert_array_equal(got[k], want, err_msg=k)
