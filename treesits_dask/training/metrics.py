"""Accuracy measures of a classification against reference samples: overall accuracy, kappa,
per-class precision / recall / F1, the confusion matrix, and its table, plot and report files."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..io import storage

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["classification_metrics", "confusion_table", "plot_confusion", "write_report"]


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
