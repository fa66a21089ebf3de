"""`plan` says how each tile would be read before any cluster exists: the read budget of the
workers the settings start, each tile's read plan, what it decodes, and the disk that would have
it decode once (`pipeline.preview`)."""

import dataclasses
import json
import os

import pytest
import yaml

from treesits_dask.cli import main
from treesits_dask.config import load_config


def _linked_cube(tmp_path, n_scenes: int, tiles=("X0069_Y0043",)):
    """A cube of 1000 px FORCE < 3.8 tiles (100-row LZW strips) of ``n_scenes`` scenes each: one
    scene's BOA and QAI per tile written by the generator, hard-linked under the names of the
    others (``plan`` reads only headers, and a tile's read plan counts scenes, not their
    values)."""
    from treesits_dask.synthetic import make_cube

    make_cube(tmp_path / "one", tiles=tiles, size=1000, n_scenes=1, layout="strips", seed=2)
    root = tmp_path / "cube"
    root.mkdir()
    (root / "datacube-definition.prj").write_bytes(
        (tmp_path / "one" / "datacube-definition.prj").read_bytes()
    )
    for tile in tiles:
        (boa,) = sorted((tmp_path / "one" / tile).glob("*_SEN2?_BOA.tif"))
        (root / tile).mkdir()
        for i in range(n_scenes):
            date = f"{2018 + i // 300}{1 + i % 300 // 25:02d}{1 + i % 25:02d}"
            for kind in ("BOA", "QAI"):
                os.link(
                    str(boa).replace("_BOA", f"_{kind}"),
                    root / tile / f"{date}_LEVEL2_SEN2A_{kind}.tif",
                )
    return root, tiles[0]


def _kube_plan(
    tmp_path, capsys, cube, model, scratch: str, stream: str = "never"
) -> tuple[dict, str]:
    """``plan`` on Kubernetes settings of one CPU worker of 1 thread and 2 GiB, one tile in flight
    and ``scratch`` of scratch volume (the disk a run counts on there, so the plan is the same on
    every machine): (its JSON, its stderr).  ``stream``: the setting (``never``: the LSTM is read
    as the other models are, whose plans these tests are about)."""
    run_yaml = tmp_path / f"run-{scratch}-{stream}.yaml"
    run_yaml.write_text(
        yaml.safe_dump(
            {
                "cube": str(cube), "tiles": "all", "output": str(tmp_path / "out"),
                "model": model, "window": "100x100", "cluster": "kubernetes",
                "tiles_in_flight": 1, "stream": stream,
                "kubernetes": {
                    "scratch_size": scratch,
                    "gpu": {"enabled": False},
                    "cpu": {"workers": 1, "threads": 1, "memory_request": "2Gi",
                            "memory_limit": "2Gi", "cpu_request": "1", "cpu_limit": "1"},
                },
            }
        )
    )  # fmt: skip
    rc = main(["plan", "--config", str(run_yaml)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out), out.err


def test_plan_names_a_tile_that_would_decode_more_than_once_and_the_disk_to_decode_it_once(
    native_lstm, tmp_path, capsys
):
    """A 1000 px strips tile of 300 scenes on a 2 GiB Kubernetes worker with 1 GiB of scratch: its
    4 bands of all scenes (2.2 GiB) fit neither, so its plan decodes the strips more than once, and
    ``plan`` says so, naming the tile and the scratch volume on which it would decode once; with
    that scratch volume it does, with 1 GiB less it does not."""
    from treesits_dask.io.bands import plan_reads, planned_decode
    from treesits_dask.pipeline.plan import make_plan
    from treesits_dask.pipeline.preview import DECODE_ONCE, plan_mode

    cube, tile = _linked_cube(tmp_path, 300)
    summary, err = _kube_plan(tmp_path, capsys, cube, native_lstm, "1Gi")
    reads, (entry,) = summary["reads"], summary["tiles"]
    assert reads["known"] and reads["reading_workers"] == 1
    assert reads["disk"] == "kubernetes.scratch_size" and reads["free_disk_gib"] == 1.0
    read = entry["read"]
    assert read["decoded_over_tile"] > DECODE_ONCE and not read["read_alone"]
    need = read["decode_once_free_disk_gib"]
    assert need is not None and need > 1
    assert f"tile {tile}: read {read['mode']}, it decodes {read['decoded_over_tile']:.2f}" in err
    assert f"with {need} GiB of free local disk per reading worker (kubernetes.scratch_size" in err

    # the figures are those of the tile's read plan under the budget a run derives
    config = load_config(
        overrides=dict(cube=str(cube), tiles="all", output=str(tmp_path / "o"),
                       model=native_lstm, window="100x100", stream="never"),
        environ={},
    )  # fmt: skip
    t = make_plan(config).tiles[0]
    gib = 2**30
    plan = plan_reads(t.grid, t.reading, 300, int(2 * gib * 0.25), min_tasks=1,
                      held_bytes=int(2 * gib * 0.75), spill_bytes=gib // 2,
                      in_memory_bytes=gib)  # fmt: skip
    decoded = planned_decode(t.grid, t.reading, plan, 300) / (300 * 1000 * 1000 * 10 * 2)
    assert read["decoded_over_tile"] == round(decoded, 3)
    streamed = dataclasses.replace(plan, aligned=False, by_window=False, stream=True)
    for batches, words in ((((0, 150), (150, 300)), "2 batches"), (((0, 300),), "1 batch")):
        mode = plan_mode(dataclasses.replace(streamed, batches=batches))
        assert mode.endswith(f"streamed through the model in {words} of scenes"), mode

    enough, err = _kube_plan(tmp_path, capsys, cube, native_lstm, f"{need}Gi")
    assert enough["tiles"][0]["read"]["decoded_over_tile"] <= DECODE_ONCE
    assert "decode_once_free_disk_gib" not in enough["tiles"][0]["read"] and "warning" not in err
    short, _ = _kube_plan(tmp_path, capsys, cube, native_lstm, f"{need - 1}Gi")
    assert short["tiles"][0]["read"]["decoded_over_tile"] > DECODE_ONCE

    # the LSTM as a run reads it (``stream: auto``): streamed through the model, decoded once
    streamed, err = _kube_plan(tmp_path, capsys, cube, native_lstm, "1Gi", stream="auto")
    read = streamed["tiles"][0]["read"]
    assert read["mode"].startswith("in bands, streamed through the model in ")
    assert read["decoded_over_tile"] <= DECODE_ONCE and "warning" not in err
    # the model states of two 100-row bands at once, 153 bytes a pixel (16 wide, one layer)
    assert read["stream_state_gib"] == round(2 * 100 * 1000 * (2 * 16 * 4 + 25) / 2**30, 2)


@pytest.mark.parametrize("memory", ["1.5GiB", "auto"])
def test_the_plans_read_budget_is_the_one_a_run_finds_on_the_cluster_it_starts(
    small_cube, native_lstm, tmp_path, memory
):
    """The budget ``plan`` derives from the settings (a LocalCluster of 2 workers of 1 thread and
    1.5 GiB, or Dask's share of this machine's memory) is the one a run derives from that
    cluster's workers once started: the same read task budget, threads, memory and spill disk (to
    the free disk's drift while it starts)."""
    from treesits_dask.pipeline.cluster import connect, declared_routing, routing_for
    from treesits_dask.pipeline.preview import declared_workers
    from treesits_dask.pipeline.reading import read_budget, worker_disks

    config = load_config(
        overrides=dict(cube=small_cube.root, tiles="all", output=str(tmp_path / "out"),
                       model=native_lstm, workers=2, threads_per_worker=1, memory_limit=memory),
        environ={},
    )  # fmt: skip
    workers, disks, _ = declared_workers(config)
    declared = read_budget(config, workers, declared_routing(config), disks)
    with connect(config) as client:
        found = client.scheduler_info(n_workers=-1)["workers"]
        run = read_budget(config, found, routing_for(config, found), worker_disks(client))
    assert len(found) == len(workers) == 2
    assert (declared.task_bytes, declared.threads, declared.memory_limit) == (
        run.task_bytes, run.threads, run.memory_limit)  # fmt: skip
    assert (declared.held_bytes, declared.in_memory_bytes) == (run.held_bytes, run.in_memory_bytes)
    assert declared.spill_bytes == pytest.approx(run.spill_bytes, rel=0.02)


def test_plan_of_a_standing_cluster_says_its_reads_are_known_when_a_run_connects(
    small_cube, native_lstm, tmp_path, capsys
):
    rc = main(["plan", "--cube", small_cube.root, "--tiles", "all", "--model", native_lstm,
               "--output", str(tmp_path / "out"), "--scheduler-address",
               "tcp://127.0.0.1:1"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    summary = json.loads(out.out)
    assert summary["reads"]["known"] is False and "scheduler_address" in summary["reads"]["why"]
    assert all(t["read"] is None for t in summary["tiles"])


def test_plan_names_tiles_read_alike_in_one_warning(native_lstm, tmp_path, capsys):
    """Tiles of one shape and scene count that decode more than once are named in one warning
    (a national run's hundreds of tiles in a line, not hundreds of lines)."""
    tiles = ("X0069_Y0043", "X0070_Y0043")
    cube, _ = _linked_cube(tmp_path, 300, tiles)
    summary, err = _kube_plan(tmp_path, capsys, cube, native_lstm, "1Gi")
    (first, second) = (t["read"] for t in summary["tiles"])
    assert first == second and first["decoded_over_tile"] > 1.1
    (line,) = [x for x in err.splitlines() if x.startswith("warning:")]
    assert line.startswith(f"warning: 2 tiles {tiles[0]}, {tiles[1]}: read {first['mode']}, each ")


def test_plan_warns_where_a_streamed_tiles_model_states_would_not_fit_its_inference_worker(
    tmp_path, capsys
):
    """A streamed tile holds its windows' model states (the published LSTM's shapes: 1049 bytes
    a pixel, two 100-row bands of a 1000 px tile at once, 0.2 GiB): ``plan`` says how many
    inference workers there are and the smallest one's memory, and warns, naming the tile, where
    the states of the tiles in flight on one fill more than STATE_SHARE of it (a 384 MiB worker),
    not where they do not (2 GiB)."""
    from pathlib import Path

    from treesits_dask.bench.measure import bench_models
    from treesits_dask.pipeline.preview import STATE_SHARE, state_warnings

    cube, tile = _linked_cube(tmp_path, 300)
    model = bench_models(Path(tmp_path), ["sits-lstm"])["sits-lstm"]["model"]

    def plan(memory: str) -> tuple[dict, str]:
        run_yaml = tmp_path / f"run-{memory}.yaml"
        run_yaml.write_text(
            yaml.safe_dump(
                {
                    "cube": str(cube), "tiles": "all", "output": str(tmp_path / "out"),
                    "model": model, "window": "100x100", "cluster": "kubernetes",
                    "tiles_in_flight": 1,
                    "kubernetes": {
                        "scratch_size": "1Gi", "gpu": {"enabled": False},
                        "cpu": {"workers": 1, "threads": 1, "memory_request": memory,
                                "memory_limit": memory, "cpu_request": "1", "cpu_limit": "1"},
                    },
                }
            )
        )  # fmt: skip
        rc = main(["plan", "--config", str(run_yaml)])
        out = capsys.readouterr()
        assert rc == 0, out.err
        return json.loads(out.out), out.err

    small, err = plan("384Mi")
    reads, read = small["reads"], small["tiles"][0]["read"]
    assert reads["inference_workers"] == 1 and reads["inference_memory_gib"] == 0.38
    assert read["mode"].startswith("in bands, streamed through the model")
    assert read["stream_state_gib"] == round(2 * 100 * 1000 * (2 * 2 * 64 * 4 + 25) / 2**30, 2)
    assert read["stream_state_gib"] > STATE_SHARE * 0.38
    (line,) = state_warnings({**reads, "tiles": {tile: read}})
    assert f"warning: tile {tile}: streamed through the model, its windows' model states" in err
    assert line in err and "0.38 GiB" in line and "tiles_in_flight" in line
    big, err = plan("2Gi")
    assert big["reads"]["inference_memory_gib"] == 2.0
    assert "stream_state_gib" in big["tiles"][0]["read"] and "model states" not in err


def test_streamed_tiles_that_decode_more_than_once_are_named_in_one_warning():
    """Tiles streamed in sections of window columns (each full-width strip decoded once per
    section) decode more than once: ``plan`` and the run name them in one line, their entries
    holding the windows they are stepped in (a list, which broke the grouping of alike tiles)."""
    from treesits_dask.pipeline.preview import decode_warnings

    entry = {"mode": "in 2 sections of window columns, streamed through the model in 8 batches "
             "of scenes", "read_alone": False, "decoded_over_tile": 1.9,
             "stream_chunk": [300, 250], "stream_state_gib": 1.2}  # fmt: skip
    reads = {"known": True, "tiles": {"X0069_Y0043": entry, "X0070_Y0043": dict(entry)},
             "reading_workers": 1, "tiles_in_flight": 1}  # fmt: skip
    (line,) = decode_warnings(reads)
    assert line.startswith("2 tiles X0069_Y0043, X0070_Y0043: read in 2 sections of window")
    assert "each decodes 1.90 times its bytes" in line
