"""Per-family input preparation as torch ops, run where the model runs (REFERENCE 3).

The same semantics as the numpy functions of :mod:`treesits_dask.models.preprocess` (which stay
the reference and the CPU path), on tensors that already sit on the model's device: the host
ships the raw int16 series and the validity (11 bytes per observation instead of the 48 of the
prepared SBERT inputs) and the device sorts nothing, selects, normalises and right-aligns.

Nothing here synchronises the device with the host (no ``.item()``, no data-dependent shapes),
so a batch can be queued while the previous one computes; the largest SBERT day index comes back
as a tensor, checked when the batch's results are read.
"""

from __future__ import annotations

import torch

__all__ = ["full_inputs_torch", "sbert_inputs_torch"]


def full_inputs_torch(series: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """SITS-NN input (REFERENCE 3b/3c) of ``series`` (N, T, 10) int16 and ``valid`` (N, T) bool:
    raw values as float32, invalid observations 0 in all bands (as ``preprocess.full_inputs``,
    bit for bit)."""
    return series.to(torch.float32) * valid.unsqueeze(-1)


def _at(per_scene: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """Each pixel's value of ``per_scene`` (T,), or (N, T) each pixel's own, at its observation
    ``obs`` (N,)."""
    if per_scene.dim() == 1:
        return per_scene[obs]
    return per_scene.gather(1, obs.unsqueeze(1)).squeeze(1)


def _fit_position_table(
    kept: torch.Tensor, days: torch.Tensor, scene_doy: torch.Tensor, max_position: int
) -> torch.Tensor:
    """``preprocess`` drops, in place, the oldest kept observations of the pixels whose newest
    would get a day index beyond the position table (as the numpy version); returns the index of
    each pixel's first kept observation."""
    n_obs = kept.shape[1]
    while True:
        first = torch.argmax(kept.to(torch.uint8), dim=1)  # the oldest kept observation
        last = n_obs - 1 - torch.argmax(kept.flip(1).to(torch.uint8), dim=1)  # the newest
        span = _at(days, last) - _at(days, first) + _at(scene_doy, first)
        over = kept.any(1) & (span >= max_position)
        if not bool(over.any()):
            return first
        rows = torch.nonzero(over).squeeze(1)
        kept[rows, first[rows]] = False


def sbert_inputs_torch(
    series: torch.Tensor,
    valid: torch.Tensor,
    days: torch.Tensor,
    scene_doy: torch.Tensor,
    seq_len: int = 256,
    max_position: int = 1826,
    keep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SBERT input (REFERENCE 3a) of a batch, as ``preprocess.sbert_inputs``, right-aligned into
    the last ``keep`` (default ``seq_len``) of the ``seq_len`` slots.

    ``series`` (N, T, B) int16, ``valid`` (N, T) bool, ``days`` (T,) int64 days since 1970-01-01,
    ``scene_doy`` (T,) int64 their day of year (``preprocess.day_of_year``, computed once per
    window on the host); or both (N, T), each pixel's own (the observations a streamed pixel
    kept, ``preprocess.sbert_kept``).  ``keep`` must exceed the kept observations of every
    pixel (the slots left out are then padding).

    As there, the oldest kept observations of a pixel are dropped until its newest one gets a day
    index inside the ``max_position``-row position table (one host sync per batch to see whether
    any pixel needs it).

    Returns ``x`` (N, keep, B) float32, ``doy`` (N, keep) int64, ``mask`` (N, keep) bool and the
    largest day index (a 0-d int64 tensor, below ``max_position``; the caller checks it after the
    batch, and ``doy`` is clamped to the table meanwhile, so that an index outside it could never
    reach the embedding lookup, where it would stop a CUDA context).
    """
    n_pix, n_obs, n_bands = series.shape
    keep = seq_len if keep is None else int(keep)
    dev = series.device
    # rank of each valid observation counted from the newest (1 = newest)
    rank = valid.flip(1).cumsum(1).flip(1)
    kept = valid & (rank <= seq_len)
    first = _fit_position_table(kept, days, scene_doy, max_position)
    n_used = kept.sum(1)
    first_day = _at(days, first)
    day_index = (days if days.dim() == 2 else days.unsqueeze(0)) - first_day.unsqueeze(1)
    day_index = day_index + _at(scene_doy, first).unsqueeze(1)
    top = torch.where(kept, day_index, torch.zeros((), dtype=day_index.dtype, device=dev)).amax()
    # z-score per pixel and band over the kept observations (float64 statistics, ddof 0): the
    # operations of the numpy reference in the same order
    weight = kept.unsqueeze(-1)
    refl = series.to(torch.float64) / 10000.0
    count = n_used.clamp(min=1).unsqueeze(1).to(torch.float64)
    mean = torch.where(weight, refl, 0.0).sum(1) / count
    refl = (refl - mean.unsqueeze(1)) * weight
    std = torch.sqrt((refl * refl).sum(1) / count)
    refl = refl / (std + 1e-6).unsqueeze(1)
    # right-align: a kept observation of rank r goes to slot keep - r; everything else to a
    # spare slot ``keep`` that is cut off afterwards (scatter without data-dependent shapes)
    slot = torch.where(kept, keep - rank, torch.full((), keep, dtype=rank.dtype, device=dev))
    x = torch.zeros((n_pix, keep + 1, n_bands), dtype=torch.float32, device=dev)
    x.scatter_(1, slot.unsqueeze(-1).expand(-1, -1, n_bands), refl.to(torch.float32))
    doy = torch.zeros((n_pix, keep + 1), dtype=torch.int64, device=dev)
    doy.scatter_(1, slot, torch.where(kept, day_index.clamp(max=max_position - 1), 0))
    mask = torch.zeros((n_pix, keep + 1), dtype=torch.bool, device=dev)
    mask.scatter_(1, slot, kept)
    return x[:, :keep], doy[:, :keep], mask[:, :keep], top
