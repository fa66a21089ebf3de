"""``python -m treesits_dask demo``: synthetic cube -> small native LSTM -> full pipeline ->
accuracy.

Everything runs through the public API (:mod:`treesits_dask`), as a user's program would.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .outputs.schema import CLASS_NODATA

__all__ = ["run_demo"]

log = logging.getLogger(__name__)

DEMO_TILES = ("X0069_Y0043", "X0070_Y0043")


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(
    workdir: str | Path = "demo-output",
    size: int = 300,
    n_scenes: int = 36,
    train_seconds: float = 60.0,
    workers: int | None = None,
    seed: int = 0,
) -> dict:
    """Build the sample cube, train, run the pipeline and report accuracy (printed and returned)."""
    from . import make_cube

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _say(
        f"[1/4] building a synthetic FORCE cube ({len(DEMO_TILES)} tiles of {size}x{size} px, "
        f"{n_scenes} scenes) in {workdir / 'cube'}"
    )
    cube = make_cube(
        workdir / "cube",
        tiles=DEMO_TILES,
        size=size,
        n_scenes=n_scenes,
        mask_dir=str(workdir / "masks"),
        truth_dir=str(workdir / "truth"),
        seed=seed,
    )
    model_path, metrics = _train(cube, workdir, train_seconds, seed)
    output = workdir / "output"
    result = _predict(cube, model_path, output, workers)
    _say("[4/4] accuracy of the predicted species map against the known map (forest pixels):")
    report = {
        "tiles": {},
        "seconds": round(time.perf_counter() - t0, 1),
        "output": str(output),
        "val_accuracy": metrics.get("val_accuracy"),
    }
    report.update(_accuracy(cube, output, list(result.tiles)))
    _say(
        f"outputs: {output / 'map.icechunk'} (the versioned map) and {output / 'cog'} "
        f"(per-tile COGs, VRT mosaics); total {report['seconds']} s"
    )
    if result.report_dir:
        _say(
            f"run report: {output / 'run.json'} and {result.report_dir}/dask-report.html; maps: "
            f"python -m treesits_dask quicklook {output}"
        )
    return report


def _train(cube, workdir: Path, train_seconds: float, seed: int) -> tuple[Path, dict]:
    """Reference points of the first tile as a user has them (a GeoPackage in WGS 84), and a
    native sits-lstm trained on them."""
    from rasterio.warp import transform

    from . import TrainConfig, open_cube, train, write_points
    from .synthetic import sample_pixels

    train_tile = DEMO_TILES[0]
    rows, cols, labels = sample_pixels(cube, train_tile, n_per_class=400, seed=seed)
    tile = open_cube(cube.root, train_tile)  # lazy: only its coordinates are used here
    x, y = tile.x.values[cols], tile.y.values[rows]  # pixel centres
    lon, lat = transform(tile.rio.crs, "EPSG:4326", x.tolist(), y.tolist())
    points = workdir / "samples" / "reference_points.gpkg"
    write_points(
        str(points),
        lon,
        lat,
        [cube.class_names[k] for k in labels],
        "EPSG:4326",
        ids=[f"{train_tile}_{r}_{c}" for r, c in zip(rows, cols, strict=True)],
        label_column="species",
    )
    model_path = workdir / "model" / "species_lstm.pt"
    _say(
        f"[2/4] training a native sits-lstm on {len(labels)} reference points of {train_tile} "
        f"({points.name}, at most {train_seconds:.0f} s)"
    )
    train_config = TrainConfig(
        samples=str(points),
        cube=cube.root,
        label_column="species",
        class_names=list(cube.class_names),
        family="sits-lstm",
        max_seconds=train_seconds,
        max_epochs=500,
        seed=seed,
        output=str(model_path),
        device="cpu",
    )
    _, metrics = train(train_config)
    _say(
        f"      validation accuracy {metrics['val_accuracy']:.3f}; model card "
        f"{model_path.with_suffix('.json')}"
    )
    return model_path, metrics


def _predict(cube, model_path: Path, output: Path, workers: int | None):
    """The pipeline on both tiles, into a fresh ``output``."""
    from . import load_config, run
    from .progress import ProgressBar

    if output.exists():  # the cube and model were just rebuilt; an older output cannot match
        import shutil

        _say(f"      removing the previous demo output {output}")
        shutil.rmtree(output)
    config = load_config(
        overrides=dict(
            cube=cube.root,
            tiles=",".join(DEMO_TILES),
            output=str(output),
            model=str(model_path),
            model_family="native",
            mask_dir=cube.mask_dir,
            workers=workers,
        )
    )
    _say(f"[3/4] running the pipeline on a LocalCluster -> {output}")
    progress = ProgressBar()
    try:
        return run(config, callbacks=progress)
    finally:
        progress.close()


def _accuracy(cube, output: Path, tiles: list[str]) -> dict:
    """Overall accuracy per tile and over all tiles, on the forest pixels that were predicted."""
    report: dict = {"tiles": {}}
    correct = total = 0
    for tile in tiles:
        pred = _class_map(output, tile)
        truth = cube.truth(tile)
        ok = cube.forest(tile) & (pred != CLASS_NODATA)
        acc = float((pred[ok] == truth[ok]).mean()) if ok.any() else float("nan")
        correct += int((pred[ok] == truth[ok]).sum())
        total += int(ok.sum())
        trained_on = tile == DEMO_TILES[0]
        report["tiles"][tile] = {
            "accuracy": round(acc, 4),
            "pixels": int(ok.sum()),
            "trained_on": trained_on,
        }
        _say(
            f"      {tile}: overall accuracy {acc:.3f} on {int(ok.sum())} forest pixels"
            + (" (training tile)" if trained_on else " (not seen in training)")
        )
    report["accuracy"] = round(correct / total, 4) if total else float("nan")
    _say(f"      all tiles: {report['accuracy']:.3f}")
    return report


def _class_map(output: Path, tile: str) -> np.ndarray:
    """The class map of one tile, read back from its COG (identical to the Zarr values)."""
    import rasterio

    with rasterio.open(output / "cog" / tile / "class.tif") as src:
        return src.read(1)
