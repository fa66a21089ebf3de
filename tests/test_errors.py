"""Bad input: a specific message naming the file / tile / setting, exit code != 0, nothing marked
complete."""

import datetime as dt
import json
import os
import pickle

import numpy as np
import pytest
import rasterio

from tests.helpers import tile_transform, write_prj, write_scene
from treesits_dask.cli import main

TILE = "X0010_Y0010"


@pytest.fixture()
def cube(tmp_path):
    root = tmp_path / "cube"
    write_prj(root, 20)
    rng = np.random.default_rng(0)
    for d in (dt.date(2022, 5, 1), dt.date(2022, 6, 1), dt.date(2022, 7, 1)):
        write_scene(
            root,
            TILE,
            d,
            rng.integers(0, 4000, (10, 20, 20)).astype(np.int16),
            np.zeros((20, 20), np.int16),
        )
    return root


def _run(capsys, *args):
    rc = main(["run", *map(str, args), "--workers", "1", "--dashboard-address", ":0"])
    return rc, capsys.readouterr().err


def _not_complete(out):
    summary = out / "run.json"
    return not summary.exists() or not json.loads(summary.read_text())["complete"]


def test_missing_cube_root(tmp_path, capsys, native_lstm):
    rc, err = _run(
        capsys, "--cube", tmp_path / "nope", "--model", native_lstm, "--output", tmp_path / "o"
    )
    assert rc != 0 and "cube root" in err and str(tmp_path / "nope") in err and "--cube" in err
    assert not (tmp_path / "o").exists()


def test_missing_prj(cube, capsys, native_lstm, tmp_path):
    (cube / "datacube-definition.prj").unlink()
    rc, err = _run(capsys, "--cube", cube, "--model", native_lstm, "--output", tmp_path / "o")
    assert rc != 0 and "datacube-definition.prj not found" in err


def test_unknown_tile(cube, capsys, native_lstm, tmp_path):
    rc, err = _run(
        capsys,
        "--cube",
        cube,
        "--tiles",
        "X0099_Y0099",
        "--model",
        native_lstm,
        "--output",
        tmp_path / "o",
    )
    assert rc != 0 and "X0099_Y0099 is not in cube" in err and "--tiles" in err


def test_no_scenes_in_window(cube, capsys, native_lstm, tmp_path):
    rc, err = _run(
        capsys,
        "--cube",
        cube,
        "--model",
        native_lstm,
        "--output",
        tmp_path / "o",
        "--start-date",
        "2023-01-01",
    )
    assert (
        rc != 0 and f"tile {TILE} has no scenes between 2023-01-01" in err and "--start-date" in err
    )


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bands", "crs", "grid"])
def test_bad_scene(cube, capsys, native_lstm, tmp_path, damage):
    path = cube / TILE / "20220601_LEVEL2_SEN2A_BOA.tif"
    data = np.ones((10, 20, 20), np.int16)
    if damage == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
        expect = "20220601_LEVEL2_SEN2A_BOA.tif"
    elif damage == "garbage":
        path.write_bytes(b"not a tiff at all")
        expect = "cannot open"
    elif damage == "bands":
        write_scene(cube, TILE, dt.date(2022, 6, 1), data[:6])
        expect = "has 6 bands"
    elif damage == "crs":
        write_scene(cube, TILE, dt.date(2022, 6, 1), data, crs=rasterio.crs.CRS.from_epsg(32632))
        expect = "has CRS"
    else:
        write_scene(
            cube, TILE, dt.date(2022, 6, 1), data, transform=tile_transform("X0011_Y0010", 20)
        )
        expect = "is on another grid"
    out = tmp_path / "o"
    rc, err = _run(capsys, "--cube", cube, "--model", native_lstm, "--output", out)
    assert rc != 0, err
    assert "20220601_LEVEL2_SEN2A_BOA.tif" in err and expect in err and TILE in err
    assert _not_complete(out)
    assert not (out / "cog" / TILE / "class.tif").exists()


def test_mask_on_other_grid(cube, capsys, native_lstm, tmp_path):
    masks = tmp_path / "masks" / TILE
    masks.mkdir(parents=True)
    with rasterio.open(
        masks / "mask.tif",
        "w",
        driver="GTiff",
        width=20,
        height=20,
        count=1,
        dtype="uint8",
        crs="EPSG:3035",
        transform=tile_transform("X0012_Y0010", 20),
    ) as dst:
        dst.write(np.ones((1, 20, 20), np.uint8))
    rc, err = _run(
        capsys,
        "--cube",
        cube,
        "--model",
        native_lstm,
        "--output",
        tmp_path / "o",
        "--mask-dir",
        tmp_path / "masks",
    )
    assert rc != 0 and "mask.tif does not match the grid of tile X0010_Y0010" in err
    rc, err = _run(
        capsys,
        "--cube",
        cube,
        "--model",
        native_lstm,
        "--output",
        tmp_path / "o",
        "--mask-dir",
        tmp_path / "masks",
        "--mask-name",
        "forest*.tif",
    )
    assert rc != 0 and "no mask for tile X0010_Y0010" in err and "--mask-name" in err


def test_checkpoint_does_not_fit_params(cube, capsys, shared_data, tmp_path):
    w = shared_data / "sitsnn-weights" / "04"
    # transformer weights with the LSTM params: tensors do not fit
    rc, err = _run(
        capsys,
        "--cube",
        cube,
        "--model",
        w / "transformer_5pure.pth",
        "--model-family",
        "sits-lstm",
        "--model-params",
        w / "lstm_5pure_params.json",
        "--output",
        tmp_path / "o",
        "--qai",
        "none",
    )
    assert rc != 0 and "transformer_5pure.pth" in err
    assert _not_complete(tmp_path / "o")


def test_model_band_count(cube, capsys, shared_data, tmp_path):
    w = shared_data / "sitsnn-weights" / "04"
    params = json.loads((w / "lstm_5pure_params.json").read_text())
    params["lstm hyperparameters"]["number of bands"] = 7
    p = tmp_path / "p.json"
    p.write_text(json.dumps(params))
    rc, err = _run(
        capsys,
        "--cube",
        cube,
        "--model",
        w / "lstm_5pure.pth",
        "--model-family",
        "sits-lstm",
        "--model-params",
        p,
        "--output",
        tmp_path / "o",
    )
    assert rc != 0 and "10" in err and "7" in err and "p.json" in err


def test_malicious_pickle_refused(cube, capsys, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import torch

    bad = tmp_path / "evil.pth"
    torch.save({"model_state_dict": Evil()}, bad, pickle_module=pickle)
    rc, err = _run(
        capsys,
        "--cube",
        cube,
        "--model",
        bad,
        "--model-family",
        "sbert",
        "--output",
        tmp_path / "o",
    )
    assert rc != 0 and "evil.pth" in err and "weights_only" in err
    assert not marker.exists()


def test_sbert_day_index_beyond_position_table_drops_the_oldest(tmp_path, capsys):
    """First kept observation on 31 Dec of a leap year + 1460 days: day index 1826 does not
    exist in the position table.  The tile does not fail: its oldest observation is dropped."""
    import torch

    from treesits_dask.bench.forward import random_sbert_state_dict
    from treesits_dask.models.architectures import SBERTClassifier  # noqa: F401

    root = tmp_path / "cube"
    write_prj(root, 10)
    rng = np.random.default_rng(0)
    for d in (dt.date(2020, 12, 31), dt.date(2022, 6, 1), dt.date(2024, 12, 30)):
        write_scene(root, TILE, d, rng.integers(0, 4000, (10, 10, 10)).astype(np.int16))
    ckpt = tmp_path / "sbert.tar"
    torch.save({"model_state_dict": random_sbert_state_dict(), "epoch": 1}, ckpt)
    out = tmp_path / "o"
    rc, err = _run(
        capsys,
        "--cube",
        root,
        "--model",
        ckpt,
        "--model-family",
        "sbert",
        "--output",
        out,
        "--qai",
        "none",
    )
    assert rc == 0, err
    summary = json.loads((out / "run.json").read_text())
    assert summary["complete"] and summary["pixels_predicted"] == 100


def test_unknown_config_key(cube, tmp_path, capsys, native_lstm):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"cube: {cube}\noutput: {tmp_path / 'o'}\nmodel: {native_lstm}\nmask_directory: m\n"
    )
    rc, err = _run(capsys, "--config", cfg)
    assert rc != 0 and "mask_directory" in err and "mask_dir" in err and "valid settings" in err


def test_output_not_writable(cube, tmp_path, capsys, native_lstm):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    rc, err = _run(capsys, "--cube", cube, "--model", native_lstm, "--output", blocker / "out")
    assert rc != 0 and str(blocker / "out") in err
