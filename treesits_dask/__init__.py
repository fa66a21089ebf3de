"""treesits_dask: tree-species and forest-disturbance maps from FORCE Sentinel-2 datacubes with
PyTorch on Dask.

The public API (imported on first use, so ``import treesits_dask`` stays light)::

    from treesits_dask import load_config, plan, run, update, open_map
    config = load_config("run.yaml")        # or load_config(overrides={...})
    plan(config).summary()                  # what a run would do (no cluster)
    result = run(config)                    # LocalCluster, existing scheduler or Kubernetes
    ds = open_map(config.output)            # the map as an xarray Dataset

* settings: :func:`load_config`, :class:`RunConfig`, :func:`load_train_config`,
  :class:`TrainConfig`, :class:`SampleSettings`
* data: :func:`open_cube` (a tile as a lazy DataArray), :func:`make_cube` (a synthetic cube),
  :func:`build_masks` (forest masks from ESA WorldCover)
* maps: :func:`plan`, :func:`run`, :func:`update`, :class:`RunResult`, :class:`RunCallbacks`,
  :func:`connect` (the run's cluster), :func:`open_map` (also as it was: ``as_of``),
  :func:`versions`, :func:`changes`, :func:`quicklook`, :func:`write_stac`,
  :func:`class_colors` / :data:`NOT_PREDICTED_COLOR` (the colours of the quicklooks)
* models: :func:`load_model`, :func:`train`, :func:`evaluate`, :func:`load_samples`,
  :func:`read_points` / :func:`write_points` (reference points), :func:`confusion_table`,
  :func:`plot_confusion`, :func:`write_report` (accuracy reports)
* Kubernetes: the :mod:`treesits_dask.kube` package (``kube.render(config.kubernetes, dir)``)
* errors: :class:`TreesitsError` (every input error; :mod:`treesits_dask.errors` has the tree)
"""

from importlib import import_module
from typing import Any

from .version import __version__

#: public name -> module that defines it
_EXPORTS = {
    "load_config": "config",
    "load_train_config": "config",
    "RunConfig": "config",
    "TrainConfig": "config",
    "SampleSettings": "config",
    "open_cube": "api",
    "open_map": "api",
    "versions": "api",
    "changes": "api",
    "export_map": "api",
    "plan": "api",
    "make_cube": "synthetic",
    "build_masks": "io.worldcover",
    "run": "pipeline.run",
    "update": "pipeline.run",
    "RunResult": "pipeline.report",
    "RunCallbacks": "pipeline.run",
    "connect": "pipeline.cluster",
    "quicklook": "outputs.quicklook",
    "write_stac": "outputs.stac",
    "load_model": "models",
    "train": "training.train",
    "evaluate": "training.train",
    "load_samples": "training.extract",
    "read_points": "training.points",
    "write_points": "training.points",
    "confusion_table": "training.metrics",
    "plot_confusion": "training.metrics",
    "write_report": "training.metrics",
    "class_colors": "outputs.quicklook",
    "NOT_PREDICTED_COLOR": "outputs.quicklook",
    "TreesitsError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'treesits_dask' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
