"""Writing the scenes of a synthetic tile in parallel processes (big tiles: 3000 x 3000 px with
hundreds of scenes).

Each scene is rendered from the tile's signal and its own random generator (seeded by the seed,
the tile and the scene's index), so the files are byte-identical to a serial run whatever the
number of processes or the order they finish in.  The signal (about 1 GB for a 3000 px tile) is
written once to ``.npy`` files that every process maps read-only, so the processes share it
through the page cache instead of each holding a copy.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import numpy as np

from . import phenology as ph
from .files import write_scene

__all__ = ["auto_processes", "write_scenes_parallel"]

log = logging.getLogger(__name__)

#: bytes of memory one rendering process needs per pixel of the tile (float32 temporaries of the
#: 10 bands, noise fields, the int16 result; measured ~120 B/px at 3000 px)
BYTES_PER_PIXEL = 160

_SIGNALS: dict[str, ph.TileSignal] = {}


def auto_processes(size: int, n_scenes: int) -> int:
    """Processes for a tile: one (in-process writing) for small cubes, else the cores, as many as
    the available memory holds."""
    if size * size * n_scenes < 3000 * 3000 * 8:
        return 1
    try:
        import psutil

        available = psutil.virtual_memory().available
    except ImportError:  # pragma: no cover - psutil comes with distributed
        available = 8 << 30
    by_memory = max(1, int(available * 0.6) // (size * size * BYTES_PER_PIXEL))
    return max(1, min(os.cpu_count() or 1, by_memory, n_scenes))


def _signal(folder: str) -> ph.TileSignal:
    sig = _SIGNALS.get(folder)
    if sig is None:
        arrays = {
            f.name: np.load(Path(folder) / f"{f.name}.npy", mmap_mode="r")
            for f in fields(ph.TileSignal)
        }
        sig = _SIGNALS[folder] = ph.TileSignal(**arrays)
    return sig


def _scene(job: tuple) -> str:
    signal, folder, name, weather, doy, seed, key, i, write_qai, transform, layout, crs, day = job
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(*key, i)))
    cut = None
    if day is not None:  # clear-cuts: the pixels cut on or before the scene's day
        cut_day = np.load(Path(signal) / "cut_day.npy", mmap_mode="r")
        cut = (cut_day > 0) & (cut_day <= day)
    boa, qai = ph.render_scene(rng, _signal(signal), weather, doy, cut)
    write_scene(Path(folder), name, boa, qai if write_qai else None, transform, layout, crs)
    return name


def write_scenes_parallel(
    sig: ph.TileSignal,
    folder: Path,
    names: Sequence[str],
    weather: Sequence[ph.Weather],
    doys: Sequence[int],
    seed: int,
    key: tuple[int, int],
    write_qai: bool,
    transform,
    layout: str,
    crs: str,
    processes: int,
    cut_day: np.ndarray | None = None,
    days: Sequence[int] | None = None,
) -> None:
    """Render and write the scenes ``names`` of one tile in ``processes`` processes (``spawn``:
    safe beside the threads of a Dask client).  ``cut_day``: the clear-cut day of each pixel
    (days since 1970-01-01, 0 = none) and ``days`` the scenes' days, or None."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with tempfile.TemporaryDirectory(prefix="synthetic-signal-", dir=folder.parent) as tmp:
        for f in fields(ph.TileSignal):
            np.save(Path(tmp) / f"{f.name}.npy", getattr(sig, f.name))
        if cut_day is not None:
            np.save(Path(tmp) / "cut_day.npy", cut_day)
        jobs = [
            (tmp, str(folder), name, w, doy, seed, key, i, write_qai, transform, layout, crs,
             None if cut_day is None else days[i])
            for i, (name, w, doy) in enumerate(zip(names, weather, doys, strict=True))
        ]  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
            for _ in pool.map(_scene, jobs):
                pass
