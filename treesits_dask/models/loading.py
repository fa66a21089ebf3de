"""Model loading (checkpoints via :mod:`.checkpoint`), the batched :class:`Predictor` and native
save.

This module is longer than 400 lines because the :class:`Predictor`'s ways through a model (a
whole series on the host or on the device, and a series in parts, carrying a state) share its
loaded module, device, precision and batching.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..io import storage
from .accelerator import PRECISIONS, Staging, free_memory, precision_scope
from .architectures import build_module
from .card import ModelCard, ModelSpec, card_path, read_card
from .checkpoint import fit_state_dict, read_state_dict, sbert_card_from_state
from .feeding import feed_kept, feed_window
from .preprocess import (
    check_inputs,
    full_inputs,
    sbert_inputs,
    sbert_keep,
    sbert_kept,
    sbert_state,
)

__all__ = [
    "DEFAULT_MAX_BATCH",
    "Predictor",
    "gather_stream_states",
    "load_model",
    "read_state_dict",
    "resolve_device",
    "save_native",
    "visible_devices",
]

log = logging.getLogger(__name__)

#: Upper bound of attention-score elements per forward chunk (bounds memory of large batches);
#: CUDA kernels do not materialise the scores, so GPUs take larger chunks.
_ATTENTION_BUDGET = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
#: SBERT on CPU: pixels per forward call, each call trimmed to its longest sequence
_SBERT_CPU_CHUNK = 256
#: LSTM / Transformer on CPU: pixels per forward call.  A 2048-pixel LSTM call spills its 126 MB
#: gate buffer out of the caches; 512-pixel calls ran ~1.25x faster on one core (Transformer ~1.2x)
_FULL_CPU_CHUNK = 512
#: the most pixels per batch on the device path (setting ``gpu_batch_max``); the batch is the
#: largest that fits the free device memory, up to this
DEFAULT_MAX_BATCH = 65536


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"device {device!r} requested but CUDA is not available here; use auto or cpu"
        )
    return dev


def visible_devices(device: str = "auto") -> list[str]:
    """The devices one process spreads its forwards over: every CUDA device it sees for
    ``"auto"`` / ``"cuda"`` (a worker with ``gpus: 2`` spreads its windows over them), else the
    one device named (``"cuda:1"``, ``"cpu"``)."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(max(1, torch.cuda.device_count()))]
    return [str(resolve_device(device))]


def load_model(
    spec: ModelSpec,
    device: str = "auto",
    precision: str = "fp32",
    compile: bool = False,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> Predictor:
    """Load ``spec`` onto ``device`` (``auto``: CUDA if available, else CPU) in eval mode, to run
    at ``precision`` (``fp32``, ``tf32``, ``bf16``), through ``torch.compile`` with ``compile``;
    ``max_batch``: the most pixels per batch on an accelerator."""
    if precision not in PRECISIONS:
        raise ModelError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    card = read_card(spec)
    state = read_state_dict(spec.uri, dev)
    if card.family == "sbert" and spec.family == "sbert":
        card = sbert_card_from_state(card, state, spec.uri)
    what = f"family {card.family} with hyper-parameters {card.hyperparameters}"
    if spec.params_uri:
        what += f" from {spec.params_uri}"
    elif spec.family == "native":
        what += f" from {card_path(spec.uri)}"
    try:
        module = build_module(card.family, card.hyperparameters)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot build {what} for {spec.uri}: {exc}") from exc
    fit_state_dict(module, state, spec.uri, what)
    module.to(dev).eval()
    predictor = Predictor(module, card, dev, precision=precision, max_batch=max_batch)
    return predictor.compile() if compile else predictor


def gather_stream_states(parts: Sequence[tuple]):
    """One model state (:meth:`Predictor.stream_state`) of the pixels ``indices`` of each
    ``(state, indices)`` of ``parts``, in that order: the LSTM's ``(2, layers, n, hidden)``
    arrays joined along their pixels, SBERT's arrays (:func:`~.preprocess.sbert_state`) along
    theirs.  A streamed tile whose later scenes are stepped in other windows than its earlier
    ones gives those windows their pixels' states so (see
    :mod:`treesits_dask.pipeline.streaming`)."""
    first = parts[0][0]
    n = sum(len(i) for _, i in parts)
    sbert = isinstance(first, dict)
    if sbert:
        out = {k: np.empty((n, *v.shape[1:]), v.dtype) for k, v in first.items()}
    else:
        out = np.empty((*first.shape[:2], n, *first.shape[3:]), first.dtype)
    at = 0
    for s, i in parts:
        # each part taken into its place (the LSTM's per (h or c, layer): contiguous rows of
        # its pixels); a concatenation of fancy indexes copies twice, 5 times slower here
        if sbert:
            for k, v in s.items():
                np.take(v, i, axis=0, out=out[k][at : at + len(i)], mode="clip")
        else:
            for a in range(first.shape[0]):
                for b in range(first.shape[1]):
                    np.take(s[a, b], i, axis=0, out=out[a, b, at : at + len(i)], mode="clip")
        at += len(i)
    return out


class Predictor:
    """A loaded model in eval mode on its device, with the input preparation of its family.

    Two ways through the model, with the same results: ``feed="host"`` (the default on CPU)
    prepares the inputs in numpy (:mod:`.preprocess`) and calls the model; ``feed="device"``
    (the default on accelerators) ships the raw series to the device and prepares them there
    (:mod:`.feeding`: pinned staging buffers, copies on a side stream, batches sized from the free
    device memory, out-of-memory back-off).  ``precision`` is one of
    :data:`~.accelerator.PRECISIONS`.
    """

    def __init__(
        self,
        module: nn.Module,
        card: ModelCard,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        feed: str | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
    ):
        if precision not in PRECISIONS:
            raise ModelError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.module = module
        self.card = card
        self.device = torch.device(device)
        self.precision = precision
        self.feed = feed or ("host" if self.device.type == "cpu" else "device")
        if self.feed not in ("host", "device"):
            raise ModelError(f"feed {self.feed!r}: use host or device")
        #: the most pixels per batch on the device path (the batch is chosen from free memory)
        self.max_batch = max(1, int(max_batch))
        #: set when an out-of-memory error halved the batch; later batches stay at most this
        self.batch_limit: int | None = None
        #: the batch the device path chose for the last window
        self.last_batch: int | None = None
        #: bytes a batch may use on the device (None: no figure, CPU); tests replace it
        self.free_memory = functools.partial(free_memory, self.device)
        self.staging = Staging(self.device)
        #: the callable that runs the model (the module, or its ``torch.compile`` version)
        self.call = module
        #: on CPU, a callable giving the torch threads for the next forward call (checked before
        #: every batch / chunk, from the thread that runs it); None leaves torch as it is
        self.threads = None

    def __repr__(self) -> str:
        return (
            f"Predictor({self.card.family}, {self.card.n_classes} outputs, {self.device}, "
            f"{self.precision})"
        )

    def compile(self) -> Predictor:
        """Run the model through ``torch.compile`` (dynamic shapes: batch and sequence lengths
        vary); the first calls of each new shape compile."""
        self.call = torch.compile(self.module, dynamic=True)
        return self

    def predict(
        self, series: np.ndarray, valid: np.ndarray, days: np.ndarray, batch_size: int = 2048
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, n_classes) float32 and observations used (N,) of N pixels.

        ``series`` int16 (N, T, 10) raw BOA in ascending date order, ``valid`` bool (N, T),
        ``days`` int64 (T,) days since 1970-01-01.  Every pixel has at least one valid observation.
        ``batch_size``: pixels per batch on the host path (and on the device path where the
        device reports no free memory).
        """
        series = np.asarray(series)
        valid = np.asarray(valid, dtype=bool)
        days = np.asarray(days, dtype=np.int64)
        check_inputs(series, valid, days)
        if self.feed == "device":
            with torch.inference_mode():
                return feed_window(self, series, valid, days, max(1, int(batch_size)))
        n = series.shape[0]
        probs = np.empty((n, self.card.n_classes), dtype=np.float32)
        n_used = np.zeros(n, dtype=np.int64)
        if n == 0:
            return probs, n_used
        batch_size = max(1, int(batch_size))
        sbert = self._sbert
        # SBERT: group pixels of similar observation counts so that padding can be trimmed
        order = np.argsort(valid.sum(axis=1), kind="stable") if sbert else None
        with torch.inference_mode():
            for lo in range(0, n, batch_size):
                idx = (
                    order[lo : lo + batch_size] if order is not None else slice(lo, lo + batch_size)
                )
                if sbert:
                    p, used = self._sbert_batch(series[idx], valid[idx], days)
                else:
                    p, used = self._full_batch(series[idx], valid[idx])
                probs[idx] = p
                n_used[idx] = used
        return probs, n_used

    def _set_threads(self) -> None:
        # torch's OpenMP and MKL thread counts are per calling thread: set them right here
        if self.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(max(1, int(self.threads())))

    def _chunks(self, n: int, per_item: int, cpu_chunk: int) -> list[slice]:
        """Slices of ``n`` pixels per forward call: within the attention budget of the device,
        and on CPU at most ``cpu_chunk`` pixels (short calls cost nothing there; on GPUs they
        would)."""
        step = self._call_step(per_item, cpu_chunk)
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _call_step(self, per_item: int, cpu_chunk: int) -> int:
        budget = _ATTENTION_BUDGET.get(self.device.type, _ATTENTION_BUDGET["cpu"])
        step = max(1, budget // max(1, per_item))
        if self.device.type == "cpu":
            step = min(step, cpu_chunk)
        return step

    def _per_item(self, steps: int) -> int:
        """Attention-score elements per pixel of a forward call over ``steps`` positions."""
        hp = self.card.hyperparameters
        if self.card.family == "sits-transformer":
            return int(hp.get("nhead", 1)) * steps * steps
        if self.card.sequence["kind"] == "sbert":
            return int(hp.get("attn_heads", 8)) * steps * steps
        return 1

    def call_pixels(self, steps: int) -> int:
        """The most pixels that go through the model in one call at ``steps`` positions."""
        cpu_chunk = _SBERT_CPU_CHUNK if self.card.sequence["kind"] == "sbert" else _FULL_CPU_CHUNK
        return self._call_step(self._per_item(steps), cpu_chunk)

    def batch_cap(self) -> int:
        """The most pixels per batch on the device path: ``max_batch``, or less after an
        out-of-memory error."""
        return min(self.max_batch, self.batch_limit or self.max_batch)

    def halve_batch(self, batch: int, exc: BaseException) -> None:
        """An out-of-memory error: this and later batches take at most ``batch`` pixels."""
        self.batch_limit = batch
        log.warning(
            "%s on %s ran out of memory (%s); going on with batches of %d pixels",
            self.card.family,
            self.device,
            str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
            batch,
        )

    def forward_full(self, xt: torch.Tensor) -> torch.Tensor:
        """Probabilities (N, C) float32, on the device, of SITS-NN inputs ``xt`` (N, T, 10) float32
        on the device, in calls within the attention budget (on CPU of at most 512 pixels)."""
        transformer = self.card.family == "sits-transformer"
        outs = []
        with precision_scope(self.device, self.precision):
            for s in self._chunks(len(xt), self._per_item(xt.shape[1]), _FULL_CPU_CHUNK):
                self._set_threads()
                outs.append(self.call(xt[s].transpose(0, 1) if transformer else xt[s]))
        return torch.cat(outs).float()

    def forward_sbert(
        self, x: torch.Tensor, doy: torch.Tensor, mask: torch.Tensor, used: np.ndarray
    ) -> torch.Tensor:
        """Probabilities (N, C) float32, on the device, of right-aligned SBERT inputs (N, S, ...)
        (on the device or on the host: each call's part is copied to the device) whose pixels
        hold ``used`` (N,) observations, sorted by it.

        All padding slots of a pixel are identical rows (data 0, day 0) and masked as keys, so
        keeping one of them in front gives the same max-pooled result as keeping all of them.  The
        pixels come sorted by observation count, so each call is trimmed to its own longest
        sequence: attention cost grows with the square of the length.
        """
        size = x.shape[1]
        keep_all = min(size, int(used.max()) + 1)
        outs = []
        with precision_scope(self.device, self.precision):
            for sl in self._chunks(len(x), self._per_item(keep_all), _SBERT_CPU_CHUNK):
                keep = min(size, int(used[sl].max()) + 1)
                args = [
                    t[sl, -keep:].contiguous().to(self.device, non_blocking=True)
                    for t in (x, doy, mask)
                ]
                self._set_threads()
                outs.append(self.call(*args))
        logits = torch.cat(outs).float()
        if self.card.output_kind == "sigmoid":
            return torch.sigmoid(logits)
        return logits.softmax(1)

    @property
    def streams(self) -> bool:
        """Whether the model can run over a series in parts (:attr:`ModelCard.streams`)."""
        return self.card.streams

    @property
    def _sbert(self) -> bool:
        return self.card.sequence["kind"] == "sbert"

    def stream_state(self, n: int):
        """The state of ``n`` pixels before their first observation: the LSTM's ``h`` and ``c``,
        zeros ``(2, layers, n, hidden)`` float32; SBERT's newest valid observations so far, none
        (:func:`~.preprocess.sbert_state`)."""
        if self._sbert:
            return sbert_state(n, int(self.card.sequence["seq_len"]), len(self.card.bands))
        lstm = self.module.lstm
        return np.zeros((2, lstm.num_layers, n, lstm.hidden_size), dtype=np.float32)

    def stream_step(self, state, series: np.ndarray, valid: np.ndarray, days: np.ndarray):
        """The state of N pixels after the observations ``series`` (N, t, 10) int16 with
        ``valid`` (N, t) and ``days`` (t,), the next ``t`` scenes in ascending date order, from
        ``state`` (:meth:`stream_state`, or an earlier step's result).  Runs over a series in
        parts give the state of one run over the whole series; the state stays on the host
        between parts (a Dask result).  The LSTM's is a new array (the same computation, step by
        step); SBERT's is ``state`` itself, updated (:func:`~.preprocess.sbert_keep`)."""
        if not self.streams:
            raise ModelError(f"a {self.card.family} model cannot be run over a series in parts")
        if self._sbert:
            return sbert_keep(state, series, valid, days)
        if series.shape[0] == 0 or series.shape[1] == 0:  # no pixel, or no scene
            return state.copy()
        out = np.empty_like(state)
        module = self.module
        with torch.inference_mode(), precision_scope(self.device, self.precision):
            # per call at most the attention budget's elements of the LSTM's output (N, t, hidden)
            per_item = series.shape[1] * module.lstm.hidden_size
            for s in self._chunks(len(series), per_item, _FULL_CPU_CHUNK):
                x, _ = full_inputs(series[s], valid[s])
                xt = torch.from_numpy(x).to(self.device, non_blocking=True)
                hc = torch.from_numpy(state[:, :, s]).to(self.device)
                self._set_threads()
                _, (h, c) = module.lstm(module.embd(xt), (hc[0].contiguous(), hc[1].contiguous()))
                out[0, :, s] = h.float().cpu().numpy()
                out[1, :, s] = c.float().cpu().numpy()
        return out

    def stream_probs(
        self, state, pixels: np.ndarray, batch_size: int = 2048
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities (N, C) float32 of the N pixels ``pixels`` (indices into ``state``) from
        their state after the last observation (:meth:`stream_step`), and the observations
        each used where the state tells them apart from the valid ones (SBERT: at most
        ``seq_len``; None for the LSTM, which uses every valid one).  The LSTM: its head on the
        last layer's output at the last step; SBERT: the model on the observations kept, as
        :meth:`predict` feeds it, ``batch_size`` pixels at a time (prepared on the device with
        ``feed="device"``, :func:`~.feeding.feed_kept`)."""
        pixels = np.asarray(pixels)
        n = pixels.size
        probs = np.empty((n, self.card.n_classes), dtype=np.float32)
        if self._sbert:
            seq = self.card.sequence
            used = np.zeros(n, dtype=np.int64)
            with torch.inference_mode():
                for lo in range(0, n, max(1, int(batch_size))):
                    sel = slice(lo, lo + max(1, int(batch_size)))
                    series, valid, days = sbert_kept(state, pixels[sel])
                    if self.feed == "device":  # prepared where the model runs
                        probs[sel], used[sel] = feed_kept(self, series, valid, days)
                        continue
                    x, doy, mask, got = sbert_inputs(
                        series, valid, days, int(seq["seq_len"]), int(seq.get("max_position", 1826))
                    )
                    order = np.argsort(got, kind="stable")  # similar lengths trim together
                    p = self.forward_sbert(*(torch.from_numpy(a[order]) for a in (x, doy, mask)),
                                           got[order])  # fmt: skip
                    probs[sel][order] = p.cpu().numpy()
                    used[sel] = got
            return probs, used
        module = self.module
        with torch.inference_mode(), precision_scope(self.device, self.precision):
            for s in self._chunks(n, 1, _FULL_CPU_CHUNK):
                last = torch.from_numpy(np.ascontiguousarray(state[0, -1, pixels[s]]))
                self._set_threads()
                probs[s] = module.fc(last.to(self.device)).float().cpu().numpy()
        return probs, None

    def _full_batch(self, series: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, used = full_inputs(series, valid)
        xt = torch.from_numpy(x).to(self.device, non_blocking=True)
        return self.forward_full(xt).cpu().numpy(), used

    def _sbert_batch(self, series: np.ndarray, valid: np.ndarray, days: np.ndarray):
        seq = self.card.sequence
        x, doy, mask, used = sbert_inputs(
            series, valid, days, int(seq["seq_len"]), int(seq.get("max_position", 1826))
        )
        probs = self.forward_sbert(
            torch.from_numpy(x), torch.from_numpy(doy), torch.from_numpy(mask), used
        )
        return probs.cpu().numpy(), used


def save_native(module: nn.Module, card: ModelCard, path: str) -> tuple[str, str]:
    """Write ``<stem>.pt`` (plain state dict) and ``<stem>.json`` (the card); returns both URLs.

    Load it again with ``load_model(ModelSpec(<stem>.pt, "native"))``.
    """
    path = str(path)
    base = storage.basename(path)
    stem_uri = path[: len(path) - len(base)] + (base.rsplit(".", 1)[0] if "." in base else base)
    pt_uri, json_uri = stem_uri + ".pt", stem_uri + ".json"
    expected = build_module(card.family, card.hyperparameters).state_dict()
    state = {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise ModelError(
            f"cannot save {pt_uri}: the module's tensors do not match a {card.family} built from "
            "the "
            f"card's hyper-parameters {card.hyperparameters}"
        )
    fs, pt_path = storage.get_fs(pt_uri)
    parent = pt_path.rsplit("/", 1)[0] if "/" in pt_path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    with fs.open(pt_path, "wb") as fh:
        fh.write(buf.getvalue())
    jfs, json_path = storage.get_fs(json_uri)
    with jfs.open(json_path, "wt") as fh:
        fh.write(card.model_dump_json(indent=2))
    log.info("saved native %s model to %s (+ %s)", card.family, pt_uri, storage.basename(json_uri))
    return pt_uri, json_uri
