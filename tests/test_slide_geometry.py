"""Slide geometry in physical units: 20x and 40x scans keep the same tissue, non-square pixels give square
tiles, tiles crossing the slide's edge are white beyond it in tiling, extraction and heatmaps, and the tissue
outline goes out as GeoJSON and comes back in as a given mask. Slides are small synthetic TIFFs."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from pathmil.cli import main
from pathmil.demo import write_pyramidal_tiff
from pathmil.errors import PathmilError
from pathmil.slide.reader import Slide
from pathmil.slide.tile import TileConfig, compute_tiles, tile_cohort, tile_slide
from pathmil.slide.tilefile import read_tiles

PINK = (200, 110, 175)  # stained tissue: high saturation
GLASS = 244


def tissue_image(shape: tuple[int, int], boxes: list[tuple[int, int, int, int]], holes=()) -> np.ndarray:
    """An RGB picture of glass with tissue boxes (x0, y0, x1, y1) and glass holes inside them."""
    rgb = np.full((*shape, 3), GLASS, np.uint8)
    for x0, y0, x1, y1 in boxes:
        rgb[y0:y1, x0:x1] = PINK
    for x0, y0, x1, y1 in holes:
        rgb[y0:y1, x0:x1] = GLASS
    return rgb


# At 0.5 um/px (1024 x 1024 px, 512 um): A a 256 um square with a 140 um hole (net 0.046 mm^2), B a 160 um
# square (0.0256 mm^2), C a 50 um speck (0.0025 mm^2). A default tile is 128 um (0.0164 mm^2).
PIECES = [(64, 64, 576, 576), (640, 640, 960, 960), (700, 100, 800, 200)]
HOLE = (180, 180, 460, 460)


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    """The same tissue scanned at 20x (0.5 um/px) and at 40x (0.25 um/px, a resampled copy)."""
    folder = tmp_path_factory.mktemp("scans")
    rgb = tissue_image((1024, 1024), PIECES, [HOLE])
    write_pyramidal_tiff(folder / "x20.tiff", rgb, 0.5, compression="zlib")
    big = cv2.resize(rgb, (2048, 2048), interpolation=cv2.INTER_NEAREST)
    write_pyramidal_tiff(folder / "x40.tiff", big, 0.25, compression="zlib")
    return {"x20": folder / "x20.tiff", "x40": folder / "x40.tiff"}


def tiles_in_um(path: Path, config: TileConfig) -> tuple[set[tuple[int, int]], dict]:
    with Slide(path) as slide:
        result = compute_tiles(slide, config, qc=False)
        coords = result.tiles.coords * slide.mpp
    return {tuple(c) for c in np.round(coords).astype(int).tolist()}, result.facts


@pytest.mark.parametrize("preset", ["pathmil", "tcga"])
def test_20x_and_40x_scans_keep_the_same_pieces_and_tiles(scans, preset):
    """Areas are um^2: both scans keep A and B and drop the speck. CLAM counts 512 px patches of level 0,
    so its filter is 4x larger in um^2 on the 20x scan (its default preset keeps A and B at 40x and nothing
    at 20x). CLAM's tcga preset (0.26 mm^2) keeps no piece: then those that can hold a tile stay, with a
    warning."""
    config = TileConfig(preset=preset)
    at20, facts20 = tiles_in_um(scans["x20"], config)
    at40, facts40 = tiles_in_um(scans["x40"], config)
    assert at20 == at40 and len(at20) >= 5
    assert facts20["n_tissue_regions"] == facts40["n_tissue_regions"] == 2
    assert facts20["tissue_fraction"] == pytest.approx(facts40["tissue_fraction"], abs=0.01)
    # no tile lies on the speck C (x 350-400 um, y 50-100 um): its grid cell is tile (256, 0) um
    assert (256, 0) not in at20
    if preset == "pathmil":
        assert facts20["warnings"] == facts40["warnings"] == []
    else:
        for facts in (facts20, facts40):
            (warning,) = facts["warnings"]
            assert warning.startswith(
                "no tissue piece reaches a_t = 16 reference patches (0.262 mm^2); kept "
            )
            assert "the 2 of 3 pieces that can hold a tile (0.0164 mm^2 or more)" in warning


def test_a_piece_with_a_hole_goes_out_as_geojson_in_level0_pixels(scans, tmp_path):
    facts = tile_slide(scans["x40"], tmp_path / "t.h5", TileConfig(), qc=tmp_path / "qc.png")
    outline = json.loads((tmp_path / "t.geojson").read_text())
    assert facts["tissue_geojson"] == str(tmp_path / "t.geojson") and facts["mask_source"] == "automatic"
    assert outline["type"] == "FeatureCollection" and len(outline["features"]) == 2
    assert outline["pathmil"]["slide_id"] == "x40" and outline["pathmil"]["level0_size"] == [2048, 2048]
    by_size = sorted(outline["features"], key=lambda f: -len(f["geometry"]["coordinates"]))
    ring_piece, square = by_size
    assert all(f["properties"]["classification"]["name"] == "Tissue" for f in by_size)
    assert ring_piece["geometry"]["type"] == "Polygon" and len(ring_piece["geometry"]["coordinates"]) == 2
    exterior, hole = (np.array(r) for r in ring_piece["geometry"]["coordinates"])
    # level-0 pixels of the 40x scan (twice the 20x boxes), to the segmentation level's 4 px
    assert np.allclose([exterior.min(0), exterior.max(0)], [[128, 128], [1152, 1152]], atol=6)
    assert np.allclose([hole.min(0), hole.max(0)], [[360, 360], [920, 920]], atol=6)
    assert (exterior[0] == exterior[-1]).all() and len(square["geometry"]["coordinates"]) == 1

    def signed_area(ring: np.ndarray) -> float:
        return 0.5 * float(np.sum(ring[:-1, 0] * ring[1:, 1] - ring[1:, 0] * ring[:-1, 1]))

    assert signed_area(exterior) > 0 > signed_area(hole)  # RFC 7946: exterior counter-clockwise, holes not
    # the hole is no tissue: no tile lies wholly inside it (level-0 x, y 360-920 at 40x: 512 px tiles)
    tiles = read_tiles(tmp_path / "t.h5")
    inside = (tiles.coords >= 360).all(1) & (tiles.coords + 512 <= 920).all(1)
    assert not inside.any()


def test_a_given_outline_replaces_the_automatic_mask(scans, tmp_path):
    """The written GeoJSON given back yields the same tiles; a corrected one (piece B only) yields B's."""
    automatic = tile_slide(scans["x20"], tmp_path / "auto.h5", TileConfig(), qc=tmp_path / "auto.png")
    back = tile_slide(
        scans["x20"], tmp_path / "back.h5", TileConfig(), slide_id="x20", tissue=tmp_path / "auto.geojson"
    )
    assert back["mask_source"] == "given" and back["mask_file"] == str(tmp_path / "auto.geojson")
    np.testing.assert_array_equal(
        read_tiles(tmp_path / "back.h5").coords, read_tiles(tmp_path / "auto.h5").coords
    )
    outline = json.loads((tmp_path / "auto.geojson").read_text())
    only_b = {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
        [[[640, 640], [960, 640], [960, 960], [640, 960], [640, 640]]]]}}  # fmt: skip
    given = tmp_path / "corrected" / "b.geojson"
    given.parent.mkdir()
    given.write_text(json.dumps(only_b))
    args = ["tile", str(scans["x20"]), "--qc", str(tmp_path / "b.png"), "--tissue-geojson", str(given)]
    assert main([*args, "--out", str(given.with_suffix(".h5"))]) == 1  # would write over the given file
    assert sorted(p.name for p in given.parent.iterdir()) == ["b.geojson"]
    assert main([*args, "--out", str(tmp_path / "b.h5")]) == 0
    facts = json.loads((tmp_path / "b.json").read_text())
    assert facts["mask_source"] == "given" and automatic["n_tiles"] > facts["n_tiles"] > 0
    coords = read_tiles(tmp_path / "b.h5").coords
    assert ((coords + 256 > 640) & (coords < 960)).all()  # every tile touches B
    assert json.loads(given.read_text()) == only_b  # the given file is left alone
    assert len(json.loads((tmp_path / "b.geojson").read_text())["features"]) == 1  # the outline used
    assert len(outline["features"]) == 2
    # the QC picture's caption band names the mask's source: it differs between the two
    auto_qc, given_qc = (cv2.imread(str(tmp_path / f"{n}.png")) for n in ("auto", "b"))
    assert auto_qc.shape[0] > 512 and auto_qc.shape[1] == 512  # 1024 px at downsample 2, and the band
    assert (auto_qc[512:] < 100).any() and not np.array_equal(auto_qc[512:], given_qc[512:])


def test_outlines_from_the_table_column_or_a_folder(scans, tmp_path):
    square_b = {
        "type": "Polygon",
        "coordinates": [[[640, 640], [960, 640], [960, 960], [640, 960], [640, 640]]],
    }
    (tmp_path / "outlines").mkdir()
    (tmp_path / "outlines" / "x20.geojson").write_text(json.dumps(square_b))
    (tmp_path / "mine.geojson").write_text(json.dumps(square_b))
    table = pd.DataFrame({"slide_id": ["x20", "x40"], "path": [str(scans["x20"]), str(scans["x40"])]})
    folder = tile_cohort(
        table, tmp_path / "a", TileConfig(tissue_dir=str(tmp_path / "outlines")), progress=False
    )
    assert folder.set_index("slide_id")["mask_source"].to_dict() == {"x20": "given", "x40": "automatic"}
    cohort = tmp_path / "cohort.csv"
    table.assign(tissue=["", "mine.geojson"]).to_csv(cohort, index=False)  # relative to the table's folder
    assert main(["tile", "--cohort", str(cohort), "--out-dir", str(tmp_path / "b")]) == 0
    facts = {s: json.loads((tmp_path / "b" / f"{s}.json").read_text()) for s in ("x20", "x40")}
    assert facts["x20"]["mask_source"] == "automatic" and facts["x40"]["mask_source"] == "given"
    assert facts["x40"]["mask_file"] == str(tmp_path / "mine.geojson")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "is not JSON (line 1: Expecting property name"),
        (json.dumps({"type": "Point", "coordinates": [5, 5]}), "a Point geometry has no area"),
        (json.dumps({"type": "Polygon", "coordinates": [[[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]]}),
         "no polygon lies on slide x20 (1024 x 1024 level-0 px)"),
        (json.dumps({"type": "FeatureCollection", "features": [], "pathmil": {"slide_id": "other"}}),
         "was written for slide other, not x20"),
        (json.dumps({"type": "FeatureCollection", "features": []}), "holds no polygon"),
        (json.dumps({"type": "Polygon", "coordinates": [[1, 2, 3]]}), "malformed coordinates (a ring of shape (3,))"),
    ],
    ids=["not-json", "point", "outside", "other-slide", "empty", "malformed"],
)  # fmt: skip
def test_bad_outlines_are_one_line(scans, tmp_path, capsys, content, message):
    given = tmp_path / "given.geojson"
    given.write_text(content)
    out = tmp_path / "t.h5"
    assert main(["tile", str(scans["x20"]), "--out", str(out), "--tissue-geojson", str(given)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pathmil: error: slide x20: tissue file {given}") and err.count("\n") == 1, err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["given.geojson"]


def test_non_square_pixels_give_square_tiles(tmp_path):
    """0.25 um/px across, 0.5 down (TIFF resolution tags, which OpenSlide reads as mpp-x and mpp-y): a
    tissue disc of 100 um stays round in the tile (reading as many pixels across as down, as with the mean
    mpp, stretched it 2:1)."""
    from pathmil.features.encoders import Preprocess
    from pathmil.features.extract import TileBatches

    rgb = np.full((512, 1024, 3), GLASS, np.uint8)  # 256 um x 256 um
    cv2.ellipse(rgb, (256, 128), (200, 100), 0, 0, 360, PINK, -1)  # radius 50 um, centred in tile (0, 0)
    path = tmp_path / "ns.tiff"
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(256, 256), compression="zlib", photometric="rgb",
                  resolution=(1e4 / 0.25, 1e4 / 0.5), resolutionunit="CENTIMETER")  # fmt: skip
    config = TileConfig(target_mpp=1.0, tile_px=128)  # 128 um tiles: 512 x 256 level-0 px
    facts = tile_slide(path, tmp_path / "ns.h5", config)
    tiles = read_tiles(tmp_path / "ns.h5")
    assert (facts["slide_mpp_x"], facts["slide_mpp_y"]) == (0.25, 0.5) and facts["read_size"] == [512, 256]
    assert (tiles.coords_attrs["slide_mpp_x"], tiles.coords_attrs["slide_mpp_y"]) == (0.25, 0.5)
    assert tiles.read_size == (512, 256) and list(tiles.coords_attrs["patch_size_level0_xy"]) == [512, 256]
    assert [0, 0] in tiles.coords.tolist()
    with Slide(path) as slide:
        tile = slide.read_tile(0, 0, slide.tile_geometry(1.0, 128))
    reader = TileBatches(path, "ns", None, tiles, Preprocess(input_px=128, resize_px=128))
    extracted = reader.read(tiles.coords.tolist().index([0, 0]))
    for image in (tile, extracted):
        disc = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV)[..., 1] > 60
        rows, cols = np.flatnonzero(disc.any(1)), np.flatnonzero(disc.any(0))
        width, height = cols.max() - cols.min() + 1, rows.max() - rows.min() + 1
        assert width == pytest.approx(100, abs=3) and height == pytest.approx(100, abs=3)  # 100 um, 1 um/px


EDGE = 700  # a 350 um slide at 0.5 um/px: 256 px tiles at 0, 256, 512; the last crosses the edge by 68 px


@pytest.fixture(scope="module")
def edge_slide(tmp_path_factory) -> Path:
    """Tissue in the bottom-right corner (x, y >= 300 px), cut by the slide's right and bottom edges."""
    path = tmp_path_factory.mktemp("edge") / "edge.tiff"
    write_pyramidal_tiff(path, tissue_image((EDGE, EDGE), [(300, 300, EDGE, EDGE)]), 0.5, compression="zlib")
    return path


def test_tissue_cut_by_the_edge_is_tiled_and_white_beyond_it_everywhere(edge_slide, tmp_path):
    """The corner tile (512, 512) is 188 x 188 px of tissue and white beyond the edge, read alike by tiling,
    extraction and the heatmap's montage (CLAM's extractor would pad it black)."""
    from pathmil.evaluation.heatmap import TileLayout, montage_tiles
    from pathmil.features.encoders import Preprocess
    from pathmil.features.extract import TileBatches

    facts = tile_slide(edge_slide, tmp_path / "e.h5", TileConfig(), qc=tmp_path / "e.png")
    tiles = read_tiles(tmp_path / "e.h5")
    kept = tiles.coords.tolist()
    assert [512, 512] in kept and [512, 256] in kept and [256, 512] in kept
    assert facts["n_edge_tiles"] == 3 and facts["edge"] == "white"
    corner = kept.index([512, 512])
    assert tiles.tissue_fraction[corner] == pytest.approx((188 / 256) ** 2, abs=0.03)  # beyond: no tissue
    with Slide(edge_slide) as slide:
        tiled = slide.read_tile(512, 512, slide.tile_geometry(0.5, 256))
        top, _ = montage_tiles(slide, TileLayout(tiles.coords.astype(float), 256.0),
                               (np.arange(len(kept)) == corner).astype(float), k=1, px=256)  # fmt: skip
    extracted = TileBatches(edge_slide, "edge", None, tiles, Preprocess(256, 256)).read(corner)
    assert (tiled[:, 188:] == 255).all() and (tiled[188:, :] == 255).all()
    assert np.abs(tiled[:180, :180].astype(int) - PINK).max() < 3
    assert np.array_equal(extracted, tiled) and np.array_equal(top[0].image, tiled)


def test_slides_without_tissue_or_with_a_placeholder_resolution(tmp_path, capsys):
    blank = tmp_path / "blank.tiff"
    write_pyramidal_tiff(blank, np.full((600, 600, 3), GLASS, np.uint8), 0.5, compression="zlib")
    assert main(["tile", str(blank), "--out", str(tmp_path / "b.h5")]) == 1
    assert (
        "no tissue found (no saturation above sthresh=8); if the slide holds tissue"
        in capsys.readouterr().err
    )
    per_cm = tmp_path / "per_cm.tiff"  # 1 pixel/cm: OpenSlide says 10,000 um/px
    with tifffile.TiffWriter(per_cm) as tif:
        tif.write(tissue_image((600, 600), [(0, 0, 600, 600)]), tile=(256, 256), compression="zlib",
                  photometric="rgb", resolution=(1, 1), resolutionunit="CENTIMETER")  # fmt: skip
    assert main(["tile", str(per_cm), "--out", str(tmp_path / "c.h5")]) == 1
    err = capsys.readouterr().err
    assert "slide per_cm: its metadata states 10000 um/px, which is no plausible scan resolution" in err
    assert err.count("\n") == 1 and "'mpp' column, with --mpp or as tile.default_mpp" in err
    # the facts and the warning name where the um/px came from: the table (the workflow passes its `mpp`
    # column as --table-mpp, which wins over --mpp as in batch mode), --mpp, or tile.default_mpp
    for flags, source, used in [
        (["--mpp", "0.5"], "argument", "used 0.5 um/px from --mpp"),
        (["--table-mpp", "0.4", "--mpp", "0.5"], "table", "used 0.4 um/px from the cohort table's 'mpp' column"),
        (["--set", "default_mpp=0.5"], "default", "used 0.5 um/px from tile.default_mpp"),
    ]:  # fmt: skip
        assert main(["tile", str(per_cm), "--out", str(tmp_path / "c.h5"), *flags]) == 0
        facts = json.loads((tmp_path / "c.json").read_text())
        assert facts["mpp_source"] == source and facts["slide_mpp"] == float(used.split()[1])
        assert (
            facts["warnings"][0].startswith("its metadata states 10000 um/px")
            and used in facts["warnings"][0]
        )
        assert used in capsys.readouterr().err  # the log says it too
    # a plausible metadata value wins; a given value that disagrees with it by more than 10 % is named
    tagged = tmp_path / "tagged.tiff"
    write_pyramidal_tiff(tagged, tissue_image((600, 600), [(0, 0, 600, 600)]), 0.5, compression="zlib")
    for flags, warned in [
        (["--table-mpp", "0.25"], "the cohort table's 'mpp' column gives 0.25 um/px but the slide's metadata "
                                  "states 0.5 um/px; the metadata's value is used"),
        (["--mpp", "1.0"], "--mpp gives 1 um/px but the slide's metadata states 0.5 um/px"),
        (["--table-mpp", "0.52"], None),  # within 10 %: a rounding, not a disagreement
        (["--set", "default_mpp=0.25"], None),  # the default is a fallback by design
    ]:  # fmt: skip
        assert main(["tile", str(tagged), "--out", str(tmp_path / "t.h5"), *flags]) == 0
        facts = json.loads((tmp_path / "t.json").read_text())
        assert facts["mpp_source"] == "metadata" and facts["slide_mpp"] == 0.5
        named = [w for w in facts["warnings"] if "metadata states" in w]
        assert named[0].startswith(warned) if warned else not named, (flags, facts["warnings"])
        err = capsys.readouterr().err  # the log says it too
        assert (warned in err) if warned else ("metadata states" not in err), err
    with pytest.raises(PathmilError):
        read_tiles(tmp_path / "b.h5")  # nothing written for the blank slide
