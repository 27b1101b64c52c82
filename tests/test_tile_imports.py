"""`pathmil tile` stays light: a workflow runs it once per slide, so its imports are paid per slide.

Tiling one slide must not import torch (seconds of start-up and hundreds of MB) nor the table and
plotting libraries that only other stages need. The command runs in a fresh interpreter on a real slide,
which then reports what it imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py

ROOT = Path(__file__).resolve().parents[1]
# Stages beyond tiling need these; `pathmil tile SLIDE` must not pay for them.
NOT_FOR_TILING = ("torch", "torchvision", "timm", "sklearn", "sksurv", "matplotlib", "pandas", "snakemake")


def test_tiling_one_slide_imports_no_torch(slides_dir, tmp_path):
    out, qc = tmp_path / "cmu.h5", tmp_path / "cmu.png"
    args = ["tile", str(slides_dir / "cmu_small_region.svs"), "--out", str(out), "--qc", str(qc)]
    probe = (
        "import json, sys\n"
        "from pathmil.cli import main\n"
        f"code = main({[*args, '--preset', 'bwh_biopsy']!r})\n"
        "print(json.dumps({'code': code, 'modules': sorted(m.split('.')[0] for m in sys.modules)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True, timeout=120
    )
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, proc.stderr
    with h5py.File(out, "r") as f:  # the command really tiled the slide, so its imports all happened
        assert len(f["coords"]) > 10
    assert qc.stat().st_size > 0
    assert "cv2" in report["modules"] and "openslide" in report["modules"]  # the probe sees real imports
    assert sorted(set(NOT_FOR_TILING) & set(report["modules"])) == []
