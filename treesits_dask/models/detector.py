"""A hand-set SITS-BERT that flags disturbance: an observation far brighter than the pixel's own
history in the visible, red-edge-1 and short-wave infrared bands (bare soil and slash after a
clear-cut).  Not a trained model: a transparent stand-in with the published architecture for
tests and demonstrations of the alert layers, whose probability can be written down exactly.

With its weights, the SBERT forward reduces to (REFERENCE.md 3a: z-score per pixel and band over
the kept observations, residual blocks, max over all positions)::

    s_t = sum_{b in DETECTOR_BANDS} z_{t,b}            (z as SBERT's preprocessing makes it)
    p   = sigmoid(gain * (max(0, max_t s_t) - level))   (0: the padding positions)

because the attention and feed-forward outputs are zero (their output layers are zero), so every
block passes its input on, and only the first embedding unit reaches the classifier.
"""

from __future__ import annotations

import numpy as np

from ..io.discovery import S2_BANDS
from .card import SBERT_SEQUENCE, ModelCard

__all__ = ["DETECTOR_BANDS", "detector_probability", "save_detector"]

#: bands whose z-scores are summed (all brighter on bare soil than on forest, every season)
DETECTOR_BANDS = ("BLUE", "GREEN", "RED", "REDEDGE1", "SWIR1", "SWIR2")
_HYPERPARAMETERS = {"num_features": 10, "hidden": 8, "n_layers": 1, "attn_heads": 2,
                    "dropout": 0.0, "num_classes": 1, "max_position": 1826}  # fmt: skip


def save_detector(path: str, level: float = 9.0, gain: float = 2.0) -> str:
    """Write the detector as a native checkpoint (``<stem>.pt`` + card); returns the ``.pt``."""
    import torch

    from .architectures import SBERTClassifier
    from .loading import save_native

    module = SBERTClassifier(**_HYPERPARAMETERS).eval()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not name.endswith(".pe"):
                tensor.zero_()
        weight = module.sbert.embedding.input.weight
        for band in DETECTOR_BANDS:
            weight[0, S2_BANDS.index(band)] = 1.0
        module.classification.linear.weight[0, 0] = gain
        module.classification.linear.bias[0] = -gain * level
    card = ModelCard(
        family="sbert",
        hyperparameters=dict(_HYPERPARAMETERS),
        bands=list(S2_BANDS),
        class_names=["disturbance"],
        output_kind="sigmoid",
        sequence=dict(SBERT_SEQUENCE),
    )
    pt, _ = save_native(module, card, path)
    return pt


def detector_probability(refl: np.ndarray, level: float = 9.0, gain: float = 2.0) -> float:
    """The detector's probability for one pixel's kept observations ``refl`` (n, 10) (raw BOA, in
    date order, the latest 256 valid ones of the window), straight from the formula above."""
    x = np.asarray(refl, dtype=np.float64) / 10000.0
    z = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    s = z[:, [S2_BANDS.index(b) for b in DETECTOR_BANDS]].sum(axis=1)
    m = max(0.0, float(s.max()))
    return float(1.0 / (1.0 + np.exp(-gain * (m - level))))
