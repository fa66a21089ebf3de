"""Model-only timing with random weights of the published shapes (speed does not depend on
values)."""

from __future__ import annotations

import time

import torch

from ..models.architectures import SBERTClassifier
from ..models.card import SBERT_HYPERPARAMETERS

__all__ = ["random_sbert_state_dict", "sbert_forward_pxps"]


def random_sbert_state_dict(seed: int = 0, **hyperparameters) -> dict[str, torch.Tensor]:
    """State dict of an SBERT with the published shapes (or ``hyperparameters``), random weights.

    Plain CPU tensors with the published key names (no ``module.`` prefix); the position table is
    the real sinusoidal one.
    """
    torch.manual_seed(seed)
    hp = {**SBERT_HYPERPARAMETERS, **hyperparameters}
    return {k: v.clone() for k, v in SBERTClassifier(**hp).state_dict().items()}


def sbert_forward_pxps(
    batch: int = 256,
    seq_len: int = 256,
    threads: int = 2,
    seconds: float = 5.0,
    device: str = "cpu",
) -> dict:
    """Pixels per second of the SBERT forward pass on full sequences (no padding).

    Random weights of the published shapes, ``batch`` pixels of ``seq_len`` observations,
    ``threads`` torch threads (restored afterwards), for about ``seconds`` after one warm-up call.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        dev = torch.device(device)
        model = SBERTClassifier(**SBERT_HYPERPARAMETERS)
        model.load_state_dict(random_sbert_state_dict())
        model.to(dev).eval()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, seq_len, 10, generator=gen).to(dev)
        doy = (torch.arange(seq_len) * 5 + 1).expand(batch, seq_len).contiguous().to(dev)
        mask = torch.ones(batch, seq_len, dtype=torch.bool, device=dev)
        with torch.inference_mode():
            model(x, doy, mask)
            _sync(dev)
            calls = 0
            t0 = time.perf_counter()
            while True:
                model(x, doy, mask)
                calls += 1
                _sync(dev)
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds:
                    break
    finally:
        torch.set_num_threads(previous)
    return {
        "px_per_s": round(calls * batch / elapsed, 1),
        "batch": batch,
        "seq_len": seq_len,
        "threads": int(threads),
        "device": str(dev),
        "calls": calls,
        "seconds": round(elapsed, 3),
        "torch": torch.__version__,
    }


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
