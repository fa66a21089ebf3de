"""Models: architectures (SITS-NN LSTM/Transformer, SITS-BERT), checkpoint formats, model cards.

Importing this package does not import torch: :class:`ModelSpec`, :class:`ModelCard`,
:func:`read_card` and :func:`effective_window` work on machines without it.  :func:`load_model`,
:func:`save_native` and :class:`Predictor` import torch when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .card import ARCHITECTURES, FAMILIES, ModelCard, ModelSpec, effective_window, read_card

if TYPE_CHECKING:  # pragma: no cover
    from .loading import Predictor

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "ModelCard",
    "ModelSpec",
    "Predictor",
    "effective_window",
    "load_model",
    "read_card",
    "save_native",
]


def load_model(
    spec: ModelSpec,
    device: str = "auto",
    precision: str = "fp32",
    compile: bool = False,
    max_batch: int = 65536,
) -> Predictor:
    """Load ``spec`` (weights only) onto ``device`` (``auto``: CUDA if available, else CPU), to
    run at ``precision`` (``fp32``, ``tf32``, ``bf16``), through ``torch.compile`` with
    ``compile``; ``max_batch``: the most pixels per batch on an accelerator."""
    from .loading import load_model as _load

    return _load(spec, device, precision=precision, compile=compile, max_batch=max_batch)


def save_native(module: Any, card: ModelCard, path: str) -> tuple[str, str]:
    """Write ``<stem>.pt`` (plain state dict) and ``<stem>.json`` (the card); returns both paths."""
    from .loading import save_native as _save

    return _save(module, card, path)


def __getattr__(name: str) -> Any:
    if name == "Predictor":
        from .loading import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
