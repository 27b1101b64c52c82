"""Shared fixtures: the real test files and a small demo cohort.

The real files (OpenSlide's fixtures, a real H&E region, ImageNet MobileNetV2 weights) are put into
.testdata/ by scripts/fetch_test_data.sh, which the README's test command runs first. A missing file is a
test failure that says how to fetch it, never a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    return Path(os.environ.get("PATHMIL_TEST_DATA", ROOT / ".testdata"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    data = _data_dir()
    if not (data / "slides" / "cmu_small_region.svs").is_file():
        pytest.fail(f"real test data missing in {data}: run scripts/fetch_test_data.sh first")
    return data


@pytest.fixture(scope="session")
def slides_dir(real_data: Path) -> Path:
    return real_data / "slides"


@pytest.fixture(scope="session")
def mobilenet_weights(real_data: Path) -> Path:
    return real_data / "weights" / "mobilenet_v2-b0353104.pth"


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small demo cohort (8 slides, 6 patients) shared by the tests of every stage."""
    from pathmil.demo import make_demo_cohort

    out = tmp_path_factory.mktemp("demo")
    make_demo_cohort(out, n_slides=8, n_patients=6, size_px=(2048, 2560), seed=1, progress=False)
    return out


@pytest.fixture
def one_torch_thread():
    """Small tensors run many times faster on one thread: two threads spin and wait on each other, the more
    so when other processes share the cores (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
