"""The report's pages (pathmil/evaluation/report.py): the summary table and the QC gallery, self-contained."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pathmil.cli import main
from pathmil.evaluation.report import THUMBNAIL_PX, qc_gallery, summary_page
from pathmil.fileio import write_png


def fake_evaluation(folder: Path, task: str, aggregator: str, metric: str, value: float) -> Path:
    """A metrics.json as `pathmil evaluate` writes it, with the main metric and one other."""
    rows = [
        {"metric": metric, "pooled": value, "ci_low": value - 0.05, "ci_high": value + 0.04,
         "fold_mean": value + 0.01, "fold_std": 0.02, "fold_iqm": value},
        {"metric": "other", "pooled": 0.1, "ci_low": None, "ci_high": None,
         "fold_mean": 0.1, "fold_std": None, "fold_iqm": 0.1},
    ]  # fmt: skip
    folder.mkdir(parents=True)
    result = {"task": task, "aggregator": aggregator, "main_metric": metric, "n_test_bags": 30,
              "evaluate": {"n_bootstrap": 1000, "confidence": 0.95, "seed": 0}, "summary": rows}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(result))
    return folder


def cells(page: str) -> list[list[str]]:
    """The table's rows as lists of cell texts (tags dropped)."""
    rows = re.findall(r"<tr>(.*?)</tr>", page, flags=re.S)
    return [
        [re.sub(r"<[^>]+>", " ", c).split() for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", r)]
        for r in rows
    ]


def test_summary_page_is_task_by_aggregator_with_intervals(tmp_path):
    evals = [
        fake_evaluation(tmp_path / f"{t}-{a}", t, a, m, v)
        for t, m, v in [("classification", "auc", 0.9), ("survival", "c_index", 0.7)]
        for a in ("abmil", "mambamil")
    ]
    page = summary_page(evals, n_slides=40, n_failed=2)
    assert page.isascii()  # other characters as references: the page reads the same in any frame
    table = cells(page)
    assert [" ".join(c) for c in table[0]] == ["task (main metric, test bags)", "abmil", "mambamil"]
    assert " ".join(table[1][0]) == "classification (AUC, n = 30)"
    assert " ".join(table[2][0]) == "survival (c-index, n = 30)"
    assert table[1][1] == ["0.900", "[0.850,", "0.940]", "folds", "0.910", "&#177;", "0.020"]
    assert table[2][2][:3] == ["0.700", "[0.650,", "0.740]"]
    assert (
        "95 % confidence interval" in page
        and "1000 resamples" in page
        and "Slides: 40, of which 2 failed" in page
    )


def test_summary_page_of_a_grid_with_an_external_test_set(tmp_path):
    """Encoders x aggregators x seeds and a package's external evaluation (no folds): one column per
    encoder/aggregator of the first seed, and the external column without a fold line."""
    evals = []
    for encoder, seed, value in [("uni", 0, 0.7), ("uni", 1, 0.9), ("resnet", 0, 0.6), ("resnet", 1, 0.8)]:
        folder = fake_evaluation(tmp_path / f"{encoder}{seed}", "survival", "abmil", "c_index", value)
        result = json.loads((folder / "metrics.json").read_text())
        (folder / "metrics.json").write_text(json.dumps({**result, "encoder": encoder, "seed": seed}))
        evals.append(folder)
    external = fake_evaluation(tmp_path / "external", "survival", "abmil", "c_index", 0.65)
    result = json.loads((external / "metrics.json").read_text())
    result["summary"][0] |= {"fold_mean": None, "fold_std": None}
    (external / "metrics.json").write_text(json.dumps({**result, "external": True, "encoder": "uni"}))
    page = summary_page([*evals, external])
    table = cells(page)
    header = [" ".join(c) for c in table[0]]
    assert header == ["task (main metric, test bags)", "uni/abmil", "resnet/abmil", "uni/abmil (external)"]
    assert [c[0] for c in table[1][1:]] == ["0.700", "0.600", "0.650"]  # seed 0's runs
    assert "folds" not in table[1][3] and "Runs of seed 0 only" in page


def test_summary_command_writes_csv_and_page(tmp_path):
    evals = [fake_evaluation(tmp_path / "e", "regression", "abmil", "r2", 0.5)]
    cohort = tmp_path / "cohort.csv"
    pd.DataFrame({"slide_id": ["a", "b", "c"]}).to_csv(cohort, index=False)
    failures = tmp_path / "failures.csv"
    pd.DataFrame({"slide_id": ["c"], "path": ["c.svs"], "stage": ["tile"], "error": ["no tissue"]}).to_csv(
        failures, index=False
    )
    out, html = tmp_path / "summary.csv", tmp_path / "summary.html"
    args = ["summary", "--evals", str(evals[0]), "--out", str(out), "--html", str(html)]
    assert main([*args, "--cohort", str(cohort), "--failures", str(failures)]) == 0
    assert set(pd.read_csv(out)["metric"]) == {"r2", "other"}
    page = html.read_text()
    assert "regression (R&#178;, n = 30)" in page and "Slides: 3, of which 1 failed" in page


def thumbnails(page: str) -> list[np.ndarray]:
    uris = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
    return [cv2.imdecode(np.frombuffer(base64.b64decode(u), np.uint8), cv2.IMREAD_COLOR) for u in uris]


def test_qc_gallery_shows_every_slide_failed_first_with_the_reason(tmp_path):
    qc, tiles = tmp_path / "qc", tmp_path / "tiles"
    qc.mkdir()
    tiles.mkdir()
    slides = ["s1", "s2", "bad <one>"]
    for i, slide in enumerate(slides):
        picture = np.full((600 + 100 * i, 1000, 3), 40 * i, np.uint8)
        write_png(qc / f"{slide}.png", picture)
        facts = {"status": "ok", "n_tiles": 10 * (i + 1), "tissue_fraction": 0.25, "slide_mpp": 0.5,
                 "mpp_source": "metadata"}  # fmt: skip
        (tiles / f"{slide}.json").write_text(json.dumps(facts))
    cohort = tmp_path / "cohort.csv"
    pd.DataFrame({"slide_id": slides}).to_csv(cohort, index=False)
    failures = tmp_path / "failures.csv"
    pd.DataFrame(
        {"slide_id": ["bad <one>"], "path": ["x"], "stage": ["tile"], "error": ["no tissue & <none>"]}
    ).to_csv(failures, index=False)
    page = qc_gallery(cohort, qc, tiles, failures)
    assert page.isascii()
    figures = re.findall(r"<figure( class=\"failed\")?>(.*?)</figure>", page, flags=re.S)
    assert len(figures) == 3
    assert figures[0][0] and "bad &lt;one&gt;" in figures[0][1]  # the failed slide first, escaped
    assert "failed (tile): no tissue &amp; &lt;none&gt;" in figures[0][1]
    assert (
        not figures[1][0]
        and "<b>s1</b>" in figures[1][1]
        and "10 tiles, tissue 25 % of the slide" in figures[1][1]
    )
    images = thumbnails(page)
    assert len(images) == 3 and all(max(image.shape[:2]) == THUMBNAIL_PX for image in images)
    assert "3 slides, 1 failed" in page

    limited = qc_gallery(cohort, qc, tiles, failures, max_slides=2)
    assert len(thumbnails(limited)) == 2 and "1 more slides are not shown" in limited
    assert "bad &lt;one&gt;" in limited  # failed slides are never the ones left out
