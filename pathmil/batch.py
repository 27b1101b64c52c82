"""Per-slide bookkeeping shared by the per-slide stages (tile, extract): what a failing slide leaves behind.

A failing slide never stops a batch when ``skip_errors`` is on: one slide's problem (unopenable,
unreadable, no tissue, no resolution) is a :class:`~pathmil.errors.PathmilError`, recorded with the slide,
its path, the stage and the one-line reason, and the others go on. In batch mode the failures go to a
table (``failures.csv``, always written, empty when none failed); for one slide (the workflow's jobs) to the
slide's facts JSON with status ``failed``, which ``pathmil cohort --facts-dir`` gathers later. A full disk
is no slide's fault: it stops the run (:class:`~pathmil.fileio.DiskFullError`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pathmil.errors import PathmilError, UpstreamFailure
from pathmil.fileio import DiskFullError, atomic_output, write_json, write_png

FAILURE_COLUMNS = ("slide_id", "path", "stage", "error")


def stage_of(err: PathmilError, default: str) -> str:
    """The stage a failure belongs to (an extraction may fail because tiling did)."""
    return str(getattr(err, "stage", default))


def record_failure(
    facts_path: str | os.PathLike, slide_id: str, path: str | os.PathLike, stage: str, error: Exception
) -> None:
    """Write a facts JSON with status 'failed', so a workflow can go on and collect the failure later."""
    write_json(
        facts_path,
        {"slide_id": slide_id, "path": str(path), "status": "failed", "stage": stage, "error": str(error)},
    )


def write_failure_outputs(
    paths: list[str | os.PathLike | None], slide_id: str, stage: str, error: Exception
) -> None:
    """Stand-ins for the per-slide outputs a failed slide cannot make, so a workflow job that declares
    them still completes: an HDF5 file holding only the failure (readers refuse it, naming the reason),
    a PNG card that shows the reason in the QC gallery, and a GeoJSON without features that says why."""
    for path in (Path(p) for p in paths if p is not None):
        if path.suffix == ".h5":
            write_failure_record(path, slide_id, stage, str(error))
        elif path.suffix == ".geojson":
            failure = {"slide_id": slide_id, "status": "failed", "stage": stage, "error": str(error)}
            write_json(path, {"type": "FeatureCollection", "features": [], "pathmil": failure})
        elif path.suffix == ".png":
            with atomic_output(path) as tmp:
                write_png(tmp, failure_card(slide_id, stage, str(error)))


def failure_card(slide_id: str, stage: str, error: str, width: int = 720) -> np.ndarray:
    """A QC picture for a slide that failed: its id, the stage and the reason, wrapped, on a pale card."""
    import textwrap

    import cv2

    lines = [f"{slide_id}: {stage} failed", *textwrap.wrap(error, 70)[:8]]
    height = 30 + 26 * len(lines)
    card = np.full((height, width, 3), (250, 235, 235), np.uint8)
    for i, line in enumerate(lines):
        colour = (150, 20, 20) if i == 0 else (40, 40, 40)
        cv2.putText(card, line, (12, 32 + 26 * i), cv2.FONT_HERSHEY_SIMPLEX, 0.55, colour, 1, cv2.LINE_AA)
    return card


def write_failure_record(path: str | os.PathLike, slide_id: str, stage: str, error: str) -> None:
    """An HDF5 file (tiles or bag) that records a failed slide instead of its data."""
    from pathmil.fileio import atomic_hdf5

    with atomic_hdf5(path) as f:
        f.attrs.update({"status": "failed", "slide_id": slide_id, "stage": stage, "error": error})


def check_not_failure_record(attrs: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse a failure record where data is expected, naming the stage and the reason.

    Raises:
        UpstreamFailure: ``attrs`` (a file's root attributes) mark a failed slide.
    """
    if attrs.get("status") == "failed":
        stage = str(attrs.get("stage", "unknown"))
        step = {"tile": "tiling", "extract": "feature extraction"}.get(stage, stage)
        raise UpstreamFailure(
            f"{path} records that the slide's {step} failed: {attrs.get('error', '')}", stage
        )


def write_failures(path: str | os.PathLike, failed: list[dict[str, str]]) -> None:
    """Write the failures table (slide_id, path, stage, error), atomically."""
    import pandas as pd

    table = pd.DataFrame(failed, columns=list(FAILURE_COLUMNS))
    with atomic_output(path) as tmp:
        table.to_csv(tmp, index=False)


def run_one(
    work: Callable[[], dict[str, Any]],
    stage: str,
    slide_id: str,
    path: str | os.PathLike,
    facts_path: str | os.PathLike,
    skip_errors: bool,
    outputs: list[str | os.PathLike | None] = (),
) -> dict[str, Any] | None:
    """One slide's stage; with ``skip_errors`` a slide's failure is recorded in its facts JSON and in
    stand-ins for its ``outputs`` (:func:`write_failure_outputs`), printed, and None returned."""
    try:
        return work()
    except DiskFullError:
        raise
    except PathmilError as err:
        if not skip_errors:
            raise
        record_failure(facts_path, slide_id, path, stage_of(err, stage), err)
        write_failure_outputs(list(outputs), slide_id, stage_of(err, stage), err)
        print(f"pathmil: skipped: {err}", file=sys.stderr)
        return None


def run_batch(
    rows: Iterable[Any],
    work: Callable[[Any], dict[str, Any]],
    stage: str,
    failures_path: str | os.PathLike,
    skip_errors: bool,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """``work(row)`` for every row (with ``slide_id`` and ``path``) of a cohort; return the facts of those
    that succeeded. With ``skip_errors`` failures go to the table at ``failures_path`` and the rest go on."""
    from tqdm import tqdm

    rows = list(rows)
    records, failed = [], []
    for row in tqdm(rows, desc=stage, unit="slide", disable=not progress):
        try:
            records.append(work(row))
        except DiskFullError:
            raise
        except PathmilError as err:
            if not skip_errors:
                raise
            failed.append(
                {"slide_id": row.slide_id, "path": row.path, "stage": stage_of(err, stage), "error": str(err)}
            )
    write_failures(Path(failures_path), failed)
    return records
