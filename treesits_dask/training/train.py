"""Training and evaluation from reference samples: ``python -m treesits_dask train --config
train.yaml`` and ``python -m treesits_dask evaluate --model ... --samples ...``, and the same API.

Samples are read by :mod:`treesits_dask.training.extract` through the inference cube code; models
are trained by :func:`treesits_dask.training.fit.fit` (on logits, class-weighted, early stopping,
fixed seed), optionally fine-tuned from a published checkpoint, and saved as a native model
(``<stem>.pt`` + card ``<stem>.json`` with class names, band order, preprocessing settings and the
validation metrics) that ``run --model-family native`` reads.  Torch is imported only when
training or evaluating.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import TrainConfig
from ..errors import ConfigError, ModelError
from ..io import storage
from ..io.discovery import S2_BANDS
from ..models.card import SBERT_SEQUENCE, ModelCard, ModelSpec
from ..version import __version__
from .extract import load_samples
from .metrics import classification_metrics, write_report
from .samples import SampleSet

if TYPE_CHECKING:  # pragma: no cover
    from ..models.loading import Predictor

__all__ = ["evaluate", "model_classes", "predictor_of", "stem", "train"]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- classes
def model_classes(card: ModelCard) -> list[str]:
    """The classes a model tells apart: its class names, or [negative, positive] when binary."""
    if card.output_kind != "sigmoid":
        return list(card.class_names)
    named = (card.metrics or {}).get("class_names")
    if isinstance(named, list) and len(named) == 2 and named[1] == card.class_names[0]:
        return list(named)
    return [f"not {card.class_names[0]}", card.class_names[0]]


def _align_classes(samples: SampleSet, names: Sequence[str]) -> SampleSet:
    """Express ``samples`` in the class order ``names`` (integer labels keep their index)."""
    names = tuple(names)
    own = samples.class_names
    generic = own == tuple(f"class_{i}" for i in range(len(own)))
    if generic and len(own) <= len(names):
        return replace(samples, class_names=names)
    if len(names) == len(own) == 2 and own[1] == names[1]:  # binary: the negative class's name
        return replace(samples, class_names=names)
    return samples.with_classes(names)


# --------------------------------------------------------------------------------------- evaluate
def predictor_of(model: Any, device: str = "cpu") -> Predictor:
    """``model`` as a loaded :class:`Predictor`: a Predictor, a :class:`ModelSpec` or the path of
    a native ``.pt``."""
    from ..models import load_model
    from ..models.loading import Predictor

    if isinstance(model, Predictor):
        return model
    spec = model if isinstance(model, ModelSpec) else ModelSpec(str(model), "native")
    return load_model(spec, device=device)


def evaluate(model: Any, samples: SampleSet, batch_size: int = 2048) -> dict:
    """Metrics of ``model`` (a :class:`Predictor`, a :class:`ModelSpec` or a native ``.pt`` path)
    on ``samples``: see :func:`classification_metrics`.  Labels are matched to the model's classes
    by name; samples without a valid observation are left out."""
    predictor = predictor_of(model)
    names = model_classes(predictor.card)
    samples = _align_classes(samples, names).drop_empty()
    if not len(samples):
        raise ConfigError(f"no samples with a valid observation in {samples.source} to evaluate")
    probs, _ = predictor.predict(samples.series, samples.valid, samples.days, batch_size=batch_size)
    if predictor.card.output_kind == "sigmoid":
        pred = (probs[:, 0] >= 0.5).astype(np.int64)
    else:
        pred = probs.argmax(axis=1)
    return classification_metrics(samples.labels, pred, names)


# --------------------------------------------------------------------------------------- train
def _template_card(config: TrainConfig, init: Predictor | None) -> ModelCard:
    """A card with the sequence semantics of the model to train (decides the scene window)."""
    if config.family == "sbert":
        sequence = dict(SBERT_SEQUENCE)
        if init is not None and init.card.sequence.get("kind") == "sbert":
            sequence.update(init.card.sequence)
        if config.seq_len:
            sequence["seq_len"] = config.seq_len
        kind = "sigmoid"
    else:
        sequence, kind = {"kind": "full"}, "softmax"
    return ModelCard(
        family=config.family,
        hyperparameters={},
        bands=list(S2_BANDS),
        class_names=["_"],
        output_kind=kind,
        sequence=sequence,
    )


def _load_init(config: TrainConfig) -> Predictor | None:
    if not config.init_from:
        return None
    from ..models import load_model

    spec = ModelSpec(config.init_from, config.resolved_init_family, config.init_params)
    predictor = load_model(spec, device="cpu")
    if predictor.card.family != config.family:
        raise ModelError(
            f"init_from {config.init_from} is a {predictor.card.family} model but family is "
            f"{config.family}; set family: {predictor.card.family}"
        )
    log.info(
        "fine-tuning %s (%s) with classes %s",
        config.init_from,
        predictor.card.family,
        model_classes(predictor.card),
    )
    return predictor


def _class_weights(config: TrainConfig, names: Sequence[str]):
    cw = config.class_weights
    if isinstance(cw, dict):
        unknown = sorted(set(cw) - set(names))
        if unknown:
            raise ConfigError(f"class_weights names {unknown} that are not classes {list(names)}")
        return [float(cw.get(n, 1.0)) for n in names]
    return cw


def train(
    config: TrainConfig, callback: Callable[[dict], None] | None = None
) -> tuple[Predictor, dict]:
    """Read the samples, train (or fine-tune), evaluate the held-out split(s), write the model.

    Writes ``config.output`` (``<stem>.pt`` + card ``<stem>.json``) and the validation report
    ``<stem>_validation_{metrics.json,confusion.csv,confusion.png}`` (and ``_test_`` with
    ``test_fraction``).  ``callback`` receives a dict after every epoch.  Returns the trained
    CPU :class:`Predictor` and the metrics stored in its card.
    """
    from ..models import save_native
    from .fit import FitOptions, fit, stratified_split

    t0 = dt.datetime.now(dt.UTC)
    init = _load_init(config)
    samples = _training_samples(config, init)
    names = list(samples.class_names)
    if config.test_fraction > 0:
        rest, test_idx = stratified_split(samples.labels, config.test_fraction, config.seed)
    else:
        rest, test_idx = np.arange(len(samples)), np.zeros(0, np.int64)
    pool = samples.subset(rest)
    train_idx, val_idx = stratified_split(pool.labels, config.val_fraction, config.seed + 1)
    options = FitOptions(
        hyperparameters=config.hyperparameters or None,
        max_seconds=config.max_seconds,
        seed=config.seed,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        patience=config.patience,
        max_epochs=config.max_epochs,
        class_weights=_class_weights(config, names),
        device=config.device,
        seq_len=config.seq_len,
        threads=config.threads,
    )
    predictor, fit_metrics = fit(
        config.family,
        pool.series,
        pool.valid,
        pool.days,
        pool.labels,
        names,
        options,
        init=init,
        callback=callback,
        split=(train_idx, val_idx),
    )
    metrics = dict(fit_metrics)
    metrics["class_names"] = names
    metrics["validation"] = evaluate(predictor, pool.subset(val_idx))
    if len(test_idx):
        metrics["test"] = evaluate(predictor, samples.subset(test_idx))
    metrics["preprocessing"] = _preprocessing(config, predictor.card, samples)
    metrics["training"] = _provenance(config, samples, t0)
    predictor.card = predictor.card.model_copy(update={"metrics": metrics})
    pt, _ = save_native(predictor.module, predictor.card, config.output)
    for split in ("validation", "test"):
        if split in metrics:
            write_report(metrics[split], f"{stem(pt)}_{split}")
    log.info(
        "model written to %s (validation overall accuracy %.4f)",
        pt,
        metrics["validation"]["overall_accuracy"],
    )
    return predictor, metrics


def _training_samples(config: TrainConfig, init: Predictor | None) -> SampleSet:
    """The samples of ``config``, in the checkpoint's class order when fine-tuning."""
    samples = load_samples(config, card=_template_card(config, init))
    if init is not None and config.class_names is None:
        try:
            samples = _align_classes(samples, model_classes(init.card))
        except ConfigError:
            log.info(
                "the samples' classes %s differ from the checkpoint's %s: new last layer",
                list(samples.class_names),
                model_classes(init.card),
            )
    counts = np.bincount(samples.labels, minlength=len(samples.class_names))
    log.info(
        "training a %s on %d samples: %s",
        config.family,
        len(samples),
        ", ".join(f"{n} {c}" for n, c in zip(samples.class_names, counts, strict=True)),
    )
    return samples


def _preprocessing(config: TrainConfig, card: ModelCard, samples: SampleSet) -> dict:
    """How the model's inputs were read and prepared (recorded in its card)."""
    dropped = (
        "dropped; latest seq_len kept, z-scored per pixel and band"
        if config.family == "sbert"
        else "set to 0 in all bands"
    )
    return {
        "bands": list(S2_BANDS),
        "input": "raw BOA int16 (reflectance x 10000) in ascending date order; invalid "
        "observations (nodata or QAI-screened) " + dropped,
        "sequence": card.sequence,
        "qai": list(config.qai_flags),
        "sensors": list(config.sensors),
        "start_date": str(config.start_date) if config.start_date else None,
        "end_date": str(config.end_date) if config.end_date else None,
        "time_steps": len(samples.days),
        "first_date": str(samples.dates[0]) if len(samples.days) else None,
        "last_date": str(samples.dates[-1]) if len(samples.days) else None,
    }


_RECORDED = (
    "seed",
    "val_fraction",
    "test_fraction",
    "batch_size",
    "learning_rate",
    "patience",
    "max_epochs",
    "threads",
    "max_seconds",
    "class_weights",
)


def _provenance(config: TrainConfig, samples: SampleSet, started: dt.datetime) -> dict:
    """Where the model came from: samples, classes, checkpoint and training settings."""
    counts = np.bincount(samples.labels, minlength=len(samples.class_names))
    return {
        "samples": config.samples,
        "n_samples": len(samples),
        "class_counts": {n: int(c) for n, c in zip(samples.class_names, counts, strict=True)},
        "tiles": sorted({t for t in samples.tiles if t}),
        "init_from": config.init_from,
        "init_family": config.resolved_init_family,
        **{k: getattr(config, k) for k in _RECORDED},
        "started": started.isoformat(timespec="seconds"),
        "treesits_dask_version": __version__,
    }


def stem(url: str) -> str:
    """``dir/model.pt`` -> ``dir/model`` (:func:`save_native` writes ``.pt`` and ``.json``)."""
    base = storage.basename(url)
    return url[: len(url) - len(base)] + (base.rsplit(".", 1)[0] if "." in base else base)
