"""Feature files that are not clean (issue 13 §4): every kind is one line naming the file, in every command
that reads bags (train, predict, heatmap), and nothing NaN is ever trained, saved or scored."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from synthetic import make_synthetic_cohort

from pathmil.cli import main
from pathmil.errors import PathmilError
from pathmil.features.bagfile import bag_shape, read_bag, write_bag
from pathmil.models.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--set", "epochs=2", "--set", "min_epochs=1", "--set", "model.hidden=8", "--no-progress"]
REDO = "delete it and extract the slide again"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict[str, Path]:
    """Eight patients of clean bags (16-d), their splits and a trained model (one fold)."""
    root = tmp_path_factory.mktemp("bad_bags")
    features, table = make_synthetic_cohort(root, n_patients=8, extra_slides=0, dim=16)
    splits = root / "splits.csv"
    assert (
        main(["split", "--cohort", str(table), "--task", "regression", "--folds", "2", "--out", str(splits)])
        == 0
    )
    run = root / "run"
    assert main([*train_args(features, table, splits, run), "--task", "regression", *TINY]) == 0
    return {"root": root, "features": features, "table": table, "splits": splits, "run": run}


def train_args(features: Path, table: Path, splits: Path, out: Path) -> list[str]:
    return ["train", "--features", str(features), "--cohort", str(table), "--splits", str(splits), "--fold", "0",
            "--out", str(out)]  # fmt: skip


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("pathmil: error:")]
    assert len(errors) == 1 and "Traceback" not in "\n".join(err), err
    return errors[0]


def spoil(path: Path, kind: str) -> str:
    """Damage bag ``path`` as real files get damaged; returns what the error line must say."""
    data = path.read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
        return "is empty (0 bytes)"
    if kind == "half":
        path.write_bytes(data[: len(data) // 2])
        return "is truncated ("
    if kind == "flipped":  # one byte of the features' data: only the Fletcher-32 checksum can see it
        with h5py.File(path, "r") as f:
            offset = f["features"].id.get_chunk_info(0).byte_offset
        spoiled = bytearray(data)
        spoiled[offset + 7] ^= 0xFF
        path.write_bytes(bytes(spoiled))
        return "is damaged ("
    if kind == "no_features":
        with h5py.File(path, "a") as f:
            del f["features"]
        return "has neither 'features'"
    bag = read_bag(path)
    features, coords = bag.features, bag.coords
    if kind == "nan_rows":
        features = features.copy()
        features[[2, 5]] = np.nan
        message = "has 2 of"
    elif kind == "inf_row":
        features = features.copy()
        features[0, 3] = np.inf
        message = "has 1 of"
    elif kind == "zero":
        features, coords = features[:0], coords[:0]
        message = "holds no instances (0 tiles)"
    elif kind == "int":
        features = np.rint(features).astype(np.int32)
        message = "holds int32 features; features must be floating point"
    elif kind == "coords":
        with h5py.File(path, "a") as f:
            del f["coords"]
            f["coords"] = coords[:-1]
        return f"has {len(features)} feature rows but {len(features) - 1} coords"
    elif kind == "wide":
        features = np.hstack([features, features])
        message = "has 32-dimensional features but"
    elif kind == "huge":
        features = features.astype(np.float32)
        features[1, 1] = 1e6
        message = "beyond float16's range"
    else:
        raise ValueError(kind)
    path.unlink()
    with h5py.File(path, "w") as f:  # written as another tool would: no pathmil checks on the way
        f["features"] = features
        f["coords"] = coords
        f.attrs.update(bag.attrs)
    return message


KINDS = ["empty", "half", "flipped", "no_features", "nan_rows", "inf_row", "zero", "int", "coords", "huge"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_bad_bag_is_one_line_naming_the_file(tmp_path, kind):
    path = tmp_path / "S1.h5"
    rng = np.random.default_rng(0)
    coords = np.stack(np.divmod(np.arange(12), 4), 1) * 256
    write_bag(path, rng.normal(size=(12, 8)).astype(np.float16), coords, {"patch_size_level0": 256},
              {"slide_id": "S1", "encoder": "synthetic"})  # fmt: skip
    message = spoil(path, kind)
    with pytest.raises(PathmilError) as caught:
        read_bag(path)
    line = str(caught.value)
    assert str(path) in line and message in line and "\n" not in line, line
    if kind in ("empty", "half", "flipped", "no_features", "nan_rows", "inf_row", "coords"):
        assert REDO in line, line  # and how to redo it
    if kind in ("empty", "half", "no_features", "zero", "int"):  # the cheap shape read refuses them too
        with pytest.raises(PathmilError, match=r"S1\.h5"):
            bag_shape(path)


@pytest.mark.parametrize("kind", ["half", "flipped", "nan_rows", "zero", "int", "coords", "wide"])
def test_train_predict_and_heatmap_refuse_a_bad_bag_alike(cohort, tmp_path, capsys, kind):
    """One rule for every command: a bad bag is refused with the same line (NaN rows are not dropped)."""
    features = tmp_path / "features"
    shutil.copytree(cohort["features"], features)
    bad = features / "S003.h5"
    message = spoil(bad, kind)
    run = tmp_path / "run"
    assert (
        main([*train_args(features, cohort["table"], cohort["splits"], run), "--task", "regression", *TINY])
        == 1
    )
    line = one_error_line(capsys)
    assert "S003.h5" in line and message in line, line
    assert not (run / "best.pt").exists() and not (run / "metrics.json").exists()
    model = str(cohort["run"] / "best.pt")
    out = tmp_path / "p.csv"
    if kind != "wide":  # one wide bag alone is refused for its dimension by the model (test_predict)
        assert main(["predict", "--model", model, "--features", str(bad), "--out", str(out)]) == 1
        assert message in one_error_line(capsys) and not out.exists()
        heatmap = [
            "heatmap",
            "--model",
            model,
            "--features",
            str(bad),
            "--slide",
            str(bad),
            "--out",
            str(out),
        ]
        assert main(heatmap) == 1
        assert message in one_error_line(capsys) and not out.exists()
    args = ["predict", "--model", model, "--cohort", str(cohort["table"]), "--features-dir", str(features)]
    assert main([*args, "--out", str(out)]) == 1
    line = one_error_line(capsys)
    assert "S003.h5" in line and message in line and not out.exists(), line


def test_float64_features_are_read_with_a_warning(cohort, tmp_path, caplog):
    path = tmp_path / "S000.h5"
    bag = read_bag(cohort["features"] / "S000.h5")
    with h5py.File(path, "w") as f:
        f["features"] = bag.features.astype(np.float64)
        f["coords"] = bag.coords
    with caplog.at_level("WARNING"):
        again = read_bag(path)
    assert again.features.dtype == np.float64 and np.array_equal(again.features, bag.features)
    assert any("S000.h5 holds float64 features" in r.getMessage() for r in caplog.records)
    out = tmp_path / "p.csv"
    assert (
        main(
            ["predict", "--model", str(cohort["run"] / "best.pt"), "--features", str(path), "--out", str(out)]
        )
        == 0
    )
    reference = pd.read_csv(cohort["run"] / "predictions.csv").set_index("slide_id")
    if "S000" in reference.index:  # the float16 values the file holds score as training scored them
        assert abs(pd.read_csv(out)["score"][0] - reference.loc["S000", "score"]) < 1e-6


def test_a_diverging_run_stops_at_the_step_naming_its_bags_and_saves_no_nan(cohort, tmp_path, capsys):
    run = tmp_path / "run"
    args = [*train_args(cohort["features"], cohort["table"], cohort["splits"], run), "--task", "regression"]
    big = ["--set", "lr=1e6", "--set", "warmup_epochs=0", "--set", "epochs=3", "--set", "min_epochs=1"]
    assert main([*args, *big, "--no-progress"]) == 1
    line = one_error_line(capsys)
    assert "training diverged at epoch 2, step" in line and "on bag(s) P0" in line and "lr" in line, line
    assert not (run / "metrics.json").exists() and not (run / "predictions.csv").exists()
    saved = [p for p in (run / "best.pt", run / "last.pt") if p.exists()]
    assert saved, "epoch 1 was saved before the divergence"
    for path in saved:  # what was written holds finite weights only
        weights = load_checkpoint(path)["model"]
        assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_no_checkpoint_with_nan_weights_is_written_or_loaded(cohort, tmp_path):
    checkpoint = load_checkpoint(cohort["run"] / "best.pt")
    name = next(k for k, v in checkpoint["model"].items() if v.is_floating_point())
    checkpoint["model"][name] = checkpoint["model"][name].clone().fill_(float("nan"))
    with pytest.raises(PathmilError, match=f"refusing to write .*weights {name} hold NaN or inf"):
        save_checkpoint(tmp_path / "best.pt", checkpoint)
    assert not (tmp_path / "best.pt").exists()
    torch.save(checkpoint, tmp_path / "nan.pt")  # as an older pathmil could have written it
    with pytest.raises(PathmilError, match=r"nan.pt holds NaN or inf weights .*: its training diverged"):
        load_checkpoint(tmp_path / "nan.pt")


def test_evaluate_refuses_a_run_without_finite_scores(cohort, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(cohort["run"], run)
    table = pd.read_csv(run / "predictions.csv")
    table.loc[3, "score"] = np.nan
    table.to_csv(run / "predictions.csv", index=False)
    assert main(["evaluate", "--runs", str(run), "--out", str(tmp_path / "eval")]) == 1
    line = one_error_line(capsys)
    assert "predictions.csv has no finite score for 1 bag(s)" in line and str(table["slide_id"][3]) in line
