"""``train`` and ``evaluate``: flags and commands."""

from __future__ import annotations

import argparse

__all__ = [
    "add_evaluate_arguments", "add_sample_arguments", "add_train_arguments", "cmd_evaluate",
    "cmd_sample", "cmd_train",
]  # fmt: skip

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
        "--model", help="model: native .pt (card beside it) or a checkpoint (not with --area)"
    )
    p.add_argument(
        "--area",
        action="store_true",
        help="area estimates of a map (--map) from reference samples of a stratified random "
        "sample (Olofsson et al. 2014): mapped and adjusted area with 95%% CI, user's and "
        "producer's accuracies with standard errors",
    )
    p.add_argument("--map", help="with --area: the output folder of the map")
    p.add_argument(
        "--map-layer",
        default="class",
        help="with --area: the map layer whose classes are the strata: class (default), "
        "class_smoothed, probability / probability_smoothed (binary maps, >= 0.5), alert_state",
    )
    p.add_argument("--as-of", help="with --area: a version of the map (default the latest)")
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
    if args.area:
        return _cmd_area(args)
    if not args.model:
        from ..errors import ConfigError

        raise ConfigError("evaluate needs --model (or --area with --map to estimate areas)")
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


def _cmd_area(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..training.area import area_from_map, write_area_report

    if not args.map or not args.samples:
        raise ConfigError("evaluate --area needs --map (an output folder) and --samples")
    estimate = area_from_map(
        args.map, args.samples, args.map_layer, args.label_column or "label", args.crs, args.as_of
    )
    print(estimate.table())
    if args.report:
        files = write_area_report(estimate, args.report)
        print("report: " + ", ".join(files.values()))
    return 0


def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``sample``."""
    p.add_argument("map", help="the output folder of the map")
    p.add_argument("--output", required=True, help="points to write (.gpkg, .geojson or .csv)")
    p.add_argument("--map-layer", default="class", help="layer whose classes are the strata")
    p.add_argument("--per-class", type=int, help="the same number of points in every class")
    p.add_argument(
        "--expected-accuracy",
        help="expected user's accuracy: one value or NAME=VALUE,... (with --target-se)",
    )
    p.add_argument(
        "--target-se", type=float, help="target standard error of each class's user's accuracy"
    )
    p.add_argument("--minimum", type=int, default=0, help="at least this many points per class")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--as-of", help="a version of the map (default the latest)")


def cmd_sample(args: argparse.Namespace) -> int:
    """``sample``: a stratified random sample of a map for a field campaign."""
    from ..errors import ConfigError
    from ..training.area import campaign_sample, map_classes, sample_sizes

    if args.per_class is not None:
        sizes = args.per_class
    elif args.expected_accuracy and args.target_se:
        _, names, _ = map_classes(args.map, args.map_layer, args.as_of)
        if "=" in args.expected_accuracy:
            expected = {k.strip(): float(v) for k, v in
                        (kv.split("=", 1) for kv in args.expected_accuracy.split(","))}  # fmt: skip
        else:
            expected = dict.fromkeys(names, float(args.expected_accuracy))
        unknown = sorted(set(expected) - set(names))
        if unknown:
            raise ConfigError(f"classes {unknown} are not in the map ({', '.join(names)})")
        sizes = sample_sizes(expected, args.target_se, args.minimum)
        print("points per class: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    else:
        raise ConfigError("sample needs --per-class N, or --expected-accuracy and --target-se")
    url = campaign_sample(args.map, args.output, sizes, args.map_layer, args.seed, args.as_of)
    print(f"wrote {url} (map class in column map_class; add the reference class as label)")
    return 0
