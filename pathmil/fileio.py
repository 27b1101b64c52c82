"""Small file helpers shared by every stage.

Every output of pathmil exists only when it is complete (../DESIGN.md): stages write to a temporary name
in the destination folder and rename it into place, so a killed job never leaves a half-written file that a
later run or the workflow would take for a finished one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds, else delete it.

    The temporary keeps the final suffix (``x.h5`` -> ``.x.h5.tmp-<pid>.h5``) so libraries that pick a
    format from the suffix (OpenCV, matplotlib) write the right one.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically; NaN and infinities become null (strict JSON)."""
    text = json.dumps(_finite(json.loads(json.dumps(data, default=_json_default))), indent=2)
    with atomic_output(path) as tmp:
        tmp.write_text(text + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    """Let numpy scalars and arrays, and paths, pass through ``json.dumps``."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
