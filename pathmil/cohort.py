"""The cohort table: which slides exist, where their files are, whose they are, and their labels.

Columns: ``slide_id`` (unique), ``patient_id``, ``path`` (absolute, or relative to the table's folder),
optional ``mpp`` (um/px for slides whose metadata lacks it), optional ``tissue`` (a GeoJSON outline that
replaces the slide's automatic tissue mask) and label columns. Tiling and extraction need
``slide_id`` and ``path``; training needs ``slide_id``, ``patient_id`` and the labels. A slide directory
without a table also works for tiling and extraction: :func:`cohort_from_dir` names slides by file name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import Field

from pathmil.errors import PathmilError
from pathmil.ids import SLIDE_EXTENSIONS, check_slide_id, slide_id_from_path

# How labels are read, which `pathmil split` and `pathmil train` both need (SplitConfig and TrainConfig
# declare these two settings with the functions below, so each is declared once). A bag is a patient (its
# slides joined; labels are the patient's) or a slide (labels are the slide's own, as Camelyon17's
# lymph-node slides): split checks patient labels and stratifies per bag; folds are patient-level either
# way. The task's options hold the label checks (e.g. regression's value_range).
BagLevel = Literal["patient", "slide"]


def bag_level_field() -> Any:
    """The ``bag_level`` setting (default and meaning), shared by SplitConfig and TrainConfig."""
    return Field(
        "patient",
        description="patient: a patient's slides are one bag and share its labels; slide: one bag per slide "
        "with its own labels (folds stay patient-level)",
    )


def task_options_field() -> Any:
    """The ``task_options`` setting, shared by SplitConfig and TrainConfig (checked by the task's Options)."""
    return Field(
        default_factory=dict,
        description="the task's settings (e.g. loss, n_bins, class_weights, value_range)",
    )


def read_table(path: str | os.PathLike, required: tuple[str, ...] = ("slide_id",)) -> pd.DataFrame:
    """Read a cohort table (CSV, or TSV by extension), check required columns and unique slide ids.

    ``slide_id`` and ``patient_id`` are read as text so ids such as ``007`` keep their zeros. A relative
    ``path`` (and ``tissue`` file) is resolved against the table's folder, so a cohort folder can be moved
    as a whole. The workflow checks the same things with the same words when it parses
    (workflow/rules/common.smk; tests/test_bad_tables.py holds the two equal).

    Raises:
        PathmilError: a missing, empty (0 bytes or a header only), ';'-separated or unreadable table,
            a missing column, a slide id that is not a plain file name, or a slide id or slide file that
            appears twice.
    """
    path = Path(path)
    if not path.is_file():
        raise PathmilError(f"cohort table {path} does not exist")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    if not path.read_bytes().strip():
        raise PathmilError(f"cohort table {path} is empty; it needs a header and one row per slide")
    try:
        table = pd.read_csv(path, sep=sep, dtype={"slide_id": str, "patient_id": str, "mpp": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PathmilError(
            f"cohort table {path} is not a readable {'TSV' if sep == chr(9) else 'CSV'}: {err}"
        ) from None
    table.columns = [str(c).strip() for c in table.columns]
    if len(table.columns) == 1 and ";" in table.columns[0]:
        raise PathmilError(
            f"cohort table {path} has one column '{table.columns[0]}': it looks ';'-separated; save it with commas"
        )
    if table.empty:
        raise PathmilError(f"cohort table {path} has no rows (only a header); add one row per slide")
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise PathmilError(
            f"cohort table {path} lacks column(s) {', '.join(missing)}; it has {', '.join(table.columns)}"
        )
    if "slide_id" in table.columns:
        table["slide_id"] = table["slide_id"].astype(str).str.strip()
        check_slide_ids(table, f"cohort table {path}")
    if "patient_id" in table.columns:
        table["patient_id"] = table["patient_id"].str.strip()
    for column in ("path", "tissue"):
        if column in table.columns:
            table[column] = [_resolve(path.parent, p) for p in table[column]]
    if "path" in table.columns:
        check_unique_files(table, f"cohort table {path}")
    if "mpp" in table.columns:
        table["mpp"] = mpp_column(table, f"cohort table {path}")
    return table


def mpp_column(table: pd.DataFrame, where: str) -> list[float]:
    """The ``mpp`` column as um/px (NaN where empty), each value a number within the plausible level-0
    resolutions (:data:`pathmil.slide.reader.MPP_RANGE`), as the workflow's cohort schema checks it.

    Raises:
        PathmilError: naming the line, the slide and the value (text, 0, pixels per um ...).
    """
    from pathmil.slide.reader import MPP_RANGE  # lazy: OpenCV

    low, high = MPP_RANGE
    values = []
    for line, (slide_id, raw) in enumerate(zip(table["slide_id"], table["mpp"]), start=2):
        text = raw.strip() if isinstance(raw, str) else ""
        if not text:
            values.append(float("nan"))
            continue
        try:
            value = float(text)
        except ValueError:
            value, shown = float("nan"), repr(text)
        else:
            shown = f"{value:g}"
        if not low <= value <= high:  # NaN fails too
            raise PathmilError(
                f"{where}, line {line}: slide {slide_id}: mpp is {shown}; it must be a number of um/px "
                f"in [{low:g}, {high:g}]"
            )
        values.append(value)
    return values


def check_unique_files(table: pd.DataFrame, where: str) -> None:
    """No slide file under two slide ids: its two bags would land in train and test of one fold.

    Raises:
        PathmilError: naming the file and both slide ids.
    """
    seen: dict[str, str] = {}
    for slide_id, file in zip(table["slide_id"], table["path"]):
        if file is None:
            continue
        if file in seen:
            raise PathmilError(
                f"{where}: path {file} appears twice (slides {seen[file]} and {slide_id}); the same slide "
                "file under two slide ids would land in train and test"
            )
        seen[file] = slide_id


def _resolve(base: Path, value: object) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    p = Path(value.strip()).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def cohort_from_dir(directory: str | os.PathLike) -> pd.DataFrame:
    """A table of the slides in ``directory`` (not recursive), ids from file names.

    DICOM slides are folders of ``.dcm`` files: a sub-folder holding ``.dcm`` files is one slide named after
    the folder; loose ``.dcm`` files in ``directory`` count as one slide per DICOM series.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise PathmilError(f"slide directory {directory} does not exist")
    rows = []
    loose_dicom = []
    for entry in sorted(directory.iterdir()):
        name = entry.name.lower()
        if entry.is_dir():
            dcm = sorted(entry.glob("*.dcm"))
            if dcm:
                rows.append({"slide_id": entry.name, "path": str(dcm[0].resolve())})
        elif name.endswith(".dcm"):
            loose_dicom.append(entry)
        elif name.endswith(SLIDE_EXTENSIONS) and not name.startswith("."):
            rows.append({"slide_id": slide_id_from_path(entry), "path": str(entry.resolve())})
    rows += _dicom_series(loose_dicom)
    if not rows:
        raise PathmilError(
            f"slide directory {directory} holds no slide files ({', '.join(SLIDE_EXTENSIONS)})"
        )
    table = pd.DataFrame(rows)
    check_slide_ids(table, f"slide directory {directory}")
    return table


def check_slide_ids(table: pd.DataFrame, where: str) -> None:
    """Every slide id is a plain file name (:func:`pathmil.ids.check_slide_id`) and unique.

    Raises:
        PathmilError: naming ``where`` and the first id at fault.
    """
    for slide_id in table["slide_id"]:
        check_slide_id(slide_id, where)
    duplicated = table["slide_id"][table["slide_id"].duplicated()].unique()
    if len(duplicated):
        raise PathmilError(
            f"{where}: slide id {', '.join(duplicated[:5])} appears twice; every slide needs a unique id "
            "(rename one)"
        )


def _dicom_series(files: list[Path]) -> list[dict[str, str]]:
    """Group loose DICOM files by series (OpenSlide opens a series from any of its files)."""
    import openslide

    series: dict[str, Path] = {}
    for f in files:
        try:
            uid = openslide.OpenSlide(str(f)).properties.get("dicom.SeriesInstanceUID", f.stem)
        except openslide.OpenSlideError:
            uid = f.stem  # unreadable: keep it so tiling reports the error for this file
        series.setdefault(uid, f)
    return [{"slide_id": slide_id_from_path(f), "path": str(f.resolve())} for f in series.values()]


def load_slides(
    cohort: str | os.PathLike | None = None, slide_dir: str | os.PathLike | None = None
) -> pd.DataFrame:
    """The slides to tile or extract: from a cohort table (with ``path``) or from a slide directory."""
    if cohort is not None:
        table = read_table(cohort, required=("slide_id", "path"))
        missing = table["path"].isna()
        if missing.any():
            raise PathmilError(
                f"cohort table {cohort}: slide {table['slide_id'][missing].iloc[0]} has no value in column "
                "'path'; fill it in or drop the slide"
            )
        return table
    if slide_dir is not None:
        return cohort_from_dir(slide_dir)
    raise PathmilError("give a cohort table (--cohort) or a slide directory (--slide-dir)")


def read_labelled_table(
    path: str | os.PathLike, label_columns: list[str], bag_level: str = "patient"
) -> pd.DataFrame:
    """A cohort table for training: ``slide_id``, ``patient_id`` and the task's label columns.

    Checks what the task cannot: every slide has a patient and every label, and, when bags are patients
    (``bag_level`` "patient"), the slides of one patient agree on their labels (labels are the patient's,
    e.g. survival). With ``bag_level`` "slide" labels are the slides' own (Camelyon17's lymph nodes) and may
    differ within a patient. The task checks the label values themselves.

    Raises:
        PathmilError: one line naming the table, the slide or patient, and the column.
    """
    table = read_table(path, required=("slide_id", "patient_id", *label_columns))
    for column in ("patient_id", *label_columns):
        missing = table[column].isna()
        if missing.any():
            raise PathmilError(
                f"cohort table {path}: slide {table['slide_id'][missing].iloc[0]} has no value in column "
                f"'{column}' ({int(missing.sum())} slide(s) in all); fill it in or drop those slides"
            )
    if bag_level == "patient":
        check_patient_labels(table, label_columns, f"cohort table {path}")
    return table


def check_patient_labels(table: pd.DataFrame, label_columns: list[str], where: str) -> None:
    """The slides of each patient share its labels (patient bags).

    Raises:
        PathmilError: naming the first patient whose slides disagree, with their labels.
    """
    conflicting = table.groupby("patient_id")[label_columns].nunique(dropna=False).max(axis=1) > 1
    if conflicting.any():
        patient = conflicting[conflicting].index[0]
        slides = table.loc[table["patient_id"] == patient, ["slide_id", *label_columns]]
        raise PathmilError(
            f"{where}: patient {patient} has conflicting labels across its slides "
            f"({slides.to_dict('records')}); give all slides of a patient the same labels, or set "
            "bag_level: slide for slide-level labels"
        )


def split_by_facts(
    table: pd.DataFrame, facts_dirs: str | os.PathLike | list[str | os.PathLike]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Slides whose facts file says ``ok`` in every folder of ``facts_dirs`` (one per encoder), and a
    failures table (one row per slide and folder where it failed) for the others.

    Per-slide stages (tile, extract) record a failed slide in its facts JSON instead of stopping the
    workflow; this is where later stages learn which slides to go on with, and why the others are missing.
    Comparisons of encoders need the same patients, so a slide left out by one encoder is left out by all.
    """
    import json

    folders = [Path(f) for f in (facts_dirs if isinstance(facts_dirs, list) else [facts_dirs])]
    ok, failures = [], []
    for row in table.itertuples(index=False):
        good = True
        for folder in folders:
            path = folder / f"{row.slide_id}.json"
            facts = (
                json.loads(path.read_text())
                if path.is_file()
                else {"status": "failed", "stage": "unknown", "error": f"no facts file {path}"}
            )
            if facts.get("status") != "ok":
                good = False
                stage = facts.get("stage", "unknown")
                failures.append(
                    {
                        "slide_id": row.slide_id,
                        "path": getattr(row, "path", None),
                        "stage": stage if len(folders) == 1 else f"{stage} ({folder.name})",
                        "error": facts.get("error", ""),
                    }
                )
        ok.append(good)
    failed = pd.DataFrame(failures, columns=["slide_id", "path", "stage", "error"])
    if len(folders) > 1:  # a tiling failure shows once, not once per encoder
        failed = failed.drop_duplicates(["slide_id", "error"])
    return table[ok].reset_index(drop=True), failed
