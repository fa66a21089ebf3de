"""`run` end to end on tiles whose bands of all scenes do not fit the reading worker: streamed
through the model (``stream: auto``, as a run with a one-way LSTM reads them now), read alone
(``stream: never``; a tile whose share of the reading worker would decode more is read with the
whole worker, no other tile beside it: ``pipeline.reading.read_alone``) or together (``stream:
never``, ``read_alone`` off: each tile its share), alternating in one process on one worker that
both reads and predicts, with COGs (``--variants``, default all three).

``read_alone.py`` times the reads alone; here the windows are predicted (a small ``sits-lstm``
with random weights, 16 wide: speed does not depend on the values) and the tiles written, so that
what reading alone costs in overlap between one tile's reading and another's predictions shows.

    python benchmarks/read_alone_run.py --cube CUBE-OF-2-TILES --mask-dir MASKS --window 100 \\
        --memory-limit 3GiB --disk-gib 3 --rounds 2 --variants stream,alone --json run.json

``--disk-gib``: the free local disk the worker reports (half of it counted on for spilled pieces,
shared out among the tiles in flight), whatever its disk has.  Prints one JSON line per run:
seconds, each tile's seconds as the run reports them, the bytes the worker decoded (counted; none
where a worker was restarted, whose count starts again), how often Dask paused the worker for
memory (from its log), the workers restarted by their nanny and the most memory the worker held
(its process's RSS, as the scheduler heard it every 0.5 s).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys


class _Restarts(logging.Handler):
    """Counts the workers a nanny restarted for memory (its log: the nannies of a LocalCluster run
    in this process)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "exceeded 95% memory budget" in record.getMessage()


def _small_lstm(workdir) -> str:
    """A native ``sits-lstm`` of 16 wide with random weights, its path."""
    import torch

    from treesits_dask.io.discovery import S2_BANDS
    from treesits_dask.models import ModelCard, save_native
    from treesits_dask.models.architectures import LSTMClassifier

    torch.manual_seed(0)
    hp = {"num_bands": 10, "input_size": 16, "hidden_size": 16, "num_layers": 1, "num_classes": 5}
    card = ModelCard(family="sits-lstm", hyperparameters=hp, bands=list(S2_BANDS),
                     class_names=["Spruce", "Beech", "Pine", "Douglas fir", "Oak"],
                     output_kind="softmax", sequence={"kind": "full"})  # fmt: skip
    path, _ = save_native(LSTMClassifier(**hp).eval(), card, str(workdir / "small_lstm.pt"))
    return path


def main(argv=None) -> int:
    from treesits_dask.bench.measure import cube_arguments

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cube_arguments(p, workers=1, memory_limit="3GiB")
    p.add_argument("--disk-gib", type=float, default=3.0,
                   help="free local disk the worker reports (GiB)")  # fmt: skip
    p.add_argument("--mask-dir", default=None, help="forest masks of the cube's tiles")
    p.add_argument("--variants", default="stream,alone,together",
                   help="comma list of stream, alone, together")  # fmt: skip
    p.set_defaults(tiles=2, size=1000, scenes=600, window=100, threads=2, rounds=2,
                   layout="strips")  # fmt: skip
    args = p.parse_args(argv)

    from treesits_dask.bench.measure import (
        MostSampled,
        bench_cluster,
        bench_config,
        close_bench,
        cube_workdir,
        decoded,
        emit_row,
        paused_times,
    )
    from treesits_dask.pipeline import reading, schedule
    from treesits_dask.pipeline.run import run

    tmp, wd, root = cube_workdir(args, "alone-run-")
    base = bench_config(root, wd, args.threads, args.memory_limit, args.window).model_copy(
        update=dict(model=_small_lstm(wd), model_family="native", mask_dir=args.mask_dir,
                    tiles_in_flight=2)
    )  # fmt: skip
    report: dict = {"cube": str(root), "window": args.window, "threads": args.threads,
                    "memory_limit": args.memory_limit, "disk_gib": args.disk_gib,
                    "mask_dir": args.mask_dir, "reads": []}  # fmt: skip
    print(json.dumps({k: v for k, v in report.items() if k != "reads"}), flush=True)
    disks, alone_decode = schedule.worker_disks, reading.ALONE_DECODE

    def reported(client, workers=None):
        workers = workers or client.scheduler_info(n_workers=-1)["workers"]
        return {a: int(args.disk_gib * 2**30) for a in workers}

    restarted = _Restarts()
    logging.getLogger("distributed.nanny.memory").addHandler(restarted)
    cluster, client = bench_cluster(args.workers, args.threads, args.memory_limit)
    schedule.worker_disks = reported
    try:
        variants = args.variants.split(",")
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                reading.ALONE_DECODE = alone_decode if variant != "together" else math.inf
                out = wd / f"out-{r}-{variant}"
                stream = "auto" if variant == "stream" else "never"
                restarts = restarted.count
                before = sum(v[1] for v in client.run(decoded).values())
                paused = sum(client.run(paused_times).values())
                # the workers' RSS as the scheduler heard it, every 0.5 s
                peak = MostSampled(lambda: sum(w["metrics"]["memory"] for w in
                                               client.scheduler_info(n_workers=-1)["workers"]
                                               .values()), 0.5)  # fmt: skip
                with peak:
                    result = run(base.model_copy(update={"output": str(out), "stream": stream}),
                                 client=client)  # fmt: skip
                after = sum(v[1] for v in client.run(decoded).values())
                # a worker restarted by its nanny counts (and logs) from nothing again
                restarts = restarted.count - restarts
                row = {"round": r, "variant": variant, "seconds": round(result.seconds, 1),
                       "tiles_seconds": {t: s["seconds"] for t, s in result.tiles.items()},
                       "decoded_gb": None if restarts else round((after - before) / 1e9, 2),
                       "paused_for_memory": sum(client.run(paused_times).values())
                       - (0 if restarts else paused),
                       "worker_restarts": restarts,
                       "peak_worker_memory_gib": round(peak.most / 2**30, 2)}  # fmt: skip
                emit_row(report, row, args.json)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        logging.getLogger("distributed.nanny.memory").removeHandler(restarted)
        reading.ALONE_DECODE = alone_decode
        schedule.worker_disks = disks
        close_bench(tmp, client, cluster)
    return 0


if __name__ == "__main__":
    sys.exit(main())
