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
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..io.discovery import S2_BANDS
from ..models.architectures import build_module
from ..models.card import SBERT_SEQUENCE, ModelCard
from ..models.loading import Predictor, resolve_device
from ..models.preprocess import check_inputs, full_inputs, sbert_inputs

__all__ = ["TRAINABLE", "FitOptions", "default_hyperparameters", "fit", "stratified_split"]

log = logging.getLogger(__name__)

#: Epochs without a lower held-out loss after which a perfect held-out accuracy stops training.
_PERFECT_PATIENCE = 3
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


def _first_linear(module: nn.Module, family: str) -> nn.Linear:
    return module.embd if family == "sits-lstm" else module.src_embd


def _replace_head(module: nn.Module, family: str, n_outputs: int) -> None:
    """New last layer for another number of classes (the rest keeps the checkpoint's weights)."""
    if family == "sbert":
        old = module.classification.linear
        module.classification.linear = nn.Linear(old.in_features, n_outputs)
    else:
        old = module.fc[4]
        module.fc[4] = nn.Linear(old.in_features, n_outputs)


class _Inputs:
    """Model inputs of all samples (CPU tensors) and the forward pass on a batch of them."""

    def __init__(self, family: str, series, valid, days, sequence: dict, train_idx):
        self.family = family
        if family == "sbert":
            x, doy, mask, used = sbert_inputs(
                series, valid, days, int(sequence["seq_len"]), int(sequence["max_position"])
            )
            self.tensors = (torch.from_numpy(x), torch.from_numpy(doy), torch.from_numpy(mask))
            self.used = torch.from_numpy(used)
        else:
            x, _ = full_inputs(series, valid)
            self.tensors = (torch.from_numpy(x),)
            # per-band statistics of the valid training observations (float64)
            obs = series[train_idx][valid[train_idx]].astype(np.float64)
            mean = obs.mean(axis=0) if len(obs) else np.zeros(x.shape[2])
            std = obs.std(axis=0) if len(obs) > 1 else np.ones(x.shape[2])
            self.mean = torch.tensor(mean, dtype=torch.float32)
            self.std = torch.tensor(np.where(std > 1.0, std, 1.0), dtype=torch.float32)

    def logits(self, module: nn.Module, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
        if self.family == "sbert":
            # leading padding slots are identical and masked: one of them gives the same result
            keep = min(self.tensors[0].shape[1], int(self.used[idx].max()) + 1)
            x, doy, mask = (t[idx][:, -keep:].to(device) for t in self.tensors)
            return module.logits(x, doy, mask)
        x = (self.tensors[0][idx].to(device) - self.mean.to(device)) / self.std.to(device)
        return module.logits(x if self.family == "sits-lstm" else x.transpose(0, 1))

    def fold(self, module: nn.Module) -> None:
        """Make ``module`` read raw BOA: absorb the standardisation into its first Linear."""
        lin = _first_linear(module, self.family)
        w, b = lin.weight.detach().double(), lin.bias.detach().double()
        w_raw = w / self.std.double().to(w.device)
        with torch.no_grad():  # in float64: exact up to one float32 rounding
            lin.weight.copy_(w_raw)
            lin.bias.copy_(b - w_raw @ self.mean.double().to(w.device))

    def unfold(self, module: nn.Module) -> None:
        """Inverse of :meth:`fold`: a raw-BOA checkpoint that reads standardised inputs."""
        lin = _first_linear(module, self.family)
        w_raw, b_raw = lin.weight.detach().double(), lin.bias.detach().double()
        with torch.no_grad():
            lin.bias.copy_(b_raw + w_raw @ self.mean.double().to(w_raw.device))
            lin.weight.copy_(w_raw * self.std.double().to(w_raw.device))


def _loss(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None, sigmoid: bool):
    if sigmoid:
        w = weights[y] if weights is not None else None
        return F.binary_cross_entropy_with_logits(logits[:, 0], y.float(), weight=w)
    return F.cross_entropy(logits, y, weight=weights)


def _predict(logits: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if sigmoid else logits.argmax(1)


def _evaluate(module, inputs: _Inputs, y, idx, weights, sigmoid, device, batch=512):
    """Accuracy and mean loss of ``module`` on the samples ``idx`` (eval mode, no grad)."""
    module.eval()
    if len(idx) == 0:
        return float("nan"), float("nan")
    correct, total_loss = 0, 0.0
    with torch.inference_mode():
        for i in range(0, len(idx), batch):
            b = idx[i : i + batch]
            z = inputs.logits(module, b, device).float()
            yb = y[b].to(device)
            correct += int((_predict(z, sigmoid) == yb).sum())
            total_loss += float(_loss(z, yb, weights, sigmoid)) * len(b)
    return correct / len(idx), total_loss / len(idx)


def _class_weights(spec, y_train: torch.Tensor, n_classes: int) -> torch.Tensor | None:
    if spec is None or (isinstance(spec, str) and spec == "none"):
        return None
    if isinstance(spec, str):
        if spec != "balanced":
            raise ModelError(f"class_weights must be 'balanced', 'none' or a list, got {spec!r}")
        counts = torch.bincount(y_train, minlength=n_classes).float()
        return torch.where(counts > 0, len(y_train) / (n_classes * counts.clamp(min=1)), 0.0)
    w = torch.tensor([float(v) for v in spec], dtype=torch.float32)
    if w.shape != (n_classes,) or (w < 0).any():
        raise ModelError(f"class_weights needs {n_classes} non-negative numbers, got {list(spec)}")
    return w


@dataclass(frozen=True)
class FitOptions:
    """How :func:`fit` trains (the defaults train small models in seconds on a CPU).

    Adam on the logits with class-weighted cross entropy (``class_weights``: ``"balanced"``,
    ``"none"`` or one weight per class), fixed ``seed``, a stratified held-out split
    (``val_fraction``), early stop after ``patience`` epochs without a better held-out accuracy
    (ties: lower loss), at most ``max_epochs`` epochs and ``max_seconds``.  ``threads``: torch CPU
    threads while training (restored afterwards; small sequence models gain nothing from more,
    and oversubscribed cores slow them down a lot).  ``seq_len``: SBERT observations per pixel.
    """

    hyperparameters: dict | None = None
    max_seconds: float = 60.0
    seed: int = 0
    val_fraction: float = 0.2
    batch_size: int = 64
    learning_rate: float = 1e-3
    patience: int = 15
    max_epochs: int = 500
    class_weights: str | Sequence[float] | None = "balanced"
    device: str = "cpu"
    seq_len: int | None = None
    threads: int | None = 1


@dataclass
class _Data:
    """The checked training data and its split."""

    series: np.ndarray
    valid: np.ndarray
    days: np.ndarray
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray


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
        inputs = _Inputs(family, data.series, data.valid, data.days, card.sequence,
                         data.train_idx)
        if family != "sbert" and init is not None:
            inputs.unfold(module)  # the network sees standardised inputs
        module.to(dev)
        loop = _TrainingLoop(module, inputs, data, len(class_names), sigmoid, opt, dev)
        loop.run(t_start, callback)
        return _trained(family, loop, data, card, class_names, sigmoid, init, t_start)


def _checked_data(series, valid, days, labels, n_classes: int, opt: FitOptions,
                  split) -> _Data:
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
    return _Data(series, valid, days, labels, train_idx, val_idx)


def _new_module(family: str, n_out: int, init: Predictor | None, hyperparameters: dict | None,
                n_classes: int) -> tuple[nn.Module, dict]:
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


def _card(family: str, hp: dict, class_names: Sequence[str], sigmoid: bool,
          init: Predictor | None, seq_len: int | None) -> ModelCard:
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


class _TrainingLoop:
    """Epochs over the training split; keeps the weights of the best held-out epoch."""

    def __init__(self, module: nn.Module, inputs: _Inputs, data: _Data, n_classes: int,
                 sigmoid: bool, opt: FitOptions, dev: torch.device):
        self.module, self.inputs, self.opt, self.dev, self.sigmoid = module, inputs, opt, dev, sigmoid
        self.y = torch.from_numpy(data.labels)
        self.train_t, self.val_t = torch.from_numpy(data.train_idx), torch.from_numpy(data.val_idx)
        weights = _class_weights(opt.class_weights, self.y[self.train_t], n_classes)
        self.weights = weights.to(dev) if weights is not None else None
        self.best = (-1.0, float("inf"))
        self.best_state, self.best_epoch, self.epoch, self.stale = None, 0, 0, 0
        self.out_of_time, self.last_loss, self.reason = False, float("nan"), ""

    def _epoch(self, optimizer, gen: torch.Generator, deadline: float) -> None:
        self.module.train()
        order = self.train_t[torch.randperm(len(self.train_t), generator=gen)]
        for i in range(0, len(order), self.opt.batch_size):
            idx = order[i : i + self.opt.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples in training mode
                continue
            logits = self.inputs.logits(self.module, idx, self.dev)
            loss = _loss(logits, self.y[idx].to(self.dev), self.weights, self.sigmoid)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.last_loss = loss.detach().item()
            if time.perf_counter() > deadline:
                self.out_of_time = True
                return

    def evaluate(self, idx: torch.Tensor) -> tuple[float, float]:
        return _evaluate(self.module, self.inputs, self.y, idx, self.weights, self.sigmoid,
                         self.dev)

    def run(self, t_start: float, callback: Callable[[dict], None] | None) -> None:
        opt = self.opt
        optimizer = torch.optim.Adam(self.module.parameters(), lr=opt.learning_rate)
        gen = torch.Generator().manual_seed(opt.seed)
        deadline = t_start + opt.max_seconds
        while self.epoch < opt.max_epochs and self.stale < opt.patience and not self.out_of_time:
            self.epoch += 1
            self._epoch(optimizer, gen, deadline)
            acc, val_loss = self.evaluate(self.val_t)
            if acc > self.best[0] or (acc == self.best[0] and val_loss < self.best[1]):
                self.best, self.best_epoch, self.stale = (acc, val_loss), self.epoch, 0
                self.best_state = copy.deepcopy(self.module.state_dict())
            else:
                self.stale += 1
            log.debug("epoch %d: loss %.4f, held-out accuracy %.4f", self.epoch, self.last_loss,
                      acc)
            if callback is not None:
                callback({
                    "epoch": self.epoch, "max_epochs": opt.max_epochs, "loss": self.last_loss,
                    "val_accuracy": acc, "val_loss": val_loss, "best_val_accuracy": self.best[0],
                    "seconds": round(time.perf_counter() - t_start, 2),
                })  # fmt: skip
            if self.best[0] >= 1.0 and self.stale >= min(opt.patience, _PERFECT_PATIENCE):
                self.reason = "perfect"  # every held-out sample right, the loss no longer improving
                break
        self.module.load_state_dict(self.best_state)

    @property
    def stopped(self) -> str:
        if self.reason:
            return self.reason
        if self.out_of_time:
            return "time"
        return "early" if self.stale >= self.opt.patience else "max_epochs"


def _trained(family: str, loop: _TrainingLoop, data: _Data, card: ModelCard,
             class_names: Sequence[str], sigmoid: bool, init: Predictor | None,
             t_start: float) -> tuple[Predictor, dict]:
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
        family, metrics["val_accuracy"], loop.epoch, metrics["seconds"], metrics["stopped"],
    )  # fmt: skip
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
