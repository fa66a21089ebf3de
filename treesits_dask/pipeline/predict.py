"""The prediction stage: the kernel (numpy window in, numpy outputs out), its Dask layer, the
per-process model cache and the worker plugin that loads the model once per worker.

:func:`predict_block` is a pure function of its inputs (a window of all scenes, the mask, the scene
days and a model); only pixels inside the mask with at least one valid observation are packed into
batches, everything else gets the output nodata without touching the model.  :func:`predict_layer`
maps it over the windows of a tile, with the ``GPU`` resource annotation on heterogeneous
clusters.

This module is longer than 400 lines because the kernel, its Dask layer, the model cache and the
worker plugin share the process-wide model state (one model per worker process).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
from distributed.diagnostics.plugin import WorkerPlugin

from ..io.buffers import trim_heap
from ..io.cube import NODATA, READS_IN_PROGRESS, InProgress
from ..io.datasets import forwards_here
from ..models import ModelSpec
from ..outputs.alerts import AlertSteps, fresh_state, step
from ..outputs.schema import (
    ALERT_STATES,
    ALERT_VARIABLES,
    CLASS_NODATA,
    DTYPES,
    UNCERTAINTY,
    Packing,
    empty_outputs,
)
from ..outputs.uncertainty import uncertainty
from .devices import device_lock, device_pool

__all__ = [
    "FORWARDS_IN_PROGRESS",
    "Inference",
    "ModelPlugin",
    "annotate",
    "fill_outputs",
    "get_predictor",
    "give_back_memory",
    "inference_stats",
    "last_valid_day",
    "load_count",
    "malloc_tuned",
    "predict_block",
    "predict_layer",
    "select_pixels",
    "threads_for_forward",
    "tune_malloc",
    "valid_observations",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inference:
    """How workers run the model, beside its device: ``precision`` (``fp32``, ``tf32``,
    ``bf16``), ``compile`` (``torch.compile``) and ``max_batch`` (the most pixels per batch on an
    accelerator, where the batch is chosen from the free device memory).  Small and hashable:
    shipped in task graphs and part of the model cache key."""

    precision: str = "fp32"
    compile: bool = False
    max_batch: int = 65536

    @classmethod
    def of(cls, config) -> Inference:
        """The inference settings of a :class:`~treesits_dask.config.RunConfig`."""
        return cls(config.precision, config.torch_compile, config.gpu_batch_max)


_CACHE: dict[tuple[ModelSpec, str, Inference], object] = {}
_LOCK = threading.Lock()
_LOADS = 0


class _Forwards(InProgress):
    """CPU forwards running in this process; the first tells the pool of kept files
    (:func:`~treesits_dask.io.datasets.forwards_here`)."""

    def __enter__(self):
        forwards_here()
        return super().__enter__()


# On an accelerator one forward runs at a time per device, the other windows in flight select
# their pixels beside it (pipeline.devices).  On CPU every worker thread runs its own forward and
# the worker's cores are shared out among them and the reads (see ModelPlugin).
#: CPU forwards running in this process right now (see :func:`threads_for_forward`)
FORWARDS_IN_PROGRESS = _Forwards()
#: glibc allocator thresholds of inference workers (see :func:`tune_malloc`)
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_MALLOC_TUNED = False
#: the worker threads that CPU forwards share out (set by ModelPlugin; None outside Dask workers)
_CPU_THREADS: int | None = None


def get_predictor(spec: ModelSpec, device: str = "auto", inference: Inference | None = None):
    """The model for ``spec``, loaded once per process and kept on its device."""
    global _LOADS
    inference = inference or Inference()
    key = (spec, device, inference)
    model = _CACHE.get(key)
    if model is None:
        with _LOCK:
            model = _CACHE.get(key)
            if model is None:
                from ..models import load_model

                t0 = time.perf_counter()
                model = load_model(
                    spec,
                    device=device,
                    precision=inference.precision,
                    compile=inference.compile,
                    max_batch=inference.max_batch,
                )
                _share_cores(model)
                _CACHE[key] = model
                _LOADS += 1
                log.info(
                    "loaded %s model %s on %s (%s) in %.2fs",
                    spec.family,
                    spec.uri,
                    model.device,
                    inference.precision,
                    time.perf_counter() - t0,
                )
    return model


def inference_stats() -> list[dict]:
    """What the models of this process did: device, precision, feed, the batch chosen for the
    last window, the batch limit an out-of-memory error set, and the peak device memory (CUDA).
    Collected from every worker into the run report."""
    out = []
    for (spec, _device, inference), model in list(_CACHE.items()):
        dev = getattr(model, "device", None)
        entry = {
            "model": spec.uri,
            "device": str(dev),
            "precision": inference.precision,
            "compile": inference.compile,
            "feed": getattr(model, "feed", None),
            "last_batch": getattr(model, "last_batch", None),
            "batch_limit_after_oom": getattr(model, "batch_limit", None),
            "peak_device_memory_mib": None,
        }
        if getattr(dev, "type", None) == "cuda":
            import torch

            entry["peak_device_memory_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        out.append(entry)
    return out


def _share_cores(predictor) -> None:
    """On CPU in a Dask worker: the predictor shares the worker's cores with the reads and the
    other forwards in progress (see :func:`threads_for_forward`)."""
    if _CPU_THREADS and getattr(getattr(predictor, "device", None), "type", None) == "cpu":
        predictor.threads = functools.partial(threads_for_forward, _CPU_THREADS)


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
    ok = bool(mallopt(m_mmap_threshold, MMAP_THRESHOLD)) and bool(
        mallopt(m_trim_threshold, TRIM_THRESHOLD)
    )
    _MALLOC_TUNED = _MALLOC_TUNED or ok
    return ok


#: share of a worker's memory limit above which its process gives the memory glibc keeps in its
#: heaps back to the system (:func:`give_back_memory`; Dask's target, where it has one)
TRIM_SHARE = 0.6
#: (times, bytes) this process gave memory back so (tests and benchmarks read it)
TRIMMED = [0, 0]


def give_back_memory(dask_worker) -> bool:
    """Where :func:`tune_malloc` took effect and the worker's process holds more than its target
    (Dask's ``target`` share of its memory limit, else :data:`TRIM_SHARE`), give the free memory
    of glibc's heaps back to the system (``malloc_trim``).  With the raised trim threshold, memory
    freed in the middle of a heap stays with the process: a 3 GiB worker streaming two tiles held
    2.40 GiB with 19 MB of Dask data, paused by Dask at 80 % with nothing running that could free
    it, until ``malloc_trim`` brought it to 0.82 GiB.  Called every second by
    :class:`ModelPlugin` (a few ms where there is anything to give back); returns whether it
    trimmed."""
    manager = getattr(dask_worker, "memory_manager", None)
    limit = getattr(manager, "memory_limit", None)
    if not _MALLOC_TUNED or not limit:
        return False
    share = getattr(manager, "memory_target_fraction", None) or TRIM_SHARE
    before = dask_worker.monitor.get_process_memory()
    if before < share * limit:
        return False
    trim_heap()
    freed = before - dask_worker.monitor.get_process_memory()
    TRIMMED[0] += 1
    TRIMMED[1] += max(0, freed)
    return True


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` took effect in this process (tests ask the workers)."""
    return _MALLOC_TUNED


def threads_for_forward(total: int) -> int:
    """Torch threads for the next batch of a CPU forward: the ``total`` cores of the worker less
    one per window read running right now, shared evenly among the forwards running right now.

    Two windows predicted side by side with one thread each beat one window at a time with two
    threads (~1.15x for the LSTM, ~1.35x for SBERT on 2 cores: their ops are too small to split
    well), and a read beside a forward that uses every core stalls its OpenMP barriers (2.4x
    slower).  A forward running alone (the last window of a tile) still gets every core.
    """
    forwards = max(1, FORWARDS_IN_PROGRESS.count)
    return max(1, (total - READS_IN_PROGRESS.count) // forwards)


def _pixel_axis(block: np.ndarray) -> tuple[np.ndarray, int]:
    """``block`` (T, bands, h, w) as a ``(T, bands, L)`` array whose pixel ``(y, x)`` is at
    ``y * row + x``, and ``row``, never a copy of a window of windows read side by side: a
    contiguous window is reshaped, a view of a wider read (rows ``row`` pixels apart) is seen
    through its rows, the gaps between them included."""
    t_, b_, h, w = block.shape
    if block.flags.c_contiguous:
        return block.reshape(t_, b_, h * w), w
    st, sb, sy, sx = block.strides
    item = block.itemsize
    if h and w and sx == item and sy % item == 0 and sy >= w * item and min(st, sb) > 0:
        row = sy // item
        span = (h - 1) * row + w
        view = np.lib.stride_tricks.as_strided(
            block, shape=(t_, b_, span), strides=(st, sb, item), writeable=False
        )
        return view, row
    return np.ascontiguousarray(block).reshape(t_, b_, h * w), w


def valid_observations(series: np.ndarray, axis: int = 1, out: np.ndarray | None = None):
    """Where no band of ``series`` (its bands along ``axis``) is nodata, into ``out`` if given:
    band by band, each compared into one temporary (half to a fifth of the time of reducing each
    observation's 10 bands, a short axis)."""

    def band(b: int) -> np.ndarray:
        return series[(slice(None),) * axis + (b,)]

    out = np.not_equal(band(0), NODATA, out=out)
    other = np.empty_like(out)
    for b in range(1, series.shape[axis]):
        out &= np.not_equal(band(b), NODATA, out=other)
    return out


def select_pixels(
    block: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels of a ``(T, bands, h, w)`` window that reach the model: inside ``mask`` (if given)
    with at least one valid observation.  Returns their flat indices, their series ``(N, T, bands)``
    and validity ``(N, T)``, contiguous.

    Without a mask validity is found band by band (temporaries of ``(T, h, w)``, not of the whole
    window: a window of 600 scenes is hundreds of MB); with one the mask's pixels are gathered
    first and validity is found from their series, so nothing of the window's size is made.
    """
    t_, b_, h, w = block.shape
    flat, row = _pixel_axis(block)
    if mask is None:
        valid = valid_observations(block).reshape(t_, h * w)  # temporaries of (T, h, w)
        idx = np.flatnonzero(valid.any(axis=0))
        valid = np.ascontiguousarray(valid[:, idx].T)  # before the series: one validity at a time
        return idx, _gather(flat, idx, w, row), valid
    idx = np.flatnonzero(mask)
    series = _gather(flat, idx, w, row)
    valid = np.empty(series.shape[:2], dtype=bool)
    step = max(1, _VALID_BYTES // max(1, t_ * b_))  # pixels at a time: a bounded temporary
    for lo in range(0, len(idx), step):  # a cached part of the pixels at a time
        valid_observations(series[lo : lo + step], axis=2, out=valid[lo : lo + step])
    keep = valid.any(axis=1)
    if not keep.all():  # pixels of the mask without a valid observation
        idx, series, valid = idx[keep], series[keep], valid[keep]
    return idx, series, valid


#: bytes of the temporary that finds the validity of a mask's pixels from their series
_VALID_BYTES = 2**20


def _gather(flat: np.ndarray, idx: np.ndarray, w: int, row: int) -> np.ndarray:
    """The series ``(N, T, bands)`` of the pixels ``idx`` of a window seen by :func:`_pixel_axis`,
    contiguous (numpy lays a gather along the last axis out pixel-major: the transpose is free)."""
    at = idx if row == w else idx // w * row + idx % w
    return np.ascontiguousarray(flat[:, :, at].transpose(2, 0, 1))


def predict_block(
    block: np.ndarray,
    mask: np.ndarray | None,
    days: np.ndarray,
    predictor,
    batch_size: int = 2048,
    layers: tuple[str, ...] = (),
    alerts: AlertSteps | None = None,
    prev: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Predict one window.

    Parameters
    ----------
    block : (T, 10, h, w) int16 BOA of all scenes of the window, -9999 = invalid observation
        (nodata or QAI-screened), ascending dates.
    mask : (h, w) bool or None; False pixels are not predicted.
    days : (T,) int64 days since 1970-01-01 of the scenes.
    predictor : an object with ``card`` (``n_classes``) and
        ``predict(series (N, T, 10) int16, valid (N, T) bool, days)`` returning
        ``(probs (N, C), n_used (N,))``.
    layers : optional kernel layers to compute (:data:`~treesits_dask.outputs.schema.UNCERTAINTY`
        names, multi-class models; the alert layers come with ``alerts``).
    alerts : the alert steps of the tile (binary models): the map's probability comes from the
        scenes from ``alerts.model_lo`` on (earlier ones are there for the steps' windows), and
        each step runs the model on its own window (:mod:`treesits_dask.outputs.alerts`).
    prev : (3, h, w) the alert layers before these steps (None: no history).

    Returns the variables of :mod:`treesits_dask.outputs.schema`: ``probability`` (C, h, w),
    ``class``, ``valid_obs`` (observations used), ``last_obs_valid`` (1 newest scene valid, 0
    invalid), ``last_valid_date`` (days since 1970-01-01 of the newest valid observation) and the
    ``layers``, each with its nodata where not predicted.
    """
    h, w = block.shape[2:]
    n_classes = predictor.card.n_classes
    out = empty_outputs(n_classes, (h, w), layers)
    lo = alerts.model_lo if alerts is not None else 0
    state = None
    if alerts is not None:
        state = fresh_state((h, w)) if prev is None else np.array(prev, dtype=np.int64)
        state = state.reshape(3, h * w)
        for k, var in enumerate(ALERT_VARIABLES):
            out[var] = state[k].reshape(h, w).astype(DTYPES[var])
    if mask is not None and not mask.any():
        return out
    idx, series, valid_sel = select_pixels(block, mask)
    if idx.size == 0:
        return out
    days = np.asarray(days)
    device = getattr(predictor, "device", None)
    on_cpu = getattr(device, "type", "cpu") == "cpu"

    def forward(px, first: int, last: int):
        # every selected pixel (the map's own window, no alert steps): the series as they are,
        # not a copy of them (a window of 600 scenes is hundreds of MB)
        rows = slice(None) if px.all() else px
        with FORWARDS_IN_PROGRESS if on_cpu else device_lock(str(device)):
            return predictor.predict(
                series[rows, first : last + 1], valid_sel[rows, first : last + 1],
                days[first : last + 1], batch_size=batch_size,
            )  # fmt: skip

    now = valid_sel[:, lo:].any(axis=1)  # a valid observation in the model's window
    probs_all = np.full((idx.size, n_classes), np.nan, dtype=np.float32)
    if now.any():
        probs, n_used = forward(now, lo, block.shape[0] - 1)
        probs_all[now] = probs
        newest = last_valid_day(valid_sel[now, lo:], days[lo:])
        fill_outputs(out, idx[now], probs, n_used, valid_sel[now, -1], newest, layers)
    if alerts is not None:
        st = state[:, idx]
        last = block.shape[0] - 1
        for t, first in alerts.steps:
            px = valid_sel[:, t]
            if not px.any():
                continue
            if t == last and first == lo:  # the map's own window: its probabilities
                q = probs_all[px, 0]
            else:
                q = forward(px, first, t)[0][:, 0]
            sub = st[:, px]
            step(sub[0], sub[1], sub[2], q >= alerts.threshold, int(days[t]),
                 alerts.confirm_after)  # fmt: skip
            st[:, px] = sub
        st[2][st[2] == CLASS_NODATA] = ALERT_STATES["none"]  # predicted at least once
        state[:, idx] = st
        for k, var in enumerate(ALERT_VARIABLES):
            out[var] = state[k].reshape(h, w).astype(DTYPES[var])
    return out


def fill_outputs(
    out: dict[str, np.ndarray],
    sel: np.ndarray,
    probs: np.ndarray,
    n_used: np.ndarray,
    last_valid: np.ndarray,
    last_day: np.ndarray,
    layers: tuple[str, ...] = (),
) -> None:
    """Write the outputs of the pixels ``sel`` (flat indices of the window) into ``out``
    (:func:`~treesits_dask.outputs.schema.empty_outputs`): their probabilities ``probs`` (N, C),
    the class, observations used ``n_used``, whether the newest scene is valid (``last_valid``),
    the day of the newest valid observation (``last_day``) and the uncertainty ``layers``."""
    n_classes = probs.shape[1]
    out["probability"].reshape(n_classes, -1)[:, sel] = probs.T
    if n_classes > 1:
        out["class"].reshape(-1)[sel] = np.argmax(probs, axis=1).astype(DTYPES["class"])
    most = np.iinfo(DTYPES["valid_obs"]).max
    out["valid_obs"].reshape(-1)[sel] = np.minimum(n_used, most).astype(DTYPES["valid_obs"])
    out["last_obs_valid"].reshape(-1)[sel] = last_valid.astype(DTYPES["last_obs_valid"])
    out["last_valid_date"].reshape(-1)[sel] = last_day.astype(DTYPES["last_valid_date"])
    wanted = [v for v in layers if v in UNCERTAINTY]
    if wanted:
        for var, values in uncertainty(probs, wanted).items():
            out[var].reshape(-1)[sel] = values


def last_valid_day(valid: np.ndarray, days: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of each pixel's newest valid observation (``valid`` (N, T), every
    pixel with at least one), int32.  Both families use it: SBERT keeps the newest valid
    observations of its window, the SITS-NN models every scene of theirs."""
    t = valid.shape[1]
    newest = t - 1 - np.argmax(valid[:, ::-1], axis=1)
    return np.asarray(days, dtype=np.int64)[newest].astype(DTYPES["last_valid_date"])


def _predict_packed(
    block, *arrays, kinds=("mask",), days, spec, device, batch_size, inference=None,
    packing=None, alerts=None,
):  # fmt: skip
    """The kernel as a task: ``arrays`` are the window's ``kinds`` (``mask``, ``prev``: the alert
    layers before this run's steps); returns the packed outputs."""
    given = dict(zip(kinds, arrays, strict=True))
    args = dict(layers=packing.layers, alerts=alerts, prev=given.get("prev"))
    pool = device_pool(device)
    if pool is None:
        predictor = get_predictor(spec, device, inference)
        return packing.pack(
            predict_block(block, given.get("mask"), days, predictor, batch_size, **args)
        )
    with pool.take() as one:  # the least busy device of this worker
        predictor = get_predictor(spec, one, inference)
        return packing.pack(
            predict_block(block, given.get("mask"), days, predictor, batch_size, **args)
        )


def _predict_packed_nomask(block, *arrays, kinds=(), **kwargs):
    return _predict_packed(block, *arrays, kinds=kinds, **kwargs)


def annotate(resources: dict | None):
    """``dask.annotate(resources=...)``, or nothing when ``resources`` is empty."""
    import dask

    return dask.annotate(resources=resources) if resources else contextlib.nullcontext()


def predict_layer(
    data,
    mask,
    days: np.ndarray,
    spec: ModelSpec,
    n_classes: int,
    device: str,
    batch_size: int,
    resources: dict | None = None,
    inference: Inference | None = None,
    packing: Packing | None = None,
    alerts: AlertSteps | None = None,
    prev=None,
):
    """Lazy dask array (bands, y, x) float32: the packed outputs of every window of a tile, laid
    out as ``packing`` says (default: the probabilities of ``n_classes`` classes and no optional
    layers; see :class:`~treesits_dask.outputs.schema.Packing`).  With ``alerts`` the alert steps
    of the tile run in the kernel, from ``prev`` (a (3, y, x) array of the alert layers before
    them, chunked like ``data``).

    ``data`` is the tile cube (time, band, y, x), ``mask`` a (y, x) bool array chunked like it or
    None.  With ``resources`` (e.g. ``{"GPU": 0.5}``: half a GPU, so that a worker advertising
    ``GPU=1`` holds two windows at once) the tasks carry that Dask resource: only
    workers that advertise it run inference (the graph must then be computed without
    optimisation, see ``pipeline.run``).
    """
    import dask.array as da

    packing = packing or Packing(n_classes)
    meta = np.empty((0, 0, 0), np.float32)
    common = dict(
        days=days,
        spec=spec,
        device=device,
        batch_size=batch_size,
        inference=inference or Inference(),
        packing=packing,
        alerts=alerts,
        dtype=np.float32,
        concatenate=True,
        meta=meta,
        new_axes={"k": packing.size},
    )
    inputs, kinds = [data, "tbyx"], []
    for kind, array, index in (("mask", mask, "yx"), ("prev", prev, "ayx")):
        if array is not None:
            inputs += [array, index]
            kinds.append(kind)
    func = _predict_packed if mask is not None else _predict_packed_nomask
    with annotate(resources):
        return da.blockwise(func, "kyx", *inputs, kinds=tuple(kinds), **common)


class ModelPlugin(WorkerPlugin):
    """Dask worker plugin: sets the allocator (:func:`tune_malloc`) and how CPU forwards share the
    worker's cores, and loads the model once when a worker starts (in the background, beside the
    first window reads).

    Registered with ``client.register_plugin``; it also runs on workers that join later.
    """

    name = "treesits-model"

    def __init__(
        self,
        spec: ModelSpec,
        device: str = "auto",
        torch_threads: int | None = None,
        resource: str | None = None,
        inference: Inference | None = None,
    ):
        self.spec = spec
        self.device = device
        self.torch_threads = torch_threads
        self.resource = resource  # only workers advertising it run inference (e.g. "GPU")
        self.inference = inference or Inference()

    def setup(self, worker=None):  # noqa: D401 - dask WorkerPlugin hook
        global _CPU_THREADS
        # as many torch threads as the worker has (nanny workers start with OMP_NUM_THREADS=1)
        threads = max(
            1, self.torch_threads or getattr(getattr(worker, "state", None), "nthreads", None) or 1
        )
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
        if tune_malloc():
            from tornado.ioloop import PeriodicCallback

            name = "treesits-give-back-memory"
            if (earlier := worker.periodic_callbacks.pop(name, None)) is not None:
                earlier.stop()  # the plugin registered again by a later run
            trim = PeriodicCallback(functools.partial(give_back_memory, worker), 1000)
            worker.periodic_callbacks[name] = trim
            trim.start()
        # setup runs on the worker's event loop: importing torch and loading the model there would
        # hold every task back for seconds.  Load beside the first window reads instead; the first
        # forward waits for it (get_predictor's lock) or, if this load failed, raises the error
        threading.Thread(
            target=self._load_ahead, args=(threads,), name="treesits-model-load", daemon=True
        ).start()

    def _load(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        pool = device_pool(self.device)
        for device in pool.devices if pool is not None else [self.device]:
            get_predictor(self.spec, device, self.inference)

    def _load_ahead(self, threads: int) -> None:
        try:
            self._load(threads)
        except Exception as exc:  # noqa: BLE001 - the first window loads it again and reports why
            log.warning("could not load %s ahead of the first window: %s", self.spec.uri, exc)

    def teardown(self, worker=None):
        pass
