"""Bad cohort tables (issue 13 §3): the workflow's dry run (which checks the table when it parses) and the
commands that read the table (`pathmil cohort`, `split`, `train`) refuse each kind with the same words, so
the two checks cannot drift apart: one table per kind, fed to both."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from workflow_helpers import job_counts, snakemake, workflow_copy, write_config

from pathmil.cli import main

GOOD = {
    "slide_id": "s1",
    "patient_id": "p1",
    "path": "a.svs",
    "label": 1,
    "time": 5.0,
    "event": 1,
    "stil": 40,
}
SECOND = {**GOOD, "slide_id": "s2", "patient_id": "p2", "path": "b.svs"}
HEADER = ",".join(GOOD) + "\n"

# kind: (the table: rows or raw text, the task whose commands read it, the words both must say)
KINDS = {
    "empty": ("", "classification", ["is empty; it needs a header and one row per slide"]),
    "semicolons": ("slide_id;patient_id;path\ns1;p1;a.svs\n", "classification",
                   ["looks ';'-separated; save it with commas"]),
    "header-only": (HEADER, "classification", ["has no rows (only a header)"]),
    "same-file": ([GOOD, {**SECOND, "path": "a.svs"}], "classification",
                  ["appears twice (slides s1 and s2)", "the same slide file under two slide ids"]),
    "slide-id": ([{**GOOD, "slide_id": "../escaped"}], "classification", ["'../escaped' is not allowed"]),
    "same-id": ([GOOD, {**SECOND, "slide_id": "s1"}], "classification",
                ["slide id s1 appears twice; every slide needs a unique id (rename one)"]),
    "event": ([GOOD, {**SECOND, "event": 2}], "survival",
              ["slide s2", "it must be 1 (event observed) or 0 (censored)"]),
    "time": ([GOOD, {**SECOND, "time": -1}], "survival", ["slide s2", "-1", "it must be >= 0"]),
    "nan-label": ([GOOD, {**SECOND, "label": None}], "classification",
                  ["slide s2 has no value in column 'label'"]),
    "na-text-label": ([GOOD, {**SECOND, "label": "NA"}], "classification",
                      ["slide s2 has no value in column 'label'"]),
    "nan-time": ([GOOD, {**SECOND, "time": "nan"}], "survival", ["slide s2 has no value in column 'time'"]),
    "nan-stil": ([GOOD, {**SECOND, "stil": "NaN"}], "regression", ["slide s2 has no value in column 'stil'"]),
    "no-patient": ([GOOD, {**SECOND, "patient_id": None}], "classification",
                   ["slide s2 has no value in column 'patient_id'"]),
    "conflict": ([GOOD, {**SECOND, "patient_id": "p1", "label": 0}], "classification",
                 ["patient p1 has conflicting labels"]),
    "fractions": ([{**GOOD, "stil": 0.4}, {**SECOND, "stil": 0.1}], "regression",
                  ["lies within [0, 1] but the range is [0, 100]", "percentages given as fractions"]),
    "range": ([GOOD, {**SECOND, "stil": 140}], "regression", ["outside [0, 100]", "140"]),
    "mpp-text": ([GOOD, {**SECOND, "mpp": "abc"}], "classification",
                 ["line 3: slide s2: mpp is 'abc'; it must be a number of um/px in [0.05, 20]"]),
    "mpp-zero": ([{**GOOD, "mpp": 0.25}, {**SECOND, "mpp": 0}], "classification",
                 ["line 3: slide s2: mpp is 0; it must be a number of um/px in [0.05, 20]"]),
}  # fmt: skip
# `pathmil cohort` and `pathmil tile --cohort` see these too
STRUCTURE = {"empty", "semicolons", "header-only", "same-file", "same-id", "slide-id", "mpp-text", "mpp-zero"}


def write_table(folder: Path, table: list[dict] | str) -> Path:
    path = folder / "cohort.csv"
    if isinstance(table, str):
        path.write_text(table)
        return path
    pd.DataFrame(table).to_csv(path, index=False)
    for row in table:
        (folder / str(row["path"])).write_bytes(b"")
    return path


def cli_lines(capsys, *argv: str) -> list[str]:
    """The error lines of one pathmil command that must fail."""
    assert main(list(argv)) == 1, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err), err
    return [line for line in err if line.startswith("pathmil: error:")]


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_cli_and_the_workflow_refuse_each_bad_table_alike(tmp_path, mobilenet_weights, capsys, kind):
    table, task, words = KINDS[kind]
    path = write_table(tmp_path, table)
    commands = [["split", "--cohort", str(path), "--task", task, "--folds", "2", "--out", str(tmp_path / "s.csv")],
                ["train", "--features", str(tmp_path), "--cohort", str(path), "--splits", str(tmp_path / "s.csv"),
                 "--fold", "0", "--task", task, "--out", str(tmp_path / "run"), "--no-progress"]]  # fmt: skip
    if kind in STRUCTURE:
        commands.append(["cohort", "--cohort", str(path), "--out", str(tmp_path / "c.csv")])
        commands.append(
            ["tile", "--cohort", str(path), "--out-dir", str(tmp_path / "tiles"), "--skip-errors"]
        )
    for argv in commands:
        lines = cli_lines(capsys, *argv)
        assert len(lines) == 1 and all(w in lines[0] for w in words), (argv[0], lines)
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "c.csv").exists()

    config = {
        "cohort": "bad",
        "slides": {"table": str(path)},
        "extract": {"encoder": "mobilenet_v2", "weights": str(mobilenet_weights)},
        "tasks": {task: None},
    }
    done = snakemake(workflow_copy(tmp_path / "w"), "-n", "--configfile",
                     str(write_config(tmp_path / "c.yaml", config)), check=False)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0 and all(w in output for w in words), output[-3000:]
    assert "Traceback" not in output, output[-3000:]


THREE = [
    GOOD,
    {**SECOND, "label": 0, "stil": 10},
    {**SECOND, "slide_id": "s3", "patient_id": "p3", "path": "c.svs"},
]
FIVE = [*THREE, {**SECOND, "slide_id": "s4", "patient_id": "p4", "path": "d.svs", "label": 0},
        {**SECOND, "slide_id": "s5", "patient_id": "p5", "path": "e.svs"}]  # fmt: skip


@pytest.mark.parametrize(
    ("rows", "task", "folds", "advised", "words"),
    [
        (THREE, "regression", 4, 3,
         "split.folds is 4 but the cohort has only 3 patients; each fold needs one in its test part: use at most 3 folds"),
        (FIVE, "classification", 3, 2,
         "split.folds is 3 but only 2 patients have class 0 in column 'label'; each fold needs one in its test part: "
         "use at most 2 folds"),
        # more folds than patients and than a class's: the tighter limit, whose advice works
        (FIVE, "classification", 6, 2,
         "split.folds is 6 but only 2 patients have class 0 in column 'label'; each fold needs one in its test part: "
         "use at most 2 folds"),
        # a survival test part without an event has no c-index
        ([*FIVE[:2], *({**row, "event": 0} for row in FIVE[2:])], "survival", 3, 2,
         "split.folds is 3 but only 2 patients have an event (column 'event' is 1); each fold needs one in its "
         "test part: use at most 2 folds"),
        # none to spare: what to do is named without advising a fold count
        ([FIVE[0], *({**row, "event": 0} for row in FIVE[1:])], "survival", 3, None,
         "split.folds is 3 but only 1 patient has an event (column 'event' is 1); each fold needs one in its "
         "test part: cross-validation needs at least 2 of them"),
    ],
    ids=["patients", "class", "both", "events", "one-event"],
)  # fmt: skip
def test_more_folds_than_patients_or_than_a_class_is_refused_alike(
    tmp_path, mobilenet_weights, capsys, rows, task, folds, advised, words
):
    """`pathmil split` and the workflow's dry run (before the split job) say the same one line, and the
    number of folds it advises works."""
    path = write_table(tmp_path, rows)

    def split(n: int) -> list[str]:
        return [
            "split",
            "--cohort",
            str(path),
            "--task",
            task,
            "--folds",
            str(n),
            "--out",
            str(tmp_path / "s.csv"),
        ]

    assert cli_lines(capsys, *split(folds)) == [f"pathmil: error: {words}"]
    if advised:
        assert main(split(advised)) == 0
    config = {
        "cohort": "bad",
        "slides": {"table": str(path)},
        "extract": {"encoder": "mobilenet_v2", "weights": str(mobilenet_weights)},
        "tasks": {task: None},
        "split": {"folds": folds},
    }
    done = snakemake(workflow_copy(tmp_path / "w"), "-n", "--configfile",
                     str(write_config(tmp_path / "c.yaml", config)), check=False)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0 and f"\n{words}\n" in output, output[-3000:]
    if not advised:
        return
    config["split"]["folds"] = advised
    done = snakemake(
        workflow_copy(tmp_path / "w2"), "-n", "--configfile", str(write_config(tmp_path / "c.yaml", config))
    )
    assert "split.folds" not in done.stdout + done.stderr


def test_slide_level_labels_split_per_slide_and_keep_patients_whole(tmp_path, capsys):
    """Camelyon17: a patient's lymph-node slides carry their own labels. With bag_level slide, split and
    train accept the table (patient bags still refuse it), strata are the slides' labels, and every
    patient lies in one part of each fold."""
    rows = []
    for p in range(12):
        for s in range(3):
            label = int(s < p % 3)  # patients with 0, 1 or 2 positive nodes of 3
            rows.append({"slide_id": f"P{p:02d}_node{s}", "patient_id": f"P{p:02d}", "path": f"{p}_{s}.tif",
                         "label": label})  # fmt: skip
    path = write_table(tmp_path, rows)
    out = tmp_path / "splits.csv"
    split = ["split", "--cohort", str(path), "--task", "classification", "--folds", "3", "--out", str(out)]
    assert "patient P01 has conflicting labels" in cli_lines(capsys, *split)[0]
    assert main([*split, "--bag-level", "slide"]) == 0
    splits = pd.read_csv(out)
    assert set(splits["slide_id"]) == {r["slide_id"] for r in rows}  # every slide, once per fold
    assert (splits.groupby("fold").size() == len(rows)).all()
    assert (splits.groupby(["fold", "patient_id"])["split"].nunique() == 1).all()  # no leakage
    assert (splits[splits["split"] == "test"].groupby("patient_id")["fold"].nunique() == 1).all()
    labels = splits.merge(pd.DataFrame(rows)[["slide_id", "label"]], on="slide_id")
    test = labels[labels["split"] == "test"]
    assert (test.groupby("fold")["label"].nunique() == 2).all()  # stratified per slide: both classes


def test_a_foreign_splits_file_that_splits_a_patient_is_refused(tmp_path, capsys):
    from synthetic import make_synthetic_cohort

    features, table = make_synthetic_cohort(tmp_path, n_patients=8, extra_slides=2, dim=8)
    cohort = pd.read_csv(table, dtype=str)
    twice = cohort["patient_id"][cohort["patient_id"].duplicated()].iloc[0]
    slides = cohort[cohort["patient_id"] == twice]["slide_id"].tolist()
    splits = pd.DataFrame(
        {"slide_id": cohort["slide_id"], "patient_id": "unknown", "fold": 0, "split": "train"}
    )
    splits.loc[splits["slide_id"] == slides[1], "split"] = "test"  # another tool, split by slide
    splits.to_csv(tmp_path / "splits.csv", index=False)
    args = ["train", "--features", str(features), "--cohort", str(table), "--splits", str(tmp_path / "splits.csv"),
            "--fold", "0", "--out", str(tmp_path / "run"), "--no-progress"]  # fmt: skip
    line = cli_lines(capsys, *args)[0]
    assert f"patient {twice} lies in test and train of fold 0" in line and slides[1] in line, line
    assert not (tmp_path / "run" / "best.pt").exists()


def test_a_missing_slide_file_is_named_by_the_dry_run_and_left_to_its_tile_job(tmp_path, mobilenet_weights):
    """A slide file that does not exist is no error when the workflow parses (its tile job records the
    failure and the others go on), but the dry run names it, so a wrong folder shows before any job."""
    path = write_table(
        tmp_path, [GOOD, SECOND, {**SECOND, "slide_id": "s3", "patient_id": "p3", "path": "c.svs"}]
    )
    (tmp_path / "c.svs").unlink()
    config = {
        "cohort": "missing",
        "slides": {"table": str(path)},
        "extract": {"encoder": "mobilenet_v2", "weights": str(mobilenet_weights)},
        "tasks": {"regression": None},
        "split": {"folds": 2},
    }
    done = snakemake(
        workflow_copy(tmp_path / "w"), "-n", "--configfile", str(write_config(tmp_path / "c.yaml", config))
    )
    output = done.stdout + done.stderr
    assert (
        f"warning: 1 of 3 slide files in the cohort table do not exist (first: slide s3, {tmp_path / 'c.svs'})"
        in output
    ), output[-3000:]
    assert job_counts(output)["tile"] == 3  # the plan goes on: the missing slide's job records its failure


def test_a_cox_loss_with_one_bag_per_step_is_refused_by_the_dry_run_before_any_tiling(tmp_path, mobilenet_weights):
    """The Cox loss of one bag is 0 with a zero gradient: `pathmil train` refuses it (TrainConfig), and the
    workflow at parse time, not at its first train job hours of tiling later; accumulation wherever it is
    set (train, the task's train, the aggregator's entry) counts."""
    rows = [{**GOOD, "slide_id": f"s{i}", "patient_id": f"p{i}", "path": f"{i}.svs"} for i in range(8)]
    config = {
        "cohort": "cox",
        "slides": {"table": str(write_table(tmp_path, rows))},
        "extract": {"encoder": "mobilenet_v2", "weights": str(mobilenet_weights)},
        "tasks": {"survival": {"task_options": {"loss": "cox"}}},
        "aggregators": ["abmil", "mean_pool"],
        "split": {"folds": 2},
    }
    done = snakemake(workflow_copy(tmp_path / "w"), "-n", "--configfile",
                     str(write_config(tmp_path / "c.yaml", config)), check=False)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "tasks.survival.task_options.loss cox compares the bags of one optimiser step" in output
    assert "train.accumulation 1 gives each step one bag (aggregator abmil)" in output
    config["models"] = {"abmil": {"accumulation": 32}}  # mean_pool still steps on one bag
    done = snakemake(workflow_copy(tmp_path / "w2"), "-n", "--configfile",
                     str(write_config(tmp_path / "c2.yaml", config)), check=False)  # fmt: skip
    assert "(aggregator mean_pool)" in done.stdout + done.stderr
    config["tasks"]["survival"]["train"] = {"accumulation": 32}
    config.pop("models")
    done = snakemake(workflow_copy(tmp_path / "w3"), "-n", "--configfile",
                     str(write_config(tmp_path / "c3.yaml", config)))  # fmt: skip
    assert job_counts(done.stdout + done.stderr)["train"] == 4  # 2 aggregators x 2 folds
