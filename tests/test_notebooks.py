"""The notebooks run headless (nbclient) in a temporary folder, with a kernel of this interpreter
declared in a temporary JUPYTER_PATH (nothing is registered globally), and produce their outputs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
KERNEL = "treesits-dask-test"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def jupyter_path(tmp_path_factory) -> Path:
    """A kernelspec that starts ``sys.executable -m ipykernel_launcher``."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "treesits_dask (tests)",
                "language": "python",
            }
        )
    )
    return root


def _run(name: str, tmp_path: Path, jupyter_path: Path, monkeypatch) -> tuple[dict, str, Path]:
    """Execute a notebook in ``tmp_path``; returns it, its text output and its output folder."""
    out = tmp_path / "notebook-output"
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("TREESITS_NOTEBOOK_DIR", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(
        nb, kernel_name=KERNEL, timeout=300, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            assert o["output_type"] != "error", o
            text.append(
                o.get("text", "")
                + "".join(
                    v for k, v in o.get("data", {}).items() if k in ("text/plain", "text/html")
                )
            )
    return nb, "\n".join(text), out


def _png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000, path


def test_notebooks_are_committed_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path.name


def test_quickstart(tmp_path, jupyter_path, monkeypatch):
    _, text, out = _run("01_quickstart.ipynb", tmp_path, jupyter_path, monkeypatch)
    d = out / "01_quickstart"
    for png in ("pixel_timeseries.png", "rgb_composite.png", "class_map.png"):
        _png(d / png)
    assert (d / "output" / "map.icechunk" / "refs" / "branch.main" / "ref.json").is_file()
    summary = json.loads((d / "output" / "run.json").read_text())
    assert summary["complete"] and set(summary["tiles"]) == {"X0069_Y0043", "X0070_Y0043"}
    assert re.search(r'Dask dashboard: <a href="http://127\.0\.0\.1:\d+/status"', text)
    assert "version 1: run " in text and "tiles ['X0069_Y0043', 'X0070_Y0043']" in text
    agreement = float(re.search(r"agreement with the known species map: ([0-9.]+)", text)[1])
    assert agreement >= 0.9


def test_training_notebook(tmp_path, jupyter_path, monkeypatch):
    _, text, out = _run("02_training.ipynb", tmp_path, jupyter_path, monkeypatch)
    d = out / "02_training"
    card = json.loads((d / "model" / "species_transformer.json").read_text())
    assert (
        card["family"] == "sits-transformer" and card["metrics"]["test"]["overall_accuracy"] >= 0.9
    )
    for png in ("validation_confusion.png", "other_tile_confusion.png", "predicted_vs_known.png"):
        _png(d / png)
    other = json.loads((d / "other_tile_metrics.json").read_text())
    assert other["overall_accuracy"] >= 0.9
    assert float(re.search(r"map agreement with the known species: ([0-9.]+)", text)[1]) >= 0.9


def test_cluster_notebook_without_a_cluster(tmp_path, jupyter_path, monkeypatch):
    _, text, out = _run("03_cluster.ipynb", tmp_path, jupyter_path, monkeypatch)
    assert "Kubernetes reachable: False" in text
    assert text.count("no Kubernetes cluster reachable: skipped") == 2
    assert (out / "03_cluster" / "manifests" / "dask" / "daskcluster.yaml").is_file()
