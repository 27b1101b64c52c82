"""The ``pathmil`` command: one sub-command per stage.

Each sub-command parses its arguments, then imports its stage lazily and calls it, so ``pathmil tile``
never imports torch and ``pathmil --help`` answers at once. Errors a user can fix
(:class:`~pathmil.errors.PathmilError`) print as one line ``pathmil: error: ...`` and exit with status 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pathmil import __version__
from pathmil.errors import PathmilError

if TYPE_CHECKING:
    from pathmil.config import ExtractConfig

Handler = Callable[[argparse.Namespace], int | None]


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML file of settings (see config/README.md)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, dotted keys allowed (repeatable)",
    )


# ------------------------------------------------------------------------------------------------ demo


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="write the synthetic demo cohort (pyramidal TIFFs + cohort.csv)",
        description="Write a synthetic H&E-like cohort whose labels are visible in the tissue.",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (slides/ and cohort.csv)")
    p.add_argument("--n-slides", type=int, default=40, help="number of slides (default 40)")
    p.add_argument("--n-patients", type=int, help="number of patients (default: 3/4 of the slides)")
    p.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(3072, 3584),
        metavar=("HEIGHT", "WIDTH"),
        help="slide size in pixels at 0.5 um/px (default 3072 3584)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes painting slides (default 1)")
    p.set_defaults(handler=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    from pathmil.demo import make_demo_cohort

    if args.n_slides < 2:
        raise PathmilError("--n-slides must be at least 2")
    table = make_demo_cohort(
        args.out,
        n_slides=args.n_slides,
        n_patients=args.n_patients,
        size_px=tuple(args.size),
        seed=args.seed,
        workers=args.workers,
    )
    print(f"wrote {len(table)} slides of {table['patient_id'].nunique()} patients to {args.out}/cohort.csv")


# ---------------------------------------------------------------------------------------------- cohort


def add_cohort_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cohort",
        help="check a cohort table (or list a slide folder) and write it normalised",
        description="Validate a cohort table, or make one from a slide directory, and write it "
        "with absolute slide paths.",
    )
    p.add_argument("--cohort", type=Path, help="cohort table (CSV or TSV)")
    p.add_argument("--slide-dir", type=Path, help="folder of slides (ids from file names)")
    p.add_argument("--out", type=Path, required=True, help="normalised cohort CSV")
    p.add_argument(
        "--facts-dir",
        type=Path,
        help="keep only the slides whose facts JSON in this folder says ok (after tile/extract)",
    )
    p.add_argument("--failures", type=Path, help="with --facts-dir: CSV of the dropped slides and why")
    p.set_defaults(handler=run_cohort)


def run_cohort(args: argparse.Namespace) -> None:
    from pathmil.cohort import load_slides, split_by_facts
    from pathmil.fileio import atomic_output

    table = load_slides(args.cohort, args.slide_dir)
    if args.facts_dir is not None:
        table, failed = split_by_facts(table, args.facts_dir)
        if args.failures is not None:
            with atomic_output(args.failures) as tmp:
                failed.to_csv(tmp, index=False)
        for row in failed.itertuples():
            print(
                f"warning: slide {row.slide_id} left out ({row.stage} failed): {row.error}", file=sys.stderr
            )
        if table.empty:
            raise PathmilError(
                f"every slide failed (see {args.failures or 'the facts files'}); nothing to go on with"
            )
    with atomic_output(args.out) as tmp:
        table.to_csv(tmp, index=False)
    print(f"{len(table)} slides -> {args.out}")


# ------------------------------------------------------------------------------------------------ tile


def _add_batch_args(p: argparse.ArgumentParser) -> None:
    """The per-slide stages' shared arguments: which slides (batch mode) and what a failing slide does."""
    p.add_argument("--cohort", type=Path, help="cohort table with slide_id and path (batch mode)")
    p.add_argument("--slide-dir", type=Path, help="folder of slides (batch mode, ids from file names)")
    p.add_argument(
        "--skip-errors",
        action="store_true",
        help="record a failing slide (failures table in batch mode, facts JSON with status 'failed' "
        "for one slide) and exit 0",
    )
    p.add_argument("--failures", type=Path, help="batch mode: failures CSV (default OUT_DIR/failures.csv)")


def add_tile_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tile",
        help="segment tissue and lay the tile grid of one slide or a cohort",
        description="One slide: pathmil tile SLIDE --out TILES.h5. A cohort: pathmil tile --cohort "
        "COHORT.csv (or --slide-dir DIR) --out-dir DIR [--skip-errors].",
    )
    p.add_argument("slide", nargs="?", type=Path, help="slide file (omit with --cohort/--slide-dir)")
    p.add_argument("--out", type=Path, help="tiles HDF5 of the one slide")
    p.add_argument("--qc", type=Path, help="QC picture (PNG) of the one slide")
    p.add_argument("--facts", type=Path, help="facts JSON of the one slide (default: --out with .json)")
    p.add_argument("--slide-id", help="slide id (default: the file name without extension)")
    _add_batch_args(p)
    p.add_argument("--out-dir", type=Path, help="batch mode: tiles files go here")
    p.add_argument("--qc-dir", type=Path, help="batch mode: QC pictures go here")
    p.add_argument("--target-mpp", type=float, help="tile resolution in um/px (default 0.5)")
    p.add_argument("--tile-px", type=int, help="tile side in pixels (default 256)")
    p.add_argument("--overlap", type=float, help="fraction of a tile shared with the next (default 0)")
    p.add_argument("--min-tissue", type=float, help="minimum tissue fraction of a kept tile (default 0.25)")
    p.add_argument("--preset", help="segmentation preset: tcga (default), bwh_biopsy, bwh_resection")
    p.add_argument(
        "--remove-artifacts",
        action="store_true",
        default=None,
        help="drop pen marks and black borders from the tissue",
    )
    p.add_argument(
        "--mpp", type=float, help="um/px of slides whose metadata has none (the table's mpp column wins)"
    )
    _add_config_args(p)
    p.set_defaults(handler=run_tile)


def run_tile(args: argparse.Namespace) -> None:
    from pathmil.config import TileConfig, load_config

    tissue = {"remove_artifacts": True} if args.remove_artifacts else None
    config = load_config(
        TileConfig,
        args.config,
        args.overrides,
        section="tile",
        target_mpp=args.target_mpp,
        tile_px=args.tile_px,
        overlap=args.overlap,
        min_tissue=args.min_tissue,
        preset=args.preset,
        tissue=tissue,
        default_mpp=args.mpp,
    )
    config.validate()
    batch = args.cohort is not None or args.slide_dir is not None
    if batch:
        if args.slide is not None or args.out_dir is None:
            raise PathmilError("batch mode takes --cohort or --slide-dir with --out-dir, and no SLIDE")
        from pathmil.cohort import load_slides
        from pathmil.slide.tile import tile_cohort

        slides = load_slides(args.cohort, args.slide_dir)
        facts = tile_cohort(
            slides,
            args.out_dir,
            config,
            qc_dir=args.qc_dir,
            skip_errors=args.skip_errors,
            failures=args.failures,
            default_mpp=config.default_mpp,
        )
        print(
            f"tiled {len(facts)} of {len(slides)} slides into {args.out_dir}"
            + (f" ({int(facts['n_tiles'].sum())} tiles)" if len(facts) else "")
        )
        if len(facts) < len(slides):
            print(
                f"{len(slides) - len(facts)} slide(s) failed: see {args.failures or args.out_dir / 'failures.csv'}"
            )
        return
    if args.slide is None or args.out is None:
        raise PathmilError("give SLIDE and --out (one slide), or --cohort/--slide-dir with --out-dir (batch)")
    from pathmil.slide.reader import slide_id_from_path
    from pathmil.slide.tile import record_failure, tile_slide

    try:
        facts = tile_slide(
            args.slide,
            args.out,
            config,
            qc=args.qc,
            facts=args.facts,
            slide_id=args.slide_id,
            mpp=config.default_mpp,
        )
    except PathmilError as err:
        if not args.skip_errors:
            raise
        record_failure(
            args.facts or args.out.with_suffix(".json"),
            args.slide_id or slide_id_from_path(args.slide),
            args.slide,
            "tile",
            err,
        )
        print(f"pathmil: skipped: {err}", file=sys.stderr)
        return
    print(
        f"{facts['slide_id']}: {facts['n_tiles']} tiles at {config.target_mpp} um/px "
        f"(level {facts['read_level']}, {facts['read_px']} px read) in {facts['seconds']['total']:.2f} s"
    )
    for warning in facts["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)


# ------------------------------------------------------------------------------------------ training

TASKS = ("classification", "survival", "regression")


def add_split_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "split",
        help="patient-level cross-validation folds of a cohort",
        description="Stratified patient-level folds; each fold's training part keeps a "
        "validation share for early stopping.",
    )
    p.add_argument(
        "--cohort", type=Path, required=True, help="cohort table with slide_id, patient_id, labels"
    )
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--target", nargs="+", help="label column(s) (default: label | time event | stil)")
    p.add_argument("--folds", type=int, help="number of folds (default 5)")
    p.add_argument(
        "--val-frac", type=float, help="share of each fold's training patients for validation (0.15)"
    )
    p.add_argument("--test-frac", type=float, help="hold out this share of patients as a fixed test set")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", type=Path, required=True, help="splits CSV (slide_id, patient_id, fold, split)")
    _add_config_args(p)
    p.set_defaults(handler=run_split)


def run_split(args: argparse.Namespace) -> None:
    from pathmil.cohort import read_labelled_table
    from pathmil.config import SplitConfig, load_config
    from pathmil.data.splits import make_splits
    from pathmil.fileio import atomic_output
    from pathmil.tasks import create_task

    config = load_config(
        SplitConfig,
        args.config,
        args.overrides,
        section="split",
        folds=args.folds,
        val_frac=args.val_frac,
        test_frac=args.test_frac,
        seed=args.seed,
    )
    task = create_task(args.task, target=args.target)
    table = read_labelled_table(args.cohort, task.label_columns)
    task.check_labels(table)
    patients = table.groupby("patient_id", sort=True).first().reset_index()
    strata = task.stratify_labels(patients)
    splits = make_splits(
        patients, table, strata, config.folds, config.val_frac, config.test_frac, config.seed
    )
    with atomic_output(args.out) as tmp:
        splits.to_csv(tmp, index=False)
    counts = splits.groupby(["fold", "split"])["patient_id"].nunique().unstack(fill_value=0)
    print(f"{config.folds} folds of {len(patients)} patients ({len(table)} slides) -> {args.out}")
    print(counts.to_string())


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a MIL aggregator on one fold",
        description="Train on the fold's training bags, stop early on validation, and write "
        "best.pt, history.csv, predictions.csv and metrics.json to --out.",
    )
    p.add_argument(
        "--features", type=Path, required=True, help="folder of bag files (pathmil, CLAM, TRIDENT, STAMP)"
    )
    p.add_argument(
        "--cohort", type=Path, required=True, help="cohort table with slide_id, patient_id, labels"
    )
    p.add_argument("--splits", type=Path, required=True, help="splits CSV from `pathmil split`")
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--task", choices=TASKS)
    p.add_argument("--target", nargs="+", help="label column(s) (default: label | time event | stil)")
    p.add_argument("--aggregator", help="aggregator name (default abmil; see `pathmil models`)")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    _add_config_args(p)
    p.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> None:
    from pathmil.config import TrainConfig, load_config
    from pathmil.training.fit import train

    config = load_config(
        TrainConfig,
        args.config,
        args.overrides,
        section="train",
        task=args.task,
        target=args.target,
        aggregator=args.aggregator,
    )
    summary = train(
        config, args.features, args.cohort, args.splits, args.fold, args.out, progress=not args.no_progress
    )
    test = summary["metrics"].get("test", {})
    main_metric = summary["main_metric"]
    print(
        f"{summary['task']}/{summary['aggregator']} fold {summary['fold']}: best epoch {summary['best_epoch']}, "
        f"test {main_metric} {test.get(main_metric, float('nan')):.4f} -> {args.out}"
    )


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="per-fold and pooled metrics of runs, with bootstrap CIs",
        description="Summarise the fold runs of one task and aggregator.",
    )
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="run folders (one per fold)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n-bootstrap", type=int, help="bootstrap resamples (default 1000; 0 turns CIs off)")
    p.add_argument("--time-unit", help="unit of survival times, for plot axes (default months)")
    _add_config_args(p)
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> None:
    from pathmil.config import EvaluateConfig, PlotConfig, load_config
    from pathmil.evaluation.summary import evaluate_runs

    config = load_config(
        EvaluateConfig, args.config, args.overrides, section="evaluate", n_bootstrap=args.n_bootstrap
    )
    plots = load_config(PlotConfig, args.config, None, section="plots", time_unit=args.time_unit)
    result = evaluate_runs(args.runs, args.out, config, plots)
    print(
        f"{result['task']}/{result['aggregator']}: {len(args.runs)} runs, {result['n_test_bags']} test bags"
    )
    for row in result["summary"]:
        print(
            f"  {row['metric']:>16}: pooled {row['pooled']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
            f"  folds {row['fold_mean']:.4f} +- {row['fold_std']:.4f}"
        )


def add_summary_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "summary",
        help="one table of several `pathmil evaluate` outputs",
        description="Gather the metrics of several evaluations (task x aggregator) into one CSV.",
    )
    p.add_argument(
        "--evals", type=Path, nargs="+", required=True, help="folders written by `pathmil evaluate`"
    )
    p.add_argument("--out", type=Path, required=True, help="summary CSV")
    p.set_defaults(handler=run_summary)


def run_summary(args: argparse.Namespace) -> None:
    from pathmil.evaluation.summary import summarise_evaluations
    from pathmil.fileio import atomic_output

    table = summarise_evaluations(args.evals)
    with atomic_output(args.out) as tmp:
        table.to_csv(tmp, index=False)
    main_rows = table[table["main"]]
    for row in main_rows.itertuples():
        print(
            f"{row.task:>15} {row.aggregator:>15} {row.metric}: {row.pooled:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]"
        )


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="paired comparisons of configurations (encoder x aggregator) of one task",
        description="Compare the training runs of several configurations of one task on the same patients: "
        "main metric and IQM with bootstrap CIs, paired differences, probability of improvement, "
        "performance profiles, calibration. Labels come from each run's files, not its path.",
    )
    p.add_argument(
        "--runs",
        type=Path,
        nargs="+",
        required=True,
        help="run folders of `pathmil train`, or folders holding them",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--n-bootstrap", type=int, help="bootstrap resamples (default 1000; 0 turns CIs off)")
    p.add_argument("--time-unit", help="unit of survival times, for plot axes (default months)")
    _add_config_args(p)
    p.set_defaults(handler=run_compare)


def run_compare(args: argparse.Namespace) -> None:
    from pathmil.config import EvaluateConfig, PlotConfig, load_config
    from pathmil.evaluation.compare import compare_runs

    config = load_config(
        EvaluateConfig, args.config, args.overrides, section="evaluate", n_bootstrap=args.n_bootstrap
    )
    plots = load_config(PlotConfig, args.config, None, section="plots", time_unit=args.time_unit)
    result = compare_runs(args.runs, args.out, config, plots)
    print(f"{result['task']}: {result['main_metric']} on {result['n_patients']} patients -> {args.out}")
    for row in result["configurations"]:
        print(
            f"  {row['configuration']:>24}: {row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
            f"  IQM {row['iqm']:.3f} over {row['n_runs']} runs"
        )
    for line in result["verdicts"]:
        print(f"  {line}")


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the MIL aggregators")
    p.set_defaults(handler=lambda args: print("\n".join(__import__("pathmil.models").models.list_models())))


# ------------------------------------------------------------------------------- predict and explain


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="score slides with trained models (one checkpoint, or several as an ensemble)",
        description="Score bag files (one bag each) or a cohort table's bags (joined per patient as the "
        "model was trained) and write slide_id, score (and the task's other columns) as training does. "
        "Several checkpoints: the mean of their scores.",
    )
    p.add_argument("--model", type=Path, nargs="+", required=True, help="checkpoint(s): a run's best.pt")
    p.add_argument("--features", type=Path, nargs="+", help="bag files to score, one bag each")
    p.add_argument("--cohort", type=Path, help="cohort table (slide_id, patient_id) instead of --features")
    p.add_argument("--features-dir", type=Path, help="folder of the cohort's bag files (with --cohort)")
    p.add_argument("--task", choices=TASKS, help="refuse models of another task")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--out", type=Path, required=True, help="predictions CSV")
    p.set_defaults(handler=run_predict)


def run_predict(args: argparse.Namespace) -> None:
    from pathmil.evaluation.predict import predict, write_predictions

    if args.cohort is not None and args.features_dir is None:
        raise PathmilError("--cohort needs --features-dir, the folder of its bag files")
    table = predict(
        args.model,
        features=args.features,
        cohort=args.cohort,
        features_dir=args.features_dir,
        expected_task=args.task,
        device=args.device,
        progress=sys.stderr.isatty(),
    )
    write_predictions(args.out, table)
    print(f"{len(table)} bags scored by {len(args.model)} model(s) -> {args.out}")


def add_heatmap_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "heatmap",
        help="paint a model's instance scores over a slide, with a montage of its top and bottom tiles",
        description="Instance scores (attention, per-tile predictions, pooling weights) of one slide's bag, "
        "rank-normalised to percentiles and painted at the tiles' positions over a thumbnail.",
    )
    p.add_argument(
        "--model",
        type=Path,
        nargs="+",
        required=True,
        help="checkpoint: a run's best.pt; with --splits, the best.pt of every fold",
    )
    p.add_argument(
        "--splits",
        type=Path,
        help="splits CSV: paint with the model of the fold that held this slide out for testing",
    )
    p.add_argument("--features", type=Path, required=True, help="the slide's bag file (with coords)")
    p.add_argument("--slide", type=Path, required=True, help="the slide file")
    p.add_argument("--out", type=Path, required=True, help="heatmap PNG")
    p.add_argument("--montage", type=Path, help="PNG of the top-k and bottom-k tiles")
    p.add_argument("--scores", type=Path, help="CSV of every tile's x, y, score and percentile")
    p.add_argument("--top-k", type=int, help="tiles per row of the montage (default 8)")
    p.add_argument("--smooth", type=float, help="Gaussian smoothing, sigma in tiles (default 0: none)")
    p.add_argument("--max-px", type=int, help="longest side of the thumbnail (default 2048)")
    p.add_argument(
        "--mpp", type=float, help="um/px of a slide whose metadata has none (STAMP coords need it)"
    )
    p.add_argument("--task", choices=TASKS, help="refuse a model of another task")
    _add_config_args(p)
    p.set_defaults(handler=run_heatmap)


def run_heatmap(args: argparse.Namespace) -> None:
    from pathmil.config import HeatmapConfig, load_config
    from pathmil.evaluation.heatmap import make_heatmap

    config = load_config(
        HeatmapConfig,
        args.config,
        args.overrides,
        section="heatmap",
        top_k=args.top_k,
        smooth=args.smooth,
        max_px=args.max_px,
    )
    model = args.model[0]
    if len(args.model) > 1 or args.splits is not None:
        from pathmil.evaluation.heatmap import held_out_model

        model = held_out_model(args.model, args.splits, args.features)
    facts = make_heatmap(
        model,
        args.features,
        args.slide,
        args.out,
        montage=args.montage,
        scores_csv=args.scores,
        config=config,
        mpp=args.mpp,
        expected_task=args.task,
    )
    print(
        f"{facts['slide_id']}: {facts['n_tiles']} tiles, slide score {facts['score']:.4g} -> {args.out} "
        f"in {facts['seconds']:.2f} s"
    )


# --------------------------------------------------------------------------------------------- extract


def add_extract_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="encode the tiles of one slide or a cohort with a frozen encoder into bag files",
        description="One slide: pathmil extract SLIDE --tiles TILES.h5 --encoder NAME --out FEATURES.h5. "
        "A cohort: pathmil extract --cohort COHORT.csv (or --slide-dir DIR) --tiles-dir DIR --out-dir DIR "
        "(the model is loaded once). A slide whose bag already matches encoder, weights and tiles is "
        "skipped unless --overwrite.",
    )
    p.add_argument("slide", nargs="?", type=Path, help="slide file (omit with --cohort/--slide-dir)")
    p.add_argument("--tiles", type=Path, help="tiles HDF5 of the one slide (from pathmil tile)")
    p.add_argument("--out", type=Path, help="bag HDF5 of the one slide")
    p.add_argument("--facts", type=Path, help="facts JSON of the one slide (default: --out with .json)")
    p.add_argument("--slide-id", help="slide id (default: the tiles file's, else the slide file name)")
    _add_batch_args(p)
    p.add_argument("--tiles-dir", type=Path, help="batch mode: tiles files {slide_id}.h5 are here")
    p.add_argument("--out-dir", type=Path, help="batch mode: bag files go here")
    p.add_argument("--encoder", help="encoder name (default resnet50_trunc); see --list-encoders")
    p.add_argument("--list-encoders", action="store_true", help="print the registered encoders and exit")
    p.add_argument("--weights", help="weights file (default: the Hugging Face or torch hub cache)")
    p.add_argument(
        "--random-init",
        action="store_true",
        default=None,
        help="random weights (tests and baselines only; recorded in the bag)",
    )
    p.add_argument("--batch-size", type=int, help="tiles per batch (default 64)")
    p.add_argument("--workers", type=int, help="tile-reading processes (default: threads - 1, from 1 to 8)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto")
    p.add_argument("--dtype", choices=["float16", "float32"], help="features on disk (default float16)")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="default auto: bf16 on CUDA and on CPUs with AMX/AVX-512 BF16, else fp32",
    )
    p.add_argument(
        "--optimize",
        choices=["auto", "none", "jit", "compile"],
        help="default auto: fused TorchScript for CNNs in fp32 on CPU, else none",
    )
    p.add_argument("--overwrite", action="store_true", default=None, help="redo slides already extracted")
    _add_config_args(p)
    p.set_defaults(handler=run_extract)


def run_extract(args: argparse.Namespace) -> None:
    from pathmil.config import ExtractConfig, load_config

    if args.list_encoders:
        from pathmil.features.encoders import list_encoders

        print("\n".join([*list_encoders(), "timm:<model_name>"]))
        return
    config = load_config(
        ExtractConfig,
        args.config,
        args.overrides,
        section="extract",
        encoder=args.encoder,
        weights=args.weights,
        random_init=args.random_init,
        batch_size=args.batch_size,
        workers=args.workers,
        device=args.device,
        dtype=args.dtype,
        precision=args.precision,
        optimize=args.optimize,
        overwrite=args.overwrite,
    )
    config.validate()
    if args.cohort is not None or args.slide_dir is not None:
        _extract_batch(args, config)
    else:
        _extract_one(args, config)


def _extract_batch(args: argparse.Namespace, config: ExtractConfig) -> None:
    if args.slide is not None or args.tiles_dir is None or args.out_dir is None:
        raise PathmilError(
            "batch mode takes --cohort or --slide-dir with --tiles-dir and --out-dir, and no SLIDE"
        )
    from pathmil.cohort import load_slides
    from pathmil.features.extract import extract_cohort

    slides = load_slides(args.cohort, args.slide_dir)
    facts = extract_cohort(
        slides, args.tiles_dir, args.out_dir, config, skip_errors=args.skip_errors, failures=args.failures
    )
    done = int(facts["skipped"].sum()) if len(facts) else 0
    print(
        f"extracted {len(facts) - done} and kept {done} up-to-date of {len(slides)} slides into {args.out_dir}"
    )
    if len(facts) < len(slides):
        print(
            f"{len(slides) - len(facts)} slide(s) failed: see {args.failures or args.out_dir / 'failures.csv'}"
        )


def _extract_one(args: argparse.Namespace, config: ExtractConfig) -> None:
    if args.slide is None or args.tiles is None or args.out is None:
        raise PathmilError(
            "give SLIDE, --tiles and --out (one slide), or --cohort/--slide-dir with --tiles-dir and "
            "--out-dir (batch)"
        )
    from pathmil.features.extract import FeatureExtractor, extract_slide
    from pathmil.slide.reader import slide_id_from_path
    from pathmil.slide.tile import record_failure

    try:
        facts = extract_slide(
            args.slide,
            args.tiles,
            args.out,
            FeatureExtractor(config),
            slide_id=args.slide_id,
            facts=args.facts,
            progress=sys.stderr.isatty(),
        )
    except PathmilError as err:
        if not args.skip_errors:
            raise
        record_failure(
            args.facts or args.out.with_suffix(".json"),
            args.slide_id or slide_id_from_path(args.slide),
            args.slide,
            getattr(err, "stage", "extract"),
            err,
        )
        print(f"pathmil: skipped: {err}", file=sys.stderr)
        return
    if facts["skipped"]:
        print(f"{facts['slide_id']}: {args.out} is up to date (--overwrite to redo it)")
        return
    print(
        f"{facts['slide_id']}: {facts['n_tiles']} x {facts['dim']} features ({facts['encoder']}, "
        f"{facts['precision']} on {facts['device']}) at {facts['tiles_per_second']:.1f} tiles/s -> {args.out}"
    )
    for warning in facts["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ main

PARSERS = [
    add_demo_parser,
    add_cohort_parser,
    add_tile_parser,
    add_extract_parser,
    add_split_parser,
    add_train_parser,
    add_evaluate_parser,
    add_summary_parser,
    add_compare_parser,
    add_models_parser,
    add_predict_parser,
    add_heatmap_parser,
]


def limit_threads(n: int) -> None:
    """Cap the compute threads of this process (before torch is imported, so its pools start small)."""
    import os

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(n)
    import cv2

    cv2.setNumThreads(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathmil", description="Whole-slide images to multiple-instance-learning models."
    )
    parser.add_argument("--version", action="version", version=f"pathmil {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch and OpenCV (default: all cores); "
        "set it when several jobs share a machine, or they slow each other down",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("numexpr").setLevel(logging.WARNING)
    if args.threads:
        limit_threads(args.threads)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except PathmilError as err:
        print(f"pathmil: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pathmil: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
