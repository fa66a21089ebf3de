import datetime as dt

import pytest

from treesits_dask.errors import DiscoveryError
from treesits_dask.io import discovery as d

WKT = 'PROJCS["ETRS89 / LAEA Europe",AUTHORITY["EPSG","3035"]]'


@pytest.mark.parametrize(
    "name, expected",
    [
        ("20230830_LEVEL2_SEN2C_BOA.tif", (dt.date(2023, 8, 30), "SEN2C", "BOA")),
        ("20180101_LEVEL2_SEN2A_QAI.tif", (dt.date(2018, 1, 1), "SEN2A", "QAI")),
        ("19990615_LEVEL2_LND07_BOA.tif", (dt.date(1999, 6, 15), "LND07", "BOA")),
        ("/data/20200101_x/20210202_LEVEL2_SEN2B_OVV.jpg", (dt.date(2021, 2, 2), "SEN2B", "OVV")),
    ],
)
def test_scene_names(name, expected):
    info = d.parse_scene_name(name)
    assert (info["date"], info["sensor"], info["product"]) == expected


@pytest.mark.parametrize(
    "name",
    [
        "20230830_LEVEL2_SEN2C_BOA.tif.aux.xml",
        "20231340_LEVEL2_SEN2A_BOA.tif",
        "20230830_LEVEL3_SEN2A_BOA.tif",
        "20230830_LEVEL2_SEN3A_BOA.tif",
        "x20230830_LEVEL2_SEN2A_BOA.tif",
    ],
)
def test_not_scene_names(name):
    assert d.parse_scene_name(name) is None


def test_date_from_basename_only():
    # a date-like folder name must not leak into the parsed date
    assert d.parse_scene_name("/a/19990101_LEVEL2_SEN2A_BOA.tif/20200202_LEVEL2_SEN2A_BOA.tif")[
        "date"
    ] == dt.date(2020, 2, 2)


def test_prj_old_and_new_formats():
    old = (
        f"{WKT}\n-25.000000\n60.000000\n2456026.363042\n4574919.607965\n30000.000000\n3000.000000\n"
    )
    new = (
        f"PROJECTION = {WKT}\nORIGIN_GEO_X = -25\nORIGIN_GEO_Y = 60\n"
        "ORIGIN_MAP_X = 2456026.363042\n"
        "ORIGIN_MAP_Y = 4574919.607965\nTILE_SIZE_X = 30000\nTILE_SIZE_Y = 30000\n"
    )
    a, b = d.parse_cube_definition(old), d.parse_cube_definition(new)
    assert a.block_size == 3000 and b.block_size is None
    for c in (a, b):
        assert c.tile_bounds("X0069_Y0043") == pytest.approx(
            (
                2456026.363042 + 69 * 30000,
                4574919.607965 - 44 * 30000,
                2456026.363042 + 70 * 30000,
                4574919.607965 - 43 * 30000,
            )
        )
        assert (
            c.tile_of(2456026.363042 + 69 * 30000 + 1, 4574919.607965 - 43 * 30000 - 1)
            == "X0069_Y0043"
        )


def test_prj_broken():
    with pytest.raises(DiscoveryError, match="lines"):
        d.parse_cube_definition("WKT\n1\n2\n")
    with pytest.raises(DiscoveryError, match="TILE_SIZE_X"):
        d.parse_cube_definition("PROJECTION = x\nORIGIN_MAP_X = 1\nORIGIN_MAP_Y = 2\n")


def test_tile_ids():
    assert d.parse_tile_id("X0069_Y0043") == (69, 43)
    with pytest.raises(DiscoveryError, match="X0069_Y0043"):
        d.parse_tile_id("69_43")


def test_real_cube(shared_data):
    root = str(shared_data / "real-s2-eolearn")
    assert d.select_tiles(root, "all") == ["X0000_Y0000"]
    scenes = d.scene_table(root, "X0000_Y0000")
    assert [s.date for s in scenes] == sorted(s.date for s in scenes)
    assert len(scenes) == 5 and all(s.qai is None for s in scenes)
    assert (
        len(d.scene_table(root, "X0000_Y0000", start=dt.date(2015, 8, 1), end=dt.date(2015, 8, 30)))
        == 2
    )
    assert d.scene_table(root, "X0000_Y0000", sensors=("SEN2B",)) == []


def test_synthetic_cube_selection(small_cube, tmp_path):
    root = small_cube.root
    assert d.select_tiles(root, "X0070_Y0043,X0069_Y0043") == ["X0070_Y0043", "X0069_Y0043"]
    lst = tmp_path / "tiles.txt"
    lst.write_text("1\nX0070_Y0043\n")
    assert d.select_tiles(root, str(lst)) == ["X0070_Y0043"]
    lst.write_text("3\nX0070_Y0043\n")
    with pytest.raises(DiscoveryError, match="announces 3"):
        d.select_tiles(root, str(lst))
    with pytest.raises(DiscoveryError, match="X0001_Y0001 is not in cube"):
        d.select_tiles(root, "X0001_Y0001")
    scenes = d.scene_table(root, "X0069_Y0043")
    assert len(scenes) == 10
    assert all(s.qai and s.qai.endswith("_QAI.tif") for s in scenes)
    assert {s.sensor for s in scenes} <= {"SEN2A", "SEN2B", "SEN2C"}


def test_missing_root_and_prj(tmp_path):
    with pytest.raises(DiscoveryError, match="does not exist"):
        d.read_cube_definition(str(tmp_path / "nope"))
    with pytest.raises(DiscoveryError, match="datacube-definition.prj"):
        d.read_cube_definition(str(tmp_path))


def test_what_is_not_a_tile_or_a_scene_is_ignored_and_named(tmp_path, caplog):
    """Real cube roots and tile folders hold more than BOA and QAI files: discovery ignores the
    rest and says what it ignored."""
    from treesits_dask.synthetic import make_cube

    cube = make_cube(tmp_path / "cube", tiles=("X0001_Y0001",), size=16, n_scenes=2, seed=1)
    with caplog.at_level("INFO", logger="treesits_dask.io.discovery"):
        assert d.list_tiles(cube.root) == ["X0001_Y0001"]
    assert "ignored 2 entries that are not tile folders (mosaic/, tiles.txt)" in caplog.text
    with caplog.at_level("DEBUG", logger="treesits_dask.io.discovery"):
        scenes = d.scene_table(cube.root, "X0001_Y0001")
    assert [s.sensor for s in scenes] == ["SEN2A", "SEN2B"]
    assert "1 LND08 scenes (not in sensors)" in caplog.text and "1 CLD files" in caplog.text
