import pytest

from pathmil.config import load_settings, parse_overrides
from pathmil.errors import PathmilError
from pathmil.slide.tile import TileConfig


def test_defaults_and_presets():
    config = TileConfig()
    assert (config.target_mpp, config.tile_px, config.min_tissue) == (0.5, 256, 0.25)
    tcga = config.tissue_params()
    assert (tcga.sthresh, tcga.mthresh, tcga.close, tcga.a_t, tcga.a_h, tcga.max_n_holes) == (
        8,
        7,
        4,
        16,
        4,
        8,
    )
    biopsy = TileConfig(preset="bwh_biopsy").tissue_params()
    assert (biopsy.sthresh, biopsy.mthresh, biopsy.close, biopsy.a_t, biopsy.a_h, biopsy.max_n_holes) == (
        15,
        11,
        2,
        1,
        1,
        2,
    )
    resection = TileConfig(preset="bwh_resection", tissue={"sthresh": 20}).tissue_params()
    assert (resection.sthresh, resection.a_t, resection.a_h) == (20, 100, 16)


def test_yaml_then_overrides_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tile:\n  tile_px: 224\n  target_mpp: 1\n  tissue: {sthresh: 12}\n")
    config = load_settings(TileConfig, path, ["tissue.mthresh=9", "min_tissue=0.5"], {"tile_px": 512})
    assert config.tile_px == 512  # flag wins
    assert config.target_mpp == 1.0 and isinstance(config.target_mpp, float)
    assert config.min_tissue == 0.5
    assert config.tissue_params().sthresh == 12 and config.tissue_params().mthresh == 9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["tile_pxx=3"], "unknown setting tile.tile_pxx; allowed: "),
        (["tissue.sthres=3"], "unknown setting tile.tissue.sthres; allowed: a_h, a_t, close"),
        (["tile_px=big"], "setting tile.tile_px: Input should be a valid integer"),
        (["preset=nope"], "setting tile.preset: Input should be 'tcga', 'bwh_biopsy' or 'bwh_resection'"),
        (["overlap=1.5"], "setting tile.overlap: Input should be less than 1 (got 1.5)"),
        (["tissue.sthresh=300"], "setting tile.tissue.sthresh: Input should be less than or equal to 255"),
    ],
)
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(
        PathmilError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        load_settings(TileConfig, None, overrides)


def test_parse_overrides_nested_and_typed():
    assert parse_overrides(["a.b.c=1", "a.d=[1, 2]", "e=x"]) == {"a": {"b": {"c": 1}, "d": [1, 2]}, "e": "x"}
    with pytest.raises(PathmilError, match="key=value"):
        parse_overrides(["novalue"])
