"""Area estimation from a stratified random sample: the worked example of Olofsson et al. (2014)
to its published precision, the sample design, and ``sample`` / ``evaluate --area`` on a map."""

from __future__ import annotations

import json

import numpy as np
import pytest

from treesits_dask.training.area import (
    Z95,
    draw_sample,
    estimate_areas,
    overall_sample_size,
    sample_sizes,
)

# Olofsson, P., Foody, G. M., Herold, M., Stehman, S. V., Woodcock, C. E., Wulder, M. A. (2014).
# Good practices for estimating area and assessing accuracy of land change. Remote Sensing of
# Environment 148, 42-57, doi:10.1016/j.rse.2014.02.015.  Section 5 (the numerical example),
# Table 8: sample counts of a stratified random sample (rows: map class = stratum, columns:
# reference class) and the mapped areas in 30 m Landsat pixels.
CLASSES = ("Deforestation", "Forest gain", "Stable forest", "Stable non-forest")
TABLE8_COUNTS = [
    [66, 0, 5, 4],
    [0, 55, 8, 12],
    [1, 0, 153, 11],
    [2, 1, 9, 313],
]
TABLE8_MAPPED_PIXELS = [200_000, 150_000, 3_200_000, 6_450_000]
PIXEL_HA = 0.09  # 30 m x 30 m
# the published results (p. 54): areas in hectares (nearest hectare) with the half-width of the
# 95 % confidence interval, user's and producer's accuracies with their 95 % intervals and the
# overall accuracy (two decimals)
PUBLISHED_AREA_HA = [21_158, 11_686, 285_770, 581_386]
PUBLISHED_AREA_CI_HA = [6_158, 3_756, 15_510, 16_282]
PUBLISHED_USERS = [0.88, 0.73, 0.93, 0.96]
PUBLISHED_USERS_CI = [0.07, 0.10, 0.04, 0.02]
PUBLISHED_PRODUCERS = [0.75, 0.85, 0.93, 0.96]
PUBLISHED_PRODUCERS_CI = [0.21, 0.25, 0.03, 0.02]
PUBLISHED_OVERALL, PUBLISHED_OVERALL_CI = 0.95, 0.02


def test_olofsson_2014_worked_example_to_the_published_precision():
    mapped = np.array(TABLE8_MAPPED_PIXELS) * PIXEL_HA
    est = estimate_areas(TABLE8_COUNTS, mapped, CLASSES, unit="ha")
    assert [round(v) for v in est.area] == PUBLISHED_AREA_HA
    assert [round(v) for v in est.area_ci95] == PUBLISHED_AREA_CI_HA
    assert [round(v, 2) for v in est.users_accuracy] == PUBLISHED_USERS
    assert [round(Z95 * v, 2) for v in est.users_accuracy_se] == PUBLISHED_USERS_CI
    assert [round(v, 2) for v in est.producers_accuracy] == PUBLISHED_PRODUCERS
    assert [round(Z95 * v, 2) for v in est.producers_accuracy_se] == PUBLISHED_PRODUCERS_CI
    assert round(est.overall_accuracy, 2) == PUBLISHED_OVERALL
    assert round(Z95 * est.overall_accuracy_se, 2) == PUBLISHED_OVERALL_CI
    # the adjusted areas redistribute the mapped area: their sum is the map's area
    assert sum(est.area) == pytest.approx(sum(mapped))
    assert est.mapped_area == tuple(mapped)
    assert "Deforestation" in est.table() and est.to_dict()["counts"][0] == [66, 0, 5, 4]


def test_estimates_need_a_sample_in_every_mapped_stratum():
    from treesits_dask.errors import InputDataError

    with pytest.raises(InputDataError, match="no reference sample"):
        estimate_areas([[5, 1], [0, 0]], [10.0, 20.0], ("a", "b"))


def test_sample_sizes_from_target_standard_errors():
    # V(U) = U (1 - U) / (n - 1): n = U (1 - U) / SE^2 + 1
    sizes = sample_sizes({"Spruce": 0.7, "Beech": 0.9, "Oak": 1.0}, 0.05, minimum=20)
    assert sizes == {"Spruce": 85, "Beech": 37, "Oak": 20}
    est = estimate_areas([[60, 24], [3, 33]], [70.0, 30.0], ("a", "b"))
    u = est.users_accuracy[0]
    assert est.users_accuracy_se[0] == pytest.approx(np.sqrt(u * (1 - u) / 83))
    # Olofsson et al. (2014) eq. 13 with their conjectured accuracies: 641 samples for SE 0.01
    w = np.array(TABLE8_MAPPED_PIXELS) / sum(TABLE8_MAPPED_PIXELS)
    assert overall_sample_size(w, [0.7, 0.6, 0.9, 0.95], 0.01) == 641


def test_stratified_sample_of_a_chunked_map():
    import dask.array as da
    import xarray as xr

    rng = np.random.default_rng(3)
    values = rng.choice([0, 1, 2, 255], size=(90, 70), p=[0.6, 0.3, 0.02, 0.08]).astype(np.uint8)
    layer = xr.DataArray(
        da.from_array(values, chunks=(25, 30)), dims=("y", "x"),
        coords={"y": 1000.0 - 10 * np.arange(90) - 5, "x": 500.0 + 10 * np.arange(70) + 5},
    )  # fmt: skip
    x, y, c = draw_sample(layer, {0: 40, 1: 40, 2: 500}, seed=7)
    assert np.bincount(c, minlength=3).tolist() == [40, 40, int((values == 2).sum())]
    rows = ((1000.0 - 5 - y) / 10).astype(int)
    cols = ((x - 505.0) / 10).astype(int)
    np.testing.assert_array_equal(values[rows, cols], c)  # every point has its map class
    assert len(set(zip(rows, cols, strict=True))) == len(c)  # without replacement
    again = draw_sample(layer, {0: 40, 1: 40, 2: 500}, seed=7)
    np.testing.assert_array_equal(again[0], x)
    other = draw_sample(layer, {0: 40, 1: 40, 2: 500}, seed=8)
    assert not np.array_equal(other[0], x)


@pytest.mark.slow
def test_sample_and_evaluate_area_on_a_map(small_cube, native_lstm, tmp_path):
    """``sample`` draws a stratified sample from a map for a campaign; ``evaluate --area`` takes
    the campaign's reference labels (here the synthetic truth) and writes the estimates."""
    import rasterio

    from treesits_dask.cli import main
    from treesits_dask.training.area import map_class_areas, map_classes
    from treesits_dask.training.points import read_points, write_points

    out = tmp_path / "out"
    assert main(["run", "--cube", small_cube.root, "--mask-dir", small_cube.mask_dir,
                 "--model", native_lstm, "--output", str(out), "--window", "30x60",
                 "--workers", "1", "--dashboard-address", ":0"]) == 0  # fmt: skip
    points = tmp_path / "campaign.gpkg"
    assert main(["sample", str(out), "--output", str(points), "--per-class", "12",
                 "--seed", "1"]) == 0  # fmt: skip
    pts = read_points(str(points), label_column="map_class")
    classes, names, pixel_ha = map_classes(str(out))
    counts = map_class_areas(classes)
    assert pixel_ha == pytest.approx(0.01)
    want = sorted(names[c] for c, n in counts.items() for _ in range(min(12, n)))
    assert sorted(pts.labels) == want
    # the campaign: the reference class of each point from the synthetic truth
    truth = {}
    for tile in small_cube.tiles:
        with rasterio.open(f"{small_cube.truth_dir}/{tile}/species.tif") as src:
            truth[tile] = (src.read(1), src.transform)
    labels = []
    for x, y in zip(pts.x, pts.y, strict=True):
        for data, tr in truth.values():
            col, row = ~tr * (x, y)
            if 0 <= row < data.shape[0] and 0 <= col < data.shape[1]:
                labels.append(small_cube.class_names[data[int(row), int(col)]]
                              if data[int(row), int(col)] < 5 else "Spruce")  # fmt: skip
    reference = tmp_path / "reference.csv"
    write_points(str(reference), pts.x, pts.y, labels, pts.crs[0], pts.ids)
    report = tmp_path / "report" / "area"
    assert main(["evaluate", "--area", "--map", str(out), "--samples", str(reference),
                 "--report", str(report)]) == 0  # fmt: skip
    result = json.loads((tmp_path / "report" / "area_area.json").read_text())
    assert result["classes"] == names and result["unit"] == "ha"
    assert result["mapped_area"] == [pytest.approx(counts.get(c, 0) * 0.01)
                                     for c in range(len(names))]  # fmt: skip
    assert sum(result["area"]) == pytest.approx(sum(result["mapped_area"]))
    assert np.sum(result["counts"]) == len(pts)
    assert (tmp_path / "report" / "area_area.png").stat().st_size > 1000
    assert (tmp_path / "report" / "area_area.csv").read_text().startswith("class,mapped_area_ha")
