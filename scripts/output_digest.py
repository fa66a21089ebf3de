"""Digest every output file of runs on the demo cube, to show that a refactor changes no byte.

    python scripts/output_digest.py prepare WORKDIR        # demo cube + fixed-weight models (once)
    python scripts/output_digest.py run WORKDIR NAME       # `python -m treesits_dask run` per model
    python scripts/output_digest.py compare A.json B.json  # exit 1 if any output byte differs

``prepare`` writes the demo cube (2 tiles of 300 x 300 px, 36 scenes, seed 0, forest masks) and
three models with fixed random weights (native sits-lstm, native sits-transformer, sbert) into
WORKDIR/inputs.  ``run`` predicts every model through the command line (the interface that stays
stable across refactors; flags after NAME go to ``run``, e.g. ``--window 100x100``) into
WORKDIR/NAME-<model>/ and writes WORKDIR/NAME.json: the sha256 of every output file (COGs, VRTs)
and of the decoded arrays of the map.  Files that hold timestamps, run ids or random object names
(run.json, _runs/, _ledger/, the COG and mosaic manifests, the store's own files:
predictions.zarr/ before the map became an Icechunk repository, map.icechunk/ since) are left out:
the map is compared by its arrays.  Run ``prepare`` with the old code, ``run`` with the old and
with the new code, then ``compare``.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

MODELS = {
    "lstm": ["--model-family", "native"],
    "transformer": ["--model-family", "native"],
    "sbert": ["--model-family", "sbert"],
}
SKIP = (
    "run.json",
    "_runs",
    "_ledger",
    "_lease.json",
    ".lease.lock",
    "predictions.zarr",
    "map.icechunk",
)
#: manifests naming the run's record id and map snapshot (random per run), wherever they lie
SKIP_NAMES = ("_cog.json", "_mosaic.json")


def prepare(workdir: Path) -> None:
    import torch

    from treesits_dask.models import ModelCard, save_native
    from treesits_dask.models.architectures import (
        LSTMClassifier,
        SBERTClassifier,
        TransformerClassifier,
    )
    from treesits_dask.models.card import SBERT_HYPERPARAMETERS
    from treesits_dask.synthetic import SPECIES, make_cube

    inputs = workdir / "inputs"
    make_cube(
        inputs / "cube",
        tiles=("X0069_Y0043", "X0070_Y0043"),
        size=300,
        n_scenes=36,
        mask_dir=str(inputs / "masks"),
        truth_dir=str(inputs / "truth"),
        seed=0,
    )
    bands = [
        "BLUE",
        "GREEN",
        "RED",
        "REDEDGE1",
        "REDEDGE2",
        "REDEDGE3",
        "BROADNIR",
        "NIR",
        "SWIR1",
        "SWIR2",
    ]
    torch.manual_seed(0)
    hp = {"num_bands": 10, "input_size": 32, "hidden_size": 64, "num_layers": 2, "num_classes": 5}
    card = ModelCard(
        family="sits-lstm",
        hyperparameters=hp,
        bands=bands,
        class_names=list(SPECIES),
        output_kind="softmax",
        sequence={"kind": "full"},
    )
    save_native(LSTMClassifier(**hp).eval(), card, str(inputs / "models" / "lstm.pt"))
    hp = {
        "num_bands": 10,
        "num_classes": 5,
        "d_model": 32,
        "nhead": 4,
        "num_layers": 2,
        "dim_feedforward": 64,
    }
    card = card.model_copy(update={"family": "sits-transformer", "hyperparameters": hp})
    save_native(TransformerClassifier(**hp).eval(), card, str(inputs / "models" / "transformer.pt"))
    torch.manual_seed(0)
    state = SBERTClassifier(**SBERT_HYPERPARAMETERS).state_dict()
    torch.save({"model_state_dict": state}, inputs / "models" / "sbert.pt")
    print(f"inputs in {inputs}")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(output: Path) -> dict:
    import numpy as np
    import rasterio
    import xarray as xr

    files = {}
    for path in sorted(p for p in output.rglob("*") if p.is_file()):
        rel = path.relative_to(output).as_posix()
        if rel.split("/")[0] in SKIP or path.name in SKIP_NAMES:
            continue
        files[rel] = _sha(path.read_bytes())
    arrays = {}
    if (output / "predictions.zarr").exists():  # the store before the map became versioned
        ds = xr.open_zarr(output / "predictions.zarr", mask_and_scale=False)
    else:
        from treesits_dask import open_map

        ds = open_map(str(output))  # the finished tiles' bounding box, integers as stored
    for name, var in ds.data_vars.items():
        arrays[f"zarr:{name}"] = _sha(np.ascontiguousarray(var.values).tobytes())
    for cog in sorted((output / "cog").glob("*/*.tif")):
        with rasterio.open(cog) as src:
            arrays[f"cog:{cog.relative_to(output / 'cog').as_posix()}"] = _sha(src.read().tobytes())
    return {"files": files, "arrays": arrays}


def run(workdir: Path, name: str, extra: list[str] | None = None) -> None:
    inputs = workdir / "inputs"
    report = {}
    for model, flags in MODELS.items():
        out = workdir / f"{name}-{model}"
        if out.exists():
            raise SystemExit(f"{out} exists; choose another NAME")
        cmd = [
            sys.executable,
            "-m",
            "treesits_dask",
            "run",
            "--cube",
            str(inputs / "cube"),
            "--tiles",
            "all",
            "--model",
            str(inputs / "models" / f"{model}.pt"),
            *flags,
            "--mask-dir",
            str(inputs / "masks"),
            "--output",
            str(out),
            "--dashboard-address",
            ":0",
            "--workers",
            "1",
            "--threads-per-worker",
            "2",
            *(extra or []),
        ]
        subprocess.run(cmd, check=True)
        report[model] = digest(out)
    target = workdir / f"{name}.json"
    target.write_text(json.dumps(report, indent=1, sort_keys=True))
    n = sum(len(r["files"]) for r in report.values())
    print(f"{n} output files digested into {target}")


def compare(a: Path, b: Path) -> int:
    """Exit 1 when a digest of ``a`` is missing from ``b`` or differs; outputs only ``b`` has
    (layers added since) are listed apart and do not fail the comparison."""
    old, new = json.loads(a.read_text()), json.loads(b.read_text())
    problems, added, compared = [], [], 0
    for model in sorted(set(old) | set(new)):
        for kind in ("files", "arrays"):
            x, y = old.get(model, {}).get(kind, {}), new.get(model, {}).get(kind, {})
            for key in sorted(set(x) | set(y)):
                # digests of an older version of this script
                if key.split("/")[0] in SKIP or key.rsplit("/", 1)[-1] in SKIP_NAMES:
                    continue
                if key not in x:
                    added.append(f"{model} {kind} {key}")
                    continue
                compared += 1
                if x.get(key) != y.get(key):
                    problems.append(f"{model} {kind} {key}: {x.get(key)} != {y.get(key)}")
    for p in problems:
        print(p)
    for p in added:
        print(f"only in {b.name}: {p}")
    print(
        f"{compared - len(problems)} of {compared} digests equal"
        + (f"; {len(added)} outputs only in {b.name}" if added else "")
    )
    return 1 if problems else 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "prepare":
        prepare(Path(argv[1]))
        return 0
    if len(argv) >= 3 and argv[0] == "run":  # further arguments: flags of `run` (e.g. --window)
        run(Path(argv[1]), argv[2], argv[3:])
        return 0
    if len(argv) == 3 and argv[0] == "compare":
        return compare(Path(argv[1]), Path(argv[2]))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
