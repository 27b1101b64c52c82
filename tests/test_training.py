"""Splits, the training loop, resume, reproducibility, bad tables, and a real survival dataset."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from synthetic import make_synthetic_cohort

from pathmil.cli import main
from pathmil.errors import PathmilError
from pathmil.tasks import create_task
from pathmil.training.fit import check_teacher
from pathmil.training.run import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "--set",
    "epochs=12",
    "--set",
    "min_epochs=4",
    "--set",
    "patience=4",
    "--set",
    "lr=1e-3",
    "--set",
    "model.hidden=64",
    "--no-progress",
]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    features, table = make_synthetic_cohort(root, n_patients=36, extra_slides=8)
    return root, features, table


def split(table: Path, task: str, out: Path, *extra: str) -> pd.DataFrame:
    assert (
        main(
            [
                "split",
                "--cohort",
                str(table),
                "--task",
                task,
                "--folds",
                "3",
                "--val-frac",
                "0.25",
                "--out",
                str(out),
                *extra,
            ]
        )
        == 0
    )
    return pd.read_csv(out, dtype={"slide_id": str, "patient_id": str})


@pytest.mark.parametrize("task", ["classification", "survival", "regression"])
def test_splits_are_patient_level_and_partition_the_patients(cohort, tmp_path, task):
    _root, _, table = cohort
    splits = split(table, task, tmp_path / "splits.csv")
    labels = pd.read_csv(table, dtype={"slide_id": str, "patient_id": str})
    n_patients = labels["patient_id"].nunique()
    assert splits.groupby("fold")["slide_id"].nunique().eq(len(labels)).all()  # every slide, every fold
    # a patient's slides never straddle two parts of a fold
    assert splits.groupby(["fold", "patient_id"])["split"].nunique().eq(1).all()
    tests = splits[splits["split"] == "test"].groupby("fold")["patient_id"].apply(set)
    assert sum(len(t) for t in tests) == n_patients and set.union(*tests) == set(labels["patient_id"])
    assert (splits[splits["split"] == "val"].groupby("fold").size() > 0).all()
    if task == "classification":  # stratified: both classes in every test fold
        merged = splits.merge(labels[["slide_id", "label"]], on="slide_id")
        assert merged[merged["split"] == "test"].groupby("fold")["label"].nunique().eq(2).all()


def test_fixed_test_set(cohort, tmp_path):
    _, _, table = cohort
    splits = split(table, "classification", tmp_path / "s.csv", "--test-frac", "0.25")
    tests = splits[splits["split"] == "test"].groupby("fold")["patient_id"].apply(frozenset)
    assert tests.nunique() == 1  # the same test patients in every fold
    vals = splits[splits["split"] == "val"].groupby("fold")["patient_id"].apply(set)
    assert not set.intersection(*vals)  # validation rotates over the rest
    n_patients = splits["patient_id"].nunique()
    for frac in (0.25, 0.75):  # a large test set (a small training part) is what it says, too
        splits = split(table, "classification", tmp_path / "s.csv", "--test-frac", str(frac))
        n_test = splits[(splits["split"] == "test") & (splits["fold"] == 0)]["patient_id"].nunique()
        assert abs(n_test / n_patients - frac) < 0.1, (frac, n_test, n_patients)


def bad_table(tmp_path: Path, table: Path, edit) -> Path:
    frame = pd.read_csv(table, dtype={"slide_id": str, "patient_id": str})
    path = tmp_path / "bad.csv"
    edit(frame).to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda f: f.assign(label=f["label"].where(f.index != 3)), "has no value in column 'label'"),
        (
            lambda f: f.assign(slide_id=f["slide_id"].where(f.index != 4, f["slide_id"][0])),
            "slide id S000 appears twice",
        ),
        (lambda f: f.drop(columns="patient_id"), "lacks column(s) patient_id"),
        (
            lambda f: f.assign(label=np.where(f.index == len(f) - 1, 1 - f["label"], f["label"])),
            "has conflicting labels across its slides",
        ),
    ],
)
def test_bad_tables_fail_clearly(cohort, tmp_path, capsys, edit, message):
    _, _, table = cohort
    path = bad_table(tmp_path, table, edit)
    code = main(
        ["split", "--cohort", str(path), "--task", "classification", "--out", str(tmp_path / "s.csv")]
    )
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1
    assert not (tmp_path / "s.csv").exists()


def test_unknown_slides_in_splits_fail_clearly(cohort, tmp_path, capsys):
    _root, features, table = cohort
    splits = split(table, "classification", tmp_path / "s.csv")
    smaller = bad_table(tmp_path, table, lambda f: f.iloc[2:])
    code = main(
        [
            "train",
            "--features",
            str(features),
            "--cohort",
            str(smaller),
            "--splits",
            str(tmp_path / "s.csv"),
            "--fold",
            "0",
            "--task",
            "classification",
            "--out",
            str(tmp_path / "run"),
            *QUICK,
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "not in the cohort table" in err and splits is not None


def train_run(features, table, splits, out, task, *extra) -> dict:
    assert (
        main(
            [
                "train",
                "--features",
                str(features),
                "--cohort",
                str(table),
                "--splits",
                str(splits),
                "--fold",
                "0",
                "--task",
                task,
                "--out",
                str(out),
                *QUICK,
                *extra,
            ]
        )
        == 0
    )
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("task", "metric", "floor"),
    [("classification", "auc", 0.8), ("survival", "c_index", 0.7), ("regression", "r2", 0.4)],
)
def test_training_learns_and_writes_its_outputs(cohort, tmp_path, task, metric, floor):
    _, features, table = cohort
    splits = tmp_path / "s.csv"
    split(table, task, splits)
    extra = ("--set", "task_options.n_bins=4") if task == "survival" else ()
    summary = train_run(features, table, splits, tmp_path / "run", task, *extra)
    run = tmp_path / "run"
    for name in ("best.pt", "last.pt", "history.csv", "predictions.csv", "metrics.json", "config.yaml"):
        assert (run / name).is_file(), name
    predictions = pd.read_csv(run / "predictions.csv", dtype={"slide_id": str, "patient_id": str})
    assert set(predictions["split"]) == {"train", "val", "test"}
    target_cols = ["time", "event"] if task == "survival" else ["target"]
    assert list(predictions.columns[:4]) == ["slide_id", "patient_id", "fold", "split"]
    assert set(target_cols) <= set(predictions.columns) and "score" in predictions.columns
    assert predictions["patient_id"].is_unique  # patient-level bags: one row per patient
    joined = predictions[predictions["slide_id"].str.contains(";")]
    assert len(joined) > 0  # patients with two slides are one bag listing both
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == list(range(1, len(history) + 1))
    # train fit + learnable: the main metric is well above chance on the train and validation bags
    assert summary["metrics"]["train"][metric] > floor, summary["metrics"]
    assert summary["main_metric"] == metric


def test_same_seed_repeats_exactly(cohort, tmp_path):
    _, features, table = cohort
    splits = tmp_path / "s.csv"
    split(table, "classification", splits)
    a = train_run(features, table, splits, tmp_path / "a", "classification")
    b = train_run(features, table, splits, tmp_path / "b", "classification")
    assert a["metrics"] == b["metrics"] and a["best_epoch"] == b["best_epoch"]
    pa, pb = (pd.read_csv(tmp_path / r / "predictions.csv") for r in ("a", "b"))
    assert np.array_equal(pa["score"].to_numpy(), pb["score"].to_numpy())


def test_a_format_1_last_pt_stops_the_run_with_its_fix(cohort, tmp_path, capsys):
    """A last.pt of checkpoint format 1 kept numpy's random state as a numpy array, which the safe loader
    refuses. The run stops, with the fix in one line (its message had said pathmil never writes such
    files), and leaves the file as it was; deleted, the run trains as a clean one."""
    _, features, table = cohort
    splits = tmp_path / "s.csv"
    split(table, "classification", splits)
    clean = train_run(features, table, splits, tmp_path / "clean", "classification")
    old = torch.load(tmp_path / "clean" / "last.pt", weights_only=True)
    old.pop("format_version")
    old["rng"]["numpy"] = ("MT19937", np.arange(624, dtype=np.uint32), 624, 0, 0.0)  # as format 1 saved it
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "last.pt")
    size = (tmp_path / "old" / "last.pt").stat().st_size
    with pytest.raises(AssertionError):  # train_run asserts exit status 0; the CLI printed why not
        train_run(features, table, splits, tmp_path / "old", "classification")
    err = capsys.readouterr().err
    assert "checkpoint format 1" in err and "delete it to train this run from its first epoch" in err, err
    assert (tmp_path / "old" / "last.pt").stat().st_size == size
    (tmp_path / "old" / "last.pt").unlink()
    again = train_run(features, table, splits, tmp_path / "old", "classification")
    assert again["metrics"] == clean["metrics"] and again["best_epoch"] == clean["best_epoch"]


# Snakemake deletes the declared outputs of a killed job (best.pt, metrics.json, predictions.csv) and keeps
# last.pt: the rerun must end as if never killed either way.
@pytest.mark.parametrize(
    "deleted", [(), ("best.pt", "metrics.json", "predictions.csv")], ids=["cli", "snakemake"]
)
def test_resume_after_a_kill_gives_the_same_result(cohort, tmp_path, deleted):
    _, features, table = cohort
    splits = tmp_path / "s.csv"
    split(table, "regression", splits)
    args = [
        sys.executable,
        "-m",
        "pathmil",
        "train",
        "--features",
        str(features),
        "--cohort",
        str(table),
        "--splits",
        str(splits),
        "--fold",
        "0",
        "--task",
        "regression",
        *QUICK,
        "--set",
        "epochs=10",
        "--set",
        "min_epochs=10",
    ]
    reference = tmp_path / "reference"
    done = subprocess.run([*args, "--out", str(reference)], check=True, capture_output=True, text=True)
    # one log line per epoch, for `tail -f`: the epoch, the losses, the validation metric, the time
    lines = [line for line in done.stderr.splitlines() if re.search(r"fold 0 epoch \d+/10: ", line)]
    assert [int(re.search(r"epoch (\d+)/", line)[1]) for line in lines] == list(range(1, 11))
    for line in lines:
        pattern = r"train_loss [\d.]+ val_loss [\d.]+ val_r2 -?[\d.]+ lr [\d.e-]+ [\d.]+ s"
        assert re.search(pattern, line), line
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        if (killed / "last.pt").is_file() and torch.load(killed / "last.pt", weights_only=True)["state"][
            "epoch"
        ] >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = torch.load(killed / "last.pt", weights_only=True)["state"]["epoch"]
    assert 3 <= interrupted_at < 10 and not (killed / "metrics.json").exists()
    for name in deleted:
        (killed / name).unlink(missing_ok=True)
    subprocess.run([*args, "--out", str(killed)], check=True, capture_output=True)
    a = json.loads((reference / "metrics.json").read_text())
    b = json.loads((killed / "metrics.json").read_text())
    assert a["metrics"] == b["metrics"] and a["best_epoch"] == b["best_epoch"]
    history = pd.read_csv(killed / "history.csv")
    assert history["epoch"].tolist() == list(range(1, 11))
    pa, pb = (pd.read_csv(run / "predictions.csv") for run in (reference, killed))
    pd.testing.assert_frame_equal(pa, pb)
    best = torch.load(killed / "best.pt", weights_only=True)
    assert best["epoch"] == a["best_epoch"]


def test_evaluate_pools_folds_with_confidence_intervals(cohort, tmp_path):
    _, features, table = cohort
    splits = tmp_path / "s.csv"
    split(table, "classification", splits)
    runs = []
    for fold in range(3):
        out = tmp_path / f"fold{fold}"
        assert (
            main(
                [
                    "train",
                    "--features",
                    str(features),
                    "--cohort",
                    str(table),
                    "--splits",
                    str(splits),
                    "--fold",
                    str(fold),
                    "--task",
                    "classification",
                    "--out",
                    str(out),
                    *QUICK,
                ]
            )
            == 0
        )
        runs.append(str(out))
    assert main(["evaluate", "--runs", *runs, "--out", str(tmp_path / "eval"), "--n-bootstrap", "200"]) == 0
    result = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    patients = pd.read_csv(table)["patient_id"].nunique()
    assert result["n_test_bags"] == patients  # every patient tested once
    summary = pd.read_csv(tmp_path / "eval" / "metrics_summary.csv").set_index("metric")
    auc = summary.loc["auc"]
    assert auc["ci_low"] <= auc["pooled"] <= auc["ci_high"] and auc["ci_high"] - auc["ci_low"] > 0
    assert len(pd.read_csv(tmp_path / "eval" / "metrics_per_fold.csv")) == 3
    assert {"fold_mean", "fold_std", "fold_iqm"} <= set(summary.columns)


def test_progress_bar_and_log_lines_do_not_overwrite_each_other(cohort, tmp_path):
    """On a terminal the epoch bar and the per-epoch log lines share stderr: every log line starts on a
    line of its own (tqdm's logging_redirect_tqdm clears the bar first), not after a bar's fragment."""
    _, features, table = cohort
    splits = tmp_path / "s.csv"
    split(table, "classification", splits)
    args = [sys.executable, "-m", "pathmil", "train", "--features", str(features), "--cohort", str(table),
            "--splits", str(splits), "--fold", "0", "--task", "classification", "--out", str(tmp_path / "run"),
            *[a for a in QUICK if a != "--no-progress"], "--set", "epochs=4", "--set", "min_epochs=4"]  # fmt: skip
    main_fd, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    process = subprocess.Popen(args, stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True)
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=120) == 0
    os.close(main_fd)
    screen = b"".join(chunks).decode(errors="replace")
    assert "epoch/s" in screen or "s/epoch" in screen  # the bar was drawn
    epoch_lines = [line for line in screen.split("\n") if re.search(r"fold 0 epoch \d+/4: ", line)]
    assert len(epoch_lines) == 4
    for line in epoch_lines:  # after the line's last carriage return (the pty ends lines with \r\n): the log
        # line alone; without the helper it would follow a fragment of the bar
        shown = line.rstrip("\r").rsplit("\r", 1)[-1]
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ", shown), repr(line)


@pytest.mark.parametrize("task", ["classification", "survival", "regression"])
def test_training_under_bf16_autocast_as_on_a_gpu(cohort, tmp_path, monkeypatch, task):
    """On a GPU, training, validation and scoring run under bf16 autocast (``amp``) in float32 models; the
    CPU trains in float32 and scores with a float64 copy. Here the CPU runs all three under bf16 autocast
    in float32 models, as a GPU would, so mixed-precision faults of the models, losses and scoring show
    without a GPU: ABMIL, MHIM-MIL v2 (its teacher from the ABMIL run) and MambaMIL train, score and write
    finite predictions in every task. (MambaMIL runs its PyTorch scan here; the kernels' types are
    tests/test_mamba.py's stand-in tests.)"""
    import pathmil.training.fit as fit
    import pathmil.training.run as run_module

    asked: dict[str, list[bool]] = {"fit": [], "run": []}

    def on_gpu(module):
        def dtype(device, amp):
            asked[module].append(amp)
            return torch.bfloat16 if amp else None

        return dtype

    monkeypatch.setattr(fit, "mil_autocast_dtype", on_gpu("fit"))
    monkeypatch.setattr(run_module, "mil_autocast_dtype", on_gpu("run"))
    monkeypatch.setattr(run_module, "scoring_dtype", lambda device: torch.float32)  # as on a GPU
    _, features, table = cohort
    splits = tmp_path / "s.csv"
    split(table, task, splits)
    short = ["--set", "epochs=3", "--set", "min_epochs=1", "--set", "lr=1e-3", "--no-progress"]
    if task == "survival":
        short += ["--set", "task_options.n_bins=4"]
    runs = {
        "abmil": ["--set", "model.hidden=32"],
        "mhim_abmil": ["--set", "model.hidden=32", "--teacher-init", str(tmp_path / "abmil" / "best.pt")],
        "mambamil": ["--set", "model.d_model=32", "--set", "model.d_state=4"],
    }
    for aggregator, extra in runs.items():
        out = tmp_path / aggregator
        args = ["train", "--features", str(features), "--cohort", str(table), "--splits", str(splits),
                "--fold", "0", "--task", task, "--out", str(out), "--aggregator", aggregator]  # fmt: skip
        assert main([*args, *short, *extra]) == 0, aggregator
        summary = json.loads((out / "metrics.json").read_text())
        predictions = pd.read_csv(out / "predictions.csv")
        scores = predictions.filter(regex="^(score|prob|risk)").to_numpy(float)
        assert scores.size and np.isfinite(scores).all(), (aggregator, predictions.head())
        assert np.isfinite(summary["metrics"]["test"][summary["main_metric"]]), (aggregator, summary)
    # training and validation (fit) and the written scores (run.score_bag) all ran under bf16 autocast
    assert asked["fit"] and asked["run"] and all(asked["fit"] + asked["run"])


def test_a_run_is_scored_in_the_precision_it_was_trained_in(cohort, tmp_path, monkeypatch):
    """A model trained on the CPU (float32) and scored on a GPU runs in float32 there, not in bf16: the H200
    check found bf16 moved such a model's scores by up to 2.3 % of their range. A GPU is simulated as in
    the bf16 test above (bf16 autocast where asked, float32 scoring models); a run marked as trained under
    bf16 is scored in bf16, so the float32 path is the one the run's record chose."""
    import dataclasses

    import pathmil.training.run as run_module
    from pathmil.features.bagfile import read_bag
    from pathmil.models.checkpoint import load_checkpoint

    _, features, table = cohort
    splits = tmp_path / "s.csv"
    split(table, "regression", splits)
    train_run(features, table, splits, tmp_path / "run", "regression")
    assert load_checkpoint(tmp_path / "run" / "best.pt")["trained_in_bf16"] is False
    bags = [torch.from_numpy(read_bag(p).features).float() for p in sorted(features.glob("*.h5"))[:6]]
    on_cpu = run_module.load_run(tmp_path / "run")
    reference = torch.cat([on_cpu.score(bag).logits for bag in bags]).double()

    monkeypatch.setattr(
        run_module, "mil_autocast_dtype", lambda device, bf16: torch.bfloat16 if bf16 else None
    )
    monkeypatch.setattr(run_module, "scoring_dtype", lambda device: torch.float32)
    as_trained = run_module.load_run(tmp_path / "run")
    assert as_trained.trained_in_bf16 is False
    in_bf16 = dataclasses.replace(as_trained, trained_in_bf16=True)
    scale = float(reference.max() - reference.min())
    gap = {
        name: float((torch.cat([r.score(bag).logits for bag in bags]).double() - reference).abs().max())
        / scale
        for name, r in (("float32", as_trained), ("bf16", in_bf16))
    }
    assert gap["float32"] < 1e-5 and gap["bf16"] > 1e-4, gap


def test_a_run_is_not_resumed_once_the_baseline_it_started_from_was_trained_again(cohort, tmp_path, caplog):
    """MHIM-MIL's teacher (like a fine-tuning start or a transfer source) is a file the run starts from: a
    last.pt left by an earlier run must not stand in for training on the retrained baseline (the workflow
    deletes a rule's declared outputs, not last.pt, before running it again)."""
    _, features, table = cohort
    splits = tmp_path / "s.csv"
    split(table, "classification", splits)
    common = ["train", "--features", str(features), "--cohort", str(table), "--splits", str(splits),
              "--fold", "0", "--task", "classification", "--no-progress", "--set", "epochs=2",
              "--set", "min_epochs=2", "--set", "model.hidden=16"]  # fmt: skip
    baseline, student = tmp_path / "abmil", tmp_path / "mhim"
    assert main([*common, "--aggregator", "abmil", "--out", str(baseline)]) == 0
    mhim = [*common, "--aggregator", "mhim_abmil", "--out", str(student),
            "--set", f"mhim.teacher_init={baseline / 'best.pt'}"]  # fmt: skip
    assert main(mhim) == 0
    first = torch.load(student / "best.pt", weights_only=True)["model"]
    for output in ("best.pt", "predictions.csv", "metrics.json"):
        (student / output).unlink()
    assert main([*common, "--aggregator", "abmil", "--out", str(baseline), "--set", "lr=5e-2"]) == 0
    caplog.clear()
    with caplog.at_level("INFO", logger="pathmil.training.fit"):
        assert main(mhim) == 0
    assert "resuming" not in caplog.text and "starting afresh" in caplog.text
    again = torch.load(student / "best.pt", weights_only=True)["model"]
    assert any(not torch.equal(first[k], again[k]) for k in first)


def test_an_mhim_teacher_from_another_fold_or_label_is_refused(cohort, tmp_path, capsys):
    """Fold 1's baseline trained on fold 0's test patients: as fold 0's teacher it would hand the student
    what the test set holds, and the test metrics would be optimistic with exit 0. Checkpoints keep
    digests of each split's patients, not the ids."""
    _, features, table = cohort
    splits = tmp_path / "s.csv"
    split(table, "classification", splits)
    common = ["train", "--features", str(features), "--cohort", str(table), "--splits", str(splits),
              "--task", "classification", "--no-progress", "--set", "epochs=1", "--set", "min_epochs=1",
              "--set", "model.hidden=16"]  # fmt: skip
    for fold in (0, 1):
        run = ["--fold", str(fold), "--aggregator", "abmil", "--out", str(tmp_path / f"a{fold}")]
        assert main([*common, *run]) == 0
    kept = torch.load(tmp_path / "a1" / "best.pt", weights_only=True)["patients"]
    patients = pd.read_csv(table, dtype={"patient_id": str})["patient_id"]
    assert not set(patients) & set(kept["test"]) and len(kept["test"][0]) == 16  # digests, not ids
    student = [*common, "--fold", "0", "--aggregator", "mhim_abmil", "--out", str(tmp_path / "m")]
    capsys.readouterr()
    assert main([*student, "--set", f"mhim.teacher_init={tmp_path / 'a1' / 'best.pt'}"]) == 1
    assert "of this fold's test patients" in capsys.readouterr().err and not (tmp_path / "m" / "best.pt").exists()
    # the same fold and two classes, but trained on another label column: its attention masks for that one
    other = ["--fold", "0", "--aggregator", "abmil", "--out", str(tmp_path / "e0"), "--set", "target=[event]"]
    assert main([*common, *other]) == 0
    capsys.readouterr()
    assert main([*student, "--set", f"mhim.teacher_init={tmp_path / 'e0'}"]) == 1
    assert "was trained for classification (classes 0, 1) on column event, this run is classification " \
        "(classes 0, 1) on column label" in capsys.readouterr().err
    # also in a hyperparameter search's trials, whose folds hold no test part
    task = create_task("classification")
    task.fit(pd.DataFrame({"label": [0, 1, 0, 1]}))
    config = TrainConfig(aggregator="mhim_abmil", mhim={"teacher_init": str(tmp_path / "e0")})
    with pytest.raises(PathmilError, match="on column event, this run"):
        check_teacher(config, task, SimpleNamespace(tables={}))
    assert main([*student, "--set", f"mhim.teacher_init={tmp_path / 'a0'}"]) == 0  # its own fold's run
    # fine-tuned from that MHIM run, a new student keeps its own baseline as teacher (momentum 1: frozen)
    again = [*common, "--fold", "0", "--aggregator", "mhim_abmil", "--out", str(tmp_path / "m2")]
    assert main([*again, "--set", f"mhim.teacher_init={tmp_path / 'a0'}", "--set", f"init_from={tmp_path / 'm'}",
                 "--set", "mhim.momentum=1.0"]) == 0  # fmt: skip
    baseline = torch.load(tmp_path / "a0" / "best.pt", weights_only=True)["model"]
    teacher = torch.load(tmp_path / "m2" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(teacher[f"teacher.{k}"], v) for k, v in baseline.items())
