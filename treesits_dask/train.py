"""Training and evaluation from reference samples: ``python -m treesits_dask train --config
train.yaml`` and ``python -m treesits_dask evaluate --model ... --samples ...``, and the same API.

Samples are read by :mod:`treesits_dask.samples` through the inference cube code; models are
trained by :func:`treesits_dask.models.training.fit` (on logits, class-weighted, early stopping,
fixed seed), optionally fine-tuned from a published checkpoint, and saved as a native model
(``<stem>.pt`` + card ``<stem>.json`` with class names, band order, preprocessing settings and
the validation metrics) that ``run --model-family native`` reads.  Torch is imported only when
training or evaluating.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, model_validator

from . import __version__, storage
from .discovery import S2_BANDS
from .errors import ConfigError, ModelError, TreesitsError
from .models.card import SBERT_SEQUENCE, ModelCard, ModelSpec, card_path
from .samples import SampleSet, SampleSettings, load_samples

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .models.loading import Predictor

__all__ = [
    "TrainConfig",
    "classification_metrics",
    "confusion_table",
    "evaluate",
    "load_train_config",
    "main_evaluate",
    "main_train",
    "model_classes",
    "plot_confusion",
    "train",
    "write_report",
]

log = logging.getLogger(__name__)


class TrainConfig(SampleSettings):
    """Settings of ``train`` (YAML keys; the README's training section documents each)."""

    family: Literal["sits-lstm", "sits-transformer", "sbert"] = "sits-lstm"
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = Field(None, description="checkpoint to fine-tune")
    init_family: Literal["sits-lstm", "sits-transformer", "sbert", "native"] | None = None
    init_params: str | None = Field(None, description="SITS-NN *_params.json of init_from")
    val_fraction: float = Field(0.2, gt=0, lt=1)
    test_fraction: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0)
    max_seconds: float = Field(120.0, gt=0)
    max_epochs: int = Field(200, gt=0)
    patience: int = Field(15, gt=0)
    class_weights: Literal["balanced", "none"] | list[float] | dict[str, float] = "balanced"
    batch_size: int = Field(64, ge=2)
    learning_rate: float = Field(1e-3, gt=0)
    seq_len: int | None = Field(None, gt=0, description="sbert: observations per pixel (256)")
    device: str = "auto"
    threads: int = Field(1, ge=1, description="torch CPU threads while training")
    output: str = Field(description="model file to write (<stem>.pt + card <stem>.json)")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction {self.val_fraction} + test_fraction {self.test_fraction} leave "
                "nothing to train on"
            )
        if self.init_family and not self.init_from:
            raise ValueError("init_family is set but init_from (the checkpoint) is not")
        sitsnn = self.resolved_init_family in ("sits-lstm", "sits-transformer")
        if self.init_from and sitsnn and not self.init_params:
            raise ValueError(
                f"init_from {self.init_from} is a {self.resolved_init_family} checkpoint: set "
                "init_params to its SITS-NN *_params.json (it holds the hyper-parameters)"
            )
        if self.start_date and self.end_date and self.start_date > self.end_date:
            raise ValueError(f"start_date {self.start_date} is after end_date {self.end_date}")
        return self

    @property
    def resolved_init_family(self) -> str | None:
        """``init_family``; else ``native`` with a card beside ``init_from``; else ``family``."""
        if not self.init_from:
            return None
        if self.init_family:
            return self.init_family
        fs, path = storage.get_fs(card_path(self.init_from))
        return "native" if fs.exists(path) else self.family


def _format_errors(exc: ValidationError, model: type, sources: str) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "config"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            lines.append(
                f"unknown setting {loc!r} (from {sources}); valid settings are: "
                + ", ".join(sorted(model.model_fields))
            )
        elif err["type"] == "missing":
            lines.append(
                f"setting {loc!r} is required (key {loc} in YAML or --{loc.replace('_', '-')})"
            )
        else:
            lines.append(f"setting {loc!r}: {msg}")
    return "; ".join(lines)


def _load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; check --config")
    try:
        loaded = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {p} must be a mapping of settings")
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def load_train_config(
    path: str | Path | None = None, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """A :class:`TrainConfig` from a YAML file and overrides (flags); unknown keys are rejected."""
    values = _load_yaml(path) if path is not None else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    sources = " + ".join(s for s, on in ((str(path), path), ("command line", overrides)) if on)
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, TrainConfig, sources or "arguments")) from None


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


# --------------------------------------------------------------------------------------- metrics
def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]
) -> dict:
    """Overall accuracy, Cohen's kappa, per-class precision / recall / F1 / support and the
    confusion matrix (rows: reference, columns: predicted) of integer labels.

    Precision (recall) of a class never predicted (never in the reference) is 0; macro F1
    averages the classes that occur in the reference or the predictions.
    """
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    c = len(class_names)
    if t.shape != p.shape:
        raise ValueError(f"y_true {t.shape} and y_pred {p.shape} differ in shape")
    if t.size and (min(t.min(), p.min()) < 0 or max(t.max(), p.max()) >= c):
        raise ValueError(f"labels must lie in 0..{c - 1}")
    cm = np.bincount(t * c + p, minlength=c * c).reshape(c, c)
    n = int(cm.sum())
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros(c), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(c), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(c), where=denom > 0)
    present = (support + predicted) > 0
    po = tp.sum() / n if n else float("nan")
    pe = float((support * predicted).sum()) / n**2 if n else float("nan")
    return {
        "n": n,
        "class_names": list(class_names),
        "overall_accuracy": float(po),
        "kappa": float((po - pe) / (1 - pe)) if n and pe < 1 else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "weighted_f1": float((f1 * support).sum() / n) if n else float("nan"),
        "per_class": {
            name: {
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
            }
            for k, name in enumerate(class_names)
        },
        "confusion_matrix": cm.tolist(),
    }


def confusion_table(metrics: dict) -> str:
    """The confusion matrix (rows: reference, columns: predicted) and per-class scores as text."""
    names = metrics["class_names"]
    cm = metrics["confusion_matrix"]
    w = max(8, *(len(n) for n in names)) + 1
    head = "reference \\ predicted".ljust(w + 2)
    lines = [head + "".join(n[:w].rjust(w) for n in names) + "  precision  recall     f1  support"]
    for k, name in enumerate(names):
        pc = metrics["per_class"][name]
        lines.append(
            name[: w + 1].ljust(w + 2)
            + "".join(str(v).rjust(w) for v in cm[k])
            + f"  {pc['precision']:9.3f} {pc['recall']:7.3f} {pc['f1']:6.3f} {pc['support']:8d}"
        )
    lines.append(
        f"overall accuracy {metrics['overall_accuracy']:.4f}  kappa {metrics['kappa']:.4f}  "
        f"macro F1 {metrics['macro_f1']:.4f}  n {metrics['n']}"
    )
    return "\n".join(lines)


def plot_confusion(metrics: dict, title: str = "confusion matrix") -> Figure:
    """The confusion matrix as a matplotlib figure (Agg, no pyplot state); counts in the cells,
    colours by row share (recall)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = metrics["class_names"]
    cm = np.asarray(metrics["confusion_matrix"], dtype=float)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = 2.0 + 0.6 * len(names)
    fig = Figure(figsize=(size + 1.5, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                str(int(cm[i, j])),
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.5 else "black",
            )
    ax.set_title(f"{title}\noverall accuracy {metrics['overall_accuracy']:.3f} (n={metrics['n']})")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of reference class")
    fig.tight_layout()
    return fig


def write_report(metrics: dict, prefix: str) -> dict[str, str]:
    """Write ``<prefix>_metrics.json``, ``_confusion.csv`` (the table) and ``_confusion.png``."""
    prefix = str(prefix)
    fs, path = storage.get_fs(prefix)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    out = {k: f"{prefix}_{k}" for k in ("metrics.json", "confusion.csv", "confusion.png")}
    with fs.open(f"{path}_metrics.json", "wt") as fh:
        json.dump(metrics, fh, indent=2)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    names = metrics["class_names"]
    w.writerow(["reference \\ predicted", *names, "precision", "recall", "f1", "support"])
    for k, name in enumerate(names):
        pc = metrics["per_class"][name]
        w.writerow(
            [
                name,
                *metrics["confusion_matrix"][k],
                f"{pc['precision']:.6f}",
                f"{pc['recall']:.6f}",
                f"{pc['f1']:.6f}",
                pc["support"],
            ]
        )
    with fs.open(f"{path}_confusion.csv", "wt") as fh:
        fh.write(buf.getvalue())
    fig = plot_confusion(metrics, title=storage.basename(prefix))
    png = io.BytesIO()
    fig.savefig(png, format="png")
    with fs.open(f"{path}_confusion.png", "wb") as fh:
        fh.write(png.getvalue())
    return {
        "metrics": out["metrics.json"],
        "table": out["confusion.csv"],
        "png": out["confusion.png"],
    }


# --------------------------------------------------------------------------------------- evaluate
def _as_predictor(model: Any, device: str = "cpu") -> Predictor:
    from .models import load_model
    from .models.loading import Predictor

    if isinstance(model, Predictor):
        return model
    spec = model if isinstance(model, ModelSpec) else ModelSpec(str(model), "native")
    return load_model(spec, device=device)


def evaluate(model: Any, samples: SampleSet, batch_size: int = 2048) -> dict:
    """Metrics of ``model`` (a :class:`Predictor`, a :class:`ModelSpec` or a native ``.pt`` path)
    on ``samples``: see :func:`classification_metrics`.  Labels are matched to the model's classes
    by name; samples without a valid observation are left out."""
    predictor = _as_predictor(model)
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
    from .models import load_model

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
    from .models import save_native
    from .models.training import fit, stratified_split

    t0 = dt.datetime.now(dt.UTC)
    init = _load_init(config)
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
    names = list(samples.class_names)
    counts = np.bincount(samples.labels, minlength=len(names))
    log.info(
        "training a %s on %d samples: %s",
        config.family,
        len(samples),
        ", ".join(f"{n} {c}" for n, c in zip(names, counts, strict=True)),
    )

    if config.test_fraction > 0:
        rest, test_idx = stratified_split(samples.labels, config.test_fraction, config.seed)
    else:
        rest, test_idx = np.arange(len(samples)), np.zeros(0, np.int64)
    pool = samples.subset(rest)
    train_idx, val_idx = stratified_split(pool.labels, config.val_fraction, config.seed + 1)
    predictor, fit_metrics = fit(
        config.family,
        pool.series,
        pool.valid,
        pool.days,
        pool.labels,
        names,
        hyperparameters=config.hyperparameters or None,
        max_seconds=config.max_seconds,
        seed=config.seed,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        patience=config.patience,
        max_epochs=config.max_epochs,
        init=init,
        class_weights=_class_weights(config, names),
        callback=callback,
        device=config.device,
        split=(train_idx, val_idx),
        seq_len=config.seq_len,
        threads=config.threads,
    )
    metrics = dict(fit_metrics)
    metrics["class_names"] = names
    metrics["validation"] = evaluate(predictor, pool.subset(val_idx))
    if len(test_idx):
        metrics["test"] = evaluate(predictor, samples.subset(test_idx))
    metrics["preprocessing"] = {
        "bands": list(S2_BANDS),
        "input": "raw BOA int16 (reflectance x 10000) in ascending date order; invalid "
        "observations (nodata or QAI-screened) "
        + (
            "dropped; latest seq_len kept, z-scored per pixel and band"
            if config.family == "sbert"
            else "set to 0 in all bands"
        ),
        "sequence": predictor.card.sequence,
        "qai": list(config.qai_flags),
        "sensors": list(config.sensors),
        "start_date": str(config.start_date) if config.start_date else None,
        "end_date": str(config.end_date) if config.end_date else None,
        "time_steps": len(samples.days),
        "first_date": str(samples.dates[0]) if len(samples.days) else None,
        "last_date": str(samples.dates[-1]) if len(samples.days) else None,
    }
    metrics["training"] = {
        "samples": config.samples,
        "n_samples": len(samples),
        "class_counts": {n: int(c) for n, c in zip(names, counts, strict=True)},
        "tiles": sorted({t for t in samples.tiles if t}),
        "init_from": config.init_from,
        "init_family": config.resolved_init_family,
        **{
            k: getattr(config, k)
            for k in (
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
        },
        "started": t0.isoformat(timespec="seconds"),
        "treesits_dask_version": __version__,
    }
    predictor.card = predictor.card.model_copy(update={"metrics": metrics})
    pt, _ = save_native(predictor.module, predictor.card, config.output)
    stem = _stem(pt)
    write_report(metrics["validation"], stem + "_validation")
    if "test" in metrics:
        write_report(metrics["test"], stem + "_test")
    log.info(
        "model written to %s (validation overall accuracy %.4f)",
        pt,
        metrics["validation"]["overall_accuracy"],
    )
    return predictor, metrics


def _stem(url: str) -> str:
    """``dir/model.pt`` -> ``dir/model`` (:func:`save_native` writes ``.pt`` and ``.json``)."""
    base = storage.basename(url)
    return url[: len(url) - len(base)] + (base.rsplit(".", 1)[0] if "." in base else base)


# --------------------------------------------------------------------------------------- CLI
_SAMPLE_FLAGS = [
    ("--samples", {"help": "points (.gpkg, .geojson, .csv) or a folder of per-sample CSVs"}),
    ("--cube", {"help": "FORCE Level-2 datacube root (for points)"}),
    ("--label-column", {"help": "label column (integer class index or class name; default label)"}),
    ("--id-column", {"help": "sample id column (default: id, else the row)"}),
    ("--x-column", {"help": "CSV x column (default x; lon/lat are recognised)"}),
    ("--y-column", {"help": "CSV y column (default y)"}),
    ("--crs", {"help": "CRS of the points where the file names none, e.g. EPSG:4326"}),
    ("--layer", {"help": "GeoPackage layer (default: the only one)"}),
    ("--qai", {"help": "QAI screening: default, none, or a comma list of flags"}),
    ("--sensors", {"help": "comma-separated FORCE sensors (default SEN2A,SEN2B,SEN2C)"}),
    ("--start-date", {"help": "first scene date YYYY-MM-DD"}),
    ("--end-date", {"help": "last scene date YYYY-MM-DD"}),
]
_TRAIN_FLAGS = [
    ("--output", {"help": "model file to write (<stem>.pt + <stem>.json card)"}),
    ("--family", {"choices": ["sits-lstm", "sits-transformer", "sbert"], "help": "architecture"}),
    ("--init-from", {"help": "checkpoint to fine-tune"}),
    ("--init-family", {"choices": ["sits-lstm", "sits-transformer", "sbert", "native"]}),
    ("--init-params", {"help": "SITS-NN *_params.json of --init-from"}),
    ("--max-seconds", {"type": float, "help": "training time limit (default 120)"}),
    ("--max-epochs", {"type": int, "help": "epoch limit (default 200)"}),
    ("--seed", {"type": int, "help": "random seed (default 0)"}),
    ("--device", {"help": "torch device: auto (default), cpu, cuda, cuda:N"}),
]


def _flag_values(args: argparse.Namespace, flags) -> dict:
    out = {}
    for flag, _ in flags:
        key = flag[2:].replace("-", "_")
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    return out


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``train`` (the CLI's subparser and :func:`main_train`)."""
    p.add_argument("--config", help="train.yaml with the settings; flags override it")
    for flag, kw in _SAMPLE_FLAGS + _TRAIN_FLAGS:
        p.add_argument(flag, **kw)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``evaluate``."""
    p.add_argument(
        "--model", required=True, help="model: native .pt (card beside it) or a checkpoint"
    )
    p.add_argument(
        "--model-family",
        default="native",
        choices=["native", "sbert", "sits-lstm", "sits-transformer"],
    )
    p.add_argument("--model-params", help="SITS-NN *_params.json (sits-lstm, sits-transformer)")
    p.add_argument(
        "--config",
        help="YAML with the sample settings (e.g. the train.yaml); "
        "training keys are ignored, flags override it",
    )
    for flag, kw in _SAMPLE_FLAGS:
        p.add_argument(flag, **kw)
    p.add_argument("--report", help="write <REPORT>_metrics.json, _confusion.csv, _confusion.png")


class _EpochBar:
    """tqdm bar over epochs for the CLI."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="epoch", desc="train", file=sys.stderr)

    def __call__(self, info: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{info['loss']:.3f}",
            val_acc=f"{info['val_accuracy']:.3f}",
            best=f"{info['best_val_accuracy']:.3f}",
        )

    def close(self) -> None:
        self.bar.close()


def run_train(args: argparse.Namespace) -> int:
    """``train`` from parsed arguments (raises :class:`TreesitsError` on bad input)."""
    config = load_train_config(args.config, _flag_values(args, _SAMPLE_FLAGS + _TRAIN_FLAGS))
    bar = None if args.no_progress else _EpochBar(config.max_epochs)
    try:
        _, metrics = train(config, callback=bar)
    finally:
        if bar is not None:
            bar.close()
    stem = _stem(config.output)
    print(confusion_table(metrics["validation"]))
    if "test" in metrics:
        print(
            f"test split: overall accuracy {metrics['test']['overall_accuracy']:.4f} "
            f"(n={metrics['test']['n']})"
        )
    print(
        f"validation overall accuracy {metrics['validation']['overall_accuracy']:.4f} after "
        f"{metrics['epochs']} epochs ({metrics['seconds']} s, stopped: {metrics['stopped']}); "
        f"model {stem}.pt, card {stem}.json, confusion matrix {stem}_validation_confusion.png"
    )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """``evaluate`` from parsed arguments."""
    values = _load_yaml(args.config) if args.config else {}
    values = {k: v for k, v in values.items() if k in SampleSettings.model_fields}
    values.update(_flag_values(args, _SAMPLE_FLAGS))
    try:
        settings = SampleSettings(**values)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, SampleSettings, "evaluate arguments")) from None
    spec = ModelSpec(args.model, args.model_family, args.model_params)
    predictor = _as_predictor(spec)
    card = predictor.card
    class_names = settings.class_names or model_classes(card)
    samples = load_samples(settings, class_names=class_names, card=card)
    metrics = evaluate(predictor, samples)
    print(confusion_table(metrics))
    if args.report:
        files = write_report(metrics, args.report)
        print("report: " + ", ".join(files.values()))
    return 0


def _main(run: Callable[[argparse.Namespace], int], add, prog: str, argv) -> int:
    parser = argparse.ArgumentParser(prog=prog)
    add(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except TreesitsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def main_train(argv: Sequence[str] | None = None) -> int:
    """``python -m treesits_dask train --config train.yaml [flags]``."""
    return _main(run_train, add_train_arguments, "python -m treesits_dask train", argv)


def main_evaluate(argv: Sequence[str] | None = None) -> int:
    """``python -m treesits_dask evaluate --model model.pt --samples points.gpkg [flags]``."""
    return _main(run_evaluate, add_evaluate_arguments, "python -m treesits_dask evaluate", argv)
