"""The measurements of the device check (:mod:`treesits_dask.bench.gpu_check`): forward-only
pixels per second through :meth:`Predictor.predict` (host gather, copies, preparation and model,
as a run feeds it), parity of the precisions, the SBERT observation counts of a 4-year window,
an end-to-end ``run`` on CPU readers + one GPU worker, and the GPU busy fraction."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "BusySampler",
    "compile_gain",
    "end_to_end_gpu",
    "forward_pxps",
    "four_year_window",
    "parity",
    "parity_inputs",
    "peak_mib",
    "random_series",
]


def peak_mib(device: torch.device) -> float | None:
    """Peak device memory allocated by this process since the last reset (MiB); None on CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def random_series(n: int, steps: int, share: float, seed: int, span_days: int = 1460):
    """``n`` pixels of ``steps`` scenes in ``span_days``, each observation valid with ``share``
    (speed does not depend on the values)."""
    rng = np.random.default_rng(seed)
    series = rng.integers(0, 6000, (n, steps, 10)).astype(np.int16)
    valid = rng.random((n, steps)) < share
    valid[:, -1] = True
    series[~valid] = -9999
    days = 18000 + np.sort(rng.choice(span_days, steps, replace=False)).astype(np.int64)
    return series, valid, days


def four_year_window(n: int, scenes: int, cloud: float, seed: int) -> tuple[tuple, dict]:
    """SBERT inputs with the observation counts of a 4-year window: ``scenes`` acquisitions in
    1460 days with the per-scene cloud / shadow / snow cover of the synthetic weather model
    (mean ``cloud``), and per pixel the share of the acquisitions whose orbit covers it
    (uniform in 0.5 .. 1: tiles at orbit overlaps see up to twice the scenes).  Returns the
    inputs and the distribution of the counts (capped at 256, as SBERT keeps them)."""
    from ..synthetic.phenology import weather_for_dates

    rng = np.random.default_rng(seed)
    start = dt.date(2019, 9, 1)
    offsets = np.sort(rng.choice(1461, scenes, replace=False))
    dates = [start + dt.timedelta(days=int(o)) for o in offsets]
    cover = np.array([w.cover for w in weather_for_dates(rng, dates, cloud)])
    seen = rng.random((n, scenes)) < rng.uniform(0.5, 1.0, (n, 1))
    valid = seen & (rng.random((n, scenes)) >= cover[None, :])
    valid[np.arange(n), rng.integers(0, scenes, n)] = True
    series = rng.integers(0, 6000, (n, scenes, 10)).astype(np.int16)
    series[~valid] = -9999
    days = np.array([(d - dt.date(1970, 1, 1)).days for d in dates], dtype=np.int64)
    counts = np.minimum(valid.sum(1), 256)
    lengths = {
        "source": (
            f"model of a 4-year window: {scenes} scenes in 1460 days, cloud/shadow/snow cover of "
            f"the synthetic weather model (mean {cloud}), orbit coverage 50-100 % per pixel"
        ),
        "scenes": scenes,
        "mean": round(float(counts.mean()), 1),
        "p10": int(np.percentile(counts, 10)),
        "p50": int(np.percentile(counts, 50)),
        "p90": int(np.percentile(counts, 90)),
        "share_at_256": round(float((counts >= 256).mean()), 3),
    }
    return (series, valid, days), lengths


#: timed calls of :func:`forward_pxps` at least, however long they take
MIN_CALLS = 3


def forward_pxps(predictor, inputs: tuple, seconds: float, batch_size: int) -> dict:
    """Pixels per second of ``predictor.predict`` on ``inputs``, repeated for about ``seconds``
    (:data:`MIN_CALLS` calls at least) after a warm-up call on the same inputs: the timed calls
    see no shape the warm-up did not (CUDA context, cuDNN and attention kernel choices for each
    batch and trimmed length, ``torch.compile``).  On the H200 a warm-up of 1024 pixels left the
    set-up of the full calls' shapes in the timed ones: SBERT bf16 on the 4-year window's
    lengths measured 17,186 px/s in one 3.8 s call, against 76,642 at fp32 (2026-12-04)."""
    series, valid, days = inputs
    n = len(series)
    predictor.predict(series, valid, days, batch_size=batch_size)
    _reset_peak(predictor.device)
    calls = 0
    t0 = time.perf_counter()
    while True:
        predictor.predict(series, valid, days, batch_size=batch_size)
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and calls >= MIN_CALLS:
            break
    return {
        "px_per_s": round(calls * n / elapsed, 1),
        "pixels": n,
        "steps": int(series.shape[1]),
        "batch": predictor.last_batch if predictor.feed == "device" else batch_size,
        "feed": predictor.feed,
        "calls": calls,
        "seconds": round(elapsed, 3),
        "peak_device_memory_mib": peak_mib(predictor.device),
    }


def compile_gain(spec, device: torch.device, inputs: tuple, seconds: float) -> dict:
    """Pixels per second with and without ``torch.compile`` (fp32), the first compiled call
    (compilation included) and the largest probability difference it makes."""
    from ..models import load_model

    series, valid, days = inputs
    eager = load_model(spec, str(device))
    compiled = load_model(spec, str(device), compile=True)
    t0 = time.perf_counter()
    p_compiled, _ = compiled.predict(series, valid, days, batch_size=2048)
    first = time.perf_counter() - t0
    p_eager, _ = eager.predict(series, valid, days, batch_size=2048)
    return {
        "family": spec.family,
        "eager_px_per_s": forward_pxps(eager, inputs, seconds, 2048)["px_per_s"],
        "compiled_px_per_s": forward_pxps(compiled, inputs, seconds, 2048)["px_per_s"],
        "first_call_s": round(first, 1),
        "max_abs_diff": float(np.abs(p_compiled - p_eager).max()),
    }


def parity_inputs(workdir: Path, size: int, scenes: int, pixels: int) -> tuple:
    """Realistic series (synthetic phenology, clouds, QAI screening): the pixels of a generated
    tile that have a valid observation, at most ``pixels`` of them."""
    from ..api import open_cube
    from ..pipeline.predict import select_pixels
    from ..synthetic import make_cube

    cube = make_cube(
        workdir / "parity-cube",
        size=size,
        n_scenes=scenes,
        mask_dir=str(workdir / "parity-masks"),
        truth_dir=str(workdir / "parity-truth"),
        seed=5,
    )
    arr = open_cube(cube.root, cube.tiles[0])
    _, series, valid = select_pixels(arr.values, None)
    days = (arr.time.values.astype("datetime64[D]") - np.datetime64("1970-01-01", "D")).astype(
        np.int64
    )
    return series[:pixels], valid[:pixels], days


def _difference(p: np.ndarray, ref: np.ndarray) -> dict:
    diff = np.abs(p.astype(np.float64) - ref)
    if ref.shape[1] > 1:
        agree = p.argmax(1) == ref.argmax(1)
    else:
        agree = (p[:, 0] >= 0.5) == (ref[:, 0] >= 0.5)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "class_agreement": round(float(agree.mean()), 5),
    }


def parity(spec, device: torch.device, precisions: list[str], inputs: tuple) -> dict:
    """Probability differences: the device path at fp32 against the CPU path (numpy inputs), and
    tf32 / bf16 against fp32 on the device (tf32: null on CPU, where it runs as fp32)."""
    from ..models import load_model

    series, valid, days = inputs
    cpu, _ = load_model(spec, "cpu").predict(series, valid, days, batch_size=2048)
    runs = {}
    for precision in ["fp32", *[p for p in precisions if p != "fp32"]]:
        if precision == "tf32" and device.type != "cuda":
            runs[precision] = None
            continue
        predictor = load_model(spec, str(device), precision=precision)
        predictor.feed = "device"  # on CPU too: the device preparation against numpy
        runs[precision], _ = predictor.predict(series, valid, days, batch_size=2048)
    out = {"pixels": len(series), "steps": int(series.shape[1])}
    out["fp32_vs_cpu"] = _difference(runs["fp32"], cpu)
    for precision in ("tf32", "bf16"):
        got = runs.get(precision)
        out[f"{precision}_vs_fp32"] = None if got is None else _difference(got, runs["fp32"])
    return out


class BusySampler:
    """Samples the GPU utilisation (the share of time a kernel ran, NVML) every ``period`` s in a
    thread while in use; ``result()``: the mean as a fraction, or None and why."""

    def __init__(self, device: torch.device, period: float = 0.1):
        self.device, self.period = device, period
        self.samples: list[float] = []
        self.why: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> float:
        return float(torch.cuda.utilization(self.device))

    def __enter__(self):
        if self.device.type != "cuda":
            self.why = "no GPU"
            return self
        try:
            self._read()
        except Exception as exc:  # noqa: BLE001 - pynvml missing, NVML not loadable, ...
            self.why = f"no NVML ({type(exc).__name__}: {exc}); install the 'gpu' extra"
            return self
        self._thread = threading.Thread(target=self._loop, name="gpu-busy", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.samples.append(self._read())
            except Exception:  # noqa: BLE001
                return

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def result(self) -> dict:
        if not self.samples:
            return {"fraction": None, "samples": 0, "source": self.why or "no samples"}
        return {
            "fraction": round(float(np.mean(self.samples)) / 100.0, 3),
            "samples": len(self.samples),
            "source": "torch.cuda.utilization (NVML)",
        }


def end_to_end_gpu(config, device: torch.device) -> dict:
    """``run`` on CPU reading workers + one worker advertising ``GPU=1`` (inference routed by
    that resource, as on Kubernetes), GPU busy fraction sampled meanwhile."""
    from distributed import get_task_stream

    from ..pipeline.cluster import connect
    from ..pipeline.run import run

    with connect(config) as client:
        info = client.scheduler_info()["workers"]
        gpu_workers = {a for a, w in info.items() if w["resources"].get("GPU")}
        with get_task_stream(client) as ts, BusySampler(device) as busy:
            t0 = time.perf_counter()
            result = run(config, client=client)
            seconds = time.perf_counter() - t0
    predict_workers = {
        rec["worker"]
        for rec in ts.data
        if str(rec["key"][0] if isinstance(rec["key"], tuple) else rec["key"]).startswith(
            "predict_packed"
        )
    }
    stats = [s for v in result.inference.values() for s in v]
    peaks = [s["peak_device_memory_mib"] for s in stats if s["peak_device_memory_mib"]]
    return {
        "seconds": round(seconds, 3),
        "pixels_predicted": result.pixels_predicted,
        "px_per_s": round(result.pixels_predicted / seconds, 1),
        "inference_only_on_gpu_workers": bool(predict_workers) and predict_workers <= gpu_workers,
        "gpu_busy": busy.result(),
        "peak_device_memory_mib": max(peaks) if peaks else None,
        # the batch the GPU worker chose (None: the host path, whose batch is batch_size)
        "batch": max((s["last_batch"] or 0 for s in stats), default=None) or None,
        "stages": result.stages,
    }
