"""What a run reports: :class:`RunResult`, ``run.json`` (:func:`write_summary`), task seconds per
stage from the scheduler's task stream (:class:`StageClock`) and the Dask performance report
(:func:`performance_report`).  Reporting never fails a run: problems are logged as warnings.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..io import storage
from ..version import __version__

__all__ = [
    "RunResult",
    "StageClock",
    "collect_inference",
    "performance_report",
    "run_settings",
    "stage_seconds",
    "write_summary",
]

log = logging.getLogger(__name__)

#: task-name prefixes -> stage of the run report (see :func:`stage_seconds`)
_STAGES = {
    "read": "read",
    "mask": "mask",
    "predict_packed": "predict",
    "predict_packed_nomask": "predict",
    "write": "write",
    "cog": "cog",
    "smooth": "smooth",
    "overview": "overviews",
    "alertstate": "read",
}


@dataclass
class RunResult:
    """What a run did: per-tile statistics, failures, skipped tiles and timings."""

    output: str
    tiles: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    #: tracebacks of tiles that failed on something other than an input problem (a bug)
    tracebacks: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    #: why each processed tile was processed (from the ledger comparison)
    reasons: dict[str, list[str]] = field(default_factory=dict)
    seconds: float = 0.0
    #: seconds of task compute time per stage (read, mask, predict, write, cog), summed over threads
    stages: dict[str, dict] = field(default_factory=dict)
    #: ``<output>/_runs/<run id>/``: this run's ``run.json`` and Dask performance report
    report_dir: str | None = None
    #: finished tiles whose COGs were rebuilt from the map (no scene read)
    cogs_rebuilt: list[str] = field(default_factory=list)
    #: tiles whose derived layers were made again from the stored probabilities: ``smoothed``
    #: (whole tiles or strips along changed neighbours) and ``overviews`` (their footprints)
    postprocessed: dict[str, list[str]] = field(default_factory=dict)
    #: the snapshot of the map tagged as this run's version (None: the run changed nothing)
    version: str | None = None
    #: what stopped the run before its end (a signal, an error that is not a tile's), or None
    interrupted: str | None = None
    #: how the model ran (device, precision, torch.compile, GPU batch settings; see run_settings)
    settings: dict = field(default_factory=dict)
    #: per worker that holds a model: device, precision, the batch it chose, OOM back-off, peak
    #: device memory (see :func:`collect_inference`)
    inference: dict[str, list] = field(default_factory=dict)

    @property
    def pixels_predicted(self) -> int:
        return sum(t["pixels_predicted"] for t in self.tiles.values())


def run_settings(config) -> dict:
    """The settings of how the model runs, for the run report (``settings`` in run.json)."""
    return {
        "model_family": config.model_family,
        "device": config.device,
        "precision": config.precision,
        "torch_compile": config.torch_compile,
        "batch_size": config.batch_size,
        "gpu_batch_max": config.gpu_batch_max,
        "gpu_windows_in_flight": config.gpu_windows_in_flight,
    }


def collect_inference(client, stats) -> dict[str, list]:
    """``stats()`` (:func:`treesits_dask.pipeline.predict.inference_stats`) of every worker that
    holds a model; empty (with a warning) when the workers cannot be asked."""
    from .plugins import on_workers

    try:
        per_worker = on_workers(client, stats)  # a worker lost meanwhile is left out
    except Exception as exc:  # noqa: BLE001 - the report never fails a run
        log.warning("no inference statistics in run.json: %s", exc)
        return {}
    return {w: v for w, v in per_worker.items() if v}


def write_summary(output: str, result: RunResult, started: dt.datetime) -> None:
    """``<output>/run.json`` (the latest run) and ``<output>/_runs/<run id>/run.json``."""
    windows = sum(t.get("windows", 0) for t in result.tiles.values())
    seconds = result.seconds
    summary = {
        "treesits_dask_version": __version__,
        "started_utc": started.isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "tiles_processed": len(result.tiles),
        "pixels_predicted": result.pixels_predicted,
        "throughput": {
            "pixels_per_second": round(result.pixels_predicted / seconds, 1) if seconds else None,
            "windows": windows,
            "windows_per_second": round(windows / seconds, 3) if seconds else None,
        },
        # task compute seconds per stage, summed over all worker threads (not wall-clock time)
        "stages": result.stages,
        "settings": result.settings,
        "inference": result.inference,
        "performance_report": (
            storage.join(result.report_dir, "dask-report.html") if result.report_dir else None
        ),
        "tiles": result.tiles,
        "skipped": result.skipped,
        "failed": result.failed,
        "tracebacks": result.tracebacks,
        "cogs_rebuilt": result.cogs_rebuilt,
        "postprocessed": result.postprocessed,
        "version": result.version,
        "interrupted": result.interrupted,
        "complete": not result.failed and not result.interrupted,
    }
    text = json.dumps(summary, indent=2, default=str).encode()
    targets = [storage.join(output, "run.json")]
    if result.report_dir:
        targets.append(storage.join(result.report_dir, "run.json"))
    for url in targets:
        storage.publish_bytes(text, url)


def stage_seconds(records, totals: dict | None = None) -> dict[str, dict]:
    """Add task-stream records (``distributed`` ``startstops``) up per stage of the pipeline."""
    totals = {} if totals is None else totals
    for rec in records:
        key = rec["key"]
        name = key[0] if isinstance(key, tuple) else str(key)
        # tasks that Dask fused carry all their names ("predict_packed-write-<tile>-<token>")
        parts = [_STAGES[p] for p in name.split("-") if p in _STAGES]
        stage = "+".join(dict.fromkeys(parts)) or "other"
        t = totals.setdefault(stage, {"tasks": 0, "seconds": 0.0, "transfer_seconds": 0.0})
        t["tasks"] += 1
        for ss in rec["startstops"]:
            if ss["action"] == "compute":
                t["seconds"] += ss["stop"] - ss["start"]
            elif ss["action"] == "transfer":
                t["transfer_seconds"] += ss["stop"] - ss["start"]
    return totals


def _task_stream_since(start_index: int | None, dask_scheduler=None):
    """On the scheduler: stage totals of the tasks finished since ``start_index`` (None: only
    make sure the task stream is recorded), and the index to continue from."""
    from distributed.diagnostics.task_stream import TaskStreamPlugin

    plugin = dask_scheduler.plugins.get(TaskStreamPlugin.name)
    if plugin is None:
        plugin = TaskStreamPlugin(dask_scheduler)
        dask_scheduler.add_plugin(plugin)
    if start_index is None:
        return {}, plugin.index
    return stage_seconds(plugin.collect(start_index=start_index)), plugin.index


class StageClock:
    """Collects per-stage task seconds from the scheduler's task stream, a tile at a time (so the
    stream's bounded buffer never drops records of a long run).  Never fails the run."""

    def __init__(self, client, totals: dict):
        self.client, self.totals, self.index = client, totals, None
        try:
            _, self.index = client.run_on_scheduler(_task_stream_since, None)
        except Exception as exc:  # noqa: BLE001 - e.g. a scheduler without treesits_dask installed
            log.warning("no per-stage timings in run.json: %s", exc)

    def pull(self) -> None:
        if self.index is None:
            return
        try:
            part, self.index = self.client.run_on_scheduler(_task_stream_since, self.index)
        except Exception as exc:  # noqa: BLE001
            log.warning("no per-stage timings in run.json: %s", exc)
            self.index = None
            return
        for stage, t in part.items():
            mine = self.totals.setdefault(
                stage, {"tasks": 0, "seconds": 0.0, "transfer_seconds": 0.0}
            )
            for k, v in t.items():
                mine[k] = round(mine[k] + v, 3)


@contextlib.contextmanager
def performance_report(client, report_dir: str) -> Iterator[None]:
    """A Dask performance report of what runs inside, published to
    ``<report_dir>/dask-report.html`` at the end (a report is nice to have, never a reason to
    fail)."""
    from distributed import performance_report as dask_report

    with tempfile.TemporaryDirectory(prefix="treesits-report-") as tmp:
        html = os.path.join(tmp, "dask-report.html")
        with client.as_current():
            report = dask_report(filename=html, stacklevel=2)
            try:
                report.__enter__()
            except Exception as exc:  # noqa: BLE001
                log.warning("no Dask performance report for this run: %s", exc)
                report = None
            yield
            if report is not None:
                try:
                    t0 = time.perf_counter()
                    report.__exit__(None, None, None)
                    storage.publish_file(html, storage.join(report_dir, "dask-report.html"))
                    log.info("Dask performance report written in %.1f s", time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001
                    log.warning("could not write the Dask performance report: %s", exc)
