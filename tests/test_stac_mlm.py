"""The run's STAC catalog describes its model with the STAC Machine Learning Model extension
(validated against the extension's published JSON schema, offline copies in ``tests/schemas``)
and links every tile item to it; quicklooks and STAC assets cover the new layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft7Validator
from referencing import Registry, Resource

pytestmark = pytest.mark.slow

SCHEMAS = Path(__file__).parent / "schemas" / "stac"
_REMOTE = {
    "https://stac-extensions.github.io/classification/v1.1.0/schema.json": "classification",
    "https://stac-extensions.github.io/processing/v1.1.0/schema.json": "processing",
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json": "raster",
}


def _mlm_validator() -> Draft7Validator:
    resources = [
        (url, Resource.from_contents(json.loads((SCHEMAS / f"{name}-v1.1.0.schema.json")
                                                .read_text())))
        for url, name in _REMOTE.items()
    ]  # fmt: skip
    schema = json.loads((SCHEMAS / "mlm-v1.4.0.schema.json").read_text())
    return Draft7Validator(schema, registry=Registry().with_resources(resources))


def test_model_item_follows_mlm_and_tiles_link_to_it(small_cube, native_lstm, tmp_path):
    import pystac

    from treesits_dask import quicklook, write_stac
    from treesits_dask.config import load_config
    from treesits_dask.pipeline.run import run

    out = tmp_path / "out"
    config = load_config(
        overrides=dict(cube=small_cube.root, mask_dir=small_cube.mask_dir, model=native_lstm,
                       output=str(out), window="30x60", workers=1, dashboard_address=":0",
                       uncertainty="entropy,margin", smoothing={"window_size": 5}),
        environ={},
    )  # fmt: skip
    run(config)
    pngs = {Path(p).name for p in quicklook(str(out))}
    for var in ("entropy", "margin", "class_smoothed", "probability_smoothed"):
        assert f"mosaic_{var}.png" in pngs and f"{small_cube.tiles[0]}_{var}.png" in pngs
    catalog = pystac.Catalog.from_file(write_stac(str(out), validate=True))
    items = {i.id: i for i in catalog.get_items(recursive=True)}
    models = [i for i in items.values() if i.id.startswith("model-")]
    assert len(models) == 1
    model = models[0].to_dict()
    validator = _mlm_validator()
    errors = sorted(validator.iter_errors(model), key=lambda e: list(e.path))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]
    props = model["properties"]
    assert props["mlm:architecture"] == "LSTM" and props["mlm:framework"] == "PyTorch"
    assert props["mlm:input"][0]["bands"][0] == "BLUE" and len(props["mlm:input"][0]["bands"]) == 10
    assert props["mlm:input"][0]["pre_processing_function"]["expression"].endswith("full_inputs")
    classes = props["mlm:output"][0]["classification:classes"]
    assert [c["description"] for c in classes] == list(small_cube.class_names)
    weights = model["assets"]["weights"]
    import hashlib

    assert weights["treesits_dask:sha256"] == hashlib.sha256(Path(native_lstm).read_bytes()
                                                             ).hexdigest()  # fmt: skip
    assert weights["mlm:artifact_type"] == "torch.save" and "mlm:model" in weights["roles"]
    # every tile item links to its model (derived_from, with the model's name)
    for tile in small_cube.tiles:
        links = [link for link in items[tile].to_dict()["links"] if link["rel"] == "derived_from"]
        assert len(links) == 1 and links[0]["mlm:name"] == props["mlm:name"]
        assert Path(items[tile].get_self_href()).parent.joinpath(links[0]["href"]).resolve() == \
            Path(models[0].get_self_href()).resolve()  # fmt: skip
        assets = items[tile].to_dict()["assets"]
        assert {"entropy", "margin", "probability_smoothed", "class_smoothed"} <= set(assets)
        assert assets["class_smoothed"]["classification:classes"][0]["title"] == "Spruce"
    # a broken model item is refused by the schema (it is really applied)
    broken = json.loads(json.dumps(model))
    del broken["properties"]["mlm:input"]
    assert not validator.is_valid(broken)
