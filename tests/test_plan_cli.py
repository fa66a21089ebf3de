"""`plan`: dry run JSON (no cluster, no pixel reads) and `--render` of the Kubernetes objects."""

import json

import yaml

from treesits_dask.cli import main
from treesits_dask.io import cube


def test_plan_json(small_cube, native_lstm, tmp_path, capsys):
    before = cube.OPEN_COUNTER.count
    rc = main(
        [
            "plan",
            "--cube",
            small_cube.root,
            "--tiles",
            "all",
            "--model",
            native_lstm,
            "--output",
            str(tmp_path / "out"),
            "--mask-dir",
            small_cube.mask_dir,
            "--window",
            "30x60",
        ]
    )
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    assert [t["tile"] for t in plan["tiles"]] == list(small_cube.tiles)
    assert all(t["scenes"] == 10 and t["windows"] == 2 for t in plan["tiles"])
    assert plan["memory"]["window_mib"] > 0 and plan["cluster"]["kind"] == "LocalCluster"
    assert plan["tiles"][0]["why"] == ["no record (never finished)"]
    # headers only: per tile its first BOA (the grid), then every BOA and QAI (their checks)
    assert cube.OPEN_COUNTER.count - before == 2 * (1 + 2 * 10)
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_plan_render_kubernetes(small_cube, native_lstm, tmp_path, capsys):
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(
        yaml.safe_dump(
            {
                "cube": small_cube.root,
                "tiles": "all",
                "output": str(tmp_path / "out"),
                "model": native_lstm,
                "cluster": "kubernetes",
                "kubernetes": {
                    "namespace": "forest",
                    "env": {
                        "AWS_ENDPOINT_URL": "https://s3.example.org",
                        "AWS_REGION": "RegionOne",
                    },
                    "gpu": {"workers": 2},
                },
            }
        )
    )
    rc = main(["plan", "--config", str(run_yaml), "--render", str(tmp_path / "k8s")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    plan = json.loads(out.out)
    assert plan["cluster"]["kind"] == "dask-kubernetes" and plan["cluster"]["namespace"] == "forest"
    docs = []
    for path in sorted((tmp_path / "k8s").rglob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert {
        "DaskCluster",
        "DaskWorkerGroup",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "CronJob",
        "ConfigMap",
    } <= kinds
    assert all(
        d["metadata"].get("namespace", "forest") == "forest"
        for d in docs
        if d["kind"] != "Namespace"
    )
    cron = next(d for d in docs if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    assert "update" in json.dumps(cron)
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    assert yaml.safe_load(next(iter(config_map["data"].values())))["cluster"] == "kubernetes"
