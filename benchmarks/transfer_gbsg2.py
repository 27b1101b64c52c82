"""Knowledge transfer on real survival data: GBSG2 split by menopausal status.

The German Breast Cancer Study Group 2 trial (686 patients; scikit-survival's copy) is cut by a covariate
into two cohorts of one disease: the 396 postmenopausal patients are the large *source* cohort, the 290
premenopausal patients the *target*. The target plays a small cohort: a fixed test set of 80 % of its
patients (stratified by event x follow-up) and three folds over the other 20 % (58 patients: about 39
train and 19 validate in each). Each patient is a bag of one instance, its seven clinical covariates
(age, oestrogen and progesterone receptors, nodes, tumour size, grade, hormone therapy) standardised with
the source's statistics: the "encoder" both cohorts share (its parameters' sha256 is the bag's
``encoder_weights_sha256``). On one-instance bags ABMIL is an MLP; the point is the transfer machinery on
real outcomes, not MIL.

Steps (all through the ``pathmil`` commands): 5-fold ABMIL on the source (discrete-time NLL, 4 bins) ->
``pathmil package`` -> the package applied as is to the target's test set (``predict --package`` +
``evaluate --predictions``: external validation) -> the target trained three ways over 3 seeds x 3 folds:
from scratch (``abmil``), fine-tuned from the package (``train.init_from``), and ``moe_pkt`` with the five
source fold models as experts -> ``pathmil compare`` (paired bootstrap over the target's test patients).

    python benchmarks/transfer_gbsg2.py [--out benchmarks/out/transfer_gbsg2] [--seeds 0 1 2]

Writes ``OUT/transfer_gbsg2.md`` and ``.json``; finished training runs are kept on a rerun.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pathmil.cli import main
from pathmil.features.bagfile import write_bag

COVARIATES = ["age", "estrec", "progrec", "pnodes", "tsize", "tgrade", "horTh"]
TRAIN = [
    "--set", "task_options.loss=nll", "--set", "task_options.n_bins=4",
    "--set", "model.hidden=32", "--set", "model.attention_hidden=16", "--set", "model.dropout=0.1",
    "--set", "lr=1e-3", "--set", "epochs=40", "--set", "min_epochs=10", "--set", "patience=10",
    "--set", "accumulation=8", "--no-progress",
]  # fmt: skip
STRATEGIES = {
    "scratch": [],
    "finetune": ["--set", "init_from={package}"],
    "moe_pkt": [
        "--aggregator", "moe_pkt", "--set", "sources=[{package}]",
        "--set", "model.hidden=32", "--set", "model.attention_hidden=16",
    ],
}  # fmt: skip


def run(*args: str) -> None:
    """A pathmil command; a training run already finished (its metrics.json) is kept."""
    if args[0] == "train" and (Path(args[args.index("--out") + 1]) / "metrics.json").is_file():
        return
    code = main(["--threads", "1", *args])
    if code != 0:
        raise SystemExit(f"pathmil {' '.join(args)} failed with status {code}")


def covariates(x: pd.DataFrame) -> pd.DataFrame:
    """The seven covariates as numbers: receptors and nodes on a log scale, grade 1-3, therapy 0/1."""
    return pd.DataFrame(
        {
            "age": x["age"],
            "estrec": np.log1p(x["estrec"]),
            "progrec": np.log1p(x["progrec"]),
            "pnodes": np.log1p(x["pnodes"]),
            "tsize": x["tsize"],
            "tgrade": x["tgrade"].map({"I": 1, "II": 2, "III": 3}).astype(float),
            "horTh": (x["horTh"] == "yes").astype(float),
        }
    )[COVARIATES]


def write_cohorts(out: Path) -> dict[str, Path]:
    """Bags (one instance per patient, standardised with the source's statistics) and two cohort tables."""
    from sksurv.datasets import load_gbsg2

    x, y = load_gbsg2()
    values = covariates(x)
    source = (x["menostat"] == "Post").to_numpy()
    mean, std = values[source].mean(), values[source].std()
    encoder = json.dumps({"mean": mean.round(6).tolist(), "std": std.round(6).tolist()}, sort_keys=True)
    sha = hashlib.sha256(encoder.encode()).hexdigest()
    features = ((values - mean) / std).to_numpy(np.float32)
    ids = np.array([f"G{i:03d}" for i in range(len(x))])
    for i, patient in enumerate(ids):
        write_bag(
            out / "features" / f"{patient}.h5",
            features[i : i + 1],
            np.zeros((1, 2), np.int64),
            {"patch_size": 1, "patch_level": 0},
            {"slide_id": str(patient), "encoder": "gbsg2-covariates", "encoder_weights_sha256": sha},
        )
    table = pd.DataFrame(
        {"slide_id": ids, "patient_id": ids, "time": y["time"] / 30.44, "event": y["cens"].astype(int)}
    )  # months
    paths = {}
    for name, rows in (("source", source), ("target", ~source)):
        paths[name] = out / name / "cohort.csv"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        table[rows].to_csv(paths[name], index=False)
    return paths


def main_run(out: Path, seeds: list[int]) -> dict:
    start = time.perf_counter()
    cohorts = write_cohorts(out)
    features = str(out / "features")
    timings = {}

    # the source: 5-fold cross-validation, evaluated and packaged
    splits = out / "source" / "splits.csv"
    run(
        "split",
        "--cohort",
        str(cohorts["source"]),
        "--task",
        "survival",
        "--folds",
        "5",
        "--out",
        str(splits),
    )
    source_runs = []
    for fold in range(5):
        run_dir = out / "source" / "runs" / f"fold{fold}"
        run(
            "train", "--features", features, "--cohort", str(cohorts["source"]), "--splits", str(splits),
            "--fold", str(fold), "--task", "survival", "--out", str(run_dir), *TRAIN,
        )  # fmt: skip
        source_runs.append(str(run_dir))
    package = out / "source.pathmil"
    run("evaluate", "--runs", *source_runs, "--out", str(out / "source" / "eval"))
    run(
        "package", "--runs", *source_runs, "--out", str(package), "--cohort-name", "GBSG2 postmenopausal",
        "--evaluation", str(out / "source" / "eval"),
    )  # fmt: skip
    timings["source"] = time.perf_counter() - start

    # the target: a fixed test set (80 %), three folds of a small training part
    splits = out / "target" / "splits.csv"
    run(
        "split", "--cohort", str(cohorts["target"]), "--task", "survival", "--folds", "3",
        "--test-frac", "0.8", "--out", str(splits),
    )  # fmt: skip
    test = pd.read_csv(splits).query("split == 'test' and fold == 0")
    target = pd.read_csv(cohorts["target"])
    target[target["slide_id"].isin(test["slide_id"])].to_csv(out / "target" / "test.csv", index=False)
    zero_shot = out / "target" / "zero_shot"
    run(
        "predict", "--package", str(package), "--cohort", str(out / "target" / "test.csv"),
        "--features-dir", features, "--out", str(zero_shot / "predictions.csv"),
    )  # fmt: skip
    run(
        "evaluate", "--predictions", str(zero_shot / "predictions.csv"), "--package", str(package),
        "--out", str(zero_shot / "eval"),
    )  # fmt: skip
    for strategy, extra in STRATEGIES.items():
        tick = time.perf_counter()
        extra = [a.format(package=package) for a in extra]
        for seed in seeds:
            for fold in range(3):
                run(
                    "train", "--features", features, "--cohort", str(cohorts["target"]), "--splits", str(splits),
                    "--fold", str(fold), "--task", "survival",
                    "--out", str(out / "target" / "runs" / strategy / f"seed{seed}" / f"fold{fold}"),
                    *TRAIN, "--set", f"seed={seed}", *extra,
                )  # fmt: skip
        timings[strategy] = time.perf_counter() - tick
    run("compare", "--runs", str(out / "target" / "runs"), "--out", str(out / "target" / "compare"))
    timings["all"] = time.perf_counter() - start
    return summarise(out, timings)


def summarise(out: Path, timings: dict) -> dict:
    source = json.loads((out / "source" / "eval" / "metrics.json").read_text())
    zero = json.loads((out / "target" / "zero_shot" / "eval" / "metrics.json").read_text())
    compare = json.loads((out / "target" / "compare" / "comparison.json").read_text())
    result = {
        "source_c_index": [source["pooled"]["c_index"], *source["ci"]["c_index"]],
        "zero_shot_c_index": [zero["pooled"]["c_index"], *zero["ci"]["c_index"]],
        "n_test": zero["n_test_bags"],
        "configurations": compare["configurations"],
        "pairs": compare.get("pairs", []),
        "verdicts": compare.get("verdicts", []),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    lines = [
        "| model | target test c-index [95 % CI] |",
        "|---|---:|",
        "| source package as is (zero-shot) | {:.3f} [{:.3f}, {:.3f}] |".format(*result["zero_shot_c_index"]),
    ]
    for row in compare["configurations"]:
        lines.append(
            f"| {row['configuration']} | {row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] |"
        )
    lines += ["", *result["verdicts"]]
    text = "\n".join(lines) + "\n"
    (out / "transfer_gbsg2.md").write_text(text)
    (out / "transfer_gbsg2.json").write_text(json.dumps(result, indent=2, default=str))
    print(text)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/transfer_gbsg2"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    main_run(args.out, args.seeds)
