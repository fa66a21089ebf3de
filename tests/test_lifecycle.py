"""One output through the life of a map kept current for years, on a local disk and on S3 (moto):
subset runs, a forced rerun, a tile that appears, a series that grows past the window threshold, a
new model, a driver killed mid-tile and inputs reverted, two drivers at the same moment, COGs off
and on again, a driver killed between its tile commits and the mosaics.

After every step the map (arrays and coordinates, with its uncertainty layer, the Bayesian
smoothing across tiles and an overview level) and the COGs and mosaics (pixels) equal those of a
clean single run of the same inputs into a new output, and no step fails.  At the end, every
version of the map equals the clean run of its inputs, and the change layer between two versions
is right pixel for pixel.

Drivers that are killed run as subprocesses (``python -m treesits_dask run``) with a hook that
SIGKILLs them at the named moment; all drivers share one LocalCluster (``--scheduler-address``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import dask
import numpy as np
import pytest
import rasterio

from tests.conftest import local_client, new_bucket
from treesits_dask import changes, open_map, versions
from treesits_dask.config import load_config
from treesits_dask.io import discovery, storage
from treesits_dask.io.grid import choose_window_shape
from treesits_dask.io.remote import clear_gdal_cache
from treesits_dask.outputs.repo import MapRepo
from treesits_dask.pipeline import plan as plan_module
from treesits_dask.pipeline.plan import make_plan
from treesits_dask.pipeline.run import run

pytestmark = pytest.mark.slow

A, B, C, D = "X0069_Y0043", "X0070_Y0043", "X0069_Y0044", "X0070_Y0044"
VARIABLES = (
    "probability", "class", "valid_obs", "last_obs_valid", "last_valid_date", "entropy",
    "probability_smoothed", "class_smoothed",
)  # fmt: skip
#: the products made from the probabilities, on in every run here (smoothing across tiles)
PRODUCTS = {"uncertainty": "entropy", "smoothing": {"window_size": 5}}
REPO = Path(__file__).resolve().parents[1]
#: the window budget of `window: auto`, lowered so that 4 more scenes pass the threshold at which
#: a 60 x 60 px striped tile goes from whole-tile windows to 30-row strips
BUDGET = 1_000_000
#: clean runs of each state of the inputs, shared by both backends: {state label: output folder}
_CLEAN: dict[str, Path] = {}


# ----------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base_cube(tmp_path_factory):
    from treesits_dask.synthetic import make_cube

    root = tmp_path_factory.mktemp("lifecube")
    return make_cube(
        root / "cube",
        tiles=(A, B, C, D),
        size=60,
        n_scenes=12,
        mask_dir=str(root / "masks"),
        seed=9,
    )


def _lstm(path: Path, seed: int) -> str:
    import torch

    from treesits_dask.models import ModelCard, save_native
    from treesits_dask.models.architectures import LSTMClassifier

    torch.manual_seed(seed)
    hp = {"num_bands": 10, "input_size": 16, "hidden_size": 16, "num_layers": 1, "num_classes": 4}
    card = ModelCard(
        family="sits-lstm",
        hyperparameters=hp,
        bands=list(discovery.S2_BANDS),
        class_names=["Spruce", "Beech", "Pine", "Oak"],
        output_kind="softmax",
        sequence={"kind": "full"},
    )
    pt, _ = save_native(LSTMClassifier(**hp).eval(), card, str(path))
    return pt


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("lifemodels")
    return _lstm(d / "m1.pt", 1), _lstm(d / "m2.pt", 2)


@pytest.fixture(scope="module", params=["local", "s3"])
def backend(request, tmp_path_factory):
    """Where the output lives; the S3 environment is set before the cluster starts (the workers
    inherit the credentials)."""
    if request.param == "s3":
        request.getfixturevalue("s3_module_env")
        return f"s3://{new_bucket('life')}/maps/species"
    return str(tmp_path_factory.mktemp("life-local") / "out")


@pytest.fixture(scope="module")
def client(backend):
    with local_client() as c:
        yield c


class World:
    """The inputs as they change: a private copy of the cube (tiles C and D parked outside it
    until they appear) and the current model.  ``label`` names the state (clean runs are shared
    by it)."""

    def __init__(self, base, models, root: Path):
        self.root = root / "cube"
        shutil.copytree(base.root, self.root)
        self.parked = root / "parked"
        self.parked.mkdir()
        for tile in (C, D):
            shutil.move(self.root / tile, self.parked / tile)
        self.mask_dir = base.mask_dir
        self.models = models
        self.model = models[0]
        self.tiles = [A, B]
        self.changes: list[str] = []

    @property
    def label(self) -> str:
        return "|".join([Path(self.model).stem, *self.tiles, *self.changes])

    def tile_appears(self, tile: str) -> None:
        shutil.move(self.parked / tile, self.root / tile)
        self.tiles = sorted([*self.tiles, tile])
        self.changes.append(f"+{tile}")

    def add_scenes(self, tile: str, n: int) -> None:
        """``n`` later scenes (BOA + QAI): perturbed copies of the tile's newest one."""
        scenes = discovery.scene_table(str(self.root), tile)
        newest = scenes[-1]
        with rasterio.open(newest.boa) as src:
            data, profile = src.read(), src.profile
        for k in range(1, n + 1):
            date = newest.date + dt.timedelta(days=10 * k)
            stem = f"{date:%Y%m%d}_LEVEL2_SEN2A"
            shifted = np.where(data == -9999, data, data + 40 * k).astype(np.int16)
            with rasterio.open(self.root / tile / f"{stem}_BOA.tif", "w", **profile) as dst:
                dst.write(shifted)
            shutil.copyfile(newest.qai, self.root / tile / f"{stem}_QAI.tif")
        self.changes.append(f"{tile}+{n}")

    def settings(self, output: str, **kw) -> dict:
        return dict(
            cube=str(self.root),
            mask_dir=self.mask_dir,
            model=self.model,
            output=output,
            batch_size=500,
            dashboard_address=":0",
            **PRODUCTS,
            **kw,
        )

    def config(self, output: str, **kw):
        return load_config(overrides=self.settings(output, **kw), environ={})

    def cli(self, output: str, client, *extra: str) -> list[str]:
        return [
            "run", "--cube", str(self.root), "--mask-dir", self.mask_dir, "--model", self.model,
            "--output", output, "--batch-size", "500", "--tiles-in-flight", "1",
            "--uncertainty", "entropy", "--smoothing", "--smooth-window-size", "5",
            "--scheduler-address", client.scheduler.address, *extra,
        ]  # fmt: skip


def _clean(world: World, client, tmp_root: Path) -> Path:
    """A clean run of the world's current inputs (every tile) into a new local output."""
    if world.label not in _CLEAN:
        out = tmp_root / f"clean-{len(_CLEAN)}"
        result = run(world.config(str(out), tiles="all", window="60x60"), client=client)
        assert set(result.tiles) == set(world.tiles) and not result.failed
        _CLEAN[world.label] = out
    return _CLEAN[world.label]


def _assert_map_equal(a, b, what: str, level1=None) -> None:
    if level1 is not None:  # the first overview level of both maps
        _assert_map_equal(*level1, f"{what} (overview level 1)")
    assert a.sizes == b.sizes, (what, dict(a.sizes), dict(b.sizes))
    np.testing.assert_array_equal(a.x.values, b.x.values)
    np.testing.assert_array_equal(a.y.values, b.y.values)
    # read here, not on the module's cluster (the default scheduler while its client lives): a
    # map's chunks through the workers took ~1.3 s per comparison, a quarter of this test
    with dask.config.set(scheduler="threads"):
        for var in VARIABLES:
            np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=f"{what}: {var}")


def _assert_equals_clean(output: str, world: World, client, tmp_root: Path) -> Path:
    """The output's map, COGs and mosaics equal a clean run of the current inputs."""
    ref = _clean(world, client, tmp_root)
    clear_gdal_cache()  # GDAL keeps what it read of /vsis3/ files: the previous step's mosaics
    level1 = (MapRepo(output).open_dataset(level=1), MapRepo(str(ref)).open_dataset(level=1))
    _assert_map_equal(open_map(output), open_map(str(ref)), world.label, level1)
    assert set(MapRepo(output).records()) == set(world.tiles)
    for tile in world.tiles:
        for var in VARIABLES:
            url = storage.gdal_path(storage.join(output, "cog", tile, f"{var}.tif"))
            with rasterio.open(url) as x, rasterio.open(ref / "cog" / tile / f"{var}.tif") as y:
                np.testing.assert_array_equal(x.read(), y.read(), err_msg=f"cog {tile} {var}")
                assert x.transform == y.transform
    for var in VARIABLES:
        url = storage.gdal_path(storage.join(output, "cog", f"{var}.vrt"))
        with rasterio.open(url) as x, rasterio.open(ref / "cog" / f"{var}.vrt") as y:
            np.testing.assert_array_equal(x.read(), y.read(), err_msg=f"mosaic {var}")
            assert x.transform == y.transform
    return ref


def _driver(world: World, output: str, client, *extra: str, kill_at: str | None = None):
    """``python -m treesits_dask run`` as a subprocess; ``kill_at``: ``"commit"`` (the first tile
    commit: its windows are written, nothing is committed) or ``"mosaics"`` (every tile committed,
    the mosaics not yet written) SIGKILLs the driver there."""
    hook = {
        None: "",
        "commit": "from treesits_dask.outputs.repo import MapRepo as M; M.commit_tile = die",
        "mosaics": "from treesits_dask.outputs import cog; cog.write_mosaics = die",
    }[kill_at]
    code = textwrap.dedent(f"""
        import os, signal, sys
        def die(*a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        {hook}
        from treesits_dask.cli import main
        sys.exit(main({world.cli(output, client, *extra)!r}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREESITS_")}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def _finish(proc, timeout=180) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _summary(output: str) -> dict:
    fs, path = storage.get_fs(storage.join(output, "run.json"))
    return json.loads(fs.cat_file(path))


def _assert_changes_exact(output: str, found: list[dict], history: list) -> None:
    """``changes`` between versions equals the class difference of their clean runs (255 where a
    version has no prediction), pixel for pixel, over the whole map."""
    import xarray as xr

    pairs = [(0, len(found) - 1), (3, 4)]  # first to last; the model change
    for i, j in pairs:
        with dask.config.set(scheduler="threads"):  # read here (see _assert_map_equal)
            ds = changes(output, found[i]["version"], found[j]["version"]).compute()
            expected = {}
            for name, k in (("before", i), ("after", j)):
                ref = open_map(str(history[k][1]))["class"]
                expected[name] = ref.reindex(x=ds.x, y=ds.y, fill_value=255).values
        np.testing.assert_array_equal(ds["before"].values, expected["before"])
        np.testing.assert_array_equal(ds["after"].values, expected["after"])
        np.testing.assert_array_equal(ds["changed"].values, expected["before"] != expected["after"])
        assert ds["changed"].values.any(), (i, j)
    assert isinstance(ds, xr.Dataset)


# -------------------------------------------------------------------------------------- scenario
def test_one_output_for_years(backend, base_cube, models, client, tmp_path, monkeypatch):
    output = backend
    world = World(base_cube, models, tmp_path)
    clean_root = Path(str(tmp_path)).parent / "clean-runs"
    clean_root.mkdir(exist_ok=True)
    history: list[tuple[str, Path]] = []  # (version snapshot, clean run of its inputs)
    budget = monkeypatch.setattr  # the lowered window budget (see BUDGET) for every run here

    def auto_window(grid, requested, n_scenes, max_bytes=BUDGET, target=256, **kw):
        return choose_window_shape(grid, requested, n_scenes, max_bytes, target, **kw)

    budget(plan_module, "choose_window_shape", auto_window)

    def step(result=None, new_version=True):
        if result is not None:
            assert not result.failed, result.failed
        ref = _assert_equals_clean(output, world, client, clean_root)
        found = versions(output)
        if new_version:
            history.append((found[-1]["snapshot"], ref))
        assert len(found) == len(history)
        return found

    # 1. the first run: two tiles (window auto: whole 60 x 60 px tiles with 12 scenes)
    first = run(world.config(output, tiles=f"{A},{B}"), client=client)
    assert set(first.tiles) == {A, B}
    step(first)
    assert MapRepo(output).grid().chunk == (60, 60)

    # 2. one tile again, forced: a new version with the same pixels
    again = run(world.config(output, tiles=B, force=True), client=client)
    assert set(again.tiles) == {B}
    found = step(again)
    assert [t["tile"] for t in found[-1]["tiles"]] == [B]

    # 3. a third tile appears (to the south: the map grows); `--tiles all` adds it only
    world.tile_appears(C)
    grown = run(world.config(output, tiles="all"), client=client)
    assert set(grown.tiles) == {C} and set(grown.skipped) == {A, B}
    step(grown)

    # 4. tile A's series grows past the auto-window threshold: the map keeps its 60 x 60 chunks
    world.add_scenes(A, 4)
    plan = make_plan(world.config(output, tiles="all"))
    tile_a = next(t for t in plan.tiles if t.tile == A)
    assert auto_window(tile_a.grid, None, len(tile_a.scenes)) == (30, 60)  # what auto says now
    assert plan.output_grid.chunk == (60, 60) and [t.tile for t in plan.tiles] == [A]
    step(run(world.config(output, tiles="all"), client=client))

    # 5. a new model: every tile again
    world.model = models[1]
    world.changes.append("model")
    remodel = run(world.config(output, tiles="all"), client=client)
    assert set(remodel.tiles) == {A, B, C}
    step(remodel)

    # 6. a rerun (model reverted to the first) killed mid-tile, then the inputs reverted: the map
    # still holds the last version, up to date for the reverted inputs
    world.model = models[0]
    rc, out = _finish(_driver(world, output, client, "--tiles", "all", kill_at="commit"))
    assert rc == -9, out
    world.model = models[1]
    after_kill = run(world.config(output, tiles="all"), client=client)
    assert not after_kill.tiles and set(after_kill.skipped) == {A, B, C}
    step(after_kill, new_version=False)

    # 7. two drivers started at the same moment: one does the work, the other is refused
    world.add_scenes(C, 1)
    procs = [_driver(world, output, client, "--tiles", "all") for _ in range(2)]
    results = sorted(_finish(p) for p in procs)
    (rc_ok, out_ok), (rc_refused, out_refused) = results
    assert rc_ok == 0, out_ok
    # refused: the lease is held, or both found no live lease (none, or the one the driver
    # killed in step 6 left) and the other driver's conditional write came first
    refusals = ("leased by another driver", "another driver took the lease")
    assert rc_refused != 0 and any(r in out_refused for r in refusals), out_refused
    found = step()
    assert [t["tile"] for t in found[-1]["tiles"]] == [C]

    # 8. COGs off for a run, then on again: the COGs of the tile are rebuilt from the map,
    # without reading a scene
    world.add_scenes(B, 1)
    no_cog = run(world.config(output, tiles="all", cog=False), client=client)
    assert set(no_cog.tiles) == {B}
    assert MapRepo(output).records()[B]["stats"]["scenes"] == 13
    with_cog = run(world.config(output, tiles="all"), client=client)
    # B's COGs, and the smoothed COGs of its neighbours whose strips along B were smoothed again
    assert not with_cog.tiles and sorted(with_cog.cogs_rebuilt) == sorted([A, B, C])
    step(no_cog)  # one version: the run without COGs; the COG rebuild changed no pixel

    # 9. a tile appears and a driver is killed after its tile commits, before the mosaics: the
    # next run writes them, and tags the dead driver's commits as its version
    world.add_scenes(A, 1)
    world.tile_appears(D)
    rc, out = _finish(_driver(world, output, client, "--tiles", "all", kill_at="mosaics"))
    assert rc == -9, out
    assert set(MapRepo(output).records()) == {A, B, C, D}
    assert len(versions(output)) == len(history)  # not a version yet
    repaired = run(world.config(output, tiles="all"), client=client)
    assert not repaired.tiles and not repaired.failed and not repaired.cogs_rebuilt
    found = step()
    assert sorted(t["tile"] for t in found[-1]["tiles"]) == [A, D]

    # every version equals the clean run of its inputs; the change layer is exact
    repo = MapRepo(output)
    found = versions(output)
    assert [v["snapshot"] for v in found] == [s for s, _ in history]
    for (snapshot, ref), v in zip(history, found, strict=True):
        _assert_map_equal(open_map(output, as_of=v["version"]), open_map(str(ref)), v["run"])
        assert repo.resolve(v["run"]) == snapshot
    _assert_changes_exact(output, found, history)
