"""The embedded demo cohort: real pyramidal TIFFs with mpp, and a consistent table."""

import numpy as np
import openslide
import pandas as pd
import pytest

from pathmil.cli import main
from pathmil.demo import write_pyramidal_tiff
from pathmil.slide.reader import Slide
from pathmil.slide.tile import TileConfig, tile_slide
from pathmil.slide.tilefile import read_tiles


def test_demo_slides_open_in_openslide_with_mpp(demo_cohort):
    table = pd.read_csv(demo_cohort / "cohort.csv", dtype={"slide_id": str, "patient_id": str})
    assert len(table) == 8 and table["patient_id"].nunique() == 6
    for row in table.itertuples():
        handle = openslide.OpenSlide(str(demo_cohort / row.path))
        assert handle.level_count >= 2
        mpp = handle.properties.get("openslide.mpp-x")
        if pd.isna(row.mpp):
            assert float(mpp) in (0.25, 0.5)
        else:  # the one slide without resolution tags gets its mpp from the table
            assert mpp is None and row.mpp == 0.5


def test_demo_table_is_consistent(demo_cohort):
    table = pd.read_csv(demo_cohort / "cohort.csv", dtype={"slide_id": str, "patient_id": str})
    assert table["slide_id"].is_unique
    assert list(table.columns) == ["slide_id", "patient_id", "path", "mpp", "label", "time", "event", "stil"]
    per_patient = table.groupby("patient_id")[["label", "time", "event", "stil"]].nunique()
    assert (per_patient == 1).all().all()  # all slides of a patient carry the patient's labels
    assert (table.groupby("patient_id").size() > 1).any()  # some patients have two slides
    assert set(table["label"]) == {0, 1} and set(table["event"]) <= {0, 1}
    assert table["stil"].between(0, 100).all() and (table["time"] > 0).all()


def test_demo_labels_are_painted_into_the_tissue(demo_cohort, tmp_path):
    """High-grade slides have darker tumour nuclei: the darkest tiles differ between the classes."""
    table = pd.read_csv(demo_cohort / "cohort.csv")
    darkest = {}
    for row in table.itertuples():
        tiles_path = tmp_path / f"{row.slide_id}.h5"
        mpp = None if pd.isna(row.mpp) else row.mpp
        tile_slide(demo_cohort / row.path, tiles_path, TileConfig(preset="bwh_biopsy"), mpp=mpp)
        tiles = read_tiles(tiles_path)
        with Slide(demo_cohort / row.path, mpp=mpp) as slide:
            geometry = slide.tile_geometry(0.5, 256)
            darkness = [255 - slide.read_tile(x, y, geometry).mean() for x, y in tiles.coords[:60]]
        darkest[row.slide_id] = (row.label, np.percentile(darkness, 90))
    high = [d for label, d in darkest.values() if label == 1]
    low = [d for label, d in darkest.values() if label == 0]
    assert min(high) > max(low)


def test_demo_command(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--n-slides", "3", "--size", "1024", "1024"]) == 0
    table = pd.read_csv(tmp_path / "cohort.csv")
    assert len(table) == 3 and all((tmp_path / p).is_file() for p in table["path"])


def test_zlib_slides_are_lossless_and_keep_their_mpp(tmp_path):
    """`compression="zlib"` (for machines without imagecodecs) writes a pyramid OpenSlide reads back exactly."""
    rgb = np.random.default_rng(0).integers(0, 256, (1100, 1300, 3), dtype=np.uint8)
    write_pyramidal_tiff(tmp_path / "z.tiff", rgb, mpp=0.5, compression="zlib")
    handle = openslide.OpenSlide(str(tmp_path / "z.tiff"))
    assert handle.level_count == 2 and float(handle.properties["openslide.mpp-x"]) == 0.5
    level0 = np.asarray(handle.read_region((0, 0), 0, (1300, 1100)).convert("RGB"))
    assert np.array_equal(level0, rgb)
    with pytest.raises(ValueError, match="compression must be one of"):
        write_pyramidal_tiff(tmp_path / "w.tiff", rgb, mpp=0.5, compression="webp")
