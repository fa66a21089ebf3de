"""Checkpoints: plain state dicts read with ``weights_only=True``, fitted to a module, and the
SBERT hyper-parameters read off the tensor shapes."""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import ModelError
from ..io import storage
from .card import ModelCard

__all__ = ["fit_state_dict", "read_state_dict", "sbert_card_from_state"]


def read_state_dict(uri: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load a checkpoint with ``weights_only=True`` and return its (prefix-stripped) state dict.

    Accepts a plain state dict or a dict holding ``model_state_dict`` (SBERT training format).
    """
    fs, path = storage.get_fs(uri)
    try:
        with fs.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ModelError(f"model checkpoint {uri} does not exist; check --model") from None
    except OSError as exc:
        raise ModelError(f"model checkpoint {uri} cannot be read: {exc}") from exc
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for corrupt files
        text = str(exc).strip()
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
            first = text.splitlines()[0]
            raise ModelError(
                f"refused to load {uri}: it is not a plain state dict; only weights_only "
                "checkpoints "
                f"are accepted (torch.load(weights_only=True) said: {first[:300]})"
            ) from None
        raise ModelError(
            f"model checkpoint {uri} is unreadable ({type(exc).__name__}: {text[:300]}); "
            "it must be a file written by torch.save"
        ) from None
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(
            f"model checkpoint {uri} holds a {type(obj).__name__}, not a state dict (a mapping of "
            "parameter names to tensors, or a dict with 'model_state_dict')"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(
            f"model checkpoint {uri}: entries {bad[:5]} are not tensors; expected a state dict"
        )
    if all(str(k).startswith("module.") for k in obj):
        obj = {str(k)[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def fit_state_dict(module: nn.Module, state: dict[str, torch.Tensor], uri: str, what: str) -> None:
    """Load ``state`` into ``module`` (strict), or a :class:`ModelError` listing what does not fit
    (``what`` describes the module for the message)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatch", shapes),
    ):
        if items:
            more = f" and {len(items) - 4} more" if len(items) > 4 else ""
            problems.append(f"{label}: {', '.join(items[:4])}{more}")
    if problems:
        raise ModelError(
            f"model checkpoint {uri} does not fit {what}: {'; '.join(problems)}. "
            "Check --model-family and --model-params (they must belong to this checkpoint)"
        )
    module.load_state_dict(state, strict=True)


def sbert_card_from_state(card: ModelCard, state: dict[str, torch.Tensor], uri: str) -> ModelCard:
    """Published SBERT: hidden size, layers, features, outputs and table size from tensor shapes."""
    hp = dict(card.hyperparameters)
    w = state.get("sbert.embedding.input.weight")
    pe = state.get("sbert.embedding.position.pe")
    head = state.get("classification.linear.weight")
    if w is None or pe is None or head is None or w.ndim != 2 or pe.ndim != 2 or head.ndim != 2:
        raise ModelError(
            f"model checkpoint {uri} is not an SBERT checkpoint (sbert.embedding.input.weight, "
            "sbert.embedding.position.pe or classification.linear.weight missing); check "
            "--model-family"
        )
    layers = {int(k.split(".")[2]) for k in state if k.startswith("sbert.transformer_blocks.")}
    hp.update(
        num_features=int(w.shape[1]),
        hidden=int(head.shape[1]),
        n_layers=len(layers),
        num_classes=int(head.shape[0]),
        max_position=int(pe.shape[0]),
    )
    if hp["num_features"] != 10:
        raise ModelError(
            f"model checkpoint {uri} reads {hp['num_features']} bands; Sentinel-2 BOA has 10"
        )
    if hp["num_classes"] != 1:
        raise ModelError(
            f"model checkpoint {uri} has {hp['num_classes']} outputs; SBERT here is binary (1)"
        )
    if hp["hidden"] % hp["attn_heads"]:
        raise ModelError(
            f"model checkpoint {uri}: hidden size {hp['hidden']} is not divisible by "
            f"{hp['attn_heads']} "
            "heads; pass --model-params with the right number of heads"
        )
    seq = dict(card.sequence, max_position=hp["max_position"])
    return card.model_copy(update={"hyperparameters": hp, "sequence": seq})
