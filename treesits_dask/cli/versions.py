"""``versions``, ``export`` and ``changes``: the history of an output's map on the command line."""

from __future__ import annotations

import argparse
import json

__all__ = [
    "add_changes_arguments",
    "add_export_arguments",
    "add_versions_arguments",
    "cmd_changes",
    "cmd_export",
    "cmd_versions",
]

_VERSION_HELP = (
    "a version of the map: its number (1 = the first run), run id, snapshot id, or an ISO "
    "date/time (the last version written at or before it)"
)


def _version(text: str | None):
    """A version argument: a number, run id or snapshot stays text; an ISO date becomes a
    datetime."""
    import datetime as dt

    if text is None or text.isdigit():
        return text
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        return text


def add_versions_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the output location (local path or s3:// URL)")
    p.add_argument("--json", action="store_true", help="print the versions as JSON")


def cmd_versions(args: argparse.Namespace) -> int:
    """One line per version: number, time, run id and the tiles it changed (with why)."""
    from .. import versions

    found = versions(args.output)
    if args.json:
        print(json.dumps(found, indent=1))
        return 0
    if not found:
        print(f"{args.output}: no versions yet")
    for v in found:
        tiles = ", ".join(t["tile"] for t in v["tiles"]) or "(layout only)"
        print(f"{v['version']:>4}  {v['written_at'][:19]}  run {v['run']}  tiles: {tiles}")
        for t in v["tiles"]:
            reasons = "; ".join(t.get("reasons") or []) or "-"
            print(f"        {t['tile']}: {t.get('scenes')} scenes; {reasons}")
    return 0


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the output location (local path or s3:// URL)")
    p.add_argument("dest", help="where to write cog/<tile>/<variable>.tif and the VRT mosaics")
    p.add_argument("--as-of", default=None, help=_VERSION_HELP + " (default: the latest)")
    p.add_argument("--tiles", default=None, help="comma-separated tiles (default: all finished)")


def cmd_export(args: argparse.Namespace) -> int:
    """COGs and mosaics of the map as of a version, written to another location."""
    from .. import export_map

    tiles = [t for t in args.tiles.split(",") if t] if args.tiles else None
    for url in export_map(args.output, args.dest, _version(args.as_of), tiles):
        print(url)
    return 0


def add_changes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("output", help="the output location (local path or s3:// URL)")
    p.add_argument("before", help=_VERSION_HELP)
    p.add_argument("after", nargs="?", default=None, help="another version (default: the latest)")
    p.add_argument(
        "--to",
        default=None,
        help="also write a GeoTIFF with bands before, after (class or disturbance state, "
        "255 = not predicted) and changed (0/1)",
    )


def cmd_changes(args: argparse.Namespace) -> int:
    """How many pixels changed class (or disturbance state) between two versions, by pair."""
    import numpy as np

    from .. import changes

    ds = changes(args.output, _version(args.before), _version(args.after)).compute()
    before, after = ds["before"].values, ds["after"].values
    changed = ds["changed"].values
    print(f"{int(changed.sum())} of {changed.size} pixels changed")
    pairs = np.stack([before[changed], after[changed]])
    found, counts = np.unique(pairs, axis=1, return_counts=True)
    for n, (b, a) in sorted(zip(counts.tolist(), found.T.tolist(), strict=True), reverse=True):
        print(f"  {b:>3} -> {a:>3}: {n}")
    if args.to:
        import xarray as xr

        stack = xr.concat(
            [ds["before"], ds["after"], ds["changed"].astype(np.uint8)], dim="band"
        ).assign_coords(band=[1, 2, 3])
        stack.rio.write_nodata(255).rio.to_raster(args.to, compress="deflate")
        print(args.to)
    return 0
