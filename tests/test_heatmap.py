"""Heatmaps: tiles are painted where they lie on the slide (pixel positions), for given scores and through
a model whose instance scores are known; overlap, slide edges, STAMP micrometre coordinates, bad bags."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from pathmil.cli import main
from pathmil.demo import write_pyramidal_tiff
from pathmil.evaluation.heatmap import (
    HeatmapConfig,
    PictureLayout,
    TileLayout,
    blend,
    instance_scores,
    montage_tiles,
    paint,
    rank_normalise,
)
from pathmil.features.bagfile import read_bag, write_bag
from pathmil.models import create_model
from pathmil.models.checkpoint import save_checkpoint
from pathmil.slide.reader import Slide, resize
from pathmil.tasks import create_task
from pathmil.training.run import TrainConfig, load_run

WIDTH, HEIGHT, MPP, TILE = 2048, 1536, 0.5, 128  # the slide (level-0 px, um/px) and its tiles
HOT = (slice(2, 5), slice(4, 8))  # tile rows 2-4 and columns 4-7 score high: y 256-640, x 512-1024
MAX_PX = 512  # thumbnail 512 x 384: 4 level-0 px per pixel, a tile is 32 px


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    """A two-level pyramidal TIFF with texture (so tiles differ), at 0.5 um/px."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(120, 250, size=(HEIGHT // 16, WIDTH // 16, 3), dtype=np.uint8)
    rgb = cv2.resize(rgb, (WIDTH, HEIGHT), interpolation=cv2.INTER_NEAREST)
    path = tmp_path_factory.mktemp("slide") / "hot.tiff"
    write_pyramidal_tiff(path, rgb, MPP)
    return path


def grid(rows: int = HEIGHT // TILE - 1, cols: int = WIDTH // TILE) -> tuple[np.ndarray, np.ndarray]:
    """Tile coords (level-0 x, y) of a grid that leaves the slide's last tile row empty, and a 0/1 flag
    that marks the hot region."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    hot = np.zeros((rows, cols), bool)
    hot[HOT] = True
    return np.stack([c * TILE, r * TILE], 1), hot.reshape(-1)


@pytest.fixture(scope="module")
def bag(tmp_path_factory) -> Path:
    """Features [hot flag, x / W, y / H]: a model reading the first one scores the hot region high."""
    coords, hot = grid()
    features = np.column_stack([hot, coords[:, 0] / WIDTH, coords[:, 1] / HEIGHT]).astype(np.float16)
    path = tmp_path_factory.mktemp("bag") / "hot.h5"
    attrs = {"patch_size": TILE, "patch_level": 0, "patch_size_level0": TILE}
    write_bag(path, features, coords, attrs, {"slide_id": "hot", "encoder": "synthetic"})
    return path


def checkpoint(path: Path, aggregator: str, model: torch.nn.Module, hidden: int, in_dim: int = 3) -> Path:
    """A checkpoint as training writes it, for a regression model with the given weights."""
    task = create_task("regression")
    task.fit(pd.DataFrame({"stil": [0.0, 100.0]}))
    config = TrainConfig(task="regression", aggregator=aggregator, model={"hidden": hidden})
    save_checkpoint(
        path,
        {
            "config": config.to_dict(),
            "task": task.state_dict(),
            "model": model.state_dict(),
            "aggregator": aggregator,
            "in_dim": in_dim,
            "n_outputs": 1,
            "features": {"dim": in_dim, "encoder": "synthetic", "random_init": False},
        },
    )
    return path


@pytest.fixture(scope="module")
def flag_model(tmp_path_factory) -> Path:
    """The WeakSTIL instance regressor with weights that make each tile's prediction its hot flag."""
    model = create_model("instance_regressor", in_dim=3, n_outputs=1, hidden=1)
    with torch.no_grad():
        model.encoder[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0]]))
        model.encoder[0].bias.zero_()
        model.classifier.weight.fill_(1.0)
        model.classifier.bias.zero_()
    return checkpoint(tmp_path_factory.mktemp("model") / "best.pt", "instance_regressor", model, hidden=1)


def expected_percentiles() -> tuple[float, float]:
    """Percentiles of the cold and hot tiles (ties share their mean rank)."""
    _, hot = grid()
    p = rank_normalise(hot.astype(float))
    return float(p[~hot][0]), float(p[hot][0])


def test_given_scores_are_painted_at_their_tiles():
    """Tiles overlap by half: overlapped pixels get the mean; a tile crossing the slide edge is clipped."""
    layout = TileLayout(coords=np.array([[0.0, 0.0], [50.0, 0.0], [150.0, 0.0]]), size0=100.0)
    values = paint(np.array([0.0, 1.0, 0.25]), layout, level0_size=(200, 100), shape=(50, 100))
    # 2 level-0 px per pixel: tile A covers columns 0-49, B 25-74, C 75-99 (clipped at the slide edge)
    assert np.all(values[:, :25] == 0.0) and np.all(values[:, 25:50] == 0.5)
    assert np.all(values[:, 50:75] == 1.0) and np.all(values[:, 75:] == 0.25)
    sparse = paint(np.array([1.0]), TileLayout(np.array([[100.0, 40.0]]), 20.0), (200, 100), (50, 100))
    assert np.isfinite(sparse).sum() == 10 * 10 and np.all(sparse[20:30, 50:60] == 1.0)  # NaN elsewhere


def test_percentiles_rank_scores_from_0_to_1():
    assert rank_normalise(np.array([3.0, -1.0, 10.0, 3.0])).tolist() == [0.5, 0.0, 1.0, 0.5]


def test_the_hot_region_lights_up_in_the_heatmap(slide, bag, flag_model, tmp_path):
    out, montage, scores = tmp_path / "heat.png", tmp_path / "montage.png", tmp_path / "scores.csv"
    args = ["heatmap", "--model", str(flag_model), "--features", str(bag), "--slide", str(slide)]
    extra = ["--montage", str(montage), "--scores", str(scores), "--max-px", str(MAX_PX), "--top-k", "4"]
    assert main([*args, "--out", str(out), *extra]) == 0

    # the painted percentiles, recomputed from the facts the stage returns, are right pixel by pixel
    from pathmil.evaluation.heatmap import make_heatmap

    facts = make_heatmap(flag_model, bag, slide, tmp_path / "again.png", config=HeatmapConfig(max_px=MAX_PX))
    heatmap = facts["heatmap"]
    assert heatmap.values.shape == (HEIGHT // 4, WIDTH // 4) and facts["downsample"] == 4
    cold, hot = expected_percentiles()
    values = heatmap.values
    assert np.all(values[64:160, 128:256] == pytest.approx(hot))  # tile rows 2-4, columns 4-7, 32 px each
    outside = np.ones(values.shape, bool)
    outside[64:160, 128:256] = False
    outside[352:] = False  # the last tile row has no tiles
    assert np.all(values[outside] == pytest.approx(cold)) and np.isnan(values[352:]).all()

    # the PNG holds the thumbnail and the overlay unscaled at known places
    picture = cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)
    layout = PictureLayout(*heatmap.thumbnail.shape[:2])
    assert picture.shape[:2] == layout.size
    row, col = layout.overlay_origin
    panel = picture[row : row + 384, col : col + 512]
    assert np.array_equal(panel, heatmap.overlay)
    assert np.array_equal(picture[row : row + 384, :512], heatmap.thumbnail)
    assert np.array_equal(heatmap.overlay, blend(heatmap.thumbnail, values, "turbo", 0.5))
    assert np.array_equal(panel[360:], heatmap.thumbnail[360:])  # no colour off the tiles
    hot_rgb, cold_rgb = panel[64:160, 128:256].mean((0, 1)), panel[200:300, 300:500].mean((0, 1))
    assert hot_rgb[0] > hot_rgb[2] + 60 and cold_rgb[1] > cold_rgb[2]  # turbo: red when hot, green-ish mid

    table = pd.read_csv(scores)
    coords, flags = grid()
    assert (
        table[["x", "y"]].to_numpy().tolist() == coords.tolist() and table["score"].tolist() == flags.tolist()
    )
    montage_picture = cv2.imread(str(montage))
    assert montage_picture is not None and montage_picture.std() > 10


def test_real_slide_tiles_light_up_where_they_are_dark(slides_dir, flag_model, tmp_path):
    """Real H&E: tiles from `pathmil tile` (0.499 um/px: a 256.5 level-0 px stride, 257 px tiles, so
    neighbours overlap), scored by their darkness (haematoxylin-dense tissue); each tile's colour sits at
    its own position on the thumbnail."""
    from pathmil.evaluation.heatmap import make_heatmap
    from pathmil.slide.tile import TileConfig, tile_slide
    from pathmil.slide.tilefile import read_tiles

    slide_path = slides_dir / "cmu_small_region.svs"
    tile_slide(
        slide_path, tmp_path / "tiles.h5", TileConfig(preset="bwh_biopsy", target_mpp=1.0, tile_px=128)
    )
    tiles = read_tiles(tmp_path / "tiles.h5")
    with Slide(slide_path) as s:
        geometry = s.tile_geometry(1.0, 128)
        darkness = np.array([1 - s.read_tile(x, y, geometry).mean() / 255 for x, y in tiles.coords])
    features = np.column_stack([darkness, np.zeros((len(darkness), 2))]).astype(np.float16)
    bag = tmp_path / "cmu.h5"
    attrs = {"slide_id": "cmu_small_region", "encoder": "synthetic"}
    write_bag(bag, features, tiles.coords, tiles.coords_attrs, attrs)
    facts = make_heatmap(flag_model, bag, slide_path, tmp_path / "cmu.png", config=HeatmapConfig(max_px=512))
    heatmap = facts["heatmap"]
    assert len(darkness) > 20 and tiles.coords_attrs["patch_size_level0"] == 257
    assert facts["tile_size_level0"] == pytest.approx(128 / 0.499)  # the exact size, not CLAM's rounded one
    centres = (tiles.coords + facts["tile_size_level0"] / 2) / facts["downsample"]
    painted = heatmap.values[centres[:, 1].astype(int), centres[:, 0].astype(int)]
    assert np.allclose(painted, rank_normalise(darkness.astype(np.float16).astype(float)), atol=1e-6)
    grey = heatmap.thumbnail.mean(axis=2)
    hot, cold = heatmap.values >= 0.9, heatmap.values <= 0.1
    assert grey[hot].mean() < grey[cold].mean() - 20  # the hottest pixels lie on the darkest tissue

    # a .jpg path gives JPEG (the workflow's): the same picture, a fraction of the PNG's bytes
    jpeg, montage = tmp_path / "cmu.jpg", tmp_path / "cmu_montage.jpg"
    make_heatmap(flag_model, bag, slide_path, jpeg, montage=montage, config=HeatmapConfig(max_px=512))
    png_picture, jpeg_picture = cv2.imread(str(tmp_path / "cmu.png")), cv2.imread(str(jpeg))
    assert jpeg.read_bytes()[:3] == montage.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG's start of image
    assert jpeg_picture.shape == png_picture.shape
    assert np.abs(jpeg_picture.astype(int) - png_picture.astype(int)).mean() < 4
    assert jpeg.stat().st_size < (tmp_path / "cmu.png").stat().st_size / 3


def test_montage_shows_the_top_and_bottom_tiles_from_the_slide(slide, bag, flag_model):
    loaded = load_run(flag_model)
    scores, _ = instance_scores(loaded, read_bag(bag))
    coords, hot = grid()
    with Slide(slide) as s:
        top, bottom = montage_tiles(s, TileLayout(coords.astype(float), TILE), scores, k=3, px=64)
        assert all(hot[t.index] for t in top) and not any(hot[t.index] for t in bottom)
        first = top[0]
        assert (first.x, first.y) == tuple(coords[first.index])
        expected = resize(s.read_region(first.x, first.y, 1, TILE // 2, TILE // 2), 64)  # level 1 suffices
        assert np.array_equal(first.image, expected)


def test_smoothing_blurs_inside_the_tissue_only(slide, bag, flag_model, tmp_path):
    from pathmil.evaluation.heatmap import make_heatmap

    config = HeatmapConfig(max_px=MAX_PX, smooth=0.25)
    values = make_heatmap(flag_model, bag, slide, tmp_path / "s.png", config=config)["heatmap"].values
    cold, hot = expected_percentiles()
    assert np.isnan(values[352:]).all()  # still nothing off the tiles
    assert cold < values[60, 200] < hot and values[110, 190] == pytest.approx(hot, abs=0.02)  # soft edge


def test_stamp_micrometre_coordinates_match_pixels(slide, bag, flag_model, tmp_path):
    """STAMP stores feats and coords in um with tile_size_um; with the slide's 0.5 um/px they land alike."""
    from pathmil.evaluation.heatmap import make_heatmap

    pixels = read_bag(bag)
    stamp = tmp_path / "hot_stamp.h5"
    with h5py.File(stamp, "w") as f:
        f["feats"] = pixels.features
        f["coords"] = pixels.coords * MPP
        f.attrs["tile_size_um"] = TILE * MPP
        f.attrs["encoder"] = "synthetic"
    config = HeatmapConfig(max_px=MAX_PX)
    a = make_heatmap(flag_model, bag, slide, tmp_path / "a.png", config=config)["heatmap"].values
    b = make_heatmap(flag_model, stamp, slide, tmp_path / "b.png", config=config)["heatmap"].values
    assert np.array_equal(np.isnan(a), np.isnan(b)) and np.allclose(a, b, equal_nan=True)


@pytest.mark.parametrize("kind", ["slideflow", "inferred"])
def test_tiles_of_non_square_pixels_are_painted_with_their_own_width_and_height(kind):
    """A slide of 0.25 x 0.5 um/px. pathmil's 128 um tile is 512 x 256 level-0 px, and a bag that names no
    tile size gets that from the grid's spacing, per axis. slideflow reads square windows of tile_um /
    mpp-x level-0 px (openslide's mpp-x only) and stores their centres: 512 x 512, corners half a side
    (256 px) up and left, on both axes; not the mean um/px's 341 px."""
    from types import SimpleNamespace

    from pathmil.evaluation.heatmap import tile_layout
    from pathmil.features.bagfile import Bag

    slide = SimpleNamespace(
        mpp_xy=(0.25, 0.5), mpp_x=0.25, dimensions=(4096, 2048), level_downsamples=(1.0,), slide_id="s"
    )
    if kind == "slideflow":
        corners = np.array([[0, 0], [512, 0], [0, 512], [1024, 1024]], dtype=np.float64)
        bag = Bag(np.zeros((4, 2)), corners + 256, {"tile_um": 128.0}, coords_origin="centre")
        size = (512.0, 512.0)
    else:
        corners = np.array([[0, 0], [512, 0], [0, 256], [1024, 512]], dtype=np.float64)
        bag, size = Bag(np.zeros((4, 2)), corners), (512.0, 256.0)
    layout = tile_layout(bag, slide)
    assert layout.size_xy == size and layout.size_inferred == (kind == "inferred")
    np.testing.assert_allclose(layout.coords, corners)


def test_attention_scores_come_from_the_model(slide, bag, tmp_path):
    """ABMIL (any aggregator through build_model): the painted scores are its attention weights."""
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=3, n_outputs=1, hidden=8).eval()
    path = checkpoint(tmp_path / "abmil.pt", "abmil", model, hidden=8)
    features = torch.from_numpy(read_bag(bag).features.astype(np.float32))
    scores, _ = instance_scores(load_run(path), read_bag(bag))
    with torch.no_grad():
        attention = model(features[None]).instance_scores[0].numpy()
    assert np.allclose(scores, attention) and scores.sum() == pytest.approx(1.0, abs=1e-5)
    assert main(["heatmap", "--model", str(path), "--features", str(bag), "--slide", str(slide),
                 "--out", str(tmp_path / "h.png"), "--max-px", "256"]) == 0  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("short", "has 176 feature rows but 175 coords"),
        ("outside", "tile(s) of"),
        ("wide", "holds 6-dimensional features but model"),
    ],
)
def test_bags_that_do_not_fit_are_refused(slide, bag, flag_model, tmp_path, capsys, edit, message):
    pixels = read_bag(bag)
    features, coords = pixels.features, pixels.coords
    if edit == "short":
        path = tmp_path / "short.h5"
        with h5py.File(path, "w") as f:  # written by hand: write_bag itself refuses such a file
            f["features"], f["coords"] = features, coords[:175]
    else:
        if edit == "outside":
            coords = coords + np.array([WIDTH, 0])
        if edit == "wide":
            features = np.hstack([features, features])
        path = tmp_path / f"{edit}.h5"
        write_bag(path, features, coords, pixels.coords_attrs, pixels.attrs)
    out = tmp_path / "h.png"
    args = ["heatmap", "--model", str(flag_model), "--features", str(path), "--slide", str(slide)]
    assert main([*args, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"slide_id": "other"}, "it was made for slide other, not hot (--slide-id gives the id"),
        ({"level0_size": np.array([1000, 1000])}, "its slide was 1000 x 1000 px, hot.tiff is 2048 x 1536"),
        (
            {"slide_quickhash": "0" * 64},
            "its slide fingerprint (openslide.quickhash-1) differs from hot.tiff's",
        ),
    ],
    ids=["slide-id", "size", "fingerprint"],
)
def test_a_bag_of_another_slide_is_refused_unless_forced(
    slide, bag, flag_model, tmp_path, capsys, attrs, message
):
    """Painting one slide's bag on another slide is refused in one line; --force paints it and says why."""
    pixels = read_bag(bag)
    other = tmp_path / "other.h5"
    write_bag(other, pixels.features, pixels.coords, pixels.coords_attrs, {**pixels.attrs, **attrs})
    args = ["heatmap", "--model", str(flag_model), "--features", str(other), "--slide", str(slide),
            "--out", str(tmp_path / "h.png"), "--max-px", "256"]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pathmil: error: {other} is not the bag of {slide}: ") and err.count("\n") == 1
    assert message in err and err.rstrip().endswith("give this slide's bag, or --force to paint it anyway")
    assert not (tmp_path / "h.png").exists()
    assert main([*args, "--force"]) == 0 and (tmp_path / "h.png").is_file()
    assert f"warning: painted although {message}" in capsys.readouterr().err
    if "slide_id" in attrs:  # a slide file named otherwise than its id: --slide-id names it
        assert main([*args, "--slide-id", "other"]) == 0


def test_the_bag_of_the_slide_passes_with_all_it_records(slides_dir, flag_model, tmp_path):
    """pathmil's own bag records the slide id, level-0 size and fingerprint; all agree with its slide."""
    from pathmil.evaluation.heatmap import make_heatmap
    from pathmil.slide.tile import TileConfig, tile_slide
    from pathmil.slide.tilefile import read_tiles

    slide_path = slides_dir / "cmu_small_region.svs"
    tile_slide(slide_path, tmp_path / "t.h5", TileConfig(target_mpp=2.0, tile_px=64))
    tiles = read_tiles(tmp_path / "t.h5")
    assert tiles.attrs["slide_quickhash"] == Slide(slide_path).quickhash
    attrs = {k: tiles.attrs[k] for k in ("slide_id", "slide_quickhash")}
    bag = tmp_path / "b.h5"
    features = np.zeros((len(tiles.coords), 3), np.float16)
    write_bag(bag, features, tiles.coords, tiles.coords_attrs, {**attrs, "level0_size": [2220, 2967]})
    facts = make_heatmap(flag_model, bag, slide_path, tmp_path / "h.png", config=HeatmapConfig(max_px=256))
    assert facts["warnings"] == []


def test_the_model_of_the_fold_that_tested_the_slide_is_chosen(tmp_path):
    from pathmil.errors import PathmilError
    from pathmil.evaluation.heatmap import held_out_model

    models = []
    for fold in range(3):
        run = tmp_path / f"fold{fold}"
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"fold": fold}))
        models.append(run / "best.pt")
    splits = tmp_path / "splits.csv"
    pd.DataFrame(
        {
            "slide_id": ["A", "A", "A", "B", "B", "B"],
            "patient_id": ["p", "p", "p", "q", "q", "q"],
            "fold": [0, 1, 2, 0, 1, 2],
            "split": ["train", "test", "val", "test", "train", "train"],
        }
    ).to_csv(splits, index=False)
    bag = tmp_path / "A.h5"
    write_bag(bag, np.zeros((1, 4), np.float16), np.zeros((1, 2), np.int64), {}, {"slide_id": "A"})
    assert held_out_model(models, splits, bag) == models[1]
    with pytest.raises(PathmilError, match="need --splits"):
        held_out_model(models, None, bag)
    with pytest.raises(PathmilError, match="none of the given checkpoints is of fold \\[1\\]"):
        held_out_model([models[0], models[2]], splits, bag)
