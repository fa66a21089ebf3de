"""Pixel grids of tiles and the windows that cut them into Dask tasks.

A :class:`TileGrid` is read once per tile from its first BOA file (see
:func:`treesits_dask.io.cube.tile_grid`); a :class:`WindowLayout` is the list of windows of one
tile, computed once when a run is planned and used by the cube, the mask and the output stages
alike (every window is also one chunk of the output store).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError

__all__ = [
    "READ_AREA_SLACK",
    "STRIP_AREA_SLACK",
    "TileGrid",
    "Window",
    "WindowLayout",
    "block_chunk",
    "choose_window_shape",
    "divisor_at_most",
    "read_shape",
]


@dataclass(frozen=True)
class TileGrid:
    """Pixel grid of one tile, read once from its first BOA file and checked against the .prj."""

    tile: str
    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int
    block_shape: tuple[int, int]
    count: int

    @property
    def striped(self) -> bool:
        """Whether its files are in full-width strips (FORCE < 3.8), not tiled (a COG)."""
        return self.block_shape[1] >= self.width

    @property
    def affine(self):
        from affine import Affine

        return Affine(*self.transform)

    def x_coords(self) -> np.ndarray:
        a, _, c = self.transform[:3]
        return c + a * (np.arange(self.width) + 0.5)

    def y_coords(self) -> np.ndarray:
        e, f = self.transform[4], self.transform[5]
        return f + e * (np.arange(self.height) + 0.5)


@dataclass(frozen=True)
class Window:
    """A rectangle of a tile in pixels."""

    row_off: int
    col_off: int
    height: int
    width: int

    @property
    def rows(self) -> slice:
        return slice(self.row_off, self.row_off + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.col_off, self.col_off + self.width)


@dataclass(frozen=True)
class WindowLayout:
    """The windows of one tile: row-major, ``shape`` = (rows, cols) of every full window."""

    shape: tuple[int, int]
    windows: tuple[tuple[Window, ...], ...]

    @classmethod
    def of(cls, grid: TileGrid, shape: tuple[int, int]) -> WindowLayout:
        """Windows of ``shape`` covering ``grid`` (the last row / column may be smaller)."""
        rows, cols = shape
        windows = tuple(
            tuple(
                Window(r, c, min(rows, grid.height - r), min(cols, grid.width - c))
                for c in range(0, grid.width, cols)
            )
            for r in range(0, grid.height, rows)
        )
        return cls(tuple(shape), windows)

    def block_aligned(self, block_shape: tuple[int, int]) -> bool:
        """Whether every window starts on a block edge of files in ``block_shape`` blocks (so
        that each block lies in exactly one window)."""
        bh, bw = max(1, block_shape[0]), max(1, block_shape[1])
        return all(w.row_off % bh == 0 and w.col_off % bw == 0 for _, _, w in self)

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dask chunks along y and x."""
        return tuple(row[0].height for row in self.windows), tuple(w.width for w in self.windows[0])

    def __len__(self) -> int:
        return len(self.windows) * len(self.windows[0])

    def __iter__(self) -> Iterator[tuple[int, int, Window]]:
        """``(i, j, window)`` in row-major order (i, j: the window's block index)."""
        for i, row in enumerate(self.windows):
            for j, w in enumerate(row):
                yield i, j, w


def divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit``."""
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def choose_window_shape(
    grid: TileGrid,
    requested: tuple[int, int] | None,
    n_scenes: int,
    max_bytes: int = 2 * 1024**3,
    target: int = 256,
    window_bytes: int | None = None,
) -> tuple[int, int]:
    """Window ``(rows, cols)``; both must divide the tile so that windows align with Zarr chunks.

    ``auto``: full-width strips of the file's strip height for striped files (FORCE < 3.8, decoded
    once per window) when a window of all scenes stays under ``max_bytes``; otherwise the largest
    divisors of the tile size up to ``target`` pixels.  ``window_bytes`` (None: no limit): the
    most a window of all scenes may hold (from the inference workers' memory): strips and square
    windows both keep within it, down to one pixel.
    """
    if requested is not None:
        rows, cols = requested
        if grid.height % rows or grid.width % cols:
            raise ConfigError(
                f"setting 'window' {rows}x{cols} does not divide tile {grid.tile} "
                f"({grid.height}x{grid.width} px); windows must tile it exactly so that they align "
                f"with the Zarr chunks, e.g. {divisor_at_most(grid.height, rows)}x"
                f"{divisor_at_most(grid.width, cols)}"
            )
        return rows, cols
    bh, bw = grid.block_shape
    bytes_per_px = n_scenes * grid.count * 2
    if bw == grid.width and grid.height % bh == 0:
        # striped file: whole strips, as many as fit target**2 pixels (at least one) and the budget
        fits = [
            k * bh
            for k in range(1, grid.height // bh + 1)
            if grid.height % (k * bh) == 0
            and (k == 1 or k * bh * grid.width <= target * target)
            and k * bh * grid.width * bytes_per_px <= max_bytes
            and (window_bytes is None or k * bh * grid.width * bytes_per_px <= window_bytes)
        ]
        if fits:
            return max(fits), grid.width
    if window_bytes is not None:
        target = max(1, min(target, math.isqrt(window_bytes // max(1, bytes_per_px))))
    return divisor_at_most(grid.height, target), divisor_at_most(grid.width, target)


#: how much larger (in pixels) than a window the chunk a tile is read in may be (see
#: :func:`read_shape`): 256 x 256 px blocks for 250 x 250 px windows are 4.9 % larger
READ_AREA_SLACK = 1.1

#: how much larger or smaller (in pixels) than a window the chunk a striped tile is read in may
#: be (see :func:`read_shape`): 300-row strips for 250 x 250 px windows are 20 % larger
STRIP_AREA_SLACK = 1.25


def read_shape(grid: TileGrid, window: tuple[int, int]) -> tuple[int, int]:
    """The chunk ``(rows, cols)`` the cube of a tile is read and predicted in, for windows (the
    map's chunks) of ``window``: the window itself where windows start on block edges of the
    files (whole strips, or COG windows that are multiples of the blocks); for tiled files (COG)
    whose blocks the windows cut (256 px blocks, windows that divide a 3000 px tile), the whole
    blocks nearest the window in size, as long as they hold at most :data:`READ_AREA_SLACK` times
    its pixels.  Each block then lies in one chunk and is decoded once by the chunk's own read,
    into the chunk, with nothing put together and no band of all scenes held; the predicted
    outputs (a few layers instead of every scene) are rechunked to the windows for writing.
    Striped files (a strip is as wide as the tile) are read in bands of whole strips, cut into the
    chunks that cross them (:mod:`treesits_dask.io.bands`); their chunks are the window's width and
    whole strips high (300 of 250 rows at 3000 px), as long as that is within
    :data:`STRIP_AREA_SLACK` of the window's pixels: each band is then one row of chunks, so its
    pieces are whole chunks of one size, which reuse each other's buffers, and a chunk is put
    together from one band (250-row windows cross 300-row strips in pieces of 50 to 250 rows,
    mostly of sizes that fit no other's buffer: 13.6 GiB of new memory per read of a 3000 px x
    120-scene tile, against 2.1-5.9 GiB).  Other windows keep their shape, and are read in bands
    too where blocks are larger than them."""
    bh, bw = max(1, grid.block_shape[0]), max(1, grid.block_shape[1])
    rows, cols = window
    if WindowLayout.of(grid, window).block_aligned((bh, bw)):
        return window
    if grid.striped:  # whole strips near the window's height
        if rows >= grid.height:
            return window
        near = [m * bh for m in (rows // bh, rows // bh + 1) if m >= 1 and m * bh <= grid.height]
        fits = [r for r in near if 1 / STRIP_AREA_SLACK <= r / rows <= STRIP_AREA_SLACK]
        return (min(fits, key=lambda r: (abs(r - rows), r)), cols) if fits else window

    def nearest(n: int, block: int, edge: int) -> list[int]:
        if n >= edge:
            return [edge]
        k = n // block
        return sorted({min(m * block, edge) for m in (k, k + 1) if m >= 1})

    fits = [
        (r, c)
        for r in nearest(rows, bh, grid.height)
        for c in nearest(cols, bw, grid.width)
        if r * c <= READ_AREA_SLACK * rows * cols
    ]
    if not fits:
        return window
    return min(fits, key=lambda rc: (abs(rc[0] * rc[1] - rows * cols), abs(rc[0] - rc[1])))


def block_chunk(grid: TileGrid, window: tuple[int, int]) -> tuple[int, int] | None:
    """For tiled files (COG) whose blocks are larger than the windows, so that
    :func:`read_shape` finds no chunk of whole blocks near a window's size (100 or 200 px windows
    of 256 px blocks, as ``window: auto`` makes them for hundreds of scenes on a worker of a few
    GiB per thread): the smallest chunk of whole blocks that holds a window, which is larger
    than the window by more than :data:`READ_AREA_SLACK`; None for any other window.

    Read in such chunks each block lies in one chunk and is decoded once, into it, as in the
    chunks of :func:`read_shape`, instead of in bands of all scenes that are cut into the
    windows' pieces and, where they do not fit the reading worker's memory, go through its local
    disk.  Whether the inference workers can hold chunks that large is the plan's to check
    (:func:`~treesits_dask.pipeline.memory.fitting_chunk`)."""
    bh, bw = max(1, grid.block_shape[0]), max(1, grid.block_shape[1])
    rows, cols = window
    if grid.striped or read_shape(grid, window) != tuple(window):
        return None  # striped, or a chunk of whole blocks near the window already
    if WindowLayout.of(grid, window).block_aligned((bh, bw)):
        return None
    chunk = (min(-(-rows // bh) * bh, grid.height), min(-(-cols // bw) * bw, grid.width))
    return None if chunk == tuple(window) else chunk
