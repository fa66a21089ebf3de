"""Asking the kernel for the compressed bytes of the next scenes while this one decodes.

A tile of a national cube is read once per run and is not in the page cache: each compressed
strip or block GDAL asks for is a synchronous read, during which the reading thread's core
decodes nothing.  The reader therefore tells the kernel, before it decodes a scene, which byte
ranges of the next scenes' files it will read (``posix_fadvise(POSIX_FADV_WILLNEED)``, which
starts reading them in the background), so that the disk works while the cores decode.  On this
project's 2-core VM a 3000 px x 120-scene strips tile read from disk in 72.1-72.9 s without and
66.0-71.8 s with it (57-60 s from the page cache): most of what a read from disk costs there is
the kernel's own CPU (about 1.7 s per GB), which reading ahead does not save; what it saves grows
with the storage's latency.

Only local files (a remote file's bytes are fetched by GDAL's own HTTP reads); the ranges are the
file's own blocks (the ``BLOCK_OFFSET`` / ``BLOCK_SIZE`` GDAL reports for a GeoTIFF), those
intersecting the runs of blocks the read decodes, of every band of a band-interleaved file.  It is
best effort: a file that cannot be opened or has no such offsets is left to the read, which
reports it.
"""

from __future__ import annotations

import os

from . import storage
from .datasets import Counter

__all__ = ["PREFETCH", "PREFETCHED", "SCENES_AHEAD", "block_ranges", "will_need"]

#: ask for the next scenes' bytes in the reads of this process (benchmarks switch it off to
#: compare)
PREFETCH = True

#: how many scenes ahead of the one it decodes a read has screened (their QAI decoded) and asked
#: the kernel for their unscreened BOA blocks
SCENES_AHEAD = 1

#: bytes the reads of this process asked the kernel to read ahead
PREFETCHED = Counter()

#: ranges closer than this are asked for as one (fewer calls; the gap is read too)
MERGE_GAP = 64 * 2**10


def block_ranges(src, rows, cols, runs) -> list[tuple[int, int]]:
    """``(offset, size)`` in the file of ``src`` (an open GeoTIFF) of every block that the
    ``runs`` ``(row0, row1, col0, col1)`` (relative to the rectangle ``rows`` x ``cols``) touch,
    every band's where the bands are stored apart, merged where they (nearly) touch; empty
    where GDAL gives no offsets (not a GeoTIFF)."""
    bh, bw = src.block_shapes[0]
    separate = src.count > 1 and getattr(src.interleaving, "name", "") == "band"
    bands = range(1, src.count + 1) if separate else (1,)
    found = []
    for r0, r1, c0, c1 in runs:
        y0, y1 = (rows[0] + r0) // bh, min(rows[0] + r1, src.height) - 1
        x0, x1 = (cols[0] + c0) // bw, min(cols[0] + c1, src.width) - 1
        y1, x1 = y1 // bh, x1 // bw
        for b in bands:
            for y in range(y0, y1 + 1):
                for x in range(x0, x1 + 1):
                    offset = src.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=b)
                    size = src.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=b)
                    if not offset or not size:
                        return []
                    if int(size) > 0:
                        found.append((int(offset), int(size)))
    merged: list[list[int]] = []
    for offset, size in sorted(found):
        if merged and offset <= merged[-1][0] + merged[-1][1] + MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], offset + size - merged[-1][0])
        else:
            merged.append([offset, size])
    return [(o, s) for o, s in merged]


def will_need(url: str, ranges: list[tuple[int, int]]) -> int:
    """Ask the kernel to read ``ranges`` of the local file ``url`` in the background; the bytes
    asked for (0 for a remote file, or where the platform has no ``posix_fadvise``)."""
    if not ranges or storage.is_remote(url) or not hasattr(os, "posix_fadvise"):
        return 0
    fd = os.open(storage.strip_protocol(url), os.O_RDONLY)
    try:
        for offset, size in ranges:
            os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)
    nbytes = sum(size for _, size in ranges)
    PREFETCHED.add(nbytes)
    return nbytes
