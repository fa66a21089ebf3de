"""Workers with several GPUs (issue 18, 7): ``gpus: 2`` advertises GPU=2, so two inference tasks
run at once on such a worker, and each takes its own device (one device per worker thread);
tested on CPU with fake devices."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from treesits_dask.kube import KubeSettings
from treesits_dask.models.loading import visible_devices
from treesits_dask.outputs.schema import Packing
from treesits_dask.pipeline import devices, predict


def test_every_visible_gpu_is_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert visible_devices("auto") == ["cuda:0", "cuda:1"]
    assert visible_devices("cuda") == ["cuda:0", "cuda:1"]
    assert visible_devices("cuda:1") == ["cuda:1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert visible_devices("auto") == ["cpu"]


class _FakeDevice:
    type = "fake"

    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return self.name


class _FakePredictor:
    """A model on a fake accelerator: records which device ran when."""

    def __init__(self, device: str, log: list, lock: threading.Lock):
        self.device = _FakeDevice(device)
        self.name = device
        self.card = SimpleNamespace(n_classes=3)
        self.log, self.lock = log, lock

    def predict(self, series, valid, days, batch_size=2048):
        start = time.monotonic()
        time.sleep(0.15)
        with self.lock:
            self.log.append((self.name, start, time.monotonic(), threading.get_ident()))
        n = series.shape[0]
        return np.full((n, 3), 1 / 3, np.float32), valid.sum(axis=1)


def test_concurrent_inference_tasks_take_different_devices(monkeypatch):
    log: list = []
    lock = threading.Lock()
    predictors = {d: _FakePredictor(d, log, lock) for d in ("fake:0", "fake:1")}
    monkeypatch.setitem(devices._POOLS, "fakegpu", devices.DevicePool(["fake:0", "fake:1"]))
    monkeypatch.setattr(predict, "get_predictor", lambda spec, device, inf=None: predictors[device])
    block = np.full((4, 10, 3, 3), 500, np.int16)
    days = np.arange(4, dtype=np.int64) * 10

    def task(_):
        return predict._predict_packed(block, kinds=(), days=days, spec=None, device="fakegpu",
                                       batch_size=64, packing=Packing(3))  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(task, range(6)))
    assert all(o.shape == (Packing(3).size, 3, 3) for o in outs)
    assert {name for name, *_ in log} == {"fake:0", "fake:1"}
    for device in ("fake:0", "fake:1"):  # a device never runs two forwards at once
        spans = sorted((s, e) for name, s, e, _ in log if name == device)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    # the two devices did work at the same time: 6 forwards of 0.15 s in about 3 rounds
    overlaps = [(a, b) for a in log for b in log if a[0] == "fake:0" and b[0] == "fake:1"
                and a[1] < b[2] and b[1] < a[2]]  # fmt: skip
    assert overlaps


def test_a_worker_has_a_thread_per_gpu():
    settings = KubeSettings(gpu={"gpus": 2, "threads": 4})
    assert settings.worker_resources()["gpu"] == {"GPU": 2.0}
    with pytest.raises(ValueError, match="at least as many threads as GPUs"):
        KubeSettings(gpu={"gpus": 4, "threads": 2})
