"""CPU + GPU worker groups on one machine: inference runs only where GPU=1 is advertised."""

import numpy as np
import pytest
import xarray as xr

from treesits_dask.config import load_config
from treesits_dask.pipeline import predict
from treesits_dask.pipeline.cluster import connect
from treesits_dask.pipeline.run import run

pytestmark = pytest.mark.slow


def test_inference_only_on_gpu_workers(small_cube, native_lstm, tmp_path):
    from distributed import get_task_stream

    config = load_config(
        overrides=dict(
            cube=small_cube.root,
            tiles="X0069_Y0043",
            output=str(tmp_path / "out"),
            model=native_lstm,
            workers=2,
            local_gpu_workers=1,
            window="20x30",
            dashboard_address=":0",
            cog=False,
        ),
        environ={},
    )
    assert config.gpu_group and config.read_on_cpu
    with connect(config) as client:
        info = client.scheduler_info()["workers"]
        gpu = {a for a, w in info.items() if w["resources"].get("GPU")}
        cpu = {a for a, w in info.items() if w["resources"].get("CPU")}
        assert len(gpu) == 1 and len(cpu) == 2 and not gpu & cpu
        # one thread per window in flight: the GPU worker holds two windows at once
        assert [info[a]["nthreads"] for a in gpu] == [config.gpu_windows_in_flight] == [2]
        with get_task_stream(client) as ts:
            result = run(config, client=client)
        loads = client.run(predict.load_count)
    assert result.pixels_predicted > 0
    by_prefix: dict[str, set] = {}
    for rec in ts.data:
        key = rec["key"][0] if isinstance(rec["key"], tuple) else rec["key"]
        by_prefix.setdefault(str(key).split("-")[0], set()).add(rec["worker"])
    predict_workers = by_prefix.get("predict_packed", set()) | by_prefix.get(
        "predict_packed_nomask", set()
    )
    assert predict_workers and predict_workers <= gpu, by_prefix
    assert by_prefix["read"] and by_prefix["read"] <= cpu, by_prefix
    assert {a: n for a, n in loads.items() if n} == {
        a: 1 for a in gpu
    }  # only the GPU worker holds a model
    ds = xr.open_zarr(tmp_path / "out" / "predictions.zarr", mask_and_scale=False)
    assert np.isfinite(ds.probability.values).any()
