from pathlib import Path

import pytest

from pathmil.config import load_settings, parse_overrides
from pathmil.errors import PathmilError
from pathmil.slide.tile import TileConfig

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_presets():
    """pathmil's default preset: CLAM's tcga thresholds, area filters of one default tile (a 128 um reference
    patch); CLAM's presets keep CLAM's values (areas in 128 um reference patches, CLAM's 512 px at 40x)."""
    config = TileConfig()
    assert (config.target_mpp, config.tile_px, config.min_tissue, config.preset) == (
        0.5,
        256,
        0.25,
        "pathmil",
    )
    default = config.tissue_params()
    assert (default.sthresh, default.mthresh, default.close, default.a_t, default.a_h, default.max_n_holes) == (
        8, 7, 4, 1, 1, 8,
    )  # fmt: skip
    tcga = TileConfig(preset="tcga").tissue_params()
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
        (
            ["preset=nope"],
            "setting tile.preset: Input should be 'pathmil', 'tcga', 'bwh_biopsy' or 'bwh_resection'",
        ),
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


# --------------------------------------------------------------------- one declaration, everything derived


def test_committed_workflow_schema_is_the_generated_one():
    """workflow/schemas/config.schema.yaml is made by `pathmil config --schema`; regenerate it after
    changing a setting (the workflow validates configs against it without importing pathmil)."""
    import yaml

    from pathmil.config import workflow_schema

    committed = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert committed == workflow_schema(), (
        "run: pathmil config --schema > workflow/schemas/config.schema.yaml"
    )


def test_config_readme_tables_are_the_generated_ones():
    from pathmil.config import markdown_tables, update_markdown

    readme = (ROOT / "config" / "README.md").read_text()
    tables = markdown_tables()
    assert update_markdown(readme, tables) == readme, "run: pathmil config --markdown config/README.md"
    for name in tables:  # every generated table is in the README
        assert f"<!-- table {name} -->" in readme, name


def test_sections_and_slide_id_rule_match_their_declarations():
    import yaml

    from pathmil.config import SECTIONS, run_config_class
    from pathmil.ids import SLIDE_ID_PATTERN, SLIDE_ID_RULE

    assert tuple(run_config_class().model_fields) == SECTIONS
    cohort = yaml.safe_load((ROOT / "workflow" / "schemas" / "cohort.schema.yaml").read_text())
    assert cohort["properties"]["slide_id"]["pattern"] == SLIDE_ID_PATTERN
    assert cohort["properties"]["slide_id"]["description"] == SLIDE_ID_RULE


def test_defaults_are_written_once():
    """A default appears in its declaration only: the CLI's help derives from it, and the demo config and
    the workflow rules never restate one (a test of the places the settings issue counted)."""
    import re

    cli = (ROOT / "pathmil" / "cli.py").read_text()
    assert not re.search(r"help=\"[^\"]*\(default [0-9]", cli), "a --help string types a default"
    rules = "".join(p.read_text() for p in (ROOT / "workflow" / "rules").glob("*.smk"))
    assert not re.search(r"config\[[^]]+\]\.get\(\"[a-z_]+\", [^)]", rules), "a rule falls back to a default"


def test_every_command_builds_its_flags_from_declarations(capsys):
    from pathmil.cli import COMMANDS, build_parser

    for name in COMMANDS:
        parser = build_parser(name)
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        out = capsys.readouterr().out
        assert out.startswith("usage: pathmil"), name
    parser = build_parser("tile")
    with pytest.raises(SystemExit):
        parser.parse_args(["tile", "--help"])
    help_text = capsys.readouterr().out
    assert "tile resolution in um/px (default 0.5)" in help_text


def test_pathmil_config_defaults_load_back(tmp_path):
    import subprocess
    import sys

    import yaml

    from pathmil.config import run_config_class

    done = subprocess.run(
        [sys.executable, "-m", "pathmil", "config", "--defaults"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    defaults = yaml.safe_load(done.stdout)
    config = run_config_class().build(defaults)
    assert config.tile.target_mpp == 0.5 and config.train.lr == 2e-4 and config.extract.workers is None


def test_a_config_file_with_an_unknown_section_or_bad_yaml_is_one_line(tmp_path):
    (tmp_path / "typo.yaml").write_text("trian:\n  epochs: 3\n")
    with pytest.raises(PathmilError, match=r"unknown section 'trian'; sections: cohort, slides, tile"):
        load_settings(TileConfig, tmp_path / "typo.yaml")
    (tmp_path / "bad.yaml").write_text("tile:\n  tile_px: 256\n   min_tissue: 0.3\n")
    with pytest.raises(PathmilError, match=r"bad.yaml is not valid YAML at line 3, column"):
        load_settings(TileConfig, tmp_path / "bad.yaml")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--set", "lr=0"], "setting train.lr: Input should be greater than 0 (got 0)"),
        (["--set", "weight_decay=-1e-5"], "setting train.weight_decay: Input should be greater than or equal to 0"),
        (["--config", "typo.yaml"], "typo.yaml: unknown section 'trian'; sections: cohort, slides, tile"),
        (["--config", "bad.yaml"], "bad.yaml is not valid YAML at line 3, column"),
    ],
    ids=["lr", "weight-decay", "section", "yaml"],
)  # fmt: skip
def test_train_refuses_bad_settings_in_one_line_and_writes_nothing(
    tmp_path, capsys, monkeypatch, argv, message
):
    """Checked before anything runs: no torch traceback, no empty run folder, no silent 50 default epochs."""
    from pathmil.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "typo.yaml").write_text("trian:\n  epochs: 3\n")
    (tmp_path / "bad.yaml").write_text("train:\n  epochs: 3\n   lr: 0.1\n")
    args = [
        "train",
        "--features",
        "f",
        "--cohort",
        "c.csv",
        "--splits",
        "s.csv",
        "--fold",
        "0",
        "--out",
        "run",
    ]
    assert main([*args, *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()
