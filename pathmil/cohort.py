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

import pandas as pd

from pathmil.errors import PathmilError
from pathmil.ids import SLIDE_EXTENSIONS, check_slide_id, slide_id_from_path


def read_table(path: str | os.PathLike, required: tuple[str, ...] = ("slide_id",)) -> pd.DataFrame:
    """Read a cohort table (CSV, or TSV by extension), check required columns and unique slide ids.

    ``slide_id`` and ``patient_id`` are read as text so ids such as ``007`` keep their zeros. A relative
    ``path`` (and ``tissue`` file) is resolved against the table's folder, so a cohort folder can be moved
    as a whole.
    """
    path = Path(path)
    if not path.is_file():
        raise PathmilError(f"cohort table {path} does not exist")
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        table = pd.read_csv(path, sep=sep, dtype={"slide_id": str, "patient_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PathmilError(
            f"cohort table {path} is not a readable {'TSV' if sep == chr(9) else 'CSV'}: {err}"
        ) from None
    table.columns = [str(c).strip() for c in table.columns]
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
    return table


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
                f"cohort table {cohort}: slide {table['slide_id'][missing].iloc[0]} has no path"
            )
        return table
    if slide_dir is not None:
        return cohort_from_dir(slide_dir)
    raise PathmilError("give a cohort table (--cohort) or a slide directory (--slide-dir)")


def read_labelled_table(path: str | os.PathLike, label_columns: list[str]) -> pd.DataFrame:
    """A cohort table for training: ``slide_id``, ``patient_id`` and the task's label columns.

    Checks what the task cannot: every slide has a patient, and the slides of one patient agree on their
    labels (labels are the patient's, e.g. survival). The task checks the label values themselves.
    """
    table = read_table(path, required=("slide_id", "patient_id", *label_columns))
    absent = table["patient_id"].isna()
    if absent.any():
        raise PathmilError(
            f"cohort table {path}: slide {table['slide_id'][absent].iloc[0]} has no patient_id"
        )
    for column in label_columns:
        missing = table[column].isna()
        if missing.any():
            raise PathmilError(
                f"cohort table {path}: slide {table['slide_id'][missing].iloc[0]} has no value in column "
                f"'{column}' ({int(missing.sum())} slide(s) in all); fill it in or drop those slides"
            )
    conflicting = table.groupby("patient_id")[label_columns].nunique(dropna=False).max(axis=1) > 1
    if conflicting.any():
        patient = conflicting[conflicting].index[0]
        slides = table.loc[table["patient_id"] == patient, ["slide_id", *label_columns]]
        raise PathmilError(
            f"cohort table {path}: patient {patient} has conflicting labels across its slides "
            f"({slides.to_dict('records')}); give all slides of a patient the same labels"
        )
    return table


def split_by_facts(table: pd.DataFrame, facts_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Slides whose facts file in ``facts_dir`` says ``ok``, and a failures table for the others.

    Per-slide stages (tile, extract) record a failed slide in its facts JSON instead of stopping the
    workflow; this is where later stages learn which slides to go on with, and why the others are missing.
    """
    import json

    ok, failures = [], []
    for row in table.itertuples(index=False):
        path = Path(facts_dir) / f"{row.slide_id}.json"
        facts = (
            json.loads(path.read_text())
            if path.is_file()
            else {"status": "failed", "stage": "unknown", "error": f"no facts file {path}"}
        )
        if facts.get("status") == "ok":
            ok.append(True)
        else:
            ok.append(False)
            failures.append(
                {
                    "slide_id": row.slide_id,
                    "path": getattr(row, "path", None),
                    "stage": facts.get("stage", "unknown"),
                    "error": facts.get("error", ""),
                }
            )
    return table[ok].reset_index(drop=True), pd.DataFrame(
        failures, columns=["slide_id", "path", "stage", "error"]
    )
