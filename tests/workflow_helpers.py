"""Run the project's Snakemake workflow in a throw-away copy, as a user would run it in a clone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def workflow_copy(where: Path) -> Path:
    """Copy Snakefile, workflow/, config/ and envs/ to ``where`` (results then land there, not in the repo),
    and link the test data."""
    where.mkdir(parents=True, exist_ok=True)
    for name in ["Snakefile", "config", "workflow", "envs"]:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        copy(ROOT / name, where / name)
    if (ROOT / ".testdata").is_dir():  # the demo config's weights (a missing weights file is refused)
        (where / ".testdata").symlink_to(ROOT / ".testdata")
    return where


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def snakemake(
    workdir: Path, *args: str, check: bool = True, timeout: int = 900
) -> subprocess.CompletedProcess:
    """Run snakemake in ``workdir`` with this interpreter's environment first on PATH (its `pathmil`)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert done.returncode == 0, (done.stdout + done.stderr)[-8000:]
    return done


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a snakemake run or dry run, as {rule: count}."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("job ") and "count" in line)
    counts = {}
    for line in lines[start + 2 :]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    counts.pop("total", None)
    return counts
