"""Model descriptors that import without torch: :class:`ModelSpec`, :class:`ModelCard`, cards of
published checkpoints (SITS-NN params files, the SBERT hyper-parameters) and the time window each
family reads.  Planning code imports this on machines without torch.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from ..errors import ModelError
from ..io import storage
from ..io.discovery import S2_BANDS

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "SBERT_HYPERPARAMETERS",
    "SBERT_SEQUENCE",
    "SITSNN_CLASSES",
    "ModelCard",
    "ModelSpec",
    "card_path",
    "effective_window",
    "read_card",
    "read_params",
]

log = logging.getLogger(__name__)

#: Values of ``--model-family``: the three published formats and the native ``.pt`` + ``.json``
#: card.
FAMILIES = ("sbert", "sits-lstm", "sits-transformer", "native")
#: Architectures a model card can name.
ARCHITECTURES = ("sbert", "sits-lstm", "sits-transformer")
#: Class order of the published SITS-NN 5-class models.
SITSNN_CLASSES = ("Spruce", "Beech", "Pine", "Douglas fir", "Oak")
#: Input window of the published SBERT model (REFERENCE 3a).
SBERT_SEQUENCE = {"kind": "sbert", "seq_len": 256, "window_days": 1460, "max_position": 1826}
#: Hyper-parameters of the published SBERT model (keyword arguments of ``SBERTClassifier``).
SBERT_HYPERPARAMETERS = {
    "num_features": 10,
    "hidden": 128,
    "n_layers": 3,
    "attn_heads": 8,
    "dropout": 0.3,
    "num_classes": 1,
    "max_position": 1826,
}

_PARAM_SECTIONS = {
    "sits-lstm": "lstm hyperparameters",
    "sits-transformer": "transformer hyperparameters",
}


@dataclass(frozen=True)
class ModelSpec:
    """Where a model is and how to read it; small, hashable and picklable (shipped in task
    graphs)."""

    uri: str
    family: str
    params_uri: str | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelError(
                f"unknown model family {self.family!r} for {self.uri}; --model-family must be one "
                "of " + ", ".join(FAMILIES)
            )
        object.__setattr__(self, "uri", str(self.uri))
        if self.params_uri is not None:
            object.__setattr__(self, "params_uri", str(self.params_uri))


class ModelCard(BaseModel):
    """Everything needed to rebuild a model and interpret its input and output."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = 1
    family: str
    hyperparameters: dict[str, Any]
    bands: list[str]
    class_names: list[str]
    output_kind: str
    sequence: dict[str, Any]
    metrics: dict[str, Any] | None = None

    @property
    def streams(self) -> bool:
        """Whether the model can run over a series in parts, carrying a state from one part to
        the next (:meth:`~treesits_dask.models.loading.Predictor.stream_step`): a one-way SITS-NN
        LSTM, whose input at a step is that observation alone (raw, invalid ones 0), from a zero
        state, and whose output is its state after the last step; SBERT, which sees the newest
        ``seq_len`` valid observations of a pixel and nothing else, so that its state is those
        (:func:`~treesits_dask.models.preprocess.sbert_keep`).  The Transformer sees every
        observation at once."""
        if self.sequence.get("kind") == "sbert":
            return True
        return self.family == "sits-lstm" and not self.hyperparameters.get("bidirectional", False)

    @property
    def stream_auto(self) -> str:
        """What ``stream: auto`` means for this model (see
        :func:`~treesits_dask.io.bands.plan_reads`): ``auto`` for the LSTM (streamed wherever a
        tile's bands of all scenes are not held in memory: the published one's state is 1 KB
        per pixel, what a band of 52 scenes holds), ``fallback`` for SBERT (streamed only where
        the tile would otherwise decode blocks more than once: its state of 256 observations is
        6 KB per pixel, what a band of 308 scenes holds)."""
        return "fallback" if self.sequence.get("kind") == "sbert" else "auto"

    @property
    def stream_state_bytes(self) -> int:
        """Bytes a streamed pixel's state holds between batches (0 where the model does not
        stream), with 25 bytes of the pixel's index, valid observations, newest valid day and
        whether the newest scene is valid (see
        :func:`~treesits_dask.pipeline.streaming.stream_step`): the LSTM's ``h`` and ``c`` of
        each layer as float32; SBERT's ``seq_len`` observations of 10 int16 bands and an int32
        day, and its count of valid observations."""
        if not self.streams:
            return 0
        hp = self.hyperparameters
        if self.sequence.get("kind") == "sbert":
            return int(self.sequence["seq_len"]) * (len(self.bands) * 2 + 4) + 8 + 25
        return 2 * int(hp.get("num_layers", 1)) * int(hp.get("hidden_size", 64)) * 4 + 25

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        if v not in ARCHITECTURES:
            raise ValueError(f"family must be one of {', '.join(ARCHITECTURES)}, got {v!r}")
        return v

    @field_validator("bands")
    @classmethod
    def _bands(cls, v: list[str]) -> list[str]:
        if tuple(v) != S2_BANDS:
            raise ValueError(
                f"the model reads {len(v)} bands {v}; only the 10 Sentinel-2 bands in FORCE order "
                f"{list(S2_BANDS)} are supported"
            )
        return v

    @field_validator("output_kind")
    @classmethod
    def _output_kind(cls, v: str) -> str:
        if v not in ("softmax", "sigmoid"):
            raise ValueError(f"output_kind must be 'softmax' or 'sigmoid', got {v!r}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if not self.class_names:
            raise ValueError("class_names is empty")
        if self.output_kind == "sigmoid" and len(self.class_names) != 1:
            raise ValueError("a sigmoid (binary) model has exactly one class name")
        for key in ("num_bands", "num_features"):
            if key in self.hyperparameters and self.hyperparameters[key] != len(self.bands):
                raise ValueError(
                    f"hyperparameters.{key} is {self.hyperparameters[key]} but the model reads "
                    f"{len(self.bands)} bands"
                )
        if self.family.startswith("sits-") and self.output_kind != "softmax":
            raise ValueError(
                f"{self.family} models end in a softmax: output_kind must be 'softmax'"
            )
        kind = self.sequence.get("kind")
        if kind not in ("sbert", "full"):
            raise ValueError(f"sequence.kind must be 'sbert' or 'full', got {kind!r}")
        if kind == "sbert":
            missing = [
                k for k in ("seq_len", "window_days", "max_position") if k not in self.sequence
            ]
            if missing:
                raise ValueError(f"sequence of kind 'sbert' lacks {', '.join(missing)}")
        return self

    @property
    def n_classes(self) -> int:
        """Number of model outputs (1 for a binary sigmoid model)."""
        return len(self.class_names)

    @property
    def multiclass(self) -> bool:
        return self.output_kind == "softmax"


def card_path(uri: str) -> str:
    """The card of a native checkpoint: ``<stem>.json`` beside ``<stem>.pt``."""
    uri = str(uri)
    base = storage.basename(uri)
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return uri[: len(uri) - len(base)] + stem + ".json"


def _read_json(uri: str, what: str) -> dict:
    fs, path = storage.get_fs(uri)
    try:
        with fs.open(path, "rt") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        raise ModelError(f"{what} {uri} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{what} {uri} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{what} {uri} must hold a JSON object, got {type(data).__name__}")
    return data


def _require_file(uri: str, what: str, hint: str) -> None:
    fs, path = storage.get_fs(uri)
    try:
        ok = fs.isfile(path)
    except OSError as exc:
        raise ModelError(f"{what} {uri} cannot be accessed: {exc}") from exc
    if not ok:
        raise ModelError(f"{what} {uri} does not exist or is not a file; {hint}")


def _class_names(n: int) -> list[str]:
    return list(SITSNN_CLASSES) if n == len(SITSNN_CLASSES) else [f"class_{i}" for i in range(n)]


def read_params(spec: ModelSpec) -> dict[str, Any]:
    """Constructor keyword arguments of a SITS-NN model from its ``*_params.json``."""
    if spec.params_uri is None:
        raise ModelError(
            f"model family {spec.family} needs the SITS-NN *_params.json that belongs to "
            f"{spec.uri} "
            "(it holds the hyper-parameters): pass --model-params"
        )
    raw = _read_json(spec.params_uri, "SITS-NN params file")
    section = _PARAM_SECTIONS[spec.family]
    if section not in raw:
        other = [s for s in _PARAM_SECTIONS.values() if s in raw]
        raise ModelError(
            f"params file {spec.params_uri} has no {section!r} section"
            + (f" (it has {other[0]!r}: check --model-family)" if other else "")
        )
    hp = raw[section]

    def get(key: str) -> int:
        if key not in hp:
            raise ModelError(f"params file {spec.params_uri}: {section!r} lacks {key!r}")
        try:
            return int(hp[key])
        except (TypeError, ValueError):
            raise ModelError(
                f"params file {spec.params_uri}: {section}.{key} must be an integer, got "
                f"{hp[key]!r}"
            ) from None

    bands = get("number of bands")
    if bands != len(S2_BANDS):
        raise ModelError(
            f"params file {spec.params_uri}: the model reads {bands} bands, but Sentinel-2 BOA "
            f"inputs have {len(S2_BANDS)} ({', '.join(S2_BANDS)}); use a model trained on 10 bands"
        )
    if spec.family == "sits-lstm":
        return {
            "num_bands": bands,
            "input_size": get("embedding size"),
            "hidden_size": get("hidden size"),
            "num_layers": get("number of layers"),
            "num_classes": get("number of classes"),
            "bidirectional": bool(hp.get("bidirectional", False)),
        }
    return {
        "num_bands": bands,
        "num_classes": get("number of classes"),
        "d_model": get("embedding size"),
        "nhead": get("number of heads"),
        "num_layers": get("number of layers"),
        "dim_feedforward": get("feedforward dimension"),
    }


def _sbert_card(spec: ModelSpec) -> ModelCard:
    hp = dict(SBERT_HYPERPARAMETERS)
    if spec.params_uri is not None:
        raw = _read_json(spec.params_uri, "SBERT params file")
        flat = {
            **raw,
            **{k: v for sec in raw.values() if isinstance(sec, dict) for k, v in sec.items()},
        }
        for key in ("attn_heads", "number of heads", "heads", "nhead"):
            if key in flat:
                hp["attn_heads"] = int(flat[key])
                break
    return ModelCard(
        family="sbert",
        hyperparameters=hp,
        bands=list(S2_BANDS),
        class_names=["disturbance"],
        output_kind="sigmoid",
        sequence=dict(SBERT_SEQUENCE),
    )


def read_card(spec: ModelSpec) -> ModelCard:
    """The model card of ``spec`` without importing torch.

    Published families get a card built from the params file (SITS-NN) or the known SBERT
    hyper-parameters; native checkpoints have ``<stem>.json`` beside the ``.pt``.
    """
    _require_file(spec.uri, "model checkpoint", "check --model")
    if spec.family == "sbert":
        return _sbert_card(spec)
    if spec.family in _PARAM_SECTIONS:
        hp = read_params(spec)
        return ModelCard(
            family=spec.family,
            hyperparameters=hp,
            bands=list(S2_BANDS),
            class_names=_class_names(hp["num_classes"]),
            output_kind="softmax",
            sequence={"kind": "full"},
        )
    path = card_path(spec.uri)
    raw = _read_json(path, "model card")
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in exc.errors()
        )
        raise ModelError(f"model card {path} (of {spec.uri}) is invalid: {problems}") from None
    if card.format_version != 1:
        raise ModelError(
            f"model card {path} has format_version {card.format_version}; this version reads 1"
        )
    return card


def effective_window(
    card: ModelCard,
    scene_dates: Sequence[dt.date],
    start: dt.date | None = None,
    end: dt.date | None = None,
) -> tuple[dt.date, dt.date]:
    """The inclusive date window a model reads from a tile with these scene dates.

    sbert: ``end`` (or the newest scene) back ``window_days`` days; a given ``start`` can only
    shorten it.  sits-*: ``start``/``end`` as given, defaulting to the oldest/newest scene.
    """
    dates = sorted(scene_dates)
    if card.sequence.get("kind") == "sbert":
        if end is None:
            if not dates:
                raise ModelError("no scenes to derive the SBERT window end from; set --end-date")
            end = dates[-1]
        earliest = end - dt.timedelta(days=int(card.sequence["window_days"]))
        start = earliest if start is None else max(start, earliest)
    else:
        if start is None or end is None:
            if not dates:
                raise ModelError(
                    "no scenes to derive the window from; set --start-date and --end-date"
                )
            start = dates[0] if start is None else start
            end = dates[-1] if end is None else end
    if start > end:
        raise ModelError(
            f"the window start {start} is after its end {end}; check --start-date/--end-date"
        )
    return start, end
