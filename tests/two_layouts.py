"""A cube kept up to date across FORCE versions, made of the synthetic generator's cubes: the same
pixels as FORCE < 3.8 strips and as FORCE >= 3.8 COGs, and a copy of the strips whose scenes the
tests replace by the COGs (:func:`to_cogs`)."""

from __future__ import annotations

import shutil
from pathlib import Path

TILE = "X0069_Y0043"


def two_layouts(tmp_path: Path, size: int = 300, n: int = 9) -> tuple[dict, Path]:
    """``{"strips": cube, "cog": cube}`` of ``n`` scenes of ``size`` px (seed 4, each with its
    masks), and the tile folder of a copy of the strips cube at ``tmp_path / "grown"``."""
    from treesits_dask.synthetic import make_cube

    cubes = {
        layout: make_cube(
            tmp_path / layout,
            size=size,
            n_scenes=n,
            layout=layout,
            seed=4,
            mask_dir=str(tmp_path / layout / "masks"),
        )  # fmt: skip
        for layout in ("strips", "cog")
    }
    grown = tmp_path / "grown"
    shutil.copytree(cubes["strips"].root, grown)
    return cubes, grown / TILE


def to_cogs(cubes: dict, folder: Path, boas) -> None:
    """The scenes of BOA file names ``boas`` in ``folder`` (BOA and QAI) replaced by the newer
    FORCE's COGs of the same scenes."""
    for boa in boas:
        for name in (boa, boa.replace("_BOA", "_QAI")):
            shutil.copy(f"{cubes['cog'].root}/{TILE}/{name}", folder / name)
