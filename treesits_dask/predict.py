"""The prediction kernel: numpy window in, numpy outputs out; plus the per-process model cache.

:func:`predict_block` is a pure function of its inputs (a window of all scenes, the mask, the scene
days and a model); only pixels inside the mask with at least one valid observation are packed into
batches, everything else gets the output nodata without touching the model.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from .cube import NODATA, READS_IN_PROGRESS, _InProgress
from .models import ModelSpec

__all__ = [
    "predict_block",
    "select_pixels",
    "pack_outputs",
    "unpack_outputs",
    "get_predictor",
    "load_count",
    "ModelPlugin",
    "empty_outputs",
    "tune_malloc",
    "FORWARDS_IN_PROGRESS",
]

log = logging.getLogger(__name__)

_CACHE: dict[tuple[ModelSpec, str], object] = {}
_LOCK = threading.Lock()
_LOADS = 0
# On an accelerator one forward pass runs at a time per process (its memory is sized for one),
# while the worker's other threads read the next windows.  On CPU every worker thread runs its own
# forward and the worker's cores are shared out among them and the reads (see ModelPlugin).
_ACCELERATOR = threading.Lock()
#: CPU forwards running in this process right now (see :func:`_threads_for_forward`)
FORWARDS_IN_PROGRESS = _InProgress()
#: glibc allocator thresholds of inference workers (see :func:`tune_malloc`)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_MALLOC_TUNED = False
#: the worker threads that CPU forwards share out (set by ModelPlugin; None outside Dask workers)
_CPU_THREADS: int | None = None


def get_predictor(spec: ModelSpec, device: str = "auto"):
    """The model for ``spec``, loaded once per process and kept on its device."""
    global _LOADS
    key = (spec, device)
    model = _CACHE.get(key)
    if model is None:
        with _LOCK:
            model = _CACHE.get(key)
            if model is None:
                from .models import load_model

                t0 = time.perf_counter()
                model = load_model(spec, device=device)
                _share_cores(model)
                _CACHE[key] = model
                _LOADS += 1
                log.info("loaded %s model %s on %s in %.2fs", spec.family, spec.uri, model.device,
                         time.perf_counter() - t0)
    return model


def _share_cores(predictor) -> None:
    """On CPU in a Dask worker: the predictor shares the worker's cores with the reads and the
    other forwards in progress (see :func:`_threads_for_forward`)."""
    if _CPU_THREADS and getattr(getattr(predictor, "device", None), "type", None) == "cpu":
        predictor.threads = functools.partial(_threads_for_forward, _CPU_THREADS)


def load_count() -> int:
    """How many times this process loaded a model (tests check that it is once per worker)."""
    return _LOADS


def tune_malloc() -> bool:
    """Let glibc keep torch's large temporaries on the heap instead of mmap-ing them afresh.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``; setting any malloc threshold
    switches off glibc's dynamic mmap threshold, so every allocation above 128 KiB (attention
    matrices, LSTM gates) becomes a new ``mmap`` whose pages fault in on first touch and go back to
    the OS on free.  On this 2-core machine that made the SBERT forward in a worker ~1.4x slower
    than the same forward in a plain process.  Raising the mmap threshold to glibc's maximum
    (32 MiB) and the trim threshold to 256 MiB brings it back.  Returns whether it was applied
    (glibc on Linux only; elsewhere nothing changes).
    """
    global _MALLOC_TUNED
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl etc.
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    ok = bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(mallopt(m_trim_threshold, TRIM_THRESHOLD))
    _MALLOC_TUNED = _MALLOC_TUNED or ok
    return ok


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` took effect in this process (tests ask the workers)."""
    return _MALLOC_TUNED


def _threads_for_forward(total: int) -> int:
    """Torch threads for the next batch of a CPU forward: the ``total`` cores of the worker less
    one per window read running right now, shared evenly among the forwards running right now.

    Two windows predicted side by side with one thread each beat one window at a time with two
    threads (~1.15x for the LSTM, ~1.35x for SBERT on 2 cores: their ops are too small to split
    well), and a read beside a forward that uses every core stalls its OpenMP barriers (2.4x
    slower).  A forward running alone (the last window of a tile) still gets every core.
    """
    forwards = max(1, FORWARDS_IN_PROGRESS.count)
    return max(1, (total - READS_IN_PROGRESS.count) // forwards)


def empty_outputs(n_classes: int, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    return {
        "probability": np.full((n_classes, *shape), np.nan, dtype=np.float32),
        "class": np.full(shape, 255, dtype=np.uint8),
        "valid_obs": np.zeros(shape, dtype=np.uint16),
        "last_obs_valid": np.full(shape, 255, dtype=np.uint8),
    }


def select_pixels(block: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels of a ``(T, bands, h, w)`` window that reach the model: inside ``mask`` (if given)
    with at least one valid observation.  Returns their flat indices, their series ``(N, T, bands)``
    and validity ``(N, T)``, contiguous."""
    t_, b_, h, w = block.shape
    valid = (block != NODATA).all(axis=1)  # (T, h, w)
    selected = valid.any(axis=0)
    if mask is not None:
        selected &= mask.astype(bool)
    idx = np.flatnonzero(selected)
    series = np.ascontiguousarray(block.reshape(t_, b_, h * w)[:, :, idx].transpose(2, 0, 1))
    return idx, series, np.ascontiguousarray(valid.reshape(t_, h * w)[:, idx].T)


def predict_block(
    block: np.ndarray,
    mask: np.ndarray | None,
    days: np.ndarray,
    predictor,
    batch_size: int = 2048,
) -> dict[str, np.ndarray]:
    """Predict one window.

    Parameters
    ----------
    block : (T, 10, h, w) int16 BOA of all scenes of the window, -9999 = invalid observation
        (nodata or QAI-screened), ascending dates.
    mask : (h, w) bool or None; False pixels are not predicted.
    days : (T,) int64 days since 1970-01-01 of the scenes.
    predictor : an object with ``card`` (``n_classes``) and
        ``predict(series (N, T, 10) int16, valid (N, T) bool, days) -> (probs (N, C), n_used (N,))``.

    Returns ``probability`` (C, h, w) float32 NaN where not predicted, ``class`` (h, w) uint8
    (255 not predicted), ``valid_obs`` (h, w) uint16 (observations used, 0 where not predicted),
    ``last_obs_valid`` (h, w) uint8 (1 newest scene valid, 0 invalid, 255 not predicted).
    """
    h, w = block.shape[2:]
    n_classes = predictor.card.n_classes
    out = empty_outputs(n_classes, (h, w))
    if mask is not None and not mask.any():
        return out
    idx, series, valid_sel = select_pixels(block, mask)
    if idx.size == 0:
        return out
    device = getattr(getattr(predictor, "device", None), "type", "cpu")
    with FORWARDS_IN_PROGRESS if device == "cpu" else _ACCELERATOR:
        probs, n_used = predictor.predict(series, valid_sel, np.asarray(days), batch_size=batch_size)
    prob = out["probability"].reshape(n_classes, h * w)
    prob[:, idx] = probs.T
    if n_classes > 1:
        out["class"].reshape(-1)[idx] = np.argmax(probs, axis=1).astype(np.uint8)
    out["valid_obs"].reshape(-1)[idx] = np.minimum(n_used, np.iinfo(np.uint16).max).astype(np.uint16)
    out["last_obs_valid"].reshape(-1)[idx] = valid_sel[:, -1].astype(np.uint8)
    return out


def pack_outputs(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """All outputs of a window in one float32 array (C + 3, h, w); integers are exact in float32."""
    return np.concatenate(
        [
            outputs["probability"],
            outputs["class"][None].astype(np.float32),
            outputs["valid_obs"][None].astype(np.float32),
            outputs["last_obs_valid"][None].astype(np.float32),
        ]
    )


def unpack_outputs(packed: np.ndarray, variables: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_outputs`."""
    c = packed.shape[0] - 3
    out = {
        "probability": packed[:c],
        "class": packed[c].astype(np.uint8),
        "valid_obs": packed[c + 1].astype(np.uint16),
        "last_obs_valid": packed[c + 2].astype(np.uint8),
    }
    if variables is not None:
        out = {k: v for k, v in out.items() if k in variables}
    return out


class ModelPlugin(WorkerPlugin):
    """Dask worker plugin: sets the allocator (:func:`tune_malloc`) and how CPU forwards share the
    worker's cores, and loads the model once when a worker starts (in the background, beside the
    first window reads).

    Registered with ``client.register_plugin``; it also runs on workers that join later.
    """

    name = "treesits-model"

    def __init__(self, spec: ModelSpec, device: str = "auto", torch_threads: int | None = None,
                 resource: str | None = None):
        self.spec = spec
        self.device = device
        self.torch_threads = torch_threads
        self.resource = resource  # only workers advertising it run inference (e.g. "GPU")

    def setup(self, worker=None):  # noqa: D401 - dask WorkerPlugin hook
        global _CPU_THREADS
        # as many torch threads as the worker has (nanny workers start with OMP_NUM_THREADS=1)
        threads = max(1, self.torch_threads or getattr(getattr(worker, "state", None), "nthreads", None) or 1)
        if self.resource and worker is not None:
            resources = getattr(getattr(worker, "state", None), "total_resources", None) or {}
            if self.resource not in resources:
                return  # a reading-only worker: never runs inference, keeps no model
        _CPU_THREADS = threads
        for predictor in list(_CACHE.values()):  # loaded by an earlier run on this worker
            _share_cores(predictor)
        if worker is None:  # called by hand: load right here, errors included
            self._load(threads)
            return
        tune_malloc()
        # setup runs on the worker's event loop: importing torch and loading the model there would
        # hold every task back for seconds.  Load beside the first window reads instead; the first
        # forward waits for it (get_predictor's lock) or, if this load failed, raises the error
        threading.Thread(target=self._load_ahead, args=(threads,), name="treesits-model-load",
                         daemon=True).start()

    def _load(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        get_predictor(self.spec, self.device)

    def _load_ahead(self, threads: int) -> None:
        try:
            self._load(threads)
        except Exception as exc:  # noqa: BLE001 - the first window loads it again and reports why
            log.warning("could not load %s ahead of the first window: %s", self.spec.uri, exc)

    def teardown(self, worker=None):
        pass
