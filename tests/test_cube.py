import datetime as dt
import os
import select
import signal
import time

import dask
import numpy as np
import pytest

from tests.helpers import lazy_tile, write_prj, write_scene
from treesits_dask.config import DEFAULT_QAI_FLAGS, QAI_FLAGS
from treesits_dask.errors import ConfigError, InputDataError
from treesits_dask.io import cube, datasets, discovery
from treesits_dask.io.grid import choose_window_shape
from treesits_dask.io.qai import qai_invalid


def _reference_invalid(q: int, flags) -> bool:
    """Per-pixel QAI rule written from REFERENCE.md section 1 (bit by bit)."""
    bit = lambda b: (q >> b) & 1  # noqa: E731
    cloud = bit(1) | (bit(2) << 1)
    aerosol = bit(6) | (bit(7) << 1)
    illum = bit(11) | (bit(12) << 1)
    tests = {
        "NODATA": bit(0) == 1,
        "CLOUD_BUFFER": cloud == 1,
        "CLOUD_OPAQUE": cloud == 2,
        "CLOUD_CIRRUS": cloud == 3,
        "CLOUD_SHADOW": bit(3) == 1,
        "SNOW": bit(4) == 1,
        "WATER": bit(5) == 1,
        "AEROSOL_INT": aerosol == 1,
        "AEROSOL_HIGH": aerosol == 2,
        "AEROSOL_FILL": aerosol == 3,
        "SUBZERO": bit(8) == 1,
        "SATURATION": bit(9) == 1,
        "SUN_LOW": bit(10) == 1,
        "ILLUMINATION_MEDIUM": illum == 1,
        "ILLUMINATION_POOR": illum == 2,
        "ILLUMINATION_SHADOW": illum == 3,
        "SLOPE": bit(13) == 1,
        "WVP_FILL": bit(14) == 1,
    }
    return any(tests[f] for f in flags)


def test_qai_every_flag_against_reference():
    rng = np.random.default_rng(0)
    # every single bit, every 2-bit field value, and random combinations
    # (as int16, sign bit included)
    singles = [1 << b for b in range(16)]
    fields = [v << s for s in (1, 6, 11) for v in (1, 2, 3)]
    values = np.array(singles + fields + list(rng.integers(0, 2**16, 3000)), dtype=np.uint16).view(
        np.int16
    )
    for flag in QAI_FLAGS:
        got = qai_invalid(values, [flag])
        ref = np.array([_reference_invalid(int(v), [flag]) for v in values.view(np.uint16)])
        np.testing.assert_array_equal(got, ref, err_msg=flag)
        assert got.any(), flag  # each flag is exercised
    got = qai_invalid(values, DEFAULT_QAI_FLAGS)
    ref = np.array([_reference_invalid(int(v), DEFAULT_QAI_FLAGS) for v in values.view(np.uint16)])
    np.testing.assert_array_equal(got, ref)
    # FORCE's default: invalid where bit 0, cloud != 0, or bits 3, 4, 8, 9
    u = values.view(np.uint16)
    force_default = (
        (u & 1) | ((u >> 1) & 3) | (u >> 3 & 1) | (u >> 4 & 1) | (u >> 8 & 1) | (u >> 9 & 1)
    ) != 0
    np.testing.assert_array_equal(got, force_default)


@pytest.mark.parametrize(
    "flags",
    [
        DEFAULT_QAI_FLAGS,
        ("CLOUD_OPAQUE",),  # one state of a two-bit field
        ("CLOUD_BUFFER", "CLOUD_CIRRUS", "WATER"),
        ("AEROSOL_INT", "AEROSOL_HIGH", "AEROSOL_FILL", "ILLUMINATION_SHADOW", "SLOPE"),
        tuple(QAI_FLAGS),
    ],
    ids=["default", "opaque", "buffer-cirrus-water", "aerosol-shadow-slope", "all"],
)
def test_qai_flags_on_every_value_in_any_shape(flags):
    """The screening of the reads against the bit formula on all 65536 values, as int16 (what
    GDAL gives) and uint16, in the shape given, for whole fields (one AND) and single states of a
    field alike; a flag that does not exist is an error."""
    every = np.arange(2**16, dtype=np.uint16)
    ref = np.array([_reference_invalid(int(v), flags) for v in every])
    for values in (every, every.view(np.int16)):
        got = qai_invalid(values.reshape(256, 256), flags)
        assert got.shape == (256, 256) and got.dtype == bool
        np.testing.assert_array_equal(got.ravel(), ref)
    assert not qai_invalid(np.zeros((2, 3), np.int16), ()).any()
    with pytest.raises(KeyError):
        qai_invalid(every, ["CLOUDS"])


@pytest.mark.parametrize("pattern", ["none", "all", "rows", "patch", "scattered", "corners"])
def test_screen_sets_nodata_exactly_where_screened(pattern):
    """Screening (on a view, as the reads do) sets every band to nodata where QAI screens and
    leaves every other value as it was, for clear, cloudy, banded, patchy and scattered QAI."""
    from treesits_dask.io.reader import screen

    rng = np.random.default_rng(3)
    bad = np.zeros((40, 50), bool)
    if pattern == "all":
        bad[:] = True
    elif pattern == "rows":
        bad[7:12] = True
    elif pattern == "patch":
        bad[5:20, 10:30] = True
    elif pattern == "scattered":
        bad = rng.random((40, 50)) < 0.1
    elif pattern == "corners":
        bad[0, 0] = bad[-1, -1] = True
    data = rng.integers(-20000, 20000, (4, 40, 60)).astype(np.int16)
    got = data.copy()
    screen(got[:, :, 5:55], bad)
    want = data.copy()
    want[:, bad.nonzero()[0], bad.nonzero()[1] + 5] = -9999
    np.testing.assert_array_equal(got, want)


@pytest.fixture()
def hand_tile(tmp_path):
    """30x40 px tile, 3 scenes, COG-like 16x16 blocks (which do not divide the tile)."""
    root = tmp_path / "cube"
    write_prj(root, 40)  # tile edge 400 m; only the origin matters for the 30x40 files
    rng = np.random.default_rng(1)
    data = rng.integers(0, 5000, (3, 10, 30, 40)).astype(np.int16)
    qai = np.zeros((3, 30, 40), np.int16)
    qai[0, 0:5, 0:5] = 2 << 1  # opaque cloud
    qai[1, 10, 10] = 1 << 3  # shadow
    qai[2, 20, 30] = 1 << 5  # water: not screened by default
    data[1, 4, 7, 8] = -9999  # one band nodata
    for t in range(3):
        write_scene(root, "X0010_Y0010", dt.date(2022, 5, 1 + t), data[t], qai[t], blocks=(16, 16))
    return root, data, qai


def _screened(data, qai):
    out = data.copy()
    out[0, :, 0:5, 0:5] = -9999
    out[1, :, 10, 10] = -9999
    return out


def _grid(root):
    definition = discovery.read_cube_definition(str(root))
    scenes = discovery.scene_table(str(root), "X0010_Y0010")
    return definition, scenes, cube.tile_grid(definition, scenes[0])


def _reader(grid, scenes):
    """The reader of the tile's windows, screening with the default QAI flags."""
    return cube.WindowReader(
        grid=grid,
        boa=tuple(s.boa for s in scenes),
        qai=tuple(s.qai for s in scenes),
        qai_flags=tuple(DEFAULT_QAI_FLAGS),
    )


def test_window_read_and_screening(hand_tile):
    root, data, qai = hand_tile
    _, scenes, grid = _grid(root)
    assert grid.block_shape == (16, 16) and (grid.height, grid.width) == (30, 40)
    shape = choose_window_shape(grid, (15, 20), len(scenes))
    arr = lazy_tile(scenes, grid, shape, DEFAULT_QAI_FLAGS)
    assert arr.dims == ("time", "band", "y", "x") and arr.dtype == np.int16
    assert arr.data.numblocks == (1, 1, 2, 2)  # one task per window, all scenes in it
    assert str(arr.rio.crs) == "EPSG:3035" and list(arr.band.values)[7] == "NIR"
    assert arr.time.dtype.kind == "M"
    before = cube.OPEN_COUNTER.count
    decoded = datasets.DECODED.snapshot()[1]
    with dask.config.set(scheduler="synchronous"):  # one thread: its datasets stay open
        got = arr.values
    # each BOA and QAI file opened once (not once per window) and each of its blocks decoded once
    assert cube.OPEN_COUNTER.count - before == 3 * 2
    assert datasets.DECODED.snapshot()[1] - decoded == 3 * 11 * 30 * 40 * 2
    expected = data.copy()
    expected[0, :, 0:5, 0:5] = -9999
    expected[1, :, 10, 10] = -9999
    np.testing.assert_array_equal(got, expected)
    none = lazy_tile(scenes, grid, shape, ()).values
    np.testing.assert_array_equal(none, data)


def test_empty_mask_window_opens_nothing(hand_tile):
    import dask.array as da

    root, data, qai = hand_tile
    _, scenes, grid = _grid(root)
    mask = np.zeros((30, 40), bool)
    mask[0, 0] = True  # only the first window has a mask pixel
    dmask = da.from_array(mask, chunks=(15, 20))
    arr = lazy_tile(scenes, grid, (15, 20), DEFAULT_QAI_FLAGS, mask=dmask)
    before = cube.OPEN_COUNTER.count
    decoded = datasets.DECODED.snapshot()[1]
    with dask.config.set(scheduler="synchronous"):
        vals = arr.values
    assert cube.OPEN_COUNTER.count - before == 1 * 3 * 2
    # only the 16 x 16 block holding the mask pixel is decoded; the cube is nodata outside it and
    # outside the window that has a mask pixel (rows 0:15, cols 0:20)
    assert datasets.DECODED.snapshot()[1] - decoded == 3 * 11 * 16 * 16 * 2
    np.testing.assert_array_equal(vals[:, :, :15, :16], _screened(data, qai)[:, :, :15, :16])
    vals[:, :, :15, :16] = -9999
    assert (vals == -9999).all()


def test_windows_side_by_side_are_read_together_as_views(hand_tile):
    """Windows side by side in a row are read by one read per file and scene (each block decoded
    once) and handed out as views of it, equal to reading each on its own; a window without a
    mask pixel in between splits the row (it is nodata, read by no one), and the model's pixel
    selection takes the same series out of a view as out of a contiguous copy."""
    from treesits_dask.io.grid import Window
    from treesits_dask.pipeline.predict import select_pixels

    root, data, qai = hand_tile
    _, scenes, grid = _grid(root)
    reader = _reader(grid, scenes)
    expected = _screened(data, qai)
    row = (Window(0, 0, 16, 16), Window(0, 16, 16, 16), Window(0, 32, 16, 8))
    decoded = datasets.DECODED.snapshot()[1]
    outs = reader.read_windows(row)
    assert datasets.DECODED.snapshot()[1] - decoded == 3 * 11 * 16 * 40 * 2  # each block once
    for w, out in zip(row, outs, strict=True):
        np.testing.assert_array_equal(out, expected[:, :, w.rows, w.cols])
        np.testing.assert_array_equal(out, reader.read(w))
    assert np.may_share_memory(outs[0], outs[2]) and not outs[1].flags.c_contiguous

    mask = np.zeros((30, 40), bool)
    mask[[0, 3, 9], [2, 5, 36]] = True  # the first and the last window; none in the middle one
    masks = [mask[w.rows, w.cols] for w in row]
    outs = reader.read_windows(row, *masks)
    assert not outs[1].flags.writeable and (outs[1] == -9999).all()
    assert not np.may_share_memory(outs[0], outs[2])
    for w, out in (row[0], outs[0]), (row[2], outs[2]):
        np.testing.assert_array_equal(out, expected[:, :, w.rows, w.cols])

    outs = reader.read_windows(row)
    full = np.ascontiguousarray(outs[1])
    picked = select_pixels(outs[1], masks[0] | True)
    for got, want in zip(picked, select_pixels(full, masks[0] | True), strict=True):
        np.testing.assert_array_equal(got, want)
    assert len(picked[0]) == 16 * 16 and picked[1].flags.c_contiguous


@pytest.fixture
def recycled_reads(hand_tile, monkeypatch):
    """(recycler, reader, screened values) of the hand tile: the reader's buffers come from a
    recycler of its own that serves arrays of any size, so a test can count them."""
    from treesits_dask.io import buffers
    from treesits_dask.io.buffers import Recycler

    monkeypatch.setattr(buffers, "MIN_BYTES", 1)
    pool = Recycler(idle_bytes=1 << 30, idle_seconds=60)
    monkeypatch.setattr("treesits_dask.io.reader.RECYCLER", pool)
    root, data, qai = hand_tile
    _, scenes, grid = _grid(root)
    return pool, _reader(grid, scenes), _screened(data, qai)


def test_masked_reads_of_a_row_reuse_one_buffer_whatever_their_forest(recycled_reads):
    """Each read of a row of windows takes one buffer of the room of the whole row, masked-in or
    not, so that the next read reuses it whichever of its windows hold a mask pixel (at 3000 px
    the runs of masked-in windows differ from row to row, and a buffer of another size was not
    reused: most masked reads faulted their memory in afresh)."""
    from treesits_dask.io.grid import Window

    pool, reader, expected = recycled_reads
    row = (Window(0, 0, 16, 16), Window(0, 16, 16, 16), Window(0, 32, 16, 8))
    room = 3 * 10 * 16 * 48 * 2  # the window at the tile's edge counted with its block whole
    picks = [(0, 1, 2), (0, 2), (1,), (2,), (0, 1, 2)]  # runs of 1, 2 and 3 windows
    for k, pick in enumerate(picks):
        masks = [np.full((16, w.width), j in pick) for j, w in enumerate(row)]
        outs = reader.read_windows(row, *masks)
        for j, (w, out) in enumerate(zip(row, outs, strict=True)):
            want = expected[:, :, w.rows, w.cols] if j in pick else -9999
            np.testing.assert_array_equal(out, np.broadcast_to(want, out.shape))
        assert pool.fresh_bytes == room  # the first read's buffer, every time
        assert pool.reused_bytes == k * room
        del outs, out
    none = [np.zeros((16, w.width), bool) for w in row]
    outs = reader.read_windows(row, *none)  # no mask pixel: no buffer
    assert all((o == -9999).all() and not o.flags.writeable for o in outs)
    assert (pool.fresh_bytes, pool.reused_bytes) == (room, (len(picks) - 1) * room)


def test_reads_at_the_tile_edge_take_the_buffers_of_full_rows(recycled_reads):
    """Windows of whole blocks that end at the tile's edge (the last 14 of 30 rows, the last 8 of
    40 columns, in 16 px blocks) ask for the room of whole blocks, so a read of the edge row and
    one of a full row are given the same buffer (at 3000 px the 184-row edge row of a COG faulted
    its memory in afresh in every tile); the values are the files'."""
    from treesits_dask.io.grid import Window

    pool, reader, expected = recycled_reads
    rows = [
        tuple(Window(r, c, h, w) for c, w in ((0, 16), (16, 16), (32, 8)))
        for r, h in ((16, 14), (0, 16), (16, 14))  # edge row, full row, edge row
    ]
    room = 3 * 10 * 16 * 48 * 2
    for k, row in enumerate(rows):
        outs = reader.read_windows(row)
        for w, out in zip(row, outs, strict=True):
            np.testing.assert_array_equal(out, expected[:, :, w.rows, w.cols])
        # the first read's buffer, in new memory; the others reuse it
        assert (pool.fresh_bytes, pool.reused_bytes) == (room, k * room)
        assert pool.held() == (room, 0)
        del outs, out


def test_window_shape_rules(hand_tile):
    root, *_ = hand_tile
    _, scenes, grid = _grid(root)
    with pytest.raises(ConfigError, match="does not divide tile X0010_Y0010"):
        choose_window_shape(grid, (16, 16), 3)
    assert choose_window_shape(grid, None, 3) == (30, 40)


def test_auto_windows_keep_within_the_window_budget(tmp_path):
    """``window: auto`` keeps a window of all scenes within what the inference workers can hold
    (``window_bytes``, from :func:`~treesits_dask.pipeline.memory.window_budget`): smaller square
    windows (divisors of the tile), strips only where they fit, and nothing changes where the
    budget is large (the Kubernetes defaults at 600 scenes)."""
    from treesits_dask.config import RunConfig
    from treesits_dask.io.grid import TileGrid
    from treesits_dask.pipeline.cluster import Routing, routing_for
    from treesits_dask.pipeline.memory import expected_workers, window_budget

    def grid(size, block):
        return TileGrid(tile="X0069_Y0043", crs_wkt="", transform=(10, 0, 0, 0, -10, 0),
                        width=size, height=size, block_shape=block, count=10)  # fmt: skip

    cog, strips = grid(600, (256, 256)), grid(3000, (300, 3000))
    per_px = 600 * 10 * 2  # bytes of one pixel of all 600 scenes
    assert choose_window_shape(cog, None, 600) == (200, 200)
    small = choose_window_shape(cog, None, 600, window_bytes=322 * 2**20)
    assert small == (150, 150) and 150 * 150 * per_px <= 322 * 2**20 < 200 * 200 * per_px
    assert choose_window_shape(cog, None, 600, window_bytes=1) == (1, 1)
    # 2-thread 3 GiB workers: the 100 px windows that ran without a restart there
    three = {"w": {"memory_limit": 3 * 2**30, "nthreads": 2, "resources": {}}}
    assert choose_window_shape(cog, None, 600, window_bytes=window_budget(three, Routing())) == (
        100, 100,
    )  # fmt: skip
    # the Kubernetes defaults: 250 px windows of a 3000 px tile at 600 scenes, as without a budget
    kube = RunConfig(cube="/x", model="m.pt", output=str(tmp_path / "o"), cluster="kubernetes")
    workers = expected_workers(kube)
    budget = window_budget(workers, routing_for(kube, workers))
    assert choose_window_shape(grid(3000, (256, 256)), None, 600, window_bytes=budget) == (
        250, 250,
    )  # fmt: skip
    assert choose_window_shape(strips, None, 100) == (300, 3000)  # 1.8 GB of all 100 scenes
    assert choose_window_shape(strips, None, 100, window_bytes=2 * 10**9) == (300, 3000)
    assert choose_window_shape(strips, None, 100, window_bytes=10**9) == (250, 250)
    assert choose_window_shape(strips, (600, 3000), 100, window_bytes=1) == (600, 3000)  # asked


def test_striped_tiles_are_read_in_chunks_of_whole_strips_near_the_window():
    """Windows that cut the strips of FORCE < 3.8 files are read in chunks of the window's width
    and whole strips high, the multiple of the strip height nearest the window's height within
    STRIP_AREA_SLACK; windows of whole strips, and those no multiple is near, stay as they are."""
    from treesits_dask.io.grid import STRIP_AREA_SLACK, TileGrid, read_shape

    def grid(size, block):
        return TileGrid(tile="X0069_Y0043", crs_wkt="", transform=(10, 0, 0, 0, -10, 0),
                        width=size, height=size, block_shape=block, count=10)  # fmt: skip

    strips = grid(3000, (300, 3000))
    assert read_shape(strips, (250, 250)) == (300, 250)  # 1.2x the window's pixels
    assert read_shape(strips, (300, 3000)) == (300, 3000)  # whole strips already
    assert read_shape(strips, (600, 250)) == (600, 250)
    assert read_shape(strips, (100, 100)) == (100, 100)  # 300 rows would be 3x
    assert read_shape(strips, (3000, 250)) == (3000, 250)
    assert read_shape(grid(1000, (100, 1000)), (250, 250)) == (200, 250)  # the lower of a tie
    assert read_shape(grid(600, (60, 600)), (100, 300)) == (120, 300)
    assert read_shape(grid(600, (60, 600)), (200, 200)) == (180, 200)  # the edge chunk 60 rows
    assert read_shape(grid(600, (60, 600)), (40, 300)) == (40, 300)  # 60 rows would be 1.5x
    assert 300 / 250 <= STRIP_AREA_SLACK < 60 / 40
    assert read_shape(grid(3000, (256, 256)), (250, 250)) == (256, 256)  # COG: whole blocks


def test_windows_smaller_than_cog_blocks_may_be_read_in_chunks_of_whole_blocks():
    """Where COG windows are smaller than the blocks (100 or 200 px windows of 256 px blocks, as
    ``window: auto`` makes them for hundreds of scenes on a worker of a few GiB per thread), the
    chunk of whole blocks that holds a window is offered, and the plan takes it where three per
    thread fit 45 % of the inference workers' memory, else the window (read in bands): 600 scenes
    of 256 x 256 px are 750 MiB, 4.4 GiB for 2 threads, within 45 % of 12 GiB, not of 8 GiB."""
    from treesits_dask.io.grid import TileGrid, WindowLayout, block_chunk, read_shape
    from treesits_dask.pipeline.cluster import Routing
    from treesits_dask.pipeline.memory import BLOCK_CHUNK_SHARE, fitting_chunk

    def grid(size, block):
        return TileGrid(tile="X0069_Y0043", crs_wkt="", transform=(10, 0, 0, 0, -10, 0),
                        width=size, height=size, block_shape=block, count=10)  # fmt: skip

    cog = grid(3000, (256, 256))
    assert block_chunk(cog, (200, 200)) == (256, 256)
    assert block_chunk(cog, (100, 100)) == (256, 256)
    assert block_chunk(cog, (100, 600)) == (256, 768)
    assert read_shape(cog, (200, 600)) == (256, 512) and block_chunk(cog, (200, 600)) is None
    assert block_chunk(grid(600, (256, 256)), (100, 100)) == (256, 256)
    assert WindowLayout.of(grid(600, (256, 256)), (256, 256)).chunks == ((256, 256, 88),) * 2
    # a chunk of whole blocks near the window already, or windows of whole blocks: nothing more
    assert read_shape(cog, (250, 250)) == (256, 256) and block_chunk(cog, (250, 250)) is None
    assert block_chunk(cog, (512, 512)) is None
    assert block_chunk(grid(3000, (300, 3000)), (100, 100)) is None  # strips: bands of strips

    def workers(gib):
        return {"w": {"memory_limit": gib * 2**30, "nthreads": 2, "resources": {}}}

    window, chunk = (200, 200), block_chunk(cog, (200, 200))
    assert fitting_chunk(600, 10, window, window, workers(12), Routing(), chunk) == (chunk, None)
    # the window fits 8 GiB (3 x 2 x 458 MiB within 60 %), the chunk not within 45 %
    assert fitting_chunk(600, 10, window, window, workers(8), Routing(), chunk) == (window, None)
    assert 6 * 600 * 10 * 256**2 * 2 > BLOCK_CHUNK_SHARE * 8 * 2**30
    shape, problem = fitting_chunk(600, 10, window, window, workers(3), Routing(), chunk)
    assert shape == window and "--memory-limit" in problem  # neither fits: the window's problem


def test_missing_qai_is_an_error_unless_disabled(hand_tile):
    root, data, _ = hand_tile
    (root / "X0010_Y0010" / "20220502_LEVEL2_SEN2A_QAI.tif").unlink()
    _, scenes, grid = _grid(root)
    with pytest.raises(
        InputDataError, match=r"20220502_LEVEL2_SEN2A_BOA.tif has no QAI.*--qai none"
    ):
        _ = lazy_tile(scenes, grid, (30, 40), DEFAULT_QAI_FLAGS).values
    _ = lazy_tile(scenes, grid, (30, 40), ()).values


def test_truncated_file(hand_tile):
    root, *_ = hand_tile
    _, scenes, grid = _grid(root)
    path = root / "X0010_Y0010" / "20220503_LEVEL2_SEN2A_BOA.tif"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputDataError, match="20220503_LEVEL2_SEN2A_BOA.tif"):
        _ = lazy_tile(scenes, grid, (30, 40), ()).values


def test_wrong_band_count_and_grid(hand_tile):
    from tests.helpers import tile_transform

    root, data, _ = hand_tile
    write_scene(root, "X0010_Y0010", dt.date(2022, 6, 1), data[0, :6])
    _, scenes, grid = _grid(root)
    with pytest.raises(InputDataError, match=r"20220601_LEVEL2_SEN2A_BOA.tif has 6 bands"):
        _ = lazy_tile(scenes, grid, (30, 40), ()).values
    write_scene(
        root,
        "X0010_Y0010",
        dt.date(2022, 6, 1),
        data[0],
        transform=tile_transform("X0011_Y0010", 40),
    )
    _, scenes, grid = _grid(root)
    with pytest.raises(InputDataError, match=r"20220601_LEVEL2_SEN2A_BOA.tif is on another grid"):
        _ = lazy_tile(scenes, grid, (30, 40), ()).values
    import rasterio

    write_scene(
        root, "X0010_Y0010", dt.date(2022, 6, 1), data[0], crs=rasterio.crs.CRS.from_epsg(32632)
    )
    _, scenes, grid = _grid(root)
    with pytest.raises(InputDataError, match=r"20220601_LEVEL2_SEN2A_BOA.tif has CRS"):
        _ = lazy_tile(scenes, grid, (30, 40), ()).values


def test_first_scene_checked_against_prj(hand_tile):
    from tests.helpers import tile_transform

    root, data, _ = hand_tile
    write_scene(
        root,
        "X0010_Y0010",
        dt.date(2022, 1, 1),
        data[0],
        transform=tile_transform("X0012_Y0010", 40),
    )
    definition, scenes, _ = None, None, None
    definition = discovery.read_cube_definition(str(root))
    scenes = discovery.scene_table(str(root), "X0010_Y0010")
    with pytest.raises(InputDataError, match="is not the origin of tile X0010_Y0010"):
        cube.tile_grid(definition, scenes[0])


def _striped_tile(
    tmp_path, rows_per_strip=7, h=37, w=50, n=5, blocks=None, clouds=False, layouts=None
):
    """A tile of ``n`` scenes, striped (``rows_per_strip``) or tiled (``blocks``), with QAI.
    ``clouds``: scene 1 is all cloud, scene 2 cloud in its first 7 rows, scene 3 beyond the
    swath (nodata) in rows 0:16, cols 0:32 (the rest screened at random, as in every scene).
    ``layouts``: per scene, its ``blocks`` (None: striped), instead of ``blocks`` for all."""
    import rasterio

    root = tmp_path / "cube"
    write_prj(root, w)
    rng = np.random.default_rng(5)
    data = rng.integers(-100, 5000, (n, 10, h, w)).astype(np.int16)
    qai = np.where(rng.random((n, h, w)) < 0.2, 2 << 1, 0).astype(np.int16)
    if clouds:
        qai[1] = 2 << 1
        qai[2, :7] = 2 << 1
        qai[3, :16, :32] |= 1
    for t in range(n):
        own = layouts[t] if layouts is not None else blocks
        path = write_scene(
            root, "X0010_Y0010", dt.date(2022, 5, 1 + t), data[t], qai[t], blocks=own
        )
        if own is None:  # rewrite striped with the wanted strip height
            for p, arr in ((path, data[t]), (str(path).replace("_BOA", "_QAI"), qai[t][None])):
                with rasterio.open(p) as src:
                    prof = src.profile
                prof.update(tiled=False, blockysize=rows_per_strip, interleave="band")
                prof.pop("blockxsize", None)
                with rasterio.open(p, "w", **prof) as dst:
                    dst.write(arr)
    expected = data.copy()
    for t in range(n):
        expected[t][:, qai_invalid(qai[t], DEFAULT_QAI_FLAGS)] = -9999
    return root, expected


@pytest.mark.parametrize(
    "layouts",
    [(None, None, None, (16, 16), (16, 16)), ((16, 16), None, (16, 16), None, None)],
    ids=["strips-then-tiles", "interleaved"],
)
@pytest.mark.parametrize("shape", [(14, 25), (16, 16), (10, 10), (7, 50)])
@pytest.mark.parametrize(
    "read_bytes, spill",
    [(1 << 30, None), (1, 1 << 40), (1 << 30, 1 << 40), (1 << 30, 0)],
    ids=["one-batch", "spills-batch-per-scene", "spills", "no-room"],
)
def test_a_tile_in_two_file_layouts_decodes_each_block_once(
    tmp_path, layouts, shape, read_bytes, spill, caplog, monkeypatch
):
    """A tile whose older scenes are FORCE < 3.8 strips and newer ones COGs (or mixed in any
    order): the driver finds each scene's layout from the headers it reads (the first and the
    newest, then all), and the tile is read as one part per layout into the same chunks, each
    planned for its own blocks: the cube is what the files hold, and each block of each file is
    decoded once (one plan for all, the tile grid's, decodes the other layout's more than once).
    Where no held memory is left the parts read window by window, each as its own plan says."""
    import logging

    from treesits_dask.io import layouts as layouts_module
    from treesits_dask.io.bands import planned_decode
    from treesits_dask.io.grid import WindowLayout, read_shape

    root, expected = _striped_tile(tmp_path, layouts=layouts)
    _, scenes, first = _grid(root)
    assert first.block_shape == (layouts[0] or (7, 50))
    opened = []
    real = layouts_module.block_shape_of
    layouts_module.block_shape_of = lambda url: opened.append(url) or real(url)
    try:
        with caplog.at_level(logging.INFO, logger="treesits_dask.io.layouts"):
            own, grid = layouts_module.with_layouts(scenes, first, {})
    finally:
        layouts_module.block_shape_of = real
    assert len(opened) == 4  # the newest, then the other three (the first's is the grid's)
    assert [s.block_shape for s in own] == [b or (7, 50) for b in layouts]
    assert grid.block_shape == (7, 50)  # the layout of most scenes
    said = ("3 scenes in 7 x 50 px blocks, 2 in 16 x 16" if layouts[0] is None
            else "2 scenes in 16 x 16 px blocks, 3 in 7 x 50")  # fmt: skip
    assert f"in 2 file layouts ({said})" in caplog.text
    assert own == tuple(scenes)  # the same scenes (the block shape is not compared)

    layout = WindowLayout.of(grid, read_shape(grid, shape))
    memory = dict(read_bytes=read_bytes, held_bytes=None if spill is None else 1, spill_bytes=spill)
    if spill:  # no room in memory: the pieces go to local disk and are read back from there
        from treesits_dask.io import pieces as piece_files
        from treesits_dask.io import reader as reader_module

        (tmp_path / "tmp").mkdir()
        monkeypatch.setattr(piece_files.tempfile, "tempdir", str(tmp_path / "tmp"))
        monkeypatch.setattr(piece_files, "_DIR", {})
        monkeypatch.setattr(reader_module, "in_memory", lambda nbytes: False)
        written = piece_files.WRITTEN.count
    files = 5 * 11 * 37 * 50 * 2
    decoded = {}
    for name, these in (("parts", own), ("one plan", scenes)):
        arr = cube.tile_cube(these, grid, layout, DEFAULT_QAI_FLAGS, **memory)
        before = datasets.DECODED.snapshot()[1]
        with dask.config.set(scheduler="threads", num_workers=3):
            got = arr.values
        np.testing.assert_array_equal(got, expected)
        decoded[name] = datasets.DECODED.snapshot()[1] - before
    parts = layouts_module.part_plans(own, grid, layout, read_bytes, 1, memory["held_bytes"], spill)
    assert [p.grid.block_shape for p, _, _ in parts] == list(
        dict.fromkeys(b or (7, 50) for b in layouts)
    )
    planned = sum(planned_decode(p.grid, layout, plan, len(p.indices), 11) for p, plan, _ in parts)
    assert decoded["parts"] == planned  # each part as its own plan says
    if spill:
        assert piece_files.WRITTEN.count > written  # pieces went through the disk
    once = all(not (plan.by_window and not plan.aligned) for _, plan, _ in parts)
    assert once or spill == 0  # no memory, no disk: a part may read window by window
    if once:
        assert decoded["parts"] == files  # every block of every file once
        assert decoded["one plan"] > files  # the tile grid's plan cuts the COGs' blocks


def test_the_layouts_of_a_tile_share_the_reading_worker_by_the_bands_they_hold(tmp_path):
    """The parts of a tile in two file layouts plan with all of a reading worker's memory and disk
    where the bands they hold with all of it fit together (a part read in chunks of whole blocks
    holds none: the other part's bands are planned as if alone), else with shares by those
    bands."""
    from treesits_dask.io.bands import plan_reads
    from treesits_dask.io.grid import WindowLayout, read_shape
    from treesits_dask.io.layouts import part_plans, with_layouts

    layouts = (None, None, (16, 16), (16, 16), (16, 16))
    root, _ = _striped_tile(tmp_path, layouts=layouts)
    _, scenes, first = _grid(root)
    scenes, grid = with_layouts(scenes, first, {})
    assert grid.block_shape == (16, 16)
    blocks = WindowLayout.of(grid, read_shape(grid, (16, 16)))  # the COGs' chunks of whole blocks
    plans = {p.grid.block_shape: plan for p, plan, _ in part_plans(scenes, grid, blocks, 1 << 30)}
    cog_plan, strip_plan = plans[(16, 16)], plans[(7, 50)]
    assert cog_plan.aligned and cog_plan.held == 0 and strip_plan.held > 0
    need = strip_plan.held
    alone = part_plans(scenes, grid, blocks, 1 << 30, 1, need, 0, need)
    got = {p.grid.block_shape: (plan, budgets) for p, plan, budgets in alone}
    assert got[(7, 50)][1] == (need, 0, need) and not got[(7, 50)][0].spills  # as if alone
    assert got[(7, 50)][0].bands and not got[(7, 50)][0].by_window

    windows = WindowLayout.of(grid, (14, 25))  # both parts hold bands
    held = {
        p.grid.block_shape: plan.held for p, plan, _ in part_plans(scenes, grid, windows, 1 << 30)
    }
    assert all(held.values())
    room = sum(held.values()) - 1
    shared = part_plans(scenes, grid, windows, 1 << 30, 1, room, 10 * room, room)
    for part, _, (h, spill, in_memory) in shared:
        assert h == in_memory == room * held[part.grid.block_shape] // sum(held.values())
        assert spill == 10 * room * held[part.grid.block_shape] // sum(held.values())
    assert sum(b[0] for *_, b in shared) <= room

    # without a disk, a part whose share reads it window by window holds no band: its share goes
    # to the part that holds bands, which plans as if alone
    given = 0
    for room in range(min(held.values()) // 4, sum(held.values()), sum(held.values()) // 40):
        shared = part_plans(scenes, grid, windows, 1 << 30, 1, room, 0, room)
        idle = [plan.by_window for _, plan, _ in shared]
        if sum(idle) != 1:
            continue
        ((part, plan, budgets),) = [s for s, i in zip(shared, idle, strict=True) if not i]
        assert budgets == (room, 0, room)
        alone = plan_reads(part.grid, windows, len(part.indices), 1 << 30, min_tasks=1,
                           held_bytes=room, spill_bytes=0, in_memory_bytes=room)  # fmt: skip
        assert plan == alone
        given += 1
    assert given


def test_a_tile_in_two_file_layouts_behind_gates_decodes_each_block_once(tmp_path):
    """A tile in two file layouts whose parts are read behind gates (their bands' reads wait for
    windows put together from both parts' pieces: each part's gate waits only for windows above
    its band, whose pieces of the other part lie above it too): the read ends, the cube is what
    the files hold, and each block is decoded once."""
    from treesits_dask.io.grid import WindowLayout
    from treesits_dask.io.layouts import part_plans, with_layouts

    layouts = (None, None, (16, 16), (16, 16), (16, 16))
    root, expected = _striped_tile(tmp_path, layouts=layouts, h=96)
    _, scenes, first = _grid(root)
    scenes, grid = with_layouts(scenes, first, {})
    layout = WindowLayout.of(grid, (8, 25))
    gated = None
    for spill in (1 << k for k in range(10, 30)):  # the least disk whose plans have a gate
        parts = part_plans(scenes, grid, layout, 1 << 30, 1, 1, spill)
        if all(plan.gate and not plan.by_window for _, plan, _ in parts):
            gated = spill
            break
    assert gated is not None
    arr = cube.tile_cube(scenes, grid, layout, DEFAULT_QAI_FLAGS, held_bytes=1, spill_bytes=gated)
    graph = dict(arr.data.__dask_graph__())
    assert sum(1 for k in graph if "read-gate-" in str(k[0])) > 0
    before = datasets.DECODED.snapshot()[1]
    with dask.config.set(scheduler="threads", num_workers=3):
        got = arr.values
    np.testing.assert_array_equal(got, expected)
    assert datasets.DECODED.snapshot()[1] - before == 5 * 11 * 96 * 50 * 2


@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["strips", "tiles"])
@pytest.mark.parametrize(
    "shape", [(37, 50), (10, 50), (7, 50), (14, 25), (10, 10), (5, 7), (16, 16), (16, 32)]
)
@pytest.mark.parametrize(
    "read_bytes, spill",
    [(1 << 30, None), (1, None), (1 << 30, 1 << 40)],
    ids=["one-batch", "batch-per-scene", "spills"],
)
def test_band_reads_equal_whole_file_reads(tmp_path, blocks, shape, read_bytes, spill):
    """Whatever the windows, the file blocks and the scene batches, held in memory or spilling
    (pieces filled scene by scene), or windows of whole blocks read by their own tasks: the cube
    is what the files hold (screened), each block of each file is decoded once, and with a mask
    only the blocks holding a mask pixel are decoded, the others and the windows without a mask
    pixel being nodata."""
    import dask.array as da

    from treesits_dask.io.bands import block_runs, decoded_bytes, plan_reads
    from treesits_dask.io.grid import WindowLayout

    root, expected = _striped_tile(tmp_path, blocks=blocks)
    _, scenes, grid = _grid(root)
    layout = WindowLayout.of(grid, shape)
    memory = dict(read_bytes=read_bytes, held_bytes=1 if spill else None, spill_bytes=spill)
    arr = cube.tile_cube(scenes, grid, layout, DEFAULT_QAI_FLAGS, **memory)
    before = datasets.DECODED.snapshot()[1]
    with dask.config.set(scheduler="threads", num_workers=3):
        got = arr.values
    np.testing.assert_array_equal(got, expected)
    files = 5 * 11 * 37 * 50 * 2
    assert datasets.DECODED.snapshot()[1] - before == files  # every block once
    # the windows pick their pieces from one task per band, batch and window row crossing the
    # band (not one small task per piece: each costs a worker a dispatch)
    plan = plan_reads(
        grid, layout, 5, read_bytes, held_bytes=memory["held_bytes"], spill_bytes=spill
    )
    picks = [k for k in arr.data.__dask_graph__() if str(k[0]).startswith("read-row-")]
    rows = sum(len({p.i for p in b.pieces}) for b in plan.bands if not plan.direct(b))
    if plan.spills:  # a task per piece
        rows = sum(len(b.pieces) for b in plan.bands)
    assert len(picks) == rows * len(plan.batches)
    aligned = blocks is not None and shape in ((16, 16), (16, 32))
    assert plan.aligned == aligned and (plan.bands == ()) == aligned
    assert plan.spills == bool(spill) or all(plan.direct(b) for b in plan.bands)
    if aligned:  # a task per window row, or per window where one window fills a task
        per_row = 1 if read_bytes > 1 else len(layout.windows[0])
        assert len(plan.groups) == len(layout.windows) * per_row
        assert sorted(ij for g in plan.groups for ij in g) == [(i, j) for i, j, _ in layout]

    rng = np.random.default_rng(1)
    mask = np.zeros((37, 50), bool)
    mask[rng.integers(0, 37, 4), rng.integers(0, 50, 4)] = True
    dmask = da.from_array(mask, chunks=layout.chunks)
    arr = cube.tile_cube(scenes, grid, layout, DEFAULT_QAI_FLAGS, mask=dmask, **memory)
    before = datasets.DECODED.snapshot()[1]
    with dask.config.set(scheduler="threads", num_workers=3):
        got = arr.values
    np.testing.assert_array_equal(got[:, :, mask], expected[:, :, mask])
    rects = block_runs(mask, (0, 37), (0, 50), grid.block_shape)
    area = sum(
        decoded_bytes((r0, r1), (c0, c1), grid.block_shape, (37, 50), 1, 1)[1]
        for r0, r1, c0, c1 in rects
    )
    assert datasets.DECODED.snapshot()[1] - before == 5 * 11 * 2 * area
    for _, _, w in layout:
        if not mask[w.rows, w.cols].any():
            assert (got[:, :, w.rows, w.cols] == -9999).all()
    # in the windows with a mask pixel, the blocks holding one are the files' values; all else
    # is nodata
    decoded = np.zeros((37, 50), bool)
    for r0, r1, c0, c1 in rects:
        decoded[r0:r1, c0:c1] = True
    for _, _, w in layout:
        decoded[w.rows, w.cols] &= mask[w.rows, w.cols].any()
    np.testing.assert_array_equal(got[:, :, decoded], expected[:, :, decoded])
    assert (got[:, :, ~decoded] == -9999).all()


@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["strips", "tiles"])
@pytest.mark.parametrize("shape", [(37, 50), (10, 50), (14, 25), (5, 7), (16, 16)])
@pytest.mark.parametrize("spill", [None, 1 << 40], ids=["held", "spills"])
def test_blocks_that_qai_screens_whole_are_not_decoded(tmp_path, blocks, shape, spill):
    """A BOA block whose every pixel QAI screens (a cloudy scene, a cloudy strip, beyond the
    swath) is not decoded: the cube is still what the files hold (screened), every other block is
    decoded once, the blocks left out are counted, and a scene that is all cloud opens only its
    QAI file; bands held in memory or spilling (pieces filled scene by scene) alike."""
    import dask.array as da

    from treesits_dask.io.bands import block_runs, decoded_bytes
    from treesits_dask.io.grid import WindowLayout

    root, expected = _striped_tile(tmp_path, blocks=blocks, clouds=True)
    _, scenes, grid = _grid(root)
    bh, bw = grid.block_shape
    skipped = 0  # BOA bytes of the blocks that QAI screens whole, from the files themselves
    for t in range(5):
        screened = expected[t, 0] == -9999
        for r in range(0, 37, bh):
            for c in range(0, 50, bw):
                if screened[r : r + bh, c : c + bw].all():
                    skipped += screened[r : r + bh, c : c + bw].size * 10 * 2
    # scene 1, and scene 2's first strip or the two blocks of scene 3 beyond the swath
    assert skipped == 37 * 50 * 10 * 2 + (7 * 50 if blocks is None else 16 * 32) * 10 * 2
    memory = dict(held_bytes=1 if spill else None, spill_bytes=spill)
    arr = cube.tile_cube(scenes, grid, WindowLayout.of(grid, shape), DEFAULT_QAI_FLAGS, **memory)
    opens, decoded = cube.OPEN_COUNTER.count, datasets.DECODED.snapshot()[1]
    screened_before = datasets.SCREENED.snapshot()[1]
    with dask.config.set(scheduler="synchronous"):  # one thread: each file opened once
        got = arr.values
    np.testing.assert_array_equal(got, expected)
    files = 5 * 11 * 37 * 50 * 2
    assert datasets.DECODED.snapshot()[1] - decoded == files - skipped
    assert datasets.SCREENED.snapshot()[1] - screened_before == skipped
    assert cube.OPEN_COUNTER.count - opens == 5 + 4  # every QAI, the BOA of 4 scenes
    # without screening every block is decoded, and the cloudy scene is its own values
    plain = cube.tile_cube(scenes, grid, WindowLayout.of(grid, shape), ()).values
    assert (plain[1] != -9999).any()

    # with a mask too: the blocks holding a mask pixel are decoded or left out as screened
    mask = np.zeros((37, 50), bool)
    mask[[0, 3, 20, 36], [0, 40, 10, 49]] = True
    layout = WindowLayout.of(grid, shape)
    dmask = da.from_array(mask, chunks=layout.chunks)
    arr = cube.tile_cube(scenes, grid, layout, DEFAULT_QAI_FLAGS, mask=dmask, **memory)
    decoded, screened_before = datasets.DECODED.snapshot()[1], datasets.SCREENED.snapshot()[1]
    with dask.config.set(scheduler="threads", num_workers=3):
        got = arr.values
    np.testing.assert_array_equal(got[:, :, mask], expected[:, :, mask])
    area = sum(
        decoded_bytes((r0, r1), (c0, c1), grid.block_shape, (37, 50), 1, 1)[1]
        for r0, r1, c0, c1 in block_runs(mask, (0, 37), (0, 50), grid.block_shape)
    )
    left_out = datasets.SCREENED.snapshot()[1] - screened_before
    assert left_out >= 10 * 2 * area  # scene 1's at least
    assert datasets.DECODED.snapshot()[1] - decoded + left_out == 5 * 11 * 2 * area


def test_band_reads_through_recycled_buffers_equal_the_files(tmp_path, monkeypatch):
    """The cube read with every band, window and piece in recycled buffers (threshold lowered to
    the test's sizes), twice on three threads: the second read reuses the first's memory and both
    are what the files hold."""
    from treesits_dask.io import buffers
    from treesits_dask.io.buffers import Recycler
    from treesits_dask.io.grid import WindowLayout

    monkeypatch.setattr(buffers, "MIN_BYTES", 1)
    pool = Recycler(idle_bytes=1 << 30, idle_seconds=60)
    monkeypatch.setattr("treesits_dask.io.reader.RECYCLER", pool)
    root, expected = _striped_tile(tmp_path, blocks=(16, 16))
    _, scenes, grid = _grid(root)
    for shape in ((14, 25), (10, 10)):
        arr = cube.tile_cube(scenes, grid, WindowLayout.of(grid, shape), DEFAULT_QAI_FLAGS,
                             read_bytes=1)  # fmt: skip
        for _ in range(2):
            with dask.config.set(scheduler="threads", num_workers=3):
                np.testing.assert_array_equal(arr.values, expected)
    assert pool.reused_bytes > 0


@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["strips", "tiles"])
def test_bands_that_do_not_fit_are_read_window_by_window(tmp_path, blocks, caplog):
    """The memory guard: where the bands of all scenes do not fit what a reading worker may
    hold, the tile is read window by window, the windows side by side of a window row in one task
    as far as the read budget allows (memory: the read budget), with the same values, decoding
    blocks once per run of windows that crosses them, and a warning that says so."""
    from treesits_dask.io.bands import BANDS_HELD, plan_reads
    from treesits_dask.io.grid import WindowLayout

    root, expected = _striped_tile(tmp_path, blocks=blocks)
    _, scenes, grid = _grid(root)
    layout = WindowLayout.of(grid, (10, 10))
    band = plan_reads(grid, layout, 5, 1 << 30)
    per_band = max(b.height for b in band.bands) * 50 * grid.count * 2 * 5
    assert not plan_reads(grid, layout, 5, 1 << 30, held_bytes=BANDS_HELD * per_band).by_window
    # (a section of the tile's width holds no less than one window column, and its bands held at
    # once no fewer than the 2 a window crosses: none fits here)
    small = plan_reads(grid, layout, 5, 1 << 30, held_bytes=2 * per_band // 5 - 1)
    assert small.by_window and small.bands == () and small.sections == 1

    # the windows of a window row side by side in one task (1 GiB of read budget holds the row):
    # a block is decoded once per window row that crosses it, not once per window
    assert small.groups == tuple(tuple((i, j) for j in range(5)) for i in range(4))
    decoded = {}
    for name, read_bytes in (("runs", 1 << 30), ("alone", 1)):
        arr = cube.tile_cube(
            scenes, grid, layout, DEFAULT_QAI_FLAGS, held_bytes=1, read_bytes=read_bytes
        )
        assert "reading window by window" in caplog.text and "X0010_Y0010" in caplog.text
        before = datasets.DECODED.snapshot()[1]
        with dask.config.set(scheduler="threads", num_workers=3):
            got = arr.values
        np.testing.assert_array_equal(got, expected)
        decoded[name] = datasets.DECODED.snapshot()[1] - before
        graph = dict(arr.data.__dask_graph__())
        assert not any("read-band" in str(k[0]) for k in graph if isinstance(k, tuple))
        groups = {k[1] for k in graph if isinstance(k, tuple) and "read-group" in str(k[0])}
        assert len(groups) == (4 if name == "runs" else 0)
    assert "4 runs of up to 5 windows" in caplog.text and "20 runs of up to 1" in caplog.text
    files = 5 * 11 * 37 * 50 * 2
    assert decoded["runs"] > files  # blocks still decoded more than once (once per window row)
    # strips as wide as the tile: 5 windows a row decoded each strip 5 times, one run once
    assert decoded["runs"] < decoded["alone"] / (4 if blocks is None else 1.5)


def _bands_held_in_dask_order(data) -> int:
    """The most bands whose pieces (or batch reads) are held at once where the read ``data`` (a
    dask array of a tile cube) and a task per window after it run one task at a time, each the
    first of the tasks ready to run in the order Dask gives them: by the read's priority
    annotation (where it has one), then by ``dask.order``."""
    import heapq

    from dask.core import get_dependencies
    from dask.order import order

    after = data.map_blocks(lambda b: b[:1, :1, :1, :1].astype(np.int64), chunks=(1, 1, 1, 1),
                            dtype=np.int64)  # fmt: skip
    dsk = dict(after.__dask_graph__())
    dependents: dict = {}
    for key in dsk:
        for dep in get_dependencies(dsk, key):
            dependents.setdefault(dep, set()).add(key)
    ordered = order(dsk)
    read = data.__dask_graph__().layers[data.name]
    priority = (read.annotations or {}).get("priority")

    def first(key) -> tuple:
        user = priority(key) if priority is not None and key in read else 0
        return -user, getattr(ordered[key], "priority", ordered[key])

    waiting = {key: len(get_dependencies(dsk, key)) for key in dsk}
    ready = [(first(key), n, key) for n, key in enumerate(dsk) if not waiting[key]]
    heapq.heapify(ready)
    done, held, most = set(), set(), 0
    while ready:  # one thread: the first ready task by priority, then by Dask's order
        *_, key = heapq.heappop(ready)
        done.add(key)
        for later in dependents.get(key, ()):
            waiting[later] -= 1
            if not waiting[later]:
                heapq.heappush(ready, (first(later), len(done) + len(dsk), later))
        if isinstance(key, tuple) and str(key[0]).startswith(("read-band-", "read-row-")):
            held.add(key)
        held = {k for k in held if not dependents.get(k, set()) <= done}
        most = max(most, len({k[1] for k in held}))
    return most


@pytest.mark.parametrize("spills", [False, True], ids=["in-memory", "spills"])
@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["strips", "tiles"])
def test_bands_that_fit_only_in_sections_are_read_section_by_section(
    tmp_path, blocks, spills, caplog, monkeypatch
):
    """Where the bands of the full width fit neither the reading worker's memory nor its spill
    disk, but those of a section of whole window columns do, the tile is read in the fewest such
    sections, each in bands of its own width (Dask's order holds a band at a time), with the
    values of the files: a full-width strip is decoded once per section (twice here, against
    once per window where a read task holds one window), a block once per section that crosses
    it, as the plan counts (``planned_decode``), and a warning says so.  Its pieces own their
    memory, as a spilling plan's; they go to local disk where the worker has no room for them
    only where the plan counts on its disk.  With a disk, where not even the 2 bands a window
    crosses fit it over the full width, each section of a striped tile is read behind a gate too
    (2 bands of its width at a time, which fit it), where more sections without one would decode
    more than 1.3 times as much."""
    from treesits_dask.io.bands import BANDS_HELD, plan_reads, planned_decode

    expected, scenes, grid, layout, held, per_scene = _spilling_plan(tmp_path, blocks)
    # 5 window columns of 10 px: sections of 2 and 3 columns (20 and 30 px), the wider one holds
    # 30/50 of the full width's bands; with a disk, 2 of the 4 bands the guard counts: 3/10 of
    # ``held``, where 2 full-width bands are 5/10 and 3 bands of a section 4.5/10
    gate_budget = dict(held_bytes=held // 4, spill_bytes=held * 3 // 10)
    if blocks is not None:
        # 16 px blocks: 3 sections without a gate decode 82/50 of the tile, 2 behind a gate
        # 66/50, which is not worth the gate (GATE_DECODE): 3 sections
        three = plan_reads(grid, layout, 5, per_scene, **gate_budget)
        assert three.sections == 3 and three.gate == 0
    gated = spills and blocks is None
    memory, disk = (held * 3 // 5 - 1, 2) if spills else (held - 1, 0)
    if gated:
        memory, disk = gate_budget["held_bytes"], gate_budget["spill_bytes"]
    # a read task holds one scene's full-width band: runs of one window each
    plan = plan_reads(grid, layout, 5, per_scene, held_bytes=memory, spill_bytes=disk)
    assert plan.sections == 2 and not plan.by_window and plan.spills == spills
    assert (plan.gate, plan.held) == ((2, held * 3 // 10) if gated else (0, held * 3 // 5))
    assert {b.cols for b in plan.bands} == {(0, 20), (20, 50)}
    assert [plan.section_of(b.index) for b in plan.bands] == sorted(
        plan.section_of(b.index) for b in plan.bands
    )
    # every window's pieces lie in one section, and every window has them
    assert set(plan.of_window) == {(i, j) for i, j, _ in layout}
    for b in plan.bands:
        assert all(b.cols[0] <= p.col_off < b.cols[1] for p in b.pieces)
    runs = plan_reads(grid, layout, 5, per_scene, held_bytes=1, spill_bytes=0)
    assert runs.by_window and runs.sections == 1 and max(map(len, runs.groups)) == 1
    assert planned_decode(grid, layout, plan, 5) < planned_decode(grid, layout, runs, 5)

    arr = cube.tile_cube(scenes, grid, layout, DEFAULT_QAI_FLAGS, read_bytes=per_scene,
                         held_bytes=memory, spill_bytes=disk)  # fmt: skip
    assert "in 2 sections of whole window columns" in caplog.text
    assert "X0010_Y0010" in caplog.text
    assert "fewer tiles in flight each (tiles_in_flight" in caplog.text  # what the user can change
    # the read, a task per window after it (as a prediction), one thread: what the guard counts
    # (bands of a section's width, as many as the gate lets), one section at a time (its
    # priorities)
    assert _bands_held_in_dask_order(arr.data) <= (plan.gate or BANDS_HELD)
    layer = arr.data.__dask_graph__().layers[arr.data.name]
    reads = sorted(k for k in layer if str(k[0]).startswith("read-band-"))
    priority = layer.annotations["priority"]
    # a section's tasks after the previous section's; with a gate its reads after its windows
    gated = -2 if plan.gate else 0
    assert [priority(k) for k in reads] == [-4 * plan.section_of(k[1]) + gated for k in reads]
    from treesits_dask.io import pieces as piece_files
    from treesits_dask.io import reader as reader_module

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(piece_files.tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(piece_files, "_DIR", {})
    monkeypatch.setattr(reader_module, "in_memory", lambda nbytes: False)  # no room
    fn, args = _band_task(arr)
    got = fn(*args)
    assert all(isinstance(p, piece_files.DiskPiece if spills else np.ndarray) for p in got)
    del got
    monkeypatch.undo()
    before = datasets.DECODED.snapshot()[1] + datasets.SCREENED.snapshot()[1]
    with dask.config.set(scheduler="threads", num_workers=3):
        got = arr.values
    np.testing.assert_array_equal(got, expected)
    done = datasets.DECODED.snapshot()[1] + datasets.SCREENED.snapshot()[1] - before
    assert done == planned_decode(grid, layout, plan, 5, grid.count + 1)  # BOA and QAI
    files = 5 * 11 * 37 * 50 * 2
    # strips: each decoded twice (once per section); 16 px blocks: the block column 16-32,
    # which both sections cross, twice (66 of 50 columns)
    assert done == (2 * files if blocks is None else files * 66 // 50)

    # with a mask: the mask's pixels are the files' values, a window without one is nodata, and
    # each section decodes the blocks that hold a mask pixel within its columns
    import dask.array as da

    from treesits_dask.io.bands import block_runs, decoded_bytes

    mask = np.zeros((37, 50), bool)
    mask[[3, 20, 30, 33], [5, 18, 41, 22]] = True
    arr = cube.tile_cube(scenes, grid, layout, DEFAULT_QAI_FLAGS, read_bytes=per_scene,
                         held_bytes=memory, spill_bytes=disk,
                         mask=da.from_array(mask, chunks=layout.chunks))  # fmt: skip
    before = datasets.DECODED.snapshot()[1] + datasets.SCREENED.snapshot()[1]
    with dask.config.set(scheduler="threads", num_workers=3):
        got = arr.values
    done = datasets.DECODED.snapshot()[1] + datasets.SCREENED.snapshot()[1] - before
    np.testing.assert_array_equal(got[:, :, mask], expected[:, :, mask])
    for _, _, w in layout:
        if not mask[w.rows, w.cols].any():
            assert (got[:, :, w.rows, w.cols] == -9999).all()
    area = sum(
        decoded_bytes((r0, r1), (c0 + a, c1 + a), grid.block_shape, (37, 50), 1, 1)[1]
        for a, b in ((0, 20), (20, 50))
        for r0, r1, c0, c1 in block_runs(mask[:, a:b], (0, 37), (a, b), grid.block_shape)
    )
    assert done == 5 * 11 * 2 * area


def test_sections_hold_in_memory_only_what_a_worker_holds_whole(tmp_path):
    """A section's bands, which windows cross, are held in memory only within what a reading
    worker holds whole of such bands (``in_memory_bytes``, half its memory), as the full width's:
    beyond it the plan spills where it has a spill disk (pieces to disk as the worker runs short),
    and without one the tile is cut in more sections whose bands fit it.  Held up to 75 % (2
    sections of 2.2 GiB against 2.25 GiB), a 3 GiB worker reading a 1000 px strips tile of 600
    scenes was restarted at 95 % in 4 of 15 reads."""
    from treesits_dask.io.bands import plan_reads

    _, _, grid, layout, held, per_scene = _spilling_plan(tmp_path, None)
    section = held * 3 // 5  # the wider of 2 sections (30 of the 50 px) of the 4 bands counted

    def plan(spill, in_memory):
        return plan_reads(grid, layout, 5, per_scene, held_bytes=section, spill_bytes=spill,
                          in_memory_bytes=in_memory)  # fmt: skip

    # as before, where a worker holds whole all it may hold: 2 sections in memory
    for spill in (0, 2):
        assert (plan(spill, None).sections, plan(spill, None).spills) == (2, False)
    # beyond what it holds whole, with a disk: the same sections, spilling
    spilling = plan(2, section - 1)
    assert (spilling.sections, spilling.spills, spilling.held) == (2, True, section)
    # without a disk: 3 sections (20, 10 and 20 px) whose bands fit it
    narrower = plan(0, held * 2 // 5)
    assert (narrower.sections, narrower.spills, narrower.held) == (3, False, held * 2 // 5)
    assert {b.cols for b in narrower.bands} == {(0, 20), (20, 30), (30, 50)}
    # and where not even one window column's bands fit it, window by window
    assert plan(0, held // 5 - 1).by_window


@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["strips", "tiles"])
def test_bands_that_fit_only_two_at_a_time_are_read_behind_a_gate(tmp_path, blocks, caplog):
    """Where the 4 bands of all scenes the guard counts fit neither the reading worker's memory
    nor its spill disk, but the 2 a window crosses do, the tile is read over its full width with
    a gate: the read tasks of each band wait for the windows with a piece in the band 2 above it
    (windows that cross only bands above it), so that no order Dask may take holds more than 2
    bands at once; the values of the files, every block decoded once (not once per section), and
    a message that says so.  The plan spills (its pieces go to local disk as the worker runs
    short of memory), so it needs a disk: without one, or where the 2 bands do not fit memory
    and disk, the tile goes in sections."""
    import logging

    from dask.core import get_dependencies

    from treesits_dask.io.bands import plan_reads, planned_decode

    expected, scenes, grid, layout, held, per_scene = _spilling_plan(tmp_path, blocks)
    memory, disk = held // 4, held // 2
    plan = plan_reads(grid, layout, 5, per_scene, held_bytes=memory, spill_bytes=disk)
    assert plan.gate == 2 and plan.sections == 1 and not plan.by_window
    assert plan.spills and plan.held == held // 2 and len(plan.bands) == 3
    files = 5 * 10 * 37 * 50 * 2
    assert planned_decode(grid, layout, plan, 5) == files  # every BOA block once
    # the gate's bands must fit the disk alone (they may all be there at once): a byte less of
    # it, and more memory, and the tile goes in sections
    more_memory = plan_reads(grid, layout, 5, per_scene, held_bytes=held // 2,
                             spill_bytes=held // 2 - 1)  # fmt: skip
    assert more_memory.sections == 2 and more_memory.gate == 0
    no_disk = plan_reads(grid, layout, 5, per_scene, held_bytes=held // 2)
    assert no_disk.sections == 3 and no_disk.gate == 0  # 2 of 5 window columns: 4/10

    with caplog.at_level(logging.INFO, logger="treesits_dask.io.cube"):
        arr = cube.tile_cube(scenes, grid, layout, DEFAULT_QAI_FLAGS, read_bytes=per_scene,
                             held_bytes=memory, spill_bytes=disk)  # fmt: skip
    assert "tile X0010_Y0010: 4 bands of all 5 scenes over its full width" in caplog.text
    assert "reading it 2 bands at a time" in caplog.text
    graph = dict(arr.data.__dask_graph__())
    name = arr.data.name
    reads = [k for k in graph if str(k[0]).startswith("read-band-")]
    assert {k[1] for k in reads} == {0, 1, 2}
    for key in reads:
        gates = [d for d in get_dependencies(graph, key) if str(d[0]).startswith("read-gate-")]
        if key[1] < 2:
            assert gates == []
            continue
        (gate,) = gates
        windows = {d[1:] for d in get_dependencies(graph, gate)}
        assert windows == {ij for ij, pieces in plan.of_window.items()
                           if any(b == key[1] - 2 for b, _ in pieces)}  # fmt: skip
        for i, j in windows:  # each done once its window is put together, of bands above
            assert get_dependencies(graph, ("read-done-" + name[5:], i, j)) == {(name, 0, 0, i, j)}
            assert all(b < key[1] for b, _ in plan.of_window[(i, j)])
    assert _bands_held_in_dask_order(arr.data) <= 2
    before = datasets.DECODED.snapshot()[1] + datasets.SCREENED.snapshot()[1]
    with dask.config.set(scheduler="threads", num_workers=3):
        got = arr.values
    np.testing.assert_array_equal(got, expected)
    done = datasets.DECODED.snapshot()[1] + datasets.SCREENED.snapshot()[1] - before
    assert done == 5 * 11 * 37 * 50 * 2  # BOA and QAI, every block once
    assert done == planned_decode(grid, layout, plan, 5, grid.count + 1)


@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["strips", "tiles"])
def test_bands_beyond_what_a_worker_holds_whole_are_read_as_a_plan_that_spills(
    tmp_path, blocks, caplog
):
    """Bands of all scenes that windows cross, which fit the memory the held bands may fill
    (``held_bytes``) but not the share a worker holds whole in memory (``in_memory_bytes``:
    Dask spills views of them, which frees nothing), are read as a plan that spills, where the
    spill disk is known: pieces that own their memory, the values of the files, every block
    decoded once; within that share, without a known disk, or where each band is a row of whole
    windows, they are held whole as before."""
    from treesits_dask.io.bands import plan_reads
    from treesits_dask.io.grid import WindowLayout

    expected, scenes, grid, layout, held, per_scene = _spilling_plan(tmp_path, blocks)
    budget = dict(held_bytes=held, spill_bytes=1 << 40)
    assert not plan_reads(grid, layout, 5, per_scene, **budget).spills
    assert not plan_reads(grid, layout, 5, per_scene, **budget, in_memory_bytes=held).spills
    plan = plan_reads(grid, layout, 5, per_scene, **budget, in_memory_bytes=held - 1)
    assert plan.spills and plan.bands and not plan.by_window and plan.sections == 1
    no_disk = dict(held_bytes=held, spill_bytes=None, in_memory_bytes=held - 1)
    assert not plan_reads(grid, layout, 5, per_scene, **no_disk).spills
    # bands that are each a row of whole windows (7-row strips in 14-row windows, 16 px blocks in
    # 16-row windows): held whole all the same
    rows = WindowLayout.of(grid, (14 if blocks is None else 16, 10))
    whole = plan_reads(grid, rows, 5, per_scene, **budget, in_memory_bytes=1)
    assert whole.bands and not whole.spills
    with caplog.at_level("INFO", logger="treesits_dask.io.cube"):
        arr = cube.tile_cube(scenes, grid, layout, DEFAULT_QAI_FLAGS, read_bytes=per_scene,
                             in_memory_bytes=held - 1, **budget)  # fmt: skip
    assert "what it holds whole of bands that windows cross" in caplog.text
    fn, args = _band_task(arr)
    assert all(isinstance(p, np.ndarray) and p.base is None for p in fn(*args) if p is not None)
    before = datasets.DECODED.snapshot()[1]
    with dask.config.set(scheduler="threads", num_workers=3):
        np.testing.assert_array_equal(arr.values, expected)
    assert datasets.DECODED.snapshot()[1] - before == 5 * 11 * 37 * 50 * 2  # every block once


def test_read_budget_of_the_reading_workers(tmp_path):
    """Read tasks share a reading worker's ``read_memory``; the bands held share 75 % of its
    limit among the tiles in flight that land on it, those held whole in memory half of it;
    GPU-only workers do not count."""
    from treesits_dask.config import RunConfig
    from treesits_dask.io.pieces import IN_MEMORY_SHARE
    from treesits_dask.pipeline.cluster import Routing
    from treesits_dask.pipeline.reading import HELD_SHARE, SPILL_SHARE, read_budget

    gib = 2**30
    workers = {
        "a": {"memory_limit": 48 * gib, "nthreads": 6, "resources": {"CPU": 1}},
        "b": {"memory_limit": 32 * gib, "nthreads": 4, "resources": {"CPU": 1}},
        "g": {"memory_limit": 8 * gib, "nthreads": 1, "resources": {"GPU": 1}},
    }
    cfg = RunConfig(cube="/x", model="m.pt", output=str(tmp_path / "out"), tiles_in_flight=4)
    got = read_budget(cfg, workers, Routing(read={"CPU": 1}, predict={"GPU": 1}))
    assert got.memory_limit == 32 * gib and got.threads == 10
    assert got.task_bytes == min(int(48 * gib * 0.25) // 6, int(32 * gib * 0.25) // 4)
    assert got.held_bytes == int(32 * gib * HELD_SHARE) // 2  # 4 tiles over 2 reading workers
    assert got.in_memory_bytes == int(32 * gib * IN_MEMORY_SHARE) // 2 < got.held_bytes
    assert got.spill_bytes is None  # no disks given: nothing counted on

    disks = {"a": 500 * gib, "b": 100 * gib, "g": 1 * gib}
    got = read_budget(cfg, workers, Routing(read={"CPU": 1}, predict={"GPU": 1}), disks)
    assert got.spill_bytes == int(100 * gib * SPILL_SHARE) // 2  # the GPU worker's disk not
    kube = cfg.model_copy(update={"cluster": "kubernetes"})
    got = read_budget(kube, workers, Routing(read={"CPU": 1}, predict={"GPU": 1}), disks)
    assert got.spill_bytes == int(20 * gib * SPILL_SHARE) // 2  # the pods' scratch volume (20Gi)
    # no worker advertises what the routing asks for: all of them count
    got = read_budget(cfg, workers, Routing(read={"TPU": 1}), disks)
    assert got.spill_bytes == int(1 * gib * SPILL_SHARE) // 2 and got.threads == 11


def test_a_spilling_tile_goes_to_the_reading_worker_with_the_fewest_tiles():
    """A tile whose read plan spills is given the reading worker that reads the fewest tiles in
    flight (the first by address among equals); with one reading worker, none (nothing to
    choose); GPU-only workers are not given one.  ``idle_reader``: whether one reads none."""
    from treesits_dask.pipeline.cluster import Routing
    from treesits_dask.pipeline.reading import idle_reader, spill_worker

    workers = {
        "tcp://b": {"nthreads": 2, "resources": {"CPU": 2}},
        "tcp://a": {"nthreads": 2, "resources": {"CPU": 2}},
        "tcp://g": {"nthreads": 1, "resources": {"GPU": 1}},
    }
    routing = Routing(read={"CPU": 1}, predict={"GPU": 1})
    assert spill_worker(workers, routing) == "tcp://a"
    assert spill_worker(workers, routing, ["tcp://a", None]) == "tcp://b"
    assert spill_worker(workers, routing, ["tcp://a", "tcp://b", "tcp://b"]) == "tcp://a"
    assert spill_worker(workers, routing, ["tcp://g", "tcp://a"]) == "tcp://b"
    assert spill_worker({"tcp://a": workers["tcp://a"]}, routing) is None
    assert spill_worker(workers, Routing()) == "tcp://a"  # unrouted: every worker reads
    assert spill_worker(workers, Routing(), ["tcp://a", "tcp://b"]) == "tcp://g"
    # beyond tiles_in_flight, a spilling tile starts while a reading worker reads none, and not
    # while a tile's worker has left (its read went on elsewhere, where is not known)
    assert idle_reader(workers, routing, ["tcp://a", None])
    assert not idle_reader(workers, routing, ["tcp://a", "tcp://b"])
    assert not idle_reader(workers, routing, ["tcp://a", "tcp://gone"])
    assert not idle_reader({"tcp://a": workers["tcp://a"]}, routing, [])  # one reader: no pin


def test_windows_of_all_scenes_must_fit_the_inference_workers():
    """A window holds every scene: where three per thread exceed 60 % of an inference worker's
    memory limit, the tile is refused with the sizes and the settings that fix it (measured: 600
    scenes in 200 x 200 px windows restart a 2-thread worker at 3 and 4 GiB, not at 5 GiB)."""
    from treesits_dask.pipeline.cluster import Routing
    from treesits_dask.pipeline.memory import window_memory_problem

    gib = 2**30

    def workers(limit, threads, res=None):
        return {"w": {"memory_limit": limit, "nthreads": threads, "resources": res or {}}}

    msg = window_memory_problem(600, 10, (200, 200), workers(3 * gib, 2), Routing())
    assert msg is not None
    for part in ("600 scenes", "200x200", "457.76 MiB", "3.00 GiB", "2 thread",
                 "(2.68 GiB)", "at least 4.47 GiB", "--memory-limit", "kubernetes.cpu.memory_limit",
                 "at most 1 thread(s)", "--threads-per-worker", "--window"):  # fmt: skip
        assert part in msg, (part, msg)
    assert window_memory_problem(600, 10, (200, 200), workers(4 * gib, 2), Routing())
    assert window_memory_problem(600, 10, (200, 200), workers(5 * gib, 2), Routing()) is None
    assert window_memory_problem(60, 10, (200, 200), workers(3 * gib, 2), Routing()) is None
    # not even one thread fits: no advice to use fewer threads
    one = window_memory_problem(600, 10, (250, 250), workers(1 * gib, 1), Routing())
    assert one is not None and "at most" not in one and "--memory-limit" in one
    # the default Kubernetes groups at 600 scenes of a 3000 px tile in 250 x 250 px windows
    kube = {
        "cpu": {"memory_limit": 48 * gib, "nthreads": 6, "resources": {"CPU": 6}},
        "gpu": {"memory_limit": 44 * gib, "nthreads": 2, "resources": {"GPU": 1}},
    }
    for routing in (Routing(), Routing(read={"CPU": 1}, predict={"GPU": 0.5})):
        assert window_memory_problem(600, 10, (250, 250), kube, routing) is None
    # only the workers that predict count: small GPU workers refuse what big CPU workers hold
    kube["gpu"]["memory_limit"] = 4 * gib
    gpu = Routing(read={"CPU": 1}, predict={"GPU": 0.5})
    assert window_memory_problem(600, 10, (250, 250), kube, gpu) is not None
    kube["cpu"]["memory_limit"] = 4 * gib
    assert window_memory_problem(600, 10, (250, 250), kube, gpu) is not None
    kube["gpu"]["memory_limit"] = 44 * gib  # inference on GPU workers: the small CPU ones read
    assert window_memory_problem(600, 10, (250, 250), kube, gpu) is None
    # unrouted inference may land on any worker, the small one too
    assert window_memory_problem(600, 10, (250, 250), kube, Routing()) is not None


def _spilling_plan(tmp_path, blocks):
    """A striped or tiled (``blocks``) tile of 5 scenes in 10 x 10 windows, and the read budget
    (held, task) under which its bands of all scenes do not fit memory but fit the spill disk."""
    from treesits_dask.io.bands import BANDS_HELD, plan_reads
    from treesits_dask.io.grid import WindowLayout

    root, expected = _striped_tile(tmp_path, blocks=blocks)
    _, scenes, grid = _grid(root)
    layout = WindowLayout.of(grid, (10, 10))
    held = BANDS_HELD * max(b.height for b in plan_reads(grid, layout, 5, 1 << 30).bands)
    held *= grid.width * grid.count * 2 * 5
    per_scene = held // BANDS_HELD // 5
    return expected, scenes, grid, layout, held, per_scene


def _band_task(arr):
    """The first read-band task of a cube's graph: (function, args)."""
    graph = dict(arr.data.__dask_graph__())
    band_key = next(k for k in graph if "read-band" in str(k[0]))
    fn, *args = graph[band_key]
    return fn, args


@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["strips", "tiles"])
def test_bands_that_do_not_fit_memory_are_decoded_once_into_pieces_of_their_own(
    tmp_path, blocks, caplog, monkeypatch
):
    """Bands of all scenes that exceed the reading worker's memory but fit with its spill disk
    are still read in bands (every block decoded once), in half-size batches whose pieces own
    their memory (where the worker has room for them; decoded into them scene by scene, no buffer
    of the whole batch's band), and equal the views of a band held in memory; on a
    LocalCluster whose worker has no room for them (every piece goes to local disk, see the next
    test), the values are those of the files, nothing is left on disk and Dask spills nothing."""
    import logging

    from distributed import Client, LocalCluster

    from treesits_dask.bench.measure import decoded, pieces_written, spilled
    from treesits_dask.io.bands import plan_reads
    from treesits_dask.io.buffers import RECYCLER

    expected, scenes, grid, layout, held, per_scene = _spilling_plan(tmp_path, blocks)
    spill = plan_reads(grid, layout, 5, 2 * per_scene, held_bytes=held - 1, spill_bytes=held)
    assert spill.spills and not spill.by_window and spill.bands
    assert len(spill.batches) == 5  # half of a 2-scene budget: one scene per task
    assert plan_reads(grid, layout, 5, 1 << 30, held_bytes=1, spill_bytes=0).by_window
    assert not plan_reads(grid, layout, 5, 1 << 30, held_bytes=held).spills

    caplog.set_level(logging.INFO, logger="treesits_dask.io.cube")
    arr = cube.tile_cube(
        scenes, grid, layout, DEFAULT_QAI_FLAGS, read_bytes=2 * per_scene, held_bytes=held - 1,
        spill_bytes=held,
    )  # fmt: skip
    assert "to the worker's local disk" in caplog.text and "X0010_Y0010" in caplog.text
    fn, args = _band_task(arr)
    asked, empty = [], RECYCLER.empty
    monkeypatch.setattr(
        RECYCLER, "empty", lambda shape, *a: asked.append(shape) or empty(shape, *a)
    )
    pieces = fn(*args)  # outside a Dask worker: in memory
    monkeypatch.undo()
    assert all(isinstance(p, np.ndarray) and p.base is None for p in pieces)
    # the pieces and a buffer of one scene, no band of the batch
    reader, band, start, stop = fn.func.__self__, *args
    one = (grid.count, band.height, grid.width)
    assert sorted(asked) == sorted([p.shape for p in pieces] + [one])
    views = reader.read_band(band, start, stop)  # the band read whole, cut into views
    assert all(v.base is not None for v in views) and len(views) == len(pieces)
    for p, v in zip(pieces, views, strict=True):
        np.testing.assert_array_equal(p, v)
    # each piece is a task of its own whose result is the piece: a window gets only its own
    graph = dict(arr.data.__dask_graph__())
    picks = [k for k in graph if str(k[0]).startswith("read-row-")]
    assert len(picks) == sum(len(b.pieces) for b in spill.bands) * len(spill.batches)

    def no_room() -> None:
        from treesits_dask.io import pieces

        pieces.IN_MEMORY_SHARE = 0.0

    def left(dask_worker) -> list:
        import os

        from treesits_dask.io.pieces import piece_directory

        return os.listdir(piece_directory())

    before = datasets.DECODED.snapshot()[1]
    cluster = LocalCluster(
        n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0",
        memory_limit="2GiB", local_directory=str(tmp_path / "scratch"),
    )  # fmt: skip
    with cluster, Client(cluster) as client:
        client.run(no_room)
        start = sum(v[1] for v in client.run(decoded).values())
        got = client.compute(arr.data, sync=True)
        done = sum(v[1] for v in client.run(decoded).values()) - start
        assert sum(client.run(pieces_written).values()) == 5 * 10 * 37 * 50 * 2  # every BOA px
        assert sum(client.run(spilled).values()) == 0
        deadline = time.monotonic() + 10
        while any(client.run(left).values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(client.run(left).values())  # released pieces are removed
        assert (tmp_path / "scratch").is_dir()
    np.testing.assert_array_equal(got, expected)
    assert datasets.DECODED.snapshot()[1] == before  # all read on the worker
    assert done == 5 * 11 * 37 * 50 * 2  # every block of every file once (BOA + QAI)


def test_a_spilling_read_is_pinned_to_its_worker_and_picks_its_pieces_first(tmp_path):
    """A plan that spills is read on the worker it is given (a loose restriction), and the tasks
    that pick each piece out of a batch's list come first (Dask priority 1 against 0), so that
    Dask never holds, spills and reads back a batch's whole list for one piece; a plan that does
    not spill is not annotated, whatever the worker."""
    expected, scenes, grid, layout, held, per_scene = _spilling_plan(tmp_path, None)
    arr = cube.tile_cube(
        scenes, grid, layout, DEFAULT_QAI_FLAGS, read_bytes=2 * per_scene, held_bytes=held - 1,
        spill_bytes=held, worker="tcp://10.0.0.7:4000",
    )  # fmt: skip
    layer = arr.data.__dask_graph__().layers[arr.data.name]
    ann = layer.annotations
    assert ann["workers"] == ["tcp://10.0.0.7:4000"] and ann["allow_other_workers"] is True
    first = {str(k[0]).split("-")[1] for k in layer if ann["priority"](k) == 1}
    later = {str(k[0]).split("-")[1] for k in layer if ann["priority"](k) == 0}
    assert first == {"row"} and "band" in later and "row" not in later
    held_in_memory = cube.tile_cube(
        scenes, grid, layout, DEFAULT_QAI_FLAGS, read_bytes=2 * per_scene, held_bytes=held,
        worker="tcp://10.0.0.7:4000",
    )  # fmt: skip
    assert not held_in_memory.data.__dask_graph__().layers[held_in_memory.data.name].annotations


@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["strips", "tiles"])
def test_pieces_go_to_local_disk_where_the_worker_has_no_room(tmp_path, blocks, monkeypatch):
    """Where the worker's memory has no room for a batch, a band's read writes each piece to a
    file of its own on local disk (scene by scene from a buffer of one scene: no memory of the
    batch) and hands out :class:`DiskPiece`\\ s that Dask counts as a few bytes; they read back
    (straight into a window, or through a buffer) to the values of the band read in memory, go to
    another process as those arrays, and their files are removed once released.  A read that
    fails leaves no file behind; a full disk is a :class:`ClusterError` that names the directory
    and says what to do."""
    import errno
    import os
    import pickle

    from dask.sizeof import sizeof

    from treesits_dask.errors import ClusterError
    from treesits_dask.io import pieces as disk
    from treesits_dask.io import reader as reader_module
    from treesits_dask.io.buffers import RECYCLER
    from treesits_dask.io.reader import assemble
    from treesits_dask.pipeline.plugins import PieceFiles

    monkeypatch.setattr(disk.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(disk, "_DIR", {})
    expected, scenes, grid, layout, held, per_scene = _spilling_plan(tmp_path, blocks)
    arr = cube.tile_cube(
        scenes, grid, layout, DEFAULT_QAI_FLAGS, read_bytes=4 * per_scene, held_bytes=held - 1,
        spill_bytes=held,
    )  # fmt: skip
    fn, args = _band_task(arr)
    reader, band, start, stop = fn.func.__self__, *args
    assert stop - start > 1
    monkeypatch.setattr(reader_module, "in_memory", lambda nbytes: False)
    asked, empty = [], RECYCLER.empty
    monkeypatch.setattr(
        RECYCLER, "empty", lambda shape, *a: asked.append(shape) or empty(shape, *a)
    )
    written = disk.WRITTEN.count
    got = fn(*args)
    assert asked == [(grid.count, band.height, grid.width)]  # one scene's band, nothing more
    monkeypatch.setattr(RECYCLER, "empty", empty)
    views = reader.read_band(band, start, stop)
    assert all(isinstance(p, disk.DiskPiece) for p in got) and len(got) == len(views)
    assert disk.WRITTEN.count - written == sum(v.nbytes for v in views)
    directory = disk.piece_directory()
    assert directory.startswith(str(tmp_path / "tmp"))
    assert sorted(os.listdir(directory)) == sorted(os.path.basename(p.path) for p in got)
    for p, v in zip(got, views, strict=True):
        assert sizeof(p) < 1000 < v.nbytes
        np.testing.assert_array_equal(p.load(), v)
        np.testing.assert_array_equal(pickle.loads(pickle.dumps(p)), v)  # to another process
    # a window put together from pieces on disk, in memory or sent as arrays: the same window
    piece, view = got[0], views[0]
    n, h = view.shape[0], view.shape[2]
    shape = (n, grid.count, h + 3, view.shape[3])
    where = ((0, n, 0, h), (0, n, h, h + 3))
    rest = np.full((n, grid.count, 3, view.shape[3]), 7, np.int16)
    for first in (piece, view, pickle.loads(pickle.dumps(piece))):
        window = assemble(shape, None, where, [first, rest])  # first rows: through a buffer
        np.testing.assert_array_equal(window[:, :, :h], view)
        assert (window[:, :, h:] == 7).all()
    whole = assemble(view.shape, None, ((0, n, 0, h),), [piece])  # straight into the window
    np.testing.assert_array_equal(whole, view)
    remove = disk._remove
    monkeypatch.setattr(disk, "_remove", lambda path: time.sleep(0.05) or remove(path))
    del got, piece, first, p  # released: removed in the background, 50 ms a file here
    assert os.listdir(directory)
    PieceFiles().teardown()  # a closing worker waits until they are gone
    assert os.listdir(directory) == []
    monkeypatch.setattr(disk, "_remove", remove)

    # a read that fails half way removes what it wrote
    calls, read_scene = [], reader_module.WindowReader._read_scene

    def fail_second(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise InputDataError("broken scene")
        return read_scene(self, *a, **k)

    monkeypatch.setattr(reader_module.WindowReader, "_read_scene", fail_second)
    with pytest.raises(InputDataError, match="broken scene"):
        fn(*args)
    assert os.listdir(directory) == []
    monkeypatch.setattr(reader_module.WindowReader, "_read_scene", read_scene)

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(disk.os, "pwrite", full)
    with pytest.raises(ClusterError, match="no room left in .*treesits-pieces.*scratch_size"):
        fn(*args)
    assert os.listdir(directory) == []


def test_reads_visit_the_scenes_in_turns_so_that_kept_files_are_not_all_opened_again(
    tmp_path, monkeypatch
):
    """A thread that keeps fewer files open than a tile has (6 of 10 here) reads the scenes
    forwards and backwards in turn: its second read of the tile opens only the files the first
    did not leave open, not every file again: 6 (a read screens one scene ahead, see
    ``WindowReader._scenes``, so the files it leaves open are not exactly those of its last three
    scenes); read forwards again, it would open all 10."""
    from treesits_dask.io.grid import Window
    from treesits_dask.io.reader import WindowReader

    root, expected = _striped_tile(tmp_path, blocks=(16, 16))
    _, scenes, grid = _grid(root)
    reader = WindowReader(grid, tuple(s.boa for s in scenes), tuple(s.qai for s in scenes),
                          tuple(DEFAULT_QAI_FLAGS))  # fmt: skip
    datasets.forget_datasets()
    monkeypatch.setattr(datasets, "_CAPACITY", 6)
    opens = []
    for window in (Window(0, 0, 16, 16), Window(16, 16, 16, 16)):
        before = cube.OPEN_COUNTER.count
        got = reader.read(window)
        opens.append(cube.OPEN_COUNTER.count - before)
        np.testing.assert_array_equal(got, expected[:, :, window.rows, window.cols])
    assert opens == [10, 6]
    datasets.forget_datasets()


def test_gdal_block_cache_of_a_reading_process_follows_its_memory_limit(tmp_path, monkeypatch):
    """GDAL's block cache of a process that reads scenes is a share of its worker's memory limit,
    between 64 and 256 MiB: the blocks of the files a thread keeps open stay in it, memory Dask
    can neither see nor spill (a 3 GiB worker spilled its bands to disk for it); a reading worker
    sets it at its first open."""
    from distributed import Client, LocalCluster

    from treesits_dask.io.remote import gdal_cache_max

    for limit, want in ((1 * 2**30, 64 * 2**20), (3 * 2**30, int(3 * 2**30 * 0.04)),
                        (12 * 2**30, 256 * 2**20)):  # fmt: skip
        monkeypatch.setattr(datasets, "worker_memory_limit", lambda limit=limit: limit)
        assert datasets.read_cache_bytes() == want
    monkeypatch.undo()

    root, _ = _striped_tile(tmp_path, blocks=(16, 16))
    _, scenes, _grid_ = _grid(root)

    def open_one():
        with datasets.dataset(scenes[0].boa, None, lambda src, georeferenced=True: None):
            return gdal_cache_max()

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                           dashboard_address=":0", memory_limit="3GiB")  # fmt: skip
    with cluster, Client(cluster) as client:
        assert client.submit(open_one, pure=False).result() == int(3 * 2**30 * 0.04)  # a task


def test_kept_datasets_are_bounded_by_memory(tmp_path, monkeypatch):
    """The datasets a process keeps open are bounded by the memory they hold (an open GeoTIFF
    keeps decoded blocks); a file closed for room and opened again is not checked again."""
    root, _ = _striped_tile(tmp_path, blocks=(16, 16))
    _, scenes, _grid_ = _grid(root)
    files = [s.boa for s in scenes]
    datasets.forget_datasets()
    with datasets.open_raster(files[0]) as src:
        each = datasets.held_by(src)
    assert each > 16 * 16 * 2  # pixel-interleaved: blocks of all bands
    monkeypatch.setattr(datasets, "_BUDGET", 2 * each)
    checks: list[str] = []
    opens = cube.OPEN_COUNTER.count
    for _ in range(2):
        for f in files:
            with datasets.dataset(f, None, lambda s, georeferenced=True, f=f: checks.append(f)):
                pass
    assert sorted(checks) == sorted(files)  # each checked once, though reopened
    assert cube.OPEN_COUNTER.count - opens == 2 * len(files)  # 2 kept: each read opened again
    assert datasets.kept_datasets() == (2, 2 * each)
    datasets.forget_datasets()


def test_kept_datasets_give_way_to_the_rest_of_the_memory(tmp_path, monkeypatch):
    """Idle datasets are closed where the rest of the process's memory leaves them no room under
    the share of the limit at which Dask spills (as on a small worker streaming a tile's 1200
    files), and kept again once there is room; a thread of the process looks at its memory, and
    gives the heap's free memory back to the system after closing datasets for lack of room (not
    after closing them for a new run)."""
    import threading

    import dask

    from treesits_dask.io.buffers import process_rss

    root, _ = _striped_tile(tmp_path, blocks=(16, 16))
    _, scenes, _grid_ = _grid(root)
    files = [s.boa for s in scenes]
    with datasets.open_raster(files[0]) as src:
        each = datasets.held_by(src)  # the same for every file of the tile

    def read_twice() -> tuple[int, tuple[int, int]]:
        datasets.forget_datasets()
        datasets._POOL.look()  # the memory looked at now, under the settings of the moment
        opens = cube.OPEN_COUNTER.count
        for _ in range(2):
            for f in files:
                with datasets.dataset(f, None, lambda s, georeferenced=True: None) as src:
                    src.read(1, window=((0, 8), (0, 8)))
        return cube.OPEN_COUNTER.count - opens, datasets.kept_datasets()

    def trimmed_since(trims: int) -> bool:
        for _ in range(100):
            if datasets.TRIMS.count > trims:
                return True
            time.sleep(datasets.MEMORY_SECONDS)
        return False

    monkeypatch.setattr(datasets, "TRIM_BYTES", 1)  # the test's files hold a few kB each
    monkeypatch.setattr(datasets, "TRIM_SECONDS", 0.0)
    limit = datasets.memory_budget() / datasets.KEPT_SHARE  # this process's limit
    under = process_rss() / 2 / limit  # a spill share at half of what the process holds now
    try:
        trims = datasets.TRIMS.count
        with dask.config.set({"distributed.worker.memory.spill": under}):
            assert read_twice() == (2 * len(files), (0, 0))  # each closed as given back
            assert trimmed_since(trims)  # by the thread, within a look or two
        datasets._POOL.look()
        trims = datasets.TRIMS.count
        assert read_twice() == (len(files), (len(files), len(files) * each))
        time.sleep(3 * datasets.MEMORY_SECONDS)
        assert datasets.TRIMS.count == trims  # closed for the new run only: nothing given back
        assert "treesits-kept-datasets" in {t.name for t in threading.enumerate()}
        # kept, until the memory leaves no room: the thread closes them without a read
        with dask.config.set({"distributed.worker.memory.spill": under}):
            for _ in range(100):
                if datasets.kept_datasets() == (0, 0):
                    break
                time.sleep(datasets.MEMORY_SECONDS)
            assert datasets.kept_datasets() == (0, 0)
    finally:
        datasets._POOL.look()  # the room under the settings restored, for the tests after
        datasets.forget_datasets()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_forked_child_starts_its_pool_afresh():
    """A child forked while the pool's lock is held (its thread looks at the memory ten times a
    second) can take the lock, and reads its own memory, not its parent's."""
    from treesits_dask.io import buffers

    buffers.process_rss()  # the parent's psutil.Process, cached
    read, write = os.pipe()
    with datasets._POOL.lock:
        pid = os.fork()
        if pid == 0:  # the child: report and leave at once, whatever happens
            ok = False
            try:
                took = datasets._POOL.lock.acquire(timeout=2)
                buffers.process_rss()
                ok = took and buffers._PROCESS.pid == os.getpid() and not datasets._POOL.rest
            finally:
                os.write(write, b"1" if ok else b"0")
                os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"1"


def test_a_child_forked_after_gdal_threads_started_does_not_open_files_for_them(
    tmp_path, monkeypatch
):
    """GDAL's pool of threads is not remade in a forked child: a multi-threaded read there waits
    for threads it does not have (a child's read of a file opened with ``NUM_THREADS`` after its
    parent's hung).  A child forked after its process opened a file for GDAL's multi-threaded read
    opens its files the ordinary way, and reads them."""
    from rasterio.windows import Window as RioWindow

    monkeypatch.setattr(datasets._POOL, "forwards", False)  # no CPU forward in this process
    root, _ = _striped_tile(tmp_path, h=512, w=512, blocks=(256, 256))
    _, scenes, _grid_ = _grid(root)
    check = lambda src, georeferenced=True: None  # noqa: E731
    window = RioWindow(0, 0, 512, 256)  # two blocks: GDAL's threads
    datasets.forget_datasets()
    datasets._POOL.take(("none", None))  # the new generation
    datasets._POOL.lean = True
    version = (scenes[0].size, scenes[0].mtime)
    with datasets.dataset(scenes[0].boa, version, check, lean=True) as src:
        assert src.options.get("NUM_THREADS")
        want = src.read(window=window)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave, whatever happens (killed if the read hangs)
        ok = False
        try:
            datasets._POOL.take(("none", None))
            datasets._POOL.lean = True  # as if it had run short
            lent = datasets.dataset(scenes[1].boa, None, check, lean=True)
            with lent as src:
                got = src.read(window=window)
            ok = "NUM_THREADS" not in src.options and not lent.lean and got.shape == want.shape
            # the parent's kept file, opened for GDAL's threads: opened again the ordinary way
            with datasets.dataset(scenes[0].boa, version, check, lean=True) as src:
                again = src.read(window=window)
            ok = ok and not datasets.threaded(src) and (again == want).all()
        finally:
            os.write(write, b"1" if ok else b"0")
            os._exit(0)
    os.close(write)
    answered = select.select([read], [], [], 30)[0]
    answer = os.read(read, 1) if answered else b"hung"
    os.close(read)
    if not answered:
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    assert answer == b"1"
    datasets.forget_datasets()


def _checked_files(tmp_path, crs_seen: bool = False):
    """The BOA files of a striped tile, after :func:`datasets.forget_datasets`, with the header
    checks that reads of them record (``check(f)``; ``crs_seen``: each asserts the dataset it
    checks has a CRS) and the list they record into."""
    import threading

    root, _ = _striped_tile(tmp_path, blocks=(16, 16))
    _, scenes, _grid_ = _grid(root)
    datasets.forget_datasets()
    checks: list[str] = []
    lock = threading.Lock()

    def check(f):
        def record(src, georeferenced=True):
            if crs_seen:
                assert src.crs is not None  # a check sees the georeferencing
            with lock:
                checks.append(f)

        return record

    return [s.boa for s in scenes], checks, check


def test_the_threads_of_a_process_share_its_kept_datasets(tmp_path):
    """The threads of a worker share the datasets it keeps: a file is opened once for all of
    them (each dataset lent to one thread at a time), so a tile whose files fit the process's
    budget is opened once per read, not once per thread; a dataset whose read raised is closed,
    not kept; a new generation (a new run) closes what is kept and lent, and checks every file
    again."""
    from concurrent.futures import ThreadPoolExecutor

    import rasterio
    from rasterio.windows import Window as RioWindow

    files, checks, check = _checked_files(tmp_path)

    def visit(k: int) -> list:
        order = files if k % 2 else files[::-1]
        out = {}
        for f in order:
            with datasets.dataset(f, None, check(f)) as src:
                out[f] = src.read(window=RioWindow(3, 5, 20, 17))
        return [out[f] for f in files]

    opens = cube.OPEN_COUNTER.count
    for k in range(3):  # three threads, one after the other: one open of each file for all
        with ThreadPoolExecutor(1) as pool:
            pool.submit(visit, k).result()
    assert cube.OPEN_COUNTER.count - opens == len(files)
    # at once: threads that want a file at the same moment each get a dataset of it, and the
    # pool keeps them all (they would want it at once again): at most two more of each file
    opens = cube.OPEN_COUNTER.count
    with ThreadPoolExecutor(3) as pool:
        found = list(pool.map(visit, range(12)))
    assert cube.OPEN_COUNTER.count - opens <= 2 * len(files)
    assert sorted(checks) == sorted(files)  # each file checked once in the process
    kept = datasets.kept_datasets()[0]
    assert len(files) <= kept <= 3 * len(files)
    for t, f in enumerate(files):
        with rasterio.open(f) as src:
            want = src.read(window=RioWindow(3, 5, 20, 17))
        for got in found:
            np.testing.assert_array_equal(got[t], want)

    opens = cube.OPEN_COUNTER.count
    visit(1)
    assert cube.OPEN_COUNTER.count == opens  # every file kept, lent again

    with pytest.raises(ValueError), datasets.dataset(files[0], None, check(files[0])):
        raise ValueError("a read that fails")
    assert datasets.kept_datasets()[0] == kept - 1  # closed, not kept

    lent = datasets.dataset(files[1], None, check(files[1]))
    datasets.forget_datasets()  # a new run, while a dataset is lent
    with lent as src:
        src.read(window=RioWindow(0, 0, 4, 4))
    assert datasets.kept_datasets() == (0, 0)  # idle ones closed, the lent one at its return
    visit(1)
    assert sorted(checks) == sorted(2 * files)  # the new generation checked every file again
    datasets.forget_datasets()


def test_reopened_files_skip_their_georeferencing_and_read_the_same(tmp_path, monkeypatch):
    """A file whose header a thread of the process has checked is not checked again by any
    thread, and is opened again (closed for room, or by two threads at once) without its
    georeferencing (GDAL's CRS from the GeoTIFF keys was
    about 1 ms of an open's 1.4), which reads the same values, without a warning in the logs."""
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    import rasterio
    from rasterio.windows import Window as RioWindow

    files, checks, check = _checked_files(tmp_path, crs_seen=True)

    def visit() -> list:
        found = []
        for f in files:
            with datasets.dataset(f, None, check(f)) as src:
                found.append((src.crs, src.read(window=RioWindow(3, 5, 20, 17))))
        return found

    first = visit()  # opened and checked here: georeferenced
    monkeypatch.setattr(datasets, "_BUDGET", 1)  # every dataset closed for room as given back
    with datasets.dataset(files[0], None, check(files[0])):  # and those kept now, at its return
        pass
    with ThreadPoolExecutor(2) as pool:  # other threads: opened again
        others = [f.result() for f in [pool.submit(visit) for _ in range(2)]]
    others.append(visit())  # and here
    assert sorted(checks) == sorted(files)  # one check per file and process
    assert all(crs is not None for crs, _ in first)
    for found in others:
        assert all(crs is None for crs, _ in found)  # no georeferencing read
        for (_, a), (_, b) in zip(first, found, strict=True):
            np.testing.assert_array_equal(a, b)
    with rasterio.open(files[0]) as src:
        np.testing.assert_array_equal(src.read(window=RioWindow(3, 5, 20, 17)), first[0][1])
    datasets.forget_datasets()  # a new generation checks every file again
    visit()
    assert len(checks) == 2 * len(files)
    datasets.forget_datasets()
    # rasterio warns of every file opened so (pytest shows every warning: a process of its own)
    code = (
        "from treesits_dask.io import datasets; import sys; "
        "print(datasets.open_raster(sys.argv[1], georeferenced=False).crs)"
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code, files[0]],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "None" and "NotGeoreferenced" not in done.stderr, done.stderr


def test_files_the_driver_checked_skip_their_georeferencing_until_they_change(
    tmp_path, monkeypatch
):
    """A reader told that the run's driver checked its scenes' headers (``checked``) opens a local
    file still at the version the scene table lists without its georeferencing, and checks only
    its bands and size; a file changed since (another mtime) is opened and checked in full, so a
    file replaced by one of another grid is still named.  The values are the same either way."""
    import os

    import rasterio

    from treesits_dask.io.grid import Window

    root, _ = _striped_tile(tmp_path, blocks=(16, 16))
    _, scenes, grid = _grid(root)
    opened: list[tuple[str, bool]] = []
    real_open = datasets.open_raster

    def open_raster(url, georeferenced=True, threads=None):
        opened.append((url, georeferenced))
        return real_open(url, georeferenced, threads)

    monkeypatch.setattr(datasets, "open_raster", open_raster)
    window = Window(0, 0, 37, 50)
    datasets.forget_datasets()
    want = cube.WindowReader.of_scenes(grid, scenes, DEFAULT_QAI_FLAGS).read(window)
    assert opened and all(georef for _, georef in opened)  # not told: every file in full
    assert all(datasets.unchanged(s.boa, (s.size, s.mtime)) for s in scenes)
    checked = cube.WindowReader.of_scenes(grid, scenes, DEFAULT_QAI_FLAGS, checked=scenes[1:])
    assert checked.verified == (False, *[True] * (len(scenes) - 1))
    for _ in range(2):  # two runs (each a new generation of kept datasets), the same each time
        opened.clear()
        datasets.forget_datasets()
        np.testing.assert_array_equal(checked.read(window), want)
        assert {u for u, georef in opened if georef} == {scenes[0].boa, scenes[0].qai}

    # scene 2 replaced (a new mtime) by a file of another grid: opened in full, and named
    boa = scenes[2].boa
    with rasterio.open(boa) as src:
        profile, data = src.profile, src.read()
    profile["transform"] = profile["transform"] @ rasterio.Affine.translation(16, 0)
    os.unlink(boa)
    with rasterio.open(boa, "w", **profile) as dst:
        dst.write(data)
    stat = os.stat(boa)
    os.utime(boa, (stat.st_atime, stat.st_mtime + 10))
    assert not datasets.unchanged(boa, (scenes[2].size, scenes[2].mtime))
    datasets.forget_datasets()
    with pytest.raises(InputDataError, match=f"{boa} is on another grid"):
        checked.read(window)
    datasets.forget_datasets()
    assert not datasets.unchanged("s3://bucket/a.tif", (1, "x"))  # remote: a request, not asked
    assert not datasets.unchanged(boa, None)


def test_kept_striped_files_count_what_their_compressed_strips_hold(tmp_path):
    """A file in full-width strips of one band each is counted by its compressed size (its
    version's first item): at 3000 px, a well-compressed one less than two decoded strips (what
    was counted before, 1.7x what a 3000 px FORCE-like BOA measured), noise that LZW cannot
    compress more; the kept dataset is counted so."""
    import rasterio

    rng = np.random.default_rng(3)
    profile = dict(driver="GTiff", width=3000, height=600, count=2, dtype="int16", compress="lzw",
                   tiled=False, blockysize=300, interleave="band")  # fmt: skip
    held = {}
    for name, data in (("noise", rng.integers(0, 10000, (2, 600, 3000))), ("flat", None)):
        path = tmp_path / f"{name}.tif"
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.zeros((2, 600, 3000), np.int16) if data is None else data.astype(np.int16))
        size = path.stat().st_size
        with rasterio.open(path) as src:
            assert src.block_shapes[0] == (300, 3000)
            held[name] = datasets.held_by(src, size)
            before = datasets.held_by(src)  # no size known: two decoded strips
            assert held[name] >= 1.5 * size / 4  # its mean compressed strip, 1.5 times
        datasets.forget_datasets()
        with datasets.dataset(str(path), (size, 0.0), lambda s, georeferenced=True: None):
            assert datasets.kept_datasets() == (1, held[name])
        datasets.forget_datasets()
    assert held["flat"] < before < held["noise"]
    assert before == 2 * 300 * 3000 * 2 + 128 * 2**10


@pytest.mark.parametrize("blocks", [None, (256, 256)], ids=["strips", "tiles"])
def test_scene_files_are_opened_lean_once_the_pool_runs_short_of_memory(
    tmp_path, monkeypatch, blocks
):
    """Where the pool has had to close datasets for its memory in this generation, the BOA files
    it opens next are opened for GDAL's multi-threaded read (``NUM_THREADS``) and counted
    :data:`~treesits_dask.io.datasets.LEAN_HELD` (they keep no decoded block): the same values;
    QAI files are never opened so; a read of one block of a pixel-interleaved file (GDAL's
    ordinary path, which keeps one) counts it whole; a new generation opens files whole again."""
    from rasterio.windows import Window as RioWindow

    from treesits_dask.io.grid import Window

    monkeypatch.setattr(datasets._POOL, "forwards", False)  # no CPU forward in this process
    root, expected = _striped_tile(tmp_path, h=512, w=512, blocks=blocks)
    _, scenes, grid = _grid(root)
    reader = cube.WindowReader.of_scenes(grid, scenes, DEFAULT_QAI_FLAGS)  # with versions
    whole_tile = Window(0, 0, 512, 512)

    def kept() -> list:
        return [
            (url, src.options.get("NUM_THREADS"), n, whole)
            for (url, _), entries in datasets._POOL.idle.items()
            for src, n, whole in entries
        ]

    datasets.forget_datasets()
    np.testing.assert_array_equal(reader.read(whole_tile), expected)
    assert len(kept()) == 10 and all(threads is None for _, threads, _, _ in kept())
    assert not datasets._POOL.lean and datasets.kept_datasets()[0] == 10

    boa = scenes[0].boa
    with datasets.open_raster(boa) as src:
        each = datasets.held_by(src, scenes[0].size)
    assert each > datasets.LEAN_HELD
    datasets.forget_datasets()
    monkeypatch.setattr(datasets, "_BUDGET", 2 * each)  # closes for its memory: then lean
    for _ in range(2):
        np.testing.assert_array_equal(reader.read(whole_tile), expected)
    assert datasets._POOL.lean
    lean = [k for k in kept() if k[1] is not None]
    assert lean and all(url.endswith("_BOA.tif") for url, *_ in lean)
    assert all(t == str(datasets.decode_threads()) and n in (datasets.LEAN_HELD, w)
               for _, t, n, w in lean)  # fmt: skip
    # counted whole only where a read of one block of a tiled file took GDAL's ordinary path
    assert any(n == datasets.LEAN_HELD < w for _, _, n, w in lean)
    assert blocks is not None or all(n == datasets.LEAN_HELD for _, _, n, _ in lean)
    assert datasets.kept_datasets()[1] == sum(n for _, _, n, _ in kept())
    assert datasets.decode_threads() >= 2

    # one block of a pixel-interleaved file: GDAL's ordinary path, counted whole from then on
    datasets.forget_datasets()
    monkeypatch.setattr(datasets, "_BUDGET", 1 << 40)
    datasets._POOL.take(("none", None))  # the new generation: not lean
    assert not datasets._POOL.lean
    datasets._POOL.lean = True
    check = lambda src, georeferenced=True: None  # noqa: E731
    out = np.empty((10, 100, 300), np.int16)
    for scene, window, one in ((scenes[1], RioWindow(0, 0, 100, 100), True),
                               (scenes[2], RioWindow(200, 0, 100, 100), False)):  # fmt: skip
        url, before = scene.boa, datasets.kept_datasets()[1]
        lent = datasets.dataset(url, (scene.size, scene.mtime), check, lean=True)
        with lent as src:
            assert src.options.get("NUM_THREADS") == str(datasets.decode_threads())
            assert lent.lean and datasets.kept_datasets()[1] - before == datasets.LEAN_HELD
            src.read(window=window, out=out[:, :, : window.width])
            np.testing.assert_array_equal(
                out[:, :, : window.width],
                rasterio_read(url, window),
            )
            lent.count_reads([window])
        grew = datasets.kept_datasets()[1] - before
        single = one and blocks is not None
        assert datasets.ordinary_read(src, window) == single
        assert grew == (lent.whole if single else datasets.LEAN_HELD)
    with datasets.dataset(scenes[3].qai, None, check, lean=False) as src:
        assert "NUM_THREADS" not in src.options  # the caller's say: a QAI file

    # a CPU forward in this process: no more files opened for GDAL's threads, and those kept so
    # are opened again the ordinary way as they are lent
    from treesits_dask.pipeline.predict import FORWARDS_IN_PROGRESS

    with FORWARDS_IN_PROGRESS:
        assert datasets._POOL.forwards
    for scene in scenes[1:3]:
        opens = cube.OPEN_COUNTER.count
        with datasets.dataset(scene.boa, (scene.size, scene.mtime), check, lean=True) as src:
            assert not datasets.threaded(src) and cube.OPEN_COUNTER.count == opens + 1
    with datasets.dataset(
        scenes[4].boa, (scenes[4].size, scenes[4].mtime), check, lean=True
    ) as src:
        assert not datasets.threaded(src)
    datasets._POOL.forwards = False

    datasets.forget_datasets()
    np.testing.assert_array_equal(reader.read(whole_tile), expected)
    assert not datasets._POOL.lean and all(t is None for _, t, _, _ in kept())
    datasets.forget_datasets()


def rasterio_read(url, window) -> np.ndarray:
    """``window`` of every band of ``url``, read by rasterio alone."""
    import rasterio

    with rasterio.open(url) as src:
        return src.read(window=window)


def test_read_tasks_fill_the_reading_threads_turns(tmp_path):
    """A tile's bands are read in more batches of scenes than its memory needs where their tasks
    would leave reading threads idle in the last turn: 10 bands of 3000 px x 120 scenes in 2
    batches are 20 tasks, of which a 6-thread worker runs 2 alone in its fourth turn; 3 batches fill
    5 turns.  The values and the blocks decoded once are unchanged."""
    from treesits_dask.io.bands import FULL_TURNS, balanced_batches, plan_reads, turn_share
    from treesits_dask.io.grid import WindowLayout

    assert turn_share(20, 6) == pytest.approx(20 / 24) and turn_share(30, 6) == 1.0
    assert balanced_batches(10, 2, 120, 6) == 3  # the Kubernetes read worker's 6 threads
    assert balanced_batches(10, 2, 120, 2) == 2  # this machine's 2: already full turns
    assert balanced_batches(10, 2, 120, 4) == 2
    assert balanced_batches(10, 2, 120, 16) == 3  # 30 / 32
    assert balanced_batches(10, 2, 120, 12) == 6  # 60 / 60 (20, 30, 40, 50: 5/6 of the turns)
    assert balanced_batches(10, 2, 2, 6) == 2  # never more batches than scenes
    for bands in range(1, 13):
        for threads in range(1, 25):
            for fewest in range(1, 6):
                b = balanced_batches(bands, fewest, 40, threads)
                assert fewest <= b <= 4 * fewest
                share = turn_share(bands * b, threads)
                best = max(turn_share(bands * c, threads) for c in range(fewest, 4 * fewest + 1))
                assert share >= FULL_TURNS or share == best

    root, expected = _striped_tile(tmp_path)
    _, scenes, grid = _grid(root)
    layout = WindowLayout.of(grid, (10, 10))
    plan = plan_reads(grid, layout, 5, 1 << 30, min_tasks=4)
    assert len(plan.bands) == 3 and len(plan.batches) == 4  # 12 tasks: 3 full turns of 4 threads
    assert len(plan_reads(grid, layout, 5, 1 << 30, min_tasks=2).batches) == 2  # 6 tasks
    arr = cube.tile_cube(scenes, grid, layout, DEFAULT_QAI_FLAGS, min_read_tasks=4)
    before = datasets.DECODED.snapshot()[1]
    with dask.config.set(scheduler="threads", num_workers=4):
        got = arr.values
    np.testing.assert_array_equal(got, expected)
    assert datasets.DECODED.snapshot()[1] - before == 5 * 11 * 37 * 50 * 2  # every block once


def test_open_cube_reads_every_header_and_finds_each_scenes_layout(tmp_path, monkeypatch):
    """``open_cube`` (notebooks) reads every scene's header as a run's driver does: a middle scene
    that a newer FORCE wrote as a COG among strips (the first and the newest scene alone show
    strips) is found and read in blocks of its own, the cube equal to the strips', and a scene
    of another grid raises an error naming its file before anything is read."""
    import rasterio

    from tests.two_layouts import TILE as tile
    from tests.two_layouts import to_cogs, two_layouts
    from treesits_dask import open_cube

    cubes, folder = two_layouts(tmp_path, size=60, n=5)
    grown = folder.parent
    boas = sorted(folder.glob("*_SEN2?_BOA.tif"))
    to_cogs(cubes, folder, [boas[2].name])

    seen = []
    real = cube.tile_cube
    monkeypatch.setattr(cube, "tile_cube", lambda scenes, *a, **k: seen.append(scenes)
                        or real(scenes, *a, **k))  # fmt: skip
    got = open_cube(str(grown), tile)
    assert [s.block_shape for s in seen[-1]] == [(6, 60)] * 2 + [(256, 256)] + [(6, 60)] * 2
    want = open_cube(cubes["strips"].root, tile)
    np.testing.assert_array_equal(got.values, want.values)

    with rasterio.open(boas[3]) as f:
        profile = f.profile
    profile.update(width=20, height=20)
    with rasterio.open(boas[3], "w", **profile) as f:
        f.write(np.zeros((profile["count"], 20, 20), profile["dtype"]))
    with pytest.raises(InputDataError, match=boas[3].name):
        open_cube(str(grown), tile)
