"""`run` with SBERT (the published shapes, random weights: 256 observations kept, hidden 128, 3
layers) on a tile whose bands of all scenes fit neither the worker's memory nor its disk:
streamed through the model (``stream: auto``, as a run reads it now: the newest 256 valid
observations of each pixel kept batch by batch, ``pipeline.streaming``) against the plan that
holds its bands (``stream: never``: read window by window or in sections, decoding its blocks
more than once), alternating in one process on one worker that reads and predicts and counts on
no local disk (``--variants``).

    python benchmarks/stream_sbert.py --size 1000 --scenes 12 --linked 600 --forest 0.005 \\
        --memory-limit 3GiB --window 100 --rounds 2 --variants stream,never --json report.json

The cube: ``--cube`` (with ``--mask-dir``), or one written under ``--workdir`` (one tile of
``--size`` px in ``--layout``, ``--scenes`` scenes; with ``--linked N``, N scenes two days apart
that are hard links to those, so that a 600-scene tile takes the disk of a few and all of them lie
in SBERT's 4-year window) and a mask of ``--forest`` of its pixels, drawn at random (SBERT runs
at about 170 px/s on 2 cores: sparse pixels keep the run short while every strip holds some).
``--model-size small``: an SBERT of 16 wide and one layer that keeps the published 256
observations, so the states are the published model's while its forward is cheap enough for a
mask of many pixels (30 % of a 3000 px tile: 3.1 GiB of states).

Prints one JSON line per run: seconds (and the error where it failed), bytes decoded (and over
the tile's BOA bytes), the run's log lines on how the tile was read, what Dask spilled to disk,
the most the streamed states held in the worker's memory (sampled every second), the times Dask
paused it, workers restarted, and the worker's peak RSS.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
from pathlib import Path


class _Lines(logging.Handler):
    """The run's log lines on how its tiles were read (streamed, read alone, spilling)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        if line.startswith("tile ") and any(w in line for w in ("streamed", "alone", "spills")):
            self.lines.append(line[:200])


def _linked(src: Path, out: Path, n: int) -> None:
    """A cube of ``n`` scenes per tile, two days apart, each BOA and QAI a hard link to a scene of
    ``src`` (in turn)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copy(src / "datacube-definition.prj", out / "datacube-definition.prj")
    for tile in sorted(src.glob("X*_Y*")):
        boas = sorted(tile.glob("*_SEN2?_BOA.tif"))  # Sentinel-2 (SBERT's scenes)
        (out / tile.name).mkdir()
        start = dt.date(2020, 1, 1)
        for k in range(n):
            boa = boas[k % len(boas)]
            date = (start + dt.timedelta(days=2 * k)).strftime("%Y%m%d")
            for part in ("BOA", "QAI"):
                name = boa.name.replace("_BOA.tif", f"_{part}.tif")
                os.link(tile / name, out / tile.name / (date + name[8:]))


def _mask(root: Path, masks: Path, fraction: float, seed: int = 7) -> None:
    """``<masks>/<tile>/mask.tif``: ``fraction`` of each tile's pixels, at random."""
    import numpy as np
    import rasterio

    rng = np.random.default_rng(seed)
    for tile in sorted(root.glob("X*_Y*")):
        with rasterio.open(next(tile.glob("*_BOA.tif"))) as src:
            profile = dict(driver="GTiff", width=src.width, height=src.height, count=1,
                           dtype="uint8", crs=src.crs, transform=src.transform)  # fmt: skip
        (masks / tile.name).mkdir(parents=True, exist_ok=True)
        with rasterio.open(masks / tile.name / "mask.tif", "w", **profile) as dst:
            dst.write((rng.random((profile["height"], profile["width"])) < fraction)[None]
                      .astype("uint8"))  # fmt: skip


def _small_sbert(workdir: Path) -> dict:
    """A native SBERT of 16 wide, one layer, 2 heads, with random weights, that keeps the
    published 256 observations (the state of the published model, a far cheaper forward)."""
    import torch

    from treesits_dask.io.discovery import S2_BANDS
    from treesits_dask.models import ModelCard, save_native
    from treesits_dask.models.architectures import SBERTClassifier
    from treesits_dask.models.card import SBERT_SEQUENCE

    torch.manual_seed(0)
    hp = {"num_features": 10, "hidden": 16, "n_layers": 1, "attn_heads": 2, "dropout": 0.3,
          "num_classes": 1, "max_position": 1826}  # fmt: skip
    card = ModelCard(family="sbert", hyperparameters=hp, bands=list(S2_BANDS),
                     class_names=["disturbance"], output_kind="sigmoid",
                     sequence=dict(SBERT_SEQUENCE))  # fmt: skip
    path, _ = save_native(SBERTClassifier(**hp).eval(), card, str(workdir / "small_sbert.pt"))
    return {"model": path, "model_family": "native"}


def main(argv=None) -> int:
    from treesits_dask.bench.measure import cube_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cube_arguments(p, workers=1, memory_limit="3GiB")
    p.add_argument("--linked", type=int, default=0,
                   help="scenes of the written tile: hard links to its --scenes")  # fmt: skip
    p.add_argument("--mask-dir", default=None, help="forest masks of --cube's tiles")
    p.add_argument("--forest", type=float, default=0.005,
                   help="share of the written tile's pixels in its mask")  # fmt: skip
    p.add_argument("--variants", default="stream,never", help="comma list of stream, never")
    p.add_argument("--model-size", default="published", choices=["published", "small"],
                   help="SBERT of the published shapes, or a small one keeping as many "
                   "observations (its state, a cheaper forward)")  # fmt: skip
    p.add_argument("--tiles-in-flight", type=int, default=2)
    p.set_defaults(tiles=1, size=1000, scenes=12, threads=2, rounds=2, layout="strips")
    args = p.parse_args(argv)

    from treesits_dask.bench.measure import (
        bench_cluster,
        bench_config,
        bench_models,
        close_bench,
        cube_workdir,
        emit_row,
        measured_run,
        no_local_disk,
    )
    from treesits_dask.pipeline import schedule
    from treesits_dask.pipeline.plan import make_plan

    tmp, wd, root = cube_workdir(args, "stream-sbert-")
    masks = args.mask_dir
    if args.cube is None:
        if args.linked:
            _linked(Path(root), wd / "linked", args.linked)
            root = str(wd / "linked")
        masks = str(wd / "masks")
        _mask(Path(root), Path(masks), args.forest)
    base = bench_config(root, wd, args.threads, args.memory_limit, args.window).model_copy(
        update=dict(mask_dir=masks, tiles_in_flight=args.tiles_in_flight,
                    **(bench_models(wd, ["sbert"])["sbert"] if args.model_size == "published"
                       else _small_sbert(wd)))
    )  # fmt: skip
    report: dict = {"cube": str(root), "mask_dir": masks, "window": args.window,
                    "threads": args.threads, "memory_limit": args.memory_limit,
                    "model_size": args.model_size, "tiles_in_flight": args.tiles_in_flight,
                    "reads": []}  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "reads"}), flush=True)
    disks = schedule.worker_disks
    logging.getLogger("treesits_dask").setLevel(logging.INFO)  # the run's lines on its tiles
    cluster, client = bench_cluster(args.workers, args.threads, args.memory_limit)
    schedule.worker_disks = no_local_disk  # nothing spills by the plan
    try:
        variants = args.variants.split(",")
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                out = wd / f"out-{r}-{variant}"
                stream = "auto" if variant == "stream" else "never"
                config = base.model_copy(update={"output": str(out), "stream": stream})
                tile_bytes = sum(t.grid.height * t.grid.width * 10 * 2 * len(t.scenes)
                                 for t in make_plan(config).tiles)  # fmt: skip
                lines = _Lines()
                logging.getLogger("treesits_dask").addHandler(lines)
                try:
                    measured, done = measured_run(client, config, state_digits=3)
                finally:
                    logging.getLogger("treesits_dask").removeHandler(lines)
                row = {"round": r, "variant": variant, **measured,
                       "decoded_over_tile": None if done is None else round(done / tile_bytes, 3),
                       "log": lines.lines}  # fmt: skip
                emit_row(report, row, args.json)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        schedule.worker_disks = disks
        close_bench(tmp, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
