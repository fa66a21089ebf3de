"""The benchmark runs end to end at a tiny size and reports every figure it promises (the targets
themselves are checked by running it at full size, never in a timed unit test)."""

import json

import pytest

from treesits_dask.bench.throughput import main

pytestmark = pytest.mark.slow


def test_bench_small(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(
        [
            "--size",
            "120",
            "--scenes",
            "8",
            "--families",
            "sits-lstm",
            "--masked-forest",
            "0",
            "--rss-sizes",
            "",
            "--skip-sbert-pxps",
            "--workdir",
            str(tmp_path / "w"),
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    lstm = report["families"]["sits-lstm"]
    for key in ("decode_s", "forward_s", "end_to_end_s", "px_per_s", "efficiency", "peak_rss_mib"):
        assert lstm[key] > 0, key
    assert lstm["pixels_predicted"] == lstm["forward_pixels"] > 0
    assert lstm["efficiency"] == pytest.approx(
        lstm["end_to_end_s"] / (lstm["decode_s"] + lstm["forward_s"]), rel=0.02
    )
    # each time is the fastest of its samples (two by default), every sample reported
    assert len(lstm["end_to_end_s_runs"]) == len(lstm["decode_s_runs"]) == 2
    assert lstm["end_to_end_s"] == min(lstm["end_to_end_s_runs"])
    # ... the forward: the fastest of one window at a time and the windows side by side
    assert lstm["forward_s"] == min([*lstm["forward_s_before_after"], lstm["forward_one_stream_s"]])
    assert lstm["efficiency_worst"] >= lstm["efficiency"]
    rerun = report["rerun"]
    assert (
        rerun["tiles_processed"] == 0
        and rerun["tiles_skipped"] == 1
        and rerun["geotiff_opens"] == 0
    )
    assert rerun["second_run_s"] < rerun["first_run_s"]


def test_bench_masked_comparison_with_the_cube_paged_in(tmp_path, capsys):
    """The masked comparison at a tiny size, the cube's files read before each timed run: the
    masked run predicts fewer pixels and decodes no block without a forest pixel."""
    from treesits_dask.bench.pagecache import page_in

    out = tmp_path / "bench.json"
    rc = main(
        ["--size", "120", "--scenes", "6", "--families", "", "--masked-layouts", "cog",
         "--masked-window", "40x40", "--forest-scale", "30", "--rss-sizes", "", "--repeat", "1",
         "--page-in", "--workdir", str(tmp_path / "w"), "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    masked = json.loads(out.read_text())["masked"]["cog"]
    assert masked["page_in"] is True
    assert "GiB of the cube read" in capsys.readouterr().err
    assert 0 < masked["masked"]["pixels_predicted"] < masked["unmasked"]["pixels_predicted"]
    assert 0 < masked["masked"]["decoded_over_forest_blocks"] <= 1.0
    assert masked["masked_over_unmasked"] > 0
    cube = tmp_path / "w" / "cube-masked-cog"
    assert page_in(cube) == sum(p.stat().st_size for p in cube.rglob("*") if p.is_file()) > 0


def test_gpu_check_on_cpu_reports_every_key_of_the_schema(tmp_path, capsys):
    """The device check runs on CPU at a tiny size and writes the keys a GPU run writes (null
    where a figure needs a GPU); the committed CPU report has the same schema."""
    from pathlib import Path

    from treesits_dask.bench.gpu_check import SCHEMA, schema_problems
    from treesits_dask.cli import main as cli_main

    out = tmp_path / "gpu.json"
    rc = cli_main(
        [
            "bench",
            "--gpu",
            "--device",
            "cpu",
            "--size",
            "40",
            "--scenes",
            "6",
            "--forward-pixels",
            "24",
            "--forward-seconds",
            "0",
            "--parity-pixels",
            "48",
            "--window-scenes",
            "60",
            "--e2e-family",
            "sits-lstm",
            "--skip-compile",
            "--cpu-workers",
            "1",
            "--threads-per-worker",
            "1",
            "--workdir",
            str(tmp_path / "w"),
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert schema_problems(report) == [] and report["errors"] == []
    assert report["machine"]["cuda"] is False and report["machine"]["reduced_sizes"] is True
    for family in ("sits-lstm", "sits-transformer", "sbert_len256", "sbert_4y_window"):
        entry = report["forward"][family]
        assert entry["fp32"]["px_per_s"] > 0 and entry["bf16"]["px_per_s"] > 0
        # timed after a warm-up call on the same inputs, 3 calls at least however long they take
        assert entry["fp32"]["calls"] >= 3 and entry["bf16"]["calls"] >= 3
        assert entry["tf32"] is None  # a tensor-core format: no figure on CPU
    assert report["forward"]["sbert_len256"]["fp32"]["steps"] == 300
    for family, par in report["parity"].items():
        # the device preparation on CPU gives the CPU path's probabilities exactly
        assert par["fp32_vs_cpu"]["max_abs"] == 0.0, family
        assert par["bf16_vs_fp32"]["max_abs"] > 0 and par["tf32_vs_fp32"] is None
    assert report["torch_compile"] is None  # skipped here (compiling takes half a minute)
    e2e = report["end_to_end"]
    assert e2e["pixels_predicted"] > 0 and e2e["inference_only_on_gpu_workers"] is True
    assert e2e["gpu_busy"]["fraction"] is None and e2e["peak_device_memory_mib"] is None
    assert set(report["goals"]) == set(SCHEMA["goals"]) and not any(report["goals"].values())
    docs = Path(__file__).resolve().parents[1] / "docs"
    assert schema_problems(json.loads((docs / "gpu_check_cpu.json").read_text())) == []
    # the run on an H200 (README: "GPU inference")
    h200 = json.loads((docs / "gpu_check_h200.json").read_text())
    assert schema_problems(h200) == [] and h200["machine"]["cuda"] is True


def test_bench_real_small(tmp_path, capsys):
    """``bench --real`` at a tiny size, both cases on the COG layout (both layouts are read in
    bands by test_cube's tests; each case here starts two clusters): the decoded bytes are
    counted and every block is decoded once (amplification 1.0 with the blocks that QAI screens
    whole, which are not decoded), in chunks of whole blocks."""
    from treesits_dask.bench.real import main as real_main

    out = tmp_path / "real.json"
    rc = real_main(
        ["--size", "300", "--scenes", "6", "--regime-size", "300", "--regime-scenes", "40",
         "--memory-limit", "2GiB", "--regime-memory-limit", "2GiB", "--families", "sits-lstm",
         "--floor-scenes", "2", "--repeat", "1", "--workdir", str(tmp_path / "w"),
         "--layouts", "cog", "--cold", "--json", str(out)]
    )  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert json.loads(out.read_text()) == report
    assert set(report["cases"]) == {"real-cog", "600-cog"}
    # --cold: each case's cube dropped from the page cache before its timed read (--page-in, which
    # reads it into the page cache, is the masked comparison's test)
    assert captured.err.count("GiB of the cube out of the page cache") == 2
    for key, case in report["cases"].items():
        read = case["read"]
        # every block decoded once, but for the BOA blocks that QAI screens whole (not decoded)
        assert read["decode_amplification"] + read["screened_share"] == pytest.approx(1, abs=2e-4)
        assert read["screened_share"] > 0, key  # the synthetic weather has all-cloud scenes
        for fig in ("decode_floor_mb_s_per_core", "decode_floor_parallel_mb_s_per_core",
                    "decode_floor_to_memory_mb_s_per_core", "read_mb_s_per_core",
                    "read_over_floor", "read_over_parallel_floor", "read_over_floor_to_memory",
                    "worker_peak_rss_mib"):  # fmt: skip
            assert read[fig] > 0, (key, fig)
        assert len(read["read_over_parallel_floor_paired"]) == len(read["read_s_runs"]) == 1
        assert all(v > 0 for v in read["read_over_floor_paired"]), key
        assert len(read["read_over_floor_to_memory_paired"]) == 1, key
        assert read["decode_floor_sample_mib"] == read["uncompressed_mib"], (
            key
        )  # all 6 or 40 scenes
        assert read["peak_rss_within_limit"] and read["worker_restarts_runs"] == [0], key
        assert read["page_in"] is False and read["cold"] is True, key
        # the reads asked the kernel for the compressed blocks they decode (io.prefetch)
        assert 0 < read["prefetched_mib_runs"][0] < read["uncompressed_mib"], key
        # 150 px windows of a 300 px tile of 256 px blocks: read in chunks of whole blocks that
        # hold a window (256 and 44 px), which the worker holds (io.grid.block_chunk)
        assert case["window"] == [150, 150] and case["read_chunk"] == [256, 256], key
        assert case["windows"] == 4 and read["read_modes"] == ["blocks"], key
        assert read["spilled_mib"] == 0 and read["pieces_written_mib"] == 0, key
        # the chunks come from the worker's recycled buffers (io.buffers)
        assert read["fresh_buffer_mib_runs"][0] + read["reused_buffer_mib_runs"][0] > 0, key
        lstm = case["end_to_end"]["sits-lstm"]
        assert lstm["pixels_predicted"] > 0 and lstm["px_per_s"] > 0, key
        assert "sbert" not in case["end_to_end"]
    # the window budget shrinks with the tile's area (the decision of a 3000 px tile)
    assert report["cases"]["600-cog"]["window_budget_mib"] == round(2048 * (300 / 3000) ** 2, 1)
    assert not (tmp_path / "w" / "cube-real-cog").exists()  # cubes deleted unless --keep


def test_a_worker_restarted_during_a_read_is_counted(client):
    """A worker that its nanny restarts (for memory) is another process afterwards: the read's
    counts and peak RSS then miss the lost process, so ``bench --real`` reports the restarts and
    no peak RSS within the limit."""
    from treesits_dask.bench.measure import worker_pids, worker_restarts

    before = worker_pids(client)
    assert before and worker_restarts(before, worker_pids(client)) == 0
    client.restart()
    assert worker_restarts(before, worker_pids(client)) == len(before)


def test_parallel_floor_gives_each_thread_an_even_share_of_the_bytes():
    """The per-core floor on several threads splits the sample by uncompressed bytes: a BOA (10
    bands) and QAI (1 band) list split as ``files[i::2]`` gave one thread every BOA, so the other
    idled after a tenth of the time and the 'per core' floor was about half of a core's speed."""
    from treesits_dask.bench.real import split_even

    boa, qai = 10 * 3000 * 3000 * 2, 3000 * 3000 * 2
    files = [(f"{d}_{kind}.tif", n) for d in range(8) for kind, n in (("BOA", boa), ("QAI", qai))]
    sizes = dict(files)
    for parts in (2, 3, 4):
        groups = split_even(files, parts)
        assert sorted(p for g in groups for p in g) == sorted(sizes)  # each file once
        load = [sum(sizes[p] for p in g) for g in groups]
        assert len(groups) == parts
        assert max(load) - min(load) <= boa, (parts, load)  # within one file of each other
    two = split_even(files, 2)
    assert all(sum(p.endswith("_BOA.tif") for p in g) == 4 for g in two)
    assert split_even(files[:1], 4) == [[files[0][0]]]  # no empty groups


def test_floor_to_memory_decodes_every_block_row_into_the_ring_in_turn(tmp_path, monkeypatch):
    """The floor to memory decodes what the reused-buffer floor decodes, each block row into the
    next part of its ring (wrapping round where the next one would not fit), so that no row is
    written where the last one was (a reused buffer stays in the CPU's cache)."""
    import numpy as np
    import rasterio

    from treesits_dask.bench import real

    data = np.arange(3 * 50 * 40, dtype=np.int16).reshape(3, 50, 40)
    path = tmp_path / "scene_BOA.tif"
    profile = {"driver": "GTiff", "width": 40, "height": 50, "count": 3, "dtype": "int16",
               "tiled": True, "blockxsize": 16, "blockysize": 16}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    monkeypatch.setattr(real, "MEMORY_RING_BYTES", 2 * 3 * 16 * 40 * 2)  # two block rows
    monkeypatch.setattr(real, "_RING", [])
    monkeypatch.setattr(real.os, "sysconf", lambda name: 0)  # no cache size: the least ring
    reused = real.decode_floor([str(path)])
    to_memory = real.decode_floor([str(path)], to_memory=True)
    assert to_memory["mib"] == reused["mib"] == round(data.nbytes / 2**20, 1)
    ring = real._ring().reshape(-1)
    row = 3 * 16 * 40
    # 4 block rows (16, 16, 16, 2 px high) into a ring of two: the third wrapped round to its
    # start, the fourth after it, over the start of the second
    assert np.array_equal(ring[:row].reshape(3, 16, 40), data[:, 32:48])
    assert np.array_equal(ring[row : row + 240].reshape(3, 2, 40), data[:, 48:50])
    assert not np.array_equal(ring[row : 2 * row].reshape(3, 16, 40), data[:, 16:32])
