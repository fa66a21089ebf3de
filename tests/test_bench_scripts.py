"""Every script in ``benchmarks/`` runs at a tiny size and reports what it is for.  The scripts
import the package's internals and patch some of them, so a change there can break them without
any other test noticing: two did (``stream_layouts.py``'s stand-in for ``stream_stages`` lacked a
new argument; ``read_tasks.py`` patched a name the reader no longer calls, so ``--min-tasks``
changed nothing and its reports said ``null``).  The figures themselves are measured by running
the scripts at full size, never here.

The scripts run one after the other in one process of their own (:data:`RUNNER`), each through
its ``main``, as ``python benchmarks/<name>.py`` runs it: a process per script spent most of its
time importing torch, distributed and the package again (about 4 s of CPU each, twice that while
the other test worker runs)."""

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

#: runs each script's ``main(argv)`` in turn (argv from a JSON file of ``{name: argv}``), and
#: writes ``<name>.status`` beside: its return code and seconds, or the traceback of what it raised
RUNNER = """
import importlib.util, json, sys, time, traceback
from pathlib import Path

if __name__ == "__main__":
    benchmarks, cases, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    for name, argv in json.loads(cases.read_text()).items():
        t0 = time.perf_counter()
        try:
            path = benchmarks / f"{name}.py"
            spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            status = {"rc": module.main(argv), "seconds": round(time.perf_counter() - t0, 1)}
        except BaseException:  # SystemExit included: a script's own failure
            status = {"rc": None, "error": traceback.format_exc()}
        (out / f"{name}.status").write_text(json.dumps(status))
"""


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    """``{name: (status, report)}`` of every script of :data:`CASES`, run by :data:`RUNNER`."""
    from treesits_dask.synthetic import make_cube

    root = tmp_path_factory.mktemp("bench-scripts")
    for layout in ("strips", "cog"):  # the two layout scripts' tile: 3 strips, then 3 COGs
        make_cube(root / layout, size=300, n_scenes=3, layout=layout, start="2021-01-01",
                  end="2021-06-30", seed=2, with_masks=False)  # fmt: skip
    cases = {}
    for name, (args, _) in CASES.items():
        args = [a.replace("{root}", str(root)) for a in args]
        cases[name] = [*args, "--workdir", str(root / name), "--json", str(root / f"{name}.json")]
    (root / "cases.json").write_text(json.dumps(cases))
    (root / "runner.py").write_text(RUNNER)
    done = subprocess.run(
        [sys.executable, str(root / "runner.py"), str(BENCHMARKS), str(root / "cases.json"),
         str(root)], capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = {}
    for name in CASES:
        status = json.loads((root / f"{name}.status").read_text())
        report = root / f"{name}.json"
        out[name] = (status, json.loads(report.read_text()) if report.exists() else None)
    return out


def by_variant(report: dict, key: str = "variant") -> dict:
    reads = {r[key]: r for r in report["reads"]}
    assert len(reads) == len(report["reads"])  # one round: one read per variant
    return reads


def test_every_benchmark_script_is_run_by_a_test_here():
    """A script added to ``benchmarks/`` gets its case in :data:`CASES`."""
    assert {p.stem for p in BENCHMARKS.glob("*.py")} == set(CASES)


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


def _two_layouts(report, own, key):
    """Both ways read the tile of 3 strips and 3 COGs; a part or stage per layout decodes each
    block once, one plan for all more."""
    reads = by_variant(report)
    assert set(reads) == {own, "one-plan"}
    assert 0 < reads[own][key] <= 1.0 < 1.1 < reads["one-plan"][key]
    assert not any(r.get("error") for r in reads.values())


def _layouts(report):
    _two_layouts(report, "parts", "decoded_over_uncompressed")


def _stream_layouts(report):
    """The layouts alternate scene by scene (``--alternate 1``): 6 runs, streamed in 6 stages
    (``--max-stages 6``, above the run's cap), where a run streams them in one plan (6 stages
    of 1 scene do not save ``STAGE_COST`` scenes' bytes each)."""
    assert [n for _, n in report["runs"]] == [1] * 6
    assert report["run_streams"] == "one-plan" and report["max_stages"] == 6
    _two_layouts(report, "stages", "decoded_over_files")


#: the two layout scripts' tile: hard links to the scenes of two cubes the fixture writes
LAYOUTS = ["--strips", "{root}/strips", "--cogs", "{root}/cog", "--each", "3", "--window", "100",
           "--memory-limit", "2GiB", "--rounds", "1"]  # fmt: skip

#: each script's arguments (``{root}``: the fixture's folder), and what its report must say
CASES = {
    "block_chunks": (TINY + ["--tiles", "1"], _block_chunks),
    "idle_readers": (TINY + ["--tiles", "1"], _idle_readers),
    "lost_worker": (TINY + ["--tiles", "1", "--workers", "2", "--kill-after", "0"], _lost_worker),
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
    "layouts": (LAYOUTS, _layouts),
    "stream_layouts": (LAYOUTS + ["--alternate", "1", "--max-stages", "6"], _stream_layouts),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_benchmark_script_runs_at_a_tiny_size_and_reports_what_it_compares(name, reports):
    status, report = reports[name]
    assert status["rc"] == 0, status.get("error")
    CASES[name][1](report)
