"""Uncertainty and Bayesian smoothing equal an independent, straightforward implementation of the
sits formulas of REFERENCE.md section 6 (``tests/sits_reference.py``, pixel loops) to 1e-6, on
probability maps that span two (and four) tiles; smoothing tile by tile (each tile with its
neighbours' pixels as halo) equals smoothing the mosaic at once: no seam."""

from __future__ import annotations

import numpy as np
import pytest

from tests import sits_reference as ref
from treesits_dask.outputs.schema import TileRegion
from treesits_dask.outputs.smoothing import (
    SmoothParams,
    padded_region,
    smooth_region,
    stale_rectangles,
)
from treesits_dask.outputs.uncertainty import uncertainty


def _probability_map(rng, n_classes: int, shape: tuple[int, int]) -> np.ndarray:
    """Class probabilities (C, H, W) float32 with what real maps hold: smooth patches, exact 0
    and 1 (clamped by the smoothing), ties, and pixels that were not predicted (NaN)."""
    h, w = shape
    base = rng.dirichlet(np.ones(n_classes) * 0.7, size=(h // 4 + 1, w // 4 + 1))
    base = np.repeat(np.repeat(base, 4, axis=0), 4, axis=1)[:h, :w]
    noisy = base + rng.normal(0, 0.08, size=base.shape)
    probs = np.clip(noisy, 0, None)
    probs /= probs.sum(axis=-1, keepdims=True)
    probs = probs.transpose(2, 0, 1).astype(np.float32)
    if n_classes > 1:
        certain = rng.random((h, w)) < 0.05
        probs[:, certain] = 0.0
        probs[0, certain] = 1.0
        tie = rng.random((h, w)) < 0.02
        probs[:, tie] = 1.0 / n_classes
    else:
        probs = rng.random((1, h, w)).astype(np.float32)
        probs[0, rng.random((h, w)) < 0.05] = 1.0
        probs[0, rng.random((h, w)) < 0.05] = 0.0
    holes = rng.random((h, w)) < 0.08
    holes[2:5, 3:9] = True  # a field: not predicted
    probs[:, holes] = np.nan
    return probs


def test_uncertainty_equals_the_sits_formulas_on_two_tiles():
    rng = np.random.default_rng(1)
    probs = _probability_map(rng, 5, (20, 48))  # two tiles of 20 x 24 px
    expected = ref.uncertainty_maps(probs)
    c, h, w = probs.shape
    for tile in (slice(0, 24), slice(24, 48)):  # per tile, as the kernel sees its windows
        part = probs[:, :, tile].reshape(c, -1).T
        ok = ~np.isnan(part).any(axis=1)
        got = uncertainty(part[ok], ("entropy", "margin", "least"))
        for var in ("entropy", "margin", "least"):
            want = expected[var][:, tile].reshape(-1)[ok]
            np.testing.assert_allclose(got[var], want, rtol=0, atol=1e-6, err_msg=var)
            assert got[var].dtype == np.float32
    # the meaning of the ends of the scales
    sure = uncertainty(np.array([[1.0, 0, 0, 0, 0]]), ("entropy", "margin", "least"))
    flat = uncertainty(np.full((1, 5), 0.2), ("entropy", "margin", "least"))
    assert sure == {"entropy": 0.0, "margin": 0.0, "least": 0.0}
    np.testing.assert_allclose([flat[v][0] for v in ("entropy", "margin", "least")],
                               [1.0, 1.0, 0.8], atol=1e-6)  # fmt: skip


def _tile_by_tile(probs, tiles, params, present_tiles=None):
    """Smooth each tile of ``tiles`` ({name: TileRegion}) alone, its halo read from the map
    ``probs`` (only where the neighbouring tile is in ``present_tiles``)."""
    present_tiles = set(tiles) if present_tiles is None else set(present_tiles)
    at = {(r.row_off, r.col_off): name for name, r in tiles.items()}
    out = np.full(probs.shape, np.nan, dtype=np.float32)
    classes = np.full(probs.shape[1:], 255, dtype=np.uint8)
    for region in tiles.values():
        present = {
            (dy, dx): at.get((region.row_off + dy * region.height,
                              region.col_off + dx * region.width)) in present_tiles
            for dy in (-1, 0, 1) for dx in (-1, 0, 1)
        }  # fmt: skip
        padded = padded_region(
            lambda r, c: probs[:, r, c], region, slice(0, region.height),
            slice(0, region.width), params.leg, present, probs.shape[1:],
        )  # fmt: skip
        p, k = smooth_region(padded, params)
        out[:, region.rows, region.cols] = p
        classes[region.rows, region.cols] = k
    return out, classes


@pytest.mark.parametrize(
    ("n_classes", "window_size", "neigh_fraction", "smoothness"),
    [
        (4, 5, 0.5, [20.0, 20.0, 20.0, 20.0]),  # current sits defaults (but a smaller window)
        (4, 7, 1.0, [10.0, 5.0, 1.0, 30.0]),  # older sits: all neighbours; one value per class
        (3, 9, 0.3, [2.0, 2.0, 2.0]),  # ceil(0.3 * count) of the highest logits
        (1, 5, 0.5, [20.0]),  # a binary (sigmoid) map: the two classes (p, 1 - p)
    ],
)
def test_smoothing_equals_sits_on_the_mosaic_tile_by_tile(
    n_classes, window_size, neigh_fraction, smoothness
):
    rng = np.random.default_rng(n_classes * 100 + window_size)
    probs = _probability_map(rng, n_classes, (20, 48))
    tiles = {"X0000_Y0000": TileRegion("X0000_Y0000", 0, 0, 20, 24),
             "X0001_Y0000": TileRegion("X0001_Y0000", 0, 24, 20, 24)}  # fmt: skip
    params = SmoothParams(window_size, neigh_fraction, tuple(smoothness))
    want_p, want_c = ref.bayes_smooth(probs, window_size, neigh_fraction, smoothness)
    got_p, got_c = _tile_by_tile(probs, tiles, params)
    np.testing.assert_allclose(got_p, want_p, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.isnan(got_p), np.isnan(want_p))
    np.testing.assert_array_equal(got_c, want_c)
    # the mosaic smoothed at once, as one "tile"
    mosaic = TileRegion("mosaic", 0, 0, 20, 48)
    whole = padded_region(lambda r, c: probs[:, r, c], mosaic, slice(0, 20), slice(0, 48),
                          params.leg, {}, probs.shape[1:])  # fmt: skip
    np.testing.assert_array_equal(smooth_region(whole, params)[0], got_p)
    # sits smooths each tile alone (mirrored at the tile edge): different along the seam
    alone, _ = _tile_by_tile(probs, tiles, params, present_tiles=())
    seam = np.nan_to_num(np.abs(alone - want_p))[:, :, 24 - params.leg : 24 + params.leg]
    assert seam.max() > 1e-3


def test_a_narrow_stand_goes_to_its_neighbour_with_half_the_neighbours():
    """What the README's smoothing figure shows, on a map a pixel loop can check: a stand three
    pixels wide in a field of another class, both classified with 99 % confidence.  With
    ``neigh_fraction: 0.5`` (sits's default) each class's prior is the mean of its highest logits,
    so the field's class (more than half of every 9 x 9 window) wins the stand's pixels; with all
    the neighbours (``neigh_fraction: 1``) the stand stays.  Both equal the sits formulas."""
    probs = np.zeros((2, 15, 15), np.float32)
    probs[0], probs[1] = 0.01, 0.99
    probs[0, :, 6:9], probs[1, :, 6:9] = 0.99, 0.01  # the stand: class 0, columns 6-8
    for neigh_fraction, stand_stays in ((0.5, False), (1.0, True)):
        params = SmoothParams(9, neigh_fraction, (20.0, 20.0))
        want_p, want_c = ref.bayes_smooth(probs, 9, neigh_fraction, [20.0, 20.0])
        got_p, got_c = smooth_region(np.pad(probs, ((0, 0), (4, 4), (4, 4)), mode="symmetric"),
                                     params)  # fmt: skip
        np.testing.assert_allclose(got_p, want_p, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(got_c, want_c)
        assert (got_c[:, 6:9] == 0).all() == stand_stays
        assert (got_c[:, :4] == 1).all() and (got_c[:, 11:] == 1).all()  # the field stays


def test_four_tiles_corners_and_stale_strips():
    """A 2 x 2 block of tiles: the corners take the diagonal neighbour; when one tile changes,
    re-smoothing its own pixels and the strips (and corner) of its neighbours that reach into it
    gives the mosaic of the new map."""
    rng = np.random.default_rng(7)
    probs = _probability_map(rng, 3, (24, 24))
    tiles = {
        f"X{x:04d}_Y{y:04d}": TileRegion(f"X{x:04d}_Y{y:04d}", 12 * y, 12 * x, 12, 12)
        for y in (0, 1) for x in (0, 1)
    }  # fmt: skip
    params = SmoothParams(5, 0.5, (20.0, 20.0, 20.0))
    want_p, want_c = ref.bayes_smooth(probs, 5, 0.5, [20.0] * 3)
    got_p, got_c = _tile_by_tile(probs, tiles, params)
    np.testing.assert_allclose(got_p, want_p, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got_c, want_c)

    # tile X0001_Y0001 changes: its neighbours' stale rectangles are recomputed, nothing else
    changed = probs.copy()
    changed[:, 12:, 12:] = _probability_map(np.random.default_rng(8), 3, (12, 12))
    new_p, new_c = ref.bayes_smooth(changed, 5, 0.5, [20.0] * 3)
    updated_p, updated_c = got_p.copy(), got_c.copy()
    offsets = {"X0000_Y0000": (1, 1), "X0001_Y0000": (1, 0), "X0000_Y0001": (0, 1)}
    for name, region in tiles.items():
        rects = stale_rectangles(region, params.leg, None if name == "X0001_Y0001" else
                                 [offsets[name]])  # fmt: skip
        for rows, cols in rects:
            present = {(dy, dx): 0 <= region.row_off // 12 + dy <= 1
                       and 0 <= region.col_off // 12 + dx <= 1
                       for dy in (-1, 0, 1) for dx in (-1, 0, 1)}  # fmt: skip
            padded = padded_region(lambda r, c: changed[:, r, c], region, rows, cols,
                                   params.leg, present, changed.shape[1:])  # fmt: skip
            p, k = smooth_region(padded, params)
            r = slice(region.row_off + rows.start, region.row_off + rows.stop)
            c = slice(region.col_off + cols.start, region.col_off + cols.stop)
            updated_p[:, r, c], updated_c[r, c] = p, k
    np.testing.assert_allclose(updated_p, new_p, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(updated_c, new_c)
    # and the strips were needed: the old values differ there
    assert np.nanmax(np.abs(got_p - new_p)[:, :12, 12 - params.leg : 12]) > 1e-4


# ------------------------------------------------------------------------- through the pipeline
def _lstm_like(native_lstm: str, path, seed: int) -> str:
    import torch

    from treesits_dask.models import ModelSpec, read_card, save_native
    from treesits_dask.models.architectures import LSTMClassifier

    card = read_card(ModelSpec(native_lstm, "native"))
    torch.manual_seed(seed)
    pt, _ = save_native(LSTMClassifier(**card.hyperparameters).eval(), card, str(path))
    return pt


def test_uncertainty_smoothing_and_overviews_in_the_map(small_cube, native_lstm, tmp_path, client):
    """A run with ``uncertainty`` and ``smoothing`` on two tiles: the uncertainty layers and the
    smoothed layers equal the reference formulas on the stored probabilities (the two tiles
    smoothed as one mosaic), COGs and mosaics hold them, the overviews are the decimated map; a
    new model for one tile re-smooths the strip of its neighbour along it."""
    import json

    import rasterio

    from treesits_dask import open_map
    from treesits_dask.config import load_config
    from treesits_dask.outputs.repo import MapRepo
    from treesits_dask.pipeline.run import run

    out = tmp_path / "out"
    a, b = small_cube.tiles
    common = dict(
        cube=small_cube.root, mask_dir=small_cube.mask_dir, output=str(out), model=native_lstm,
        window="30x60", uncertainty="entropy,margin,least",
        smoothing={"window_size": 5, "neigh_fraction": 0.5, "smoothness": [20, 10, 20, 5, 20]},
        dashboard_address=":0",
    )  # fmt: skip
    result = run(load_config(overrides=common, environ={}), client=client)
    assert set(result.tiles) == {a, b}
    assert result.postprocessed["smoothed"] == [a, b]
    ds = open_map(str(out))
    probs = ds["probability"].values
    assert probs.shape == (5, 60, 120) and np.isnan(probs).any() and (~np.isnan(probs)).any()
    expected = ref.uncertainty_maps(probs)
    for var in ("entropy", "margin", "least"):
        np.testing.assert_allclose(ds[var].values, expected[var], rtol=0, atol=1e-6)
    want_p, want_c = ref.bayes_smooth(probs, 5, 0.5, [20.0, 10.0, 20.0, 5.0, 20.0])
    np.testing.assert_allclose(ds["probability_smoothed"].values, want_p, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ds["class_smoothed"].values, want_c)
    assert (ds["class_smoothed"].values != ds["class"].values).any()  # it does smooth
    # COGs and mosaics of the new layers hold the map's values
    for var in ("entropy", "probability_smoothed", "class_smoothed", "last_valid_date"):
        with rasterio.open(out / "cog" / f"{var}.vrt") as src:
            np.testing.assert_array_equal(src.read().squeeze(), ds[var].values, err_msg=var)
    manifest = json.loads((out / "cog" / a / "_cog.json").read_text())
    assert {"probability_smoothed", "class_smoothed", "margin"} <= set(manifest["variables"])
    # overviews: level 1 is the map in 2 x 2 blocks (mean of valid values / upper-left pixel)
    level1 = MapRepo(str(out)).open_dataset(level=1)
    p = probs.reshape(5, 30, 2, 60, 2)
    with np.errstate(invalid="ignore"):
        mean = np.nansum(p, axis=(2, 4)) / (~np.isnan(p)).sum(axis=(2, 4))
    np.testing.assert_allclose(level1["probability"].values, mean, rtol=1e-6)
    np.testing.assert_array_equal(level1["class"].values, ds["class"].values[::2, ::2])
    assert level1.rio.transform().a == 20.0 and level1.rio.crs.to_epsg() == 3035

    # tile b gets a new model: b is predicted and smoothed again, a only along b
    other = _lstm_like(native_lstm, tmp_path / "m2.pt", seed=5)
    again = run(load_config(overrides={**common, "model": other, "tiles": b}, environ={}),
                client=client)  # fmt: skip
    assert set(again.tiles) == {b} and again.postprocessed["smoothed"] == [a, b]
    ds2 = open_map(str(out))
    probs2 = ds2["probability"].values
    np.testing.assert_array_equal(probs2[:, :, :60], probs[:, :, :60])
    want_p2, want_c2 = ref.bayes_smooth(probs2, 5, 0.5, [20.0, 10.0, 20.0, 5.0, 20.0])
    np.testing.assert_allclose(ds2["probability_smoothed"].values, want_p2, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(ds2["class_smoothed"].values, want_c2)
    assert not np.allclose(want_p2[:, :, 58:60], want_p[:, :, 58:60], equal_nan=True)
    # nothing changed: nothing to do
    assert not run(load_config(overrides={**common, "model": other, "tiles": b}, environ={}),
                   client=client).postprocessed  # fmt: skip


def test_every_overview_level_is_the_level_before_decimated(small_cube, native_lstm, tmp_path,
                                                             client):  # fmt: skip
    """With 10 x 10 px chunks, level 1 of the two tiles takes more than one task and is committed
    alone; the coarser levels are made in one task, each from the level before it as that task
    wrote it, and committed together.  Every level is the one before in 2 x 2 blocks (the mean of
    the valid probabilities, the upper-left class), down to the coarsest."""
    import warnings

    from treesits_dask.config import load_config
    from treesits_dask.outputs.repo import MapRepo
    from treesits_dask.outputs.store import level_paths
    from treesits_dask.pipeline.run import run

    out = tmp_path / "out"
    overrides = dict(cube=small_cube.root, mask_dir=small_cube.mask_dir, output=str(out),
                     model=native_lstm, window="10x10", cog=False,
                     dashboard_address=":0")  # fmt: skip
    result = run(load_config(overrides=overrides, environ={}), client=client)
    assert len(result.tiles) == 2
    repo = MapRepo(str(out))
    levels = len(level_paths(repo.zarr_store()))
    assert levels >= 4
    messages = [info.message for info in repo.repo.ancestry(branch="main")]
    assert "overviews level 1" in messages and f"overviews level 2-{levels - 1}" in messages
    assert not [m for m in messages if m.startswith("overviews level") and m not in
                ("overviews level 1", f"overviews level 2-{levels - 1}")]  # fmt: skip
    # the tiles' footprint at each level (only those chunks are read: the store spans the cube)
    regions = [MapRepo.region(t, r) for t, r in repo.records().items()]
    r0, c0 = min(g.row_off for g in regions), min(g.col_off for g in regions)
    r1 = max(g.row_off + g.height for g in regions)
    c1 = max(g.col_off + g.width for g in regions)
    opened = {k: repo.open_dataset(level=k, crop=False) for k in range(levels)}

    def read(k, rows, cols, var, fill):  # level k over rows x cols, ``fill`` beyond the grid
        da = opened[k][var]
        h, w = da.shape[-2:]
        out = np.full((*da.shape[:-2], rows.stop - rows.start, cols.stop - cols.start), fill)
        part = da.isel(
            y=slice(rows.start, min(rows.stop, h)), x=slice(cols.start, min(cols.stop, w))
        )
        out[..., : part.shape[-2], : part.shape[-1]] = part.values
        return out

    for k in range(1, levels):
        f = 2**k
        rows, cols = slice(r0 // f, -(-r1 // f)), slice(c0 // f, -(-c1 // f))
        before = (slice(2 * rows.start, 2 * rows.stop), slice(2 * cols.start, 2 * cols.stop))
        c = read(k - 1, *before, "class", 255)
        np.testing.assert_array_equal(read(k, rows, cols, "class", 255), c[::2, ::2],
                                      err_msg=f"level {k}")  # fmt: skip
        p = read(k - 1, *before, "probability", np.nan)
        blocks = p.reshape(p.shape[0], p.shape[1] // 2, 2, p.shape[2] // 2, 2)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks: NaN
            mean = np.nanmean(blocks, axis=(2, 4))
        got = read(k, rows, cols, "probability", np.nan)
        np.testing.assert_allclose(got, mean, rtol=1e-6, err_msg=f"level {k}")
        assert np.isfinite(got).any(), k  # the tiles reach every level
