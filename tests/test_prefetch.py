"""Prefetching the next scene's compressed bytes: the byte ranges are exactly the blocks a read
decodes, the kernel reads them in the background, and reads return the same with it as without."""

import os
import time

import numpy as np
import pytest
import rasterio

from tests.test_cube import _grid, _striped_tile
from treesits_dask.config import DEFAULT_QAI_FLAGS
from treesits_dask.io import datasets, prefetch
from treesits_dask.io.grid import Window
from treesits_dask.io.reader import WindowReader


def _write(path, data, blocks, interleave):
    """An uncompressed GeoTIFF of ``data`` (bands, h, w) in strips (``blocks`` None, rows per
    strip 50) or tiles of ``blocks``."""
    bands, h, w = data.shape
    prof = dict(driver="GTiff", dtype="int16", width=w, height=h, count=bands)
    prof.update(interleave=interleave)
    if blocks:
        prof.update(tiled=True, blockysize=blocks[0], blockxsize=blocks[1])
    else:
        prof.update(tiled=False, blockysize=50)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)


def _block_bytes(data, interleave, rows, cols) -> list[bytes]:
    """What the file stores for the block of ``rows`` x ``cols``: each band apart, or the bands of
    each pixel side by side."""
    part = data[:, rows[0] : rows[1], cols[0] : cols[1]]
    if interleave == "band":
        return [b.tobytes() for b in part]
    return [np.ascontiguousarray(part.transpose(1, 2, 0)).tobytes()]


@pytest.mark.parametrize(
    "blocks, interleave, rows, cols, runs, expect",
    [
        # strips of 50 rows: rows 100:200 of the tile are strips 2 and 3 of each band
        (None, "band", (100, 200), (0, 384), [(0, 100, 0, 384)], [((100, 150), (0, 384)),
                                                                 ((150, 200), (0, 384))]),
        # a run of rows 10:20 of the rectangle lies in strip 2 alone
        (None, "band", (100, 200), (0, 384), [(10, 20, 0, 384)], [((100, 150), (0, 384))]),
        # tiles of 64 x 128, the bands of each pixel side by side: of the rectangle rows 64:256,
        # only the blocks the runs touch
        ((64, 128), "pixel", (64, 256), (0, 384), [(0, 64, 0, 128), (64, 128, 200, 300)],
         [((64, 128), (0, 128)), ((128, 192), (128, 256)), ((128, 192), (256, 384))]),
    ],
    ids=["strips-band", "strips-band-part", "tiles-pixel"],
)  # fmt: skip
def test_block_ranges_are_the_bytes_of_the_blocks_the_runs_touch(
    tmp_path, monkeypatch, blocks, interleave, rows, cols, runs, expect
):
    """Read back from the file, the ranges hold the bytes of exactly the blocks the runs touch
    (every band's where the bands are stored apart), and nothing else."""
    monkeypatch.setattr(prefetch, "MERGE_GAP", 0)
    data = np.random.default_rng(3).integers(-9999, 9999, (3, 256, 384)).astype(np.int16)
    path = tmp_path / "f.tif"
    _write(path, data, blocks, interleave)
    with rasterio.open(path) as src:
        ranges = prefetch.block_ranges(src, rows, cols, runs)
    content = path.read_bytes()
    held = [content[o : o + n] for o, n in ranges]
    wanted = [b for r, c in expect for b in _block_bytes(data, interleave, r, c)]
    assert sum(n for _, n in ranges) == sum(len(b) for b in wanted)
    for block in wanted:
        assert sum(part.count(block) for part in held) == 1


def _resident(path, offset: int, size: int) -> bool:
    """Whether the bytes are in the page cache (a read that must not wait for the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(size)], offset, os.RWF_NOWAIT) == size
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _evict(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="needs Linux's preadv(RWF_NOWAIT)")
def test_will_need_has_the_kernel_read_the_ranges_from_disk(tmp_path):
    """Out of the page cache, a range asked for is read into it in the background; a strip not
    asked for stays on disk."""
    data = np.random.default_rng(4).integers(-9999, 9999, (3, 1000, 2000)).astype(np.int16)
    path = tmp_path / "f.tif"
    _write(path, data, None, "band")
    with rasterio.open(path) as src:
        ranges = prefetch.block_ranges(src, (0, 50), (0, 2000), [(0, 50, 0, 2000)])
        (other,) = prefetch.block_ranges(src, (500, 550), (0, 2000), [(0, 50, 0, 2000)])[2:]
    assert len(ranges) == 3  # strip 0 of each band, 200 kB each: far apart
    _evict(path)
    if _resident(path, *ranges[0]):  # a file system in memory (tmpfs) has nothing to read ahead
        pytest.skip(f"{tmp_path}: POSIX_FADV_DONTNEED left the file in the page cache")
    before = prefetch.PREFETCHED.count
    assert prefetch.will_need(str(path), ranges) == sum(n for _, n in ranges)
    assert prefetch.PREFETCHED.count - before == sum(n for _, n in ranges)
    deadline = time.monotonic() + 10
    while not all(_resident(path, *r) for r in ranges) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(_resident(path, *r) for r in ranges)
    assert not _resident(path, *other)
    assert prefetch.will_need("s3://bucket/f.tif", ranges) == 0  # GDAL fetches remote bytes


@pytest.mark.parametrize("ahead", [1, 3])
@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["strips", "tiles"])
def test_reads_ask_for_what_they_decode_once_and_return_the_same_as_without(
    tmp_path, monkeypatch, blocks, ahead
):
    """A read asks the kernel, once per file, for the QAI blocks of every scene and for the BOA
    blocks its QAI leaves unscreened (not those of the scene all cloud), however many scenes
    ahead, and returns what a read without prefetching returns; switched off, it asks for
    nothing."""
    monkeypatch.setattr(prefetch, "SCENES_AHEAD", ahead)
    root, expected = _striped_tile(tmp_path, blocks=blocks, clouds=True)
    _, scenes, grid = _grid(root)
    reader = WindowReader(grid, tuple(s.boa for s in scenes), tuple(s.qai for s in scenes),
                          tuple(DEFAULT_QAI_FLAGS))  # fmt: skip
    window = Window(row_off=16, col_off=0, height=16, width=32)
    wanted = [s.qai for s in scenes] + [s.boa for k, s in enumerate(scenes) if k != 1]
    size = {}
    for f in wanted:
        with rasterio.open(f) as src:
            ranges = prefetch.block_ranges(src, (16, 32), (0, 32), [(0, 16, 0, 32)])
            size[str(f)] = sum(n for _, n in ranges)
    asked: list = []
    will_need = prefetch.will_need
    monkeypatch.setattr(
        prefetch, "will_need", lambda url, r: asked.append(url) or will_need(url, r)
    )
    got = {}
    for on in (True, False):
        monkeypatch.setattr(prefetch, "PREFETCH", on)
        datasets.forget_datasets()
        before, asked[:] = prefetch.PREFETCHED.count, []
        got[on] = reader.read(window).copy()
        assert sorted(asked) == (sorted(map(str, wanted)) if on else [])
        assert prefetch.PREFETCHED.count - before == (sum(size.values()) if on else 0)
    np.testing.assert_array_equal(got[True], expected[:, :, 16:32, 0:32])
    np.testing.assert_array_equal(got[True], got[False])
    datasets.forget_datasets()


def test_a_missing_next_scene_is_reported_by_its_read_not_by_the_prefetch(tmp_path):
    """Prefetching is best effort: a scene file gone before its read makes the read fail naming
    it, as without prefetching (the prefetch of it, one scene earlier, says nothing)."""
    from treesits_dask.errors import InputDataError

    root, _ = _striped_tile(tmp_path)
    _, scenes, grid = _grid(root)
    reader = WindowReader(grid, tuple(s.boa for s in scenes), tuple(s.qai for s in scenes),
                          tuple(DEFAULT_QAI_FLAGS))  # fmt: skip
    os.remove(scenes[3].boa)
    datasets.forget_datasets()
    with pytest.raises(InputDataError, match=os.path.basename(scenes[3].boa)):
        reader.read(Window(row_off=0, col_off=0, height=37, width=50))
    datasets.forget_datasets()
