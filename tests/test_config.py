import pytest

from treesits_dask.config import DEFAULT_QAI_FLAGS, load_config
from treesits_dask.errors import ConfigError

BASE = {"cube": "/c", "output": "/o"}


def test_layering(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("cube: /from/yaml\noutput: /o\nbatch_size: 64\nwindow: 300x600\nsensors: SEN2A\n")
    c = load_config(y, {"batch_size": 128}, environ={"TREESITS_WINDOW": "100"})
    assert c.cube == "/from/yaml" and c.batch_size == 128 and c.window_shape == (100, 100)
    assert c.sensors == ["SEN2A"]
    assert load_config(y, {}, environ={}).window_shape == (300, 600)


def test_unknown_key_lists_valid(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("cube: /c\noutput: /o\nbatchsize: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(y, environ={})
    assert (
        "batchsize" in str(e.value) and "batch_size" in str(e.value) and "mask_dir" in str(e.value)
    )


@pytest.mark.parametrize(
    "over, match",
    [
        ({"window": "0"}, "window"),
        ({"device": "gpu"}, "device"),
        ({"sensors": "SEN2A,LANDSAT"}, "sensor"),
        ({"qai": "CLOUD,SNOW"}, "QAI flag"),
        ({"start_date": "2023-01-01", "end_date": "2022-01-01"}, "after"),
        ({"model": "/m.pth", "model_family": "sits-lstm"}, "model_params"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_values(over, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides={**BASE, **over}, environ={})


def test_qai_forms():
    assert load_config(overrides=BASE, environ={}).qai_flags == DEFAULT_QAI_FLAGS
    assert load_config(overrides={**BASE, "qai": "none"}, environ={}).qai_flags == ()
    assert load_config(
        overrides={**BASE, "qai": "cloud_opaque, ILLUMIN_POOR"}, environ={}
    ).qai_flags == ("CLOUD_OPAQUE", "ILLUMINATION_POOR")


def test_bad_yaml(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("cube: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(y, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", environ={})
