"""Files other tools read (issue 14 §5): `pathmil export` writes bags in CLAM's and TRIDENT's layouts, and
readers written here from those tools' documented layouts read them; foreign bags' encoder names (TRIDENT,
STAMP, slideflow) are read, so a model trained on another encoder is refused for them too; slideflow's
coordinates are read.

The readers below do what CLAM's ``Generic_MIL_Dataset.__getitem__`` (``pt_files/<slide>.pt`` with
``torch.load``; ``h5_files/<slide>.h5``: ``features``, ``coords``) and TRIDENT's slide-feature step
(``<job>/<mag>x_<patch>px_<overlap>px_overlap/features_<encoder>/<slide>.h5``: ``features``, ``coords`` and
the coords' attributes) do, written from their layouts, not copied.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from synthetic import split_and_train

from pathmil.cli import main
from pathmil.features.bagfile import read_bag, read_bag_attrs, write_bag

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIM = 16
GEOMETRY = {  # a 40x slide (0.25 um/px) tiled at 0.5 um/px (20x), 256 px tiles: 512 level-0 px
    "patch_size": 512, "patch_level": 0, "patch_size_level0": 512, "level0_width": 8192, "level0_height": 6144,
    "target_mpp": 0.5, "tile_px": 256, "overlap": 0.0, "slide_mpp": 0.25,
}  # fmt: skip


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    """Ten patients' pathmil bags (encoder "uni"), their table, splits and a tiny trained model."""
    root = tmp_path_factory.mktemp("export")
    rng = np.random.default_rng(0)
    key = rng.normal(size=DIM)
    rows = []
    for i in range(10):
        n = int(rng.integers(20, 40))
        x = rng.normal(size=(n, DIM))
        x[:3] += 3 * (i % 2) * key
        coords = np.stack(np.divmod(np.arange(n), 8), 1)[:, ::-1] * 512
        slide = f"S{i:02d}"
        write_bag(root / "features" / f"{slide}.h5", x.astype(np.float16), coords, GEOMETRY,
                  {"slide_id": slide, "encoder": "uni", "slide_mpp": 0.25})  # fmt: skip
        rows.append({"slide_id": slide, "patient_id": f"P{i:02d}", "label": i % 2})
    table = root / "cohort.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    splits, (run,) = split_and_train(root, root / "features", table, folds=[0])
    return {
        "root": root,
        "features": root / "features",
        "table": table,
        "splits": splits,
        "run": run,
        "rows": rows,
    }


def clam_dataset_item(data_dir: Path, slide_id: str, use_h5: bool):
    """CLAM's Generic_MIL_Dataset.__getitem__: the .pt tensor, or features and coords of the .h5."""
    if not use_h5:
        return torch.load(data_dir / "pt_files" / f"{slide_id}.pt")
    with h5py.File(data_dir / "h5_files" / f"{slide_id}.h5", "r") as f:
        features = f["features"][:]
        coords = f["coords"][:]
    return torch.from_numpy(features), coords


def test_clam_reads_the_clam_export(cohort, tmp_path):
    out = tmp_path / "clam"
    assert main(["export", "--features", str(cohort["features"]), "--format", "clam", "--out", str(out)]) == 0
    head = torch.nn.Linear(DIM, 2)  # CLAM's models are float32 layers
    for row in cohort["rows"]:
        ours = read_bag(cohort["features"] / f"{row['slide_id']}.h5")
        features = clam_dataset_item(out, row["slide_id"], use_h5=False)
        assert isinstance(features, torch.Tensor) and features.dtype == torch.float32
        assert features.shape == (ours.n_instances, DIM)
        assert torch.equal(features, torch.from_numpy(ours.features.astype(np.float32)))
        assert head(features).shape == (ours.n_instances, 2)  # float16 would fail here ("Half and Float")
        features_h5, coords = clam_dataset_item(out, row["slide_id"], use_h5=True)
        assert torch.equal(features_h5, features) and np.array_equal(coords, ours.coords)
    with pytest.raises(RuntimeError):
        head(torch.from_numpy(ours.features))  # what CLAM users hit with pathmil's own float16 bags


def trident_slide_features_inputs(
    job_dir: Path, mag: int, patch: int, overlap: int, encoder: str, slide: str
):
    """TRIDENT's slide-feature step: the patch features of one slide and the coords' attributes."""
    path = job_dir / f"{mag}x_{patch}px_{overlap}px_overlap" / f"features_{encoder}" / f"{slide}.h5"
    with h5py.File(path, "r") as f:
        coords = f["coords"][:]
        features = f["features"][:]
        coords_attrs = dict(f["coords"].attrs)
        name = f["features"].attrs["encoder"]
    return features, coords, coords_attrs, name


def test_trident_reads_the_trident_export_and_pathmil_reads_it_back(cohort, tmp_path):
    out = tmp_path / "trident"
    assert (
        main(["export", "--features", str(cohort["features"]), "--format", "trident", "--out", str(out)]) == 0
    )
    for row in cohort["rows"]:
        ours = read_bag(cohort["features"] / f"{row['slide_id']}.h5")
        # a TRIDENT user who ran `--mag 20 --patch_size 256 --patch_encoder uni_v1` finds it where TRIDENT would
        features, coords, attrs, name = trident_slide_features_inputs(
            out, 20, 256, 0, "uni_v1", row["slide_id"]
        )
        assert features.dtype == np.float32 and np.array_equal(features, ours.features.astype(np.float32))
        assert coords.dtype == np.int64 and np.array_equal(coords, ours.coords)
        assert name == "uni_v1"
        assert attrs["patch_size_level0"] == 512 and attrs["patch_size"] == 256
        assert attrs["level0_magnification"] == 40 and attrs["target_magnification"] == 20
        assert (
            attrs["patch_size_level0"]
            == attrs["patch_size"] * attrs["level0_magnification"] // attrs["target_magnification"]
        )  # TRIDENT's own relation between its attributes
        assert (attrs["level0_width"], attrs["level0_height"]) == (8192, 6144) and attrs["name"] == row[
            "slide_id"
        ]
        back = read_bag(out / "20x_256px_0px_overlap" / "features_uni_v1" / f"{row['slide_id']}.h5")
        assert back.layout == "trident" and back.attrs["encoder"] == "uni"  # TRIDENT's name read as pathmil's


def foreign_bags(folder: Path, features: np.ndarray, coords: np.ndarray) -> dict[str, Path]:
    """The same features as TRIDENT, STAMP and slideflow write them, each naming its encoder its own way."""
    folder.mkdir(parents=True, exist_ok=True)
    bags = {}
    for tool, encoder in (("trident_conch", "conch_v15"), ("trident_uni", "uni_v1")):
        with h5py.File(folder / f"{tool}.h5", "w") as f:
            f["features"] = features.astype(np.float32)
            f["features"].attrs.update({"name": tool, "encoder": encoder})
            f["coords"] = coords
            f["coords"].attrs.update({"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40,
                                      "target_magnification": 20})  # fmt: skip
        bags[tool] = folder / f"{tool}.h5"
    with h5py.File(folder / "stamp.h5", "w") as f:
        f["feats"] = features.astype(np.float16)
        f["coords"] = coords * 0.25  # micrometres
        f.attrs.update({"extractor": "h-optimus-0", "unit": "um", "tile_size_um": 128.0, "tile_size_px": 224})
    bags["stamp"] = folder / "stamp.h5"
    slideflow = folder / "slideflow"
    slideflow.mkdir()
    torch.save(torch.from_numpy(features.astype(np.float32)), slideflow / "sf.pt")
    np.savez(slideflow / "sf.index.npz", arr_0=coords + 256)  # slideflow's locations are tile centres
    config = {"extractor": {"class": "slideflow.model.extractors.virchow.VirchowFeatures", "kwargs": {}},
              "tile_px": 224, "tile_um": 128, "normalizer": None, "num_features": DIM}  # fmt: skip
    (slideflow / "bags_config.json").write_text(json.dumps(config))
    bags["slideflow"] = slideflow / "sf.pt"
    return bags


def test_foreign_encoder_names_are_read_and_a_model_of_another_encoder_refuses_them(cohort, tmp_path, capsys):
    ours = read_bag(cohort["features"] / "S00.h5")
    bags = foreign_bags(tmp_path / "foreign", ours.features, ours.coords)
    names = {tool: read_bag_attrs(path).get("encoder") for tool, path in bags.items()}
    assert names == {"trident_conch": "conch_v1_5", "trident_uni": "uni", "stamp": "h_optimus_0",
                     "slideflow": "VirchowFeatures"}  # fmt: skip
    assert all(read_bag(path).attrs.get("encoder") == names[tool] for tool, path in bags.items())
    model = str(cohort["run"] / "best.pt")  # trained on pathmil bags of encoder uni
    for tool in ("trident_conch", "stamp", "slideflow"):
        out = tmp_path / f"{tool}.csv"
        assert main(["predict", "--model", model, "--features", str(bags[tool]), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"holds features of encoder {names[tool]} but model" in err and "was trained on uni" in err, (
            err
        )
        assert not out.exists()
    out = tmp_path / "uni.csv"  # TRIDENT's uni_v1 is pathmil's uni: accepted, with the same score
    assert main(["predict", "--model", model, "--features", str(bags["trident_uni"]), "--out", str(out)]) == 0
    assert main(["predict", "--model", model, "--features", str(cohort["features"] / "S00.h5"),
                 "--out", str(tmp_path / "ours.csv")]) == 0  # fmt: skip
    assert pd.read_csv(out)["score"][0] == pd.read_csv(tmp_path / "ours.csv")["score"][0]


def test_slideflow_coordinates_are_read_as_level0_tile_corners(cohort, tmp_path):
    ours = read_bag(cohort["features"] / "S00.h5")
    bags = foreign_bags(tmp_path / "foreign", ours.features, ours.coords)
    bag = read_bag(bags["slideflow"])
    assert (
        bag.layout == "slideflow" and bag.coords_origin == "centre" and bag.coords_attrs["tile_um"] == 128.0
    )
    assert bag.attrs["target_mpp"] == pytest.approx(128 / 224)  # its tiles' um/px, compared with a model's
    np.testing.assert_array_equal(bag.coords, ours.coords + 256)
    out = tmp_path / "clam"  # exported with the slide's um/px: 128 um tiles of 0.25 um/px, centre - 256 px
    args = ["export", "--features", str(bags["slideflow"]), "--format", "clam", "--out", str(out)]
    assert main([*args, "--mpp", "0.25"]) == 0
    with h5py.File(out / "h5_files" / "sf.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], ours.coords)
    out = tmp_path / "clam_stamp"
    args = [
        "export",
        "--features",
        str(bags["stamp"]),
        "--format",
        "clam",
        "--out",
        str(out),
        "--mpp",
        "0.25",
    ]
    assert main(args) == 0
    with h5py.File(out / "h5_files" / "stamp.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], ours.coords)


def test_a_model_trained_on_trident_bags_names_pathmil_s_encoder(cohort, tmp_path):
    out = tmp_path / "trident"
    assert (
        main(["export", "--features", str(cohort["features"]), "--format", "trident", "--out", str(out)]) == 0
    )
    run = tmp_path / "run"
    args = ["train", "--features", str(out / "20x_256px_0px_overlap" / "features_uni_v1"), "--cohort",
            str(cohort["table"]), "--splits", str(cohort["splits"]), "--fold", "0", "--out", str(run),
            "--no-progress", "--set", "epochs=1", "--set", "model.hidden=8"]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["features"]["encoder"] == "uni"


def test_micrometre_and_centre_coordinates_keep_non_square_pixels_apart(cohort, tmp_path, capsys):
    """A slide of 0.25 x 0.5 um/px: STAMP's micrometres divide by each axis's um/px (one scalar would move
    every y by half); slideflow's centres lose half of its square level-0 window, tile_um / mpp-x."""
    ours = read_bag(cohort["features"] / "S00.h5")
    stamp = tmp_path / "stamp.h5"
    with h5py.File(stamp, "w") as f:
        f["feats"] = ours.features.astype(np.float16)
        f["coords"] = ours.coords * np.array([0.25, 0.5])  # micrometres on x and y
        f.attrs.update({"extractor": "h-optimus-0", "unit": "um", "tile_size_um": 128.0, "tile_size_px": 224})
    out = tmp_path / "clam"
    args = ["export", "--features", str(stamp), "--format", "clam", "--out", str(out)]
    assert main([*args, "--mpp", "0.25", "0.5"]) == 0
    with h5py.File(out / "h5_files" / "stamp.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], ours.coords)
    assert main([*args, "--mpp", "0.25", "0.5", "1"]) == 1
    assert "--mpp takes one um/px, or two (x and y)" in capsys.readouterr().err
    # a bag that records the slide's um/px per axis needs no --mpp
    with h5py.File(stamp, "a") as f:
        f.attrs.update({"slide_mpp_x": 0.25, "slide_mpp_y": 0.5})
    assert main([*args[:-1], str(tmp_path / "clam_recorded")]) == 0
    with h5py.File(tmp_path / "clam_recorded" / "h5_files" / "stamp.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], ours.coords)
    bags = foreign_bags(tmp_path / "foreign", ours.features, ours.coords)
    out = tmp_path / "clam_sf"  # 128 um tiles at 0.25 um/px along x: a 512 px window, centre - 256 on both axes
    assert main(["export", "--features", str(bags["slideflow"]), "--format", "clam", "--out", str(out),
                 "--mpp", "0.25", "0.5"]) == 0  # fmt: skip
    with h5py.File(out / "h5_files" / "sf.h5", "r") as f:
        np.testing.assert_array_equal(f["coords"][:], ours.coords)


def test_stamp_and_slideflow_bags_export_to_trident_with_the_slide_s_um_per_px(cohort, tmp_path, capsys):
    ours = read_bag(cohort["features"] / "S00.h5")
    bags = foreign_bags(tmp_path / "foreign", ours.features, ours.coords)
    for tool in ("stamp", "slideflow"):  # 128 um tiles of 224 px: 17.5x; at 0.25 um/px 512 level-0 px, 40x
        out = tmp_path / f"trident_{tool}"
        args = ["export", "--features", str(bags[tool]), "--format", "trident", "--out", str(out)]
        assert main(args) == 1
        assert "give the slide's um/px (--mpp)" in capsys.readouterr().err
        assert main([*args, "--mpp", "0.25"]) == 0
        (written,) = out.glob("*/features_*/*.h5")
        assert written.parent.parent.name == "17.5x_224px_0px_overlap"
        with h5py.File(written, "r") as f:
            np.testing.assert_array_equal(f["coords"][:], ours.coords)
            attrs = dict(f["coords"].attrs)
        assert (attrs["patch_size"], attrs["patch_size_level0"]) == (224, 512)
        assert (attrs["level0_magnification"], attrs["target_magnification"]) == (40, 17.5)
        assert main([*args, "--mpp", "0.25", "0.5"]) == 1  # TRIDENT has one level-0 tile side
        assert "pixels are not square (0.25 x 0.5 um/px)" in capsys.readouterr().err


def test_an_impossible_um_per_px_is_refused_before_anything_is_written(cohort, tmp_path, capsys):
    ours = read_bag(cohort["features"] / "S00.h5")
    bags = foreign_bags(tmp_path / "foreign", ours.features, ours.coords)
    out = tmp_path / "clam"
    args = ["export", "--features", str(bags["stamp"]), "--format", "clam", "--out", str(out), "--mpp"]
    for bad in (["nan"], ["inf"], ["1e-9"], ["0.25", "nan"], ["0"]):
        assert main([*args, *bad]) == 1
        assert "each within 0.05-20" in capsys.readouterr().err
    assert not out.exists()
    # slideflow centres with a um/px too coarse for their tile: corners left of the slide are refused
    assert main(["export", "--features", str(bags["slideflow"]), "--format", "clam", "--out", str(out),
                 "--mpp", "0.1"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "corner would lie outside the slide" in err and "is the slide's um/px right (--mpp)?" in err
