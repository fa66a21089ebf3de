"""The device path of the Predictor, on CPU: input preparation as torch ops equal to the numpy
reference, the pipelined batches equal to the host path, batch sizes from a reported free
memory, the out-of-memory back-off (simulated), and the precision settings."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from treesits_dask.bench.forward import random_sbert_state_dict
from treesits_dask.errors import ModelError
from treesits_dask.models import ModelSpec, load_model
from treesits_dask.models.accelerator import (
    MEMORY_SHARE,
    batch_for_memory,
    pixel_bytes,
    precision_scope,
    tf32_flags,
)
from treesits_dask.models.device_inputs import full_inputs_torch, sbert_inputs_torch
from treesits_dask.models.preprocess import day_of_year, full_inputs, sbert_inputs

WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "sitsnn-weights" / "04"
EPOCH = dt.date(1970, 1, 1)


def _sitsnn(family: str) -> ModelSpec:
    stem = "lstm_5pure" if family == "sits-lstm" else "transformer_5pure"
    return ModelSpec(str(WEIGHTS / f"{stem}.pth"), family, str(WEIGHTS / f"{stem}_params.json"))


@pytest.fixture(scope="module")
def sbert_spec(tmp_path_factory) -> ModelSpec:
    path = tmp_path_factory.mktemp("sbert") / "sbert.tar"
    torch.save({"model_state_dict": random_sbert_state_dict(seed=1), "epoch": 0}, path)
    return ModelSpec(str(path), "sbert")


def _series(n: int, t: int, seed: int, start=dt.date(2019, 11, 20), spread: int = 5):
    """Pixels with every kind of validity pattern; irregular dates across leap-year boundaries."""
    rng = np.random.default_rng(seed)
    offsets = np.sort(rng.choice(np.arange(0, spread * t), t, replace=False))
    days = (start - EPOCH).days + offsets.astype(np.int64)
    valid = rng.random((n, t)) < rng.uniform(0.02, 0.98, (n, 1))
    valid[0] = False
    valid[0, rng.integers(t)] = True  # one observation
    valid[1] = True  # every observation
    valid[2] = False
    valid[2, -1] = True  # only the newest
    valid[3] = False
    valid[3, :2] = True  # only the two oldest
    valid[:, rng.integers(t)] |= True
    series = rng.integers(-300, 9000, (n, t, 10)).astype(np.int16)
    series[~valid] = -9999
    return series, valid, days


def _torch(*arrays):
    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


# --- input preparation on the device equals the numpy reference ---------------------------------


@pytest.mark.parametrize("seq_len,n_obs", [(16, 40), (256, 300), (8, 8), (256, 90)])
def test_sbert_inputs_on_the_device_equal_the_numpy_reference(seq_len, n_obs):
    series, valid, days = _series(40, n_obs, seed=seq_len + n_obs)
    x, doy, mask, used = sbert_inputs(series, valid, days, seq_len)
    s, v, d, sd = _torch(series, valid, days, day_of_year(days))
    tx, tdoy, tmask, top = sbert_inputs_torch(s, v, d, sd, seq_len)
    assert tx.dtype == torch.float32 and tdoy.dtype == torch.int64 and tmask.dtype == torch.bool
    np.testing.assert_array_equal(tx.numpy(), x)  # bit for bit: same float64 statistics
    np.testing.assert_array_equal(tdoy.numpy(), doy)
    np.testing.assert_array_equal(tmask.numpy(), mask)
    assert int(top) == doy.max()
    np.testing.assert_array_equal(tmask.numpy().sum(1), used)
    # trimmed to the last `keep` slots: the same slots (keep > the most kept observations)
    keep = int(used.max()) + 1
    if keep < seq_len:
        kx, kdoy, kmask, _ = sbert_inputs_torch(s, v, d, sd, seq_len, keep=keep)
        np.testing.assert_array_equal(kx.numpy(), x[:, -keep:])
        np.testing.assert_array_equal(kdoy.numpy(), doy[:, -keep:])
        np.testing.assert_array_equal(kmask.numpy(), mask[:, -keep:])
        assert not mask[:, :-keep].any()


def test_sbert_day_index_beyond_the_table_drops_the_oldest_as_on_the_host():
    """~6.5 years of dates: both preparations drop the oldest kept observations until the
    newest fits the position table, with the same result."""
    series, valid, days = _series(6, 30, seed=4, spread=80)
    s, v, d, sd = _torch(series, valid, days, day_of_year(days))
    x, doy, mask, used = sbert_inputs(series, valid, days, 256, max_position=1826)
    tx, tdoy, tmask, top = sbert_inputs_torch(s, v, d, sd, 256, max_position=1826)
    assert used.max() < valid.sum(1).max()  # observations were dropped
    assert int(top) == doy.max() < 1826
    np.testing.assert_array_equal(tdoy.numpy(), doy)
    np.testing.assert_array_equal(tmask.numpy(), mask)
    np.testing.assert_array_equal(tx.numpy(), x)


def test_sitsnn_inputs_on_the_device_equal_the_numpy_reference():
    series, valid, _ = _series(30, 23, seed=9)
    x, _ = full_inputs(series, valid)
    tx = full_inputs_torch(*_torch(series, valid))
    assert tx.dtype == torch.float32
    np.testing.assert_array_equal(tx.numpy(), x)
    assert (tx.numpy()[~valid] == 0).all()


# --- the device path (pipelined batches) gives the host path's results --------------------------


@pytest.mark.parametrize("family", ["sits-lstm", "sits-transformer", "sbert"])
def test_device_path_equals_host_path_on_cpu(family, sbert_spec):
    spec = sbert_spec if family == "sbert" else _sitsnn(family)
    series, valid, days = _series(300, 48, seed=1, spread=3)
    host = load_model(spec, device="cpu")
    assert host.feed == "host" and host.precision == "fp32"
    expected, used = host.predict(series, valid, days, batch_size=128)
    device = load_model(spec, device="cpu")
    device.feed = "device"
    seen: list[int] = []
    device.module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape))
    probs, n_used = device.predict(series, valid, days, batch_size=128)
    np.testing.assert_array_equal(probs, expected)  # the same calls on the same inputs
    np.testing.assert_array_equal(n_used, used)
    assert device.last_batch == 128 and seen
    # ... in batches of 128 pixels (3 of them), each through the model in calls as on the host
    if family == "sits-lstm":
        assert [s[0] for s in seen] == [128, 128, 44]


@pytest.mark.parametrize("spread", [3, 80])
def test_streamed_sbert_outputs_prepared_on_the_device_equal_the_host(
    sbert_spec, spread, monkeypatch
):
    """What streamed pixels kept (each pixel's own days) goes through the model prepared on the
    device as on the host: the same probabilities (bit for bit where no observation gives way to
    the position table; with 3,200 days of dates many do, and the pixels then go through the
    model in another order) and the same observations used, also as held windows."""
    series, valid, days = _series(200, 40, seed=3, spread=spread)
    host = load_model(sbert_spec, device="cpu")
    device = load_model(sbert_spec, device="cpu")
    device.feed = "device"
    state = host.stream_state(len(series))
    for lo, hi in ((0, 9), (9, 40)):
        state = host.stream_step(state, series[:, lo:hi], valid[:, lo:hi], days[lo:hi])
    pixels = np.flatnonzero(valid.any(axis=1))
    want, want_used = host.stream_probs(state, pixels, batch_size=64)
    with monkeypatch.context() as m:  # the host prepares nothing on the device path

        def on_the_host(*args, **kwargs):
            raise AssertionError("SBERT's inputs prepared on the host")

        m.setattr("treesits_dask.models.loading.sbert_inputs", on_the_host)
        got, used = device.stream_probs(state, pixels, batch_size=64)
    np.testing.assert_array_equal(used, want_used)
    if spread == 3:
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    held, held_used = host.predict(series[pixels], valid[pixels], days)
    np.testing.assert_allclose(want, held, rtol=0, atol=1e-6)  # streamed as held
    _, device_used = device.predict(series[pixels], valid[pixels], days)
    np.testing.assert_array_equal(device_used, held_used)
    np.testing.assert_array_equal(used, held_used)
    gave_way = held_used < valid[pixels].sum(axis=1)  # fewer than 256 valid: all would be used
    assert gave_way.any() == (spread == 80)


# --- batch size from the free device memory --------------------------------------------------


def test_batch_for_memory_fits_the_reported_free_memory():
    per_pixel = pixel_bytes("sbert", {"hidden": 128, "attn_heads": 8}, steps=250)
    chunk = 1024
    for free in (2**30, 16 * 2**30, 80 * 2**30):
        n = batch_for_memory(free, per_pixel, chunk, cap=10**9, fallback=5)
        used = n * per_pixel[0] + min(n, chunk) * per_pixel[1]
        assert used <= MEMORY_SHARE * free < used + per_pixel[0] + per_pixel[1]
    small = batch_for_memory(2**30, per_pixel, chunk, 10**9, 5)
    big = batch_for_memory(80 * 2**30, per_pixel, chunk, 10**9, 5)
    assert 1 <= small < big
    assert batch_for_memory(80 * 2**30, per_pixel, chunk, cap=4096, fallback=5) == 4096
    assert batch_for_memory(None, per_pixel, chunk, cap=4096, fallback=5) == 5  # CPU: batch_size
    assert batch_for_memory(None, per_pixel, chunk, cap=3, fallback=5) == 3
    assert batch_for_memory(1000, per_pixel, chunk, cap=4096, fallback=5) == 1  # never 0
    # longer series and the LSTM's activations cost more per pixel
    lstm = {"input_size": 32, "hidden_size": 64}
    assert pixel_bytes("sits-lstm", lstm, 120)[1] > pixel_bytes("sits-lstm", lstm, 60)[1]


def test_predictor_takes_its_batch_from_the_reported_free_memory():
    predictor = load_model(_sitsnn("sits-lstm"), device="cpu", max_batch=50_000)
    predictor.feed = "device"
    series, valid, days = _series(1000, 20, seed=2)
    steps = series.shape[1]
    per_pixel = pixel_bytes("sits-lstm", predictor.card.hyperparameters, steps)
    call = predictor.call_pixels(steps)
    free = 200 * (per_pixel[0] + per_pixel[1]) / MEMORY_SHARE  # room for ~200 pixels
    predictor.free_memory = lambda: free
    sizes: list[int] = []
    predictor.forward_full = _recording(predictor.forward_full, sizes)
    probs, _ = predictor.predict(series, valid, days, batch_size=64)
    expected = batch_for_memory(free, per_pixel, call, 50_000, 64)
    assert 150 < expected < 250 and predictor.last_batch == expected
    assert sizes[:-1] == [expected] * (len(sizes) - 1) and sum(sizes) == 1000
    reference, _ = load_model(_sitsnn("sits-lstm"), device="cpu").predict(series, valid, days)
    np.testing.assert_allclose(probs, reference, rtol=1e-5, atol=1e-6)
    # much more memory: the cap decides
    predictor.free_memory = lambda: 10**12
    predictor.max_batch = 300
    predictor.predict(series, valid, days, batch_size=64)
    assert predictor.last_batch == 300


def _recording(fn, sizes):
    def wrapper(x, *args):
        sizes.append(len(x))
        return fn(x, *args)

    return wrapper


# --- CUDA out of memory halves the batch and goes on (simulated) ---------------------------------


def _oom_above(fn, limit: int, sizes: list[int]):
    def wrapper(x, *args):
        sizes.append(len(x))
        if len(x) > limit:
            raise torch.OutOfMemoryError(
                f"CUDA out of memory. Tried to allocate {len(x)} MiB (simulated)"
            )
        return fn(x, *args)

    return wrapper


@pytest.mark.parametrize("family", ["sits-lstm", "sbert"])
def test_out_of_memory_halves_the_batch_and_goes_on(family, sbert_spec, caplog):
    spec = sbert_spec if family == "sbert" else _sitsnn(family)
    series, valid, days = _series(700, 30, seed=6, spread=3)
    reference, ref_used = load_model(spec, device="cpu").predict(series, valid, days)
    predictor = load_model(spec, device="cpu")
    predictor.feed = "device"
    predictor.free_memory = lambda: 10**12  # the estimate says 700 pixels fit at once ...
    sizes: list[int] = []
    name = "forward_sbert" if family == "sbert" else "forward_full"
    setattr(predictor, name, _oom_above(getattr(predictor, name), 200, sizes))  # ... they do not
    with caplog.at_level(logging.WARNING, logger="treesits_dask.models.loading"):
        probs, used = predictor.predict(series, valid, days, batch_size=700)
    np.testing.assert_allclose(probs, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(used, ref_used)
    # 700 -> 350 -> 175: every pixel once in batches that fit, after two failed attempts
    assert sizes[:3] == [700, 350, 175] and predictor.batch_limit == 175
    assert sum(s for s in sizes if s <= 200) == 700
    warnings = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 2 and "batches of 175 pixels" in warnings[-1]
    # the next window starts at the halved batch
    sizes.clear()
    predictor.predict(series[:400], valid[:400], days, batch_size=700)
    assert sizes == [175, 175, 50]


def test_out_of_memory_at_one_pixel_and_other_errors_are_raised():
    predictor = load_model(_sitsnn("sits-lstm"), device="cpu")
    predictor.feed = "device"
    series, valid, days = _series(8, 10, seed=3)
    predictor.forward_full = _oom_above(predictor.forward_full, 0, [])
    with pytest.raises(torch.OutOfMemoryError):
        predictor.predict(series, valid, days, batch_size=4)
    assert predictor.batch_limit == 1

    def broken(x):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")

    other = load_model(_sitsnn("sits-lstm"), device="cpu")
    other.feed = "device"
    other.forward_full = broken
    with pytest.raises(RuntimeError, match="EXECUTION_FAILED"):
        other.predict(series, valid, days, batch_size=4)
    assert other.batch_limit is None


# --- precision -------------------------------------------------------------------------------


def test_precision_settings(sbert_spec):
    series, valid, days = _series(64, 40, seed=8, spread=3)
    fp32, _ = load_model(sbert_spec, device="cpu").predict(series, valid, days)
    tf32 = load_model(sbert_spec, device="cpu", precision="tf32")
    assert tf32.precision == "tf32"
    np.testing.assert_array_equal(tf32.predict(series, valid, days)[0], fp32)  # CPU: no TF32
    bf16 = load_model(sbert_spec, device="cpu", precision="bf16")
    seen = []
    bf16.module.sbert.transformer_blocks[0].feed_forward.w_1.register_forward_hook(
        lambda mod, args, out: seen.append(out.dtype)
    )
    probs, _ = bf16.predict(series, valid, days)
    assert seen and set(seen) == {torch.bfloat16}  # matrix products in bf16
    assert probs.dtype == np.float32
    assert 0 < np.abs(probs - fp32).max() < 0.05
    with pytest.raises(ModelError, match="precision 'fp16'"):
        load_model(sbert_spec, device="cpu", precision="fp16")


def test_tf32_switches_are_set_for_cuda_forwards_and_restored():
    before = tf32_flags()
    with precision_scope(torch.device("cuda"), "tf32"):
        inside_tf32 = tf32_flags()
    with precision_scope(torch.device("cuda"), "fp32"):
        inside_fp32 = tf32_flags()
    assert tf32_flags() == before
    on = {"tf32", True}
    assert all(v in on for v in inside_tf32)
    # fp32 switches TF32 off for cuDNN too (its RNNs default to TF32 in recent torch)
    assert not any(v in on for v in inside_fp32)
    with precision_scope(torch.device("cpu"), "tf32"):
        assert tf32_flags() == before


# --- settings: accepted, validated, and the share of a GPU each inference task takes ------------


def test_precision_and_gpu_settings_are_validated():
    from treesits_dask.config import load_config
    from treesits_dask.errors import ConfigError

    base = {"cube": "/c", "output": "/o"}
    config = load_config(overrides={**base}, environ={"TREESITS_PRECISION": "tf32"})
    assert config.precision == "tf32" and config.torch_compile is False
    assert config.gpu_batch_max == 65536 and config.gpu_windows_in_flight == 2
    with pytest.raises(ConfigError, match="precision"):
        load_config(overrides={**base, "precision": "fp16"}, environ={})
    with pytest.raises(ConfigError, match="gpu_windows_in_flight"):
        load_config(overrides={**base, "gpu_windows_in_flight": 0}, environ={})
    # k windows of a worker advertising GPU=1 fit, as the worker counts them (subtracting)
    for k in (1, 2, 3, 7, 10, 11, 13):
        share = load_config(overrides={**base, "gpu_windows_in_flight": k}, environ={})
        share = share.gpu_task_share
        left, running = 1.0, 0
        while left >= share:
            left -= share
            running += 1
        assert running == k


def test_inference_tasks_carry_their_share_of_a_gpu():
    """(That the inference settings reach the workers is shown by
    test_pipeline.test_precision_is_recorded_in_run_report_and_settings_digest.)"""
    import dask.array as da

    from treesits_dask.pipeline.predict import Inference, predict_layer

    data = da.zeros((4, 10, 20, 20), dtype=np.int16, chunks=(4, 10, 10, 20))
    spec = ModelSpec("model.pt", "native")
    inference = Inference("bf16", False, 1024)
    arr = predict_layer(data, None, np.arange(4), spec, 5, "cuda", 64, {"GPU": 0.5}, inference)
    layer = arr.__dask_graph__().layers[arr.name]
    assert layer.annotations == {"resources": {"GPU": 0.5}}
    # the share comes from the settings, through the run's routing
    from treesits_dask.config import load_config
    from treesits_dask.pipeline.cluster import declared_routing

    config = load_config(
        overrides={"cube": "c", "output": "o", "local_gpu_workers": 1, "gpu_windows_in_flight": 3},
        environ={},
    )
    assert declared_routing(config).predict == {"GPU": config.gpu_task_share}
    assert 3 * config.gpu_task_share <= 1.0 < 4 * config.gpu_task_share
    cpu = predict_layer(data, None, np.arange(4), spec, 5, "cpu", 64)
    assert not cpu.__dask_graph__().layers[cpu.name].annotations
