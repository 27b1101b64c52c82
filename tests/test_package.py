"""`pathmil package` and `pathmil predict --package`: a package gives back its runs' predictions, refuses
features it was not trained on, checks itself when loaded, and scores raw slides as tile + extract +
predict by hand would."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from synthetic import make_synthetic_cohort, split_and_train

from pathmil.cli import main
from pathmil.cohort import read_table
from pathmil.slide.tile import TileConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--set", "epochs=3", "--set", "min_epochs=1", "--set", "model.hidden=16", "--no-progress"]
TILING = json.dumps(TileConfig(target_mpp=0.5, tile_px=256).tiling(), sort_keys=True)


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"slide_id": str, "patient_id": str})


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("pathmil: error: "), err
    return err


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> dict:
    """Synthetic bags that say how they were tiled and encoded, two classification folds, their package."""
    root = tmp_path_factory.mktemp("package")
    features, cohort = make_synthetic_cohort(root, n_patients=16, extra_slides=4, dim=16)
    for bag in features.glob("*.h5"):
        with h5py.File(bag, "a") as f:
            f.attrs["tiling"] = TILING
            f.attrs["encoder_weights_sha256"] = "ab" * 32
    _, runs = split_and_train(root, features, cohort, settings=TINY)
    package = root / "model.pathmil"
    args = ["package", "--runs", *map(str, runs), "--out", str(package), "--cohort-name", "synthetic"]
    assert main([*args, "--n-bootstrap", "50"]) == 0
    return {"root": root, "features": features, "cohort": cohort, "runs": runs, "package": package}


def test_the_package_holds_the_fold_models_encoder_tiling_and_a_card(packaged):
    package = packaged["package"]
    manifest = json.loads((package / "package.json").read_text())
    assert manifest["format_version"] == 1 and manifest["task"]["name"] == "classification"
    assert manifest["task"]["classes"] == ["0", "1"] and manifest["aggregator"] == "abmil"
    assert manifest["encoder"] == {
        "name": "synthetic",
        "weights_sha256": "ab" * 32,
        "random_init": False,
        "dim": 16,
    }
    assert manifest["tiling"] == json.loads(TILING)
    for member, run in zip(manifest["members"], packaged["runs"], strict=True):
        assert (package / member["file"]).read_bytes() == (run / "best.pt").read_bytes()
    card = json.loads((package / "model_card.json").read_text())
    auc = next(row for row in card["metrics"]["values"] if row["metric"] == "auc")
    evaluation = json.loads((package / "evaluation" / "metrics.json").read_text())
    assert auc["pooled"] == evaluation["pooled"]["auc"] and auc["ci_low"] <= auc["pooled"] <= auc["ci_high"]
    assert card["cohort"] == "synthetic" and card["pathmil_version"] and card["date"] == manifest["created"]
    text = (package / "model_card.md").read_text()
    assert "| auc (main) |" in text and f"{auc['pooled']:.3f}" in text and "256 px at 0.5 um/px" in text


def test_package_round_trip_gives_the_runs_predictions(packaged, tmp_path):
    """Each fold model of the package scores its own fold's bags as training did (to 1e-6), and the package
    as a whole scores like the runs' checkpoints as an ensemble."""
    common = ["--cohort", str(packaged["cohort"]), "--features-dir", str(packaged["features"])]
    out = tmp_path / "package.csv"
    assert main(["predict", "--package", str(packaged["package"]), *common, "--out", str(out)]) == 0
    models = [str(run / "best.pt") for run in packaged["runs"]]
    assert main(["predict", "--model", *models, *common, "--out", str(tmp_path / "runs.csv")]) == 0
    ours, theirs = read_csv(out), read_csv(tmp_path / "runs.csv")
    assert ours["slide_id"].tolist() == theirs["slide_id"].tolist()
    np.testing.assert_allclose(ours["score"], theirs["score"], rtol=0, atol=1e-6)
    manifest = json.loads((packaged["package"] / "package.json").read_text())
    for member, run in zip(manifest["members"], packaged["runs"], strict=True):
        single = tmp_path / f"{run.name}.csv"
        model = str(packaged["package"] / member["file"])
        assert main(["predict", "--model", model, *common, "--out", str(single)]) == 0
        mine = read_csv(single).set_index("slide_id")
        own = read_csv(run / "predictions.csv").set_index("slide_id")
        np.testing.assert_allclose(mine.loc[own.index, "score"], own["score"], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"encoder": "uni"}, "holds features of encoder uni but package"),
        ({"encoder_weights_sha256": "cd" * 32}, "made with other weights"),
        ({"tiling": json.dumps(TileConfig(target_mpp=0.25, tile_px=256).tiling())}, "target_mpp 0.25 vs 0.5"),
    ],
)
def test_a_package_refuses_features_of_another_encoder_or_tiling(packaged, tmp_path, capsys, change, message):
    bag = tmp_path / "S000.h5"
    shutil.copyfile(packaged["features"] / "S000.h5", bag)
    with h5py.File(bag, "a") as f:
        f.attrs.update(change)
    out = tmp_path / "p.csv"
    assert (
        main(["predict", "--package", str(packaged["package"]), "--features", str(bag), "--out", str(out)])
        == 1
    )
    assert message in one_error_line(capsys) and not out.exists()


def test_loading_checks_format_members_and_encoder_weights(packaged, tmp_path, capsys):
    bag = str(packaged["features"] / "S000.h5")
    copy = tmp_path / "model.pathmil"
    shutil.copytree(packaged["package"], copy)
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"other weights")
    args = ["predict", "--package", str(copy), "--features", bag, "--out", str(tmp_path / "p.csv")]
    assert main([*args, "--weights", str(weights), "--task", "survival"]) == 1
    err = one_error_line(capsys)  # both mismatches, in one line
    assert "encoder weights" in err and "the package was trained on synthetic weights abababababab" in err
    assert "it is a classification model, not survival" in err
    member = copy / "members" / "fold1.pt"
    member.write_bytes(member.read_bytes()[:-8] + b"tampered")
    assert main(args) == 1
    assert "member members/fold1.pt differs from the one packaged (sha256 mismatch)" in one_error_line(capsys)
    manifest = json.loads((copy / "package.json").read_text())
    (copy / "package.json").write_text(json.dumps({**manifest, "format_version": 99}))
    assert main(args) == 1
    assert "format version 99, this pathmil (0.1.0) reads versions up to 1" in one_error_line(capsys)


def test_package_refuses_runs_of_different_features(packaged, tmp_path, capsys):
    """Fold models trained on other features cannot be one package."""
    other = tmp_path / "other"
    features = tmp_path / "features"
    shutil.copytree(packaged["features"], features)
    for bag in features.glob("*.h5"):
        with h5py.File(bag, "a") as f:
            f.attrs["tiling"] = json.dumps(TileConfig(tile_px=224).tiling(), sort_keys=True)
    splits = packaged["root"] / "splits.csv"
    args = [
        "train",
        "--features",
        str(features),
        "--cohort",
        str(packaged["cohort"]),
        "--splits",
        str(splits),
    ]
    assert main([*args, "--fold", "1", "--task", "classification", "--out", str(other), *TINY]) == 0
    capsys.readouterr()
    runs = [str(packaged["runs"][0]), str(other)]
    assert main(["package", "--runs", *runs, "--out", str(tmp_path / "p.pathmil")]) == 1
    assert "were trained on different features (tiling differ)" in one_error_line(capsys)
    assert not (tmp_path / "p.pathmil").exists()


# ------------------------------------------------------------------------------------- raw slides


@pytest.fixture(scope="module")
def slide_package(demo_cohort, mobilenet_weights, tmp_path_factory) -> dict:
    """The demo slides tiled coarsely (2 um/px, 64 px: a few dozen tiles each), encoded with the real
    MobileNetV2, two classification folds and their package."""
    root = tmp_path_factory.mktemp("slide_package")
    cohort = demo_cohort / "cohort.csv"
    tile = ["--target-mpp", "2.0", "--tile-px", "64", "--preset", "bwh_biopsy"]
    assert main(["tile", "--cohort", str(cohort), "--out-dir", str(root / "tiles"), *tile]) == 0
    # eager (--optimize none): TorchScript re-specialises for every slide's new number of tiles
    extract = [
        "--encoder",
        "mobilenet_v2",
        "--weights",
        str(mobilenet_weights),
        "--workers",
        "0",
        "--optimize",
        "none",
    ]
    args = [
        "extract",
        "--cohort",
        str(cohort),
        "--tiles-dir",
        str(root / "tiles"),
        "--out-dir",
        str(root / "features"),
    ]
    assert main([*args, *extract]) == 0
    _, runs = split_and_train(root, root / "features", cohort, settings=TINY)
    package = root / "model.pathmil"
    assert main(["package", "--runs", *map(str, runs), "--out", str(package), "--n-bootstrap", "20"]) == 0
    return {"root": root, "cohort": cohort, "runs": runs, "package": package}


@pytest.mark.slow
def test_predict_package_on_raw_slides_equals_tile_extract_predict_by_hand(
    slide_package, mobilenet_weights, tmp_path, capsys
):
    table = read_table(slide_package["cohort"])  # slide paths made absolute
    table = table[table["patient_id"].isin(table["patient_id"].unique()[:3])]  # three patients' slides
    table.to_csv(tmp_path / "three.csv", index=False)
    broken = tmp_path / "broken.tiff"
    broken.write_bytes(b"not a slide")
    row = {"slide_id": "broken", "patient_id": "PX", "path": str(broken)}
    pd.concat([table, pd.DataFrame([row])]).to_csv(tmp_path / "slides.csv", index=False)
    out = tmp_path / "out"
    package = str(slide_package["package"])
    args = ["predict", "--package", package, "--slides", str(tmp_path / "slides.csv"), "--out", str(out)]
    extract = ["--weights", str(mobilenet_weights), "--workers", "0", "--optimize", "none"]
    assert main([*args, *extract, "--heatmaps"]) == 0
    # by hand: the bags of the tile + extract above, scored by the runs' checkpoints
    models = [str(run / "best.pt") for run in slide_package["runs"]]
    by_hand = tmp_path / "by_hand.csv"
    features = str(slide_package["root"] / "features")
    common = ["--cohort", str(tmp_path / "three.csv"), "--features-dir", features]
    assert main(["predict", "--model", *models, *common, "--out", str(by_hand)]) == 0
    ours, theirs = read_csv(out / "predictions.csv"), read_csv(by_hand)
    assert ours["slide_id"].tolist() == theirs["slide_id"].tolist() and len(ours) == 3
    assert ours["target"].tolist() == theirs["target"].tolist()  # the table's labels ride along
    np.testing.assert_allclose(ours["score"], theirs["score"], rtol=0, atol=1e-6)
    failures = read_csv(out / "failures.csv")
    assert failures["slide_id"].tolist() == ["broken"] and failures["stage"].tolist() == ["tile"]
    assert "broken" not in set(read_csv(out / "slides.csv")["slide_id"])
    assert len(list((out / "heatmaps").glob("*.png"))) == len(table)
    first = table.iloc[0]
    bag = str(out / "features" / "mobilenet_v2" / f"{first['slide_id']}.h5")
    heatmap = tmp_path / "heatmap.png"
    assert (
        main(
            [
                "heatmap",
                "--package",
                package,
                "--features",
                bag,
                "--slide",
                first["path"],
                "--out",
                str(heatmap),
            ]
        )
        == 0
    )
    assert heatmap.read_bytes() == (out / "heatmaps" / f"{first['slide_id']}.png").read_bytes()
    # tiles and bags already made with the package's tiling and encoder are reused, not made again
    again = tmp_path / "again"
    reuse = ["--tiles-dir", str(slide_package["root"] / "tiles"), "--features-dir", features]
    before = {p: p.stat().st_mtime_ns for p in Path(features).glob("*.h5")}
    args = ["predict", "--package", package, "--slides", str(tmp_path / "three.csv"), "--out", str(again)]
    assert main([*args, *reuse, "--weights", str(mobilenet_weights)]) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before
    scores = read_csv(again / "predictions.csv")["score"]
    np.testing.assert_allclose(scores, theirs["score"], rtol=0, atol=1e-6)
    # a labelled external set evaluates with the same metrics and intervals as cross-validation
    capsys.readouterr()
    evaluation = tmp_path / "eval"
    args = [
        "evaluate",
        "--predictions",
        str(out / "predictions.csv"),
        "--package",
        package,
        "--out",
        str(evaluation),
    ]
    assert main([*args, "--n-bootstrap", "20"]) == 0
    result = json.loads((evaluation / "metrics.json").read_text())
    assert result["external"] and result["n_test_bags"] == len(ours) and "auc" in result["ci"]
    assert (evaluation / "plots" / "roc.png").is_file()
