"""The conda environments (envs/*.yaml) checked without a solver: channels, names, version bounds, pip section.

Both files must hold every dependency of pyproject.toml under its conda-forge/bioconda name with the same
version bounds, from conda-forge and bioconda only, and install pathmil itself through the post-deploy script
beside them (Snakemake's convention: ENV.post-deploy.sh), never through a path in the pip section (a path is
resolved from wherever the env file sits, and `--sdm conda` copies it into .snakemake/conda/).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
ENVS = {"cpu": ROOT / "envs" / "pathmil.yaml", "cuda": ROOT / "envs" / "pathmil-cuda.yaml"}
CHANNELS = ["conda-forge", "bioconda", "nodefaults"]
# PyPI name -> conda-forge/bioconda name where they differ (checked against the feedstocks' recipes)
CONDA_NAME = {
    "torch": "pytorch",
    "openslide-bin": "openslide",  # the C library; PyPI ships it in a wheel
    "opencv-python-headless": "py-opencv",  # with a headless* build string
    "matplotlib": "matplotlib-base",  # matplotlib without a GUI toolkit, as on PyPI
}
PIP_ONLY = {"mambapy"}  # no conda package
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def conda_specs(env: dict) -> dict[str, tuple[str, str]]:
    """name -> (version, build) of the conda dependencies ("py-opencv >=4.8 headless*" -> (">=4.8", "headless*"))."""
    specs = {}
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*([^\s]*)\s*([^\s]*)", entry.strip())
        assert match, f"cannot read the dependency {entry!r}"
        name, version, build = match.groups()
        assert name not in specs, f"{name} is listed twice"
        specs[name] = (version, build)
    return specs


def pip_requirements(env: dict) -> list[str]:
    return [r for entry in env["dependencies"] if isinstance(entry, dict) for r in entry.get("pip", [])]


@pytest.fixture(params=list(ENVS), ids=list(ENVS))
def env(request) -> tuple[str, dict]:
    return request.param, yaml.safe_load(ENVS[request.param].read_text())


def test_channels_are_conda_forge_and_bioconda_only(env):
    _, data = env
    assert data["channels"] == CHANNELS  # no defaults, no pytorch or nvidia channel


def test_every_dependency_of_pyproject_is_in_the_env_with_its_bounds(env):
    kind, data = env
    specs = conda_specs(data)
    pip = {Requirement(r).name: Requirement(r) for r in pip_requirements(data)}
    wanted = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    if kind == "cuda":
        wanted += [Requirement(r) for r in PYPROJECT["project"]["optional-dependencies"]["mamba"]]
    for requirement in wanted:
        if requirement.name in PIP_ONLY:
            assert requirement.name in pip, f"{requirement.name} belongs in the pip section"
            assert pip[requirement.name].specifier == requirement.specifier
            continue
        name = CONDA_NAME.get(requirement.name, requirement.name)
        assert name in specs, f"{requirement} (conda: {name}) is missing from {ENVS[kind].name}"
        assert SpecifierSet(specs[name][0]) == requirement.specifier, (name, specs[name], requirement)
    build_tools = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    setuptools = next(r for r in build_tools if r.name == "setuptools")
    # the post-deploy script builds pathmil offline, with the env's setuptools
    assert SpecifierSet(specs["setuptools"][0]) == setuptools.specifier


def test_pytorch_build_and_python(env):
    kind, data = env
    specs = conda_specs(data)
    assert ("pytorch-cpu" in specs) == (kind == "cpu") and ("pytorch-gpu" in specs) == (kind == "cuda")
    assert specs["py-opencv"][1] == "headless*"
    assert not {"cpuonly", "pytorch-cuda", "cuda-nvcc", "cuda-toolkit"} & set(specs)  # the pytorch channel's
    python = specs["python"][0].removeprefix("=")
    assert Version(python) in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_pathmil_is_installed_by_the_post_deploy_script_not_a_path(env):
    kind, data = env
    for requirement in pip_requirements(data):
        assert Requirement(requirement).name in PIP_ONLY, f"pip: {requirement}"  # parses: no -e, no path
    script = ENVS[kind].with_suffix(".post-deploy.sh")
    assert script.is_file() and os.access(script, os.X_OK)
    text = script.read_text()
    assert "PATHMIL_SOURCE" in text and "--editable" in text and "--no-deps" in text


def test_rules_name_existing_env_files():
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text()
    paths = re.findall(r'^ENV(?:_CUDA)? = "([^"]+)"', common, flags=re.MULTILINE)
    assert len(paths) == 2
    for path in paths:  # relative to the rule files, as Snakemake resolves them
        assert (ROOT / "workflow" / "rules" / path).resolve() in {p.resolve() for p in ENVS.values()}


@pytest.mark.parametrize(
    ("minimum", "message"), [(10**9, "needs about 1000000000 GB"), ("7.5", "whole number")]
)
def test_the_venv_script_refuses_a_first_install_on_a_full_disk(tmp_path, minimum, message):
    """scripts/venv.sh checks free space before it makes the venv: pip would otherwise fail half-way
    through torch's CUDA build with "No space left on device" (as a CI run did, 2026-11-30). The
    caller (run_tests.sh sources it) stops too, in a folder whose name has spaces."""
    root = tmp_path / "a clone (copy)"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "venv.sh", root / "scripts" / "venv.sh")
    shutil.copy(ROOT / "pyproject.toml", root / "pyproject.toml")
    env = {**os.environ, "PATHMIL_MIN_FREE_GB": str(minimum)}
    done = subprocess.run(
        ["bash", "-c", "source scripts/venv.sh; echo caller went on"],
        cwd=root, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1 and "caller went on" not in done.stdout, done
    assert message in done.stderr
    assert not (root / ".venv").exists()
