"""Minimal, time-bounded training of native SITS-NN models (used by the demo).

The inputs go through :func:`~treesits_dask.models.preprocess.full_inputs`, the same function as
inference, so a trained model reads raw BOA integers with gaps zero-filled like the published
weights.  For numerical comfort the network is trained on inputs scaled by 1e-4 and the scale is
folded into the first Linear layer afterwards, which makes the saved model exact on raw inputs.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..discovery import S2_BANDS
from ..errors import ModelError
from .architectures import build_module
from .card import ModelCard
from .loading import Predictor
from .preprocess import check_inputs, full_inputs

__all__ = ["default_hyperparameters", "fit"]

log = logging.getLogger(__name__)

_SCALE = 1e-4
_TRAINABLE = ("sits-lstm", "sits-transformer")


def default_hyperparameters(family: str, n_classes: int) -> dict:
    """Small architectures that train in seconds on a CPU."""
    if family == "sits-lstm":
        return {
            "num_bands": 10,
            "input_size": 32,
            "hidden_size": 64,
            "num_layers": 2,
            "num_classes": n_classes,
        }
    if family == "sits-transformer":
        return {
            "num_bands": 10,
            "num_classes": n_classes,
            "d_model": 32,
            "nhead": 4,
            "num_layers": 2,
            "dim_feedforward": 64,
        }
    raise ModelError(f"training supports the families {', '.join(_TRAINABLE)}, not {family!r}")


def _first_linear(module: torch.nn.Module, family: str) -> torch.nn.Linear:
    return module.embd if family == "sits-lstm" else module.src_embd


def _logits(module: torch.nn.Module, family: str, x: torch.Tensor) -> torch.Tensor:
    x = x * _SCALE
    return module.logits(x if family == "sits-lstm" else x.transpose(0, 1))


def _accuracy(module, family, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> float:
    module.eval()
    with torch.inference_mode():
        pred = torch.cat(
            [_logits(module, family, x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)]
        )
    return float((pred == y).float().mean())


def fit(
    family: str,
    series: np.ndarray,
    valid: np.ndarray,
    days: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    hyperparameters: dict | None = None,
    max_seconds: float = 60.0,
    seed: int = 0,
    val_fraction: float = 0.2,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    patience: int = 15,
    max_epochs: int = 500,
) -> tuple[Predictor, dict]:
    """Train a native ``sits-lstm`` or ``sits-transformer`` classifier.

    ``series`` int16 (N, T, 10), ``valid`` bool (N, T), ``days`` int64 (T,), ``labels`` int (N,)
    in ``0 .. len(class_names) - 1``.  Adam on the pre-softmax output with class-weighted cross
    entropy, fixed seed, early stop on held-out accuracy, at most ``max_seconds``.  Returns a CPU
    :class:`Predictor` (best held-out epoch) whose card carries the metrics, and the metrics.
    """
    t_start = time.perf_counter()
    if family not in _TRAINABLE:
        raise ModelError(f"training supports the families {', '.join(_TRAINABLE)}, not {family!r}")
    series = np.asarray(series)
    valid = np.asarray(valid, dtype=bool)
    days = np.asarray(days, dtype=np.int64)
    check_inputs(series, valid, days)
    labels = np.asarray(labels).astype(np.int64)
    n_classes = len(class_names)
    if labels.shape != (series.shape[0],):
        raise ModelError(f"labels has shape {labels.shape}, expected ({series.shape[0]},)")
    if n_classes < 2 or labels.min(initial=0) < 0 or labels.max(initial=0) >= n_classes:
        raise ModelError(
            f"labels must lie in 0..{n_classes - 1} ({n_classes} class names, at least 2)"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ModelError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n = series.shape[0]
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 2:
        raise ModelError(
            f"{n} labelled pixels are too few to train and validate; label more pixels"
        )

    hp = dict(hyperparameters or default_hyperparameters(family, n_classes))
    hp.setdefault("num_classes", n_classes)
    if hp["num_classes"] != n_classes:
        raise ModelError(
            f"hyperparameters num_classes={hp['num_classes']} but {n_classes} class names"
        )
    card = ModelCard(
        family=family,
        hyperparameters=hp,
        bands=list(S2_BANDS),
        class_names=list(class_names),
        output_kind="softmax",
        sequence={"kind": "full"},
    )

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    val_idx, train_idx = perm[:n_val], perm[n_val:]
    x, _ = full_inputs(series, valid)
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)
    x_train, y_train, x_val, y_val = xt[train_idx], yt[train_idx], xt[val_idx], yt[val_idx]
    counts = torch.bincount(y_train, minlength=n_classes).float()
    weights = torch.where(counts > 0, len(y_train) / (n_classes * counts.clamp(min=1)), 0.0)

    torch.manual_seed(seed)
    module = build_module(family, hp)
    optimizer = torch.optim.Adam(module.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(seed)
    best_acc, best_state, best_epoch, epoch, stale = -1.0, None, 0, 0, 0
    deadline = t_start + max_seconds
    out_of_time = False
    last_loss = float("nan")
    reason = ""
    while epoch < max_epochs and stale < patience and not out_of_time:
        epoch += 1
        module.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples in training mode
                continue
            loss = F.cross_entropy(
                _logits(module, family, x_train[idx]), y_train[idx], weight=weights
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            last_loss = loss.detach().item()
            if time.perf_counter() > deadline:
                out_of_time = True
                break
        acc = _accuracy(module, family, x_val, y_val)
        if acc > best_acc:
            best_acc, best_state, best_epoch, stale = (
                acc,
                copy.deepcopy(module.state_dict()),
                epoch,
                0,
            )
        else:
            stale += 1
        log.debug("epoch %d: loss %.4f, held-out accuracy %.4f", epoch, last_loss, acc)
        if best_acc >= 1.0:
            reason = "perfect"
            break

    module.load_state_dict(best_state)
    train_accuracy = _accuracy(module, family, x_train, y_train)
    with torch.no_grad():
        _first_linear(module, family).weight.mul_(_SCALE)  # fold the input scale: exact on raw BOA
    module.eval()
    predictor = Predictor(module, card, torch.device("cpu"))
    probs, _ = predictor.predict(series[val_idx], valid[val_idx], days)
    metrics = {
        "val_accuracy": float((probs.argmax(1) == labels[val_idx]).mean()),
        "train_accuracy": train_accuracy,
        "best_epoch": best_epoch,
        "epochs": epoch,
        "n_train": len(train_idx),
        "n_val": int(n_val),
        "seconds": round(time.perf_counter() - t_start, 2),
        "stopped": reason
        or ("time" if out_of_time else "early" if stale >= patience else "max_epochs"),
    }
    predictor.card = card.model_copy(update={"metrics": metrics})
    log.info(
        "trained %s: held-out accuracy %.3f after %d epochs (%.1f s)",
        family,
        metrics["val_accuracy"],
        epoch,
        metrics["seconds"],
    )
    return predictor, metrics
