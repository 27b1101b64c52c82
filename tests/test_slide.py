"""Stage 1: resolution handling, tissue segmentation, the tile grid, QC, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import openslide
import pandas as pd
import pytest

from pathmil.cli import main
from pathmil.errors import PathmilError, SlideError
from pathmil.slide.reader import MPP_RANGE, Slide, metadata_mpp, plausible_mpp
from pathmil.slide.tile import TileConfig, tile_slide
from pathmil.slide.tilefile import read_tiles
from pathmil.slide.tiling import grid_positions, tile_grid
from pathmil.slide.tissue import TissueConfig, TissueMask, segment_tissue


def saturation(rgb: np.ndarray) -> float:
    return float(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].mean())


# ------------------------------------------------------------------------------------ mpp and levels


def test_mpp_from_metadata_and_placeholders():
    assert metadata_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.27"}) == (0.25, 0.27)  # both axes
    assert metadata_mpp({"openslide.mpp-y": "0.5"}) == (0.5, 0.5)
    assert metadata_mpp({}) is None and metadata_mpp({"openslide.mpp-x": "nan"}) is None
    # 72 dpi, 300 dpi and 1 pixel/cm written by generic TIFF writers, and nonsense below 0.05, are no scans
    for placeholder in (352.77777983377013, 84.67, 10_000.0, 0.01):
        assert not plausible_mpp(placeholder)
    assert plausible_mpp(0.05) and plausible_mpp(0.2465) and plausible_mpp(10.0)


def test_mpp_bounds_are_the_cohort_schemas_and_the_settings():
    """One range for the metadata, the table's mpp column (its schema checks it when the workflow parses)
    and tile.default_mpp."""
    import yaml

    from pathmil.config import workflow_schema

    root = Path(__file__).resolve().parents[1]
    column = yaml.safe_load((root / "workflow" / "schemas" / "cohort.schema.yaml").read_text())["properties"]
    assert (column["mpp"]["minimum"], column["mpp"]["maximum"]) == MPP_RANGE
    setting = workflow_schema()["properties"]["tile"]["properties"]["default_mpp"]["anyOf"][0]
    assert (setting["minimum"], setting["maximum"]) == MPP_RANGE
    assert TileConfig(default_mpp=0.25).default_mpp == 0.25
    with pytest.raises(ValueError):
        TileConfig(default_mpp=352.8)


def test_level_arithmetic_on_a_40x_pyramid(demo_cohort):
    table = pd.read_csv(demo_cohort / "cohort.csv")
    path = demo_cohort / table.loc[3, "path"]  # every fourth demo slide is scanned at 0.25 um/px
    with Slide(path) as slide:
        assert slide.mpp == pytest.approx(0.25) and slide.mpp_source == "metadata"
        assert slide.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0))
        assert slide.level_for_mpp(0.25) == 0
        assert slide.level_for_mpp(0.5) == 1
        assert slide.level_for_mpp(0.505) == 1  # within rounding tolerance
        assert slide.level_for_mpp(1.0) == 2
        assert slide.level_for_mpp(0.7) == 1  # the coarsest level still finer than the target
        geometry = slide.tile_geometry(0.5, 256)
        assert (geometry.level, geometry.read_px, geometry.patch_size_level0) == (1, 256, 512)
        geometry = slide.tile_geometry(0.3, 256)
        assert (geometry.level, geometry.read_px) == (0, 307)
        geometry = slide.tile_geometry(0.2, 256)  # finer than the scan: read at level 0, upsample
        assert (geometry.level, geometry.read_px) == (0, 205)
        tile = slide.read_tile(1024, 1024, slide.tile_geometry(0.7, 224))
        assert tile.shape == (224, 224, 3) and tile.dtype == np.uint8


def test_non_integer_downsamples_and_mpp_argument(slides_dir):
    with Slide(slides_dir / "boxes.tiff", mpp=0.25) as slide:  # metadata says 72 dpi: ignored
        assert slide.mpp_source == "argument" and slide.mpp == 0.25 and slide.mpp_xy == (0.25, 0.25)
        assert "states 352.778 um/px, which is no plausible scan resolution" in slide.mpp_note
        assert slide.level_downsamples[2] == pytest.approx(4.016, abs=1e-3)
        geometry = slide.tile_geometry(1.0, 256)
        assert geometry.level == 2  # 1.004 um/px is within tolerance of 1.0
        assert geometry.read_px == round(256 * 1.0 / 0.25 / slide.level_downsamples[2])


def test_table_mpp_for_slide_without_metadata(demo_cohort):
    table = pd.read_csv(demo_cohort / "cohort.csv")
    row = table[table["mpp"].notna()].iloc[0]
    with pytest.raises(SlideError, match="no microns-per-pixel"):
        Slide(demo_cohort / row["path"])
    with Slide(demo_cohort / row["path"], mpp=row["mpp"], mpp_source="table") as slide:
        assert slide.mpp == row["mpp"] and slide.mpp_source == "table" and slide.mpp_note is None
    with pytest.raises(
        SlideError,
        match=r"mpp 500 um/px from the cohort table's 'mpp' column lies outside the plausible 0\.05-20",
    ):
        Slide(demo_cohort / row["path"], mpp=500.0, mpp_source="table")


def test_dicom_and_svs_open_with_mpp(slides_dir):
    for name in ("boxes_0.dcm", "small.svs"):
        with Slide(slides_dir / name) as slide:
            assert slide.mpp == pytest.approx(0.499)


# ----------------------------------------------------------------------------------- segmentation


def test_grid_positions_and_overlap():
    """The grid covers the slide: the last tile may cross the edge (padded), none starts beyond it."""
    assert grid_positions(1000, 256, 256).tolist() == [0, 256, 512, 768]  # 768 + 256 > 1000: padded
    assert grid_positions(1024, 256, 256).tolist() == [0, 256, 512, 768]  # exactly covered
    assert grid_positions(1000, 256, 128).tolist() == [0, 128, 256, 384, 512, 640, 768]
    assert grid_positions(256, 256, 256).tolist() == [0]
    assert grid_positions(100, 256, 256).tolist() == []  # shorter than a tile


def test_tile_grid_fractions_from_a_known_mask():
    mask = np.zeros((40, 40), np.uint8)
    mask[:20, :20] = 1  # top-left quarter at downsample 10 -> level-0 square 0..200
    tissue = TissueMask(mask=mask, contours=[], holes=[], downsample=10)
    coords, fractions = tile_grid(tissue, (400, 400), size0=100, overlap=0.0, min_tissue=0.25)
    assert sorted(map(tuple, coords.tolist())) == [(0, 0), (0, 100), (100, 0), (100, 100)]
    assert np.allclose(fractions, 1.0)
    coords, fractions = tile_grid(tissue, (400, 400), size0=100, overlap=0.5, min_tissue=0.5)
    found = dict(zip(map(tuple, coords.tolist()), fractions.tolist()))
    assert found[(150, 100)] == pytest.approx(0.5)  # half of this tile is tissue
    assert (150, 150) not in found  # a quarter only
    assert len(found) == 9 + 3 + 3


def test_tiles_crossing_the_edge_count_the_part_beyond_as_glass():
    mask = np.ones((35, 35), np.uint8)  # all tissue, 350 level-0 px at downsample 10
    tissue = TissueMask(mask=mask, contours=[], holes=[], downsample=10)
    coords, fractions = tile_grid(tissue, (350, 350), size0=(100, 200), overlap=0.0, min_tissue=0.0)
    found = dict(zip(map(tuple, coords.tolist()), fractions.tolist()))
    assert sorted({x for x, _ in found}) == [0, 100, 200, 300] and sorted({y for _, y in found}) == [0, 200]
    assert found[(0, 0)] == 1.0 and found[(300, 0)] == pytest.approx(0.5)  # 50 of 100 px inside
    assert found[(0, 200)] == pytest.approx(0.75) and found[(300, 200)] == pytest.approx(0.5 * 0.75)
    coords, _ = tile_grid(tissue, (350, 350), size0=(100, 200), overlap=0.0, min_tissue=0.6)
    assert (300, 0) not in map(tuple, coords.tolist())  # half glass beyond the edge: below min_tissue


def test_pen_marks_and_black_border_removed():
    rng = np.random.default_rng(0)
    image = np.full((400, 400, 3), 240, np.uint8)
    image[50:350, 50:350] = np.array([200, 120, 180]) + rng.integers(-10, 10, (300, 300, 3))  # tissue
    image[100:115, 20:380] = (30, 60, 200)  # blue pen stroke across the tissue
    image[:, 385:] = rng.integers(0, 40, (400, 15, 3))  # black scanner border: dark, noisy, saturated
    plain = segment_tissue(image, 1.0, TissueConfig(a_t=0.01, a_h=0.01, close=0), pixel_um2=1.0)
    cleaned = segment_tissue(
        image, 1.0, TissueConfig(a_t=0.01, a_h=0.01, close=0, remove_artifacts=True), pixel_um2=1.0
    )
    assert plain.mask[105, 200] == 1 and plain.mask[200, 390] == 1  # plain CLAM keeps ink and border
    assert cleaned.mask[105, 200] == 0 and cleaned.mask[200, 390] == 0
    assert cleaned.mask[200, 200] == 1  # the tissue stays


def test_otsu_and_holes():
    image = np.full((300, 300, 3), 245, np.uint8)
    image[30:270, 30:270] = (190, 100, 170)
    image[120:180, 120:180] = 245  # a hole in the tissue
    tissue = segment_tissue(
        image, 1.0, TissueConfig(use_otsu=True, a_t=0.01, a_h=0.001, close=0), pixel_um2=1.0
    )
    assert len(tissue.contours) == 1 and len(tissue.holes[0]) == 1
    assert tissue.mask[150, 150] == 0 and tissue.mask[60, 60] == 1


# --------------------------------------------------------------------------------- the real slide


def test_real_he_slide_kept_tiles_are_tissue(slides_dir, tmp_path):
    """Default settings tile the real H&E biopsy region (0.61 mm^2 of tissue): CLAM's tcga preset, counting
    areas in 512 px patches of level 0, dropped it whole; CLAM's bwh_biopsy kept 44 tiles."""
    out = tmp_path / "cmu.h5"
    qc = tmp_path / "cmu.png"
    config = TileConfig()
    facts = tile_slide(slides_dir / "cmu_small_region.svs", out, config, qc=qc)
    tiles = read_tiles(out)
    assert facts["n_tiles"] == len(tiles.coords) >= 44
    assert facts["preset"] == "pathmil" and facts["warnings"] == [] and facts["n_edge_tiles"] > 0
    assert facts["mpp_source"] == "metadata" and facts["mpp"] == pytest.approx(0.499)
    kept = {tuple(c) for c in tiles.coords.tolist()}
    size0 = tiles.coords_attrs["patch_size_level0"]
    with Slide(slides_dir / "cmu_small_region.svs") as slide:
        geometry = slide.tile_geometry(0.5, 256)
        grid = [
            (x, y)
            for y in grid_positions(slide.dimensions[1], geometry.size_level0[1], geometry.size_level0[1])
            for x in grid_positions(slide.dimensions[0], geometry.size_level0[0], geometry.size_level0[0])
        ]
        sat = {xy: saturation(slide.read_tile(*xy, geometry)) for xy in grid}
    kept_sat = [s for xy, s in sat.items() if xy in kept]
    rejected_sat = [s for xy, s in sat.items() if xy not in kept]
    assert len(kept_sat) == len(kept) and rejected_sat  # every kept tile is on the grid
    # kept tiles are stained tissue, rejected ones mostly glass
    assert np.median(kept_sat) > 3 * np.median(rejected_sat)
    assert min(kept_sat) > np.median(rejected_sat)
    assert size0 == 257  # 256 px at 0.5 um/px on a 0.499 um/px scan
    picture = cv2.imread(str(qc))
    assert picture is not None and picture.shape[0] > 500
    assert json.loads((tmp_path / "cmu.json").read_text())["n_tiles"] == len(kept)


def test_attributes_for_clam_and_trident_readers(slides_dir, tmp_path):
    out = tmp_path / "t.h5"
    tile_slide(
        slides_dir / "cmu_small_region.svs", out, TileConfig(preset="bwh_biopsy", target_mpp=1.0, tile_px=128)
    )
    with h5py.File(out, "r") as f:
        coords = f["coords"]
        assert coords.dtype == np.int64 and coords.shape[1] == 2
        attrs = dict(coords.attrs)
        x, y = coords[0]
    for key in (
        "patch_size",
        "patch_level",
        "patch_size_level0",
        "level0_width",
        "level0_height",
        "target_mpp",
        "level0_magnification",
    ):
        assert key in attrs, key
    # CLAM reads patch_size pixels at patch_level from each coordinate
    handle = openslide.OpenSlide(str(slides_dir / "cmu_small_region.svs"))
    region = handle.read_region((int(x), int(y)), int(attrs["patch_level"]), (int(attrs["patch_size"]),) * 2)
    assert region.size == (257, 257)  # 128 px at 1.0 um/px, read at level 0 of a 0.499 um/px scan
    # TRIDENT: level-0 footprint and slide size
    assert attrs["patch_size_level0"] == 257
    assert (attrs["level0_width"], attrs["level0_height"]) == handle.dimensions
    assert attrs["level0_magnification"] == 20


# -------------------------------------------------------------------------------------- bad input


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["tile", *map(str, args)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "extra", "message"),
    [
        ("unopenable.tiff", [], "OpenSlide cannot open unopenable.tiff: Unsupported TIFF compression"),
        ("unreadable.svs", ["--tile-px", "8"], "cannot read region"),
        (
            "boxes.tiff",
            ["--mpp", "0.5", "--tile-px", "128", "--min-tissue", "0.9"],
            "no 128 px tile at 0.5 um/px has at least 90% tissue (the tissue found covers 54.2% of the slide",
        ),
        (
            "boxes.tiff",
            [],
            "its metadata states 352.778 um/px, which is no plausible scan resolution (0.05-20 um/px; "
            "10,000 is a TIFF written at 1 pixel/cm, 352.8 one at 72 dpi); give it in the cohort table's "
            "'mpp' column, with --mpp or as tile.default_mpp",
        ),
        (
            "small.svs",
            [],
            "the slide is 16 x 16 px (7.984 x 7.984 um at 0.499 um/px), smaller than one tile of 256 px at "
            "0.5 um/px (128 x 128 um, 256.5 x 256.5 slide px); use a smaller --tile-px or --target-mpp",
        ),
        ("missing.svs", [], "does not exist"),
    ],
)
def test_bad_slides_fail_with_one_line_and_no_output(capsys, slides_dir, tmp_path, name, extra, message):
    out = tmp_path / "out.h5"
    code, err = run_cli(capsys, slides_dir / name, "--out", out, "--qc", tmp_path / "qc.png", *extra)
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"pathmil: error: slide {name.split('.')[0]}: ")
    assert message in err
    assert list(tmp_path.iterdir()) == []  # no partial output, no temporary left behind


def test_empty_and_truncated_files(capsys, slides_dir, tmp_path):
    empty = tmp_path / "empty.svs"
    empty.write_bytes(b"")
    code, err = run_cli(capsys, empty, "--out", tmp_path / "a.h5")
    assert code == 1 and "is empty" in err
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes((slides_dir / "cmu_small_region.svs").read_bytes()[:400_000])
    code, err = run_cli(capsys, truncated, "--out", tmp_path / "b.h5")
    assert code == 1 and err.startswith("pathmil: error: slide truncated: ") and err.count("\n") == 1
    assert not (tmp_path / "a.h5").exists() and not (tmp_path / "b.h5").exists()


def test_batch_records_failures_and_goes_on(capsys, slides_dir, demo_cohort, tmp_path):
    good = pd.read_csv(demo_cohort / "cohort.csv").head(2)
    good["path"] = [str(demo_cohort / p) for p in good["path"]]
    bad = pd.DataFrame(
        {
            "slide_id": ["unreadable", "unopenable"],
            "path": [str(slides_dir / "unreadable.svs"), str(slides_dir / "unopenable.tiff")],
        }
    )
    cohort = tmp_path / "cohort.csv"
    pd.concat([good, bad]).to_csv(cohort, index=False)
    out = tmp_path / "tiles"
    args = [
        "tile",
        "--cohort",
        str(cohort),
        "--out-dir",
        str(out),
        "--qc-dir",
        str(tmp_path / "qc"),
        "--preset",
        "bwh_biopsy",
    ]
    assert main(args) == 1
    assert main([*args, "--skip-errors"]) == 0
    failures = pd.read_csv(out / "failures.csv")
    assert sorted(failures["slide_id"]) == ["unopenable", "unreadable"]
    assert all(failures["stage"] == "tile") and failures["error"].str.startswith("slide ").all()
    for slide_id in good["slide_id"]:
        assert read_tiles(out / f"{slide_id}.h5").coords.shape[0] > 0
        assert (tmp_path / "qc" / f"{slide_id}.png").is_file()
    assert not (out / "unreadable.h5").exists()


def test_single_slide_skip_errors_records_failed_facts(slides_dir, tmp_path):
    facts = tmp_path / "x.json"
    assert (
        main(
            [
                "tile",
                str(slides_dir / "unopenable.tiff"),
                "--out",
                str(tmp_path / "x.h5"),
                "--facts",
                str(facts),
                "--skip-errors",
            ]
        )
        == 0
    )
    record = json.loads(facts.read_text())
    assert record["status"] == "failed" and "Unsupported TIFF compression" in record["error"]
    # the declared outputs are stand-ins that say why: the tiles file a record readers refuse, the GeoJSON
    # without features
    with pytest.raises(
        PathmilError, match="records that the slide's tiling failed: slide unopenable: OpenSlide cannot"
    ):
        read_tiles(tmp_path / "x.h5")
    outline = json.loads((tmp_path / "x.geojson").read_text())
    assert outline["features"] == [] and outline["pathmil"]["status"] == "failed"


def test_slide_directory_groups_dicom_series(slides_dir, tmp_path):
    from pathmil.cohort import cohort_from_dir

    for name in ("boxes_0.dcm", "boxes_1.dcm", "small.svs"):
        shutil.copy(slides_dir / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a slide")
    table = cohort_from_dir(tmp_path)
    assert sorted(table["slide_id"]) == ["boxes_0", "small"]  # one DICOM series, one SVS


def test_single_level_slide_thumbnail_read_in_strips(slides_dir):
    """A slide without a pyramid is shrunk strip by strip; the result equals shrinking it whole."""
    with Slide(slides_dir / "cmu_small_region.svs") as slide:
        whole = slide.read_level(0)
        strips, downsample = slide.read_thumbnail(8, max_direct_px=1000)
        direct, direct_ds = slide.read_thumbnail(8)  # small enough to be read whole
    assert direct_ds == 1.0 and direct.shape == whole.shape
    height, width = whole.shape[0] // 8, whole.shape[1] // 8
    assert strips.shape == (height, width, 3)
    assert downsample == pytest.approx(slide.dimensions[0] / width)
    expected = cv2.resize(whole[: height * 8, : width * 8], (width, height), interpolation=cv2.INTER_AREA)
    assert np.abs(strips.astype(int) - expected.astype(int)).max() <= 1
