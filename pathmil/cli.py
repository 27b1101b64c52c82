"""The ``pathmil`` command: one sub-command per stage.

Each sub-command parses its arguments, then imports its stage lazily and calls it, so ``pathmil tile``
never imports torch and ``pathmil --help`` answers at once. Settings flags (``--tile-px``, ``--lr``, ...) are
made from the stage's settings declaration (:func:`pathmil.settings.add_flags`): their types, choices and
help, defaults included, are written once, there. Only the invoked sub-command's flags are built, since
building them imports the stage. Errors a user can fix (:class:`~pathmil.errors.PathmilError`) print as one
line ``pathmil: error: ...`` and exit with status 1.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pathmil import __version__
from pathmil.errors import PathmilError

if TYPE_CHECKING:
    from pathmil.settings import Settings

TASKS = ("classification", "survival", "regression")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        action="append",
        help="YAML file of settings (see config/README.md); repeat it to merge several, later ones winning",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, dotted keys allowed (repeatable)",
    )


def _settings(args: argparse.Namespace, cls: type[Settings], **flags: Any) -> Settings:
    """The command's settings of ``cls``: defaults, --config, --set, then its flags."""
    from pathmil.config import load_settings
    from pathmil.settings import given_flags

    return load_settings(cls, args.config, args.overrides, {**given_flags(args, cls), **flags})


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


def _report_batch(args: argparse.Namespace, summary: str, n_done: int, n_slides: int) -> None:
    print(summary)
    if n_done < n_slides:
        print(f"{n_slides - n_done} slide(s) failed: see {args.failures or args.out_dir / 'failures.csv'}")


def _one_slide_id(args: argparse.Namespace) -> str:
    """The slide id of a one-slide command: ``--slide-id``, else the file name (both checked)."""
    from pathmil.ids import check_slide_id, slide_id_from_path

    return check_slide_id(args.slide_id or slide_id_from_path(args.slide), "--slide-id")


# ------------------------------------------------------------------------------------------------ demo


def add_demo_parser(p: argparse.ArgumentParser) -> None:
    from pathmil.demo import DemoConfig
    from pathmil.settings import add_flags

    p.add_argument("--out", type=Path, required=True, help="output folder (slides/ and cohort.csv)")
    add_flags(p, DemoConfig, list(DemoConfig.model_fields))
    _add_config_args(p)


def run_demo(args: argparse.Namespace) -> None:
    from pathmil.config import load_settings
    from pathmil.demo import DemoConfig, make_demo_cohort
    from pathmil.settings import given_flags

    config = load_settings(
        DemoConfig, args.config, args.overrides, given_flags(args, DemoConfig), "slides.demo"
    )
    table = make_demo_cohort(
        args.out,
        n_slides=config.n_slides,
        n_patients=config.n_patients,
        size_px=config.size,
        seed=config.seed,
        workers=config.workers,
        hue_shift=config.hue_shift,
        scale=config.scale,
        progress=sys.stderr.isatty(),
    )
    print(f"wrote {len(table)} slides of {table['patient_id'].nunique()} patients to {args.out}/cohort.csv")


# ---------------------------------------------------------------------------------------------- cohort


def add_cohort_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cohort", type=Path, help="cohort table (CSV or TSV)")
    p.add_argument("--slide-dir", type=Path, help="folder of slides (ids from file names)")
    p.add_argument("--out", type=Path, required=True, help="normalised cohort CSV")
    p.add_argument(
        "--facts-dir",
        type=Path,
        nargs="+",
        help="keep only the slides whose facts JSON says ok in every one of these folders (after "
        "tile/extract; one folder per encoder)",
    )
    p.add_argument("--failures", type=Path, help="with --facts-dir: CSV of the dropped slides and why")


def run_cohort(args: argparse.Namespace) -> None:
    from pathmil.batch import write_failures
    from pathmil.cohort import load_slides, split_by_facts
    from pathmil.fileio import atomic_output

    table = load_slides(args.cohort, args.slide_dir)
    if args.facts_dir is not None:
        table, failed = split_by_facts(table, args.facts_dir)
        if args.failures is not None:
            write_failures(args.failures, failed.to_dict("records"))
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

TILE_FLAGS = ["target_mpp", "tile_px", "overlap", "min_tissue", "preset", "default_mpp"]


def add_tile_parser(p: argparse.ArgumentParser) -> None:
    from pathmil.settings import add_flags
    from pathmil.slide.tile import TileConfig

    p.add_argument("slide", nargs="?", type=Path, help="slide file (omit with --cohort/--slide-dir)")
    p.add_argument("--out", type=Path, help="tiles HDF5 of the one slide")
    p.add_argument("--qc", type=Path, help="QC picture (PNG) of the one slide")
    p.add_argument("--facts", type=Path, help="facts JSON of the one slide (default: --out with .json)")
    p.add_argument(
        "--geojson", type=Path, help="tissue outline written as GeoJSON (default: --out with .geojson)"
    )
    p.add_argument(
        "--tissue-geojson",
        type=Path,
        help="given tissue outline or region (GeoJSON, level-0 px) used instead of the automatic mask",
    )
    p.add_argument("--slide-id", help="slide id (default: the file name without extension)")
    p.add_argument(
        "--table-mpp",
        type=float,
        metavar="UM_PER_PX",
        help="the cohort table's mpp of the one slide (the workflow passes it): as in batch mode it is used "
        "when the metadata has none, before --mpp, and the facts say mpp_source 'table'",
    )
    _add_batch_args(p)
    p.add_argument("--out-dir", type=Path, help="batch mode: tiles files go here")
    p.add_argument("--qc-dir", type=Path, help="batch mode: QC pictures go here")
    add_flags(p, TileConfig, TILE_FLAGS, flags={"default_mpp": "--mpp"})
    p.add_argument(
        "--remove-artifacts",
        action="store_true",
        default=None,
        help="drop pen marks and black borders from the tissue (tissue.remove_artifacts)",
    )
    _add_config_args(p)


def run_tile(args: argparse.Namespace) -> None:
    from pathmil.slide.tile import TileConfig

    config = _settings(args, TileConfig, tissue={"remove_artifacts": True} if args.remove_artifacts else None)
    if args.cohort is not None or args.slide_dir is not None:
        _tile_batch(args, config)
    else:
        _tile_one(args, config)


def _tile_batch(args: argparse.Namespace, config: Any) -> None:
    if (
        args.slide is not None
        or args.out_dir is None
        or args.tissue_geojson
        or args.geojson
        or args.table_mpp is not None
    ):
        raise PathmilError(
            "batch mode takes --cohort or --slide-dir with --out-dir, and no SLIDE, --geojson, "
            "--tissue-geojson or --table-mpp (give outlines in the table's 'tissue' column or "
            "tile.tissue_dir, resolutions in its 'mpp' column)"
        )
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
        progress=sys.stderr.isatty(),
        default_source=_default_mpp_source(args),
    )
    print(
        f"tiled {len(facts)} of {len(slides)} slides into {args.out_dir}"
        + (f" ({int(facts['n_tiles'].sum())} tiles)" if len(facts) else "")
    )
    if len(facts) < len(slides):
        print(
            f"{len(slides) - len(facts)} slide(s) failed: see {args.failures or args.out_dir / 'failures.csv'}"
        )


def _default_mpp_source(args: argparse.Namespace) -> str:
    """Where ``default_mpp`` came from: the --mpp flag, else the settings (tile.default_mpp)."""
    return "argument" if args.default_mpp is not None else "default"


def _tile_one(args: argparse.Namespace, config: Any) -> None:
    if args.slide is None or args.out is None:
        raise PathmilError("give SLIDE and --out (one slide), or --cohort/--slide-dir with --out-dir (batch)")
    from pathmil.batch import run_one
    from pathmil.slide.tile import tile_slide

    slide_id = _one_slide_id(args)
    facts = run_one(
        lambda: tile_slide(
            args.slide,
            args.out,
            config,
            qc=args.qc,
            facts=args.facts,
            slide_id=slide_id,
            mpp=config.default_mpp if args.table_mpp is None else args.table_mpp,
            mpp_source=_default_mpp_source(args) if args.table_mpp is None else "table",
            tissue=args.tissue_geojson,
            geojson=args.geojson,
        ),
        "tile",
        slide_id,
        args.slide,
        args.facts or args.out.with_suffix(".json"),
        args.skip_errors,
        outputs=[args.out, args.qc, args.geojson or args.out.with_suffix(".geojson")],
    )
    if facts is None:
        return
    print(
        f"{facts['slide_id']}: {facts['n_tiles']} tiles at {config.target_mpp} um/px "
        f"(level {facts['read_level']}, {facts['read_px']} px read) in {facts['seconds']['total']:.2f} s"
    )
    for warning in facts["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)


# --------------------------------------------------------------------------------------------- extract

EXTRACT_FLAGS = ["encoder", "weights", "random_init", "batch_size", "workers", "device", "dtype", "precision"]
EXTRACT_FLAGS += ["optimize", "overwrite"]


def add_extract_parser(p: argparse.ArgumentParser) -> None:
    from pathmil.features.extract import ExtractConfig
    from pathmil.settings import add_flags

    p.add_argument("slide", nargs="?", type=Path, help="slide file (omit with --cohort/--slide-dir)")
    p.add_argument("--tiles", type=Path, help="tiles HDF5 of the one slide (from pathmil tile)")
    p.add_argument("--out", type=Path, help="bag HDF5 of the one slide")
    p.add_argument("--facts", type=Path, help="facts JSON of the one slide (default: --out with .json)")
    p.add_argument("--slide-id", help="slide id (default: the tiles file's, else the slide file name)")
    _add_batch_args(p)
    p.add_argument("--tiles-dir", type=Path, help="batch mode: tiles files {slide_id}.h5 are here")
    p.add_argument("--out-dir", type=Path, help="batch mode: bag files go here")
    p.add_argument("--list-encoders", action="store_true", help="print the registered encoders and exit")
    add_flags(p, ExtractConfig, EXTRACT_FLAGS)
    _add_config_args(p)


def run_extract(args: argparse.Namespace) -> None:
    from pathmil.features.extract import ExtractConfig

    if args.list_encoders:
        from pathmil.features.encoders import list_encoders

        print("\n".join([*list_encoders(), "timm:<model_name>"]))
        return
    config = _settings(args, ExtractConfig)
    if args.cohort is not None or args.slide_dir is not None:
        _extract_batch(args, config)
    else:
        _extract_one(args, config)


def _extract_batch(args: argparse.Namespace, config: Any) -> None:
    if args.slide is not None or args.tiles_dir is None or args.out_dir is None:
        raise PathmilError(
            "batch mode takes --cohort or --slide-dir with --tiles-dir and --out-dir, and no SLIDE"
        )
    from pathmil.cohort import load_slides
    from pathmil.features.extract import extract_cohort

    slides = load_slides(args.cohort, args.slide_dir)
    facts = extract_cohort(
        slides,
        args.tiles_dir,
        args.out_dir,
        config,
        skip_errors=args.skip_errors,
        failures=args.failures,
        progress=sys.stderr.isatty(),
    )
    done = int(facts["skipped"].sum()) if len(facts) else 0
    print(
        f"extracted {len(facts) - done} and kept {done} up-to-date of {len(slides)} slides into {args.out_dir}"
    )
    if len(facts) < len(slides):
        print(
            f"{len(slides) - len(facts)} slide(s) failed: see {args.failures or args.out_dir / 'failures.csv'}"
        )


def _extract_one(args: argparse.Namespace, config: Any) -> None:
    if args.slide is None or args.tiles is None or args.out is None:
        raise PathmilError(
            "give SLIDE, --tiles and --out (one slide), or --cohort/--slide-dir with --tiles-dir and "
            "--out-dir (batch)"
        )
    from pathmil.batch import run_one
    from pathmil.features.extract import FeatureExtractor, extract_slide

    slide_id = _one_slide_id(args) if args.slide_id else None
    facts = run_one(
        lambda: extract_slide(
            args.slide,
            args.tiles,
            args.out,
            FeatureExtractor(config),
            slide_id=slide_id,
            facts=args.facts,
            progress=sys.stderr.isatty(),
        ),
        "extract",
        slide_id or _one_slide_id(args),
        args.slide,
        args.facts or args.out.with_suffix(".json"),
        args.skip_errors,
        outputs=[args.out],
    )
    if facts is None:
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


# ------------------------------------------------------------------------------------------ training


def add_split_parser(p: argparse.ArgumentParser) -> None:
    from pathmil.data.splits import SplitConfig
    from pathmil.settings import add_flags

    p.add_argument(
        "--cohort", type=Path, required=True, help="cohort table with slide_id, patient_id, labels"
    )
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--target", nargs="+", help="label column(s) (default: label | time event | stil)")
    add_flags(p, SplitConfig, [name for name in SplitConfig.model_fields if name != "task_options"])
    p.add_argument("--out", type=Path, required=True, help="splits CSV (slide_id, patient_id, fold, split)")
    _add_config_args(p)


def run_split(args: argparse.Namespace) -> None:
    from pathmil.cohort import read_labelled_table
    from pathmil.data.splits import SplitConfig, make_splits
    from pathmil.fileio import atomic_output
    from pathmil.tasks import create_task

    config = _settings(args, SplitConfig)
    task = create_task(args.task, target=args.target, **config.task_options)
    table = read_labelled_table(args.cohort, task.label_columns, config.bag_level)
    task.check_labels(table)
    if config.bag_level == "patient":
        bags = table.groupby("patient_id", sort=True).first().reset_index()
    else:
        bags = table.sort_values("slide_id").reset_index(drop=True)
    splits = make_splits(
        bags,
        table,
        task.stratify_labels(bags),
        config.folds,
        config.val_frac,
        config.test_frac,
        config.seed,
        needs=task.fold_needs(bags),
    )
    with atomic_output(args.out) as tmp:
        splits.to_csv(tmp, index=False)
    counts = splits.groupby(["fold", "split"])["patient_id"].nunique().unstack(fill_value=0)
    print(
        f"{config.folds} folds of {table['patient_id'].nunique()} patients ({len(table)} slides, "
        f"{config.bag_level} bags) -> {args.out}"
    )
    print(counts.to_string())


def add_train_parser(p: argparse.ArgumentParser) -> None:
    from pathmil.settings import add_flags
    from pathmil.training.run import TrainConfig

    p.add_argument(
        "--features", type=Path, required=True, help="folder of bag files (pathmil, CLAM, TRIDENT, STAMP)"
    )
    p.add_argument(
        "--cohort", type=Path, required=True, help="cohort table with slide_id, patient_id, labels"
    )
    p.add_argument("--splits", type=Path, required=True, help="splits CSV from `pathmil split`")
    p.add_argument("--fold", type=int, required=True)
    add_flags(p, TrainConfig, ["task", "aggregator"])
    p.add_argument("--target", nargs="+", help="label column(s) (default: label | time event | stil)")
    p.add_argument("--teacher-init", help="MHIM-MIL: the baseline run's best.pt that starts the teacher")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logs only; none when stderr is a file)"
    )
    _add_config_args(p)


def run_train(args: argparse.Namespace) -> None:
    from pathmil.config import deep_merge
    from pathmil.training.fit import train
    from pathmil.training.run import TrainConfig

    flags: dict[str, Any] = {"target": args.target}
    config = _settings(args, TrainConfig, **flags)
    if args.teacher_init:
        config = TrainConfig.build(
            deep_merge(config.to_dict(), {"mhim": {"teacher_init": args.teacher_init}})
        )
    progress = not args.no_progress and sys.stderr.isatty()  # a bar in a log file is noise
    summary = train(config, args.features, args.cohort, args.splits, args.fold, args.out, progress=progress)
    test = summary["metrics"].get("test", {})
    main_metric = summary["main_metric"]
    print(
        f"{summary['task']}/{summary['aggregator']} fold {summary['fold']}: best epoch {summary['best_epoch']}, "
        f"test {main_metric} {test.get(main_metric, float('nan')):.4f} -> {args.out}"
    )


def add_search_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, required=True, help="folder of bag files")
    p.add_argument(
        "--cohort", type=Path, required=True, help="cohort table with slide_id, patient_id, labels"
    )
    p.add_argument("--splits", type=Path, required=True, help="splits CSV from `pathmil split`")
    p.add_argument("--fold", type=int, required=True)
    p.add_argument("--teacher-init", help="MHIM-MIL: the baseline run's best.pt that starts the teacher")
    p.add_argument(
        "--n-trials", type=int, help="trials to add in this call (default: search.n_trials in all)"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="search folder (study.journal, best.yaml, trials.csv)"
    )
    _add_config_args(p)


def run_search(args: argparse.Namespace) -> None:
    from pathmil.config import deep_merge, load_settings
    from pathmil.training.run import TrainConfig
    from pathmil.training.search import SearchConfig, search_fold

    config = _settings(args, TrainConfig)
    if args.teacher_init:
        config = TrainConfig.build(
            deep_merge(config.to_dict(), {"mhim": {"teacher_init": args.teacher_init}})
        )
    search = load_settings(SearchConfig, args.config)
    if args.n_trials is None and search.n_trials < 1:
        raise PathmilError("nothing to search: set search.n_trials (or --n-trials) to at least 1")
    best = search_fold(
        config, search, args.features, args.cohort, args.splits, args.fold, args.out, args.n_trials
    )
    print(
        f"fold {args.fold}: best validation {best['value']:.4f} after {best['trials']} trials with "
        f"{best['settings']} -> {args.out / 'best.yaml'}"
    )


# ----------------------------------------------------------------------------------------- evaluation


def _add_evaluate_flags(p: argparse.ArgumentParser) -> None:
    from pathmil.evaluation.settings import EvaluateConfig, PlotConfig
    from pathmil.settings import add_flags

    add_flags(p, EvaluateConfig, ["n_bootstrap"])
    add_flags(p, PlotConfig, ["time_unit", "value_label"])
    _add_config_args(p)


def _evaluate_settings(args: argparse.Namespace) -> tuple[Any, Any]:
    from pathmil.config import load_settings
    from pathmil.evaluation.settings import EvaluateConfig, PlotConfig
    from pathmil.settings import given_flags

    config = _settings(args, EvaluateConfig)
    plots = load_settings(PlotConfig, args.config, None, given_flags(args, PlotConfig))
    return config, plots


def add_evaluate_parser(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--runs", type=Path, nargs="+", help="run folders (one per fold)")
    what.add_argument(
        "--predictions",
        type=Path,
        help="an external test set: `pathmil predict` output with labels (needs --package or --model)",
    )
    p.add_argument("--package", type=Path, help="with --predictions: the package that made them")
    p.add_argument("--model", type=Path, help="with --predictions: a checkpoint that made them")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    _add_evaluate_flags(p)


def run_evaluate(args: argparse.Namespace) -> None:
    from pathmil.evaluation.report import statistic_label
    from pathmil.evaluation.summary import evaluate_runs

    config, plots = _evaluate_settings(args)
    if args.predictions is not None:
        _evaluate_external(args, config, plots)
        return
    result = evaluate_runs(args.runs, args.out, config, plots)
    print(
        f"{result['task']}/{result['aggregator']}: {len(args.runs)} runs, {result['n_test_bags']} test bags"
    )
    for row in result["summary"]:
        interval = f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]" if math.isfinite(row["ci_low"]) else "(no interval)"
        statistic = statistic_label(row["statistic"], row["folds"], result["folds"])
        print(
            f"  {row['metric']:>16}: {statistic} {row['pooled']:.4f} {interval}"
            f"  folds {row['fold_mean']:.4f} +- {row['fold_std']:.4f}"
        )


def _evaluate_external(args: argparse.Namespace, config: Any, plots: Any) -> None:
    import pandas as pd

    from pathmil.evaluation.summary import evaluate_external

    if (args.package is None) == (args.model is None):
        raise PathmilError("--predictions needs the models that made them: --package or --model (one)")
    if args.package is not None:
        from pathmil.evaluation.package import load_package

        run = load_package(args.package).members[0]
    else:
        from pathmil.training.run import load_run

        run = load_run(args.model, with_model=False)
    if not args.predictions.is_file():
        raise PathmilError(f"predictions {args.predictions} do not exist")
    table = pd.read_csv(args.predictions, dtype={"slide_id": str, "patient_id": str})
    result = evaluate_external(table, run.task, args.out, config, plots, run.aggregator)
    print(f"{result['task']}/{result['aggregator']}: external test set of {result['n_test_bags']} bags")
    for row in result["summary"]:
        print(f"  {row['metric']:>16}: {row['pooled']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]")


def add_compare_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runs",
        type=Path,
        nargs="+",
        required=True,
        help="run folders of `pathmil train`, or folders holding them",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    _add_evaluate_flags(p)


def run_compare(args: argparse.Namespace) -> None:
    from pathmil.evaluation.compare import compare_runs

    config, plots = _evaluate_settings(args)
    result = compare_runs(args.runs, args.out, config, plots)
    print(f"{result['task']}: {result['main_metric']} on {result['n_patients']} patients -> {args.out}")
    for row in result["configurations"]:
        print(
            f"  {row['configuration']:>24}: {row['value']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
            f"  IQM {row['iqm']:.3f} over {row['n_runs']} runs"
        )
    for line in result["verdicts"]:
        print(f"  {line}")


def add_summary_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--evals", type=Path, nargs="+", required=True, help="folders written by `pathmil evaluate`"
    )
    p.add_argument("--out", type=Path, required=True, help="summary CSV")
    p.add_argument("--html", type=Path, help="also the report's summary page (HTML): task x aggregator")
    p.add_argument("--cohort", type=Path, help="the cohort table of every slide (its count on the page)")
    p.add_argument("--failures", type=Path, help="failures.csv of `pathmil cohort` (its count on the page)")


def run_summary(args: argparse.Namespace) -> None:
    from pathmil.evaluation.summary import summarise_evaluations
    from pathmil.fileio import atomic_output

    table = summarise_evaluations(args.evals)
    with atomic_output(args.out) as tmp:
        table.to_csv(tmp, index=False)
    if args.html:
        import pandas as pd

        from pathmil.evaluation.report import summary_page, write_page

        n_slides = len(pd.read_csv(args.cohort)) if args.cohort else None
        n_failed = len(pd.read_csv(args.failures)) if args.failures and args.failures.stat().st_size else 0
        write_page(args.html, summary_page(args.evals, n_slides, n_failed))
    for row in table[table["main"]].itertuples():
        print(
            f"{row.task:>15} {row.aggregator:>15} {row.metric}: {row.pooled:.3f} [{row.ci_low:.3f}, {row.ci_high:.3f}]"
        )


def add_qc_gallery_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cohort", type=Path, required=True, help="cohort table of every slide (slide_id)")
    p.add_argument("--qc-dir", type=Path, required=True, help="QC pictures of `pathmil tile` (SLIDE.png)")
    p.add_argument("--tiles-dir", type=Path, required=True, help="tiling facts (SLIDE.json)")
    p.add_argument("--failures", type=Path, help="failures.csv of `pathmil cohort`: stage and reason")
    from pathmil.evaluation.report import MAX_THUMBNAILS

    p.add_argument(
        "--max-slides",
        type=int,
        default=MAX_THUMBNAILS,
        help="thumbnails at most, failed slides first (default %(default)s)",
    )
    p.add_argument("--out", type=Path, required=True, help="the gallery page (HTML)")


def run_qc_gallery(args: argparse.Namespace) -> None:
    from pathmil.evaluation.report import qc_gallery, write_page

    write_page(args.out, qc_gallery(args.cohort, args.qc_dir, args.tiles_dir, args.failures, args.max_slides))
    print(f"QC gallery -> {args.out}")


def add_models_parser(p: argparse.ArgumentParser) -> None:
    """No arguments: lists the registered aggregators."""


def run_models(args: argparse.Namespace) -> None:
    from pathmil.models import list_models
    from pathmil.models.registry import model_entry

    for name in list_models():
        entry = model_entry(name)
        print(name + (f"  (wraps {entry.wraps}; trains after it)" if entry.wraps else ""))


# ------------------------------------------------------------------------------- predict and explain


def add_predict_parser(p: argparse.ArgumentParser) -> None:
    from pathmil.features.extract import ExtractConfig
    from pathmil.settings import add_flags

    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", type=Path, nargs="+", help="checkpoint(s): a run's best.pt")
    model.add_argument("--package", type=Path, help="a package of `pathmil package` (its fold models)")
    p.add_argument("--features", type=Path, nargs="+", help="bag files to score, one bag each")
    p.add_argument("--cohort", type=Path, help="cohort table (slide_id, patient_id) instead of --features")
    p.add_argument(
        "--features-dir",
        type=Path,
        help="folder of the cohort's bag files (with --cohort); with --slides: where bags are made or "
        "reused (default OUT/features/ENCODER)",
    )
    p.add_argument(
        "--slides",
        type=Path,
        help="with --package: a slide folder or a cohort table (slide_id, path[, patient_id, mpp, labels]); "
        "tiles, extracts and scores them as the package was trained",
    )
    p.add_argument(
        "--tiles-dir", type=Path, help="with --slides: tiles made or reused here (default OUT/tiles)"
    )
    p.add_argument(
        "--heatmaps", action="store_true", help="with --slides: a heatmap per slide (OUT/heatmaps)"
    )
    p.add_argument(
        "--mpp", type=float, help="with --slides: um/px of slides whose metadata and table give none"
    )
    add_flags(p, ExtractConfig, ["weights", "batch_size", "workers", "precision", "optimize"])
    p.add_argument("--task", choices=TASKS, help="refuse models of another task")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="default cpu")
    p.add_argument("--out", type=Path, required=True, help="predictions CSV; with --slides an output folder")


def run_predict(args: argparse.Namespace) -> None:
    from pathmil.evaluation.predict import predict, write_predictions

    if args.cohort is not None and args.features_dir is None and args.slides is None:
        raise PathmilError("--cohort needs --features-dir, the folder of its bag files")
    if args.package is not None:
        _predict_package(args)
        return
    if args.slides is not None:
        raise PathmilError("--slides needs --package (a package knows how to tile and encode slides)")
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


def _predict_package(args: argparse.Namespace) -> None:
    from pathmil.evaluation.package import load_package, score_package

    package = load_package(args.package, args.device, weights=args.weights, expected_task=args.task)
    n_models = len(package.members)
    if args.slides is None:
        from pathmil.evaluation.predict import write_predictions

        table = score_package(package, args.features, args.cohort, args.features_dir, sys.stderr.isatty())
        write_predictions(args.out, table)
        print(f"{len(table)} bags scored by package {args.package} ({n_models} models) -> {args.out}")
        return
    if args.features is not None or args.cohort is not None:
        raise PathmilError("--slides takes the slides themselves; give no --features or --cohort with it")
    from pathmil.cohort import load_slides
    from pathmil.evaluation.deploy import predict_slides

    slides = load_slides(args.slides, None) if args.slides.is_file() else load_slides(None, args.slides)
    summary = predict_slides(
        package,
        slides,
        args.out,
        weights=args.weights,
        tiles_dir=args.tiles_dir,
        features_dir=args.features_dir,
        heatmaps=args.heatmaps,
        default_mpp=args.mpp,
        extract={
            "batch_size": args.batch_size,
            "workers": args.workers,
            "device": args.device,
            "precision": args.precision,
            "optimize": args.optimize,
        },
        progress=sys.stderr.isatty(),
    )
    print(
        f"{summary['n_bags']} bags of {summary['n_scored']} slides scored by package {args.package} "
        f"({n_models} models) -> {args.out / 'predictions.csv'}"
    )
    if summary["n_failed"]:
        print(f"{summary['n_failed']} slide(s) failed: see {args.out / 'failures.csv'}")


def add_package_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="finished run folders (one per fold)")
    p.add_argument("--out", type=Path, required=True, help="package folder (e.g. model.pathmil)")
    p.add_argument("--cohort-name", default="unnamed cohort", help="the training cohort's name (model card)")
    p.add_argument(
        "--evaluation",
        type=Path,
        help="the runs' `pathmil evaluate` folder for the card's metrics (default: evaluate them now)",
    )
    p.add_argument(
        "--features",
        type=Path,
        help="the runs' bag folder, for runs whose checkpoints do not record encoder and tiling",
    )
    _add_evaluate_flags(p)


def run_package(args: argparse.Namespace) -> None:
    from pathmil.evaluation.package import make_package

    config, plots = _evaluate_settings(args)
    manifest = make_package(
        args.runs, args.out, args.cohort_name, args.evaluation, args.features, config, plots
    )
    encoder, tiling = manifest["encoder"], manifest["tiling"] or {}
    print(
        f"{manifest['task']['name']}/{manifest['aggregator']}: {len(manifest['members'])} fold models, encoder "
        f"{encoder['name']}"
        + (f", tiles of {tiling['tile_px']} px at {tiling['target_mpp']} um/px" if tiling else "")
        + f" -> {args.out} (model card: {args.out / 'model_card.md'})"
    )


def add_heatmap_parser(p: argparse.ArgumentParser) -> None:
    from pathmil.evaluation.heatmap import HeatmapConfig
    from pathmil.settings import add_flags

    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--model",
        type=Path,
        nargs="+",
        help="checkpoint: a run's best.pt; with --splits, the best.pt of every fold",
    )
    model.add_argument(
        "--package", type=Path, help="a package: its fold models paint the mean of their percentiles"
    )
    p.add_argument(
        "--splits",
        type=Path,
        help="splits CSV: paint with the model of the fold that held this slide out for testing",
    )
    p.add_argument("--features", type=Path, required=True, help="the slide's bag file (with coords)")
    p.add_argument("--slide", type=Path, required=True, help="the slide file")
    p.add_argument("--slide-id", help="the slide's id, which the bag must name (default: the file name)")
    p.add_argument(
        "--force",
        action="store_true",
        help="paint a bag whose slide id, level-0 size or slide fingerprint disagree with the slide",
    )
    p.add_argument("--out", type=Path, required=True, help="the heatmap picture: JPEG for .jpg, else PNG")
    p.add_argument(
        "--montage", type=Path, help="picture of the top-k and bottom-k tiles (JPEG for .jpg, else PNG)"
    )
    p.add_argument("--scores", type=Path, help="CSV of every tile's x, y, score and percentile")
    add_flags(p, HeatmapConfig, ["top_k", "smooth", "max_px"])
    p.add_argument(
        "--mpp", type=float, help="um/px of a slide whose metadata has none (STAMP coords need it)"
    )
    p.add_argument("--task", choices=TASKS, help="refuse a model of another task")
    _add_config_args(p)


def run_heatmap(args: argparse.Namespace) -> None:
    from pathmil.evaluation.heatmap import HeatmapConfig, held_out_model, make_heatmap

    config = _settings(args, HeatmapConfig)
    if args.package is not None:
        from pathmil.evaluation.package import check_features, load_package
        from pathmil.features.bagfile import read_bag_attrs

        package = load_package(args.package, config.device, expected_task=args.task)
        check_features(package, read_bag_attrs(args.features), args.features)
        model = package.members
    else:
        model = args.model[0]
        if len(args.model) > 1 or args.splits is not None:
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
        slide_id=args.slide_id,
        force=args.force,
    )
    print(
        f"{facts['slide_id']}: {facts['n_tiles']} tiles, slide score {facts['score']:.4g} -> {args.out} "
        f"in {facts['seconds']:.2f} s"
    )
    for warning in facts["warnings"]:
        print(f"warning: painted although {warning} (--force)", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- export


def add_export_parser(p: argparse.ArgumentParser) -> None:
    from pathmil.features.export import FORMATS

    p.add_argument(
        "--features", type=Path, nargs="+", required=True, help="bag files, or folders of them (any layout)"
    )
    p.add_argument("--format", choices=FORMATS, required=True, help="layout to write")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--mpp",
        type=float,
        nargs="+",
        metavar="UM_PER_PX",
        help="the slides' um/px for bags with micrometre or centre coords: X, or X Y where pixels are not square",
    )


def run_export(args: argparse.Namespace) -> None:
    from pathmil.features.export import export_bags
    from pathmil.slide.reader import MPP_RANGE, plausible_mpp

    mpp = args.mpp
    if mpp is not None and (len(mpp) > 2 or not all(map(plausible_mpp, mpp))):
        raise PathmilError(
            f"--mpp takes one um/px, or two (x and y), each within {MPP_RANGE[0]:g}-{MPP_RANGE[1]:g}; "
            f"got {' '.join(map(str, mpp))}"
        )
    mpp_xy = None if mpp is None else (mpp[0], mpp[-1])  # one value: square pixels
    written = export_bags(args.features, args.out, args.format, mpp_xy)
    print(f"wrote {len(written)} file(s) in {args.format}'s layout under {args.out}")


# ---------------------------------------------------------------------------------------------- config


def add_config_parser(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--defaults", action="store_true", help="print every setting with its default (YAML)")
    what.add_argument("--schema", action="store_true", help="print the workflow's JSON schema (YAML)")
    what.add_argument(
        "--markdown", type=Path, metavar="README", help="rewrite the generated tables of config/README.md"
    )


def run_config(args: argparse.Namespace) -> None:
    import yaml

    from pathmil.config import defaults_yaml, markdown_tables, update_markdown, workflow_schema

    if args.defaults:
        print(defaults_yaml(), end="")
    elif args.schema:
        print(yaml.safe_dump(workflow_schema(), sort_keys=False, width=110), end="")
    else:
        args.markdown.write_text(update_markdown(args.markdown.read_text(), markdown_tables()))
        print(f"updated the tables of {args.markdown}")


# ------------------------------------------------------------------------------------------------ main

# name -> (help, add the arguments, run)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[..., Any]]] = {
    "demo": ("write the synthetic demo cohort (pyramidal TIFFs + cohort.csv)", add_demo_parser, run_demo),
    "cohort": (
        "check a cohort table (or list a slide folder) and write it normalised",
        add_cohort_parser,
        run_cohort,
    ),
    "tile": ("segment tissue and lay the tile grid of one slide or a cohort", add_tile_parser, run_tile),
    "extract": (
        "encode the tiles of one slide or a cohort with a frozen encoder into bag files",
        add_extract_parser,
        run_extract,
    ),
    "split": ("patient-level cross-validation folds of a cohort", add_split_parser, run_split),
    "train": ("train a MIL aggregator on one fold", add_train_parser, run_train),
    "search": (
        "search hyperparameters on one fold's training and validation parts (never its test part)",
        add_search_parser,
        run_search,
    ),
    "evaluate": (
        "per-fold and pooled metrics of runs, with bootstrap CIs",
        add_evaluate_parser,
        run_evaluate,
    ),
    "compare": (
        "paired comparisons of configurations (encoder x aggregator) of one task",
        add_compare_parser,
        run_compare,
    ),
    "summary": ("one table of several `pathmil evaluate` outputs", add_summary_parser, run_summary),
    "qc-gallery": (
        "a page of every slide's QC picture, failed slides first with the reason",
        add_qc_gallery_parser,
        run_qc_gallery,
    ),
    "models": ("list the MIL aggregators", add_models_parser, run_models),
    "predict": (
        "score bags or slides with trained models (checkpoints, or a package)",
        add_predict_parser,
        run_predict,
    ),
    "package": (
        "package the fold models of a run with their encoder, tiling and a model card",
        add_package_parser,
        run_package,
    ),
    "heatmap": (
        "paint a model's instance scores over a slide, with a montage of its top and bottom tiles",
        add_heatmap_parser,
        run_heatmap,
    ),
    "export": (
        "write bags in the layouts CLAM and TRIDENT train on (float32 features)",
        add_export_parser,
        run_export,
    ),
    "config": (
        "every setting with its default, the workflow schema, the config docs",
        add_config_parser,
        run_config,
    ),
}


def limit_threads(n: int) -> None:
    """Cap the compute threads of this process (before torch is imported, so its pools start small)."""
    import os

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(n)
    import cv2

    cv2.setNumThreads(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def _command_in(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (its first word that is one), if any."""
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--threads":
            skip = True
        elif word in COMMANDS:
            return word
        elif not word.startswith("-"):
            return None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s own arguments are built (building them imports its stage)."""
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
    for name, (help_text, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        if name == command:
            add(p)
        p.set_defaults(handler=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.DEBUG if "-v" in argv or "--verbose" in argv else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("numexpr").setLevel(logging.WARNING)
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--threads", type=int)
    threads = early.parse_known_args(argv)[0].threads
    if threads:  # before the stage (and torch) is imported, so thread pools start small
        limit_threads(threads)
    try:
        parser = build_parser(_command_in(argv))
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():  # log lines above the progress bars, never through them
            return int(args.handler(args) or 0)
    except PathmilError as err:
        print(f"pathmil: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pathmil: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
