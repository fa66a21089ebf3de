"""Reference samples (GeoPackage / GeoJSON / CSV points, per-sample CSVs), training, fine-tuning,
evaluation and the train / evaluate commands, on the synthetic cube and the real SITS-NN weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio
import torch
import yaml
from rasterio.warp import transform

from treesits_dask.cli import main
from treesits_dask.config import DEFAULT_QAI_FLAGS, SampleSettings, TrainConfig, load_train_config
from treesits_dask.errors import ConfigError, InputDataError, ModelError
from treesits_dask.io import cube, discovery
from treesits_dask.io.cube import OPEN_COUNTER, tile_grid
from treesits_dask.io.datasets import DECODED, forget_datasets
from treesits_dask.io.discovery import S2_BANDS
from treesits_dask.io.qai import qai_invalid
from treesits_dask.models import ModelSpec, load_model
from treesits_dask.synthetic import sample_pixels
from treesits_dask.training.extract import load_samples
from treesits_dask.training.metrics import classification_metrics
from treesits_dask.training.points import read_points, write_points
from treesits_dask.training.sample_csv import read_sample_csvs, write_sample_csvs
from treesits_dask.training.samples import encode_labels, pixel_centres
from treesits_dask.training.train import evaluate, train

SITSNN = Path(__file__).resolve().parents[2] / "shared" / "data" / "sitsnn-weights" / "04"


@pytest.fixture(scope="module")
def refs(small_cube, tmp_path_factory):
    """Labelled pixels of both tiles of the small cube, as points in three files per tile."""
    d = tmp_path_factory.mktemp("refs")
    definition = discovery.read_cube_definition(small_cube.root)
    out = {"dir": d}
    for k, tile in enumerate(small_cube.tiles):
        grid = tile_grid(definition, discovery.scene_table(small_cube.root, tile)[0])
        rows, cols, labels = sample_pixels(small_cube, tile, n_per_class=100, seed=k)
        x, y = pixel_centres(grid, rows, cols)
        lon, lat = transform("EPSG:3035", "EPSG:4326", x.tolist(), y.tolist())
        names = [small_cube.class_names[v] for v in labels]
        ids = [f"{tile}_{r}_{c}" for r, c in zip(rows, cols, strict=True)]
        out[tile] = {
            "rows": rows,
            "cols": cols,
            "labels": labels,
            "x": x,
            "y": y,
            "lon": np.array(lon),
            "lat": np.array(lat),
            "ids": ids,
        }
        out[tile]["gpkg"] = write_points(d / f"{tile}.gpkg", lon, lat, names, "EPSG:4326", ids=ids)
        out[tile]["geojson"] = write_points(d / f"{tile}.geojson", x, y, labels, "EPSG:3035", ids)
        out[tile]["csv"] = write_points(d / f"{tile}.csv", lon, lat, names, "EPSG:4326", ids=ids)
    return out


def _raw_series(cube_root, tile, rows, cols, flags=DEFAULT_QAI_FLAGS):
    """(N, T, 10) BOA and (N, T) validity of pixels straight from the files (rasterio)."""
    series, valid = [], []
    for s in discovery.scene_table(cube_root, tile):
        with rasterio.open(s.boa) as src:
            boa = src.read()[:, rows, cols]  # (10, N)
        with rasterio.open(s.qai) as src:
            bad = qai_invalid(src.read(1)[rows, cols], flags)
        series.append(boa.T)
        valid.append((boa != -9999).all(axis=0) & ~bad)
    return np.stack(series, axis=1), np.stack(valid, axis=1)


# --- readers ---------------------------------------------------------------------------------


def test_points_in_three_formats_give_the_same_series(small_cube, refs):
    tile = small_cube.tiles[0]
    ref = refs[tile]
    got = {}
    for fmt in ("gpkg", "geojson", "csv"):
        pts = read_points(ref[fmt])
        assert list(pts.ids) == ref["ids"]
        settings = SampleSettings(
            samples=ref[fmt], cube=small_cube.root, class_names=list(small_cube.class_names)
        )
        got[fmt] = load_samples(settings)
    gpkg, geojson, csv_ = got["gpkg"], got["geojson"], got["csv"]
    # named labels (GeoPackage, CSV) and integer labels (GeoJSON) give the same classes
    for s in (geojson, csv_):
        np.testing.assert_array_equal(s.labels, gpkg.labels)
        np.testing.assert_array_equal(s.series, gpkg.series)
        assert s.ids == gpkg.ids
    assert gpkg.class_names == tuple(small_cube.class_names)
    assert set(gpkg.tiles) == {tile}
    # the series are the pixels' values in the files, QAI-screened like inference
    keep = [ref["ids"].index(i) for i in gpkg.ids]  # samples without a valid observation left out
    raw, valid = _raw_series(small_cube.root, tile, ref["rows"][keep], ref["cols"][keep])
    np.testing.assert_array_equal(gpkg.valid, valid)
    np.testing.assert_array_equal(gpkg.series[valid], raw[valid])
    assert (gpkg.series[~valid] == -9999).all()
    dates = [s.date for s in discovery.scene_table(small_cube.root, tile)]
    assert gpkg.dates == dates


def test_geopackage_written_by_gdal_and_read_by_gdal(tmp_path):
    pyogrio = pytest.importorskip("pyogrio")
    from pyogrio import raw

    geom = np.array(
        [struct.pack("<BIdd", 1, 1, 10.5, 50.1), struct.pack("<BIdd", 1, 1, 10.75, 50.25)],
        dtype=object,
    )
    path = tmp_path / "gdal.gpkg"
    raw.write(
        path,
        geometry=geom,
        field_data=[np.array(["Beech", "Oak"], dtype=object), np.array([7, 9])],
        fields=["species", "plot"],
        crs="EPSG:4326",
        driver="GPKG",
        geometry_type="Point",
    )
    pts = read_points(str(path), label_column="species", id_column="plot")
    assert pts.ids == ("7", "9") and pts.labels == ("Beech", "Oak")
    assert pts.crs == ("EPSG:4326", "EPSG:4326")
    np.testing.assert_array_equal(pts.x, [10.5, 10.75])
    np.testing.assert_array_equal(pts.y, [50.1, 50.25])

    ours = write_points(
        tmp_path / "ours.gpkg",
        [4321000.5, 4321010.5],
        [3210000.5, 3209990.5],
        [2, 4],
        "EPSG:3035",
        ids=["a", "b"],
    )
    info = pyogrio.read_info(ours)
    assert info["crs"] == "EPSG:3035" and info["geometry_type"] == "Point"
    meta, _, geoms, fields = raw.read(ours)
    assert list(meta["fields"]) == ["id", "label"]
    assert list(fields[0]) == ["a", "b"] and list(fields[1]) == [2, 4]
    assert [struct.unpack("<BIdd", g)[2:] for g in geoms] == [
        (4321000.5, 3210000.5),
        (4321010.5, 3209990.5),
    ]


def test_csv_columns_and_crs(tmp_path):
    p = tmp_path / "pts.csv"
    p.write_text("plot,lon,lat,species\nA,10.5,50.1,Beech\nB,10.6,50.2,Oak\n")
    pts = read_points(str(p), label_column="species", id_column="plot")
    assert pts.crs == ("EPSG:4326",) * 2 and pts.ids == ("A", "B")
    p.write_text("x,y,label\n4321000,3210000,1\n")
    with pytest.raises(ConfigError, match="names no CRS"):
        read_points(str(p))
    assert read_points(str(p), crs="EPSG:3035").crs == ("EPSG:3035",)
    p.write_text("x,y,klass\n4321000,3210000,1\n")
    with pytest.raises(ConfigError, match="label_column"):
        read_points(str(p), crs="EPSG:3035")
    gj = tmp_path / "poly.geojson"
    gj.write_text(
        json.dumps(
            {
                "type": "FeatureCollection",
                "features": [
                    {
                        "type": "Feature",
                        "id": "p1",
                        "properties": {"label": 1},
                        "geometry": {
                            "type": "Polygon",
                            "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 0]]],
                        },
                    }
                ],
            }
        )
    )
    with pytest.raises(InputDataError, match="sample p1 is a Polygon"):
        read_points(str(gj))


def test_labels_named_and_integer():
    codes, names = encode_labels(["Oak", "Beech", "Oak"])
    assert names == ("Beech", "Oak") and codes.tolist() == [1, 0, 1]
    codes, names = encode_labels(["Oak", "Beech"], class_names=["Spruce", "Beech", "Oak"])
    assert codes.tolist() == [2, 1]
    codes, names = encode_labels([2, "0", 1.0])
    assert codes.tolist() == [2, 0, 1] and names == ("class_0", "class_1", "class_2")
    with pytest.raises(InputDataError, match="Larch"):
        encode_labels(["Larch"], class_names=["Spruce", "Beech"])
    with pytest.raises(InputDataError, match="outside 0..1"):
        encode_labels([0, 2], class_names=["a", "b"], ids=["x", "y"])
    with pytest.raises(InputDataError, match="mixes"):
        encode_labels([0, "Oak"])
    with pytest.raises(InputDataError, match=r"\['s2'\] have no label"):
        encode_labels(["Oak", ""], ids=["s1", "s2"])


def test_points_outside_the_cube_are_named(small_cube, refs, tmp_path):
    ref = refs[small_cube.tiles[0]]
    lon = np.append(ref["lon"][:3], 13.4)  # Berlin: far outside the two tiles
    lat = np.append(ref["lat"][:3], 52.5)
    path = write_points(
        tmp_path / "out.geojson",
        lon,
        lat,
        [0, 1, 2, 3],
        "EPSG:4326",
        ids=["p1", "p2", "p3", "berlin"],
    )
    settings = SampleSettings(samples=path, cube=small_cube.root)
    with pytest.raises(InputDataError, match=r"1 of 4 samples .* sample berlin at \(13\.4"):
        load_samples(settings)
    with pytest.raises(ConfigError, match="'cube' setting"):
        load_samples(SampleSettings(samples=path))


def test_each_window_is_read_once(small_cube, refs):
    tile = small_cube.tiles[0]
    ref = refs[tile]
    # 20-row windows: the points of the top and the bottom third only -> two windows
    sel = np.flatnonzero((ref["rows"] < 20) | (ref["rows"] >= 40))
    path = write_points(
        Path(refs["dir"]) / "two_windows.csv",
        ref["x"][sel],
        ref["y"][sel],
        ref["labels"][sel],
        "EPSG:3035",
    )
    settings = SampleSettings(samples=path, cube=small_cube.root, window="20x60")
    n_scenes = len(discovery.scene_table(small_cube.root, tile))
    forget_datasets()
    before, decoded = OPEN_COUNTER.count, DECODED.snapshot()[1]
    with dask.config.set(scheduler="synchronous"):  # one reading thread: its files stay open
        samples = load_samples(settings)
    # every header (BOA and QAI) checked once on the driver, as run checks them, then every QAI
    # file once and every BOA at most once (kept open by the thread for the next band; a BOA whose
    # blocks there QAI screens whole, as an all-cloud scene's, is not opened), and no block
    # decoded twice
    assert 3 * n_scenes <= OPEN_COUNTER.count - before <= 1 + n_scenes * 4
    assert DECODED.snapshot()[1] - decoded <= n_scenes * 11 * 60 * 60 * 2
    raw, valid = _raw_series(small_cube.root, tile, ref["rows"][sel], ref["cols"][sel])
    keep = valid.any(axis=1)
    np.testing.assert_array_equal(samples.valid, valid[keep])
    np.testing.assert_array_equal(samples.series[samples.valid], raw[keep][valid[keep]])


def test_samples_of_a_tile_in_two_layouts_are_read_in_each_scenes_layout(tmp_path, monkeypatch):
    """A tile whose first and newest scenes a newer FORCE wrote again as COGs, strips between: the
    driver reads every scene's header (as ``run`` and ``open_cube`` do), so the strips between are
    read in their own blocks (from the first and the newest header only, all were taken for COGs)
    and a file of another grid is named before anything is read; the series are those of the
    all-strips cube."""
    from tests.two_layouts import TILE, to_cogs, two_layouts
    from treesits_dask.io.layouts import block_shape_of
    from treesits_dask.training import extract

    cubes, folder = two_layouts(tmp_path, size=120, n=7)
    boas = [Path(s.boa).name for s in discovery.scene_table(str(folder.parent), TILE)]
    to_cogs(cubes, folder, [boas[0], boas[-1]])
    grid = tile_grid(discovery.read_cube_definition(cubes["strips"].root),
                     discovery.scene_table(cubes["strips"].root, TILE)[0])  # fmt: skip
    rows, cols = np.array([3, 50, 64, 119]), np.array([7, 60, 2, 118])
    x, y = pixel_centres(grid, rows, cols)
    points = write_points(tmp_path / "points.csv", x, y, [0, 1, 0, 1], "EPSG:3035")
    seen = []

    def tile_cube(scenes, *args, **kwargs):
        seen.append(([s.block_shape for s in scenes], kwargs.get("checked")))
        return cube.tile_cube(scenes, *args, **kwargs)

    monkeypatch.setattr(extract, "tile_cube", tile_cube)
    got = {
        name: load_samples(SampleSettings(samples=points, cube=str(root), window="40x40"))
        for name, root in (("strips", cubes["strips"].root), ("mixed", folder.parent))
    }
    strips, cog = (block_shape_of(str(folder / boas[k])) for k in (1, 0))
    assert strips != cog
    shapes, checked = seen[-1]
    assert shapes == [cog] + [strips] * 5 + [cog] and checked  # the workers trust those headers
    for key in ("series", "valid", "days"):
        np.testing.assert_array_equal(getattr(got["mixed"], key), getattr(got["strips"], key))
    # a scene between replaced by a file of another grid: named, before any read
    bad = folder / boas[3]
    with rasterio.open(bad) as f:
        profile = f.profile
    profile.update(width=20, height=20)
    with rasterio.open(bad, "w", **profile) as f:
        f.write(np.zeros((profile["count"], 20, 20), profile["dtype"]))
    decoded = DECODED.snapshot()[1]
    with pytest.raises(InputDataError, match=boas[3]):
        load_samples(SampleSettings(samples=points, cube=str(folder.parent), window="40x40"))
    assert DECODED.snapshot()[1] == decoded


def test_per_sample_csvs_round_trip_and_gee_columns(small_cube, refs, tmp_path):
    ref = refs[small_cube.tiles[0]]
    settings = SampleSettings(samples=ref["gpkg"], cube=small_cube.root)
    samples = load_samples(settings)
    folder = write_sample_csvs(samples, str(tmp_path / "csvs"), label_column="species")
    back = read_sample_csvs(folder, label_column="species", class_names=samples.class_names)
    np.testing.assert_array_equal(back.series, samples.series)
    np.testing.assert_array_equal(back.days, samples.days)
    np.testing.assert_array_equal(back.labels, samples.labels)
    assert back.sensors == samples.sensors and back.ids == samples.ids
    # Earth Engine style: Sentinel-2 band ids, YYYYMMDD dates, missing values, extra columns
    g = tmp_path / "gee"
    g.mkdir()
    (g / "labels.csv").write_text("id,label\nplot1,Oak\nplot2,Beech\n")
    head = "date,B2,B3,B4,B5,B6,B7,B8,B8A,B9,B11,B12,spacecraft_id\n"
    (g / "plot1.csv").write_text(
        head + "20220105,1,2,3,4,5,6,7,8,99,9,10,S2A\n20220115,,2,3,4,5,6,7,8,99,9,10,S2A\n"
    )
    (g / "plot2.csv").write_text(head + "20220110,11,12,13,14,15,16,17,18,99,19,20,S2B\n")
    s = read_sample_csvs(str(g))
    assert s.class_names == ("Beech", "Oak") and s.labels.tolist() == [1, 0]
    assert [str(d) for d in s.dates] == ["2022-01-05", "2022-01-10", "2022-01-15"]
    np.testing.assert_array_equal(s.series[0, 0], np.arange(1, 11))
    np.testing.assert_array_equal(s.series[1, 1], np.arange(11, 21))
    assert s.valid.tolist() == [[True, False, False], [False, True, False]]  # the gap is invalid
    (g / "plot2.csv").write_text("date,B2\n20220110,11\n")
    with pytest.raises(InputDataError, match="missing: GREEN"):
        read_sample_csvs(str(g))


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_equal_an_independent_computation():
    rng = np.random.default_rng(4)
    t = rng.integers(0, 4, 500)
    p = np.where(rng.random(500) < 0.7, t, rng.integers(0, 4, 500))
    p[p == 3] = 2  # class 3 is never predicted
    names = ["a", "b", "c", "d"]
    m = classification_metrics(t, p, names)
    cm = np.zeros((4, 4), int)
    for a, b in zip(t, p, strict=True):
        cm[a, b] += 1
    assert m["confusion_matrix"] == cm.tolist()
    assert m["overall_accuracy"] == pytest.approx(np.mean(t == p))
    for k, n in enumerate(names):
        tp = np.sum((t == k) & (p == k))
        prec = tp / np.sum(p == k) if np.sum(p == k) else 0.0
        rec = tp / np.sum(t == k)
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        assert m["per_class"][n]["precision"] == pytest.approx(prec)
        assert m["per_class"][n]["recall"] == pytest.approx(rec)
        assert m["per_class"][n]["f1"] == pytest.approx(f1)
        assert m["per_class"][n]["support"] == np.sum(t == k)
    po = np.mean(t == p)
    pe = sum(np.mean(t == k) * np.mean(p == k) for k in range(4))
    assert m["kappa"] == pytest.approx((po - pe) / (1 - pe))


# --- training --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(small_cube, refs):
    """A sits-lstm trained with the CLI from a train.yaml on the points of the first tile."""
    d = Path(refs["dir"])
    cfg = {
        "samples": refs[small_cube.tiles[0]]["gpkg"],
        "cube": small_cube.root,
        "class_names": list(small_cube.class_names),
        "family": "sits-lstm",
        "test_fraction": 0.25,
        "max_seconds": 120,
        "max_epochs": 150,
        "seed": 0,
        "output": str(d / "model" / "species.pt"),
        "device": "cpu",
    }
    (d / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(d / "train.yaml"), "--no-progress"]) == 0
    return d / "train.yaml", d / "model" / "species.pt"


def test_train_reaches_90_percent_on_held_out_samples(small_cube, refs, trained, tmp_path):
    config_path, pt = trained
    card = json.loads(pt.with_suffix(".json").read_text())
    m = card["metrics"]
    assert m["test"]["overall_accuracy"] >= 0.9, m["test"]
    assert m["validation"]["overall_accuracy"] >= 0.9
    assert m["seconds"] > 0  # the training time is reported (the demo prints it; no timed asserts)
    # samples of the other tile, never seen in training
    other = refs[small_cube.tiles[1]]["csv"]
    report = tmp_path / "other_tile"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(pt),
                "--config",
                str(config_path),
                "--samples",
                other,
                "--report",
                str(report),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "other_tile_metrics.json").read_text())
    assert metrics["overall_accuracy"] >= 0.9, metrics
    png = tmp_path / "other_tile_confusion.png"
    assert png.stat().st_size > 5000
    table = (tmp_path / "other_tile_confusion.csv").read_text().splitlines()
    assert table[0].split(",")[1:6] == list(small_cube.class_names) and len(table) == 6


def test_model_card_and_evaluate_match_the_predictions(small_cube, refs, trained):
    config_path, pt = trained
    card = json.loads(pt.with_suffix(".json").read_text())
    assert card["family"] == "sits-lstm" and card["output_kind"] == "softmax"
    assert card["class_names"] == list(small_cube.class_names)
    assert card["bands"] == list(S2_BANDS)
    assert card["sequence"] == {"kind": "full"}
    pre, tr = card["metrics"]["preprocessing"], card["metrics"]["training"]
    assert pre["qai"] == list(DEFAULT_QAI_FLAGS) and pre["sensors"] == ["SEN2A", "SEN2B", "SEN2C"]
    assert pre["time_steps"] == 10 and "0 in all bands" in pre["input"]
    assert tr["n_samples"] == sum(tr["class_counts"].values()) and tr["seed"] == 0
    val = card["metrics"]["validation"]
    assert val["class_names"] == list(small_cube.class_names)
    assert np.sum(val["confusion_matrix"]) == card["metrics"]["n_val"]
    assert Path(str(pt)[:-3] + "_validation_confusion.png").stat().st_size > 5000

    # evaluate() equals a numpy confusion matrix of the loaded model's own predictions
    model = load_model(ModelSpec(str(pt), "native"), device="cpu")
    samples = load_samples(
        load_train_config(config_path).model_copy(
            update={"samples": refs[small_cube.tiles[1]]["geojson"]}
        )
    )
    m = evaluate(model, samples)
    probs, _ = model.predict(samples.series, samples.valid, samples.days)
    pred = probs.argmax(axis=1)
    cm = np.zeros((5, 5), int)
    np.add.at(cm, (samples.labels, pred), 1)
    assert m["confusion_matrix"] == cm.tolist()
    assert m["overall_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())


def test_fine_tune_published_sitsnn_weights(small_cube, refs, tmp_path):
    base = load_model(
        ModelSpec(
            str(SITSNN / "lstm_5pure.pth"), "sits-lstm", str(SITSNN / "lstm_5pure_params.json")
        ),
        device="cpu",
    )
    config = TrainConfig(
        samples=refs[small_cube.tiles[0]]["gpkg"],
        cube=small_cube.root,
        family="sits-lstm",
        init_from=str(SITSNN / "lstm_5pure.pth"),
        init_params=str(SITSNN / "lstm_5pure_params.json"),
        max_epochs=2,
        max_seconds=60,
        output=str(tmp_path / "tuned.pt"),
        device="cpu",
    )
    predictor, metrics = train(config)
    assert metrics["fine_tuned"] and metrics["epochs"] == 2
    assert predictor.card.hyperparameters == base.card.hyperparameters  # the published architecture
    assert predictor.card.class_names == list(base.card.class_names)  # Spruce ... Oak
    before, after = base.module.state_dict(), predictor.module.state_dict()
    assert set(before) == set(after)
    changed = [k for k in before if not torch.allclose(before[k].float(), after[k].float())]
    assert "lstm.weight_ih_l0" in changed and "fc.4.weight" in changed
    # the saved model reads raw BOA like the published one
    saved = load_model(ModelSpec(str(tmp_path / "tuned.pt"), "native"), device="cpu")
    s = load_samples(config)
    a, _ = predictor.predict(s.series, s.valid, s.days)
    b, _ = saved.predict(s.series, s.valid, s.days)
    np.testing.assert_allclose(a, b, atol=1e-6)

    # other classes than the checkpoint: a new last layer, the rest starts from the weights
    two = refs[small_cube.tiles[0]]
    path = write_points(
        tmp_path / "two.csv",
        two["x"],
        two["y"],
        ["conifer" if v in (0, 2, 3) else "broadleaf" for v in two["labels"]],
        "EPSG:3035",
    )
    p2, _ = train(
        config.model_copy(
            update={"samples": path, "output": str(tmp_path / "two.pt"), "max_epochs": 1}
        )
    )
    assert p2.card.class_names == ["broadleaf", "conifer"]
    assert p2.card.hyperparameters["num_classes"] == 2
    assert p2.module.fc[4].weight.shape == (2, 256)


def test_fine_tune_transformer_keeps_exact_raw_inputs(small_cube, refs, tmp_path):
    """A learning rate of ~0 leaves the published weights unchanged: unfold / fold is exact."""
    base = load_model(
        ModelSpec(
            str(SITSNN / "transformer_5pure.pth"),
            "sits-transformer",
            str(SITSNN / "transformer_5pure_params.json"),
        ),
        device="cpu",
    )
    config = TrainConfig(
        samples=refs[small_cube.tiles[0]]["csv"],
        cube=small_cube.root,
        family="sits-transformer",
        init_from=str(SITSNN / "transformer_5pure.pth"),
        init_params=str(SITSNN / "transformer_5pure_params.json"),
        max_epochs=1,
        learning_rate=1e-20,
        output=str(tmp_path / "same.pt"),
        device="cpu",
    )
    predictor, _ = train(config)
    before, after = base.module.state_dict(), predictor.module.state_dict()
    for k in ("src_embd.weight", "transformer_encoder.layers.0.linear1.weight", "fc.4.weight"):
        torch.testing.assert_close(after[k], before[k], rtol=1e-5, atol=1e-6)
    # the bias is held in float32 in the standardised space while training (values ~ 1e3)
    torch.testing.assert_close(after["src_embd.bias"], before["src_embd.bias"], rtol=0, atol=1e-3)


def test_train_sbert_binary_and_multiclass(small_cube, refs, tmp_path):
    ref = refs[small_cube.tiles[0]]
    path = write_points(
        tmp_path / "bin.csv",
        ref["x"],
        ref["y"],
        ["conifer" if v in (0, 2, 3) else "broadleaf" for v in ref["labels"]],
        "EPSG:3035",
    )
    config = TrainConfig(
        samples=path,
        cube=small_cube.root,
        family="sbert",
        max_epochs=15,
        output=str(tmp_path / "sbert.pt"),
        device="cpu",
    )
    predictor, metrics = train(config)
    # like the published disturbance model: one sigmoid output named after the positive class
    assert predictor.card.output_kind == "sigmoid" and predictor.card.class_names == ["conifer"]
    assert predictor.card.sequence["kind"] == "sbert"
    assert metrics["validation"]["class_names"] == ["broadleaf", "conifer"]
    assert metrics["validation"]["overall_accuracy"] >= 0.9
    loaded = load_model(ModelSpec(str(tmp_path / "sbert.pt"), "native"), device="cpu")
    s = load_samples(config)
    assert evaluate(loaded, s)["class_names"] == ["broadleaf", "conifer"]

    multi = config.model_copy(
        update={"samples": ref["geojson"], "max_epochs": 2, "output": str(tmp_path / "multi.pt")}
    )
    p5, _ = train(multi)
    assert p5.card.output_kind == "softmax" and p5.card.n_classes == 5
    probs, _ = p5.predict(s.series[:20], s.valid[:20], s.days)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # probabilities, not logits


def test_train_from_per_sample_csvs(small_cube, refs, tmp_path):
    samples = load_samples(
        SampleSettings(samples=refs[small_cube.tiles[0]]["gpkg"], cube=small_cube.root)
    )
    folder = write_sample_csvs(samples, str(tmp_path / "csvs"))
    config = TrainConfig(samples=folder, max_epochs=3, output=str(tmp_path / "m.pt"), device="cpu")
    predictor, metrics = train(config)
    assert predictor.card.class_names == list(samples.class_names)
    assert metrics["training"]["tiles"] == [] and metrics["n_train"] + metrics["n_val"] == len(
        samples
    )


def test_train_config_errors(tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text("samples: pts.csv\noutput: m.pt\nlearning_rte: 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting 'learning_rte'.*learning_rate"):
        load_train_config(p)
    with pytest.raises(ConfigError, match="init_params"):
        load_train_config(
            overrides={
                "samples": "x.csv",
                "output": "m.pt",
                "init_from": str(SITSNN / "lstm_5pure.pth"),
            }
        )
    with pytest.raises(ConfigError, match="output"):
        load_train_config(overrides={"samples": "x.csv"})
    assert (
        main(
            [
                "train",
                "--samples",
                "x.csv",
                "--output",
                str(tmp_path / "m.pt"),
                "--crs",
                "EPSG:3035",
                "--no-progress",
            ]
        )
        == 2
    )


def test_fine_tune_family_mismatch(small_cube, refs, tmp_path):
    config = TrainConfig(
        samples=refs[small_cube.tiles[0]]["csv"],
        cube=small_cube.root,
        family="sits-lstm",
        init_from=str(SITSNN / "transformer_5pure.pth"),
        init_family="sits-transformer",
        init_params=str(SITSNN / "transformer_5pure_params.json"),
        output=str(tmp_path / "x.pt"),
    )
    with pytest.raises(ModelError, match="family: sits-transformer"):
        train(config)
