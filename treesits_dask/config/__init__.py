"""One typed, layered configuration for every command.

* :class:`InputSettings` (:mod:`.inputs`): cube, sensors, dates, QAI screening, window: shared
  by run, update, plan, train and evaluate, validated once.
* :class:`RunConfig` (:mod:`.run`): run / update / plan, with the Kubernetes deployment
  (:class:`KubeSettings`, :mod:`.kubernetes` and :mod:`.kube_resources`) and the products made
  from the probabilities (:class:`SmoothingSettings`, :class:`AlertSettings`,
  :mod:`.postprocess`).
* :class:`SampleSettings`, :class:`TrainConfig` (:mod:`.training`): evaluate and train.
* :mod:`.loading`: YAML + ``TREESITS_*`` environment + flags -> a settings object, with errors
  that name the setting.
"""

from .inputs import DEFAULT_QAI_FLAGS, QAI_ALIASES, QAI_FLAGS, InputSettings, parse_window
from .kubernetes import KubeSettings
from .loading import (
    ENV_PREFIX,
    format_errors,
    load_config,
    load_sample_settings,
    load_settings,
    load_train_config,
    read_yaml,
)
from .postprocess import AlertSettings, SmoothingSettings
from .run import RunConfig
from .training import SampleSettings, TrainConfig

__all__ = [
    "AlertSettings",
    "DEFAULT_QAI_FLAGS",
    "ENV_PREFIX",
    "QAI_ALIASES",
    "QAI_FLAGS",
    "InputSettings",
    "KubeSettings",
    "RunConfig",
    "SampleSettings",
    "SmoothingSettings",
    "TrainConfig",
    "format_errors",
    "load_config",
    "load_sample_settings",
    "load_settings",
    "load_train_config",
    "parse_window",
    "read_yaml",
]
