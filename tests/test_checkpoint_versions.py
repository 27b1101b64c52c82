"""Checkpoints of another pathmil version (issue 13 §6): every checkpoint records its format version; one
that holds settings this version does not know, or lacks some it has, loads with one warning naming the
file and both versions, or fails in one line saying so; predict, heatmaps and MHIM-MIL's teacher load it
through the same function (load_run) and agree."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest
import torch
from synthetic import TINY_TRAINING, make_synthetic_cohort, split_and_train

from pathmil import __version__
from pathmil.cli import main
from pathmil.errors import PathmilError
from pathmil.evaluation.heatmap import instance_scores
from pathmil.features.bagfile import read_bag
from pathmil.models.checkpoint import FORMAT_VERSION, load_checkpoint
from pathmil.training.run import TrainConfig, build_model, load_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OURS = f"pathmil {__version__}, checkpoint format {FORMAT_VERSION}"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("versions")
    features, table = make_synthetic_cohort(root, n_patients=8, extra_slides=0, dim=16)
    _, (run,) = split_and_train(root, features, table, folds=[0])
    return {"root": root, "features": features, "table": table, "best": run / "best.pt"}


def edited(source: Path, out: Path, edit) -> Path:
    """A copy of ``source`` edited to look like a checkpoint of another version."""
    checkpoint = torch.load(source, weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, out)
    return out


def older(checkpoint: dict) -> None:
    """pathmil 0.0.9: no format field (version 1), a setting since removed, settings it did not have yet."""
    del checkpoint["format_version"]
    checkpoint["pathmil_version"] = "0.0.9"
    checkpoint["config"]["bag_weighting"] = "uniform"
    checkpoint["config"]["model"]["legacy_norm"] = True
    del checkpoint["config"]["memory_budget_gb"]
    checkpoint["task"]["settings"]["smoothing"] = 0.0
    del checkpoint["task"]["settings"]["class_weights"]


def test_a_fresh_checkpoint_records_its_versions(run):
    checkpoint = load_checkpoint(run["best"])
    assert checkpoint["format_version"] == FORMAT_VERSION and checkpoint["pathmil_version"] == __version__


def test_an_older_checkpoint_loads_with_one_warning_and_every_loader_agrees(run, tmp_path, caplog):
    old = edited(run["best"], tmp_path / "old.pt", older)
    with caplog.at_level(logging.WARNING, logger="pathmil.training.run"):
        loaded = load_run(old)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    line = warnings[0]
    assert str(old) in line and "pathmil 0.0.9, checkpoint format 1" in line and OURS in line, line
    for key in ("train.bag_weighting", "model.legacy_norm", "task.smoothing"):
        assert key in line.split("ignored:")[1].split(";")[0], line
    for key in ("train.memory_budget_gb", "task.class_weights"):
        assert key in line.split("defaults:")[1], line
    assert "unknown setting" not in line
    reference = load_run(run["best"])
    for key, value in reference.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value)

    # predict: the same numbers from both files
    common = ["--cohort", str(run["table"]), "--features-dir", str(run["features"])]
    assert main(["predict", "--model", str(run["best"]), *common, "--out", str(tmp_path / "a.csv")]) == 0
    assert main(["predict", "--model", str(old), *common, "--out", str(tmp_path / "b.csv")]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"))

    # heatmaps: the same instance scores and slide score
    bag = read_bag(run["features"] / "S000.h5")
    ours, theirs = instance_scores(reference, bag), instance_scores(load_run(old), bag)
    assert (ours[0] == theirs[0]).all() and ours[1] == theirs[1]

    # MHIM-MIL's teacher: the same weights, through the same loader (and its warning)
    caplog.clear()
    config = TrainConfig(aggregator="mhim_abmil", model={"hidden": 8}, mhim={"teacher_init": str(old)})
    mhim = build_model(config, 16, reference.task)
    with caplog.at_level(logging.WARNING, logger="pathmil.training.run"):
        mhim.prepare_training()
    assert any(str(old) in r.getMessage() and OURS in r.getMessage() for r in caplog.records)
    for key, value in reference.model.state_dict().items():
        assert torch.equal(mhim.teacher.state_dict()[key], value)


def test_an_older_checkpoint_serves_as_fine_tuning_source_and_mhim_teacher(run, tmp_path):
    """`train.init_from` and `mhim.teacher_init` read an older checkpoint's task as load_run does (its
    settings since removed are ignored), not refuse it as an unknown setting."""
    old = edited(run["best"], tmp_path / "old.pt", older)
    train = ["train", "--features", str(run["features"]), "--cohort", str(run["table"]), "--splits",
             str(run["root"] / "splits.csv"), "--fold", "0", "--task", "classification", "--no-progress",
             *TINY_TRAINING]  # fmt: skip
    assert main([*train, "--out", str(tmp_path / "ft"), "--set", f"init_from={old}"]) == 0
    mhim = ["--aggregator", "mhim_abmil", "--set", f"mhim.teacher_init={old}"]
    assert main([*train, "--out", str(tmp_path / "mhim"), *mhim]) == 0


def this_version_lacking(checkpoint: dict) -> None:
    """This very pathmil version, saved by a build before two settings were added (the version number
    only moves at releases)."""
    del checkpoint["config"]["memory_budget_gb"]
    del checkpoint["task"]["settings"]["class_weights"]


def test_a_checkpoint_of_this_version_without_a_setting_names_it_without_a_version_difference(
    run, tmp_path, caplog
):
    dev = edited(run["best"], tmp_path / "dev.pt", this_version_lacking)
    with caplog.at_level(logging.WARNING, logger="pathmil.training.run"):
        loaded = load_run(dev)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"checkpoint {dev} was written by this pathmil ({OURS}) with other settings: settings it lacks, at "
        "their defaults: train.memory_budget_gb, task.class_weights"
    ]
    assert loaded.config.memory_budget_gb == TrainConfig().memory_budget_gb
    # what this build cannot use is one line without a story of two versions
    bad = edited(run["best"], tmp_path / "bad.pt", lambda c: c["config"].update(aggregator="future_mil"))
    with pytest.raises(PathmilError, match="unknown aggregator 'future_mil'") as refused:
        load_run(bad)
    assert "written by" not in str(refused.value) and "\n" not in str(refused.value)


def newer_with(**config):
    def edit(checkpoint: dict) -> None:
        checkpoint["format_version"] = FORMAT_VERSION + 1
        checkpoint["pathmil_version"] = "9.0.0"
        for key, value in config.items():
            if key == "model":
                checkpoint["config"]["model"].update(value)
            else:
                checkpoint["config"][key] = value

    return edit


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"model": {"hidden": 12}}, "weights do not fit aggregator abmil"),
        ({"aggregator": "future_mil"}, "unknown aggregator 'future_mil'"),
        ({"optimizer": "lion"}, "setting train.optimizer"),
    ],
    ids=["weights", "aggregator", "value"],
)
def test_a_checkpoint_this_version_cannot_use_fails_in_one_line_naming_both_versions(
    run, tmp_path, capsys, change, words
):
    new = edited(run["best"], tmp_path / "new.pt", newer_with(**change))
    bag = str(run["features"] / "S000.h5")
    commands = {
        "predict": ["predict", "--model", str(new), "--features", bag, "--out", str(tmp_path / "p.csv")],
        "heatmap": ["heatmap", "--model", str(new), "--features", bag, "--slide", bag, "--out", str(tmp_path / "h.png")],
        "teacher": ["train", "--features", str(run["features"]), "--cohort", str(run["table"]),
                    "--splits", str(run["root"] / "splits.csv"), "--fold", "0", "--aggregator", "mhim_abmil",
                    "--teacher-init", str(new), "--out", str(tmp_path / "mhim"), "--no-progress",
                    "--set", "model.hidden=8", "--set", "epochs=1"],
    }  # fmt: skip
    lines = {}
    for name, argv in commands.items():
        assert main(argv) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert "Traceback" not in "\n".join(err)
        lines[name] = [line for line in err if line.startswith("pathmil: error:")]
        assert len(lines[name]) == 1, (name, err)
    for name, (line,) in lines.items():
        assert str(new) in line and words in line, (name, line)
        assert "written by pathmil 9.0.0, checkpoint format 3" in line and f"this is {OURS}" in line, line
        assert "; allowed:" not in line  # not the message of a user's typo
