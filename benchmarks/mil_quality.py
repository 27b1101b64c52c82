"""Where each aggregator helps: MIL problems from real data, each built so that one claim can show.

Instances are real handwritten digits (scikit-learn's 8 x 8 digits, 64 features, as in Ilse et al.'s
MNIST-bags) or real patients (scikit-survival's GBSG2 breast-cancer cohort). Each problem has a plain
baseline that must fail or trail where the claim holds, and controls where no method should lose:

- ``plain`` (control): 10-40 clean digits, positive iff the bag holds a 9 (1-3 of them).
- ``witness1`` (control, MHIM-MIL's known failure): 20-50 noisy digits, a positive bag holds exactly one 9.
- ``hard`` (MHIM-MIL's premise): a positive bag (20-40 digits) holds 2-4 noisy 3s (hard) and, in training and validation,
  one clean, bright 0 (easy and salient); test bags are the same bags without the 0, so only a model that
  also learned the hard 3s keeps its AUC.
- ``order`` (MambaMIL's premise): 20-40 digits, every bag holds as many 1s as 7s (2-3 each), and the label
  is whether they sit in pairs (each 1 next to a 7) or apart in the bag's sequence (its tile-grid order). Mean, max and attention
  pooling are blind to order: they must stay near chance; a sequence model must win.
- ``share`` (control, WeakSTIL-like regression): the percentage of 4s among 10-40 noisy digits (R^2).
- ``survival`` (control): GBSG2's 686 patients with their real times and events; a patient is a bag of
  10-30 instances, a share of them "tumour" instances carrying the patient's covariates with noise, the
  rest background (Harrell's c-index).

Folds keep test digits unseen: the 1,797 digit images are split into as many disjoint groups as folds
(stratified by digit) and the bags of fold k are drawn from group k only; fold k tests on them and trains
on the other groups' bags (15 % of those validate, for early stopping). A seed draws the groups, the bags
and the model initialisation. Every run is pathmil's own loop (:func:`pathmil.training.fit.train`) on bag
files, cohort and splits tables written as a user's would be.

Training is the same for every method: pathmil's defaults (AdamW, weight decay 1e-5, one warm-up epoch,
cosine decay, the best validation epoch kept) for 20 epochs at lr 5e-4, without early stopping (validation
sets of 24-48 bags make early stopping a lottery); model settings are each aggregator's defaults, except
MambaMIL's width (d_model 128, as the demo: 512 costs 3x the time on CPU).

Statistics are pathmil's own (:mod:`pathmil.evaluation.compare`, those of the report's comparison pages).
Metrics are pooled over folds per seed (AUC, R^2; survival: the mean of the folds' c-indices, as every
fold model has its own risk scale), then averaged over seeds; the IQM is over all runs (seeds x folds).
Each method is compared with ABMIL by a paired stratified bootstrap over bags (resample the bags of each
seed within their strata, score both methods on the same resample, average the difference over seeds)
and by the probability of improvement (Agarwal et al., NeurIPS 2021: the chance that a run of the method
beats a run of ABMIL on the same fold, averaged over folds).

Usage::

    python benchmarks/mil_quality.py run [--problems plain order ...] [--methods abmil mambamil_sr ...]
        [--seeds 5] [--folds 5] [--scale 1.0] [--epochs 20] [--lr 5e-4] [--jobs 2] [--out benchmarks/out/mil_quality]
    python benchmarks/mil_quality.py report [--store ...]      # the markdown tables from the store

``run`` logs one line per run to ``<out>/progress.log`` and is resumable: finished folds are kept in
``--out``, and a (problem, seed, method) whose folds have all finished is stored in ``--store``
(``benchmarks/results/mil_quality/``, committed: one CSV of test predictions each), which ``run`` skips
and ``report`` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pathmil.evaluation.bootstrap import iqm, percentile_interval
from pathmil.evaluation.compare import paired_bootstrap as resample_both
from pathmil.evaluation.compare import probability_of_improvement
from pathmil.fileio import atomic_output

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "mil_quality"
# committed: every finished (problem, seed, method)'s test predictions, so that runs add up across machines
# and sessions, and every table in RESULTS.md can be recomputed from the repository
DEFAULT_STORE = HERE / "results" / "mil_quality"

# ------------------------------------------------------------------------------------------ problems


@dataclasses.dataclass
class Bag:
    """One bag: its instances in sequence order, its label(s), and the test version where it differs."""

    features: np.ndarray  # (N, D) float32
    labels: dict[str, Any]
    test_features: np.ndarray | None = None  # the bag as test folds see it (``hard``: without the easy 0)


@dataclasses.dataclass
class Problem:
    """A MIL problem: how to draw its bags, its task and the claim it tests."""

    name: str
    task: str  # classification, survival or regression
    claim: str
    control: bool  # a control: no method should lose against ABMIL
    n_bags: int  # bags per fold (digit problems), patients in all (survival)
    make: Callable[[np.random.Generator, np.ndarray, np.ndarray, int], list[Bag]]  # (rng, X, y, n) -> bags


def load_digits_01() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 real handwritten digits: (N, 64) intensities in [0, 1] and their digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def digit_groups(y: np.ndarray, n_groups: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Disjoint groups of digit images, each with about the same number of every digit."""
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    for digit in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == digit))
        for i, index in enumerate(members):
            groups[(i + digit) % n_groups].append(int(index))
    return [np.array(sorted(g)) for g in groups]


def _draw(rng: np.random.Generator, X: np.ndarray, y: np.ndarray, digits: list[int], n: int) -> np.ndarray:
    """``n`` images (rows of X) drawn with replacement among those of the given digits."""
    pool = np.flatnonzero(np.isin(y, digits))
    return X[rng.choice(pool, size=n)]


def _noisy(rng: np.random.Generator, x: np.ndarray, sigma: float) -> np.ndarray:
    return (x + sigma * rng.standard_normal(x.shape)).astype(np.float32)


def _balanced_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % 2)


def make_plain(rng, X, y, n, sizes: tuple[int, int] = (10, 40)) -> list[Bag]:
    """Ilse et al.'s MNIST-bags on real digits: positive iff a 9 is present (1-3 of them)."""
    bags = []
    for label in _balanced_labels(rng, n):
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        k = int(rng.integers(1, 4)) if label else 0
        x = np.concatenate([_draw(rng, X, y, [9], k), _draw(rng, X, y, list(range(9)), size - k)])
        bags.append(Bag(rng.permutation(x), {"label": int(label)}))
    return bags


def make_witness1(rng, X, y, n, sigma: float = 0.1, sizes: tuple[int, int] = (20, 50)) -> list[Bag]:
    """20-50 noisy digits; a positive bag holds exactly one 9 (the case where masking can hide it)."""
    bags = []
    for label in _balanced_labels(rng, n):
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        k = int(label)
        x = np.concatenate([_draw(rng, X, y, [9], k), _draw(rng, X, y, list(range(9)), size - k)])
        bags.append(Bag(_noisy(rng, rng.permutation(x), sigma), {"label": int(label)}))
    return bags


def make_hard(rng, X, y, n, sigma: float = 0.45, sizes: tuple[int, int] = (20, 40)) -> list[Bag]:
    """Positives: 2-4 noisy 3s (hard) plus, outside the test folds, one clean bright 0 (easy, salient).

    Negatives hold neither 0s nor 3s; their other digits (5, 8, 9 look like 3s) are as noisy as the 3s.
    The test version of a positive bag is the same bag without its 0.
    """
    fillers = [1, 2, 4, 5, 6, 7, 8, 9]
    bags = []
    for label in _balanced_labels(rng, n):
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        k = int(rng.integers(2, 5)) if label else 0
        x = np.concatenate([_draw(rng, X, y, [3], k), _draw(rng, X, y, fillers, size - k)])
        x = _noisy(rng, rng.permutation(x), sigma)
        if not label:
            bags.append(Bag(x, {"label": 0}))
            continue
        easy = (1.5 * _draw(rng, X, y, [0], 1)).astype(np.float32)  # clean and brighter than any digit
        at = int(rng.integers(0, size + 1))
        bags.append(Bag(np.insert(x, at, easy, axis=0), {"label": 1}, test_features=x))
    return bags


def _touching(seq: np.ndarray, a: int, b: int) -> int:
    """How many times digits a and b are neighbours in the sequence (either order)."""
    first, second = seq[:-1], seq[1:]
    return int(np.sum(((first == a) & (second == b)) | ((first == b) & (second == a))))


def make_order(rng, X, y, n, sigma: float = 0.1, sizes: tuple[int, int] = (20, 40)) -> list[Bag]:
    """As many 1s as 7s (2-3 each) among 20-40 digits; positive iff every 1 sits next to a 7 (pairs),
    negative iff no 1 touches a 7.

    Both classes draw the same digits in the same numbers, so the label lives only in the arrangement.
    """
    fillers = [0, 2, 3, 4, 5, 6, 8, 9]
    bags = []
    for label in _balanced_labels(rng, n):
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        m = int(rng.integers(2, 4))
        units = (
            [[1, 7] if rng.random() < 0.5 else [7, 1] for _ in range(m)] if label else [[1]] * m + [[7]] * m
        )
        while True:
            slots = rng.permutation(len(units) + size - 2 * m)
            parts = [units[i] if i < len(units) else [-1] for i in slots]
            seq = np.array([d for part in parts for d in part])
            if _touching(seq, 1, 7) == (m if label else 0):
                break
        x = np.empty((size, X.shape[1]), np.float32)
        for digit in (1, 7):
            x[seq == digit] = _draw(rng, X, y, [digit], int((seq == digit).sum()))
        x[seq == -1] = _draw(rng, X, y, fillers, int((seq == -1).sum()))
        bags.append(Bag(_noisy(rng, x, sigma), {"label": int(label)}))
    return bags


def make_share(rng, X, y, n, sigma: float = 0.3, sizes: tuple[int, int] = (10, 40)) -> list[Bag]:
    """The percentage of 4s among 10-40 noisy digits (uniform in 0-60 %), like a slide's sTIL score."""
    others = [0, 1, 2, 3, 5, 6, 7, 8, 9]
    bags = []
    for _ in range(n):
        size = int(rng.integers(sizes[0], sizes[1] + 1))
        k = round(rng.uniform(0, 0.6) * size)
        x = np.concatenate([_draw(rng, X, y, [4], k), _draw(rng, X, y, others, size - k)])
        bags.append(Bag(_noisy(rng, rng.permutation(x), sigma), {"stil": 100.0 * k / size}))
    return bags


PROBLEMS: dict[str, Problem] = {
    p.name: p
    for p in [
        Problem("plain", "classification", "control: MNIST-bags (a 9 in the bag)", True, 40, make_plain),
        Problem("witness1", "classification", "control: one witness among 20-50", True, 40, make_witness1),
        Problem(
            "hard",
            "classification",
            "MHIM-MIL: hard positives once the easy one is gone",
            False,
            40,
            make_hard,
        ),
        Problem("order", "classification", "MambaMIL: 1s next to 7s (order only)", False, 80, make_order),
        Problem("share", "regression", "control: share of 4s (R^2)", True, 40, make_share),
        Problem("survival", "survival", "control: GBSG2 patients as bags (c-index)", True, 300, None),  # type: ignore[arg-type]
    ]
}


def survival_bags(rng: np.random.Generator, sigma: float = 0.5) -> tuple[list[Bag], np.ndarray]:
    """GBSG2 (686 breast-cancer patients, scikit-survival): a bag of 10-30 instances per patient.

    Tumour instances (20-50 % of the bag) carry the patient's standardised covariates plus noise and a
    tissue signature; background instances carry noise and another signature. Times and events are the
    patients' own. Returns the bags and each patient's event flag (for stratified folds).
    """
    from sksurv.datasets import load_gbsg2
    from sksurv.preprocessing import OneHotEncoder

    covariates, outcome = load_gbsg2()
    z = OneHotEncoder().fit_transform(covariates).to_numpy(dtype=np.float32)
    z = (z - z.mean(axis=0)) / z.std(axis=0)
    d, tissue = z.shape[1], 8
    tumour_sig, background_sig = rng.standard_normal(tissue), rng.standard_normal(tissue)
    bags = []
    for i in range(len(z)):
        size = int(rng.integers(10, 31))
        k = max(1, round(rng.uniform(0.2, 0.5) * size))
        tumour = np.hstack(
            [z[i] + sigma * rng.standard_normal((k, d)), tumour_sig + 0.5 * rng.standard_normal((k, tissue))]
        )
        background = np.hstack(
            [
                rng.standard_normal((size - k, d)),
                background_sig + 0.5 * rng.standard_normal((size - k, tissue)),
            ]
        )
        x = rng.permutation(np.vstack([tumour, background])).astype(np.float32)
        bags.append(Bag(x, {"time": float(outcome["time"][i]), "event": int(outcome["cens"][i])}))
    return bags, outcome["cens"].astype(int)


# -------------------------------------------------------------------------------- data on disk


def _write(root: Path, bag_id: str, x: np.ndarray, grid: int = 8) -> None:
    """A pathmil bag file; instances lie on a raster of ``grid`` columns in sequence order."""
    from pathmil.features.bagfile import write_bag

    pos = np.arange(len(x))
    coords = np.stack([pos % grid, pos // grid], axis=1) * 256
    write_bag(root / "features" / f"{bag_id}.h5", x.astype(np.float16), coords, {"patch_size": 256}, {})


def _folds(groups: list[list[str]], strata: dict[str, Any], test_ids: dict[str, str], seed: int,
           val_frac: float = 0.15) -> pd.DataFrame:  # fmt: skip
    """Splits table: fold k tests on group k (its test versions) and validates on a stratified share of
    the other groups' bags."""
    from sklearn.model_selection import train_test_split

    rows = []
    for k, held in enumerate(groups):
        rest = [b for j, g in enumerate(groups) if j != k for b in g]
        train, val = train_test_split(
            rest, test_size=val_frac, random_state=seed * 100 + k, stratify=[strata[b] for b in rest]
        )
        for split, ids in (("train", train), ("val", val), ("test", [test_ids.get(b, b) for b in held])):
            rows += [{"slide_id": b, "patient_id": b, "fold": k, "split": split} for b in ids]
    return pd.DataFrame(rows)


def make_data(problem: str, seed: int, folds: int, root: Path, scale: float = 1.0, **options: Any) -> Path:
    """Write a problem's bags, cohort table and splits for one seed into ``root``; returns ``root``.

    ``scale`` multiplies the number of bags; ``options`` go to the problem's bag maker (``sizes``, ``sigma``).
    """
    if (root / "splits.csv").is_file():
        return root
    spec = PROBLEMS[problem]
    rng = np.random.default_rng([seed, sum(map(ord, problem))])
    (root / "features").mkdir(parents=True, exist_ok=True)
    records, groups, strata, test_ids = [], [], {}, {}
    if spec.task == "survival":
        bags, events = survival_bags(rng)
        keep = rng.permutation(len(bags))[: max(folds * 10, min(len(bags), round(spec.n_bags * scale)))]
        from sklearn.model_selection import StratifiedKFold

        split = StratifiedKFold(folds, shuffle=True, random_state=seed).split(keep, events[keep])
        groups = [[f"p{keep[i]:04d}" for i in held] for _, held in split]
        for i in keep:
            bag_id = f"p{i:04d}"
            _write(root, bag_id, bags[i].features)
            records.append({"slide_id": bag_id, "patient_id": bag_id, **bags[i].labels})
            strata[bag_id] = events[i]
    else:
        X, y = load_digits_01()
        n = max(4, round(spec.n_bags * scale))
        for k, images in enumerate(digit_groups(y, folds, rng)):
            group = []
            for i, bag in enumerate(spec.make(rng, X[images], y[images], n, **options)):
                bag_id = f"g{k}b{i:03d}"
                _write(root, bag_id, bag.features)
                records.append({"slide_id": bag_id, "patient_id": bag_id, **bag.labels})
                if bag.test_features is not None:
                    _write(root, bag_id + "t", bag.test_features)
                    records.append({"slide_id": bag_id + "t", "patient_id": bag_id + "t", **bag.labels})
                    test_ids[bag_id] = bag_id + "t"
                label = next(iter(bag.labels.values()))
                strata[bag_id] = label if spec.task == "classification" else min(int(label // 15), 3)
                group.append(bag_id)
            groups.append(group)
    pd.DataFrame(records).to_csv(root / "cohort.tmp", index=False)
    os.replace(root / "cohort.tmp", root / "cohort.csv")
    _folds(groups, strata, test_ids, seed).to_csv(root / "splits.tmp", index=False)
    os.replace(root / "splits.tmp", root / "splits.csv")
    return root


# ----------------------------------------------------------------------------------------- methods


@dataclasses.dataclass
class Method:
    """An aggregator with its settings; ``teacher`` names the baseline whose best.pt starts MHIM-MIL."""

    name: str
    aggregator: str
    model: dict[str, Any] = dataclasses.field(default_factory=dict)
    mhim: dict[str, Any] = dataclasses.field(default_factory=dict)
    teacher: str | None = None


MAMBA = {"d_model": 128}  # CPU budget (see RESULTS.md); the other settings are MambaMILConfig's defaults


V1_PAPER = {"version": 1, "low_ratio": 0.2, "random_ratio": 0.5}  # MHIM-MIL v1 with the paper's masks


def _methods() -> dict[str, Method]:
    methods = [
        Method("mean_pool", "mean_pool"),
        Method("abmil", "abmil"),
        Method("abmil_gated", "abmil_gated"),
        # without CLAM's dropout in the attention network, as Ilse et al. and the MHIM-MIL code: an ablation row
        Method("abmil_no_attention_dropout", "abmil", model={"attention_dropout": 0.0}),
        Method("transmil", "transmil"),
        # MHIM-MIL v1: the stored `mhim_abmil_v1` runs have the paper's masks (low 0.2, random 0.5), pathmil's
        # v1 defaults until 2026-12-02; each ablation row takes one thing away from them (RESULTS.md, "Which
        # of MHIM-MIL v1's masks"); `high_only` is v1 at today's defaults
        Method("mhim_abmil_v1", "mhim_abmil", mhim=V1_PAPER, teacher="abmil"),
        Method("mhim_abmil_v1_no_random", "mhim_abmil", mhim={**V1_PAPER, "random_ratio": 0.0}, teacher="abmil"),
        Method("mhim_abmil_v1_no_low", "mhim_abmil", mhim={**V1_PAPER, "low_ratio": 0.0}, teacher="abmil"),
        Method(
            "mhim_abmil_v1_high_only",
            "mhim_abmil",
            mhim={**V1_PAPER, "low_ratio": 0.0, "random_ratio": 0.0},
            teacher="abmil",
        ),
        Method("mhim_abmil_v1_keep_top1", "mhim_abmil", mhim={**V1_PAPER, "keep_top": 1}, teacher="abmil"),
        Method(
            "mhim_abmil_v1_no_consistency",
            "mhim_abmil",
            mhim={**V1_PAPER, "consistency_weight": 0.0},
            teacher="abmil",
        ),
        Method("mhim_abmil_v2", "mhim_abmil", mhim={"version": 2}, teacher="abmil"),
        # the authors' rounding of N h (ceil: at least one instance masked from every bag): an ablation row
        Method(
            "mhim_abmil_v2_ceil", "mhim_abmil", mhim={"version": 2, "high_rounding": "ceil"}, teacher="abmil"
        ),
        Method("mhim_transmil", "mhim_transmil", mhim={"version": 2}, teacher="transmil"),
    ]
    for variant in ("sr", "plain", "bi"):
        methods.append(Method(f"mambamil_{variant}", "mambamil", {**MAMBA, "variant": variant}))
        methods.append(
            Method(
                f"mambamil_{variant}_reorder",
                "mambamil",
                {**MAMBA, "variant": variant, "token_reorder": True},
            )
        )
    # the authors' scripts' SR rate (pathmil's default is the paper code's 10): an ablation row
    methods.append(Method("mambamil_sr_rate5", "mambamil", {**MAMBA, "variant": "sr", "sr_rate": 5}))
    return {m.name: m for m in methods}


METHODS = _methods()
BASELINE = "abmil"


# ------------------------------------------------------------------------------------------ running


def run_one(
    data: Path,
    method: Method,
    task: str,
    seed: int,
    fold: int,
    out: Path,
    train: dict[str, Any],
    needs_checkpoint: bool = False,
) -> dict:
    """Train ``method`` on one fold with pathmil's loop; keeps predictions, metrics and history only
    (and best.pt of the baselines MHIM-MIL starts from). A finished baseline whose best.pt is gone is
    trained again when ``needs_checkpoint`` (the same seed gives the same model on CPU)."""
    from pathmil.training.fit import train as fit
    from pathmil.training.run import TrainConfig

    is_teacher = method.name in {m.teacher for m in METHODS.values()}
    done = (out / "metrics.json").is_file()
    if done and not (is_teacher and needs_checkpoint and not (out / "best.pt").is_file()):
        return json.loads((out / "metrics.json").read_text())
    mhim = dict(method.mhim)
    if method.teacher:
        mhim["teacher_init"] = str(out.parent.parent / method.teacher / f"fold{fold}" / "best.pt")
    config = TrainConfig(
        task=task, aggregator=method.aggregator, model=dict(method.model), mhim=mhim, bag_level="slide",
        seed=seed, device="cpu", **train,
    )  # fmt: skip
    summary = fit(
        config, data / "features", data / "cohort.csv", data / "splits.csv", fold, out, progress=False
    )
    (out / "last.pt").unlink(missing_ok=True)
    if not is_teacher:
        (out / "best.pt").unlink(missing_ok=True)
    return summary


def run_fold(problem: str, seed: int, fold: int, methods: list[str], out: Path, folds: int, scale: float,
             train: dict[str, Any]) -> list[str]:  # fmt: skip
    """Every method on one (problem, seed, fold), baselines before the MHIM-MIL runs that start from them."""
    import torch

    torch.set_num_threads(1)
    logging.getLogger("pathmil").setLevel(logging.ERROR)
    data = make_data(problem, seed, folds, out / problem / f"seed{seed}" / "data", scale)
    needed = set(methods) | {METHODS[m].teacher for m in methods if METHODS[m].teacher}
    order = sorted(needed, key=lambda m: (METHODS[m].teacher is not None, list(METHODS).index(m)))
    runs = out / problem / f"seed{seed}" / "runs"
    # a baseline's checkpoint is needed (and the baseline retrained when it is gone) only for an MHIM-MIL
    # run still to do
    teachers = {
        METHODS[m].teacher for m in needed if not (runs / m / f"fold{fold}" / "metrics.json").is_file()
    }
    lines = []
    for name in order:
        run_dir = runs / name / f"fold{fold}"
        start = time.perf_counter()
        summary = run_one(
            data, METHODS[name], PROBLEMS[problem].task, seed, fold, run_dir, train, name in teachers
        )
        test = summary["metrics"].get("test", {})
        lines.append(
            f"{time.strftime('%H:%M:%S')} {problem} seed{seed} fold{fold} {name}: "
            f"test {summary['main_metric']} {test.get(summary['main_metric'], float('nan')):.3f}, best epoch "
            f"{summary['best_epoch']}/{summary['epochs_run']}, {time.perf_counter() - start:.1f} s"
        )
    for teacher in {METHODS[m].teacher for m in needed if METHODS[m].teacher}:
        (out / problem / f"seed{seed}" / "runs" / teacher / f"fold{fold}" / "best.pt").unlink(missing_ok=True)
    return lines


def run_all(args: argparse.Namespace) -> None:
    out: Path = args.out
    recipe = recipe_of(args)
    for directory in (out, args.store):  # both checked before either is written
        check_recipe(directory, recipe, record=False)
    for directory in (out, args.store):
        check_recipe(directory, recipe)
    train = {k: recipe[k] for k in ("epochs", "patience", "lr")}
    todo = {
        (p, s): [m for m in args.methods if not stored_path(args.store, p, s, m).is_file()]
        for s in range(args.seeds)
        for p in args.problems
    }
    jobs = [
        (p, s, k, methods, out, args.folds, args.scale, train)
        for (p, s), methods in todo.items()
        if methods
        for k in range(args.folds)
    ]
    log = (out / "progress.log").open("a")
    log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} run: {' '.join(sys.argv[1:])}\n")
    log.flush()
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        # each (problem, seed)'s data once, before its folds: folds of one seed made it at the same time
        # before, and one read the cohort table while another was rewriting it
        datasets = sorted({(p, s) for p, s, *_ in jobs})
        roots = [out / p / f"seed{s}" / "data" for p, s in datasets]
        n = len(datasets)
        list(pool.map(make_data, *zip(*datasets), [args.folds] * n, roots, [args.scale] * n))
        for lines in pool.map(run_fold, *zip(*jobs)):
            for line in lines:
                print(line, flush=True)
                log.write(line + "\n")
            log.flush()
    log.write(f"# done in {time.perf_counter() - start:.0f} s\n")
    log.close()
    for path in archive(out, args.store):
        print(f"stored {path}")


# ------------------------------------------------------------------------------------------- store
# The store keeps, per (problem, seed, method), the test predictions of every fold in one CSV (a few KB),
# with its fold model's best epoch; index.csv says when, on which machine, at which commit and from which
# data (a hash of the seed's cohort and splits tables) each was stored. ``run`` skips what is stored; the
# report reads only the store. A stored file is never overwritten: to run a (problem, seed, method) again,
# delete its file and its runs in --out (finished runs there are reused).


def stored_path(store: Path, problem: str, seed: int, method: str) -> Path:
    return store / problem / f"seed{seed}" / f"{method}.csv"


def recipe_of(args: argparse.Namespace) -> dict[str, Any]:
    """What makes runs comparable: folds, the share of bags, and the training recipe."""
    return {
        "folds": args.folds, "scale": args.scale, "epochs": args.epochs,
        "patience": args.patience or args.epochs, "lr": args.lr,
    }  # fmt: skip


def held_recipe(directory: Path) -> dict[str, Any] | None:
    """The recipe of the runs in ``directory`` (None: it holds none); raises ValueError when it holds runs
    or data but no recipe.json, whose recipe is therefore unknown."""
    path = directory / "recipe.json"
    if path.is_file():
        return json.loads(path.read_text())
    if any((directory / problem).exists() for problem in PROBLEMS):
        raise ValueError(
            f"{directory} holds runs or data but no recipe.json, so how they were made is unknown: move them "
            "away or pass another --out/--store"
        )
    return None


def check_recipe(directory: Path, recipe: dict[str, Any], record: bool = True) -> None:
    """Raise ValueError when ``directory`` holds runs of another or of an unknown recipe (a run with other
    epochs or bags must go to another --out and --store); else, with ``record``, write ``recipe`` to its
    recipe.json where it has none."""
    held = held_recipe(directory)
    if held is not None and held != recipe:
        raise ValueError(
            f"{directory} holds runs of the recipe {held}, not {recipe}: use another --out/--store"
        )
    if held is None and record:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")


def _finished(fold_dir: Path) -> bool:
    """pathmil's loop writes metrics.json last (its config.yaml first); the authors' runs only predictions."""
    return (fold_dir / "metrics.json").is_file() or not (fold_dir / "config.yaml").is_file()


def data_hash(data: Path) -> str:
    """The first 12 hex digits of the SHA-256 of a seed's cohort and splits tables: runs of one hash scored
    the same bags with the same labels and folds."""
    digest = hashlib.sha256()
    for name in ("cohort.csv", "splits.csv"):
        digest.update((data / name).read_bytes())
    return digest.hexdigest()[:12]


def commit(store: Path = DEFAULT_STORE) -> str:
    """The repository's commit, with ``-dirty`` when its tracked files differ from it, the store's own files
    (which every archive changes) not counted; "unknown" outside git."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True)

    try:
        head, top = git("rev-parse", "--short=12", "HEAD"), git("rev-parse", "--show-toplevel")
        if head.returncode or top.returncode:
            return "unknown"
        store = store.resolve()
        inside = store.is_relative_to(Path(top.stdout.strip()).resolve())
        status = git("status", "--porcelain", "--untracked-files=no", "--", ":/", *([f":(exclude){store}"] * inside))
    except OSError:
        return "unknown"
    dirty = status.returncode != 0 or bool(status.stdout.strip())  # an error is never taken for clean
    return head.stdout.strip() + ("-dirty" if dirty else "")


def _write_atomic(table: pd.DataFrame, path: Path) -> None:
    with atomic_output(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


def archive(out: Path, store: Path) -> list[Path]:
    """Store each finished (problem, seed, method) of ``out`` not yet stored: the test rows of its folds'
    ``predictions.csv`` (every fold of the seed's splits present; the authors' ``ref_*`` runs too), with a
    ``best_epoch`` column where the run wrote metrics.json, and its row in index.csv. Returns the files
    written. Raises ValueError when ``out`` and ``store`` hold runs of different or unknown recipes."""
    recipe = held_recipe(out) if out.is_dir() else None
    if recipe is None:
        return []
    check_recipe(store, recipe)
    written, rows, made = [], [], {"machine": machine(), "commit": commit(store)}
    for seed_dir in sorted(out.glob("*/seed*")):
        problem, seed, data = seed_dir.parent.name, int(seed_dir.name[4:]), seed_dir / "data"
        if problem not in PROBLEMS or not (data / "splits.csv").is_file():
            continue
        n_folds = pd.read_csv(data / "splits.csv")["fold"].nunique()
        for run_dir in sorted(p for p in (seed_dir / "runs").glob("*") if p.is_dir()):
            target = stored_path(store, problem, seed, run_dir.name)
            files = [f for f in sorted(run_dir.glob("fold*/predictions.csv")) if _finished(f.parent)]
            if target.is_file() or len(files) < n_folds:
                continue
            tables = []
            for f in files:
                table = pd.read_csv(f)
                metrics = f.parent / "metrics.json"
                best = json.loads(metrics.read_text()).get("best_epoch") if metrics.is_file() else None
                tables.append(table[table["split"] == "test"].drop(columns=["split"]).assign(best_epoch=best))
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(pd.concat(tables, ignore_index=True), target)
            finished = max(f.stat().st_mtime for f in files)
            rows.append({
                "problem": problem, "seed": seed, "method": run_dir.name, "folds": n_folds,
                "finished_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(finished)), **made,
                "data": data_hash(data),
            })  # fmt: skip
            written.append(target)
    if rows:
        index_path, new = store / "index.csv", pd.DataFrame(rows)
        index = pd.read_csv(index_path) if index_path.is_file() else new.iloc[:0]
        key = ["problem", "seed", "method"]
        # a file stored again (deleted, then run again): its new row replaces the old
        kept = index[~index.set_index(key).index.isin(new.set_index(key).index)]
        _write_atomic(pd.concat([kept, new], ignore_index=True), index_path)
    return written


def check_same_data(store: Path, problem: str) -> None:
    """Raise ValueError when the stored runs of one seed of ``problem`` came from different bags (index.csv's
    data hashes differ: a generator changed between sessions), which no paired comparison may mix."""
    index_path = store / "index.csv"
    if not index_path.is_file():
        return
    index = pd.read_csv(index_path)
    hashes = index[index["problem"] == problem].groupby("seed")["data"].nunique()
    if (hashes > 1).any():
        raise ValueError(
            f"{store}: stored runs of {problem} seed(s) {list(hashes[hashes > 1].index)} scored different "
            "bags (data hashes differ in index.csv); delete the stale ones and run them again"
        )


# -------------------------------------------------------------------------------------- statistics
# pathmil's own comparison statistics (pathmil.evaluation.compare, the report's comparison pages), applied
# per seed: every seed draws its own bags, so a replicate resamples each seed's bags and averages over seeds.


def metric_fn(task: str) -> Callable[[pd.DataFrame], float]:
    """The main statistic of one seed's pooled test predictions: AUC, R^2, or for survival the mean of the
    folds' Harrell's c-indices (as :func:`pathmil.evaluation.summary.main_statistic`: each fold model has its
    own risk scale, which a c-index of the pooled folds would mix)."""
    if task == "classification":
        from sklearn.metrics import roc_auc_score

        return lambda t: (
            roc_auc_score(t["target"].astype(int), t["score"]) if t["target"].nunique() > 1 else math.nan
        )
    if task == "regression":
        from sklearn.metrics import r2_score

        return lambda t: r2_score(t["target"], t["score"]) if len(t) > 1 else math.nan
    from sksurv.metrics import concordance_index_censored

    def c_index(t: pd.DataFrame) -> float:
        if not t["event"].any():
            return math.nan
        return concordance_index_censored(t["event"].astype(bool), t["time"], t["score"])[0]

    def fold_mean(t: pd.DataFrame) -> float:
        values = [c_index(part) for _, part in t.groupby("fold")]
        finite = [v for v in values if math.isfinite(v)]
        return float(np.mean(finite)) if finite else math.nan

    return fold_mean


def strata_of(task: str, table: pd.DataFrame) -> np.ndarray:
    """Bootstrap strata of the bags: the class, the event, or the target's band of 15 points."""
    if task == "classification":
        return table["target"].astype(int).to_numpy()
    if task == "survival":
        return table["event"].astype(int).to_numpy()
    return np.minimum(table["target"].to_numpy() // 15, 3).astype(int)


def paired_bootstrap(
    tables: dict[int, tuple[pd.DataFrame, pd.DataFrame]],
    metric: Callable[[pd.DataFrame], float],
    strata: dict[int, np.ndarray],
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Mean over seeds of metric(method) - metric(baseline) on the same bags (``tables[seed]`` = (method's,
    baseline's) rows in the same order), with a percentile interval: :func:`pathmil.evaluation.compare.
    paired_bootstrap` resamples each seed's bags within ``strata[seed]`` and scores both on the same
    resample; each replicate's difference is averaged over seeds."""
    points, draws = [], []
    for s, (a, b) in tables.items():
        scores = [lambda idx, t=a: metric(t.iloc[idx]), lambda idx, t=b: metric(t.iloc[idx])]
        point, distribution = resample_both(scores, strata[s], n_boot, seed + s)
        points.append(point[0] - point[1])
        draws.append(distribution[:, 0] - distribution[:, 1])
    with np.errstate(all="ignore"):
        mean_draws = np.nanmean(np.vstack(draws), axis=0) if draws else np.zeros(0)
    low, high = percentile_interval(mean_draws, confidence)
    return float(np.mean(points)), low, high


# -------------------------------------------------------------------------------------------- report


def load_predictions(store: Path, problem: str, method: str) -> dict[int, pd.DataFrame]:
    """A method's stored test predictions, pooled over folds, per seed."""
    files = (store / problem).glob(f"seed*/{method}.csv")
    return {int(f.parent.name[4:]): pd.read_csv(f) for f in sorted(files)}


def fold_scores(pooled: dict[int, pd.DataFrame], metric) -> dict[int, np.ndarray]:
    """Per fold, the test metric of every seed's run on that fold."""
    folds = sorted({k for t in pooled.values() for k in t["fold"].unique()})
    return {k: np.array([metric(t[t["fold"] == k]) for t in pooled.values()]) for k in folds}


def methods_on_disk(store: Path, problem: str, methods: list[str]) -> list[str]:
    """``methods`` first, then any other runs stored (the reference codes' ``ref_*`` runs)."""
    found = sorted({p.stem for p in (store / problem).glob("seed*/*.csv")})
    return [m for m in methods if m in found] + [m for m in found if m not in methods and m not in METHODS]


TARGET_COLUMNS = ("target", "time", "event")


def _same_bags(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    """Two runs' test rows (sorted alike) hold the same bags, folds and labels."""
    if len(a) != len(b) or not (a["slide_id"].to_numpy() == b["slide_id"].to_numpy()).all():
        return False
    columns = ["fold", *(c for c in TARGET_COLUMNS if c in a and c in b)]
    return all(np.allclose(a[c].to_numpy(float), b[c].to_numpy(float)) for c in columns)


def paired_difference(
    task: str, pooled: dict[int, pd.DataFrame], base: dict[int, pd.DataFrame], seeds: list[int], n_boot: int
) -> tuple[float, float, float]:
    """:func:`paired_bootstrap` of one method's pooled test predictions against another's on ``seeds``."""
    pairs = {}
    for s in seeds:
        a = pooled[s].sort_values("slide_id").reset_index(drop=True)
        b = base[s].sort_values("slide_id").reset_index(drop=True)
        if not _same_bags(a, b):
            raise ValueError(f"seed {s}: the two methods did not score the same bags, labels and folds")
        pairs[s] = (a, b)
    strata = {s: strata_of(task, pairs[s][1]) for s in seeds}
    return paired_bootstrap(pairs, metric_fn(task), strata, n_boot)


def summarise(
    store: Path, problems: list[str], methods: list[str], n_boot: int, baseline: str = BASELINE
) -> pd.DataFrame:
    """One row per stored method and problem: its metric, and its paired difference to ``baseline`` on the
    seeds both ran."""
    rows = []
    for problem in problems:
        task = PROBLEMS[problem].task
        metric = metric_fn(task)
        check_same_data(store, problem)
        base = load_predictions(store, problem, baseline)
        for method in methods_on_disk(store, problem, methods):
            pooled = load_predictions(store, problem, method)
            seeds = sorted(set(pooled) & set(base))
            if not seeds:
                continue
            per_seed = [metric(pooled[s]) for s in seeds]
            runs = np.concatenate(list(fold_scores({s: pooled[s] for s in seeds}, metric).values()))
            row = {
                "problem": problem, "method": method, "seeds": len(seeds), "metric": float(np.mean(per_seed)),
                "sd": float(np.std(per_seed, ddof=1)) if len(seeds) > 1 else math.nan, "iqm": iqm(runs),
                "baseline": float(np.mean([metric(base[s]) for s in seeds])),  # on the same seeds
            }  # fmt: skip
            if method != baseline:
                row["diff"], row["lo"], row["hi"] = paired_difference(task, pooled, base, seeds, n_boot)
                row["p_improve"] = probability_of_improvement(
                    fold_scores({s: pooled[s] for s in seeds}, metric),
                    fold_scores({s: base[s] for s in seeds}, metric),
                )
            rows.append(row)
    return pd.DataFrame(rows)


# pathmil's method -> the authors' runs of the same method (benchmarks/reference/ writes them as ref_*; see
# RESULTS.md): ref_abmil / ref_pure the MHIM-MIL repository's ABMIL and ABMIL-type baseline, ref_att_mil the
# MambaMIL repository's ABMIL, ref_mamba_* its MambaMIL with SR-, Bi- and plain Mamba layers
REFERENCE_OF = {
    "abmil": ["ref_abmil", "ref_pure", "ref_att_mil"],
    "mhim_abmil_v2": ["ref_mhim_v2"],
    "mhim_abmil_v2_ceil": ["ref_mhim_v2"],
    "mambamil_sr": ["ref_mamba_sr"],
    "mambamil_sr_rate5": ["ref_mamba_sr"],
    "mambamil_bi": ["ref_mamba_bi"],
    "mambamil_plain": ["ref_mamba_plain"],
}


def against_reference(
    store: Path, problems: list[str], n_boot: int, methods: list[str] | None = None
) -> pd.DataFrame:
    """pathmil's method minus the authors' code of it, on the seeds both ran (the same bags): one row per
    pair stored (of ``methods`` only, when given)."""
    rows = []
    for problem in problems:
        task = PROBLEMS[problem].task
        metric = metric_fn(task)
        check_same_data(store, problem)
        for ours, refs in REFERENCE_OF.items():
            if methods is not None and ours not in methods:
                continue
            pooled = load_predictions(store, problem, ours)
            for ref in refs:
                theirs = load_predictions(store, problem, ref)
                seeds = sorted(set(pooled) & set(theirs))
                if not seeds:
                    continue
                diff, lo, hi = paired_difference(task, pooled, theirs, seeds, n_boot)
                rows.append({
                    "problem": problem, "method": ours, "reference": ref, "seeds": len(seeds),
                    "ours": float(np.mean([metric(pooled[s]) for s in seeds])),
                    "theirs": float(np.mean([metric(theirs[s]) for s in seeds])), "diff": diff, "lo": lo, "hi": hi,
                })  # fmt: skip
    return pd.DataFrame(rows)


def markdown_against_reference(table: pd.DataFrame) -> str:
    lines = [
        "**pathmil against the authors' code** (same bags and folds; pooled test metric, survival the mean of "
        "the folds' c-indices; mean over the seeds both ran)",
        "",
        "| problem | pathmil | authors' code | seeds | pathmil | authors' | pathmil - authors' [95 % CI] |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for _, r in table.iterrows():
        mark = " *" if r["lo"] > 0 or r["hi"] < 0 else ""
        lines.append(
            f"| {r['problem']} | {r['method']} | {r['reference']} | {r['seeds']} | {r['ours']:.3f} "
            f"| {r['theirs']:.3f} | {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]{mark} |"
        )
    return "\n".join([*lines, "", "`*`: the CI excludes 0."])


METRIC_NAME = {"classification": "AUC", "regression": "R^2", "survival": "c-index"}  # each task's main metric


def markdown(table: pd.DataFrame, baseline: str = BASELINE) -> str:
    name = "ABMIL" if baseline == "abmil" else baseline
    lines = []
    for problem, part in table.groupby("problem", sort=False):
        spec = PROBLEMS[problem]
        metric = METRIC_NAME[spec.task]
        how = "mean of the folds' test c-indices" if spec.task == "survival" else f"pooled test {metric}"
        lines += [f"**{problem}** ({spec.claim}; {how}, mean over seeds)", ""]
        lines += [
            f"| method | seeds | {metric} (sd over seeds) | {name}, same seeds | IQM of runs "
            f"| difference to {name} [95 % CI] | P(improvement) |"
        ]
        lines += ["|---|---:|---:|---:|---:|---:|---:|"]
        for _, r in part.iterrows():
            diff = (
                "(baseline)"
                if r["method"] == baseline
                else f"{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"
                + (" *" if r["lo"] > 0 or r["hi"] < 0 else "")
            )
            poi = "" if r["method"] == baseline else f"{r['p_improve']:.2f}"
            sd = "" if math.isnan(r["sd"]) else f" ({r['sd']:.3f})"  # one seed: no sd
            lines.append(
                f"| {r['method']} | {r['seeds']} | {r['metric']:.3f}{sd} | {r['baseline']:.3f} | {r['iqm']:.3f} "
                f"| {diff} | {poi} |"
            )
        lines.append("")
    lines.append("`*`: the CI excludes 0.")
    return "\n".join(lines)


def markdown_matrix(table: pd.DataFrame, baseline: str = BASELINE) -> str:
    """The README's table: a row per method, a column per problem; each cell the method's metric, its paired
    difference to ``baseline`` on the same seeds [95 % CI] (``*`` where the CI excludes 0) and, below 5, its
    seeds (the baseline's row gives its metric over all its seeds)."""
    problems = list(dict.fromkeys(table["problem"]))
    head = [f"{p} ({METRIC_NAME[PROBLEMS[p].task]})" for p in problems]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(problems)]
    for method in dict.fromkeys(table["method"]):
        cells = []
        for problem in problems:
            row = table[(table.problem == problem) & (table.method == method)]
            if row.empty:
                cells.append("")
                continue
            r = row.iloc[0]
            cell = f"{r['metric']:.3f}"
            if method != baseline:
                mark = "*" if r["lo"] > 0 or r["hi"] < 0 else ""
                cell += f", {r['diff']:+.3f} [{r['lo']:+.2f}, {r['hi']:+.2f}]{mark}"
            if r["seeds"] < 5:
                cell += f" ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''})"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    """CPU model, core count and the SIMD flags that matter for torch, from /proc/cpuinfo."""
    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next(
            line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")
        )
        flags = set(
            next(line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags"))
        )
    except (OSError, StopIteration):
        pass
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni") if f in flags]
    return f"{model}, {os.cpu_count()} cores ({' '.join(simd)}), torch {torch.__version__}, Python {platform.python_version()}"


def report(args: argparse.Namespace) -> str:
    """Store what finished in ``args.out``, then the markdown tables of everything stored."""
    archive(args.out, args.store)
    args.out.mkdir(parents=True, exist_ok=True)
    table = summarise(args.store, args.problems, args.methods, args.n_boot, args.baseline)
    if table.empty:
        return f"nothing stored in {args.store} for {' '.join(args.problems)} with {args.baseline} beside it"
    table.to_csv(args.out / "summary.csv", index=False)
    text = f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}.\n\n" + markdown(table, args.baseline) + "\n"
    (args.out / "summary_matrix.md").write_text(markdown_matrix(table, args.baseline) + "\n")
    versus = against_reference(args.store, args.problems, args.n_boot, args.methods)
    versus.to_csv(args.out / "summary_reference.csv", index=False)
    if len(versus):
        text += "\n" + markdown_against_reference(versus) + "\n"
    (args.out / "summary.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["run", "report", "data"])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--scale", type=float, default=1.0, help="share of the default number of bags")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--patience", type=int, default=None, help="early stopping (default: epochs, i.e. none)"
    )
    parser.add_argument("--lr", type=float, default=5e-4, help="pathmil's 2e-4 is meant for 50 epochs")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument(
        "--baseline", default=BASELINE, choices=list(METHODS), help="report: what each method is paired with"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="runs in progress (not committed)")
    parser.add_argument("--store", type=Path, default=DEFAULT_STORE, help="finished runs (committed)")
    args = parser.parse_args(argv)
    if args.command == "data":
        check_recipe(args.out, recipe_of(args))
        for p in args.problems:
            for s in range(args.seeds):
                print(make_data(p, s, args.folds, args.out / p / f"seed{s}" / "data", args.scale))
    elif args.command == "run":
        run_all(args)
        print(report(args))
    else:
        print(report(args))


if __name__ == "__main__":
    main()
