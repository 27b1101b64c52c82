"""Slide ids: how a slide file is named, and which names are safe to use as file names everywhere.

A slide id names the slide's files in every stage (``tiles/ID.h5``, ``features/ENC/ID.h5``, ``qc/ID.png``)
and the workflow's jobs, so it must be a plain file name: not empty, not ``.`` or ``..``, and without
``/``, ``\\``, control characters (NUL, newline, ...) or braces (Snakemake reads ``{...}`` in a file name as
a wildcard). Everything else is allowed, spaces, quotes, ``$``, ``;``, ``&``, non-ASCII letters and a
leading dash included: the workflow quotes every argument and never lets a name reach a shell unquoted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pathmil.errors import PathmilError

# The rule as a regular expression, also in workflow/schemas/cohort.schema.yaml (a test holds them equal).
SLIDE_ID_PATTERN = r"^(?!\.{1,2}$)[^/\\\x00-\x1f\x7f{}]+$"
SLIDE_ID_RULE = (
    "a plain file name: not empty, not '.' or '..', without '/', '\\', control characters or braces"
)

# Extensions OpenSlide 4 reads (https://openslide.org/formats/); DICOM slides are folders of .dcm files.
SLIDE_EXTENSIONS = (
    ".ome.tiff",
    ".ome.tif",
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".vms",
    ".vmu",
    ".scn",
    ".mrxs",
    ".svslide",
    ".bif",
    ".dcm",
)


def slide_id_from_path(path: str | os.PathLike) -> str:
    """A slide id from a file name: the name without its extension (``a/TCGA-01.svs`` -> ``TCGA-01``)."""
    name = Path(path).name
    for ext in SLIDE_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


def is_safe_slide_id(slide_id: str) -> bool:
    return isinstance(slide_id, str) and re.fullmatch(SLIDE_ID_PATTERN, slide_id) is not None


def check_slide_id(slide_id: str, where: str) -> str:
    """Return ``slide_id`` if it is a plain file name, else raise one line naming it and ``where``.

    Raises:
        PathmilError: the id would escape its folder or break a file name (see the module docstring).
    """
    if not is_safe_slide_id(slide_id):
        raise PathmilError(
            f"{where}: slide id {slide_id!r} is not allowed; a slide id must be {SLIDE_ID_RULE}. "
            "Rename the slide (or its slide_id in the table)"
        )
    return slide_id
