"""CPU + GPU worker groups on one machine: inference runs only where GPU=1 is advertised, reads
only where CPU is, also on a standing cluster behind ``scheduler_address`` and with
``read_on: gpu``."""

import contextlib

import numpy as np
import pytest

from treesits_dask import open_map
from treesits_dask.config import load_config
from treesits_dask.errors import ClusterError
from treesits_dask.io import storage
from treesits_dask.pipeline import predict, warmup
from treesits_dask.pipeline.cluster import Routing, connect, declared_routing
from treesits_dask.pipeline.run import run

pytestmark = pytest.mark.slow


def _config(small_cube, native_lstm, tmp_path, **extra):
    return load_config(
        overrides=dict(
            **{
                "cube": small_cube.root,
                "tiles": "X0069_Y0043",
                "output": str(tmp_path / "out"),
                "model": native_lstm,
                "window": "20x30",
                "dashboard_address": ":0",
                "cog": False,
                **extra,
            }
        ),
        environ={},
    )


def _run_and_trace(config, client):
    """Run; return (result, {task prefix: workers}, {worker: model loads})."""
    from distributed import get_task_stream

    with get_task_stream(client) as ts:
        result = run(config, client=client)
    loads = client.run(predict.load_count)
    by_prefix: dict[str, set] = {}
    for rec in ts.data:
        key = rec["key"][0] if isinstance(rec["key"], tuple) else rec["key"]
        by_prefix.setdefault(str(key).split("-")[0], set()).add(rec["worker"])
    predicted = by_prefix.get("predict_packed", set()) | by_prefix.get(
        "predict_packed_nomask", set()
    )
    return result, by_prefix, predicted, loads


def _standing_cluster(groups: dict[str, dict]):
    """A cluster started by someone else: worker name -> advertised resources."""
    from distributed import Nanny, Scheduler, SpecCluster

    return SpecCluster(
        workers={
            name: {"cls": Nanny, "options": {"nthreads": 2 if res.get("CPU") else 1,
                                             "resources": res, "memory_limit": "2GiB"}}
            for name, res in groups.items()
        },
        scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
    )  # fmt: skip


def test_inference_only_on_gpu_workers(small_cube, native_lstm, tmp_path):
    config = _config(small_cube, native_lstm, tmp_path, workers=2, local_gpu_workers=1)
    assert declared_routing(config) == Routing(read={"CPU": 1}, predict={"GPU": 0.5})
    with connect(config) as client:
        info = client.scheduler_info()["workers"]
        gpu = {a for a, w in info.items() if w["resources"].get("GPU")}
        cpu = {a for a, w in info.items() if w["resources"].get("CPU")}
        assert len(gpu) == 1 and len(cpu) == 2 and not gpu & cpu
        # one thread per window in flight: the GPU worker holds two windows at once
        assert [info[a]["nthreads"] for a in gpu] == [config.gpu_windows_in_flight] == [2]
        # the worker processes got the malloc settings that keep GDAL's decode buffers fast
        wanted = storage.MALLOC_DEFAULTS
        envs = client.run(lambda: {k: __import__("os").environ.get(k) for k in wanted})
        assert all(e == wanted for e in envs.values()), envs
        # the GPU worker imports torch as it starts (its preload); the reading workers do not
        assert client.run(warmup.imported, 120, workers=list(gpu)) == dict.fromkeys(gpu, True)
        torch_in = client.run(lambda: "torch" in __import__("sys").modules)
        assert torch_in == {a: a in gpu for a in info}, torch_in
        result, by_prefix, predicted, loads = _run_and_trace(config, client)
    assert result.pixels_predicted > 0
    assert predicted and predicted <= gpu, by_prefix
    assert by_prefix["read"] and by_prefix["read"] <= cpu, by_prefix
    # only the GPU worker holds a model
    assert {a: n for a, n in loads.items() if n} == {a: 1 for a in gpu}
    ds = open_map(str(tmp_path / "out"))
    assert np.isfinite(ds.probability.values).any()


def test_standing_cluster_keeps_the_routing(small_cube, native_lstm, tmp_path):
    """--scheduler-address: the workers' advertised resources route the work as before."""
    from distributed import Client

    groups = {"cpu-0": {"CPU": 2}, "cpu-1": {"CPU": 2}, "gpu-0": {"GPU": 1}}
    with _standing_cluster(groups) as standing, Client(standing) as client:
        config = _config(small_cube, native_lstm, tmp_path,
                         scheduler_address=standing.scheduler_address)  # fmt: skip
        assert declared_routing(config) is None  # found among the workers
        info = client.scheduler_info()["workers"]
        gpu = {a for a, w in info.items() if w["name"].startswith("gpu")}
        result, by_prefix, predicted, loads = _run_and_trace(config, client)
    assert result.pixels_predicted > 0
    assert predicted and predicted <= gpu, by_prefix
    assert by_prefix["read"] and not by_prefix["read"] & gpu, by_prefix
    assert {a for a, n in loads.items() if n} == gpu  # CPU workers load no model


@pytest.mark.parametrize("tiles_in_flight", [2, 1])
def test_a_tile_whose_read_spills_is_read_on_one_worker(
    small_cube, native_lstm, tmp_path, monkeypatch, caplog, tiles_in_flight
):
    """Where a tile's bands of all scenes do not fit a reading worker (the plan spills pieces to
    its local disk, which Dask counts as a few bytes), the tile is read and its windows put
    together on one reading worker, the tiles in flight on different ones: no window fetches
    another worker's pieces.  Inference still goes to the GPU worker.  (The restriction is loose,
    so that a tile whose worker is lost is read elsewhere; Dask's work stealing, which would give
    an idle worker queued reads of another's tile, leaves them alone: ``PinnedReads``.)
    With one tile in flight, the second spilling tile still starts at once, on the idle reading
    worker (before, it waited for the first and was read on the same worker)."""
    import logging

    from distributed import Client

    from treesits_dask.pipeline import reading

    monkeypatch.setattr(reading, "HELD_SHARE", 1e-9)  # the driver's budget: every plan spills
    groups = {"cpu-0": {"CPU": 2}, "cpu-1": {"CPU": 2}, "gpu-0": {"GPU": 1}}
    with (
        _standing_cluster(groups) as standing,
        Client(standing) as client,
    ):
        config = _config(small_cube, native_lstm, tmp_path, tiles="all",
                         scheduler_address=standing.scheduler_address,
                         tiles_in_flight=tiles_in_flight)  # fmt: skip
        info = client.scheduler_info()["workers"]
        gpu = {a for a, w in info.items() if w["name"].startswith("gpu")}
        from distributed import get_task_stream

        with (
            get_task_stream(client) as ts,
            caplog.at_level(logging.INFO, logger="treesits_dask.pipeline.schedule"),
        ):
            result = run(config, client=client)
    assert not result.failed and sorted(result.tiles) == ["X0069_Y0043", "X0070_Y0043"]
    readers: dict[str, set] = {}
    bands = 0
    for rec in ts.data:
        key = str(rec["key"][0] if isinstance(rec["key"], tuple) else rec["key"])
        if key.startswith("read-"):
            bands += key.startswith("read-band-")
            readers.setdefault(key.split("-")[-2], set()).add(rec["worker"])
    assert bands, "the plans were not read in bands"
    assert sorted(readers) == ["X0069_Y0043", "X0070_Y0043"], readers
    (one,), (other,) = readers.values()  # each tile on one worker ...
    assert one != other and not {one, other} & gpu  # ... its own, a reading one
    assert result.pixels_predicted > 0
    events = [r.getMessage() for r in caplog.records]
    started = [i for i, m in enumerate(events) if "spills its bands: read on worker" in m]
    finished = [i for i, m in enumerate(events) if "pixels predicted" in m]
    assert len(started) == 2 and len(finished) == 2, events
    assert max(started) < min(finished), events  # both tiles in flight at once
    beyond = [m for m in events if "beyond tiles_in_flight" in m]
    assert len(beyond) == (1 if tiles_in_flight == 1 else 0), events


@contextlib.contextmanager
def _pinned_reads(workers: int, kept: bool):
    """An in-process cluster of ``workers`` workers of one thread (with ``PinnedReads`` on its
    scheduler where ``kept``) and 30 read tasks of 0.1 s pinned loosely to the first worker by
    address, as a spilling tile's reads are: yields the client, the workers' addresses (sorted)
    and the futures."""
    import time

    from distributed import Client, LocalCluster

    from treesits_dask.pipeline.plugins import register_pinned_reads

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        if kept:
            assert register_pinned_reads(client)
        addresses = sorted(client.scheduler_info()["workers"])
        futures = [
            client.submit(time.sleep, 0.1, key=f"read-band-X0069_Y0043-{i}", pure=False,
                          workers=addresses[:1], allow_other_workers=True)
            for i in range(30)
        ]  # fmt: skip
        yield client, addresses, futures


def _read_workers(ts) -> list[str]:
    """The workers that ran the read tasks of a task stream, one entry per task."""
    return [rec["worker"] for rec in ts.data if str(rec["key"]).startswith("read-")]


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "dask-alone"])
def test_work_stealing_leaves_pinned_reads_on_their_worker(kept):
    """The reads of a spilling tile are pinned to one worker by a loose restriction (elsewhere
    only if it leaves); Dask's work stealing treats such tasks as unrestricted and gives them to an
    idle worker (the control, without the plugin), which then fetches the pieces on the other
    worker's disk.  With :class:`PinnedReads` on the scheduler none of them moves."""
    from distributed import get_task_stream, wait

    with _pinned_reads(2, kept) as (client, (pinned, idle), futures):
        with get_task_stream(client) as ts:
            wait(futures)
    where = _read_workers(ts)
    assert len(where) == 30
    if kept:
        assert set(where) == {pinned}
    else:
        assert idle in where  # Dask alone moved some of them


@pytest.mark.parametrize("kept", [True, False], ids=["kept-together", "dask-alone"])
def test_the_read_of_a_lost_worker_goes_on_together_on_one_other(kept):
    """Where the worker a read is pinned to leaves the cluster, its tasks (the loose restriction)
    all go to one other worker, the one Dask gives the first of them, so that the windows do not
    fetch pieces from every worker; left to Dask (the control) they spread over the others."""
    import time
    from collections import Counter

    from distributed import get_task_stream, wait

    async def lose(dask_scheduler, address):
        await dask_scheduler.remove_worker(address=address, stimulus_id="test-lost", close=True)

    with _pinned_reads(3, kept) as (client, (lost, *others), futures):
        deadline = time.monotonic() + 30
        while sum(f.done() for f in futures) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        with get_task_stream(client) as ts:
            client.run_on_scheduler(lose, address=lost)
            wait(futures)
    where = Counter(_read_workers(ts))
    assert where and lost not in where, where
    if kept:
        assert len(where) == 1, where  # the rest of the read on one other worker
    else:
        assert set(where) == set(others), where  # Dask alone spread it


@pytest.mark.parametrize("held", [1, 2**40], ids=["spills", "held-in-memory"])
def test_the_scheduler_knows_before_building_a_tile_whether_it_spills(
    small_cube, native_lstm, tmp_path, held
):
    """``tile_spills`` (what the scheduler asks before starting a tile beyond ``tiles_in_flight``)
    says what the tile's graph does: read on one worker where it spills, anywhere where not."""
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.pipeline.reading import ReadBudget, pinned_worker, tile_spills
    from treesits_dask.pipeline.schedule import tile_graph

    plan = make_plan(_config(small_cube, native_lstm, tmp_path))
    reads = ReadBudget(2**20, 2, 2**30, held_bytes=held, spill_bytes=2**40)
    # the graph is only built (the fork it writes into is a placeholder), not computed
    _, graph = tile_graph(plan, plan.tiles[0], None, Routing(), reads, "tcp://10.0.0.7:4000")
    assert tile_spills(plan.tiles[0], reads) is (held == 1)
    assert (pinned_worker(graph) is not None) is (held == 1)
    assert not tile_spills(plan.tiles[0], None)


def test_read_on_gpu_reads_on_the_gpu_workers(small_cube, native_lstm, tmp_path):
    """read_on: gpu (as the rendered worker groups advertise it): reads and inference on the GPU
    group, nothing of them on the CPU group."""
    from distributed import Client

    from treesits_dask.kube import KubeSettings

    k = KubeSettings(read_on="gpu", cpu={"workers": 1, "threads": 2}, gpu={"threads": 2})
    resources = k.worker_resources()
    assert resources == {"cpu": {}, "gpu": {"GPU": 1.0, "CPU": 2.0}}
    groups = {"cpu-0": resources["cpu"], "gpu-0": resources["gpu"]}
    with _standing_cluster(groups) as standing, Client(standing) as client:
        config = _config(small_cube, native_lstm, tmp_path, cluster="kubernetes",
                         kubernetes=k.model_dump(),
                         scheduler_address=standing.scheduler_address)  # fmt: skip
        info = client.scheduler_info()["workers"]
        gpu = {a for a, w in info.items() if w["name"].startswith("gpu")}
        result, by_prefix, predicted, _ = _run_and_trace(config, client)
    assert result.pixels_predicted > 0
    assert predicted and predicted <= gpu, by_prefix
    assert by_prefix["read"] and by_prefix["read"] <= gpu, by_prefix


def test_missing_gpu_workers_fail_fast(small_cube, native_lstm, tmp_path):
    from distributed import Client

    with _standing_cluster({"cpu-0": {"CPU": 2}}) as standing, Client(standing) as client:
        config = _config(small_cube, native_lstm, tmp_path, cluster="kubernetes",
                         scheduler_address=standing.scheduler_address,
                         workers_timeout=1)  # fmt: skip
        with pytest.raises(ClusterError, match="workers advertising GPU"):
            run(config, client=client)
