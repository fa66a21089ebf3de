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


def test_a_streamed_tile_reads_on_the_reading_workers_and_steps_on_the_gpu_worker(
    small_cube, native_lstm, tmp_path, monkeypatch
):
    """A tile whose bands do not fit a reading worker, streamed (the LSTM, ``stream: auto``):
    its reads and the picks of their pieces run only on the CPU workers, its steps through the
    model and its outputs only on the GPU worker (the graph's per-task resources), and it maps
    what a run that holds its bands maps."""
    from distributed import Client

    from treesits_dask.pipeline import reading

    groups = {"cpu-0": {"CPU": 2}, "cpu-1": {"CPU": 2}, "gpu-0": {"GPU": 1}}
    with _standing_cluster(groups) as standing, Client(standing) as client:
        held = _config(small_cube, native_lstm, tmp_path, tiles="all",
                       scheduler_address=standing.scheduler_address)  # fmt: skip
        run(held, client=client)
        monkeypatch.setattr(reading, "HELD_SHARE", 1e-9)  # no band of all scenes fits
        config = held.model_copy(update={"output": str(tmp_path / "streamed")})
        info = client.scheduler_info()["workers"]
        gpu = {a for a, w in info.items() if w["name"].startswith("gpu")}
        result, by_prefix, _, _ = _run_and_trace(config, client)
    assert not result.failed and result.pixels_predicted > 0
    cpu = set(info) - gpu
    # "read" (bands of scenes and their pieces), "stream" (steps, their marks, the outputs)
    assert by_prefix["read"] and by_prefix["read"] <= cpu, by_prefix
    assert by_prefix["stream"] == gpu, by_prefix
    a, b = open_map(str(tmp_path / "out")), open_map(str(tmp_path / "streamed"))
    np.testing.assert_allclose(b.probability.values, a.probability.values, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(b.valid_obs.values, a.valid_obs.values)


@pytest.mark.parametrize("tiles_in_flight", [2, 1])
def test_a_tile_whose_read_spills_is_read_on_one_worker(
    small_cube, native_lstm, tmp_path, monkeypatch, caplog, tiles_in_flight
):
    """Where a tile's bands of all scenes do not fit a reading worker (the plan spills pieces to
    its local disk, which Dask counts as a few bytes), the tile is read and its windows put
    together on one reading worker, the tiles in flight on different ones: no window fetches
    another worker's pieces.  Inference still goes to the GPU worker.  (The graph's restriction is
    loose, so that without ``PinnedReads`` a tile whose worker is lost is read elsewhere; the
    plugin makes it strict, so that Dask's work stealing, which would give an idle worker queued
    reads of another's tile, leaves them alone.)
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
                         tiles_in_flight=tiles_in_flight, stream="never")  # fmt: skip
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
def _pinned_reads(
    workers: int, kept: bool, paused: bool = False, gone: bool = False, processes: bool = False
):  # fmt: skip
    """An in-process cluster of ``workers`` workers of one thread (``processes``: worker processes
    with their nannies) (with ``PinnedReads`` on its scheduler where ``kept``) and 30 read tasks
    of 0.1 s pinned loosely to the first worker by address, as a spilling tile's reads are
    (``paused``: that worker paused first, as Dask pauses one at 80 % of its memory; ``gone``:
    pinned to a worker that is not in the cluster): yields the client, the workers' addresses
    (sorted) and the futures."""
    import time

    from distributed import Client, LocalCluster

    from treesits_dask.pipeline.plugins import register_pinned_reads

    with (
        # a paused worker's memory monitor would resume it at once: no memory limit, no monitor
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=processes,
            dashboard_address=":0",
            **({"memory_limit": 0} if paused else {}),
        ) as cluster,
        Client(cluster) as client,
    ):
        if kept:
            assert register_pinned_reads(client)
        addresses = sorted(client.scheduler_info()["workers"])
        if paused:
            _set_status(client, addresses[0], "paused")
        pinned = ["tcp://192.0.2.1:1"] if gone else addresses[:1]
        futures = [
            client.submit(time.sleep, 0.1, key=f"read-band-X0069_Y0043-{i}", pure=False,
                          workers=pinned, allow_other_workers=True)
            for i in range(30)
        ]  # fmt: skip
        yield client, addresses, futures


def _wait_done(futures, n: int) -> None:
    """Wait (30 s at most) until ``n`` of the ``futures`` are done."""
    import time

    deadline = time.monotonic() + 30
    while sum(f.done() for f in futures) < n and time.monotonic() < deadline:
        time.sleep(0.02)


def _set_status(client, address: str, status: str) -> None:
    """Pause (``"paused"``) or resume (``"running"``) a worker as its memory monitor does, and
    wait until the scheduler knows."""
    import time

    from distributed.core import Status

    def flip(dask_worker, status):
        dask_worker.status = Status[status]

    def seen(dask_scheduler, address):
        return dask_scheduler.workers[address].status.name

    client.run(flip, status=status, workers=[address])
    deadline = time.monotonic() + 10
    while client.run_on_scheduler(seen, address=address) != status:
        assert time.monotonic() < deadline, f"the scheduler does not see {address} {status}"
        time.sleep(0.02)


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
    """Where the worker a read is pinned to leaves the cluster, its tasks all go to one other
    worker (:meth:`PinnedReads._rehome`), so that the windows do not fetch pieces from every
    worker; left to Dask (the control, a loose restriction) they spread over the others."""
    from collections import Counter

    from distributed import get_task_stream, wait

    async def lose(dask_scheduler, address):
        await dask_scheduler.remove_worker(address=address, stimulus_id="test-lost", close=True)

    with _pinned_reads(3, kept) as (client, (lost, *others), futures):
        _wait_done(futures, 3)
        with get_task_stream(client) as ts:
            client.run_on_scheduler(lose, address=lost)
            wait(futures)
    where = Counter(_read_workers(ts))
    assert where and lost not in where, where
    if kept:
        assert len(where) == 1, where  # the rest of the read on one other worker
    else:
        assert set(where) == set(others), where  # Dask alone spread it


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "dask-alone"])
def test_a_paused_worker_keeps_the_read_pinned_to_it(kept):
    """Dask pauses a worker at 80 % of its memory, which a reading worker of a spilling tile may
    reach; Dask then gives the tasks pinned to it (a loose restriction) to any running worker
    (the control), which fetches the tile's pieces from the paused one.  With
    :class:`PinnedReads` they wait for it, and run there once it resumes."""
    import time

    from distributed import get_task_stream, wait

    with _pinned_reads(2, kept, paused=True) as (client, (pinned, other), futures):
        with get_task_stream(client) as ts:
            time.sleep(1.0)
            done_while_paused = sum(f.done() for f in futures)
            _set_status(client, pinned, "running")
            wait(futures, timeout=60)
    where = _read_workers(ts)
    assert len(where) == 30
    if kept:
        assert done_while_paused == 0 and set(where) == {pinned}, where
    else:
        assert done_while_paused and other in where  # Dask alone ran them elsewhere


def test_a_worker_paused_for_long_lets_the_read_pinned_to_it_go_on_elsewhere(monkeypatch):
    """A worker whose memory Dask cannot free stays paused; the reads pinned to it (strictly, by
    :class:`PinnedReads`) would wait for it for ever.  After ``PAUSED_GRACE`` seconds they go on
    on another worker."""
    from distributed import get_task_stream, wait

    from treesits_dask.pipeline import plugins

    monkeypatch.setattr(plugins, "PAUSED_GRACE", 1.0)  # the scheduler runs in this process
    with _pinned_reads(2, True, paused=True) as (client, (pinned, other), futures):
        with get_task_stream(client) as ts:
            wait(futures, timeout=60)  # never resumed
    assert set(_read_workers(ts)) == {other}


@pytest.mark.parametrize("kept", [True, False], ids=["kept-together", "dask-alone"])
def test_a_read_pinned_to_a_worker_gone_before_it_came_runs_on_one_other(kept):
    """A tile pinned to a worker that left between the driver's choice and the graph's arrival
    is read on one other worker with :class:`PinnedReads`; Dask alone spreads it."""
    from distributed import get_task_stream, wait

    with _pinned_reads(2, kept, gone=True) as (client, addresses, futures):
        with get_task_stream(client) as ts:
            wait(futures, timeout=60)
    where = set(_read_workers(ts))
    assert where <= set(addresses)
    assert len(where) == (1 if kept else 2), where


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "dask-alone"])
def test_the_read_of_a_lost_only_worker_goes_on_on_its_successor(kept):
    """A read pinned to a worker that left, where the cluster has no other running worker at
    that moment (its only reading worker killed and started again by its nanny under a new
    address; on Kubernetes, every reading pod lost at once), goes on on the worker that joins.
    Dask alone (the control, a loose restriction) leaves it waiting, for ever or until the
    scheduler's no-workers timeout fails it (30 min on Kubernetes): with no running worker it
    has nowhere to fall back to, and a worker that joins later takes only the waiting tasks its
    restrictions allow.  :class:`PinnedReads` pins the tile to the new worker."""
    import os
    import signal
    import time

    from distributed import get_task_stream, wait

    def waiting(dask_scheduler):
        return sum(ts.state == "no-worker" for ts in dask_scheduler.tasks.values())

    with _pinned_reads(1, kept, processes=True) as (client, (first,), futures):
        _wait_done(futures, 3)
        (pid,) = client.run(os.getpid).values()
        with get_task_stream(client) as ts:
            os.kill(pid, signal.SIGKILL)  # its nanny starts a new worker process
            if kept:
                wait(futures, timeout=90)
            else:
                time.sleep(8)  # the new worker is up within 2-3 s
                stuck = client.run_on_scheduler(waiting)
                client.cancel(futures)
        client.wait_for_workers(1, timeout=60)
        (second,) = client.scheduler_info()["workers"]
    assert second != first
    where = set(_read_workers(ts)) - {first}  # a task may have finished as it was killed
    if kept:
        assert where == {second}, where
    else:
        assert stuck and not where, (stuck, where)  # Dask alone: waiting for ever


@pytest.mark.parametrize(
    "held, whole",
    [(1, None), (2**40, None), (2**40, 1)],
    ids=["spills", "held-in-memory", "beyond-what-is-held-whole"],
)
def test_the_scheduler_knows_before_building_a_tile_whether_it_spills(
    small_cube, native_lstm, tmp_path, held, whole
):
    """``tile_spills`` (what the scheduler asks before starting a tile beyond ``tiles_in_flight``)
    says what the tile's graph does: read on one worker where it spills (also where its bands fit
    the held memory but not what a worker holds whole of bands that windows cross,
    ``in_memory_bytes``: 4 px windows over bands of 6-row strips), anywhere where not."""
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.pipeline.reading import ReadBudget, pinned_worker, tile_spills
    from treesits_dask.pipeline.schedule import tile_graph

    extra = {"window": "4x30"} if whole else {}
    plan = make_plan(_config(small_cube, native_lstm, tmp_path, stream="never", **extra))
    reads = ReadBudget(2**20, 2, 2**30, held_bytes=held, spill_bytes=2**40, in_memory_bytes=whole)
    # the graph is only built (the fork it writes into is a placeholder), not computed
    _, graph = tile_graph(plan, plan.tiles[0], None, Routing(), reads, "tcp://10.0.0.7:4000")
    spills = held == 1 or whole == 1
    assert tile_spills(plan.tiles[0], reads) is spills
    assert (pinned_worker(graph) is not None) is spills
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
