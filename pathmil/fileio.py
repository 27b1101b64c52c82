"""Small file helpers shared by every stage.

Every output of pathmil exists only when it is complete (../DESIGN.md): stages write to a temporary name
in the destination folder and rename it into place, so a killed job never leaves a half-written file that a
later run or the workflow would take for a finished one. A temporary is named after its host and process
(``.NAME.tmp-HOST-PID.SUFFIX``); the next write of the same file removes those of dead processes of this
host, so killed jobs leave no litter. A full disk is one line (:class:`DiskFullError`), never a traceback
from the library that happened to be writing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pathmil.errors import PathmilError, UnsafeFileError

HOST = socket.gethostname().replace("-", "_") or "host"
# Libraries that hide the errno (torch's zip writer, libpng through OpenCV) fail with this much or less free.
NEARLY_FULL_BYTES = 1 << 20


class DiskFullError(PathmilError):
    """A file could not be written because its filesystem is full."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(f"cannot write {path}: no space left on device; free some space and run again")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds, else delete it.

    The temporary keeps the final suffix (``x.h5`` -> ``.x.h5.tmp-HOST-PID.h5``) so libraries that pick a
    format from the suffix (OpenCV, matplotlib) write the right one. Writers must close their file inside
    the block (HDF5 handles especially), so that a failed file is closed before it is removed.

    Raises:
        DiskFullError: the filesystem of ``path`` is full (whatever library did the writing).
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise DiskFullError(final) from None
        raise
    remove_stale_temps(final)
    tmp = final.with_name(f".{final.name}.tmp-{HOST}-{os.getpid()}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    except Exception as err:
        if not isinstance(err, PathmilError) and is_disk_full(err, final.parent):
            raise DiskFullError(final) from None
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_hdf5(path: str | os.PathLike) -> Iterator[Any]:
    """Yield a new ``h5py.File`` built in memory; write it to ``path`` atomically when the block succeeds.

    HDF5's own writer can crash the process (a segmentation fault) when the disk fills up under it; the
    file is therefore assembled in memory and written with one plain write, whose failure is an ordinary
    error (and :class:`DiskFullError` on a full disk). Memory: the file's size, once.
    """
    import io

    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        yield f
    with atomic_output(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


def is_disk_full(err: BaseException, directory: str | os.PathLike) -> bool:
    """Whether ``err`` (or an error it was raised from) is a full filesystem at ``directory``.

    Most writers report ``ENOSPC``; some (torch.save's zip writer, libpng) report only "write failed", so
    a filesystem with less than 1 MiB free counts as full too.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(directory).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def remove_stale_temps(final: Path) -> list[Path]:
    """Remove the temporaries of ``final`` left by killed processes of this host; return them.

    A temporary of a live process (another job writing the same file) or of another host stays.
    """
    prefix = f".{final.name}.tmp-"
    removed = []
    try:
        candidates = [p for p in final.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return removed
    for candidate in candidates:
        owner = candidate.name[len(prefix) :].removesuffix(final.suffix)
        host, _, pid = owner.rpartition("-")
        if host not in ("", HOST) or not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            candidate.unlink()
            removed.append(candidate)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_tensors_safely(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load`` with ``weights_only=True``; every failure is one line naming ``path``."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = str(err).strip().splitlines()
        detail = next((line for line in reason if "Unsupported" in line or "global" in line), reason[0])
        raise UnsafeFileError(
            f"{what} {path} cannot be loaded safely: it holds objects other than tensors and plain data "
            f"({detail.strip()[:160]}); pathmil never writes such files, so do not trust its source"
        ) from None
    except Exception as err:  # torch raises many types for a damaged file
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise PathmilError(f"{what} {path} cannot be read ({type(err).__name__}: {first})") from None


def plain_attr(value: Any) -> Any:
    """An HDF5 attribute value as plain Python (numpy scalars and bytes become int/float/str)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write an RGB array as PNG (fast compression: QC pictures are looked at, not archived).

    Encoded in memory, then written with one plain write, so a full disk is an ``OSError`` with its errno
    (libpng would only say that writing failed). Paeth filtering with run-length deflate at level 1: half
    the time of OpenCV's default on H&E thumbnails, for files 1-20 % larger.
    """
    import cv2

    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH]
    params += [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise ValueError(f"could not encode a {rgb.shape} picture as PNG for {path}")
    Path(path).write_bytes(data.tobytes())


def write_jpeg(path: str | os.PathLike, rgb: np.ndarray, quality: int = 85) -> None:
    """Write an RGB array as baseline JPEG of ``quality`` (1-100), encoded in memory and written with one
    plain write, like :func:`write_png` (pictures of tissue: a tenth of the PNG's size at quality 85)."""
    import cv2

    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"could not encode a {rgb.shape} picture as JPEG for {path}")
    Path(path).write_bytes(data.tobytes())


def write_picture(path: str | os.PathLike, rgb: np.ndarray, jpeg_quality: int = 85) -> None:
    """JPEG for a ``.jpg``/``.jpeg`` path, else PNG."""
    if str(path).lower().endswith((".jpg", ".jpeg")):
        write_jpeg(path, rgb, jpeg_quality)
    else:
        write_png(path, rgb)


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


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file, streamed (weights run to several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
