"""SITS-BERT: preprocessing and forward pass against straightforward per-pixel references
(REFERENCE 3a)."""

from __future__ import annotations

import datetime as dt
import json
import math

import numpy as np
import pytest
import torch

from treesits_dask.bench.forward import random_sbert_state_dict, sbert_forward_pxps
from treesits_dask.errors import ModelError
from treesits_dask.io.discovery import S2_BANDS
from treesits_dask.models import ModelCard, ModelSpec, load_model, read_card, save_native
from treesits_dask.models.architectures import SBERTClassifier, sbert_position_table
from treesits_dask.models.card import SBERT_SEQUENCE
from treesits_dask.models.preprocess import day_of_year, sbert_inputs

EPOCH = dt.date(1970, 1, 1)


def _days(dates) -> np.ndarray:
    return np.array([(d - EPOCH).days for d in dates], dtype=np.int64)


def reference_inputs(series, valid, days, seq_len):
    """REFERENCE 3a steps 2-6, one pixel at a time, in plain Python/numpy float64."""
    n_pix = series.shape[0]
    x = np.zeros((n_pix, seq_len, 10))
    doy = np.zeros((n_pix, seq_len), dtype=np.int64)
    mask = np.zeros((n_pix, seq_len), dtype=bool)
    used = np.zeros(n_pix, dtype=np.int64)
    for p in range(n_pix):
        idx = [t for t in range(series.shape[1]) if valid[p, t]][-seq_len:]
        n = len(idx)
        used[p] = n
        if n == 0:
            continue
        dates = [EPOCH + dt.timedelta(days=int(days[t])) for t in idx]
        t0 = dates[0].timetuple().tm_yday
        refl = series[p, idx].astype(np.float64) / 10000.0
        z = (refl - refl.mean(axis=0)) / (refl.std(axis=0) + 1e-6)
        x[p, seq_len - n :] = z
        doy[p, seq_len - n :] = [(d - dates[0]).days + t0 for d in dates]
        mask[p, seq_len - n :] = True
    return x, doy, mask, used


def reference_forward(state, x, doy, mask, heads):
    """Explicit SBERT forward of each sample (float64): embedding, L blocks, max over all slots."""
    sd = {k: v.detach().double().numpy() for k, v in state.items()}
    layers = len({k.split(".")[2] for k in sd if k.startswith("sbert.transformer_blocks.")})

    def lin(h, name):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    logits = []
    for b in range(len(x)):
        h = np.concatenate(
            [
                lin(x[b].astype(np.float64), "sbert.embedding.input"),
                sd["sbert.embedding.position.pe"][doy[b]],
            ],
            axis=1,
        )
        size = h.shape[1]
        dk = size // heads
        for i in range(layers):
            pre = f"sbert.transformer_blocks.{i}."
            q, k, v = (lin(h, pre + f"attention.linear_layers.{j}") for j in range(3))
            att = np.zeros_like(h)
            for a in range(heads):
                cols = slice(a * dk, (a + 1) * dk)
                scores = q[:, cols] @ k[:, cols].T / math.sqrt(dk)
                scores[:, ~mask[b]] = -1e9
                w = np.exp(scores - scores.max(axis=1, keepdims=True))
                w /= w.sum(axis=1, keepdims=True)
                att[:, cols] = w @ v[:, cols]
            h = h + lin(att, pre + "attention.output_linear")
            f = lin(h, pre + "feed_forward.w_1")
            gelu = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f**3)))
            h = h + lin(gelu, pre + "feed_forward.w_2")
        logits.append(lin(h.max(axis=0), "classification.linear"))
    return np.array(logits)


def _patterns(rng, n_obs: int, seq_len: int) -> np.ndarray:
    valid = rng.random((12, n_obs)) < rng.uniform(0.05, 0.95, (12, 1))
    valid[0] = False
    valid[0, rng.integers(n_obs)] = True  # one observation
    valid[1] = True  # more than seq_len
    valid[2] = False
    valid[2, -1] = True  # only the newest
    valid[3] = False
    valid[3, :2] = True  # only the two oldest
    valid[4, :] = np.arange(n_obs) % 2 == 0
    valid[5] = False
    valid[5, -seq_len:] = True  # exactly seq_len
    return valid


def test_position_table():
    pe = sbert_position_table(1826, 64)
    assert (pe[0] == 0).all()
    w = np.exp(-(2 * np.arange(32)) * np.log(10000.0) / 64)
    np.testing.assert_allclose(pe[11, 0::2], np.sin(10 * w), atol=1e-6)
    np.testing.assert_allclose(pe[11, 1::2], np.cos(10 * w), atol=1e-6)


def test_day_of_year():
    dates = [
        dt.date(2020, 1, 1),
        dt.date(2020, 12, 31),
        dt.date(2021, 12, 31),
        dt.date(1969, 12, 31),
    ]
    np.testing.assert_array_equal(day_of_year(_days(dates)), [1, 366, 365, 365])


@pytest.mark.parametrize("seq_len,n_obs", [(16, 40), (256, 300), (8, 8)])
def test_preprocessing_matches_per_pixel_reference(seq_len, n_obs):
    rng = np.random.default_rng(seq_len)
    # irregular dates across the 2019/2020/2021 year boundaries (2020 is a leap year)
    offsets = np.sort(rng.choice(np.arange(0, 5 * n_obs), n_obs, replace=False))
    days = _days([dt.date(2019, 11, 20)]) + offsets
    valid = _patterns(rng, n_obs, seq_len)
    series = rng.integers(-300, 9000, (12, n_obs, 10)).astype(np.int16)
    series[~valid] = -9999
    x, doy, mask, used = sbert_inputs(series, valid, days, seq_len)
    rx, rdoy, rmask, rused = reference_inputs(series, valid, days, seq_len)
    assert x.dtype == np.float32 and x.shape == (12, seq_len, 10)
    np.testing.assert_array_equal(used, rused)
    np.testing.assert_array_equal(mask, rmask)
    np.testing.assert_array_equal(doy, rdoy)
    np.testing.assert_allclose(x, rx, rtol=1e-5, atol=1e-5)
    assert used[1] == min(seq_len, n_obs) and used[0] == 1
    assert (x[0] == 0).all() and doy[0, -1] == day_of_year(days[valid[0]])[0]


def test_day_index_overflow_drops_the_oldest_observations():
    """t0 = 366 (31 Dec of a leap year) + 1460 days spanned = 1826: beyond the position table.
    The oldest kept observations are dropped until the newest fits; the result is the reference's
    for the observations left (where the reference does not crash)."""
    dates = [dt.date(2020, 12, 31), dt.date(2022, 6, 1), dt.date(2024, 12, 30)]
    rng = np.random.default_rng(1)
    series = rng.integers(0, 9000, (3, 3, 10)).astype(np.int16)
    valid = np.ones((3, 3), dtype=bool)
    valid[2, 0] = False  # this pixel's first kept observation is 1 June 2022: it fits as it is
    days = _days(dates)
    x, doy, mask, used = sbert_inputs(series, valid, days, 256)
    np.testing.assert_array_equal(used, [2, 2, 2])
    june = dt.date(2022, 6, 1).timetuple().tm_yday
    assert (doy[:, -2] == june).all() and doy.max() == june + (dates[2] - dates[1]).days < 1826
    # equal to the reference given the observations that are left
    fitted = valid.copy()
    fitted[:, 0] = False
    rx, rdoy, rmask, rused = reference_inputs(series, fitted, days, 256)
    np.testing.assert_array_equal(doy, rdoy)
    np.testing.assert_array_equal(mask, rmask)
    np.testing.assert_array_equal(used, rused)
    np.testing.assert_allclose(x, rx, rtol=1e-5, atol=1e-5)
    # one day less spanned fits as it is (index 1825): nothing dropped
    _, doy, _, used = sbert_inputs(
        series,
        valid,
        _days([dt.date(2020, 12, 31), dt.date(2022, 6, 1), dt.date(2024, 12, 29)]),
        256,
    )
    assert doy.max() == 1825 and used[0] == 3
    # only kept observations count: the latest 2 of them fit
    _, doy, _, _ = sbert_inputs(series, valid, days, 2)
    assert doy[0, 0] == june


@pytest.fixture(scope="module")
def published_shape_checkpoint(tmp_path_factory):
    """A training-format checkpoint: DataParallel `module.` prefix, optimizer state, epoch."""
    state = random_sbert_state_dict(seed=3)
    with torch.no_grad():  # larger activations: gelu's tanh form matters at the 1e-4 level
        for key in state:
            if key.endswith(("feed_forward.w_1.weight", "embedding.input.weight")):
                state[key] *= 4
    path = tmp_path_factory.mktemp("sbert") / "sbert_published.pth"
    torch.save(
        {
            "model_state_dict": {f"module.{k}": v for k, v in state.items()},
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
            "epoch": 7,
        },
        path,
    )
    return path, state


def test_forward_matches_explicit_reference(published_shape_checkpoint):
    path, state = published_shape_checkpoint
    predictor = load_model(ModelSpec(str(path), "sbert"), device="cpu")
    assert (
        predictor.card.hyperparameters["hidden"] == 128
        and predictor.card.hyperparameters["n_layers"] == 3
    )
    assert predictor.card.output_kind == "sigmoid" and predictor.card.class_names == ["disturbance"]
    rng = np.random.default_rng(7)
    n_obs = 300
    days = _days([dt.date(2021, 2, 1)]) + np.sort(rng.choice(1400, n_obs, replace=False))
    valid = _patterns(rng, n_obs, 256)[:8]
    series = rng.integers(0, 8000, (8, n_obs, 10)).astype(np.int16)
    series[~valid] = -9999

    x, doy, mask, _ = sbert_inputs(series, valid, days, 256)
    expected = reference_forward(state, x, doy, mask, heads=8)[:, 0]
    with torch.inference_mode():
        logits = predictor.module(
            torch.from_numpy(x), torch.from_numpy(doy), torch.from_numpy(mask)
        ).numpy()
    np.testing.assert_allclose(logits[:, 0], expected, rtol=0, atol=1e-4)

    # the batched predictor (pixels grouped by length, padding trimmed) gives the same probabilities
    probs, n_used = predictor.predict(series, valid, days, batch_size=3)
    np.testing.assert_allclose(probs[:, 0], 1 / (1 + np.exp(-expected)), atol=1e-4)
    assert np.ptp(probs) > 1e-3
    np.testing.assert_array_equal(n_used, np.minimum(valid.sum(1), 256))


def test_checkpoint_shapes_and_heads_from_params(tmp_path):
    small = random_sbert_state_dict(seed=1, hidden=32, n_layers=2)
    ckpt = tmp_path / "small.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in small.items()}, "epoch": 1}, ckpt)
    params = tmp_path / "small_params.json"
    params.write_text(json.dumps({"attn_heads": 4}))
    assert read_card(ModelSpec(str(ckpt), "sbert", str(params))).hyperparameters["attn_heads"] == 4
    p4 = load_model(ModelSpec(str(ckpt), "sbert", str(params)), device="cpu")
    p8 = load_model(ModelSpec(str(ckpt), "sbert"), device="cpu")
    assert p4.card.hyperparameters["hidden"] == 32 and p4.card.hyperparameters["n_layers"] == 2
    rng = np.random.default_rng(2)
    series = rng.integers(0, 5000, (5, 30, 10)).astype(np.int16)
    valid = rng.random((5, 30)) > 0.3
    valid[:, 0] = True
    days = _days([dt.date(2022, 1, 1)]) + 10 * np.arange(30)
    x, doy, mask, _ = sbert_inputs(series, valid, days, 256)
    a, _ = p4.predict(series, valid, days)
    b, _ = p8.predict(series, valid, days)
    np.testing.assert_allclose(
        a[:, 0], 1 / (1 + np.exp(-reference_forward(small, x, doy, mask, 4)[:, 0])), atol=1e-5
    )
    assert not np.allclose(a, b, atol=1e-6)


def test_sbert_checkpoint_errors(tmp_path):
    state = random_sbert_state_dict(hidden=32, n_layers=1)
    state["sbert.transformer_blocks.0.feed_forward.w_1.weight"] = torch.zeros(64, 32)
    bad = tmp_path / "bad_ffn.pth"
    torch.save({"model_state_dict": state}, bad)
    with pytest.raises(ModelError, match="bad_ffn.pth") as err:
        load_model(ModelSpec(str(bad), "sbert"), device="cpu")
    assert "w_1.weight" in str(err.value)
    lstm = tmp_path / "not_sbert.pth"
    torch.save({"embd.weight": torch.zeros(4, 10)}, lstm)
    with pytest.raises(ModelError, match="not_sbert.pth"):
        load_model(ModelSpec(str(lstm), "sbert"), device="cpu")


def test_predictor_day_overflow(tmp_path):
    """The predictor drops the oldest observation as the preprocessing does: the same
    probability as without it."""
    ckpt = tmp_path / "s.pth"
    torch.save({"model_state_dict": random_sbert_state_dict(hidden=16, n_layers=1)}, ckpt)
    predictor = load_model(ModelSpec(str(ckpt), "sbert"), device="cpu")
    days = _days([dt.date(2020, 12, 31), dt.date(2022, 6, 1), dt.date(2024, 12, 30)])
    series = np.random.default_rng(2).integers(0, 8000, (1, 3, 10)).astype(np.int16)
    full, used = predictor.predict(series, np.ones((1, 3), bool), days)
    without_first, used_without = predictor.predict(series, np.array([[False, True, True]]), days)
    assert np.isfinite(full).all() and used[0] == used_without[0] == 2
    np.testing.assert_array_equal(full, without_first)


def test_native_sbert_round_trip(tmp_path):
    hp = {
        "num_features": 10,
        "hidden": 16,
        "n_layers": 1,
        "attn_heads": 2,
        "dropout": 0.3,
        "num_classes": 1,
        "max_position": 1826,
    }
    torch.manual_seed(0)
    module = SBERTClassifier(**hp).eval()
    card = ModelCard(
        family="sbert",
        hyperparameters=hp,
        bands=list(S2_BANDS),
        class_names=["disturbance"],
        output_kind="sigmoid",
        sequence=dict(SBERT_SEQUENCE, seq_len=32),
    )
    pt, _ = save_native(module, card, str(tmp_path / "native_sbert.pt"))
    loaded = load_model(ModelSpec(pt, "native"), device="cpu")
    rng = np.random.default_rng(0)
    series = rng.integers(0, 5000, (6, 50, 10)).astype(np.int16)
    valid = rng.random((6, 50)) > 0.2
    days = _days([dt.date(2023, 1, 1)]) + 7 * np.arange(50)
    probs, used = loaded.predict(series, valid, days)
    x, doy, mask, _ = sbert_inputs(series, valid, days, 32)
    with torch.inference_mode():
        direct = torch.sigmoid(
            module(torch.from_numpy(x), torch.from_numpy(doy), torch.from_numpy(mask))
        )
    np.testing.assert_allclose(probs, direct.numpy(), atol=1e-6)
    np.testing.assert_array_equal(used, np.minimum(valid.sum(1), 32))


def test_bench_reports_pixels_per_second():
    threads = torch.get_num_threads()
    res = sbert_forward_pxps(batch=4, seq_len=32, threads=1, seconds=0.2)
    assert res["px_per_s"] > 0 and res["batch"] == 4 and res["calls"] >= 1
    assert torch.get_num_threads() == threads
