"""Models: published SITS-NN weights, checkpoint errors, cards, windows, native round trip,
training."""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from treesits_dask.errors import ModelError
from treesits_dask.io.discovery import S2_BANDS
from treesits_dask.models import (
    FAMILIES,
    ModelCard,
    ModelSpec,
    effective_window,
    load_model,
    read_card,
    save_native,
)
from treesits_dask.models.architectures import LSTMClassifier, TransformerClassifier
from treesits_dask.models.preprocess import full_inputs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WEIGHTS = DATA / "sitsnn-weights" / "04"
PUBLISHED = {"sits-lstm": "lstm_5pure", "sits-transformer": "transformer_5pure"}


def _spec(family: str, params: Path | None = None, weights: Path | None = None) -> ModelSpec:
    stem = PUBLISHED[family]
    return ModelSpec(
        str(weights or WEIGHTS / f"{stem}.pth"),
        family,
        str(params or WEIGHTS / f"{stem}_params.json"),
    )


def _random_inputs(n: int, t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    series = rng.integers(-500, 6000, (n, t, 10)).astype(np.int16)
    valid = rng.random((n, t)) > 0.4
    valid[np.arange(n), rng.integers(0, t, n)] = True
    series[~valid] = -9999
    days = 16000 + np.sort(rng.choice(900, t, replace=False)).astype(np.int64)
    return series, valid, days


def _card(
    family: str, hp: dict, classes=("Spruce", "Beech", "Pine", "Douglas fir", "Oak")
) -> ModelCard:
    return ModelCard(
        family=family,
        hyperparameters=hp,
        bands=list(S2_BANDS),
        class_names=list(classes),
        output_kind="softmax",
        sequence={"kind": "full"},
    )


# --- published SITS-NN weights ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["sits-lstm", "sits-transformer"])
def test_published_sitsnn_weights(family):
    predictor = load_model(_spec(family), device="cpu")
    assert predictor.device == torch.device("cpu")
    assert not predictor.module.training
    assert predictor.card.class_names == ["Spruce", "Beech", "Pine", "Douglas fir", "Oak"]
    assert predictor.card.multiclass and predictor.card.n_classes == 5
    series, valid, days = _random_inputs(70, 23)
    probs, n_used = predictor.predict(series, valid, days, batch_size=32)
    assert probs.shape == (70, 5) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs >= 0).all()
    np.testing.assert_array_equal(n_used, valid.sum(axis=1))
    assert len(np.unique(probs.argmax(1))) > 1 or probs.std(axis=0).max() > 1e-3  # not constant

    # batching does not change results
    again, _ = predictor.predict(series, valid, days, batch_size=7)
    np.testing.assert_allclose(again, probs, rtol=1e-5, atol=1e-6)


def test_sitsnn_inputs_zero_filled_raw_and_sequence_first():
    """Invalid observations are 0 in all bands, values stay raw; the transformer sees (T, N, 10)."""
    series, valid, days = _random_inputs(9, 11, seed=3)
    x, n = full_inputs(series, valid)
    assert x.dtype == np.float32
    assert (x[~valid] == 0).all()
    np.testing.assert_array_equal(x[valid], series[valid].astype(np.float32))
    np.testing.assert_array_equal(n, valid.sum(1))

    predictor = load_model(_spec("sits-transformer"), device="cpu")
    probs, _ = predictor.predict(series, valid, days)
    with torch.inference_mode():
        direct = predictor.module(torch.from_numpy(x).transpose(0, 1)).numpy()
        # the published model is order sensitive: the last position's output is used
        reversed_ = predictor.module(torch.from_numpy(x[:, ::-1].copy()).transpose(0, 1)).numpy()
    np.testing.assert_allclose(probs, direct, rtol=1e-5, atol=1e-6)
    assert not np.allclose(direct, reversed_, atol=1e-4)

    lstm = load_model(_spec("sits-lstm"), device="cpu")
    probs, _ = lstm.predict(series, valid, days)
    with torch.inference_mode():
        np.testing.assert_allclose(
            probs, lstm.module(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6
        )


def test_read_card_without_torch_import():
    code = (
        "import sys\n"
        "from treesits_dask.models import ModelSpec, read_card, effective_window, ModelCard\n"
        f"c = read_card(ModelSpec({str(WEIGHTS / 'lstm_5pure.pth')!r}, 'sits-lstm', "
        f"{str(WEIGHTS / 'lstm_5pure_params.json')!r}))\n"
        "assert c.hyperparameters['hidden_size'] == 64, c\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr


def test_transformer_card_from_params():
    card = read_card(_spec("sits-transformer"))
    assert card.family == "sits-transformer" and card.sequence == {"kind": "full"}
    assert card.hyperparameters == {
        "num_bands": 10,
        "num_classes": 5,
        "d_model": 64,
        "nhead": 8,
        "num_layers": 2,
        "dim_feedforward": 256,
    }


# --- checkpoint errors -----------------------------------------------------------------------


def test_missing_params_asks_for_model_params():
    with pytest.raises(ModelError, match="--model-params"):
        load_model(ModelSpec(str(WEIGHTS / "lstm_5pure.pth"), "sits-lstm"), device="cpu")


def test_unknown_family():
    with pytest.raises(ModelError, match="sits-lstm"):
        ModelSpec("x.pt", "lstm")
    assert set(FAMILIES) == {"sbert", "sits-lstm", "sits-transformer", "native"}


def test_wrong_family_for_checkpoint():
    spec = ModelSpec(
        str(WEIGHTS / "transformer_5pure.pth"), "sits-lstm", str(WEIGHTS / "lstm_5pure_params.json")
    )
    with pytest.raises(ModelError, match="transformer_5pure.pth") as err:
        load_model(spec, device="cpu")
    assert "missing keys" in str(err.value) and "unexpected keys" in str(err.value)


def test_wrong_shape_and_missing_key(tmp_path):
    state = torch.load(WEIGHTS / "lstm_5pure.pth", map_location="cpu", weights_only=True)
    bad = dict(state)
    bad["fc.4.weight"] = torch.zeros(4, 256)
    path = tmp_path / "wrong_shape.pth"
    torch.save(bad, path)
    with pytest.raises(ModelError, match="wrong_shape.pth") as err:
        load_model(_spec("sits-lstm", weights=path), device="cpu")
    assert "fc.4.weight" in str(err.value) and "(4, 256)" in str(err.value)

    missing = {k: v for k, v in state.items() if k != "lstm.weight_hh_l1"}
    path = tmp_path / "missing_key.pth"
    torch.save(missing, path)
    with pytest.raises(ModelError, match="missing_key.pth") as err:
        load_model(_spec("sits-lstm", weights=path), device="cpu")
    assert "lstm.weight_hh_l1" in str(err.value)


def test_band_count_in_params(tmp_path):
    params = json.loads((WEIGHTS / "lstm_5pure_params.json").read_text())
    params["lstm hyperparameters"]["number of bands"] = 7
    p = tmp_path / "seven_params.json"
    p.write_text(json.dumps(params))
    for call in (read_card, lambda s: load_model(s, device="cpu")):
        with pytest.raises(ModelError, match="seven_params.json") as err:
            call(_spec("sits-lstm", params=p))
        assert "7 bands" in str(err.value) and "10" in str(err.value)


def test_malicious_pickle_refused(tmp_path):
    marker = tmp_path / "marker"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"fc.0.weight": Evil()}))  # legacy (non-zip) pickle
    bad_zip = tmp_path / "evil_zip.pth"
    torch.save({"model_state_dict": Evil()}, bad_zip)
    for path, family in ((bad, "sits-lstm"), (bad_zip, "sbert")):
        spec = ModelSpec(
            str(path),
            family,
            str(WEIGHTS / "lstm_5pure_params.json") if family != "sbert" else None,
        )
        with pytest.raises(ModelError, match="refused to load") as err:
            load_model(spec, device="cpu")
        assert path.name in str(err.value) and "weights_only" in str(err.value)
    assert not marker.exists()


def test_unreadable_and_missing_checkpoint(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a torch file")
    with pytest.raises(ModelError, match="junk.pth") as err:
        load_model(_spec("sits-lstm", weights=junk), device="cpu")
    assert "unreadable" in str(err.value) and "refused" not in str(err.value)
    with pytest.raises(ModelError, match="nope.pth"):
        read_card(_spec("sits-lstm", weights=tmp_path / "nope.pth"))


# --- native checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sits-lstm", "sits-transformer"])
def test_native_round_trip(tmp_path, family):
    torch.manual_seed(1)
    if family == "sits-lstm":
        hp = {
            "num_bands": 10,
            "input_size": 8,
            "hidden_size": 12,
            "num_layers": 1,
            "num_classes": 3,
            "bidirectional": False,
        }
        module = LSTMClassifier(**hp)
    else:
        hp = {
            "num_bands": 10,
            "num_classes": 3,
            "d_model": 16,
            "nhead": 2,
            "num_layers": 1,
            "dim_feedforward": 32,
        }
        module = TransformerClassifier(**hp)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        module.fc[2].running_mean.uniform_(-1, 1)
        module.fc[2].running_var.uniform_(0.5, 2)
    module.eval()
    card = _card(family, hp, classes=("a", "b", "c"))
    pt, js = save_native(module, card, str(tmp_path / "sub" / "m.pt"))
    assert pt.endswith("m.pt") and js.endswith("m.json") and Path(js).is_file()
    assert read_card(ModelSpec(pt, "native")) == card

    series, valid, days = _random_inputs(40, 9, seed=5)
    x, _ = full_inputs(series, valid)
    with torch.inference_mode():
        expected = (
            module(torch.from_numpy(x))
            if family == "sits-lstm"
            else module(torch.from_numpy(x).transpose(0, 1))
        ).numpy()
    loaded = load_model(ModelSpec(pt, "native"), device="cpu")
    probs, _ = loaded.predict(series, valid, days)
    np.testing.assert_array_equal(probs, expected)
    assert loaded.card.class_names == ["a", "b", "c"]


def test_native_card_errors(tmp_path):
    hp = {"num_bands": 10, "input_size": 4, "hidden_size": 4, "num_layers": 1, "num_classes": 2}
    pt, js = save_native(
        LSTMClassifier(**hp), _card("sits-lstm", hp, ("x", "y")), str(tmp_path / "m.pt")
    )
    raw = json.loads(Path(js).read_text())
    raw["bands"] = raw["bands"][:7]
    Path(js).write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="m.json") as err:
        read_card(ModelSpec(pt, "native"))
    assert "bands" in str(err.value)
    Path(js).unlink()
    with pytest.raises(ModelError, match="m.json"):
        load_model(ModelSpec(pt, "native"), device="cpu")
    with pytest.raises(ModelError, match="do not match"):
        save_native(
            LSTMClassifier(**{**hp, "hidden_size": 5}),
            _card("sits-lstm", hp, ("x", "y")),
            str(tmp_path / "n.pt"),
        )


# --- windows ---------------------------------------------------------------------------------


def test_effective_window():
    sits = _card("sits-lstm", {})
    sbert = ModelCard(
        family="sbert",
        hyperparameters={},
        bands=list(S2_BANDS),
        class_names=["disturbance"],
        output_kind="sigmoid",
        sequence={"kind": "sbert", "seq_len": 256, "window_days": 1460, "max_position": 1826},
    )
    dates = [dt.date(2017, 3, 1), dt.date(2019, 1, 5), dt.date(2023, 8, 30), dt.date(2021, 6, 1)]
    d = dt.date
    assert effective_window(sits, dates, None, None) == (d(2017, 3, 1), d(2023, 8, 30))
    assert effective_window(sits, dates, d(2018, 1, 1), None) == (d(2018, 1, 1), d(2023, 8, 30))
    assert effective_window(sits, dates, None, d(2020, 1, 1)) == (d(2017, 3, 1), d(2020, 1, 1))
    assert effective_window(sbert, dates, None, None) == (
        d(2023, 8, 30) - dt.timedelta(1460),
        d(2023, 8, 30),
    )
    assert effective_window(sbert, dates, None, d(2022, 1, 1)) == (d(2018, 1, 2), d(2022, 1, 1))
    # a later start shortens the window, an earlier one cannot lengthen it
    assert effective_window(sbert, dates, d(2022, 1, 1), None) == (d(2022, 1, 1), d(2023, 8, 30))
    assert effective_window(sbert, dates, d(2010, 1, 1), None)[0] == d(2019, 8, 31)
    with pytest.raises(ModelError, match="--start-date"):
        effective_window(sits, dates, d(2024, 1, 1), None)


# --- training --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sits-lstm", "sits-transformer"])
def test_fit_easy_problem(family, tmp_path):
    from treesits_dask.training.fit import fit

    rng = np.random.default_rng(0)
    n, t = 300, 16
    phase = np.linspace(0, 2 * np.pi, t)
    labels = rng.integers(0, 2, n)
    curve = np.where(labels[:, None] == 0, 2500 + 1500 * np.sin(phase), 2500 - 1500 * np.sin(phase))
    series = (
        curve[:, :, None] * np.linspace(0.5, 1.5, 10) + rng.normal(0, 250, (n, t, 10))
    ).astype(np.int16)
    valid = rng.random((n, t)) > 0.3
    valid[:, -1] = True
    series[~valid] = -9999
    days = 17000 + 20 * np.arange(t)
    predictor, metrics = fit(
        family, series, valid, days, labels, ["broadleaf", "conifer"], max_seconds=15, seed=1
    )
    assert metrics["val_accuracy"] > 0.9, metrics
    assert predictor.card.metrics["val_accuracy"] == metrics["val_accuracy"]
    assert metrics["seconds"] < 20
    # the trained model reads raw BOA exactly like inference; save/load keeps it identical
    pt, _ = save_native(predictor.module, predictor.card, str(tmp_path / "trained.pt"))
    loaded = load_model(ModelSpec(pt, "native"), device="cpu")
    a, _ = predictor.predict(series, valid, days)
    b, _ = loaded.predict(series, valid, days)
    np.testing.assert_array_equal(a, b)
    assert float((a.argmax(1) == labels).mean()) > 0.9
    assert loaded.card.metrics["val_accuracy"] == metrics["val_accuracy"]


def test_fit_rejects_bad_labels():
    from treesits_dask.training.fit import fit

    series, valid, days = _random_inputs(10, 4)
    with pytest.raises(ModelError, match="labels"):
        fit("sits-lstm", series, valid, days, np.full(10, 3), ["a", "b"], max_seconds=1)
    with pytest.raises(ModelError, match="native"):  # a native card names its architecture
        fit("native", series, valid, days, np.zeros(10, int), ["a", "b"], max_seconds=1)


def test_only_masked_valid_pixels_reach_the_model_in_full_batches(native_lstm):
    """In a window, the model sees exactly the pixels inside the mask with a valid observation,
    in batches of ``batch_size`` except the last one."""
    from treesits_dask.models import ModelSpec
    from treesits_dask.pipeline.predict import get_predictor, predict_block

    rng = np.random.default_rng(5)
    t, h, w = 12, 40, 50
    block = rng.integers(0, 3000, size=(t, 10, h, w)).astype(np.int16)
    gone = rng.random((h, w)) < 0.2  # no valid observation at all
    block[:, :, gone] = -9999
    block = np.where(
        rng.random((t, 1, h, w)) < 0.3, np.int16(-9999), block
    )  # screened observations
    mask = rng.random((h, w)) < 0.45
    days = np.arange(t, dtype=np.int64) * 10 + 19000
    predictor = get_predictor(ModelSpec(uri=native_lstm, family="native"), "cpu")
    seen: list[int] = []
    hook = predictor.module.register_forward_pre_hook(
        lambda mod, args: seen.append(int(args[0].shape[0]))
    )
    try:
        out = predict_block(block, mask, days, predictor, batch_size=64)
    finally:
        hook.remove()
    expected = int((mask & ~gone).sum())
    assert expected % 64 and sum(seen) == expected
    assert seen[:-1] == [64] * (len(seen) - 1) and seen[-1] == expected % 64
    np.testing.assert_array_equal(out["class"] != 255, mask & ~gone)


@pytest.mark.parametrize("share", [0.1, 0.8])
def test_sparse_and_dense_masks_give_the_unmasked_outputs_inside(native_lstm, share):
    """A masked window gives, inside the mask, what the unmasked window gives, and nodata
    outside."""
    from treesits_dask.models import ModelSpec
    from treesits_dask.pipeline.predict import empty_outputs, get_predictor, predict_block

    rng = np.random.default_rng(11)
    t, h, w = 9, 30, 40
    block = rng.integers(0, 3000, size=(t, 10, h, w)).astype(np.int16)
    block[:, :, rng.random((h, w)) < 0.2] = -9999
    block = np.where(rng.random((t, 1, h, w)) < 0.3, np.int16(-9999), block)
    mask = rng.random((h, w)) < share
    days = np.arange(t, dtype=np.int64) * 10 + 19000
    predictor = get_predictor(ModelSpec(uri=native_lstm, family="native"), "cpu")
    whole = predict_block(block, None, days, predictor, batch_size=97)
    out = predict_block(block, mask, days, predictor, batch_size=97)
    nodata = empty_outputs(predictor.card.n_classes, (h, w))
    for var in ("class", "valid_obs", "last_obs_valid"):
        np.testing.assert_array_equal(
            out[var], np.where(mask, whole[var], nodata[var]), err_msg=var
        )
    np.testing.assert_allclose(
        out["probability"], np.where(mask, whole["probability"], np.nan), rtol=1e-5
    )
    assert (out["class"] != 255).sum() > 0.5 * share * h * w


def test_a_window_of_many_scenes_holds_its_selected_series_once(native_lstm):
    """Memory of a forward: the series of a window's selected pixels are gathered once and handed
    to the model as they are (the map's own window: every selected pixel), not copied again; at
    600 scenes a 200 x 200 px window is 480 MB per worker thread."""
    import tracemalloc

    from treesits_dask.models import ModelSpec
    from treesits_dask.pipeline.predict import get_predictor, predict_block

    rng = np.random.default_rng(3)
    t, h, w = 300, 40, 40
    block = rng.integers(0, 3000, size=(t, 10, h, w)).astype(np.int16)
    block = np.where(rng.random((t, 1, h, w)) < 0.6, np.int16(-9999), block)
    mask = rng.random((h, w)) < 0.9
    days = np.arange(t, dtype=np.int64) * 5 + 19000
    predictor = get_predictor(ModelSpec(uri=native_lstm, family="native"), "cpu")
    series_bytes = int(mask.sum()) * t * 10 * 2
    tracemalloc.start()
    try:
        out = predict_block(block, mask, days, predictor, batch_size=256)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (out["class"] != 255).sum() == mask.sum()
    # the gathered series, plus a batch and the outputs; a second copy would be 2x
    assert peak < 1.5 * series_bytes, (peak, series_bytes)


def _selected_reference(block, mask):
    """Pixel by pixel: inside the mask, with an observation valid in every band."""
    t_, _, h, w = block.shape
    idx, series, valid = [], [], []
    for p in range(h * w):
        y, x = divmod(p, w)
        if mask is not None and not mask[y, x]:
            continue
        ok = (block[:, :, y, x] != -9999).all(axis=1)
        if ok.any():
            idx.append(p)
            series.append(block[:, :, y, x])
            valid.append(ok)
    return (np.array(idx, dtype=np.int64), np.array(series, dtype=np.int16).reshape(-1, t_, 10),
            np.array(valid, dtype=bool).reshape(-1, t_))  # fmt: skip


def test_the_selected_pixels_of_any_window_layout_and_the_memory_they_take():
    """The model's pixels come out the same from a contiguous window, a view of windows read side
    by side (seen through its rows, not copied), rows or columns taken in steps and scenes in
    reverse (copied), with and without a mask; with a mask the temporaries are of the mask's
    pixels, not of the window (at 600 scenes a 250 x 250 px window is 750 MB)."""
    import tracemalloc

    from treesits_dask.pipeline.predict import select_pixels

    rng = np.random.default_rng(5)
    t, h, w = 7, 9, 40
    wide = rng.integers(0, 3000, size=(t, 10, h, w)).astype(np.int16)
    wide[rng.random((t, 10, h, w)) < 0.05] = -9999  # one band invalid: so is the observation
    wide[rng.random((t, 1, h, w)).repeat(10, 1) < 0.7] = -9999
    wide[:, :, 2, 3:30] = -9999  # pixels with no valid observation at all
    windows = {
        "view": wide[:, :, 1:8, 12:25],
        "contiguous": np.ascontiguousarray(wide[:, :, 1:8, 12:25]),
        "rows in steps": wide[:, :, ::2, 5:31],
        "columns in steps": wide[:, :, 1:8, ::3],
        "scenes reversed": wide[::-1, :, 1:8, 12:25],
    }
    for name, block in windows.items():
        for mask in (None, rng.random(block.shape[2:]) < 0.4, np.zeros(block.shape[2:], bool)):
            got = select_pixels(block, mask)
            for g, want in zip(got, _selected_reference(block, mask), strict=True):
                assert g.dtype == want.dtype and g.flags.c_contiguous, name
                np.testing.assert_array_equal(g, want, err_msg=name)

    t, h, w = 300, 64, 64
    wide = rng.integers(0, 3000, size=(t, 10, h, 3 * w)).astype(np.int16)
    block = wide[:, :, :, w : 2 * w]  # the middle one of three windows read side by side
    mask = np.zeros((h, w), bool)
    mask[8:40, 16:48] = True  # a quarter of the window
    series_bytes = int(mask.sum()) * t * 10 * 2
    tracemalloc.start()
    try:
        idx, series, valid = select_pixels(block, mask)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert series.nbytes == series_bytes and idx.size == mask.sum()
    # the series, their validity and a temporary of 1 MiB; the whole window's validity in bools
    # first (one per band) took 2.2x, a copy of the window 4x
    assert peak < 1.25 * series_bytes, (peak, series_bytes)


def test_cpu_forwards_share_the_cores_with_reads_and_each_other(native_lstm):
    """Worker threads read and predict windows side by side: torch uses the worker's threads less
    one per read in progress, shared evenly among the forwards in progress (set from the thread
    that runs the forward, before every batch)."""
    import functools

    import torch

    from treesits_dask.io.cube import READS_IN_PROGRESS
    from treesits_dask.models import ModelSpec
    from treesits_dask.pipeline.predict import (
        FORWARDS_IN_PROGRESS,
        get_predictor,
        threads_for_forward,
    )

    predictor = get_predictor(ModelSpec(uri=native_lstm, family="native"), "cpu")
    seen: list[int] = []
    hook = predictor.module.register_forward_pre_hook(
        lambda mod, args: seen.append(torch.get_num_threads())
    )
    before = torch.get_num_threads()
    rng = np.random.default_rng(2)
    series = rng.integers(0, 3000, size=(10, 6, 10)).astype(np.int16)
    valid = np.ones((10, 6), bool)
    days = np.arange(6, dtype=np.int64) * 10 + 19000
    predictor.threads = functools.partial(threads_for_forward, 4)
    try:
        with FORWARDS_IN_PROGRESS:  # this forward alone: every core
            predictor.predict(series, valid, days, batch_size=4)
            with READS_IN_PROGRESS:  # one read beside it
                predictor.predict(series, valid, days, batch_size=4)
            with FORWARDS_IN_PROGRESS:  # a second forward: half the cores each
                predictor.predict(series, valid, days, batch_size=4)
                with READS_IN_PROGRESS:  # ... and a read: (4 - 1) // 2
                    predictor.predict(series, valid, days, batch_size=4)
            with READS_IN_PROGRESS, READS_IN_PROGRESS, READS_IN_PROGRESS, READS_IN_PROGRESS:
                predictor.predict(series, valid, days, batch_size=4)  # never below one
    finally:
        predictor.threads = None
        hook.remove()
        torch.set_num_threads(before)
    assert seen == [4] * 3 + [3] * 3 + [2] * 3 + [1] * 3 + [1] * 3
    assert READS_IN_PROGRESS.count == 0 and FORWARDS_IN_PROGRESS.count == 0


def test_cpu_forward_calls_are_short_and_give_the_whole_batch_result(native_lstm):
    """On CPU a batch goes through the LSTM in calls of at most 512 pixels (faster: the gate
    buffers stay in cache), with the outputs of one call on the whole batch."""
    import torch

    from treesits_dask.models import ModelSpec
    from treesits_dask.models.loading import _FULL_CPU_CHUNK
    from treesits_dask.models.preprocess import full_inputs
    from treesits_dask.pipeline.predict import get_predictor

    predictor = get_predictor(ModelSpec(uri=native_lstm, family="native"), "cpu")
    rng = np.random.default_rng(5)
    n = 2 * _FULL_CPU_CHUNK + 276
    series = rng.integers(0, 3000, size=(n, 6, 10)).astype(np.int16)
    valid = rng.random((n, 6)) > 0.3
    valid[:, 0] = True
    days = np.arange(6, dtype=np.int64) * 10 + 19000
    sizes: list[int] = []
    hook = predictor.module.register_forward_pre_hook(lambda mod, args: sizes.append(len(args[0])))
    try:
        probs, used = predictor.predict(series, valid, days, batch_size=4096)
    finally:
        hook.remove()
    assert sizes == [_FULL_CPU_CHUNK, _FULL_CPU_CHUNK, 276]
    x, n_used = full_inputs(series, valid)
    with torch.inference_mode():
        whole = predictor.module(torch.from_numpy(x)).float().numpy()
    np.testing.assert_allclose(probs, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(used, n_used)


@pytest.mark.parametrize("device, most_at_once", [("cpu", 3), ("cuda", 1)])
def test_windows_run_side_by_side_on_cpu_and_one_at_a_time_on_an_accelerator(device, most_at_once):
    """predict_block: on CPU every worker thread predicts its own window (the cores are shared
    out); an accelerator runs one forward at a time (its memory is sized for one)."""
    import threading
    import time
    from types import SimpleNamespace

    from treesits_dask.pipeline.predict import FORWARDS_IN_PROGRESS, predict_block

    lock = threading.Lock()
    running = []
    most = [0]
    barrier = threading.Barrier(3, timeout=10)

    class Slow:
        card = SimpleNamespace(n_classes=2)

        def __init__(self):
            self.device = SimpleNamespace(type=device)

        def predict(self, series, valid, days, batch_size):
            with lock:
                running.append(1)
                most[0] = max(most[0], len(running))
            time.sleep(0.3)
            with lock:
                running.pop()
            n = len(series)
            return np.full((n, 2), 0.5, np.float32), valid.sum(axis=1)

    block = np.ones((4, 10, 3, 3), np.int16)
    days = np.arange(4, dtype=np.int64)
    outs = []

    def one():
        barrier.wait()
        outs.append(predict_block(block, None, days, Slow()))

    threads = [threading.Thread(target=one) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == most_at_once
    assert len(outs) == 3 and all((o["valid_obs"] == 4).all() for o in outs)
    assert FORWARDS_IN_PROGRESS.count == 0
