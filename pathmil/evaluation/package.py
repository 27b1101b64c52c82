"""A packaged model: the fold models of a cross-validation as one ensemble, with everything needed to apply
it to new slides and a model card (``pathmil package``; applied by ``pathmil predict --package``).

A package is a folder (``model.pathmil/``)::

    package.json        format and version, task, aggregator, encoder (name, weights' sha256), tiling
                        settings, and the members (file, sha256, fold, the run it came from)
    members/foldK.pt    the runs' best.pt, byte for byte (tensors and plain data, loaded with
                        weights_only=True like any checkpoint)
    model_card.json     cohort, task, data, metrics with confidence intervals, pathmil version, date
    model_card.md       the same for people
    evaluation/         `pathmil evaluate` of the runs (metrics and plots), unless given one

The encoder and the tiling come from the runs' checkpoints, which record how their training bags were made
(:func:`pathmil.features.bagfile.feature_provenance`); runs trained before checkpoints kept it take them
from their bags (``--features DIR``). Loading (:func:`load_package`) checks what it can: the format
version, each member's sha256, and the encoder's weights when a weights file is given; every mismatch is
named, in one line. Bags scored by a package must come from the same encoder and tiling
(:func:`check_features`), or are refused in one line; `pathmil predict --package --slides` makes such bags
itself (:mod:`pathmil.evaluation.deploy`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pathmil import __version__
from pathmil.errors import PathmilError
from pathmil.evaluation.predict import check_ensemble, check_provenance, encoder_name
from pathmil.evaluation.report import statistic_label
from pathmil.evaluation.settings import EvaluateConfig, PlotConfig
from pathmil.evaluation.summary import evaluate_runs
from pathmil.features.bagfile import feature_provenance, read_bag_attrs
from pathmil.fileio import HOST, file_sha256, write_json
from pathmil.models.checkpoint import (
    PACKAGE_FORMAT,
    PACKAGE_FORMAT_VERSION,
    PACKAGE_MANIFEST,
    package_members,
    read_package_manifest,
)
from pathmil.tasks.classification import ClassificationTask
from pathmil.training.run import TrainedRun, load_run

log = logging.getLogger(__name__)

@dataclass
class Package:
    """A loaded package: its manifest and its fold models, ready to score bags."""

    path: Path
    manifest: dict[str, Any]
    members: list[TrainedRun]

    @property
    def encoder(self) -> dict[str, Any]:
        return self.manifest["encoder"]

    @property
    def tiling(self) -> dict[str, Any] | None:
        return self.manifest.get("tiling")

    @property
    def task_name(self) -> str:
        return self.manifest["task"]["name"]

    @property
    def bag_level(self) -> str:
        return self.manifest["bag_level"]


# ------------------------------------------------------------------------------------------- making


def provenance_of_runs(runs: list[TrainedRun], features_dir: str | os.PathLike | None) -> dict[str, Any]:
    """Encoder and tiling of the runs' training bags: from their checkpoints, which must agree, or (for
    runs that did not record them) from the first bag of ``features_dir``.

    Raises:
        PathmilError: runs trained on different features, or provenance found nowhere.
    """
    keys = ("encoder", "encoder_weights_sha256", "random_init", "tiling")
    found = [{k: (run.features or {}).get(k) for k in keys} | {"dim": run.in_dim} for run in runs]
    for run, other in zip(runs[1:], found[1:], strict=True):
        if other != found[0]:
            differ = sorted(k for k in other if other[k] != found[0][k])
            raise PathmilError(
                f"runs {runs[0].path.parent} and {run.path.parent} were trained on different features "
                f"({', '.join(differ)} differ); package the folds of one run"
            )
    provenance = found[0]
    if features_dir is not None:
        bags = sorted(Path(features_dir).glob("*.h5"))
        if not bags:
            raise PathmilError(f"--features {features_dir} holds no bag files (*.h5)")
        from_bags = feature_provenance(read_bag_attrs(bags[0]))
        for key, value in from_bags.items():
            if provenance.get(key) in (None, "") and value not in (None, ""):
                provenance[key] = value
            elif value not in (None, "") and provenance.get(key) != value:
                raise PathmilError(
                    f"the bags in {features_dir} differ from the runs' training bags in {key} "
                    f"({value!r} vs {provenance.get(key)!r}); give the runs' own features folder"
                )
    if not provenance.get("encoder"):
        raise PathmilError(
            "the runs do not record their encoder (bags of another tool, or runs older than this pathmil); "
            "give --features with the folder of their pathmil bags"
        )
    return provenance


def task_summary(run: TrainedRun) -> dict[str, Any]:
    """The task as the manifest and card describe it: name, label columns, settings, classes."""
    summary = {
        "name": run.task.name,
        "label_columns": list(run.task.label_columns),
        "settings": run.task.settings(),
        "main_metric": run.task.main_metric,
    }
    if isinstance(run.task, ClassificationTask):
        summary["classes"] = [str(c) for c in run.task.classes]
    return summary


def run_facts(run_dir: Path) -> dict[str, Any]:
    """What a run's metrics.json says about its data: fold, bags per split, best epoch."""
    info = json.loads((run_dir / "metrics.json").read_text())
    return {
        "run": str(run_dir),
        "fold": int(info["fold"]),
        "n_bags": info.get("n_bags", {}),
        "best_epoch": info.get("best_epoch"),
    }


def read_evaluation(evaluation: str | os.PathLike) -> dict[str, Any]:
    path = Path(evaluation) / "metrics.json"
    if not path.is_file():
        raise PathmilError(f"--evaluation {evaluation} holds no metrics.json from `pathmil evaluate`")
    return json.loads(path.read_text())


def make_card(
    manifest: dict[str, Any], evaluation: dict[str, Any], runs: list[dict[str, Any]], cohort: str
) -> dict[str, Any]:
    """The model card (plain data): who made the model from what, how well it did, what it is for."""
    main = evaluation["main_metric"]
    metrics = [
        {
            k: row.get(k)
            for k in ("metric", "statistic", "folds", "pooled", "ci_low", "ci_high", "fold_mean", "fold_std")
        }
        for row in evaluation["summary"]
    ]
    n_test = sum(int(r["n_bags"].get("test", 0)) for r in runs)
    n_all = sum(int(v) for v in runs[0]["n_bags"].values()) if runs else 0
    confidence = evaluation.get("evaluate", {}).get("confidence", 0.95)
    return {
        "model": f"{cohort} {manifest['task']['name']} ({manifest['aggregator']}, {len(runs)} fold models)",
        "cohort": cohort,
        "task": manifest["task"],
        "aggregator": manifest["aggregator"],
        "bag_level": manifest["bag_level"],
        "encoder": manifest["encoder"],
        "tiling": manifest["tiling"],
        "data": {
            "bags": n_all,
            "folds": len(runs),
            "held-out test bags over the folds": n_test,
        },
        "metrics": {
            "main_metric": main,
            "confidence": confidence,
            "n_bootstrap": evaluation.get("evaluate", {}).get("n_bootstrap"),
            "folds": evaluation.get("folds"),  # of the evaluation; a row's "folds" those its value holds
            "note": "over the folds' held-out test bags, each scored by the fold model that did not train on "
            "it: pooled, or (survival's ranking metrics, whose risk scale each fold model sets) the mean over "
            "folds; interval: stratified bootstrap over the test patients",
            "values": metrics,
        },
        "ensemble": "the mean of the fold models' scores"
        + (" (the predicted class from the mean probabilities)" if manifest["task"].get("classes") else ""),
        "intended_use": "research: scoring whole-slide images tiled and encoded as the package says; "
        "validate on your own cohort before relying on it",
        "limitations": [
            "cross-validated on one cohort: performance on other hospitals, scanners and stains may differ",
            "features must come from the same encoder weights and tiling (pathmil refuses others)",
        ],
        "pathmil_version": __version__,
        "date": manifest["created"],
    }


def card_markdown(card: dict[str, Any]) -> str:
    """The model card as Markdown."""
    task, encoder, tiling = card["task"], card["encoder"], card["tiling"] or {}
    metrics = card["metrics"]
    level = round(100 * metrics["confidence"])
    lines = [
        f"# Model card: {card['model']}",
        "",
        f"- **Cohort**: {card['cohort']} ({card['data']['bags']} {card['bag_level']} bags, "
        f"{card['data']['folds']}-fold cross-validation)",
        f"- **Task**: {task['name']} on {', '.join(task['label_columns'])}"
        + (f" (classes {', '.join(task['classes'])})" if task.get("classes") else "")
        + f"; main metric {task['main_metric']}",
        f"- **Aggregator**: {card['aggregator']}; the ensemble is {card['ensemble']}",
        f"- **Encoder**: {encoder_name(encoder['name'], encoder.get('random_init', False))}, "
        f"{encoder['dim']}-d, weights sha256 "
        + (
            encoder.get("weights_sha256")
            or ("none (random init)" if encoder.get("random_init") else "unknown")
        ),
        "- **Tiling**: "
        + (
            f"{tiling.get('tile_px')} px at {tiling.get('target_mpp')} um/px, overlap {tiling.get('overlap')}, "
            f"min tissue {tiling.get('min_tissue')}, preset {tiling.get('preset')}"
            if tiling
            else "unknown (the bags were not made by pathmil)"
        ),
        f"- **pathmil** {card['pathmil_version']}, packaged {card['date']}",
        "",
        f"## Metrics ({metrics['note']}; {level} % interval)",
        "",
        f"| metric | value | of | {level} % CI | fold mean +- SD |",
        "|---|---:|---|---:|---:|",
    ]
    for row in metrics["values"]:
        lines.append(
            f"| {row['metric']}{' (main)' if row['metric'] == metrics['main_metric'] else ''} | "
            f"{_number(row['pooled'])} | "
            f"{statistic_label(row.get('statistic') or 'pooled', row.get('folds'), metrics.get('folds'))} | "
            f"[{_number(row['ci_low'])}, {_number(row['ci_high'])}] | "
            f"{_number(row['fold_mean'])} +- {_number(row['fold_std'])} |"
        )
    lines += ["", f"**Intended use**: {card['intended_use']}.", "", "**Limitations**:", ""]
    lines += [f"- {item}" for item in card["limitations"]]
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return "n/a" if value is None or value != value else f"{float(value):.3f}"


def make_package(
    run_dirs: list[str | os.PathLike],
    out: str | os.PathLike,
    cohort: str = "unnamed cohort",
    evaluation: str | os.PathLike | None = None,
    features_dir: str | os.PathLike | None = None,
    config: EvaluateConfig | None = None,
    plots: PlotConfig | None = None,
) -> dict[str, Any]:
    """Package the finished runs (one per fold) into the folder ``out``; return its manifest.

    The folder appears only when complete (built beside ``out``, then renamed into place).

    Raises:
        PathmilError: no runs, unfinished runs, runs of different tasks or features, unknown provenance.
    """
    if not run_dirs:
        raise PathmilError("no runs given to package")
    run_dirs = [Path(r) for r in run_dirs]
    for run in run_dirs:
        if not (run / "metrics.json").is_file():
            raise PathmilError(
                f"{run} is not a finished run folder (no metrics.json); give `pathmil train` outputs"
            )
    runs = [load_run(r) for r in run_dirs]
    check_ensemble(runs)
    levels = {r.config.bag_level for r in runs}
    aggregators = {r.config.aggregator for r in runs}
    if len(levels) > 1 or len(aggregators) > 1:
        raise PathmilError("the runs differ in aggregator or bag level; package the folds of one run")
    provenance = provenance_of_runs(runs, features_dir)
    facts = [run_facts(r) for r in run_dirs]
    created = datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{HOST}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "members").mkdir(parents=True)
        members = []
        for run_dir, fact in zip(run_dirs, facts, strict=True):
            name = f"fold{fact['fold']}.pt"
            if any(m["file"] == f"members/{name}" for m in members):
                name = f"fold{fact['fold']}-{len(members)}.pt"
            shutil.copyfile(run_dir / "best.pt", tmp / "members" / name)
            members.append(
                {
                    "file": f"members/{name}",
                    "sha256": file_sha256(tmp / "members" / name),
                    "fold": fact["fold"],
                    "run": fact["run"],
                }
            )
        if evaluation is None:
            evaluated = evaluate_runs(run_dirs, tmp / "evaluation", config, plots)
        else:
            evaluated = read_evaluation(evaluation)
        manifest = {
            "format": PACKAGE_FORMAT,
            "format_version": PACKAGE_FORMAT_VERSION,
            "pathmil_version": __version__,
            "created": created,
            "cohort": cohort,
            "task": task_summary(runs[0]),
            "aggregator": aggregators.pop(),
            "bag_level": levels.pop(),
            "encoder": {
                "name": provenance["encoder"],
                "weights_sha256": provenance.get("encoder_weights_sha256") or "",
                "random_init": bool(provenance.get("random_init")),
                "dim": provenance["dim"],
            },
            "tiling": provenance.get("tiling"),
            "members": members,
            "model_card": "model_card.json",
        }
        card = make_card(manifest, evaluated, facts, cohort)
        write_json(tmp / "model_card.json", card)
        (tmp / "model_card.md").write_text(card_markdown(card))
        write_json(tmp / PACKAGE_MANIFEST, manifest)
        _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _replace_folder(new: Path, final: Path) -> None:
    """Put the finished folder ``new`` at ``final``, replacing an older one (a rename each)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{HOST}-{os.getpid()}")
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, final)


# ------------------------------------------------------------------------------------------ loading


def load_package(
    path: str | os.PathLike,
    device: str = "cpu",
    weights: str | os.PathLike | None = None,
    expected_task: str | None = None,
) -> Package:
    """Load a package and check it: format version, members' sha256 and, given the encoder's ``weights``
    file, that its sha256 is the package's.

    Raises:
        PathmilError: one line naming every mismatch (a newer format, a damaged member, other weights, a
            model of another task than ``expected_task``).
    """
    path = Path(path)
    manifest = read_package_manifest(path)
    problems = []
    encoder = manifest.get("encoder") or {}
    if weights is not None:
        if not Path(weights).is_file():
            raise PathmilError(f"encoder weights {weights} do not exist")
        found = file_sha256(weights)
        wanted = encoder.get("weights_sha256") or ""
        if encoder.get("random_init"):
            problems.append(
                f"the package's encoder {encoder.get('name')} was randomly initialised, not {weights}"
            )
        elif wanted and found != wanted:
            problems.append(
                f"encoder weights {weights} have sha256 {found[:12]}..., the package was trained on "
                f"{encoder.get('name')} weights {wanted[:12]}..."
            )
    if expected_task is not None and manifest["task"]["name"] != expected_task:
        problems.append(f"it is a {manifest['task']['name']} model, not {expected_task}")
    if problems:
        raise PathmilError(f"package {path}: {'; '.join(problems)}")
    members = [load_run(file, device) for file, _ in package_members(path)]
    if manifest.get("pathmil_version") != __version__:
        log.info(
            "package %s was made by pathmil %s (this is %s)",
            path,
            manifest.get("pathmil_version"),
            __version__,
        )
    return Package(path=path, manifest=manifest, members=members)


def check_features(package: Package, attrs: dict[str, Any], source: str | os.PathLike) -> None:
    """Refuse a bag (its root attributes) made otherwise than the package's training bags: another encoder,
    other encoder weights, another tiling (:func:`pathmil.evaluation.predict.check_provenance`). What a bag
    does not record cannot be checked.

    Raises:
        PathmilError: one line naming the bag, what differs and the fix.
    """
    encoder = package.encoder
    trained = {
        "encoder": encoder["name"], "random_init": bool(encoder.get("random_init")),
        "encoder_weights_sha256": encoder.get("weights_sha256"), "tiling": package.tiling,
    }  # fmt: skip
    fix = "make them with `pathmil predict --package PACKAGE --slides ...`, which tiles and extracts as the package says"
    check_provenance(trained, attrs, source, f"package {package.path}", fix)


def score_package(
    package: Package,
    features: list[str | os.PathLike] | None = None,
    cohort: str | os.PathLike | Any = None,
    features_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> Any:
    """The package's ensemble scores of bag files, or of a cohort table's bags (as
    :func:`pathmil.evaluation.predict.score_with`), each bag checked against the package first."""
    from pathmil.evaluation.predict import score_with

    return score_with(
        package.members,
        features,
        cohort,
        features_dir,
        progress,
        check=lambda p, a: check_features(package, a, p),
    )
