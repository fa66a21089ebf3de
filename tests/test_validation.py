"""Real FORCE cubes as FORCE writes them, and every input error caught on the driver before any
output is created or any cluster is started (issue: real inputs)."""

from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import rasterio
import yaml

from tests.helpers import tile_transform, write_prj, write_scene
from treesits_dask import open_map
from treesits_dask.cli import main
from treesits_dask.io.crs import same_crs, short_crs
from treesits_dask.outputs.repo import MapRepo
from treesits_dask.synthetic import FORCE_LAEA_WKT, make_cube

TILE = "X0010_Y0010"
UTM32_NO_AUTHORITY = (
    'PROJCS["WGS 84 / UTM zone 32N",GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,'
    '298.257223563]],PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]],PROJECTION['
    '"Transverse_Mercator"],PARAMETER["latitude_of_origin",0],PARAMETER["central_meridian",9],'
    'PARAMETER["scale_factor",0.9996],PARAMETER["false_easting",500000],PARAMETER["false_northing"'
    ',0],UNIT["metre",1],AXIS["Easting",EAST],AXIS["Northing",NORTH]]'
)


# ------------------------------------------------------------------------------------------- CRS
def test_crs_compared_by_meaning():
    file_crs = rasterio.crs.CRS.from_epsg(3035)  # how GDAL writes the scenes
    assert file_crs != rasterio.crs.CRS.from_wkt(FORCE_LAEA_WKT)  # the trap: names differ
    assert same_crs(FORCE_LAEA_WKT, file_crs)
    assert same_crs(FORCE_LAEA_WKT.replace("TOWGS84[0,0,0,0,0,0,0],", ""), file_crs)
    assert same_crs(UTM32_NO_AUTHORITY, "EPSG:32632")
    # what does change where a pixel lies is not equal
    assert not same_crs(FORCE_LAEA_WKT.replace("4321000", "4321010"), file_crs)
    shifted = FORCE_LAEA_WKT.replace("TOWGS84[0,0,0,0,0,0,0]", "TOWGS84[1,0,0,0,0,0,0]")
    assert not same_crs(shifted, file_crs)
    assert not same_crs(UTM32_NO_AUTHORITY, "EPSG:32633")
    assert not same_crs(UTM32_NO_AUTHORITY, "EPSG:25832")  # ETRS89 (GRS 1980), not WGS 84
    assert not same_crs("EPSG:3035", "EPSG:3034")
    assert (
        short_crs(FORCE_LAEA_WKT) == "EPSG:3035" and short_crs(UTM32_NO_AUTHORITY) == "EPSG:32632"
    )
    assert short_crs("+proj=laea +lat_0=51 +lon_0=10 +ellps=GRS80").startswith("+proj=laea")


def _run_cli(args, capsys):
    rc = main(["run", *map(str, args), "--workers", "1", "--threads-per-worker", "1",
               "--dashboard-address", ":0"])  # fmt: skip
    out = capsys.readouterr()
    return rc, out.out + out.err


def _arrays(output):
    ds = open_map(str(output))
    arrays = {f"zarr:{k}": v.values for k, v in ds.data_vars.items()}
    for cog in sorted((output / "cog").glob("*/*.tif")):
        with rasterio.open(cog) as src:
            arrays[f"cog:{cog.parent.name}/{cog.name}"] = src.read()
    return arrays


@pytest.mark.slow
def test_force_prj_wkt_gives_the_same_outputs(tmp_path, native_lstm, capsys):
    """The community cube's datacube-definition.prj (FORCE's WKT of EPSG:3035, with TOWGS84, in
    the old 7-line format) with GeoTIFFs written from EPSG:3035: the same outputs as a .prj whose
    WKT is the files' own."""
    kw = dict(tiles=("X0069_Y0043",), size=40, n_scenes=6, seed=11)
    outputs = {}
    for prj_wkt in ("force", "gdal"):
        cube = make_cube(tmp_path / prj_wkt / "cube", prj_wkt=prj_wkt, **kw)
        assert (
            "TOWGS84" in (tmp_path / prj_wkt / "cube" / "datacube-definition.prj").read_text()
        ) == (prj_wkt == "force")
        out = tmp_path / prj_wkt / "out"
        rc, text = _run_cli(
            ["--cube", cube.root, "--model", native_lstm, "--mask-dir", cube.mask_dir,
             "--output", out], capsys,
        )  # fmt: skip
        assert rc == 0, text
        outputs[prj_wkt] = _arrays(out)
    assert outputs["force"].keys() == outputs["gdal"].keys() and len(outputs["force"]) > 4
    for key, value in outputs["force"].items():
        np.testing.assert_array_equal(value, outputs["gdal"][key], err_msg=key)


@pytest.mark.parametrize(
    "crs, prj_wkt, prj_format",
    [("EPSG:3035", "force-no-towgs84", "new"), ("EPSG:32632", "no-authority", "old"),
     ("EPSG:32633", "no-authority", "new")],
)  # fmt: skip
def test_real_prj_variants_plan(tmp_path, native_lstm, capsys, crs, prj_wkt, prj_format):
    cube = make_cube(tmp_path / "cube", tiles=("X0003_Y0004",), size=32, n_scenes=3, crs=crs,
                     prj_wkt=prj_wkt, prj_format=prj_format, seed=2)  # fmt: skip
    rc = main(
        ["plan", "--cube", cube.root, "--model", native_lstm, "--output", str(tmp_path / "o")]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(out.out)["tiles"][0]["tile"] == "X0003_Y0004"


# ------------------------------------------------------------------------------ caught on driver
@pytest.fixture()
def cube(tmp_path):
    root = tmp_path / "cube"
    write_prj(root, 20)
    rng = np.random.default_rng(0)
    for d in (dt.date(2022, 5, 1), dt.date(2022, 6, 1), dt.date(2022, 7, 1)):
        boa = rng.integers(0, 4000, (10, 20, 20)).astype(np.int16)
        write_scene(root, TILE, d, boa, np.zeros((20, 20), np.int16))
    return root


@pytest.fixture()
def no_cluster(monkeypatch):
    """Fail the test if a run starts or connects to a cluster."""
    import distributed

    import treesits_dask.pipeline.run

    def refuse(*a, **k):
        raise AssertionError("a cluster was started for an input that is known to be bad")

    monkeypatch.setattr(treesits_dask.pipeline.run, "connect", refuse)
    monkeypatch.setattr(distributed.LocalCluster, "__init__", refuse)
    monkeypatch.setattr(distributed.Client, "__init__", refuse)


def _fails_early(capsys, tmp_path, args, *names):
    out = tmp_path / "out"
    rc, text = _run_cli([*args, "--output", out], capsys)
    assert rc == 2, text
    assert not out.exists(), f"{out} was created"
    assert "Traceback" not in text, text
    for name in names:
        assert str(name) in text, (name, text)
    return text


def _scene(cube):
    return cube / TILE / "20220601_LEVEL2_SEN2A_BOA.tif"


def test_checkpoint_of_another_family(cube, capsys, tmp_path, shared_data, no_cluster):
    w = shared_data / "sitsnn-weights" / "04"
    _fails_early(
        capsys, tmp_path,
        ["--cube", cube, "--model", w / "transformer_5pure.pth", "--model-family", "sits-lstm",
         "--model-params", w / "lstm_5pure_params.json"],
        "transformer_5pure.pth", "--model-family",
    )  # fmt: skip


def test_crafted_pickle_is_refused(cube, capsys, tmp_path, no_cluster):
    class Payload:  # would run code when unpickled without weights_only
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle.dumps({"model_state_dict": Payload()}))
    _fails_early(
        capsys, tmp_path, ["--cube", cube, "--model", bad, "--model-family", "sbert"],
        "refused to load", str(bad),
    )  # fmt: skip


def test_missing_qai_file(cube, capsys, tmp_path, native_lstm, no_cluster):
    (cube / TILE / "20220601_LEVEL2_SEN2A_QAI.tif").unlink()
    _fails_early(
        capsys, tmp_path, ["--cube", cube, "--model", native_lstm],
        "20220601_LEVEL2_SEN2A_BOA.tif has no QAI file", "--qai none",
    )  # fmt: skip


@pytest.mark.parametrize("damage", ["bands", "grid", "crs", "not a GeoTIFF", "QAI grid"])
def test_bad_scene_header(cube, capsys, tmp_path, native_lstm, no_cluster, damage):
    data = np.ones((10, 20, 20), np.int16)
    if damage == "bands":
        write_scene(cube, TILE, dt.date(2022, 6, 1), data[:6])
        expect = "has 6 bands"
    elif damage == "grid":
        write_scene(
            cube, TILE, dt.date(2022, 6, 1), data, transform=tile_transform("X0011_Y0010", 20)
        )
        expect = "is on another grid"
    elif damage == "crs":
        write_scene(cube, TILE, dt.date(2022, 6, 1), data, crs=rasterio.crs.CRS.from_epsg(32632))
        expect = "has CRS EPSG:32632"
    elif damage == "not a GeoTIFF":
        _scene(cube).write_bytes(b"not a tiff at all")
        expect = "cannot open"
    else:
        qai = np.zeros((20, 20), np.int16)
        write_scene(cube, TILE, dt.date(2022, 6, 1), data, qai,
                    transform=tile_transform("X0011_Y0010", 20))  # fmt: skip
        write_scene(cube, TILE, dt.date(2022, 6, 1), data)  # the BOA back on its grid
        expect = "20220601_LEVEL2_SEN2A_QAI.tif is on another grid"
    _fails_early(capsys, tmp_path, ["--cube", cube, "--model", native_lstm], expect, TILE)


def test_mask_on_another_grid(cube, capsys, tmp_path, native_lstm, no_cluster):
    masks = tmp_path / "masks" / TILE
    masks.mkdir(parents=True)
    profile = dict(driver="GTiff", width=20, height=20, count=1, dtype="uint8", crs="EPSG:3035",
                   transform=tile_transform("X0012_Y0010", 20))  # fmt: skip
    with rasterio.open(masks / "mask.tif", "w", **profile) as dst:
        dst.write(np.ones((1, 20, 20), np.uint8))
    _fails_early(
        capsys, tmp_path,
        ["--cube", cube, "--model", native_lstm, "--mask-dir", tmp_path / "masks"],
        "mask.tif does not match the grid of tile X0010_Y0010",
    )  # fmt: skip


def test_output_not_writable(cube, capsys, tmp_path, native_lstm, no_cluster):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc, text = _run_cli(
        ["--cube", cube, "--model", native_lstm, "--output", blocker / "out"], capsys
    )
    assert rc == 2 and "Traceback" not in text
    assert str(blocker / "out") in text and "is a file" in text
    assert blocker.read_text() == "not a folder"


def test_plan_reports_the_same_problems(cube, capsys, tmp_path, native_lstm, no_cluster):
    (cube / TILE / "20220601_LEVEL2_SEN2A_QAI.tif").unlink()
    rc = main(
        ["plan", "--cube", str(cube), "--model", native_lstm, "--output", str(tmp_path / "o")]
    )
    out = capsys.readouterr()
    assert rc == 2 and "Traceback" not in out.err
    report = json.loads(out.out)
    assert report["tiles"] == [] and "--qai none" in report["invalid"][TILE]
    assert "1 tile(s) cannot be processed" in out.err and not (tmp_path / "o").exists()


def test_one_bad_tile_does_not_stop_the_others(cube, capsys, tmp_path, native_lstm):
    """A tile with a problem of its own is left out with its reason; the others are processed
    and the run ends with exit code 2 naming the bad tile."""
    rng = np.random.default_rng(1)
    for d in (dt.date(2022, 5, 1), dt.date(2022, 6, 1)):
        boa = rng.integers(0, 4000, (10, 20, 20)).astype(np.int16)
        write_scene(cube, "X0011_Y0010", d, boa)  # no QAI files: this tile is invalid
    out = tmp_path / "out"
    rc, text = _run_cli(["--cube", cube, "--model", native_lstm, "--output", out], capsys)
    assert rc == 2 and "X0011_Y0010" in text and "--qai none" in text
    report = json.loads((out / "run.json").read_text())
    assert set(report["tiles"]) == {TILE} and set(report["failed"]) == {"X0011_Y0010"}
    assert not report["complete"]
    assert set(MapRepo(str(out)).records()) == {TILE}  # only the good tile is in the map


# ------------------------------------------------------------------------------ S3 credentials
@pytest.fixture()
def no_credentials(moto_endpoint, monkeypatch, tmp_path):
    """The moto endpoint, but no credentials anywhere (environment, files, instance metadata),
    and no S3 settings left in the environment by earlier tests (e.g. the addressing)."""
    from treesits_dask.io import storage

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                *storage.S3_ENV_KEYS, "AWS_ENDPOINT_URL_S3"):  # fmt: skip
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_REGION", "RegionOne")
    return moto_endpoint


@pytest.mark.s3
def test_s3_input_without_credentials(no_credentials, capsys, tmp_path, native_lstm, no_cluster):
    text = _fails_early(
        capsys, tmp_path, ["--cube", "s3://force-cube/level2", "--model", native_lstm],
        "s3://force-cube/level2", "no S3 credentials", "AWS_ACCESS_KEY_ID", "AWS_PROFILE",
    )  # fmt: skip
    assert "NoCredentialsError" not in text


@pytest.mark.s3
def test_render_needs_no_storage_access(no_credentials, capsys, tmp_path, native_lstm):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump({
        "cube": "/force/FORCE/C1/L2/ard", "output": "s3://outdir/species", "model": native_lstm,
        "cluster": "kubernetes", "kubernetes": {"gpu": {"workers": 1}},
    }))  # fmt: skip
    rc = main(["plan", "--config", str(run_yaml), "--render", str(tmp_path / "k8s")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "Traceback" not in out.err and "NoCredentialsError" not in out.err
    assert (tmp_path / "k8s" / "dask" / "daskcluster.yaml").is_file()
    assert "no dry run from here" in out.err


# ------------------------------------------------------------------------------ worker errors
@pytest.mark.slow
def test_worker_input_errors_are_one_line(cube, tmp_path, native_lstm):
    """A scene whose header is fine but whose pixels are garbage is found by a worker: the worker
    logs one line (no "Compute Failed" block with a traceback) and the run ends with a message
    naming the file."""
    path = _scene(cube)
    raw = bytearray(path.read_bytes())
    raw[1000:8000] = b"\xff" * 7000  # strip data, not the header (at the end of the file)
    path.write_bytes(bytes(raw))
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREESITS_")}
    proc = subprocess.run(
        [sys.executable, "-m", "treesits_dask", "run", "--cube", str(cube), "--model", native_lstm,
         "--output", str(out), "--workers", "1", "--threads-per-worker", "1",
         "--dashboard-address", ":0"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text and "Compute Failed" not in text, text
    assert "20220601_LEVEL2_SEN2A_BOA.tif" in text and "failed: InputDataError(" in text, text
    assert not json.loads((out / "run.json").read_text())["complete"]


def test_qai_flag_order_does_not_change_the_settings_digest(cube, tmp_path, native_lstm):
    from treesits_dask.config import load_config
    from treesits_dask.pipeline.plan import make_plan

    def digest(qai):
        overrides = dict(cube=str(cube), model=native_lstm, output=str(tmp_path / "o"), qai=qai)
        return make_plan(load_config(overrides=overrides, environ={})).config_digest

    assert digest("CLOUD_OPAQUE,CLOUD_SHADOW,SNOW") == digest("SNOW,CLOUD_OPAQUE,CLOUD_SHADOW")
    assert digest("CLOUD_OPAQUE,CLOUD_SHADOW,SNOW") != digest("CLOUD_OPAQUE,CLOUD_SHADOW")


def test_a_heartbeat_that_finds_the_scheduler_gone_is_one_line(caplog):
    """As a cluster closes its scheduler may go before its workers: a worker's heartbeat then
    logs distributed's "Failed to communicate with scheduler" with a traceback, which a run
    printed after its own message.  The workers' log filter makes it one line with the error;
    other worker errors keep their traceback."""
    import logging

    from distributed.comm.core import CommClosedError

    from treesits_dask.pipeline.plugins import HEARTBEAT_LOST, TaskErrorLog

    logger = logging.getLogger("distributed.worker")
    before = list(logger.filters)
    TaskErrorLog().setup()
    try:
        with caplog.at_level(logging.ERROR, logger="distributed.worker"):
            for message in (HEARTBEAT_LOST, "Unexpected exception during heartbeat."):
                try:
                    raise CommClosedError("in <TCP (closed)>: Stream is closed")
                except CommClosedError:
                    logger.exception(message)
    finally:
        logger.filters[:] = before
    lost, other = caplog.records
    assert lost.exc_info is None and "Traceback" not in caplog.text.split("Unexpected")[0]
    assert (
        lost.getMessage()
        == f"{HEARTBEAT_LOST} CommClosedError: in <TCP (closed)>: Stream is closed"
    )
    # not a heartbeat that lost the scheduler: as distributed logs it
    assert other.exc_info is not None
