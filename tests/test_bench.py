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
