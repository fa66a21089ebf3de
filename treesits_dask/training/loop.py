"""The training loop of :func:`treesits_dask.training.fit.fit`: model inputs of all samples
(prepared like inference), the loss on logits, held-out evaluation and the epochs with early
stopping."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..models.preprocess import full_inputs, sbert_inputs

__all__ = ["FitOptions", "ModelInputs", "TrainingData", "TrainingLoop", "class_weights"]

log = logging.getLogger(__name__)

#: Epochs without a lower held-out loss after which a perfect held-out accuracy stops training.
_PERFECT_PATIENCE = 3


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
class TrainingData:
    """The checked training data and its split."""

    series: np.ndarray
    valid: np.ndarray
    days: np.ndarray
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray


def _first_linear(module: nn.Module, family: str) -> nn.Linear:
    return module.embd if family == "sits-lstm" else module.src_embd


class ModelInputs:
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


def _evaluate(module, inputs: ModelInputs, y, idx, weights, sigmoid, device, batch=512):
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


def class_weights(spec, y_train: torch.Tensor, n_classes: int) -> torch.Tensor | None:
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


class TrainingLoop:
    """Epochs over the training split; keeps the weights of the best held-out epoch."""

    def __init__(
        self,
        module: nn.Module,
        inputs: ModelInputs,
        data: TrainingData,
        n_classes: int,
        sigmoid: bool,
        opt: FitOptions,
        dev: torch.device,
    ):
        self.module, self.inputs, self.opt, self.dev, self.sigmoid = (
            module,
            inputs,
            opt,
            dev,
            sigmoid,
        )
        self.y = torch.from_numpy(data.labels)
        self.train_t, self.val_t = torch.from_numpy(data.train_idx), torch.from_numpy(data.val_idx)
        weights = class_weights(opt.class_weights, self.y[self.train_t], n_classes)
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
        return _evaluate(
            self.module, self.inputs, self.y, idx, self.weights, self.sigmoid, self.dev
        )

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
            log.debug(
                "epoch %d: loss %.4f, held-out accuracy %.4f", self.epoch, self.last_loss, acc
            )
            if callback is not None:
                callback(
                    {
                        "epoch": self.epoch,
                        "max_epochs": opt.max_epochs,
                        "loss": self.last_loss,
                        "val_accuracy": acc,
                        "val_loss": val_loss,
                        "best_val_accuracy": self.best[0],
                        "seconds": round(time.perf_counter() - t_start, 2),
                    }
                )
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
