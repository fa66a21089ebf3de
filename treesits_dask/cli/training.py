"""``train`` and ``evaluate``: flags and commands."""

from __future__ import annotations

import argparse

__all__ = ["add_evaluate_arguments", "add_train_arguments", "cmd_evaluate", "cmd_train"]

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
    """The options of ``train``."""
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


def cmd_train(args: argparse.Namespace) -> int:
    """``train`` from parsed arguments (raises :class:`TreesitsError` on bad input)."""
    from .. import train
    from ..config import load_train_config
    from ..progress import EpochBar
    from ..training.metrics import confusion_table
    from ..training.train import stem

    config = load_train_config(args.config, _flag_values(args, _SAMPLE_FLAGS + _TRAIN_FLAGS))
    bar = None if args.no_progress else EpochBar(config.max_epochs)
    try:
        _, metrics = train(config, callback=bar)
    finally:
        if bar is not None:
            bar.close()
    out = stem(config.output)
    print(confusion_table(metrics["validation"]))
    if "test" in metrics:
        print(
            f"test split: overall accuracy {metrics['test']['overall_accuracy']:.4f} "
            f"(n={metrics['test']['n']})"
        )
    print(
        f"validation overall accuracy {metrics['validation']['overall_accuracy']:.4f} after "
        f"{metrics['epochs']} epochs ({metrics['seconds']} s, stopped: {metrics['stopped']}); "
        f"model {out}.pt, card {out}.json, confusion matrix {out}_validation_confusion.png"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``evaluate`` from parsed arguments."""
    from .. import evaluate, load_samples
    from ..config import load_sample_settings
    from ..models import ModelSpec
    from ..training.metrics import confusion_table, write_report
    from ..training.train import model_classes, predictor_of

    settings = load_sample_settings(args.config, _flag_values(args, _SAMPLE_FLAGS))
    predictor = predictor_of(ModelSpec(args.model, args.model_family, args.model_params))
    class_names = settings.class_names or model_classes(predictor.card)
    samples = load_samples(settings, class_names=class_names, card=predictor.card)
    metrics = evaluate(predictor, samples)
    print(confusion_table(metrics))
    if args.report:
        files = write_report(metrics, args.report)
        print("report: " + ", ".join(files.values()))
    return 0
