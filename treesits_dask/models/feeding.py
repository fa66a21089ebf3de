"""The device path of :meth:`Predictor.predict <treesits_dask.models.loading.Predictor.predict>`:
one window's pixels through the model on an accelerator, with the device kept busy.

Per batch the host only gathers the raw int16 series and the validity of the batch's pixels into
a staging buffer (pinned on CUDA); the copy to the device runs on a side stream, and the input
preparation (:mod:`treesits_dask.models.device_inputs`), the forward and the copy of the
probabilities back run on the compute stream.  Nothing waits for the device until the next batch
is queued: while the device computes batch ``i``, the host reads the results of batch ``i - 1``
and gathers batch ``i + 1``.

The batch is the largest that fits the free device memory (:func:`~.accelerator.batch_for_memory`),
at most the predictor's ``max_batch``.  A CUDA out-of-memory error halves it, for this window and
the next ones, with a warning, and the batch is done again in halves.

On CPU the same code runs synchronously (no pinning, no streams), which is how it is tested.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque

import numpy as np
import torch

from .accelerator import batch_for_memory, is_out_of_memory, pixel_bytes
from .device_inputs import full_inputs_torch, sbert_inputs_torch
from .preprocess import day_index_error, day_of_year

__all__ = ["feed_kept", "feed_window"]

log = logging.getLogger(__name__)


class _Window:
    """One window's pixels on their way through the device (the state of :func:`feed_window`)."""

    def __init__(self, predictor, series: np.ndarray, valid: np.ndarray, days: np.ndarray):
        self.p = predictor
        self.series, self.valid = series, valid
        self.dev = predictor.device
        self.cuda = self.dev.type == "cuda"
        seq = predictor.card.sequence
        self.sbert = seq["kind"] == "sbert"
        self.seq_len = int(seq.get("seq_len", 256))
        self.max_position = int(seq.get("max_position", 1826))
        counts = valid.sum(axis=1, dtype=np.int64)
        self.n_used = np.minimum(counts, self.seq_len) if self.sbert else counts
        # SBERT: pixels of similar observation counts together, so that padding is trimmed
        self.order = np.argsort(counts, kind="stable") if self.sbert else None
        self.probs = np.empty((len(series), predictor.card.n_classes), dtype=np.float32)
        if self.sbert:
            self.days = torch.as_tensor(days, dtype=torch.int64).to(self.dev)
            self.scene_doy = torch.as_tensor(day_of_year(days)).to(self.dev)
        self.copy_stream = torch.cuda.Stream(self.dev) if self.cuda else None

    def indices(self, lo: int, hi: int) -> np.ndarray:
        return self.order[lo:hi] if self.order is not None else np.arange(lo, hi)

    def submit(self, lo: int, hi: int) -> dict:
        """Queue pixels ``lo:hi`` (of the window's order): gather, copy, prepare, forward."""
        p, n = self.p, hi - lo
        steps, bands = self.series.shape[1:]
        slot, s_buf, v_buf = p.staging.take(n, steps, bands)
        idx = self.indices(lo, hi)
        if self.order is None:
            np.copyto(s_buf, self.series[lo:hi])
            np.copyto(v_buf, self.valid[lo:hi])
        else:
            # mode="clip": straight into the staging buffer (the default mode gathers into a
            # temporary first); the indices are in range anyway
            np.take(self.series, idx, axis=0, out=s_buf, mode="clip")
            np.take(self.valid, idx, axis=0, out=v_buf, mode="clip")
        s_host, v_host = p.staging.tensors(slot, n, steps, bands)
        if self.cuda:
            compute = torch.cuda.current_stream(self.dev)
            with torch.cuda.stream(self.copy_stream):
                s_dev = s_host.to(self.dev, non_blocking=True)
                v_dev = v_host.to(self.dev, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record(self.copy_stream)
            p.staging.copied(slot, copied)
            compute.wait_event(copied)
            # allocated on the copy stream, used on the compute stream: the allocator must not
            # hand their memory out again before the compute stream is done with them
            s_dev.record_stream(compute)
            v_dev.record_stream(compute)
        else:
            s_dev, v_dev = s_host, v_host
        top = None
        if self.sbert:
            keep = min(self.seq_len, int(self.n_used[idx].max()) + 1)
            x, doy, mask, top = sbert_inputs_torch(
                s_dev, v_dev, self.days, self.scene_doy, self.seq_len, self.max_position, keep
            )
            probs = p.forward_sbert(x, doy, mask, self.n_used[idx])
            used = mask.sum(1)  # fewer than n_used where the oldest gave way to the table
        else:
            probs, used = p.forward_full(full_inputs_torch(s_dev, v_dev)), None
        job = {"idx": idx, "probs": probs, "top": top, "used": used, "done": None}
        if self.cuda:
            for key in ("probs", "top", "used"):  # into pinned memory, read in finish
                on_device = job[key]
                if on_device is not None:
                    job[key] = torch.empty(on_device.shape, dtype=on_device.dtype, pin_memory=True)
                    job[key].copy_(on_device, non_blocking=True)
            job["done"] = torch.cuda.Event()
            job["done"].record()
        return job

    def finish(self, job: dict) -> None:
        """Wait for a queued batch and take its probabilities (and SBERT's observations used)."""
        if job["done"] is not None:
            job["done"].synchronize()
        if job["top"] is not None and int(job["top"]) >= self.max_position:
            raise day_index_error(int(job["top"]), self.max_position)
        self.probs[job["idx"]] = job["probs"].numpy()
        if job["used"] is not None:
            self.n_used[job["idx"]] = job["used"].numpy()


def feed_window(
    predictor, series: np.ndarray, valid: np.ndarray, days: np.ndarray, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, C) float32 and observations used (N,) of a window's pixels, computed on
    ``predictor.device`` in batches chosen from its free memory (``batch_size`` where there is no
    such figure: CPU).  Two batches are in flight at a time."""
    win = _Window(predictor, series, valid, days)
    n, steps = series.shape[:2]
    if n == 0:
        return win.probs, win.n_used
    card = predictor.card
    per_pixel = pixel_bytes(card.family, card.hyperparameters, steps, win.seq_len)
    call = predictor.call_pixels(min(steps, win.seq_len) if win.sbert else steps)
    batch = batch_for_memory(
        predictor.free_memory(), per_pixel, call, predictor.batch_cap(), batch_size
    )
    predictor.last_batch = batch
    pending: deque[dict] = deque()
    lo = 0
    while lo < n:
        hi = min(n, lo + batch)
        try:
            pending.append(win.submit(lo, hi))
        except Exception as exc:
            if not is_out_of_memory(exc) or hi - lo <= 1:
                raise
            batch = max(1, (hi - lo) // 2)
            _release(win, pending)
            predictor.halve_batch(batch, exc)
            continue
        lo = hi
        while len(pending) > 1:  # batch i queued: read batch i - 1
            win.finish(pending.popleft())
    while pending:
        win.finish(pending.popleft())
    return win.probs, win.n_used


def _release(win: _Window, pending: deque[dict]) -> None:
    """After an out-of-memory error: finish what is queued and give cached blocks back, so that
    the halved batch starts on a clean device."""
    while pending:
        win.finish(pending.popleft())
    if win.cuda:
        with contextlib.suppress(RuntimeError):
            torch.cuda.synchronize(win.dev)
        torch.cuda.empty_cache()


def feed_kept(
    predictor, series: np.ndarray, valid: np.ndarray, days: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """SBERT's probabilities (N, C) float32 and observations used (N,) of what streamed pixels
    kept (:func:`~.preprocess.sbert_kept`: right-aligned, each pixel's own days), prepared on
    ``predictor.device``: the host ships the slots that hold observations (int16, validity and
    days) and a day-of-year table of the days they span; the device selects, normalises and
    right-aligns (:func:`~.device_inputs.sbert_inputs_torch`), as it does for a held window."""
    seq = predictor.card.sequence
    seq_len, max_position = int(seq.get("seq_len", 256)), int(seq.get("max_position", 1826))
    n = len(series)
    held = valid.sum(axis=1, dtype=np.int64)
    order = np.argsort(held, kind="stable")  # similar lengths together: padding trimmed
    keep = min(seq_len, int(held.max(initial=0)) + 1)  # the slots in front of these are padding
    dev = predictor.device

    def ship(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a[order, -keep:])).to(dev, non_blocking=True)

    s_dev, v_dev, d_dev = ship(series), ship(valid), ship(days)
    seen = days[valid]
    lo, hi = (int(seen.min()), int(seen.max())) if seen.size else (0, 0)
    table = torch.from_numpy(day_of_year(np.arange(lo, hi + 1))).to(dev)
    doy_dev = table[(d_dev - lo).clamp(0, hi - lo)]  # the empty slots' (day 0) are not used
    x, doy, mask, top = sbert_inputs_torch(
        s_dev, v_dev, d_dev, doy_dev, seq_len, max_position, keep
    )
    if int(top) >= max_position:
        raise day_index_error(int(top), max_position)
    probs = np.empty((n, predictor.card.n_classes), dtype=np.float32)
    used = np.empty(n, dtype=np.int64)
    probs[order] = predictor.forward_sbert(x, doy, mask, held[order]).cpu().numpy()
    used[order] = mask.sum(1).cpu().numpy()
    return probs, used
