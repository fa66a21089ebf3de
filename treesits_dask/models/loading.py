"""Checkpoint loading (weights only), the batched :class:`Predictor` and native save."""

from __future__ import annotations

import io
import logging
import pickle
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from ..io import storage
from .architectures import build_module
from .card import ModelCard, ModelSpec, card_path, read_card
from .preprocess import check_inputs, full_inputs, sbert_inputs

__all__ = [
    "Predictor",
    "load_model",
    "read_state_dict",
    "resolve_device",
    "save_native",
    "visible_devices",
]

log = logging.getLogger(__name__)

#: Upper bound of attention-score elements per forward chunk (bounds memory of large batches);
#: CUDA kernels do not materialise the scores, so GPUs take larger chunks.
_ATTENTION_BUDGET = {"cpu": 64 * 2**20, "cuda": 512 * 2**20}
#: SBERT on CPU: pixels per forward call, each call trimmed to its longest sequence
_SBERT_CPU_CHUNK = 256
#: LSTM / Transformer on CPU: pixels per forward call.  A 2048-pixel LSTM call spills its 126 MB
#: gate buffer out of the caches; 512-pixel calls ran ~1.25x faster on one core (Transformer ~1.2x)
_FULL_CPU_CHUNK = 512


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            f"device {device!r} requested but CUDA is not available here; use auto or cpu"
        )
    return dev


def visible_devices(device: str = "auto") -> list[str]:
    """The devices one process spreads its forwards over: every CUDA device it sees for
    ``"auto"`` / ``"cuda"`` (a worker with ``gpus: 2`` runs one forward on each at a time), else
    the one device named (``"cuda:1"``, ``"cpu"``)."""
    if device in ("auto", "cuda") and torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(max(1, torch.cuda.device_count()))]
    return [str(resolve_device(device))]


def read_state_dict(uri: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Load a checkpoint with ``weights_only=True`` and return its (prefix-stripped) state dict.

    Accepts a plain state dict or a dict holding ``model_state_dict`` (SBERT training format).
    """
    fs, path = storage.get_fs(uri)
    try:
        with fs.open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ModelError(f"model checkpoint {uri} does not exist; check --model") from None
    except OSError as exc:
        raise ModelError(f"model checkpoint {uri} cannot be read: {exc}") from exc
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for corrupt files
        text = str(exc).strip()
        if isinstance(exc, pickle.UnpicklingError) and "weights only" in text.lower():
            first = text.splitlines()[0]
            raise ModelError(
                f"refused to load {uri}: it is not a plain state dict; only weights_only "
                "checkpoints "
                f"are accepted (torch.load(weights_only=True) said: {first[:300]})"
            ) from None
        raise ModelError(
            f"model checkpoint {uri} is unreadable ({type(exc).__name__}: {text[:300]}); "
            "it must be a file written by torch.save"
        ) from None
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(
            f"model checkpoint {uri} holds a {type(obj).__name__}, not a state dict (a mapping of "
            "parameter names to tensors, or a dict with 'model_state_dict')"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ModelError(
            f"model checkpoint {uri}: entries {bad[:5]} are not tensors; expected a state dict"
        )
    if all(str(k).startswith("module.") for k in obj):
        obj = {str(k)[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def _fit_state_dict(module: nn.Module, state: dict[str, torch.Tensor], uri: str, what: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} (model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatch", shapes),
    ):
        if items:
            more = f" and {len(items) - 4} more" if len(items) > 4 else ""
            problems.append(f"{label}: {', '.join(items[:4])}{more}")
    if problems:
        raise ModelError(
            f"model checkpoint {uri} does not fit {what}: {'; '.join(problems)}. "
            "Check --model-family and --model-params (they must belong to this checkpoint)"
        )
    module.load_state_dict(state, strict=True)


def _sbert_from_state(card: ModelCard, state: dict[str, torch.Tensor], uri: str) -> ModelCard:
    """Published SBERT: hidden size, layers, features, outputs and table size from tensor shapes."""
    hp = dict(card.hyperparameters)
    w = state.get("sbert.embedding.input.weight")
    pe = state.get("sbert.embedding.position.pe")
    head = state.get("classification.linear.weight")
    if w is None or pe is None or head is None or w.ndim != 2 or pe.ndim != 2 or head.ndim != 2:
        raise ModelError(
            f"model checkpoint {uri} is not an SBERT checkpoint (sbert.embedding.input.weight, "
            "sbert.embedding.position.pe or classification.linear.weight missing); check "
            "--model-family"
        )
    layers = {int(k.split(".")[2]) for k in state if k.startswith("sbert.transformer_blocks.")}
    hp.update(
        num_features=int(w.shape[1]),
        hidden=int(head.shape[1]),
        n_layers=len(layers),
        num_classes=int(head.shape[0]),
        max_position=int(pe.shape[0]),
    )
    if hp["num_features"] != 10:
        raise ModelError(
            f"model checkpoint {uri} reads {hp['num_features']} bands; Sentinel-2 BOA has 10"
        )
    if hp["num_classes"] != 1:
        raise ModelError(
            f"model checkpoint {uri} has {hp['num_classes']} outputs; SBERT here is binary (1)"
        )
    if hp["hidden"] % hp["attn_heads"]:
        raise ModelError(
            f"model checkpoint {uri}: hidden size {hp['hidden']} is not divisible by "
            f"{hp['attn_heads']} "
            "heads; pass --model-params with the right number of heads"
        )
    seq = dict(card.sequence, max_position=hp["max_position"])
    return card.model_copy(update={"hyperparameters": hp, "sequence": seq})


def load_model(spec: ModelSpec, device: str = "auto") -> Predictor:
    """Load ``spec`` onto ``device`` (``auto``: CUDA if available, else CPU) in eval mode."""
    dev = resolve_device(device)
    card = read_card(spec)
    state = read_state_dict(spec.uri, dev)
    if card.family == "sbert" and spec.family == "sbert":
        card = _sbert_from_state(card, state, spec.uri)
    what = f"family {card.family} with hyper-parameters {card.hyperparameters}"
    if spec.params_uri:
        what += f" from {spec.params_uri}"
    elif spec.family == "native":
        what += f" from {card_path(spec.uri)}"
    try:
        module = build_module(card.family, card.hyperparameters)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot build {what} for {spec.uri}: {exc}") from exc
    _fit_state_dict(module, state, spec.uri, what)
    module.to(dev).eval()
    return Predictor(module, card, dev)


class Predictor:
    """A loaded model in eval mode on its device, with the input preparation of its family."""

    def __init__(self, module: nn.Module, card: ModelCard, device: torch.device | str = "cpu"):
        self.module = module
        self.card = card
        self.device = torch.device(device)
        #: on CPU, a callable giving the torch threads for the next forward call (checked before
        #: every batch / chunk, from the thread that runs it); None leaves torch as it is
        self.threads = None

    def __repr__(self) -> str:
        return f"Predictor({self.card.family}, {self.card.n_classes} outputs, {self.device})"

    def predict(
        self, series: np.ndarray, valid: np.ndarray, days: np.ndarray, batch_size: int = 2048
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, n_classes) float32 and observations used (N,) of N pixels.

        ``series`` int16 (N, T, 10) raw BOA in ascending date order, ``valid`` bool (N, T),
        ``days`` int64 (T,) days since 1970-01-01.  Every pixel has at least one valid observation.
        """
        series = np.asarray(series)
        valid = np.asarray(valid, dtype=bool)
        days = np.asarray(days, dtype=np.int64)
        check_inputs(series, valid, days)
        n = series.shape[0]
        probs = np.empty((n, self.card.n_classes), dtype=np.float32)
        n_used = np.zeros(n, dtype=np.int64)
        if n == 0:
            return probs, n_used
        batch_size = max(1, int(batch_size))
        sbert = self.card.sequence["kind"] == "sbert"
        # SBERT: group pixels of similar observation counts so that padding can be trimmed
        order = np.argsort(valid.sum(axis=1), kind="stable") if sbert else None
        with torch.inference_mode():
            for lo in range(0, n, batch_size):
                idx = (
                    order[lo : lo + batch_size] if order is not None else slice(lo, lo + batch_size)
                )
                if sbert:
                    p, used = self._sbert_batch(series[idx], valid[idx], days)
                else:
                    p, used = self._full_batch(series[idx], valid[idx])
                probs[idx] = p
                n_used[idx] = used
        return probs, n_used

    def _set_threads(self) -> None:
        # torch's OpenMP and MKL thread counts are per calling thread: set them right here
        if self.threads is not None and self.device.type == "cpu":
            torch.set_num_threads(max(1, int(self.threads())))

    def _chunks(self, n: int, per_item: int, cpu_chunk: int) -> list[slice]:
        """Slices of ``n`` pixels per forward call: within the attention budget of the device,
        and on CPU at most ``cpu_chunk`` pixels (short calls cost nothing there; on GPUs they
        would)."""
        budget = _ATTENTION_BUDGET.get(self.device.type, _ATTENTION_BUDGET["cpu"])
        step = max(1, budget // max(1, per_item))
        if self.device.type == "cpu":
            step = min(step, cpu_chunk)
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def _full_batch(self, series: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, used = full_inputs(series, valid)
        xt = torch.from_numpy(x).to(self.device, non_blocking=True)
        t = x.shape[1]
        transformer = self.card.family == "sits-transformer"
        per_item = int(self.card.hyperparameters.get("nhead", 1)) * t * t if transformer else 1
        outs = []
        for s in self._chunks(len(x), per_item, _FULL_CPU_CHUNK):
            self._set_threads()
            outs.append(self.module(xt[s].transpose(0, 1) if transformer else xt[s]))
        return torch.cat(outs).float().cpu().numpy(), used

    def _sbert_batch(self, series: np.ndarray, valid: np.ndarray, days: np.ndarray):
        seq = self.card.sequence
        x, doy, mask, used = sbert_inputs(
            series, valid, days, int(seq["seq_len"]), int(seq.get("max_position", 1826))
        )
        # all padding slots of a pixel are identical rows (data 0, day 0) and masked as keys, so
        # keeping one of them in front gives the same max-pooled result as keeping all of them.
        # The pixels come sorted by observation count (see predict), so each chunk of the batch is
        # trimmed to its own longest sequence: attention cost grows with the square of the length
        heads = int(self.card.hyperparameters.get("attn_heads", 8))
        keep_all = min(x.shape[1], int(used.max()) + 1)
        outs = []
        for sl in self._chunks(len(x), heads * keep_all * keep_all, _SBERT_CPU_CHUNK):
            keep = min(x.shape[1], int(used[sl].max()) + 1)
            xt = torch.from_numpy(np.ascontiguousarray(x[sl, -keep:])).to(
                self.device, non_blocking=True
            )
            dt_ = torch.from_numpy(np.ascontiguousarray(doy[sl, -keep:])).to(
                self.device, non_blocking=True
            )
            mt = torch.from_numpy(np.ascontiguousarray(mask[sl, -keep:])).to(
                self.device, non_blocking=True
            )
            self._set_threads()
            outs.append(self.module(xt, dt_, mt))
        logits = torch.cat(outs).float()
        probs = torch.sigmoid(logits) if self.card.output_kind == "sigmoid" else logits.softmax(1)
        return probs.cpu().numpy(), used


def save_native(module: nn.Module, card: ModelCard, path: str) -> tuple[str, str]:
    """Write ``<stem>.pt`` (plain state dict) and ``<stem>.json`` (the card); returns both URLs.

    Load it again with ``load_model(ModelSpec(<stem>.pt, "native"))``.
    """
    path = str(path)
    base = storage.basename(path)
    stem_uri = path[: len(path) - len(base)] + (base.rsplit(".", 1)[0] if "." in base else base)
    pt_uri, json_uri = stem_uri + ".pt", stem_uri + ".json"
    expected = build_module(card.family, card.hyperparameters).state_dict()
    state = {k: v.detach().to("cpu").clone() for k, v in module.state_dict().items()}
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise ModelError(
            f"cannot save {pt_uri}: the module's tensors do not match a {card.family} built from "
            "the "
            f"card's hyper-parameters {card.hyperparameters}"
        )
    fs, pt_path = storage.get_fs(pt_uri)
    parent = pt_path.rsplit("/", 1)[0] if "/" in pt_path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    with fs.open(pt_path, "wb") as fh:
        fh.write(buf.getvalue())
    jfs, json_path = storage.get_fs(json_uri)
    with jfs.open(json_path, "wt") as fh:
        fh.write(card.model_dump_json(indent=2))
    log.info("saved native %s model to %s (+ %s)", card.family, pt_uri, storage.basename(json_uri))
    return pt_uri, json_uri
