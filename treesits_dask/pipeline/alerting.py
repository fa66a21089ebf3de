"""Where the disturbance alerts of a tile go on from (:mod:`treesits_dask.outputs.alerts` has the
state machine), decided on the driver.

The alert layers of a tile are a function of its scenes (from the earliest one a step's window can
hold), the model, the settings and the mask, whatever the runs that brought the scenes.  Each
tile record says what its alert layers are as of: ``alerts = {key, through, history}`` (the
digest of model, settings and mask; the newest scene date stepped; the digest of the scenes up to
it), and each tile commit carries the same in its metadata.  A run goes on from the newest version
of the tile whose ``key`` matches and whose ``history`` equals the scenes up to its ``through`` as
they are now: normally the tile's last commit; after a late scene (one dated before the last
run's newest), an earlier version; with no such version (first run with alerts, another model,
other settings or mask) from no history, stepping every scene from ``alerts.start`` on.  The
steps' windows may reach before the model's window of this run: those scenes are read too.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..config import RunConfig
from ..io import discovery
from ..models import ModelCard, effective_window
from ..outputs.alerts import AlertSteps
from ..outputs.repo import MapRepo
from ..state import ledger

__all__ = ["AlertPlan", "alert_key", "alert_steps", "plan_alerts"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlertPlan:
    """The alerts of one tile in a run."""

    #: the snapshot to read the alert layers from (None: no history)
    resume: str | None
    #: the date the layers at ``resume`` are as of
    through: dt.date | None
    #: scenes before the model's window that the steps' windows need (read as well)
    older: tuple[discovery.Scene, ...]
    #: the steps of this run: (scene date, first date of the model's window as of it); scenes of
    #: one date are one step each
    steps: tuple[tuple[dt.date, dt.date], ...]
    #: the record's ``alerts`` section after this run
    section: dict = field(hash=False, compare=False)


def alert_key(model_digest: str, config_digest: str, mask: dict | None) -> str:
    """What every step of a tile depends on besides its scenes."""
    return ledger.config_digest(
        {"model": model_digest, "settings": config_digest,
         "mask": [mask.get("name"), mask.get("sha256")] if mask else None}
    )  # fmt: skip


def _window_start(card: ModelCard, config: RunConfig, dates, day: dt.date) -> dt.date:
    """The first date of the model's window as of ``day``."""
    return effective_window(card, dates, config.start_date, day)[0]


def _history(scenes: Sequence[discovery.Scene], first: dt.date, through: dt.date) -> str:
    rows = ledger.tile_fingerprint([s for s in scenes if first <= s.date <= through], None, None,
                                   None)["scenes"]  # fmt: skip
    return ledger.config_digest(rows)


def _candidates(repo: MapRepo, tile: str, record: dict | None) -> Iterator[tuple[str, dict]]:
    """(snapshot, alerts section) of the tile's versions, newest first (lazily: the history is
    read only as far as needed)."""
    if record and record.get("alerts"):
        yield repo.repo.lookup_branch("main"), record["alerts"]
    seen_head = bool(record and record.get("alerts"))
    for info in repo.repo.ancestry(branch="main"):
        meta = info.metadata or {}
        if meta.get("tile") != tile or not meta.get("alerts"):
            continue
        if seen_head:  # the newest tile commit is the record just tried
            seen_head = False
            continue
        yield info.id, meta["alerts"]


def plan_alerts(
    repo: MapRepo,
    config: RunConfig,
    card: ModelCard,
    tile: str,
    listed: Sequence[discovery.Scene],
    kept: Sequence[discovery.Scene],
    start: dt.date,
    key: str,
    record: dict | None,
) -> AlertPlan:
    """The alert plan of a tile to be processed: ``listed`` are all its scenes, ``kept`` those of
    the model's window (from ``start``), ``record`` its record in the map (None: none)."""
    alerts = config.alerts
    dates = [s.date for s in listed]
    first = _window_start(card, config, dates, alerts.start)  # the earliest scene a step reads
    newest = kept[-1].date
    resume, through = None, None
    if repo.exists():
        for snapshot, section in _candidates(repo, tile, record):
            if section.get("key") != key:
                continue
            then = dt.date.fromisoformat(section["through"])
            if then <= newest and section.get("history") == _history(listed, first, then):
                resume, through = snapshot, then
                break
    days = sorted({
        s.date for s in listed
        if alerts.start <= s.date <= newest and (through is None or s.date > through)
    })  # fmt: skip
    steps = tuple((d, _window_start(card, config, dates, d)) for d in days)
    older: tuple[discovery.Scene, ...] = ()
    if steps:
        reach = min(lo for _, lo in steps)
        older = tuple(s for s in listed if reach <= s.date < start)
    if resume is None and record is not None:
        log.info("tile %s: alerts from %s on (no version to go on from)", tile, alerts.start)
    elif through is not None and record and record.get("alerts", {}).get("through") != str(through):
        log.info("tile %s: alerts go on from the version as of %s (a late scene)", tile, through)
    section = {"key": key, "through": str(newest), "history": _history(listed, first, newest)}
    return AlertPlan(resume, through, older, steps, section)


def alert_steps(
    plan: AlertPlan, config: RunConfig, scenes: Sequence[discovery.Scene]
) -> AlertSteps:
    """The kernel's alert steps of a tile whose read scenes are ``plan.older`` + ``scenes``."""
    dates = [s.date for s in (*plan.older, *scenes)]
    windows = dict(plan.steps)
    steps = []
    for t, day in enumerate(dates):
        if day in windows:
            steps.append((t, next(i for i, d in enumerate(dates) if d >= windows[day])))
    return AlertSteps(
        config.alerts.threshold, config.alerts.confirm_after, len(plan.older), tuple(steps)
    )
