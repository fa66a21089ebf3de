"""Progress displays for the command line and notebooks (tqdm): the library itself only logs."""

from __future__ import annotations

import sys

from .pipeline.run import RunCallbacks

__all__ = ["EpochBar", "ProgressBar"]


class ProgressBar(RunCallbacks):
    """A bar over the windows of a run (``run(config, callbacks=ProgressBar())``); prints the
    Dask dashboard link when the run starts.  Call :meth:`close` at the end."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, total_windows: int, dashboard_link: str | None) -> None:
        from tqdm.auto import tqdm

        if dashboard_link:
            print(f"Dask dashboard: {dashboard_link}", file=sys.stderr, flush=True)
        self.bar = tqdm(total=total_windows, unit="window", desc="predict", file=sys.stderr)

    def window_done(self, tile: str) -> None:
        self.bar.update(1)
        self.bar.set_postfix_str(tile)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class EpochBar:
    """A bar over training epochs: the ``callback`` of :func:`treesits_dask.train`."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, unit="epoch", desc="train", file=sys.stderr)

    def __call__(self, info: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{info['loss']:.3f}",
            val_acc=f"{info['val_accuracy']:.3f}",
            best=f"{info['best_val_accuracy']:.3f}",
        )

    def close(self) -> None:
        self.bar.close()
