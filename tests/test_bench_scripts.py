"""Every script in ``benchmarks/`` runs at a tiny size, in a process of its own as a user runs it,
and reports what it is for.  The scripts import the package's internals and patch some of them,
so a change there can break them without any other test noticing: two did (``stream_layouts.py``'s
stand-in for ``stream_stages`` lacked a new argument; ``read_tasks.py`` patched a name the
reader no longer calls, so ``--min-tasks`` changed nothing and its reports said ``null``).  The
figures themselves are measured by running the scripts at full size, never here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"

#: a cube each script writes for itself: one 200 px tile (two where the script compares tiles read
#: together and alone) of 6 scenes, read in 100 px windows by one small worker
TINY = ["--size", "200", "--scenes", "6", "--window", "100", "--rounds", "1",
        "--memory-limit", "2GiB"]  # fmt: skip


def bench_script(name: str, args: list[str], tmp_path) -> dict:
    """Runs ``benchmarks/<name>.py`` with ``args`` in a process of its own; its JSON report."""
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *args,
         "--workdir", str(tmp_path / "wd"), "--json", str(report)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(report.read_text())


def by_variant(report: dict, key: str = "variant") -> dict:
    reads = {r[key]: r for r in report["reads"]}
    assert len(reads) == len(report["reads"])  # one round: one read per variant
    return reads


def test_every_benchmark_script_is_run_by_a_test_here():
    """A script added to ``benchmarks/`` gets its case here (or in the layout test below)."""
    tested = {*CASES, "layouts", "stream_layouts"}
    assert {p.stem for p in BENCHMARKS.glob("*.py")} == tested


def _block_chunks(report):
    reads = by_variant(report)
    assert set(reads) == {"blocks", "bands"}
    for read in reads.values():
        assert 0 < read["decoded_over_uncompressed"] <= 1.0 and read["read_tasks"] >= 1
        assert read["floor_mb_s"] > 0 and read["worker_restarts"] == 0


def _idle_readers(report):
    reads = by_variant(report)
    assert set(reads) == {"now", "stealing", "cap", "before"}
    # the same tile predicted each way: a pixel per window of its mask
    assert len({r["pixels_predicted"] for r in reads.values()}) == 1
    assert reads["now"]["pixels_predicted"] == 4 and set(reads["now"]["tile_seconds"])


def _lost_worker(report):
    reads = by_variant(report, "read_moved_together")
    assert set(reads) == {True, False}
    # the worker killed as the read starts: both ways still read every tile
    assert not any("failed" in r for r in reads.values()), reads
    assert all(r["worker_restarts"] <= 1 for r in reads.values())


def _read_alone(report):
    reads = by_variant(report)
    assert set(reads) == {"together", "alone"} and report["tiles"] == 2
    for read in reads.values():
        assert 0 < read["decoded_over_uncompressed"] <= 1.0
        assert len(read["sections"]) == len(read["spills"]) == 2  # each tile's plan


def _read_alone_run(report):
    reads = by_variant(report)
    assert set(reads) == {"stream", "alone", "together"}
    for read in reads.values():
        assert len(read["tiles_seconds"]) == 2 and read["worker_restarts"] == 0


def _read_ceiling(report):
    reads = by_variant(report)
    assert set(reads) == {"dask", "pool-1", "pool-N", "pool-N-disk"}
    assert reads["dask"]["decoded_x"] <= 1.0 and reads["dask"]["opens"] > 0
    for read in reads.values():
        assert read["over_one_thread_floor"] > 0


def _read_tasks(report):
    reads = {r["min_tasks"]: r for r in report["reads"]}
    assert set(reads) == {0, 5}
    # the forced least tasks reach the tile's read (they did not, silently, after the reader
    # planned through io.layouts)
    assert reads[5]["read_tasks"] >= 5 > reads[0]["read_tasks"] >= 1
    assert reads[0]["decoded_x"] == reads[5]["decoded_x"] <= 1.0


def _sections(report):
    reads = by_variant(report)
    assert set(reads) == {"gate", "sections"}
    assert all(r["decoded_over_uncompressed"] <= 1.0 for r in reads.values())


def _spill_workers(report):
    reads = by_variant(report, "tile_on_one_worker")
    assert set(reads) == {True, False}
    assert all(r["decoded_x"] <= 1.0 and r["worker_restarts"] == 0 for r in reads.values())


def _stream_sbert(report):
    reads = by_variant(report)
    assert set(reads) == {"stream", "never"}
    for read in reads.values():
        assert read["error"] is None and 0 < read["decoded_over_tile"] <= 1.0


def _stream_windows(report):
    (read,) = report["reads"]
    assert read["window"] == 100 and read["error"] is None and read["worker_restarts"] == 0


#: each script's arguments beyond the cube's, and what its report must say
CASES = {
    "block_chunks": (TINY + ["--tiles", "1"], _block_chunks),
    "idle_readers": (TINY + ["--tiles", "1"], _idle_readers),
    "lost_worker": (TINY + ["--tiles", "1", "--kill-after", "0"], _lost_worker),
    "read_alone": (TINY + ["--tiles", "2"], _read_alone),
    "read_alone_run": (TINY + ["--tiles", "2"], _read_alone_run),
    "read_ceiling": (TINY, _read_ceiling),
    "read_tasks": (TINY + ["--threads", "2", "--min-tasks", "0,5"], _read_tasks),
    "sections": (TINY + ["--tiles", "1"], _sections),
    "spill_workers": (TINY + ["--tiles", "1"], _spill_workers),
    "stream_sbert": (
        TINY + ["--tiles", "1", "--model-size", "small", "--forest", "0.05"],
        _stream_sbert,
    ),  # fmt: skip
    "stream_windows": (TINY + ["--tiles", "1", "--windows", "100"], _stream_windows),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_benchmark_script_runs_at_a_tiny_size_and_reports_what_it_compares(name, tmp_path):
    args, check = CASES[name]
    check(bench_script(name, args, tmp_path))


@pytest.mark.parametrize("script", ["layouts", "stream_layouts"])
def test_the_two_layout_benchmarks_run_and_count_what_they_decode(tmp_path, script):
    """``benchmarks/layouts.py`` and ``benchmarks/stream_layouts.py`` on a small tile of 3
    striped scenes and then 3 COGs (hard links to two generated cubes): both ways are read, and
    the counts they report say what the work on those layouts is for (a part or stage per layout
    decodes each block once, one plan for all more)."""
    from treesits_dask.synthetic import make_cube

    for layout in ("strips", "cog"):
        make_cube(tmp_path / layout, size=300, n_scenes=3, layout=layout, start="2021-01-01",
                  end="2021-06-30", seed=2, with_masks=False)  # fmt: skip
    report = bench_script(
        script,
        ["--strips", str(tmp_path / "strips"), "--cogs", str(tmp_path / "cog"), "--each", "3",
         "--window", "100", "--memory-limit", "2GiB", "--rounds", "1"],
        tmp_path,
    )  # fmt: skip
    own, one = ("parts", "one-plan") if script == "layouts" else ("stages", "one-plan")
    reads = by_variant(report)
    assert set(reads) == {own, one}
    key = "decoded_over_uncompressed" if script == "layouts" else "decoded_over_files"
    assert 0 < reads[own][key] <= 1.0 < 1.1 < reads[one][key]
    assert not any(r.get("error") for r in reads.values())
