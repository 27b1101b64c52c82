"""Train the MHIM-MIL authors' own code on the bags and folds of ``mil_quality.py`` (issue 18, item 2).

This file is pathmil's glue only. The authors' code (DearCaat/MHIM-MIL, checked at commit 9d0c91a) is
checked out outside the repository and never committed; this script puts it on ``sys.path`` and calls its
``main.one_fold`` unchanged, with its own data loader, model builder, training engine, optimiser,
scheduler and early stopping. What the glue adds:

- the data in the authors' layout: per fold, ``<work>/<problem>/fold<k>/pt_files/<bag>.pt`` (float32, the
  bag file's instances in their stored order) and ``csv/fold_<k>.csv`` (ID, Label, Split; survival also
  Event, Status) with the benchmark's train, val and test bags of that fold. Each fold gets its own
  ``pt_files`` because the authors' loader matches file names by substring (``g0b001`` would also load
  ``g0b001t.pt``, the hard problem's test version of that bag);
- survival labels as the authors' ``survival_label`` (4 quantile bins of the uncensored times), but with
  the quantiles of the training bags only (theirs cut on the whole table, test patients included);
- two keyword arguments the current master passes to its ``MHIM`` class, which no longer accepts them
  (``attn_layer``, ``select_mask``), dropped;
- the test predictions: the fold's best-validation checkpoint (the authors' ``fold_<k>_model_best.pt``)
  scores the test bags as the authors' ``validate_func`` does (softmax for classification; risk = minus
  the sum of the survival curve for survival), written as ``<out>/<problem>/seed<s>/runs/<method>/
  fold<k>/predictions.csv``, which ``mil_quality.py`` stores and compares (``REFERENCE_OF``).

Settings: the authors' ``config/feat_cls.yaml`` or ``feat_surv.yaml`` (Adam, weight decay 1e-5, cosine
schedule, their early stopping with patience 20, resp. 15 for survival), 20 epochs at lr 5e-4 (their
configs: 100-200 at 2e-4) as pathmil's benchmark runs, seed = the benchmark seed, one torch thread.
Methods: ``ref_abmil`` (their ``abmil``, DAttention), ``ref_pure`` (their ABMIL-type MHIM baseline
``mhim_pure``, the teacher's initialisation) and ``ref_mhim_v2`` (the README's MHIM-MIL v2 command with
the first values of its grid: mask_ratio_h 0.01, merge_ratio 0.8, merge_k 1, aux_alpha 0.5; its teacher
the same fold's ``ref_pure``, which must have run first).

Usage (from the repository root, with an environment holding pathmil's packages plus the authors'
imports: einops, wandb, torchmetrics, torch_geometric, future)::

    # the authors' code, outside the repo (CLAM/ is left out: one of its blobs is missing from snapshots)
    git -C <mirror> archive HEAD -- . ':(exclude)CLAM' | tar -x -C /scratch/MHIM-MIL
    python benchmarks/reference/mhim_mil.py --ref /scratch/MHIM-MIL --work /scratch/mhim_work \\
        --out benchmarks/out/mq --problem witness1 --method ref_pure [--seed 0]
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

FOLDS = 5
TRAIN = ["--num_epoch", "20", "--lr", "5e-4", "--num_workers", "0", "--cv_fold", str(FOLDS), "--no_prefetch",
         "--no_prefetch_test"]  # fmt: skip
METHOD_ARGS = {
    "ref_abmil": ["--model", "abmil"],
    "ref_pure": ["--model", "mhim_pure", "--baseline", "attn"],
    "ref_mhim_v2": [
        "--model", "mhim", "--baseline", "attn", "--attn2score", "--merge_enable", "--merge_mm", "0.9999",
        "--aux_alpha", "0.5", "--mask_ratio_h", "0.01", "--merge_ratio", "0.8", "--merge_k", "1",
    ],
}  # fmt: skip
SURVIVAL_PROBLEMS = {"survival"}


def survival_bins(table: pd.DataFrame, train: pd.Series, n_bins: int = 4) -> np.ndarray:
    """Discrete time labels as the authors' ``survival_label``, quantiles from ``train`` rows only."""
    eps = 1e-6
    _, bins = pd.qcut(
        table.loc[train & (table["Status"] == 1), "Event"], q=n_bins, retbins=True, labels=False
    )
    bins[-1], bins[0] = table["Event"].max() + eps, table["Event"].min() - eps
    return pd.cut(table["Event"], bins=bins, labels=False, right=False, include_lowest=True).to_numpy(int)


def prepare_fold(data: Path, work: Path, fold: int, survival: bool) -> tuple[Path, Path, pd.DataFrame]:
    """The fold's bags as ``pt_files`` and its ``fold_<k>.csv``; returns (dataset root, csv, fold rows)."""
    cohort, splits = pd.read_csv(data / "cohort.csv"), pd.read_csv(data / "splits.csv")
    part = splits[splits["fold"] == fold].merge(cohort, on=["slide_id", "patient_id"])
    root = work / f"fold{fold}"
    (root / "pt_files").mkdir(parents=True, exist_ok=True)
    for bag in part["slide_id"]:
        target = root / "pt_files" / f"{bag}.pt"
        if not target.is_file():
            with h5py.File(data / "features" / f"{bag}.h5") as f:
                torch.save(torch.from_numpy(f["features"][:].astype(np.float32)), target)
    if survival:
        table = pd.DataFrame({
            "ID": part["slide_id"], "Event": part["time"], "Status": part["event"].astype(int), "Split": part["split"],
        })  # fmt: skip
        table.insert(3, "Label", survival_bins(table, table["Split"] == "train"))
    else:
        table = pd.DataFrame(
            {"ID": part["slide_id"], "Label": part["label"].astype(int), "Split": part["split"]}
        )
    csv = root / "csv" / f"fold_{fold}.csv"
    csv.parent.mkdir(exist_ok=True)
    table.to_csv(csv, index=False)
    return root, csv, part


def drop_stale_mhim_arguments() -> None:
    """Let the authors' model builder construct ``MHIM`` with the keyword arguments it still accepts."""
    import modules
    from modules.mhim import MHIM

    accepted = set(inspect.signature(MHIM.__init__).parameters)

    def build(*args, **kwargs):
        return MHIM(*args, **{k: v for k, v in kwargs.items() if k in accepted})

    modules.MHIM = build


def score_test_bags(args, device, root: Path, part: pd.DataFrame, fold: int, survival: bool) -> pd.DataFrame:
    """pathmil's predictions.csv rows of the fold's test bags, from the best-validation checkpoint."""
    from engines.common_mil import CommonMIL
    from modules import build_model

    model, _ = build_model(args, device, None)
    best = torch.load(
        Path(args.output_path) / f"fold_{fold}_model_best.pt", map_location="cpu", weights_only=True
    )
    model.load_state_dict(best["model"])
    model.eval()
    engine, rows = CommonMIL(args), []
    with torch.no_grad():
        for r in part[part["split"] == "test"].itertuples():
            bag = torch.load(root / "pt_files" / f"{r.slide_id}.pt", weights_only=True).unsqueeze(0)
            logits, _ = engine.validate_func(args, model, bag, None, None, 1, 0, None)
            logits = logits[0] if isinstance(logits, (list, tuple)) else logits
            row = {"slide_id": r.slide_id, "patient_id": r.patient_id, "fold": fold, "split": "test"}
            if survival:
                curve = torch.cumprod(1 - torch.sigmoid(logits), dim=1)
                row |= {"time": r.time, "event": int(r.event), "score": float(-curve.sum())}
            else:
                p = float(torch.softmax(logits, dim=1)[0, 1])
                row |= {"target": int(r.label), "score": p, "prediction": int(p >= 0.5)}
            rows.append(row)
    print(f"[mhim_mil] fold {fold}: best validation epoch {best['epoch']}", flush=True)
    return pd.DataFrame(rows)


def run(ref: Path, work: Path, out: Path, problem: str, method: str, seed: int) -> None:
    """Train and score every fold of (problem, seed) not yet written; see the module docstring."""
    torch.set_num_threads(1)
    data = out / problem / f"seed{seed}" / "data"
    survival = problem in SURVIVAL_PROBLEMS
    runs = work / "runs" / f"seed{seed}"
    with h5py.File(next((data / "features").glob("*.h5"))) as f:
        input_dim = f["features"].shape[1]
    extra = list(METHOD_ARGS[method])
    if method == "ref_mhim_v2":
        teacher = runs / problem / "ref_pure"
        missing = [k for k in range(FOLDS) if not (teacher / f"fold_{k}_model_best.pt").is_file()]
        if missing:  # the authors' builder would print the error and go on with an untrained teacher
            sys.exit(f"no ref_pure teacher for folds {missing} in {teacher}: run --method ref_pure first")
        extra += ["--teacher_init", str(teacher)]
    os.chdir(ref)
    sys.path.insert(0, str(ref))
    import main as authors
    from datasets.data_utils import get_data_dfs, get_split_dfs
    from options import _parse_args, more_about_config

    drop_stale_mhim_arguments()
    for fold in range(FOLDS):
        target = out / problem / f"seed{seed}" / "runs" / method / f"fold{fold}" / "predictions.csv"
        if target.is_file():
            continue
        root, csv, part = prepare_fold(data, work / problem / f"seed{seed}", fold, survival)
        sys.argv = [
            "main.py", "-c", f"config/feat_{'surv' if survival else 'cls'}.yaml",
            # 'bio' makes the authors' classification loader read integer labels; 'surv' selects survival
            "--datasets", "surv_bench" if survival else "bio_bench", "--dataset_root", str(root),
            "--csv_path", str(csv), "--output_path", str(runs), "--project", problem, "--title", method,
            "--fold_start", str(fold), "--input_dim", str(input_dim), "--seed", str(seed), *TRAIN, *extra,
        ]  # fmt: skip
        args, _ = _parse_args()
        args, device = more_about_config(args)
        args.attn_layer = 0  # read by the builder, no longer an option
        args.output_path = str(runs / problem / method)
        os.makedirs(args.output_path, exist_ok=True)
        authors.utils.seed_torch(args.seed)
        train, test, val = get_split_dfs(args, get_data_dfs(args, args.csv_path))
        args.fold_curr = fold
        n_metrics = 2 if survival else 12
        started = time.time()
        authors.one_fold(args, device, [[] for _ in range(n_metrics)], [[], []], [[] for _ in range(n_metrics)],
                         {"train": train, "test": test, "val": val})  # fmt: skip
        table = score_test_bags(args, device, root, part, fold, survival)
        target.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(target.with_suffix(".tmp"), index=False)
        os.replace(target.with_suffix(".tmp"), target)
        print(f"[mhim_mil] {problem} {method} fold {fold}: {time.time() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ref", type=Path, required=True, help="checkout of DearCaat/MHIM-MIL (outside the repo)"
    )
    parser.add_argument(
        "--work", type=Path, required=True, help="scratch folder for its data and checkpoints"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/out/mil_quality"), help="mil_quality --out"
    )
    parser.add_argument("--problem", required=True)
    parser.add_argument("--method", required=True, choices=sorted(METHOD_ARGS))
    parser.add_argument("--seed", type=int, default=0)
    a = parser.parse_args(argv)
    run(a.ref.resolve(), a.work.resolve(), a.out.resolve(), a.problem, a.method, a.seed)


if __name__ == "__main__":
    main()
