"""``python -m treesits_dask demo``: synthetic cube -> small native LSTM -> full pipeline -> accuracy.

Everything runs through the same public code paths a user runs (cube, models, pipeline).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "extract_samples"]

log = logging.getLogger(__name__)

DEMO_TILES = ("X0069_Y0043", "X0070_Y0043")


def extract_samples(scenes, grid, rows, cols, qai_flags, window_shape=None):
    """Time series of pixels (rows, cols) through the same cube code as inference.

    Returns ``series`` (N, T, 10) int16, ``valid`` (N, T) bool, ``days`` (T,) int64.
    """
    from .cube import NODATA, choose_window_shape, days_since_epoch, open_cube

    shape = window_shape or choose_window_shape(grid, None, len(scenes))
    cube = open_cube(scenes, grid, shape, qai_flags)
    # vectorised point selection: dask reads only the windows that hold samples
    block = cube.isel(y=_points(rows), x=_points(cols)).values  # (T, 10, N)
    series = np.ascontiguousarray(block.transpose(2, 0, 1))
    valid = (series != NODATA).all(axis=2)
    return series, valid, days_since_epoch([s.date for s in scenes])


def _points(idx):
    import xarray as xr

    return xr.DataArray(np.asarray(idx), dims="sample")


def run_demo(workdir: str | Path = "demo-output", size: int = 300, n_scenes: int = 36,
             train_seconds: float = 60.0, workers: int | None = None, seed: int = 0) -> dict:
    """Build the sample cube, train, run the pipeline and report accuracy (printed and returned)."""
    from . import discovery
    from .config import load_config
    from .cube import tile_grid
    from .models import save_native
    from .models.training import fit
    from .pipeline import run
    from .synthetic import make_cube, sample_pixels

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[1/4] building a synthetic FORCE cube ({len(DEMO_TILES)} tiles of {size}x{size} px, "
          f"{n_scenes} scenes) in {workdir / 'cube'}", flush=True)
    cube = make_cube(workdir / "cube", tiles=DEMO_TILES, size=size, n_scenes=n_scenes,
                     mask_dir=str(workdir / "masks"), truth_dir=str(workdir / "truth"), seed=seed)
    definition = discovery.read_cube_definition(cube.root)
    train_tile = DEMO_TILES[0]
    scenes = discovery.scene_table(cube.root, train_tile)
    grid = tile_grid(definition, scenes[0])
    rows, cols, labels = sample_pixels(cube, train_tile, n_per_class=400, seed=seed)
    from .config import DEFAULT_QAI_FLAGS

    series, valid, days = extract_samples(scenes, grid, rows, cols, DEFAULT_QAI_FLAGS)
    keep = valid.any(axis=1)
    print(f"[2/4] training a native sits-lstm on {int(keep.sum())} labelled pixels of {train_tile} "
          f"(at most {train_seconds:.0f} s)", flush=True)
    predictor, metrics = fit("sits-lstm", series[keep], valid[keep], days, labels[keep],
                             list(cube.class_names), max_seconds=train_seconds, seed=seed)
    model_path = workdir / "model" / "species_lstm.pt"
    model_path.parent.mkdir(exist_ok=True)
    save_native(predictor.module, predictor.card, str(model_path))
    print(f"      validation accuracy {metrics.get('val_accuracy', float('nan')):.3f}; model card "
          f"{model_path.with_suffix('.json')}", flush=True)

    output = workdir / "output"
    config = load_config(overrides=dict(
        cube=cube.root, tiles=",".join(DEMO_TILES), output=str(output), model=str(model_path),
        model_family="native", mask_dir=cube.mask_dir, workers=workers,
    ))
    print(f"[3/4] running the pipeline on a LocalCluster -> {output}", flush=True)
    from .cli import _Progress

    progress = _Progress()
    try:
        result = run(config, callbacks=progress)
    finally:
        progress.close()

    print("[4/4] accuracy of the predicted species map against the known map (forest pixels):", flush=True)
    report = {"tiles": {}, "seconds": round(time.perf_counter() - t0, 1), "output": str(output),
              "val_accuracy": metrics.get("val_accuracy")}
    correct = total = 0
    for tile in result.tiles:
        pred = _class_map(output, tile)
        truth = cube.truth(tile)
        forest = cube.forest(tile)
        ok = forest & (pred != 255)
        acc = float((pred[ok] == truth[ok]).mean()) if ok.any() else float("nan")
        correct += int((pred[ok] == truth[ok]).sum())
        total += int(ok.sum())
        report["tiles"][tile] = {"accuracy": round(acc, 4), "pixels": int(ok.sum()),
                                 "trained_on": tile == train_tile}
        print(f"      {tile}: overall accuracy {acc:.3f} on {int(ok.sum())} forest pixels"
              + (" (training tile)" if tile == train_tile else " (not seen in training)"), flush=True)
    report["accuracy"] = round(correct / total, 4) if total else float("nan")
    print(f"      all tiles: {report['accuracy']:.3f}", flush=True)
    print(f"outputs: {output / 'predictions.zarr'} and {output / 'cog'} (per-tile COGs, VRT mosaics); "
          f"total {report['seconds']} s", flush=True)
    return report


def _class_map(output: Path, tile: str) -> np.ndarray:
    """The class map of one tile, read back from its COG (identical to the Zarr values)."""
    import rasterio

    with rasterio.open(output / "cog" / tile / "class.tif") as src:
        return src.read(1)
