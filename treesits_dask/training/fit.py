"""Time-bounded training of native ``sits-lstm``, ``sits-transformer`` and ``sbert`` models.

Inputs go through the same preparation as inference
(:func:`~treesits_dask.models.preprocess.full_inputs` for the SITS-NN families,
:func:`~treesits_dask.models.preprocess.sbert_inputs` for SBERT), and the loss is computed on the
logits (``module.logits``: no softmax before the cross entropy).  For numerical comfort the
SITS-NN networks see each band standardised with the mean and standard deviation of the valid
training observations; this affine map is folded into the first Linear layer afterwards (and
unfolded from a checkpoint that is fine-tuned), so the saved model reads raw BOA integers with
zero-filled gaps exactly like the published weights.

SBERT with two classes is trained as the published binary model (one logit, sigmoid; the card
names the positive class); with more classes it gets a softmax head.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..io.discovery import S2_BANDS
from ..models.architectures import build_module
from ..models.card import SBERT_SEQUENCE, ModelCard
from ..models.loading import Predictor, resolve_device
from ..models.preprocess import check_inputs
from .loop import FitOptions, ModelInputs, TrainingData, TrainingLoop

__all__ = ["TRAINABLE", "FitOptions", "default_hyperparameters", "fit", "stratified_split"]

log = logging.getLogger(__name__)

#: Families that :func:`fit` trains.
TRAINABLE = ("sits-lstm", "sits-transformer", "sbert")


def default_hyperparameters(family: str, n_outputs: int) -> dict:
    """Small architectures that train in seconds on a CPU (``n_outputs``: 1 for binary SBERT)."""
    if family == "sits-lstm":
        return {
            "num_bands": 10,
            "input_size": 32,
            "hidden_size": 64,
            "num_layers": 2,
            "num_classes": n_outputs,
        }
    if family == "sits-transformer":
        return {
            "num_bands": 10,
            "num_classes": n_outputs,
            "d_model": 32,
            "nhead": 4,
            "num_layers": 2,
            "dim_feedforward": 64,
        }
    if family == "sbert":
        return {
            "num_features": 10,
            "hidden": 64,
            "n_layers": 2,
            "attn_heads": 4,
            "dropout": 0.1,
            "num_classes": n_outputs,
            "max_position": SBERT_SEQUENCE["max_position"],
        }
    raise ModelError(f"training supports the families {', '.join(TRAINABLE)}, not {family!r}")


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, held_out)`` indices: ``round(n_k * fraction)`` samples of each class held out
    (at least one where a class has two or more samples), chosen with ``seed``."""
    rng = np.random.default_rng(seed)
    held = []
    for k in np.unique(labels):
        idx = np.flatnonzero(labels == k)
        n = round(len(idx) * fraction)
        if len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        else:
            n = 0
        held.append(rng.permutation(idx)[:n])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    keep = np.setdiff1d(np.arange(len(labels)), held_out)
    return keep.astype(np.int64), held_out.astype(np.int64)


@contextlib.contextmanager
def _torch_threads(threads: int | None):
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _replace_head(module: nn.Module, family: str, n_outputs: int) -> None:
    """New last layer for another number of classes (the rest keeps the checkpoint's weights)."""
    if family == "sbert":
        old = module.classification.linear
        module.classification.linear = nn.Linear(old.in_features, n_outputs)
    else:
        old = module.fc[4]
        module.fc[4] = nn.Linear(old.in_features, n_outputs)


def fit(
    family: str,
    series: np.ndarray,
    valid: np.ndarray,
    days: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    options: FitOptions | None = None,
    *,
    init: Predictor | None = None,
    callback: Callable[[dict], None] | None = None,
    split: tuple[np.ndarray, np.ndarray] | None = None,
    **option_values,
) -> tuple[Predictor, dict]:
    """Train a native classifier of ``family`` (sits-lstm, sits-transformer or sbert).

    ``series`` int16 (N, T, 10), ``valid`` bool (N, T), ``days`` int64 (T,), ``labels`` int (N,)
    in ``0 .. len(class_names) - 1``.  ``options`` (:class:`FitOptions`; or its fields as keyword
    arguments) say how; ``split=(train_idx, val_idx)`` replaces the stratified split.  ``init``
    fine-tunes a loaded model of the same family (a new last layer when the number of classes
    differs).  ``callback`` receives a dict after every epoch.  Returns a CPU
    :class:`Predictor` with the best held-out epoch's weights, whose card carries the metrics,
    and the metrics.
    """
    opt = replace(options or FitOptions(), **option_values)
    with _torch_threads(opt.threads):
        t_start = time.perf_counter()
        if family not in TRAINABLE:
            raise ModelError(
                f"training supports the families {', '.join(TRAINABLE)}, not {family!r}"
            )
        data = _checked_data(series, valid, days, labels, len(class_names), opt, split)
        sigmoid = family == "sbert" and len(class_names) == 2
        n_out = 1 if sigmoid else len(class_names)
        torch.manual_seed(opt.seed)
        module, hp = _new_module(family, n_out, init, opt.hyperparameters, len(class_names))
        card = _card(family, hp, class_names, sigmoid, init, opt.seq_len)
        dev = resolve_device(opt.device)
        inputs = ModelInputs(
            family, data.series, data.valid, data.days, card.sequence, data.train_idx
        )
        if family != "sbert" and init is not None:
            inputs.unfold(module)  # the network sees standardised inputs
        module.to(dev)
        loop = TrainingLoop(module, inputs, data, len(class_names), sigmoid, opt, dev)
        loop.run(t_start, callback)
        return _trained(family, loop, data, card, class_names, sigmoid, init, t_start)


def _checked_data(
    series, valid, days, labels, n_classes: int, opt: FitOptions, split
) -> TrainingData:
    series = np.asarray(series)
    valid = np.asarray(valid, dtype=bool)
    days = np.asarray(days, dtype=np.int64)
    check_inputs(series, valid, days)
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape != (series.shape[0],):
        raise ModelError(f"labels has shape {labels.shape}, expected ({series.shape[0]},)")
    if n_classes < 2 or labels.min(initial=0) < 0 or labels.max(initial=0) >= n_classes:
        raise ModelError(
            f"labels must lie in 0..{n_classes - 1} ({n_classes} class names, at least 2)"
        )
    if split is None:
        if not 0.0 < opt.val_fraction < 1.0:
            raise ModelError(f"val_fraction must be between 0 and 1, got {opt.val_fraction}")
        train_idx, val_idx = stratified_split(labels, opt.val_fraction, opt.seed)
    else:
        train_idx, val_idx = (np.asarray(s, dtype=np.int64) for s in split)
    if len(train_idx) < 2 or len(val_idx) < 1:
        raise ModelError(
            f"{series.shape[0]} labelled samples are too few to train and validate "
            f"({len(train_idx)} for training, {len(val_idx)} held out); label more samples"
        )
    return TrainingData(series, valid, days, labels, train_idx, val_idx)


def _new_module(
    family: str, n_out: int, init: Predictor | None, hyperparameters: dict | None, n_classes: int
) -> tuple[nn.Module, dict]:
    """The module to train (a copy of ``init``, or a new one) and its hyper-parameters."""
    if init is not None:
        return _init_module(init, family, n_out, hyperparameters)
    hp = {**default_hyperparameters(family, n_out), **(hyperparameters or {})}
    if hp["num_classes"] != n_out:
        raise ModelError(
            f"hyperparameters num_classes={hp['num_classes']} but {n_classes} classes "
            f"({n_out} model outputs)"
        )
    try:
        return build_module(family, hp), hp
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot build a {family} with hyperparameters {hp}: {exc}") from exc


def _card(
    family: str,
    hp: dict,
    class_names: Sequence[str],
    sigmoid: bool,
    init: Predictor | None,
    seq_len: int | None,
) -> ModelCard:
    """The card of the model being trained (without metrics yet)."""
    if family == "sbert":
        sequence = dict(SBERT_SEQUENCE, max_position=int(hp["max_position"]))
        if init is not None and init.card.sequence.get("kind") == "sbert":
            sequence.update(init.card.sequence)
        if seq_len:
            sequence["seq_len"] = int(seq_len)
    else:
        sequence = {"kind": "full"}
    return ModelCard(
        family=family,
        hyperparameters=hp,
        bands=list(S2_BANDS),
        class_names=[class_names[1]] if sigmoid else list(class_names),
        output_kind="sigmoid" if sigmoid else "softmax",
        sequence=sequence,
    )


def _trained(
    family: str,
    loop: TrainingLoop,
    data: TrainingData,
    card: ModelCard,
    class_names: Sequence[str],
    sigmoid: bool,
    init: Predictor | None,
    t_start: float,
) -> tuple[Predictor, dict]:
    """The best epoch's model as a CPU :class:`Predictor` on raw BOA, and its metrics."""
    train_accuracy, _ = loop.evaluate(loop.train_t)
    module = loop.module.to("cpu").eval()
    if family != "sbert":
        loop.inputs.fold(module)  # exact on raw BOA
    predictor = Predictor(module, card, torch.device("cpu"))
    # the held-out accuracy through the inference path (Predictor.predict)
    val = data.val_idx
    probs, _ = predictor.predict(data.series[val], data.valid[val], data.days)
    pred = (probs[:, 0] >= 0.5).astype(np.int64) if sigmoid else probs.argmax(1)
    metrics = {
        "val_accuracy": float((pred == data.labels[val]).mean()),
        "train_accuracy": float(train_accuracy),
        "best_epoch": loop.best_epoch,
        "epochs": loop.epoch,
        "n_train": len(data.train_idx),
        "n_val": len(val),
        "seconds": round(time.perf_counter() - t_start, 2),
        "stopped": loop.stopped,
    }
    if sigmoid:
        metrics["class_names"] = list(class_names)  # [negative, positive]
    if init is not None:
        metrics["fine_tuned"] = True
    predictor.card = card.model_copy(update={"metrics": metrics})
    log.info(
        "trained %s: held-out accuracy %.3f after %d epochs (%.1f s, stopped: %s)",
        family,
        metrics["val_accuracy"],
        loop.epoch,
        metrics["seconds"],
        metrics["stopped"],
    )
    return predictor, metrics


def _init_module(init: Predictor, family: str, n_out: int, hyperparameters: dict | None):
    """A trainable copy of ``init`` (CPU) and its hyper-parameters, head resized to ``n_out``."""
    if init.card.family != family:
        raise ModelError(
            f"cannot fine-tune a {init.card.family} checkpoint as {family}; set family to "
            f"{init.card.family} or init_family to the checkpoint's family"
        )
    hp = dict(init.card.hyperparameters)
    clash = {
        k: v
        for k, v in (hyperparameters or {}).items()
        if k != "num_classes" and k in hp and hp[k] != v
    }
    if clash:
        raise ModelError(
            f"hyperparameters {clash} differ from the checkpoint's {hp}; a fine-tuned model keeps "
            "the architecture of its checkpoint (drop them, or train from scratch)"
        )
    module = copy.deepcopy(init.module).to("cpu")
    if hp["num_classes"] != n_out:
        log.info(
            "fine-tuning: the checkpoint has %d outputs, %d are needed: new last layer",
            hp["num_classes"],
            n_out,
        )
        _replace_head(module, family, n_out)
        hp["num_classes"] = n_out
    return module, hp
