"""`run --mask-worldcover` and `mask`: forest masks from the real WorldCover tile, built in the
same run."""

import datetime as dt

import numpy as np
import pytest
import rasterio

from tests.test_worldcover import REAL, SAO_TOME_ORIGIN, TILE, UTM32N, WORLDCOVER_DIR, write_prj
from treesits_dask import open_map
from treesits_dask.cli import main

from .helpers import write_scene

pytestmark = pytest.mark.slow


@pytest.fixture()
def sao_tome_cube(tmp_path):
    root = tmp_path / "cube"
    write_prj(root, SAO_TOME_ORIGIN)
    rng = np.random.default_rng(0)
    transform = rasterio.transform.from_origin(*SAO_TOME_ORIGIN, 10, 10)
    for d in (dt.date(2022, 5, 1), dt.date(2022, 6, 1), dt.date(2022, 7, 1)):
        write_scene(
            root,
            TILE,
            d,
            rng.integers(0, 4000, (10, 300, 300)).astype(np.int16),
            transform=transform,
            crs=UTM32N,
        )
    return root


def test_run_builds_worldcover_masks_on_the_fly(sao_tome_cube, native_lstm, tmp_path, capsys):
    assert REAL.exists()
    out = tmp_path / "out"
    args = [
        "run",
        "--cube",
        str(sao_tome_cube),
        "--tiles",
        TILE,
        "--model",
        native_lstm,
        "--qai",
        "none",
        "--mask-worldcover",
        str(WORLDCOVER_DIR),
        "--output",
        str(out),
        "--window",
        "100",
        "--workers",
        "1",
        "--dashboard-address",
        ":0",
    ]
    assert main(args) == 0, capsys.readouterr().err
    mask_path = out / "masks" / TILE / "mask.tif"
    with rasterio.open(mask_path) as src:
        forest = src.read(1) == 1
    assert 0 < forest.mean() < 1  # trees, town and sea
    ds = open_map(str(out))
    np.testing.assert_array_equal(ds["class"].values != 255, forest)

    # the `mask` command builds the same mask, and skips it when it exists
    masks = tmp_path / "masks"
    assert (
        main(
            [
                "mask",
                "--worldcover",
                str(WORLDCOVER_DIR),
                "--cube",
                str(sao_tome_cube),
                "--tiles",
                TILE,
                "--output",
                str(masks),
                "--workers",
                "1",
                "--dashboard-address",
                ":0",
            ]
        )
        == 0
    )
    with rasterio.open(masks / TILE / "mask.tif") as src:
        np.testing.assert_array_equal(src.read(1) == 1, forest)
    mtime = (masks / TILE / "mask.tif").stat().st_mtime_ns
    assert (
        main(
            [
                "mask",
                "--worldcover",
                str(WORLDCOVER_DIR),
                "--cube",
                str(sao_tome_cube),
                "--tiles",
                TILE,
                "--output",
                str(masks),
                "--workers",
                "1",
                "--dashboard-address",
                ":0",
            ]
        )
        == 0
    )
    assert (masks / TILE / "mask.tif").stat().st_mtime_ns == mtime
