"""Reading rectangles of all (or a batch of) scenes of a tile, QAI-screened: the kernel under
:func:`treesits_dask.io.cube.tile_cube`.

:class:`WindowReader` pickles as a few strings and opens files in the task (through the datasets
its worker keeps open, :mod:`treesits_dask.io.datasets`).  ``read_band`` decodes a band of
whole file blocks for a batch of scenes and cuts it into the pieces of the windows that cross it
(see :mod:`treesits_dask.io.bands`); ``read`` reads one window of all scenes.  With a mask, only
the file blocks that hold a masked-in pixel are decoded (elsewhere the result holds nodata), and a
read that needs no block opens no file.  Screened observations are set to the BOA nodata value
(-9999) in every band, so downstream code sees a single validity rule; the QAI is read first, and
a BOA block whose every pixel it screens (all cloud, beyond the swath) is not decoded at all
(counted in :data:`~treesits_dask.io.datasets.SCREENED`).  Each scene's QAI is read one scene
ahead, so that while a scene decodes, the kernel reads a later scene's QAI and the next scene's
unscreened BOA blocks of a local file from disk (:mod:`~treesits_dask.io.prefetch`).  Bands,
windows and the pieces of a plan that spills are arrays of
:data:`~treesits_dask.io.buffers.RECYCLER`, reused once nothing refers to them (the pieces go to
local disk instead where the worker's memory has no room, :mod:`~treesits_dask.io.pieces`).
The module is longer than 400 lines: every read plan (window, band, chunks side by side) shares
its screening, prefetching, error reporting and buffers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import InputDataError
from . import prefetch, storage
from .bands import Band, block_runs, decoded_bytes
from .buffers import RECYCLER
from .datasets import (
    DECODED,
    SCREENED,
    Counter,
    Lent,
    check_header,
    dataset,
    open_error,
)
from .grid import TileGrid, Window
from .pieces import DiskPiece, PieceWriter, in_memory
from .qai import qai_invalid
from .remote import read_retrying

__all__ = [
    "NODATA",
    "READS_IN_PROGRESS",
    "InProgress",
    "WindowReader",
    "assemble",
    "scene_order",
    "screen",
]

NODATA = -9999


class InProgress(Counter):
    """How many window reads (or, in ``pipeline.predict``, CPU forwards) are running in this process
    right now; used as a context manager around each one.  CPU inference gives a core back to each
    read (see ``Predictor.threads``): a read beside a forward that uses every core stalls the
    forward's OpenMP barriers and made it ~2.4x slower here."""

    def __enter__(self):
        self.add(1)
        return self

    def __exit__(self, *exc) -> None:
        self.add(-1)


READS_IN_PROGRESS = InProgress()


class _Direction(threading.local):
    forward = False


_DIRECTION = _Direction()


def scene_order(start: int, stop: int) -> range:
    """The scenes ``start:stop`` in the order this thread reads them: forwards and backwards in
    turn.  A thread may keep fewer datasets open than a tile of many scenes has files (least
    recently used out): read in the same order every time, each read would open every file again;
    read in turns, the files the last read visited last are still open and only the others are
    opened again."""
    d = _DIRECTION
    d.forward = not d.forward
    return range(start, stop) if d.forward else range(stop - 1, start - 1, -1)


class _OpenFailed(Exception):
    """A scene could not be opened at all (as opposed to failing in the middle of a read)."""


def _missing(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "does not exist" in text or "no such file" in text


def screen(block: np.ndarray, bad: np.ndarray) -> None:
    """Set ``block`` (bands, h, w; a view is fine) to nodata in every band where ``bad`` (h, w).

    Only the rows from the first to the last that ``bad`` touches are visited (clouds come in
    patches: a block row of a 3000 px tile screened in a patch took 0.6 ms, not 4.7), rows all
    ``bad`` are filled.  Else two bitwise passes over each band in turn: ~4x faster than
    ``block[:, bad] = NODATA`` (boolean indexing gathers every band), which cost as much as
    decoding a ZSTD COG block here; band by band, the second pass finds the band in the CPU's
    cache (0.37-0.50 ms against 0.46-0.77 per 10-band block of 256 x 512 px of the 3000 px COG,
    where the screening was 6 % of a read task's samples)."""
    rows = np.flatnonzero(bad.any(axis=1))
    if not rows.size:
        return
    block, bad = block[:, rows[0] : rows[-1] + 1], bad[rows[0] : rows[-1] + 1]
    if bad.all():
        block[...] = NODATA
        return
    keep = (~bad).view(np.uint8).astype(np.int16)
    np.negative(keep, out=keep)  # all bits set where kept, 0 where screened
    fill = np.bitwise_and(np.int16(NODATA), ~keep)  # nodata where screened, 0 where kept
    for band in block:
        np.bitwise_and(band, keep, out=band)
        np.bitwise_or(band, fill, out=band)


def assemble(
    shape: tuple[int, ...], mask: np.ndarray | None, where: tuple, pieces: list
) -> np.ndarray:
    """A window ``(T, bands, h, w)`` from its pieces: ``pieces[k]`` (a ``(batch, bands, rows, w)``
    array, or None where nothing was read) holds scenes ``where[k][0]:where[k][1]`` (where
    ``where[k][1]`` is None: the scenes at the positions ``where[k][0]``, a tile's scenes in
    more than one file layout) and window rows ``where[k][2]:where[k][3]`` (a
    :class:`~treesits_dask.io.pieces.DiskPiece` is read from its file).  A window without a mask
    pixel is a read-only broadcast of nodata (no memory)."""
    if mask is not None and not np.any(mask):
        return np.broadcast_to(np.int16(NODATA), shape)
    out = RECYCLER.empty(shape, np.int16)
    for (s0, s1, r0, r1), piece in zip(where, pieces, strict=True):
        at = slice(s0, s1) if s1 is not None else list(s0)
        if piece is None:
            out[at, :, r0:r1] = NODATA
        elif not isinstance(piece, DiskPiece):
            out[at, :, r0:r1] = piece
        elif s1 is not None:  # straight into the window's scenes
            piece.read_into(out[at, :, r0:r1])
        else:  # scenes apart: out[list] is a copy, so through the loaded piece
            out[at, :, r0:r1] = piece.load()
    return out


@dataclass(frozen=True)
class WindowReader:
    """Recipe to read rectangles of the scenes of a tile: pickles as a few strings, opens files in
    the task.  ``versions`` / ``qai_versions`` (e.g. size and mtime of each file) key the datasets
    kept open, so a replaced file is opened again.  ``verified`` (per scene, or empty: none):
    the run's driver checked the headers of the scene's files at their versions, so a worker
    checks again only a file found at another version (see
    :func:`~treesits_dask.io.datasets.dataset`)."""

    grid: TileGrid
    boa: tuple[str, ...]
    qai: tuple[str | None, ...]
    qai_flags: tuple[str, ...] = ()
    versions: tuple = ()
    qai_versions: tuple = ()
    verified: tuple[bool, ...] = ()

    @classmethod
    def of_scenes(cls, grid: TileGrid, scenes, qai_flags=(), checked=()) -> WindowReader:
        """The reader of a tile's ``scenes`` (:class:`~treesits_dask.io.discovery.Scene`: BOA and
        QAI paths, their sizes and mtimes as versions); ``checked``: those of them whose headers
        the run's driver checked (``verified``)."""
        names = {s.name for s in checked}
        return cls(
            grid=grid,
            boa=tuple(s.boa for s in scenes),
            qai=tuple(s.qai for s in scenes),
            qai_flags=tuple(qai_flags),
            versions=tuple((s.size, s.mtime) for s in scenes),
            qai_versions=tuple((s.qai_size, s.qai_mtime) for s in scenes),
            verified=tuple(s.name in names for s in scenes) if names else (),
        )

    def read(self, window: Window, mask: np.ndarray | None = None) -> np.ndarray:
        """``(T, bands, h, w)`` int16 of one window of all scenes; screened observations -9999.

        When ``mask`` is given and has no pixel set, no file is opened and a read-only block of
        nodata is returned (broadcast, no memory); else only the file blocks that hold a mask
        pixel are decoded.
        """
        return self.read_windows((window,), *([] if mask is None else [mask]))[0]

    def read_band(
        self, band: Band, start: int, stop: int, *masks, own: bool = False, disk: bool = True
    ) -> list | np.ndarray:
        """Scenes ``start:stop`` of ``band`` (its columns: the full width, or its section's), cut
        into the pieces of the windows that cross it: a list with, per piece of the band, a
        ``(stop - start, bands, rows, cols)`` view (the views partition one array), or None for a
        window without a mask pixel.  ``masks``: the mask of each piece's whole window (none: no
        mask).  A band that is one whole window read in one batch (see
        :meth:`~treesits_dask.io.bands.ReadPlan.direct`) returns the window itself.  Nothing is
        opened when no piece has a mask pixel.  ``own`` (for plans that spill or are read in
        sections): each scene's band is decoded into a buffer of one scene and cut from there
        into pieces that own their memory, or, where the Dask worker's memory has no room for the
        batch (:func:`~treesits_dask.io.pieces.in_memory`), into a file of its own on the
        worker's local disk, handed out as a :class:`~treesits_dask.io.pieces.DiskPiece`
        (:meth:`_read_into_pieces`); never to disk without ``disk`` (a plan that counts on none).
        """
        cols = band.columns(self.grid.width)
        width = cols[1] - cols[0]
        rows = (band.row_off, band.row_off + band.height)
        need = None
        if masks:
            need = np.zeros((band.height, width), bool)
            for p, m in zip(band.pieces, masks, strict=True):
                (b0, b1), (w0, w1) = p.band_rows, p.window_rows
                need[b0:b1, p.col_off - cols[0] : p.col_off - cols[0] + p.width] = m[w0:w1]
        empty = [not np.any(m) for m in masks] if masks else [False] * len(band.pieces)
        p = band.pieces[0]
        whole = len(band.pieces) == 1 and (start, stop) == (0, len(self.boa))
        whole = whole and p.band_rows == p.window_rows == (0, band.height)  # as ReadPlan.direct
        if all(empty):
            shape = (stop - start, self.grid.count, band.height, width)
            return np.broadcast_to(np.int16(NODATA), shape) if whole else [None] * len(empty)
        if own and not whole:
            batch = (stop - start) * self.grid.count * band.height * width * 2
            on_disk = disk and not in_memory(batch)
            return self._read_into_pieces(band, start, stop, need, empty, on_disk)
        buf = self._read_rect(rows, cols, start, stop, need)
        if whole:
            return buf
        return [
            None
            if skip
            else buf[:, :, slice(*p.band_rows), p.col_off - cols[0] : p.col_off - cols[0] + p.width]
            for p, skip in zip(band.pieces, empty, strict=True)
        ]

    def read_windows(self, windows: tuple[Window, ...], *masks) -> tuple[np.ndarray, ...]:
        """Several windows of all scenes (``masks``: the mask of each, or none), each as
        :meth:`read` makes it, read scene by scene: each scene's files are visited once for all
        the windows (one open at most per file and task, where a task per window opens every file
        of the tile once per window whenever a worker thread cannot keep them all open).  Windows
        side by side in a row (with a mask pixel each) are read together, one GDAL call per file,
        scene and run of blocks to decode, and returned as views of that read's array (not
        contiguous where there are several): a call per window and file made the read's CPU time
        1.4x the decode's at 3000 px.  The arrays of all the runs lie in one buffer of the room of
        all ``windows`` (see :meth:`~treesits_dask.io.buffers.Recycler.empty_parts`), given out
        again once the last of them is freed; none where no window has a mask pixel."""
        outs: list = [None] * len(windows)
        n, count = len(self.boa), self.grid.count
        rects = []
        for run in _side_by_side(windows, masks):
            first, last = windows[run[0]], windows[run[-1]]
            rows = (first.row_off, first.row_off + first.height)
            cols = (first.col_off, last.col_off + last.width)
            need = np.concatenate([masks[k] for k in run], axis=1) if masks else None
            runs = block_runs(need, rows, cols, self.grid.block_shape)
            rects.append((run, rows, cols, runs))
        # one owner of the room of all the windows, masked-in or not (see Recycler.empty_parts),
        # windows of whole blocks at the tile's edge counted with their last blocks whole
        room = sum(n * count * h * w for h, w in map(self._whole_blocks, windows))
        shapes = [(n, count, *_extent(r, c)) for _, r, c, _ in rects]
        parts = RECYCLER.empty_parts(shapes, np.int16, room) if rects else []
        jobs = []
        for (run, rows, cols, runs), out in zip(rects, parts, strict=True):
            _nodata_outside(out, runs)
            for k in run:
                c0 = windows[k].col_off - cols[0]
                outs[k] = out if len(run) == 1 else out[..., c0 : c0 + windows[k].width]
            if runs:
                jobs.append((rows, cols, runs, out))
        for k, w in enumerate(windows):
            if outs[k] is None:  # no mask pixel
                shape = (len(self.boa), self.grid.count, w.height, w.width)
                outs[k] = np.broadcast_to(np.int16(NODATA), shape)
        self._read_scenes(jobs, 0, len(self.boa))
        return tuple(outs)

    # ------------------------------------------------------------------------------ internals
    def _whole_blocks(self, w: Window) -> tuple[int, int]:
        """(height, width) of ``w``, counted up to whole blocks where it starts on a block edge and
        ends at the tile's edge: an edge row's read (184 of 256 rows of a 3000 px COG) then takes
        a full row's buffer, and the other way round (it faulted 1.2 GiB in afresh per tile)."""
        (bh, bw), g = self.grid.block_shape, self.grid
        h, wd = w.height, w.width
        if bh > 0 and w.row_off % bh == 0 and w.row_off + h == g.height:
            h += -h % bh
        if bw > 0 and w.col_off % bw == 0 and w.col_off + wd == g.width:
            wd += -wd % bw
        return h, wd

    def _read_into_pieces(
        self, band: Band, start: int, stop: int, need, empty: list, on_disk: bool
    ) -> list:
        """:meth:`read_band` with ``own``: each scene's band is decoded into one buffer of a
        single scene, reused for every scene of the task, and each piece's share of it is put at
        the scene's place in the piece (None where ``empty``): an array that owns its memory, or,
        ``on_disk``, a file of its own (:class:`~treesits_dask.io.pieces.PieceWriter`; the task
        then holds one scene, not its batch, in memory; a read that fails removes what it
        wrote).  Copying a batch's band into its pieces read the band back from memory (2.8 GB/s
        here, 7 of the 120 thread-seconds of a 3000 px x 120-scene strips read) and the band's
        own buffer (686 MiB) was new memory on some reads; one scene's band (18 MB) is still in
        the CPU's cache when it is copied.  Measured 5 % faster on strips (docs/performance.md,
        "Strips decoded into their pieces"); as fast on the COG of the 600-scene regime once Dask
        no longer spilled its pieces (:mod:`~treesits_dask.io.pieces`), with half the memory per
        task."""
        rows, cols = (band.row_off, band.row_off + band.height), band.columns(self.grid.width)
        n, count = stop - start, self.grid.count
        sink = PieceWriter if on_disk else _PieceArray
        pieces: list = []
        try:
            for p, skip in zip(band.pieces, empty, strict=True):
                pieces.append(
                    None if skip else sink((n, count, *_extent(p.band_rows, (0, p.width))))
                )
            scene = RECYCLER.empty((count, *_extent(rows, cols)), np.int16)
            runs = block_runs(need, rows, cols, self.grid.block_shape)
            _nodata_outside(scene, runs)
            cuts = [
                (
                    piece,
                    slice(*p.band_rows),
                    slice(p.col_off - cols[0], p.col_off - cols[0] + p.width),
                )
                for p, piece in zip(band.pieces, pieces, strict=True)
                if piece is not None
            ]
            if runs:
                q = np.empty(_extent(rows, cols), np.int16) if self.qai_flags else None
                rect = [(rows, cols, runs)]
                with READS_IN_PROGRESS:
                    scenes = self._scenes(scene_order(start, stop), rect, lambda r: q)
                    for t, (screening,) in scenes:
                        self._read_scene(t, rows, cols, runs, scene, screening)
                        for piece, r, c in cuts:
                            piece.put(t - start, scene[:, r, c])
            else:  # no block of this band to decode: nodata pieces
                for t in range(n):
                    for piece, r, c in cuts:
                        piece.put(t, scene[:, r, c])
            return [None if piece is None else piece.close() for piece in pieces]
        except BaseException:
            for piece in pieces:
                if piece is not None:
                    piece.abort()
            raise

    def _read_rect(self, rows, cols, start, stop, need) -> np.ndarray:
        """Scenes ``start:stop`` of the rectangle ``rows`` x ``cols``, decoding only the blocks
        that hold a ``need`` pixel (None: all); nodata where nothing was decoded."""
        runs = block_runs(need, rows, cols, self.grid.block_shape)
        out = RECYCLER.empty((stop - start, self.grid.count, *_extent(rows, cols)), np.int16)
        _nodata_outside(out, runs)
        if runs:
            self._read_scenes([(rows, cols, runs, out)], start, stop)
        return out

    def _read_scenes(self, jobs: list, start: int, stop: int) -> None:
        """Scenes ``start:stop`` of each job ``(rows, cols, runs, out)`` (``out`` as
        :meth:`_read_rect` makes it) into its ``out``, scene by scene: each scene's files are
        visited once for all the jobs.  One QAI buffer per rectangle shape."""
        if not jobs:
            return
        qai: dict = {}

        def qai_buffer(rect) -> np.ndarray:
            shape = _extent(*rect[:2])
            if shape not in qai:
                qai[shape] = np.empty(shape, np.int16)
            return qai[shape]

        rects = [(rows, cols, runs) for rows, cols, runs, _ in jobs]
        with READS_IN_PROGRESS:
            for t, screenings in self._scenes(scene_order(start, stop), rects, qai_buffer):
                for (rows, cols, runs, out), screening in zip(jobs, screenings, strict=True):
                    self._read_scene(t, rows, cols, runs, out[t - start], screening)

    def _scenes(self, order, rects: list, qai_buffer) -> Iterator[tuple[int, list]]:
        """The scenes ``t`` of ``order``, each with its QAI screening of each rectangle of
        ``rects`` ``(rows, cols, runs)`` (:meth:`_screening`, into ``qai_buffer(rect)``; None
        without QAI flags), worked out :data:`~treesits_dask.io.prefetch.SCENES_AHEAD` scenes
        ahead where reading ahead (:mod:`~treesits_dask.io.prefetch`): while scene ``t`` is read,
        the kernel reads in the background the QAI of the scenes to be screened next and the BOA
        blocks of the scenes screened already that their QAI leaves unscreened, so that what is
        asked for is what is decoded.  Without reading ahead, one scene at a time."""

        def screenings(t: int) -> list:
            if not self.qai_flags:
                return [None] * len(rects)
            return [self._screening(t, *rect, qai_buffer(rect)) for rect in rects]

        def boa_runs(found: list) -> list:
            return [
                (rows, cols, runs if f is None else f[1])
                for (rows, cols, runs), f in zip(rects, found, strict=True)
            ]

        on = prefetch.PREFETCH
        ahead = max(1, prefetch.SCENES_AHEAD) if on else 0
        n, qai = len(order), on and bool(self.qai_flags)
        found: dict[int, list] = {}
        for j in range(min(n, ahead + 1) if qai else 0):
            self._prefetch(order[j], rects, qai=True)
        for k, t in enumerate(order):
            for j in range(k, min(n, k + ahead + 1)):
                if j not in found:
                    if qai and j + 1 < n and j + 1 > ahead:
                        self._prefetch(order[j + 1], rects, qai=True)
                    found[j] = screenings(order[j])
                    if on:
                        self._prefetch(order[j], boa_runs(found[j]), qai=False)
            yield t, found.pop(k)

    def _prefetch(self, t: int, rects: list, qai: bool) -> None:
        """Ask the kernel for the bytes of the blocks of ``rects`` ``(rows, cols, runs)`` in the
        QAI (``qai``) or BOA file of scene ``t`` (:mod:`~treesits_dask.io.prefetch`).  Best
        effort: a file that cannot be opened is left to its read, which reports it."""
        url = self._file(t, qai)[0]
        rects = [rect for rect in rects if rect[2]]
        if url is None or not rects or storage.is_remote(url):
            return
        try:
            with self._lend(t, qai) as src:
                ranges = [r for rect in rects for r in prefetch.block_ranges(src, *rect)]
            prefetch.will_need(url, ranges)
        except Exception:  # noqa: BLE001 - the read itself reports what is wrong
            return

    def _file(self, t: int, qai: bool) -> tuple:
        """The QAI (``qai``; None where the scene has none) or BOA file of scene ``t``, and its
        version (None where the reader has none)."""
        if qai:
            return self.qai[t], self.qai_versions[t] if self.qai_versions else None
        return self.boa[t], self.versions[t] if self.versions else None

    def _lend(self, t: int, qai: bool) -> Lent:
        """The dataset of scene ``t``'s QAI (``qai``) or BOA file, lent by the process's pool
        (:func:`~treesits_dask.io.datasets.dataset`) and checked against the tile's grid."""
        url, version = self._file(t, qai)
        bands = 1 if qai else None

        def check(src, georeferenced: bool = True) -> None:
            check_header(src, url, self.grid, bands, georeferenced)

        verified = bool(self.verified) and self.verified[t]
        return dataset(url, version, check, verified, lean=self._may_be_lean(url, qai))

    def _may_be_lean(self, url: str, qai: bool) -> bool:
        """Whether the pool may open ``url`` for GDAL's multi-threaded read where it runs short
        (:data:`~treesits_dask.io.datasets.LEAN_HELD`): a BOA file, local, or on S3 where it is
        tiled (a COG: the reader's grid has its scenes' layout, that of a tile's part in its
        own layout where the tile has two, :mod:`~treesits_dask.io.layouts`).  On S3 a file
        the pool closes costs requests again when it is opened (0.5-1.2 GETs per open
        measured), and COGs opened so were read in fewer requests and less time; striped BOA
        files on S3 opened so took 2.2 times as long, in fewer requests (``python -m
        treesits_dask.bench.s3_read --kept-mib``, docs/performance.md, "Kept files on S3")."""
        if qai:
            return False
        return not self.grid.striped or not storage.is_remote(url)

    def _screening(self, t: int, rows, cols, runs, q: np.ndarray) -> tuple[list, list]:
        """The QAI of scene ``t`` in the ``runs`` of the rectangle (read into ``q``): what it
        screens in each run, and the runs of whole file blocks that hold an observation it does
        not screen (the BOA blocks to decode: one all cloud or beyond the swath is nodata without
        being decoded)."""
        boa, qai = self.boa[t], self.qai[t]
        if qai is None:
            raise InputDataError(
                f"{boa} has no QAI file ({storage.basename(boa).replace('_BOA', '_QAI')}) "
                "but QAI screening is on; restore the QAI file or set --qai none"
            )
        where = f"rows {rows[0]}:{rows[1]}, cols {cols[0]}:{cols[1]}"

        def qai_failed(exc: Exception) -> InputDataError:
            if _missing(exc):
                return open_error(qai, exc)
            return InputDataError(f"cannot read QAI file {qai}: {exc}; re-create or remove it")

        self._read_runs(t, True, q, runs, rows, cols, where, qai_failed)
        bad = [qai_invalid(q[r0:r1, c0:c1], self.qai_flags) for r0, r1, c0, c1 in runs]
        return bad, self._clear_runs(rows, cols, runs, bad)

    def _read_scene(self, t: int, rows, cols, runs, out: np.ndarray, screening) -> None:
        """Scene ``t`` of the rectangle into ``out``: without QAI screening (``screening`` None)
        every block of the ``runs``; else, with the scene's :meth:`_screening`, only the BOA blocks
        that hold an observation the QAI does not screen, screened."""
        boa = self.boa[t]
        where = f"rows {rows[0]}:{rows[1]}, cols {cols[0]}:{cols[1]}"

        def boa_failed(exc: Exception) -> InputDataError:
            if _missing(exc) or isinstance(exc, _OpenFailed):
                return open_error(boa, exc)
            return InputDataError(
                f"cannot read {boa} ({where}): {exc}. The file is truncated or corrupt; "
                "re-create it or remove it (with its QAI twin)"
            )

        if screening is None:
            self._read_runs(t, False, out, runs, rows, cols, where, boa_failed)
            return
        bad, clear = screening
        if clear:
            self._read_runs(t, False, out, clear, rows, cols, where, boa_failed)
        for (r0, r1, c0, c1), b in zip(runs, bad, strict=True):
            screen(out[:, r0:r1, c0:c1], b)  # undecoded blocks: all screened, so nodata

    def _clear_runs(self, rows, cols, runs, bad) -> list:
        """The part of ``runs`` (with the QAI screening ``bad`` of each) in whole file blocks
        that hold an unscreened pixel; what is left out is counted in :data:`SCREENED`."""
        if not any(b.all(axis=0).any() for b in bad):  # no column of a run all screened
            return runs
        h, w = rows[1] - rows[0], cols[1] - cols[0]
        valid = np.zeros((h, w), bool)
        for (r0, r1, c0, c1), b in zip(runs, bad, strict=True):
            np.logical_not(b, out=valid[r0:r1, c0:c1])
        clear = block_runs(valid, rows, cols, self.grid.block_shape)
        if clear != runs:
            grid = self.grid
            file = (grid.block_shape, (grid.height, grid.width), grid.count)
            (blocks, nbytes), (kept_blocks, kept_bytes) = (
                _cost(rows, cols, runs, *file),
                _cost(rows, cols, clear, *file),
            )
            SCREENED.add(blocks - kept_blocks, nbytes - kept_bytes)
        return clear

    def _read_runs(self, t, qai, dest, runs, rows, cols, where, failed) -> None:
        """Read the ``runs`` (relative to the rectangle ``rows`` x ``cols`` of the file) of scene
        ``t``'s QAI (``qai``) or BOA file into ``dest`` (``(bands, h, w)``, or ``(h, w)`` for the
        QAI) through a kept dataset (:meth:`_lend`); remote files with retries.  An error that is
        not an :class:`InputDataError` already is raised as ``failed(exc)``."""
        from rasterio.windows import Window as RioWindow

        url = self._file(t, qai)[0]
        rects = [RioWindow(cols[0] + c0, rows[0] + r0, c1 - c0, r1 - r0) for r0, r1, c0, c1 in runs]

        def read():
            try:
                lent = self._lend(t, qai)
            except InputDataError:
                raise
            except Exception as exc:  # not a GeoTIFF, gone, no access: retried if remote, named
                raise _OpenFailed(str(exc)) from exc
            with lent as src:  # closed, not kept, where a read raises
                for (r0, r1, c0, c1), rw in zip(runs, rects, strict=True):
                    if dest.ndim == 3:
                        src.read(window=rw, out=dest[:, r0:r1, c0:c1])
                    else:
                        src.read(1, window=rw, out=dest[r0:r1, c0:c1])
                if dest.ndim == 3:
                    lent.count_reads(rects)
                block, size = tuple(src.block_shapes[0]), (src.height, src.width)
            DECODED.add(*_cost(rows, cols, runs, block, size, src.count))

        try:
            read_retrying(url, read, what=f"reading {where}", permanent=(InputDataError,))
        except InputDataError:
            raise
        except Exception as exc:
            raise failed(exc) from exc


class _PieceArray:
    """A piece in memory, filled scene by scene: :class:`~treesits_dask.io.pieces.PieceWriter`'s
    counterpart for :meth:`WindowReader._read_into_pieces`."""

    __slots__ = ("array",)

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.array = RECYCLER.empty(shape, np.int16)

    def put(self, t: int, scene: np.ndarray) -> None:
        self.array[t] = scene

    def close(self) -> np.ndarray:
        return self.array

    def abort(self) -> None:
        """Nothing to undo: the array goes back to the recycler once dropped."""


def _extent(rows, cols) -> tuple[int, int]:
    """(height, width) of the rectangle ``rows`` x ``cols``."""
    return rows[1] - rows[0], cols[1] - cols[0]


def _nodata_outside(out: np.ndarray, runs: list) -> None:
    """Nodata in all of ``out`` (scenes, bands, rows, cols) unless the block ``runs`` to decode
    into it cover it whole: blocks without a mask pixel are not decoded."""
    h, w = out.shape[-2:]
    if sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in runs) < h * w:
        out.fill(NODATA)


def _side_by_side(windows: tuple[Window, ...], masks: tuple) -> list[list[int]]:
    """The indices of ``windows`` in runs of windows side by side in one row (same rows, each
    starting where the last ends), leaving out those whose mask (if ``masks``) has no pixel."""
    out: list[list[int]] = []
    for k, w in enumerate(windows):
        if masks and not np.any(masks[k]):
            continue
        if out:
            p = windows[out[-1][-1]]
            if (p.row_off, p.height, p.col_off + p.width) == (w.row_off, w.height, w.col_off):
                out[-1].append(k)
                continue
        out.append([k])
    return out


def _cost(rows, cols, runs, block, size, bands) -> tuple[int, int]:
    """(band-blocks, bytes) that reading ``runs`` (relative to the rectangle ``rows`` x ``cols``)
    of a file of ``size`` in ``block``\\ s of ``bands`` bands decodes (see :data:`DECODED`,
    :func:`~treesits_dask.io.bands.decoded_bytes`)."""
    costs = [
        decoded_bytes(
            (rows[0] + r0, rows[0] + r1), (cols[0] + c0, cols[0] + c1), block, size, bands
        )
        for r0, r1, c0, c1 in runs
    ]
    return sum(c[0] for c in costs), sum(c[1] for c in costs)
