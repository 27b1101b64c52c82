"""`pathmil predict`: a checkpoint scores bags exactly as training did; ensembles; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from synthetic import make_synthetic_cohort

from pathmil.cli import main
from pathmil.errors import PathmilError
from pathmil.features.bagfile import read_bag, write_bag
from pathmil.slide.tile import TileConfig

# how the synthetic training bags say they were made (the checkpoints record it from them)
TILING = TileConfig(target_mpp=0.5, tile_px=256).tiling()
WEIGHTS = "ab" * 32

TINY = ["--set", "epochs=3", "--set", "min_epochs=1", "--set", "model.hidden=16", "--no-progress"]


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"slide_id": str, "patient_id": str})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """A synthetic cohort, 2-fold splits per task, and tiny runs: classification folds 0 and 1 (patient
    bags, ABMIL) and survival fold 0 (slide bags, instance regressor, NLL with survival curves)."""
    root = tmp_path_factory.mktemp("predict")
    features, cohort = make_synthetic_cohort(root, n_patients=16, extra_slides=6, dim=16)
    for bag in features.glob("*.h5"):
        with h5py.File(bag, "a") as f:
            f.attrs.update({"tiling": json.dumps(TILING), "encoder_weights_sha256": WEIGHTS})
    out = {"root": root, "features": features, "cohort": cohort}
    for task in ("classification", "survival"):
        splits = root / f"splits_{task}.csv"
        args = ["split", "--cohort", str(cohort), "--task", task, "--folds", "2", "--out", str(splits)]
        assert main(args) == 0
        folds = (0, 1) if task == "classification" else (0,)
        extra = (
            [
                "--aggregator",
                "instance_regressor",
                "--set",
                "bag_level=slide",
                "--set",
                "task_options.n_bins=3",
            ]
            if task == "survival"
            else []
        )
        for fold in folds:
            run = root / f"{task}{fold}"
            args = [
                "train",
                "--features",
                str(features),
                "--cohort",
                str(cohort),
                "--splits",
                str(splits),
                "--fold",
                str(fold),
                "--task",
                task,
                "--out",
                str(run),
                *TINY,
                *extra,
            ]
            assert main(args) == 0
            out[f"{task}{fold}"] = run
    return out


@pytest.mark.parametrize("run_name", ["classification0", "survival0"])
def test_predict_reproduces_the_runs_own_predictions_exactly(runs, tmp_path, run_name):
    run = runs[run_name]
    out = tmp_path / "predictions.csv"
    args = ["predict", "--model", str(run / "best.pt"), "--cohort", str(runs["cohort"])]
    assert main([*args, "--features-dir", str(runs["features"]), "--out", str(out)]) == 0
    ours = read_csv(out).set_index("slide_id")
    theirs = read_csv(run / "predictions.csv").set_index("slide_id")
    assert set(ours.index) == set(theirs.index)  # the same bags, joined per patient or not
    if run_name.startswith("classification"):
        assert ours.index.str.contains(";").any()  # patients with two slides are one bag, as in training
    else:
        assert not ours.index.str.contains(";").any()  # a slide-level run: one bag per slide
    ours = ours.loc[theirs.index]
    scores = [c for c in theirs.columns if c == "score" or c.startswith(("score_", "surv_"))]
    assert len(scores) == (1 if run_name.startswith("classification") else 4)  # score + 3 survival bins
    for column in [*scores, "patient_id"] + (["target"] if "target" in theirs else ["time", "event"]):
        assert ours[column].tolist() == theirs[column].tolist(), column  # exactly, not approximately
    test = theirs[theirs["split"] == "test"]
    assert len(test) > 0 and ours.loc[test.index, "score"].tolist() == test["score"].tolist()


def test_bag_files_score_like_the_cohort_table(runs, tmp_path):
    """Loose bag files are one bag each: for single-slide patients the same numbers as the cohort path."""
    run = runs["classification0"]
    reference = read_csv(run / "predictions.csv")
    single = reference[~reference["slide_id"].str.contains(";")].head(3)
    files = [str(runs["features"] / f"{s}.h5") for s in single["slide_id"]]
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(run / "best.pt"), "--features", *files, "--out", str(out)]) == 0
    ours = read_csv(out)
    assert ours.columns.tolist() == ["slide_id", "score", "prediction"]
    assert ours["slide_id"].tolist() == single["slide_id"].tolist()
    assert ours["score"].tolist() == single["score"].tolist()


def test_an_unlabelled_cohort_is_scored_without_targets(runs, tmp_path):
    """New slides: a table of ids alone; patient bags are joined as in training, no label columns."""
    table = read_csv(runs["cohort"])[["slide_id", "patient_id"]]
    table.to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "p.csv"
    args = [
        "predict",
        "--model",
        str(runs["classification0"] / "best.pt"),
        "--cohort",
        str(tmp_path / "new.csv"),
    ]
    assert main([*args, "--features-dir", str(runs["features"]), "--out", str(out)]) == 0
    ours = read_csv(out)
    assert ours.columns.tolist() == ["slide_id", "patient_id", "score", "prediction"]
    assert len(ours) == table["patient_id"].nunique()
    reference = read_csv(runs["classification0"] / "predictions.csv").set_index("slide_id")
    assert ours.set_index("slide_id")["score"].tolist() == reference.loc[ours["slide_id"], "score"].tolist()


def test_ensemble_is_the_mean_of_the_fold_models(runs, tmp_path):
    models = [str(runs[f"classification{k}"] / "best.pt") for k in (0, 1)]
    common = ["--cohort", str(runs["cohort"]), "--features-dir", str(runs["features"])]
    singles = []
    for k, model in enumerate(models):
        assert main(["predict", "--model", model, *common, "--out", str(tmp_path / f"{k}.csv")]) == 0
        singles.append(read_csv(tmp_path / f"{k}.csv"))
    assert main(["predict", "--model", *models, *common, "--out", str(tmp_path / "ens.csv")]) == 0
    ensemble = read_csv(tmp_path / "ens.csv")
    assert not np.allclose(singles[0]["score"], singles[1]["score"])  # two different models
    np.testing.assert_allclose(
        ensemble["score"], (singles[0]["score"] + singles[1]["score"]) / 2, rtol=1e-6
    )  # scores are float32
    assert (ensemble["prediction"] == (ensemble["score"] > 0.5).astype(int)).all()


@pytest.fixture()
def odd_bags(runs, tmp_path) -> dict[str, Path]:
    """A bag of another feature dimension and one of another encoder, made from a real bag."""
    bag = read_bag(runs["features"] / "S000.h5")
    wide = tmp_path / "wide.h5"
    write_bag(wide, np.hstack([bag.features, bag.features]), bag.coords, bag.coords_attrs, bag.attrs)
    other = tmp_path / "other.h5"
    write_bag(other, bag.features, bag.coords, bag.coords_attrs, {**bag.attrs, "encoder": "uni"})
    tiled = tmp_path / "tiled.h5"  # same encoder and dimension, tiles of 224 px at 1 um/px
    coarse = json.dumps({**TILING, "target_mpp": 1.0, "tile_px": 224})
    write_bag(tiled, bag.features, bag.coords, bag.coords_attrs, {**bag.attrs, "tiling": coarse})
    weights = tmp_path / "weights.h5"
    write_bag(weights, bag.features, bag.coords, bag.coords_attrs, {**bag.attrs, "encoder_weights_sha256": "cd" * 32})
    return {"wide": wide, "other": other, "tiled": tiled, "weights": weights}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("task", "is a classification model, not survival; give a checkpoint of a survival run"),
        ("wide", "holds 32-dimensional features but model"),
        ("other", "holds features of encoder uni but model"),
        ("tiled", "was tiled otherwise than model"),
        ("weights", "features made with other weights (sha256 cdcdcdcdcdcd...)"),
        ("mixed", "differ in task or task settings"),
    ],
)
def test_models_that_do_not_fit_are_refused_in_one_line(runs, odd_bags, tmp_path, capsys, case, message):
    model = str(runs["classification0"] / "best.pt")
    bag = str(runs["features"] / "S000.h5")
    args = {
        "task": ["--model", model, "--features", bag, "--task", "survival"],
        "wide": ["--model", model, "--features", str(odd_bags["wide"])],
        "other": ["--model", model, "--features", str(odd_bags["other"])],
        "tiled": ["--model", model, "--features", str(odd_bags["tiled"])],
        "weights": ["--model", model, "--features", str(odd_bags["weights"])],
        "mixed": ["--model", model, str(runs["survival0"] / "best.pt"), "--features", bag],
    }[case]
    out = tmp_path / "p.csv"
    assert main(["predict", *args, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_what_a_foreign_bag_does_not_record_is_said_once_per_model(caplog):
    """A model whose training bags record encoder weights and tiling, given bags that record neither (a
    CLAM .pt, another tool's file): nothing can be compared, and a warning says so, once per model and
    missing fact, not once per bag of a 10,000-slide cohort. A bag that records them is checked silently."""
    from pathmil.evaluation.predict import check_provenance

    tiling = TileConfig().tiling()
    trained = {"encoder": "uni", "encoder_weights_sha256": "ab" * 32, "random_init": False, "tiling": tiling}
    recorded = {"encoder": "uni", "encoder_weights_sha256": "ab" * 32, "tiling": json.dumps(tiling)}
    with caplog.at_level("WARNING", logger="pathmil.evaluation.predict"):
        check_provenance(trained, recorded, "ours.h5", "model m1", "fix")
        assert not caplog.records
        for bag in ("a.pt", "b.pt"):
            check_provenance(trained, {"encoder": "uni"}, bag, "model m1", "fix")
        check_provenance(trained, {}, "c.pt", "model m1", "fix")  # no encoder either: a new fact
        check_provenance(trained, {"encoder": "uni"}, "a.pt", "model m2", "fix")  # another model
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3, lines
    assert lines[0].startswith("a.pt records no encoder weights and no tiling (target_mpp, tile_px, overlap")
    assert "model m1" in lines[0] and lines[1].startswith("c.pt records no encoder (") and "model m2" in lines[2]
    # slideflow records its tile size (tile_um in tile_px): its resolution is compared, within 2 %
    slideflow = {"encoder": "uni", "tile_um": 302.0, "tile_px": 299, "target_mpp": 302 / 299}
    at_one = {**trained, "tiling": {**tiling, "target_mpp": 1.0, "tile_px": 299}}
    check_provenance(at_one, slideflow, "sf.pt", "model m3", "fix")  # 1.01 um/px: pathmil's 1.0
    with pytest.raises(PathmilError, match=r"sf.pt was tiled otherwise than model m3's .*target_mpp 4.0 vs 1.0"):
        check_provenance(at_one, {**slideflow, "tile_um": 1196.0, "target_mpp": 4.0}, "sf.pt", "model m3", "fix")
