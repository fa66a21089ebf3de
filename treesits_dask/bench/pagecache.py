"""The cube's files read into the operating system's page cache before a timed run, or put out
of it (the state of a national cube, read once per run).

Comparing two runs of the same tile (masked and unmasked) measures the pipeline only where both
read the files from the same place.  This development machine (a VM) evicts pages of files not
read for a while even with most of its memory free (its DAMON pages out file pages not touched
for 60 s), and then reads them from disk: at about 45 MB/s when this was first seen (at 3000 px the
first run of the masked comparison read from memory, the one 12 minutes later waited on the disk:
strips 404.6 s masked against 169.1 s with the cube read just before), at 1.3 GB/s in 1 MiB
direct reads later, with about 1.7 s of kernel CPU per GB read.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["page_in", "page_out"]


def page_in(root: str | Path | list, chunk: int = 16 * 2**20) -> int:
    """Read every file under ``root`` (or every file of a list) once, into the page cache; returns
    the bytes read."""
    total, buf = 0, bytearray(chunk)
    paths = map(Path, root) if isinstance(root, list | tuple) else sorted(Path(root).rglob("*"))
    for path in paths:
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return total


def page_out(root: str | Path) -> int:
    """Ask the kernel to drop every file under ``root`` from the page cache
    (``POSIX_FADV_DONTNEED``, which drops the pages no process maps); returns the bytes of the
    files.  0 where the platform has no ``posix_fadvise``."""
    if not hasattr(os, "posix_fadvise"):
        return 0
    total = 0
    for path in sorted(Path(root).rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total
