"""The README's pictures of the products made from the probabilities, from real runs on synthetic
cubes (``python scripts/postprocess_figures.py [WORKDIR]``, about 3 minutes on 2 cores):

* ``docs/postprocess-uncertainty.png``: entropy and margin of a species map (a small LSTM trained
  on the demo cube's first tile, run on both tiles);
* ``docs/postprocess-smoothing.png``: the known species, the raw class and the class after
  Bayesian smoothing across the two tiles, with their accuracies;
* ``docs/postprocess-alerts.png``: disturbance alerts of two clear-cuts on known dates, kept
  over several updates (state and first-seen date), watched by the hand-set SITS-BERT detector.

Prints the figures' numbers as JSON (quoted in the README).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
TILES = ("X0069_Y0043", "X0070_Y0043")


def species_run(work: Path) -> dict:
    from rasterio.warp import transform

    from treesits_dask import (
        TrainConfig,
        load_config,
        make_cube,
        open_cube,
        run,
        train,
        write_points,
    )
    from treesits_dask.synthetic import sample_pixels

    cube = make_cube(
        work / "cube", tiles=TILES, size=150, n_scenes=36, mask_dir=str(work / "masks"),
        truth_dir=str(work / "truth"), seed=2,
    )  # fmt: skip
    rows, cols, labels = sample_pixels(cube, TILES[0], n_per_class=150, seed=0)
    tile = open_cube(cube.root, TILES[0])
    lon, lat = transform(tile.rio.crs, "EPSG:4326", tile.x.values[cols].tolist(),
                         tile.y.values[rows].tolist())  # fmt: skip
    points = work / "points.gpkg"
    write_points(str(points), lon, lat, [cube.class_names[k] for k in labels], "EPSG:4326",
                 label_column="species")  # fmt: skip
    model = work / "model" / "lstm.pt"
    train(TrainConfig(samples=str(points), cube=cube.root, label_column="species",
                      class_names=list(cube.class_names), family="sits-lstm", max_seconds=45,
                      max_epochs=300, seed=0, output=str(model), device="cpu"))  # fmt: skip
    out = work / "species"
    config = load_config(overrides=dict(
        cube=cube.root, output=str(out), model=str(model), mask_dir=cube.mask_dir, workers=1,
        uncertainty="entropy,margin,least", smoothing={"window_size": 9}, dashboard_address=":0",
    ), environ={})  # fmt: skip
    run(config)
    return {"cube": cube, "output": out}


def alert_run(work: Path) -> dict:
    from treesits_dask import load_config, make_cube, run
    from treesits_dask.io import discovery
    from treesits_dask.models.detector import save_detector
    from treesits_dask.synthetic import ClearCut

    cuts = [ClearCut(TILES[0], dt.date(2022, 4, 20), 20, 30, 35, 40),
            ClearCut(TILES[1], dt.date(2022, 6, 10), 50, 10, 30, 30)]  # fmt: skip
    cube = make_cube(work / "dcube", tiles=TILES, size=100, n_scenes=100, start="2019-01-01",
                     end="2022-07-31", clear_cuts=cuts, mask_dir=str(work / "dmasks"),
                     truth_dir=str(work / "dtruth"), forest_fraction=0.8, seed=4)  # fmt: skip
    model = save_detector(str(work / "detector.pt"), level=14.5, gain=2.0)
    growing = work / "growing"
    growing.mkdir()
    shutil.copy(Path(cube.root) / "datacube-definition.prj", growing)
    out = work / "alerts"
    scenes = [s for t in TILES for s in discovery.scene_table(cube.root, t)]
    cut_offs = [
        dt.date(2022, 3, 31),
        dt.date(2022, 5, 15),
        dt.date(2022, 6, 20),
        dt.date(2023, 1, 1),
    ]
    done: set = set()
    for cut_off in cut_offs:  # four updates
        for s in scenes:
            if s.date <= cut_off and s.boa not in done:
                for path in (s.boa, s.qai):
                    target = growing / s.tile / Path(path).name
                    target.parent.mkdir(exist_ok=True)
                    target.hardlink_to(path)
                done.add(s.boa)
        run(load_config(overrides=dict(
            cube=str(growing), output=str(out), model=model, mask_dir=cube.mask_dir, workers=1,
            window="50x100", dashboard_address=":0",
            alerts={"start": "2022-03-01", "threshold": 0.5, "confirm_after": 3},
        ), environ={}))  # fmt: skip
    return {"cube": cube, "output": out, "cuts": cuts}


def _axes(fig, n):
    axes = fig.subplots(1, n)
    for ax in axes:
        ax.set_axis_off()
    return axes


def smoothing_explained(probs, truth, smooth, ok) -> dict:
    """Where the smoothed class departs from the known species: the share of the pixel's own
    species among the forest pixels of its 9 x 9 window; and the accuracy with
    ``neigh_fraction: 1`` and with ``window_size: 5`` (the mosaic smoothed in memory, mirrored at
    its edges as sits does)."""
    from numpy.lib.stride_tricks import sliding_window_view

    from treesits_dask.outputs.smoothing import SmoothParams, smooth_region

    h, w = truth.shape
    win = sliding_window_view(np.pad(truth, 4, constant_values=np.nan), (9, 9)).reshape(h, w, 81)
    share = (win == truth[..., None]).sum(-1) / np.maximum((~np.isnan(win)).sum(-1), 1)
    wrong = ok & (smooth != truth)
    minority = ok & (share < 0.5)

    def accuracy(window_size: int, neigh_fraction: float) -> float:
        leg = window_size // 2
        padded = np.pad(probs, ((0, 0), (leg, leg), (leg, leg)), mode="symmetric")
        params = SmoothParams(window_size, neigh_fraction, (20.0,) * len(probs))
        _, classes = smooth_region(padded, params)
        return round(float((classes[ok] == truth[ok]).mean()), 4)

    return {
        "wrong_smoothed": int(wrong.sum()),
        "wrong_smoothed_own_share_below_half": int((wrong & minority).sum()),
        "pixels_own_share_below_half": int(minority.sum()),
        "accuracy_smoothed_neigh_fraction_1": accuracy(9, 1.0),
        "accuracy_smoothed_window_5": accuracy(5, 0.5),
    }


def figures(species: dict, alerts: dict) -> dict:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from treesits_dask import class_colors, open_map
    from treesits_dask.outputs.quicklook import ALERT_COLORS, NOT_PREDICTED_COLOR

    numbers: dict = {}
    cube = species["cube"]
    ds = open_map(str(species["output"]), mask_and_scale=True)
    names = list(cube.class_names)
    truth = np.concatenate([cube.truth(t) for t in TILES], axis=1).astype(float)
    truth[truth == 255] = np.nan

    # 1. uncertainty
    fig = Figure(figsize=(9.6, 2.9), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, var, label in zip(_axes(fig, 2), ("entropy", "margin"),
                              ("entropy (0 certain, 1 uniform)", "margin: 1 - (first - second)"),
                              strict=True):  # fmt: skip
        im = ax.imshow(ds[var].values, cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.85)
    fig.savefig(DOCS / "postprocess-uncertainty.png")
    forest = ~np.isnan(truth)
    raw, smooth = ds["class"].values, ds["class_smoothed"].values
    ok = forest & ~np.isnan(raw)
    wrong = ok & (raw != truth)
    numbers["uncertainty"] = {
        "entropy_mean_correct": round(float(np.nanmean(ds["entropy"].values[ok & ~wrong])), 3),
        "entropy_mean_wrong": round(float(np.nanmean(ds["entropy"].values[wrong])), 3),
    }

    # 2. smoothing
    n = len(names)
    cmap = ListedColormap(class_colors(n)).with_extremes(bad=NOT_PREDICTED_COLOR)
    norm = BoundaryNorm(np.arange(-0.5, n + 0.5), n)
    fig = Figure(figsize=(10.5, 2.6), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    acc_raw = float((raw[ok] == truth[ok]).mean())
    acc_smooth = float((smooth[ok] == truth[ok]).mean())
    panels = (("known species", truth), (f"class (accuracy {acc_raw:.3f})", raw),
              (f"class after smoothing ({acc_smooth:.3f})", smooth))  # fmt: skip
    for ax, (title, values) in zip(_axes(fig, 3), panels, strict=True):
        ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axvline(149.5, color="white", lw=0.6)  # the tile border
    fig.legend(handles=[Patch(facecolor=c, label=k) for c, k in zip(class_colors(n), names,
                                                                     strict=True)],
               loc="outside right upper", fontsize=8, frameon=False)  # fmt: skip
    fig.savefig(DOCS / "postprocess-smoothing.png")
    numbers["smoothing"] = {"accuracy_raw": round(acc_raw, 4), "accuracy_smoothed":
                            round(acc_smooth, 4), "pixels": int(ok.sum())}  # fmt: skip
    numbers["smoothing"].update(smoothing_explained(ds["probability"].values, truth, smooth, ok))

    # 3. alerts
    dcube = alerts["cube"]
    ds = open_map(str(alerts["output"]))
    state = ds["alert_state"].values.astype(float)
    state[state == 255] = np.nan
    first = ds["alert_first_seen"].values.astype(float)
    first[first == 0] = np.nan
    cut = np.concatenate([dcube.disturbance(t) for t in TILES], axis=1)
    fig = Figure(figsize=(10.5, 2.9), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    a1, a2 = _axes(fig, 2)
    smap = ListedColormap(ALERT_COLORS).with_extremes(bad=NOT_PREDICTED_COLOR)
    a1.imshow(np.ma.masked_invalid(state), cmap=smap, norm=BoundaryNorm(np.arange(-0.5, 4.5), 4),
              interpolation="nearest")  # fmt: skip
    a1.contour(cut > 0, levels=[0.5], colors="black", linewidths=0.6)
    a1.set_title("alert state (outline: the clear-cuts)", fontsize=9)
    epoch = dt.date(1970, 1, 1)
    lo, hi = np.nanmin(first), np.nanmax(first)
    im = a2.imshow(np.ma.masked_invalid(first), cmap="viridis", vmin=lo, vmax=hi,
                   interpolation="nearest")  # fmt: skip
    a2.set_title("first seen", fontsize=9)
    ticks = np.linspace(lo, hi, 4)
    bar = fig.colorbar(im, ax=a2, shrink=0.85, ticks=ticks)
    bar.ax.set_yticklabels([str(epoch + dt.timedelta(days=int(t))) for t in ticks], fontsize=7)
    fig.legend(handles=[Patch(facecolor=c, label=k) for c, k in zip(
        ALERT_COLORS, ("none", "candidate", "confirmed", "retracted"), strict=True)],
        loc="outside left upper", fontsize=8, frameon=False)  # fmt: skip
    fig.savefig(DOCS / "postprocess-alerts.png")
    cut_px = cut > 0
    numbers["alerts"] = {
        "cut_pixels": int(cut_px.sum()),
        "confirmed_in_cuts": int((state[cut_px] == 2).sum()),
        "alerts_outside_cuts": int(np.isin(state[~cut_px], [1, 2, 3]).sum()),
        "first_seen_dates": sorted({str(epoch + dt.timedelta(days=int(d)))
                                    for d in np.unique(first[~np.isnan(first)])}),
    }  # fmt: skip
    return numbers


def main(argv: list[str]) -> int:
    work = Path(argv[0] if argv else "/tmp/treesits-figures").resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    numbers = figures(species_run(work), alert_run(work))
    print(json.dumps(numbers, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
