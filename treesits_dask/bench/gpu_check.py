"""Device check (``python -m treesits_dask bench --gpu``, ``benchmarks/gpu_check.sh``).

Prints one JSON document (schema :data:`SCHEMA`), in under 5 minutes on one GPU with 16 cores at
the default sizes:

- ``forward``: pixels per second through ``Predictor.predict`` (host gather, copies to the
  device, input preparation, model, results back: what a run feeds the device) per family and
  precision: the published SITS-NN LSTM and Transformer weights, SBERT (random weights of the
  published shapes) at length 256 and at the observation counts of a 4-year window, each at the
  batch the predictor chose;
- ``parity``: probability differences, fp32 on the device against the CPU path, tf32 and bf16
  against fp32, on realistic synthetic series;
- ``torch_compile``: SBERT at length 256 (fp32) with and without ``torch.compile``;
- ``end_to_end``: ``run`` on a generated tile (default 1000 x 1000 px, 64 scenes, 30 % forest)
  on a local cluster of CPU reading workers and one worker advertising ``GPU=1``, with the GPU
  busy fraction (NVML) and the peak device memory;
- ``goals``: the issue's targets, checked where a GPU ran (null elsewhere).

Without a GPU it runs the same code on CPU (give smaller sizes with the flags) and writes the same
keys, null where a figure needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..version import __version__
from .device_measure import (
    compile_gain,
    end_to_end_gpu,
    forward_pxps,
    four_year_window,
    parity,
    parity_inputs,
    random_series,
)
from .gpu_schema import FORWARDS, PRECISIONS, SCHEMA, schema_problems

__all__ = ["SCHEMA", "main", "schema_problems"]

#: the defaults: the sizes of the issue, for one GPU and 16 cores
FULL_SIZES = {"size": 1000, "scenes": 64, "forward_pixels": 65536}
_WEIGHTS = Path(__file__).resolve().parents[3] / "shared" / "data" / "sitsnn-weights" / "04"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="treesits_dask bench --gpu", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cuda:N or cpu")
    p.add_argument("--size", type=int, default=FULL_SIZES["size"], help="end-to-end tile edge")
    p.add_argument("--scenes", type=int, default=FULL_SIZES["scenes"], help="end-to-end scenes")
    p.add_argument("--forest", type=float, default=0.3, help="end-to-end forest share")
    p.add_argument("--e2e-family", default="sbert", choices=["sbert", "sits-lstm"])
    p.add_argument("--e2e-precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--skip-e2e", action="store_true", help="no end-to-end run (keys stay, null)")
    p.add_argument(
        "--skip-compile", action="store_true", help="no torch.compile measurement (null)"
    )
    p.add_argument("--cpu-workers", type=int, default=None, help="default: (cores - 2) / threads")
    p.add_argument("--threads-per-worker", type=int, default=None, help="default min(cores, 4)")
    p.add_argument("--forward-pixels", type=int, default=FULL_SIZES["forward_pixels"])
    p.add_argument("--forward-seconds", type=float, default=3.0, help="per measurement")
    p.add_argument("--parity-pixels", type=int, default=4096)
    p.add_argument("--window-scenes", type=int, default=400, help="scenes of the 4-year window")
    p.add_argument("--window-cloud", type=float, default=0.55, help="mean cloud of the window")
    p.add_argument("--weights", default=str(_WEIGHTS), help="SITS-NN weights folder")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the report to this file")
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _specs(weights: str, workdir: Path) -> dict:
    from ..models import ModelSpec
    from .forward import random_sbert_state_dict

    w = Path(weights)
    sbert = workdir / "sbert.tar"
    torch.save({"model_state_dict": random_sbert_state_dict(), "epoch": 0}, sbert)
    return {
        "sits-lstm": ModelSpec(
            str(w / "lstm_5pure.pth"), "sits-lstm", str(w / "lstm_5pure_params.json")
        ),
        "sits-transformer": ModelSpec(
            str(w / "transformer_5pure.pth"),
            "sits-transformer",
            str(w / "transformer_5pure_params.json"),
        ),
        "sbert": ModelSpec(str(sbert), "sbert"),
    }


def _machine(device: torch.device, args) -> dict:
    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cuda": cuda,
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda if cuda else None,
        "device_memory_gib": (
            round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
            if cuda
            else None
        ),
        "cpu_cores": os.cpu_count(),
        "reduced_sizes": any(getattr(args, k) < v for k, v in FULL_SIZES.items()),
    }


def _forward(args, device: torch.device, specs: dict, errors: list) -> tuple[dict, dict]:
    from ..models import load_model

    n = args.forward_pixels
    window, lengths = four_year_window(n, args.window_scenes, args.window_cloud, seed=4)
    inputs = {
        "sits-lstm": random_series(n, args.scenes, 0.7, seed=1),
        "sits-transformer": random_series(n, args.scenes, 0.7, seed=2),
        "sbert_len256": random_series(n, 300, 1.0, seed=3),
        "sbert_4y_window": window,
    }
    out: dict = {}
    for name in FORWARDS:
        spec = specs["sbert" if name.startswith("sbert") else name]
        out[name] = {}
        for precision in PRECISIONS:
            if precision == "tf32" and device.type != "cuda":
                out[name][precision] = None  # TF32 is a tensor-core format: fp32 on CPU
                continue
            try:
                predictor = load_model(spec, str(device), precision=precision)
                entry = forward_pxps(predictor, inputs[name], args.forward_seconds, 2048)
            except Exception as exc:  # noqa: BLE001 - one failed figure must not lose the others
                errors.append(f"forward {name} {precision}: {type(exc).__name__}: {exc}")
                _log(f"[forward] {name} {precision} failed: {exc}")
                out[name][precision] = None
                continue
            out[name][precision] = entry
            _log(f"[forward] {name} {precision}: {entry['px_per_s']} px/s (batch {entry['batch']})")
            del predictor
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out, lengths


def _end_to_end(args, device: torch.device, specs: dict, workdir: Path) -> dict:
    from ..config import load_config
    from ..synthetic import make_cube

    cores = os.cpu_count() or 1
    threads = args.threads_per_worker or min(cores, 4)
    workers = args.cpu_workers or max(1, (cores - 2) // threads)
    t0 = time.perf_counter()
    cube = make_cube(
        workdir / "e2e-cube",
        size=args.size,
        n_scenes=args.scenes,
        forest_fraction=args.forest,
        mask_dir=str(workdir / "e2e-masks"),
        truth_dir=str(workdir / "e2e-truth"),
        seed=1,
    )
    _log(
        f"[end-to-end] generated {args.size} px x {args.scenes} scenes in "
        f"{time.perf_counter() - t0:.0f} s"
    )
    spec = specs[args.e2e_family]
    config = load_config(
        overrides=dict(
            cube=cube.root,
            tiles="all",
            output=str(workdir / "e2e-out"),
            model=spec.uri,
            model_family=spec.family,
            model_params=spec.params_uri,
            mask_dir=cube.mask_dir,
            workers=workers,
            threads_per_worker=threads,
            local_gpu_workers=1,
            device=str(device),
            precision=args.e2e_precision,
            dashboard_address=":0",
        ),
        environ={},
    )
    head = {
        "family": args.e2e_family,
        "precision": args.e2e_precision,
        "tile_px": [args.size, args.size],
        "scenes": args.scenes,
        "forest_fraction": args.forest,
        "cpu_workers": workers,
        "threads_per_cpu_worker": threads,
        "gpu_workers": 1,
        "gpu_windows_in_flight": config.gpu_windows_in_flight,
    }
    result = end_to_end_gpu(config, device)
    if result["batch"] is None:
        result["batch"] = config.batch_size  # the host path's batch (CPU)
    _log(
        f"[end-to-end] {result['pixels_predicted']} px in {result['seconds']:.1f} s: "
        f"{result['px_per_s']} px/s, GPU busy {result['gpu_busy']['fraction']}"
    )
    return {**head, **result}


def _goals(report: dict, cuda: bool) -> dict:
    keys = SCHEMA["goals"]
    if not cuda:
        return dict.fromkeys(keys)
    fwd, e2e = report["forward"]["sbert_len256"], report["end_to_end"]
    busy = ((e2e or {}).get("gpu_busy") or {}).get("fraction")
    parities = [p["fp32_vs_cpu"]["max_abs"] for p in report["parity"].values() if p]

    def at_least(entry, target):
        return None if entry is None else entry["px_per_s"] >= target

    return {
        keys[0]: at_least(fwd["fp32"], 100_000),
        keys[1]: at_least(fwd["tf32"], 100_000),
        keys[2]: None if busy is None else busy >= 0.8,
        keys[3]: max(parities) <= 1e-5 if len(parities) == 3 else None,
    }


def _parity(device: torch.device, specs: dict, inputs: tuple, errors: list) -> dict:
    out = {}
    for family, spec in specs.items():
        try:
            out[family] = parity(spec, device, list(PRECISIONS), inputs)
        except Exception as exc:  # noqa: BLE001 - one failed figure must not lose the others
            errors.append(f"parity {family}: {type(exc).__name__}: {exc}")
            out[family] = None
    _log(f"[parity] {json.dumps(out)}")
    return out


def _peak(report: dict, e2e: dict | None) -> float | None:
    peaks = [
        e["peak_device_memory_mib"]
        for f in report["forward"].values()
        for e in f.values()
        if e and e["peak_device_memory_mib"]
    ]
    if e2e and e2e["peak_device_memory_mib"]:
        peaks.append(e2e["peak_device_memory_mib"])
    return max(peaks) if peaks else None


def main(argv=None) -> int:
    from ..models.loading import resolve_device

    t_start = time.perf_counter()
    args = _parser().parse_args(argv)
    device = resolve_device(args.device)
    if device.type != "cuda":
        _log("[gpu-check] no CUDA device: running on CPU (figures that need a GPU stay null)")
    tmp = tempfile.TemporaryDirectory(prefix="treesits-gpu-check-") if not args.workdir else None
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(os.cpu_count() or 1, 4))
    specs = _specs(args.weights, workdir)
    errors: list[str] = []
    report: dict = {
        "check": "treesits_dask gpu check (issue 15)",
        "version": __version__,
        "machine": _machine(device, args),
    }
    report["forward"], report["sbert_4y_window_lengths"] = _forward(args, device, specs, errors)
    inputs = parity_inputs(workdir, 100, args.scenes, args.parity_pixels)
    report["parity"] = _parity(device, specs, inputs, errors)
    report["torch_compile"] = None
    if not args.skip_compile:  # SBERT at length 256, fp32: where a GPU spends its time
        n = min(args.forward_pixels, 4096)
        try:
            report["torch_compile"] = compile_gain(
                specs["sbert"], device, random_series(n, 300, 1.0, seed=3), args.forward_seconds
            )
            _log(f"[torch.compile] {json.dumps(report['torch_compile'])}")
        except Exception as exc:  # noqa: BLE001 - e.g. no compiler for inductor on this machine
            errors.append(f"torch_compile: {type(exc).__name__}: {exc}")
    e2e = None
    if not args.skip_e2e:
        try:
            e2e = _end_to_end(args, device, specs, workdir)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"end_to_end: {type(exc).__name__}: {exc}")
            _log(f"[end-to-end] failed: {exc}")
    report["end_to_end"] = e2e or {
        **dict.fromkeys(SCHEMA["end_to_end"]),
        "gpu_busy": dict.fromkeys(SCHEMA["end_to_end"]["gpu_busy"]),
    }
    report["peak_device_memory_mib"] = _peak(report, e2e)
    report["errors"] = errors
    report["goals"] = _goals(report, device.type == "cuda")
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
