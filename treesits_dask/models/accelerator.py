"""What it takes to keep an accelerator busy, apart from the models: numeric precision, batch
size from the free device memory, staging buffers for the host-to-device copies, out-of-memory
detection.

Every function here also runs on CPU (where there is nothing to pin, no stream and no free-memory
figure), so the device path of :class:`~treesits_dask.models.loading.Predictor` is tested there.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import torch

__all__ = [
    "PRECISIONS",
    "Staging",
    "batch_for_memory",
    "free_memory",
    "is_out_of_memory",
    "pixel_bytes",
    "precision_scope",
    "tf32_flags",
]

log = logging.getLogger(__name__)

#: ``fp32``: IEEE float32 everywhere (the parity mode, the default); ``tf32``: float32 tensors,
#: matrix products and cuDNN (LSTM) on TF32 tensor cores (CUDA only: on CPU it runs as fp32);
#: ``bf16``: autocast to bfloat16 (matrix products in bf16, reductions and softmax in float32)
PRECISIONS = ("fp32", "tf32", "bf16")

#: share of the free device memory a batch may plan for (the rest: allocator fragmentation,
#: cuBLAS / cuDNN workspaces, the model)
MEMORY_SHARE = 0.7


def _tf32_knobs() -> list[tuple[object, str]]:
    """(object, attribute) of the TF32 switches of this torch: the ``fp32_precision`` API
    (torch >= 2.9; mixing it with the legacy flags is an error there) or the legacy flags."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision") and hasattr(b.cudnn, "rnn"):
        return [
            (b.cuda.matmul, "fp32_precision"),
            (b.cudnn.conv, "fp32_precision"),
            (b.cudnn.rnn, "fp32_precision"),
        ]
    return [(b.cuda.matmul, "allow_tf32"), (b.cudnn, "allow_tf32")]


def tf32_flags() -> tuple:
    """The current TF32 switches of CUDA matrix products and cuDNN (to restore them)."""
    return tuple(getattr(obj, attr) for obj, attr in _tf32_knobs())


def _set_tf32(on: bool | tuple) -> None:
    knobs = _tf32_knobs()
    for i, (obj, attr) in enumerate(knobs):
        if isinstance(on, tuple):
            value = on[i]
        elif attr == "fp32_precision":
            value = "tf32" if on else "ieee"
        else:
            value = bool(on)
        setattr(obj, attr, value)


@contextlib.contextmanager
def precision_scope(device: torch.device, precision: str) -> Iterator[None]:
    """The forward calls inside run at ``precision`` on ``device``.

    On CUDA ``fp32`` switches TF32 off for matrix products *and* cuDNN (whose RNNs default to TF32
    in recent torch), ``tf32`` on; both are restored on exit (they are process-wide: one forward
    runs at a time on an accelerator).  ``bf16`` is autocast on every device.  On CPU ``tf32``
    changes nothing.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "bf16":
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
        return
    if device.type != "cuda":
        yield
        return
    before = tf32_flags()
    _set_tf32(precision == "tf32")
    try:
        yield
    finally:
        _set_tf32(before)


def free_memory(device: torch.device) -> int | None:
    """Bytes a new batch can use on ``device``: free device memory plus what torch's caching
    allocator holds unused; None where there is no such figure (CPU)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + max(0, cached))


def pixel_bytes(family: str, hp: dict, steps: int, seq_len: int = 256) -> tuple[int, int]:
    """Device bytes per pixel of a batch with ``steps`` observations: (transfer + preparation,
    forward activations).  Rough upper bounds: an out-of-memory error halves the batch anyway.

    * inputs: int16 series + bool validity (11 bytes per observation);
    * SBERT preparation: float64 statistics over (steps, 10) (a few temporaries) and the
      right-aligned float32 / int64 / bool inputs of ``seq_len`` slots;
    * forward, per layer-sized temporary, float32: SBERT ``seq_len`` x hidden x 14 plus the
      attention scores (heads x seq_len^2, twice: masked and softmaxed, when a kernel materialises
      them), Transformer the same with ``steps``, LSTM ``steps`` x (embedding + 6 x hidden).
    """
    inputs = steps * 11
    if family == "sbert":
        hidden, heads = int(hp.get("hidden", 128)), int(hp.get("attn_heads", 8))
        prep = steps * 10 * 8 * 4 + steps * 8 * 3 + seq_len * (40 + 8 + 1) * 2
        act = (seq_len * hidden * 14 + 2 * heads * seq_len * seq_len) * 4
    elif family == "sits-transformer":
        d, heads = int(hp.get("d_model", 64)), int(hp.get("nhead", 8))
        ff = int(hp.get("dim_feedforward", 256))
        prep = steps * 10 * 4
        act = (steps * (d * 10 + 2 * ff) + 2 * heads * steps * steps) * 4
    else:  # sits-lstm and anything sequence-in, one vector out
        emb = int(hp.get("input_size", 32))
        hidden = int(hp.get("hidden_size", 64)) * (2 if hp.get("bidirectional") else 1)
        prep = steps * 10 * 4
        act = steps * (emb + 6 * hidden) * 4 + 4096
    return inputs + prep, act


def batch_for_memory(
    free_bytes: int | None,
    per_pixel: tuple[int, int],
    chunk: int,
    cap: int,
    fallback: int,
) -> int:
    """Pixels per batch: the most whose transfer, preparation and forward fit
    :data:`MEMORY_SHARE` of ``free_bytes``, at most ``cap``; ``fallback`` (at most ``cap``) where
    no free-memory figure exists (CPU).

    ``per_pixel`` = :func:`pixel_bytes`; ``chunk``: the most pixels that go through the model in
    one call (the forward of a bigger batch holds the activations of one call only).
    """
    cap = max(1, int(cap))
    if free_bytes is None:
        return max(1, min(int(fallback), cap))
    usable = MEMORY_SHARE * max(0, int(free_bytes))
    batch_px, act_px = per_pixel
    n = int(usable // (batch_px + act_px))
    if n > chunk:  # the activations of one call, the inputs of the whole batch
        n = int((usable - chunk * act_px) // batch_px)
    return max(1, min(n, cap))


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory (CUDA's OOM error, or a cuBLAS /
    cuDNN allocation failure reported as a RuntimeError)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "CUDA out of memory" in text
        or "CUBLAS_STATUS_ALLOC_FAILED" in text
        or "CUDNN_STATUS_ALLOC_FAILED" in text
    )


class Staging:
    """Host buffers for the inputs of the next batches: ``slots`` pairs of (series int16,
    validity bool), page-locked (pinned) when the device is CUDA, so that copies to the device
    are asynchronous; plain memory elsewhere.

    A slot is reused only after the copy that last read it has finished (its CUDA event); buffers
    grow to the largest batch and observation count seen and are kept for the next windows.
    """

    def __init__(self, device: torch.device, slots: int = 2):
        self.device = device
        self.pinned = device.type == "cuda"
        self.slots = [{"series": None, "valid": None, "copied": None} for _ in range(slots)]
        self.next = 0
        self.allocations = 0

    def take(self, n: int, steps: int, bands: int) -> tuple[int, np.ndarray, np.ndarray]:
        """A free slot and numpy views (n, steps, bands) int16 and (n, steps) bool of its
        buffers, to fill on the host."""
        i = self.next
        self.next = (i + 1) % len(self.slots)
        slot = self.slots[i]
        if slot["copied"] is not None:
            slot["copied"].synchronize()  # the copy that read this slot last is done
            slot["copied"] = None
        size = n * steps
        have = 0 if slot["valid"] is None else slot["valid"].numel()
        if have < size:  # grow by a quarter at least: batch sizes and scene counts vary a little
            grow = max(size, int(1.25 * have))
            slot["series"] = torch.empty(grow * bands, dtype=torch.int16, pin_memory=self.pinned)
            slot["valid"] = torch.empty(grow, dtype=torch.bool, pin_memory=self.pinned)
            self.allocations += 1
        series = slot["series"][: size * bands].view(n, steps, bands)
        valid = slot["valid"][:size].view(n, steps)
        return i, series.numpy(), valid.numpy()

    def tensors(self, i: int, n: int, steps: int, bands: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled buffers of slot ``i`` as tensors (to copy to the device)."""
        slot = self.slots[i]
        size = n * steps
        return (
            slot["series"][: size * bands].view(n, steps, bands),
            slot["valid"][:size].view(n, steps),
        )

    def copied(self, i: int, event) -> None:
        """The copy out of slot ``i`` was queued; ``event`` completes when it has run."""
        self.slots[i]["copied"] = event
