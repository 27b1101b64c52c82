"""Pages of the workflow's report (``snakemake --report``): self-contained HTML written by ``pathmil`` commands.

Snakemake's report shows an HTML result in a frame, from a data URI, and nothing else travels with it: a
page carries its styles and pictures inline (thumbnails as base64 JPEG) and is plain ASCII (other characters
as HTML references), so it reads the same in the frame, opened alone, and pasted into the report's front page
(``workflow/report/workflow.rst`` includes the summary there). Every page is a :func:`page` fragment whose
style applies inside its own ``div.pathmil-page`` only.

Pages:

- :func:`summary_page`: the answer: per task (rows) and aggregator (columns) the main metric pooled over the
  test folds (survival: the mean over folds) with its bootstrap confidence interval, and the mean +- SD
  over folds (``pathmil summary --html``);
- :func:`qc_gallery`: a thumbnail of every slide's QC picture, failed slides first with the stage and
  reason (``pathmil qc-gallery``);
- :func:`comparison_page`: one task's configurations (encoder x aggregator over seeds x folds) on the same
  patients: main metric and IQM with their intervals, the matrix of paired differences with intervals and
  probabilities of improvement, verdicts only where an interval excludes zero, and the performance profile
  (``pathmil compare`` writes it as comparison.html).

To add a page: a function here that returns ``page(title, body)``, a command (or flag) that writes it, and a
rule in ``workflow/rules/report.smk`` whose output is flagged with ``report(..., category=...)``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from pathmil.errors import PathmilError

FOLD_MEAN = "mean over folds"  # the statistic of a task's fold_wise_metrics; "pooled" the other

METRIC_NAMES = {"auc": "AUC", "c_index": "c-index", "r2": "R\u00b2"}  # main metrics as readers know them
THUMBNAIL_PX = 256  # longest side of a gallery thumbnail
MAX_THUMBNAILS = 500  # thumbnails of a gallery at most (a page of 10,000 is neither light nor read)
STYLE = """
.pathmil-page { font-family: system-ui, sans-serif; font-size: 14px; color: #1f2933; }
.pathmil-page h2 { font-size: 18px; margin: 0 0 4px 0; }
.pathmil-page p.note { color: #52606d; margin: 4px 0 12px 0; max-width: 60em; }
.pathmil-page table { border-collapse: collapse; margin: 8px 0; }
.pathmil-page th, .pathmil-page td { border: 1px solid #cbd2d9; padding: 6px 10px; text-align: right; }
.pathmil-page th { background: #f0f4f8; }
.pathmil-page th.row { text-align: left; }
.pathmil-page td .ci { color: #52606d; }
.pathmil-page td .folds { color: #7b8794; font-size: 12px; }
.pathmil-page .gallery { display: flex; flex-wrap: wrap; gap: 10px; }
.pathmil-page figure { margin: 0; width: 260px; border: 2px solid #cbd2d9; padding: 4px; }
.pathmil-page figure.failed { border-color: #d64545; background: #fff5f5; }
.pathmil-page figure img { display: block; max-width: 256px; max-height: 256px; margin: auto; }
.pathmil-page figcaption { font-size: 12px; margin-top: 4px; word-wrap: break-word; }
.pathmil-page figcaption .reason { color: #a61b1b; }
.pathmil-page td.better { background: #e3f9e5; }
.pathmil-page td.worse { background: #ffe3e3; }
.pathmil-page td.same { color: #7b8794; }
.pathmil-page ul.verdicts li.called { font-weight: 600; }
.pathmil-page img.plot { max-width: 100%; border: 1px solid #cbd2d9; margin: 6px 0; }
"""


def page(title: str, body: str, note: str = "") -> str:
    """A self-contained HTML fragment: the scoped style, a title, an optional note, the body; ASCII only."""
    text = (
        f'<div class="pathmil-page">\n<style>{STYLE}</style>\n<h2>{html.escape(title)}</h2>\n'
        + (f'<p class="note">{note}</p>\n' if note else "")
        + body
        + "\n</div>\n"
    )
    return text.encode("ascii", "xmlcharrefreplace").decode("ascii")


def write_page(path: str | os.PathLike, text: str) -> None:
    from pathmil.fileio import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="ascii")


# --------------------------------------------------------------------------------------------- summary


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def summary_cell(row: pd.Series) -> str:
    """``0.953 [0.936, 0.970]`` over ``folds 0.953 +- 0.005``."""
    ci = ""
    if math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"]):
        ci = f' <span class="ci">[{_number(row["ci_low"])}, {_number(row["ci_high"])}]</span>'
    if not math.isfinite(row.get("fold_mean", math.nan)):  # an external test set: no folds
        return f"<b>{_number(row['pooled'])}</b>{ci}"
    folds = f"folds {_number(row['fold_mean'])} \u00b1 {_number(row.get('fold_std', math.nan))}"
    return f'<b>{_number(row["pooled"])}</b>{ci}<br><span class="folds">{folds}</span>'


def statistic_label(statistic: str, folds_used: int | None = None, folds: int | None = None) -> str:
    """How a statistic reads for a person: ``pooled``, ``mean over 5 folds``, or ``mean over 4 of 5 folds``
    where a fold's value is undefined (e.g. a test part without an event) and the mean leaves it out."""
    if statistic != FOLD_MEAN or not folds or folds_used is None:  # (an evaluation older than the count)
        return statistic
    if folds_used == folds:
        return f"mean over {folds} folds"
    return f"mean over {folds_used} of {folds} folds"


def column_label(result: dict, with_encoder: bool) -> str:
    """A configuration's column: its aggregator (``(external)`` for a package on an external test set),
    after its encoder when the run compared several."""
    name = result["aggregator"] + (" (external)" if result.get("external") else "")
    return f"{result.get('encoder')}/{name}" if with_encoder and result.get("encoder") else name


def summary_page(eval_dirs: list[str | os.PathLike], n_slides: int | None = None, n_failed: int = 0) -> str:
    """The front page's table: tasks as rows, aggregators as columns, each task's main metric as ``pathmil
    evaluate`` reports it (pooled over the test folds; survival: the mean over folds) with its bootstrap CI,
    and the mean +- SD over folds. Reads each ``pathmil evaluate`` folder's metrics.json.

    Raises:
        PathmilError: a folder without metrics.json.
    """
    results = []
    for directory in eval_dirs:
        path = Path(directory) / "metrics.json"
        if not path.is_file():
            raise PathmilError(f"{directory} holds no metrics.json from `pathmil evaluate`")
        results.append(json.loads(path.read_text()))
    first_seed = min((r.get("seed", 0) for r in results), default=0)
    results = [r for r in results if r.get("seed", 0) == first_seed]  # seeds: the comparison pages
    several_encoders = len({r.get("encoder") for r in results if not r.get("external")}) > 1
    tasks = list(dict.fromkeys(r["task"] for r in results))
    aggregators = list(dict.fromkeys(column_label(r, several_encoders) for r in results))
    cells, info, fold_wise, partial = {}, {}, set(), []
    for result in results:
        main = next(row for row in result["summary"] if row["metric"] == result["main_metric"])
        row = pd.Series({k: (math.nan if v is None else v) for k, v in main.items()})
        cells[(result["task"], column_label(result, several_encoders))] = summary_cell(row)
        if main.get("folds", result.get("folds")) != result.get("folds"):  # a fold's value undefined
            label = statistic_label(main["statistic"], main["folds"], result["folds"])
            partial.append(f"{result['task']}/{column_label(result, several_encoders)}: the {label}")
        info[result["task"]] = (result["main_metric"], result["n_test_bags"], result.get("evaluate", {}))
        if result.get("statistic") == FOLD_MEAN:
            fold_wise.add(result["task"])
    header = "".join(f"<th>{html.escape(a)}</th>" for a in aggregators)
    lines = [f'<table>\n<tr><th class="row">task (main metric, test bags)</th>{header}</tr>']
    for task in tasks:
        metric, n_bags, _ = info[task]
        label = f"{html.escape(task)} ({METRIC_NAMES.get(metric, metric)}, n = {n_bags})"
        row = "".join(f"<td>{cells.get((task, a), '&ndash;')}</td>" for a in aggregators)
        lines.append(f'<tr><th class="row">{label}</th>{row}</tr>')
    lines.append("</table>")
    evaluate = next(iter(info.values()))[2] if info else {}
    level = 100 * float(evaluate.get("confidence", 0.95))
    note = (
        f"Each cell: the main metric of the pooled held-out predictions of every fold (each patient scored by "
        f"the model that did not train on it) with its stratified bootstrap {level:g} % confidence interval "
        f"({evaluate.get('n_bootstrap', '?')} resamples of the test patients), and below it the mean "
        "\u00b1 SD of the per-fold values. Intervals that overlap do not show a difference; the "
        "metrics of every fold are in summary.csv."
    )
    for task in tasks:
        if task in fold_wise:
            metric = METRIC_NAMES.get(info[task][0], info[task][0])
            note += (
                f" {task.capitalize()}: the mean over folds of each fold's {metric} (each fold model has its own "
                f"risk scale, which a pooled {metric} would mix), its interval resampling the test patients "
                "and averaging the folds' values."
            )
    if partial:
        note += f" Undefined in a fold (too few events in its test part), so left out: {'; '.join(partial)}."
    if len(eval_dirs) > len(results):
        note += (
            f" Runs of seed {first_seed} only; each task's comparison page pools every seed and tests the "
            "differences."
        )
    if n_slides is not None:
        note += f" Slides: {n_slides}, of which {n_failed} failed (see the QC gallery)."
    return page("Results: main metric per task and aggregator", "\n".join(lines), note)


# ------------------------------------------------------------------------------------------ QC gallery


def thumbnail_uri(path: str | os.PathLike, max_px: int = THUMBNAIL_PX, quality: int = 80) -> str | None:
    """A JPEG data URI of the picture at ``path`` shrunk to ``max_px`` (None when it cannot be read)."""
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return None
    scale = max_px / max(image.shape[:2])
    if scale < 1:
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return "data:image/jpeg;base64," + base64.b64encode(data.tobytes()).decode("ascii") if ok else None


def _facts(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def qc_gallery(
    cohort: str | os.PathLike,
    qc_dir: str | os.PathLike,
    tiles_dir: str | os.PathLike,
    failures: str | os.PathLike | None = None,
    max_slides: int = MAX_THUMBNAILS,
) -> str:
    """Every slide's QC picture as a thumbnail, captioned with its tiles and tissue, failed slides first with
    the stage that failed and why (``failures.csv`` of ``pathmil cohort``). At most ``max_slides`` pictures
    (all failed ones first); the page says how many are left out."""
    slides = pd.read_csv(cohort, dtype={"slide_id": str})["slide_id"].tolist()
    failed = {}
    if failures is not None and Path(failures).is_file() and Path(failures).stat().st_size > 0:
        table = pd.read_csv(failures, dtype={"slide_id": str}).fillna("")
        failed = {row.slide_id: (row.stage, row.error) for row in table.itertuples()}
    order = [s for s in slides if s in failed] + [s for s in slides if s not in failed]
    shown = order[:max_slides]
    figures = []
    for slide in shown:
        facts = _facts(Path(tiles_dir) / f"{slide}.json")
        uri = thumbnail_uri(Path(qc_dir) / f"{slide}.png")
        picture = (
            f'<img src="{uri}" alt="QC picture of {html.escape(slide)}">' if uri else "<i>no QC picture</i>"
        )
        caption = f"<b>{html.escape(slide)}</b>"
        if slide in failed:
            stage, error = failed[slide]
            caption += f'<br><span class="reason">failed ({html.escape(stage)}): {html.escape(error)}</span>'
        else:
            tissue = facts.get("tissue_fraction")
            caption += f"<br>{facts.get('n_tiles', '?')} tiles"
            if tissue is not None and np.isfinite(tissue):
                caption += f", tissue {100 * tissue:.0f} % of the slide"
            if facts.get("slide_mpp"):
                caption += f", {facts['slide_mpp']:.3g} \u00b5m/px ({facts.get('mpp_source', '')})"
        css = ' class="failed"' if slide in failed else ""
        figures.append(f"<figure{css}>{picture}<figcaption>{caption}</figcaption></figure>")
    n_failed = sum(s in failed for s in slides)
    note = (
        f"{len(slides)} slides, {n_failed} failed (red, first: the stage and the reason). Each picture is the "
        "slide's QC picture of tiling (tissue outlined, kept tiles drawn) shrunk to "
        f"{THUMBNAIL_PX} px; the full pictures are in the qc/ folder of the results."
    )
    if len(order) > len(shown):
        note += f" {len(order) - len(shown)} more slides are not shown (report.qc_thumbnails)."
    body = '<div class="gallery">\n' + "\n".join(figures) + "\n</div>"
    return page("Quality control: every slide's tiling", body, note)


# ------------------------------------------------------------------------------------------ comparison


def _interval(value: float, low: float, high: float, signed: bool = False) -> str:
    number = f"{value:+.3f}" if signed and math.isfinite(value) else _number(value)
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"<b>{number}</b>"
    return f'<b>{number}</b> <span class="ci">[{_number(low)}, {_number(high)}]</span>'


def _configuration_table(result: dict) -> str:
    metric = METRIC_NAMES.get(result["main_metric"], result["main_metric"])
    statistic = statistic_label(result.get("statistic", "pooled"), result.get("folds_used"), result.get("folds"))
    lines = [
        f'<table>\n<tr><th class="row">configuration</th><th>{metric} ({statistic}, CI)</th>'
        "<th>IQM over runs (CI)</th><th>runs (seeds x folds)</th></tr>"
    ]
    for row in sorted(result["configurations"], key=lambda r: -r["value"]):
        lines.append(
            f'<tr><th class="row">{html.escape(row["configuration"])}</th>'
            f"<td>{_interval(row['value'], row['ci_low'], row['ci_high'])}</td>"
            f"<td>{_interval(row['iqm'], row['iqm_low'], row['iqm_high'])}</td>"
            f"<td>{row['n_runs']} ({row['n_seeds']} x {row['n_folds']})</td></tr>"
        )
    return "\n".join([*lines, "</table>"])


def _difference_matrix(result: dict) -> str:
    labels = [row["configuration"] for row in result["configurations"]]
    pairs = {(p["a"], p["b"]): p for p in result["pairs"]}
    header = "".join(f"<th>{html.escape(b)}</th>" for b in labels)
    lines = [f'<table>\n<tr><th class="row">row &minus; column</th>{header}</tr>']
    for a in labels:
        cells = []
        for b in labels:
            pair = pairs.get((a, b))
            if pair is None:
                cells.append("<td>&ndash;</td>")
                continue
            kind = "same" if not pair["significant"] else ("better" if pair["difference"] > 0 else "worse")
            text = _interval(pair["difference"], pair["ci_low"], pair["ci_high"], signed=True)
            cells.append(
                f'<td class="{kind}">{text}<br><span class="folds">P(row &gt; column) '
                f"{pair['p_improvement']:.2f}</span></td>"
            )
        lines.append(f'<tr><th class="row">{html.escape(a)}</th>{"".join(cells)}</tr>')
    return "\n".join([*lines, "</table>"])


def _plot(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def comparison_page(result: dict, out_dir: str | os.PathLike) -> str:
    """One task's comparison (what ``pathmil compare`` returns, its plots in ``out_dir/plots``): the
    configurations with main metric and IQM and their intervals, the matrix of paired differences (row
    minus column, green where the interval lies above zero, red below), the verdicts (a difference is called
    only where its interval excludes zero) and the performance profile (Agarwal et al., NeurIPS 2021)."""
    level = 100 * float(result["evaluate"].get("confidence", 0.95))
    n_boot = result["evaluate"].get("n_bootstrap", "?")
    metric = METRIC_NAMES.get(result["main_metric"], result["main_metric"])
    verdicts = "".join(
        f'<li class="{"same" if "no detectable difference" in line else "called"}">{html.escape(line)}</li>'
        for line in result["verdicts"]
    )
    body = "\n".join(
        [
            _configuration_table(result),
            "<h3>Paired differences</h3>",
            _difference_matrix(result),
            "<h3>Verdicts</h3>",
            f'<ul class="verdicts">{verdicts or "<li>one configuration: nothing to compare</li>"}</ul>',
            "<h3>Performance profile</h3>",
            _plot(Path(out_dir) / "plots" / "performance_profile.png", "performance profile"),
        ]
    )
    fold_mean = result.get("statistic") == FOLD_MEAN
    what = (
        f"the mean over folds of each fold's {metric} on its held-out patients (a pooled {metric} would mix "
        "the fold models' risk scales)"
        if fold_mean
        else f"{metric} of the pooled held-out predictions"
    )
    note = (
        f"{result['task']}: {what}, {result['n_patients']} patients, the same patients for every "
        f"configuration, averaged over seeds. Intervals are {level:g} % stratified bootstrap intervals "
        f"({n_boot} resamples of patients, paired: each resample scores every configuration on the same "
        "patients). IQM: the interquartile mean of the per-run values (seeds x folds). P(row &gt; column): "
        "the share of fold-matched run pairs in which the row scores higher. A difference is called only where "
        "its interval excludes zero; otherwise: no detectable difference."
    )
    return page(f"Comparison: {result['task']}", body, note)
