"""The keys of the device check's report (:mod:`treesits_dask.bench.gpu_check`): the same on a
GPU and on CPU, null where a figure needs a GPU."""

from __future__ import annotations

__all__ = ["FORWARDS", "PRECISIONS", "SCHEMA", "schema_problems"]

_FORWARD_ENTRY = [
    "px_per_s",
    "pixels",
    "steps",
    "batch",
    "feed",
    "calls",
    "seconds",
    "peak_device_memory_mib",
]
_DIFF = ["max_abs", "mean_abs", "class_agreement"]
_PARITY = {"pixels": None, "steps": None, "fp32_vs_cpu": _DIFF, "tf32_vs_fp32": _DIFF}
_PARITY["bf16_vs_fp32"] = _DIFF
PRECISIONS = ("fp32", "tf32", "bf16")
FORWARDS = ("sits-lstm", "sits-transformer", "sbert_len256", "sbert_4y_window")
#: the keys of the report (nested; a list: the keys of a dict that may also be null)
SCHEMA = {
    "check": None,
    "version": None,
    "machine": [
        "device",
        "name",
        "cuda",
        "torch",
        "cuda_runtime",
        "device_memory_gib",
        "cpu_cores",
        "reduced_sizes",
    ],
    "forward": {f: {p: _FORWARD_ENTRY for p in PRECISIONS} for f in FORWARDS},
    "sbert_4y_window_lengths": ["source", "scenes", "mean", "p10", "p50", "p90", "share_at_256"],
    "parity": {f: _PARITY for f in ("sits-lstm", "sits-transformer", "sbert")},
    "torch_compile": [
        "family",
        "eager_px_per_s",
        "compiled_px_per_s",
        "first_call_s",
        "max_abs_diff",
    ],
    "end_to_end": {
        "family": None,
        "precision": None,
        "tile_px": None,
        "scenes": None,
        "forest_fraction": None,
        "cpu_workers": None,
        "threads_per_cpu_worker": None,
        "gpu_workers": None,
        "gpu_windows_in_flight": None,
        "seconds": None,
        "pixels_predicted": None,
        "px_per_s": None,
        "inference_only_on_gpu_workers": None,
        "gpu_busy": ["fraction", "samples", "source"],
        "peak_device_memory_mib": None,
        "batch": None,
        "stages": None,
    },
    "peak_device_memory_mib": None,
    "errors": None,
    "goals": [
        "sbert_fp32_len256_ge_100k_px_s",
        "sbert_tf32_len256_ge_100k_px_s",
        "end_to_end_gpu_busy_ge_80_percent",
        "fp32_parity_le_1e-5",
    ],
    "seconds": None,
}


def schema_problems(report, schema=SCHEMA, where: str = "report") -> list[str]:
    """Where ``report`` departs from ``schema`` (:data:`SCHEMA` notation: None any value, a list
    the keys of a dict or null, a dict the keys of a dict, recursively); empty when it fits."""
    if schema is None:
        return []
    if isinstance(schema, list):
        if report is None:
            return []
        if not isinstance(report, dict) or list(report) != schema:
            got = list(report) if isinstance(report, dict) else type(report).__name__
            return [f"{where}: keys {got}, expected {schema}"]
        return []
    if not isinstance(report, dict) or list(report) != list(schema):
        got = list(report) if isinstance(report, dict) else type(report).__name__
        return [f"{where}: keys {got}, expected {list(schema)}"]
    return [
        problem
        for key, sub in schema.items()
        for problem in schema_problems(report[key], sub, f"{where}.{key}")
    ]
