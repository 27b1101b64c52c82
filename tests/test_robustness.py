"""What pathmil promises when things go wrong (README, "When things go wrong"): checkpoints that cannot run
code, temporaries of killed processes cleared, and a full disk reported in one line by every stage."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pathmil.errors import PathmilError
from pathmil.fileio import HOST, atomic_output, remove_stale_temps
from pathmil.models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def pathmil_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pathmil", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


# ------------------------------------------------------------------------------ unsafe checkpoints


class RunsACommand:
    """Unpickling this object calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"model": {}, "config": {}, "task": {}, "aggregator": "abmil", "in_dim": 4,
                "payload": RunsACommand(marker)}, path)  # fmt: skip
    return path


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    evil = hostile_checkpoint(tmp_path / "best.pt", marker)
    with pytest.raises(PathmilError, match="cannot be loaded safely"):
        load_checkpoint(evil)
    assert not marker.exists()
    # the unsafe load would have run it: the payload is real
    torch.load(evil, weights_only=False)
    assert marker.exists()


@pytest.fixture(scope="module")
def bag_dir(tmp_path_factory) -> Path:
    from pathmil.features.bagfile import write_bag

    root = tmp_path_factory.mktemp("bags")
    coords = torch.arange(20).reshape(10, 2).numpy() * 256
    for slide in ("s1", "s2"):
        write_bag(root / f"{slide}.h5", torch.randn(10, 4).numpy(), coords, {"patch_size_level0": 256}, {})
    return root


@pytest.mark.parametrize("entry", ["predict", "heatmap", "teacher_init", "resume", "clam_bag"])
def test_every_command_that_loads_a_checkpoint_refuses_one_that_runs_code(tmp_path, bag_dir, entry):
    marker = tmp_path / "ran"
    evil = hostile_checkpoint(tmp_path / "evil.pt", marker)
    table = tmp_path / "cohort.csv"
    table.write_text("slide_id,patient_id,label\ns1,p1,0\ns2,p2,1\n")
    splits = tmp_path / "splits.csv"
    splits.write_text("slide_id,patient_id,fold,split\ns1,p1,0,train\ns2,p2,0,train\n")
    train = [
        "train",
        "--features",
        str(bag_dir),
        "--cohort",
        str(table),
        "--splits",
        str(splits),
        "--fold",
        "0",
    ]
    if entry == "predict":
        args = [
            "predict",
            "--model",
            str(evil),
            "--features",
            str(bag_dir / "s1.h5"),
            "--out",
            str(tmp_path / "p.csv"),
        ]
    elif entry == "heatmap":
        args = ["heatmap", "--model", str(evil), "--features", str(bag_dir / "s1.h5"), "--slide", str(evil),
                "--out", str(tmp_path / "h.png")]  # fmt: skip
    elif entry == "teacher_init":
        args = [
            *train,
            "--aggregator",
            "mhim_abmil",
            "--set",
            f"mhim.teacher_init={evil}",
            "--out",
            str(tmp_path / "run"),
        ]
    elif entry == "resume":
        (tmp_path / "run").mkdir()
        shutil.copy(evil, tmp_path / "run" / "last.pt")
        args = [*train, "--out", str(tmp_path / "run")]
    else:
        shutil.copy(evil, tmp_path / "s1.pt")
        shutil.copy(bag_dir / "s2.h5", tmp_path / "s2.h5")
        args = [*train, "--out", str(tmp_path / "run")]
        args[2] = str(tmp_path)  # --features: the folder holding the CLAM-style s1.pt
    done = pathmil_cli(*args)
    assert done.returncode == 1, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("pathmil: error:") and "cannot be loaded safely" in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert not marker.exists()


def test_a_dict_without_the_expected_keys_is_one_line(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(PathmilError, match=r"not a pathmil checkpoint: it lacks model, config, task"):
        load_checkpoint(tmp_path / "other.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(PathmilError, match="not a pathmil checkpoint"):
        load_checkpoint(tmp_path / "tensor.pt")


# ---------------------------------------------------------------------------- temporaries of the dead


def test_temporaries_of_dead_processes_are_removed_before_a_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    final = tmp_path / "metrics.json"
    stale = tmp_path / f".metrics.json.tmp-{HOST}-{dead.pid}.json"
    old_style = tmp_path / f".metrics.json.tmp-{dead.pid}.json"  # pathmil 0.1's names, without the host
    live = tmp_path / f".metrics.json.tmp-{HOST}-{os.getppid()}.json"  # a live process writing it now
    other_host = tmp_path / f".metrics.json.tmp-othernode-{dead.pid}.json"
    unrelated = tmp_path / f".other.json.tmp-{HOST}-{dead.pid}.json"
    for path in (stale, old_style, live, other_host, unrelated):
        path.write_text("half")
    with atomic_output(final) as tmp:
        tmp.write_text("{}")
    assert final.read_text() == "{}"
    assert not stale.exists() and not old_style.exists()
    assert live.exists() and other_host.exists() and unrelated.exists()
    assert remove_stale_temps(final) == []


# ---------------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 8 MiB (root mounts it), filled to leave ``free`` bytes: ``small_disk(free) -> folder``."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)

    def fill(free: int) -> Path:
        filler = mount / "filler"
        with filler.open("wb") as f:
            f.write(b"\0" * (shutil.disk_usage(mount).free - free))
        return mount

    yield fill
    subprocess.run(["umount", str(mount)], check=True)


def assert_disk_full_line(done: subprocess.CompletedProcess, folder: Path) -> None:
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("pathmil: error: cannot write ") and "no space left on device" in lines[-1], (
        done.stderr[-3000:]
    )
    assert "Traceback" not in done.stderr
    assert not [p.name for p in folder.rglob(".*tmp-*")], "a temporary file was left behind"


@pytest.fixture(scope="module")
def one_slide(demo_cohort, mobilenet_weights, tmp_path_factory) -> dict[str, Path]:
    """One demo slide with its tiles (on a normal disk)."""
    out = tmp_path_factory.mktemp("tiles")
    slide = sorted((demo_cohort / "slides").glob("*.tiff"))[0]
    done = pathmil_cli("tile", str(slide), "--out", str(out / "s.h5"), "--preset", "bwh_biopsy")
    assert done.returncode == 0, done.stderr
    return {"slide": slide, "tiles": out / "s.h5", "weights": mobilenet_weights}


@pytest.mark.parametrize("free", [2_000, 60_000])
def test_tile_on_a_full_disk_is_one_line(small_disk, one_slide, free):
    folder = small_disk(free)
    done = pathmil_cli(
        "tile", str(one_slide["slide"]), "--out", str(folder / "t.h5"), "--qc", str(folder / "q.png"),
        "--preset", "bwh_biopsy",
    )  # fmt: skip
    assert_disk_full_line(done, folder)


@pytest.mark.parametrize("free", [3_000, 40_000])
def test_extract_on_a_full_disk_is_one_line_and_never_a_crash(small_disk, one_slide, free):
    folder = small_disk(free)
    done = pathmil_cli(
        "--threads", "1", "extract", str(one_slide["slide"]), "--tiles", str(one_slide["tiles"]),
        "--encoder", "mobilenet_v2", "--weights", str(one_slide["weights"]), "--workers", "0",
        "--out", str(folder / "bag.h5"),
    )  # fmt: skip
    assert done.returncode != -11 and done.returncode != 139, "segmentation fault"
    assert_disk_full_line(done, folder)
    assert not (folder / "bag.h5").exists()


def test_train_on_a_full_disk_is_one_line(small_disk, tmp_path):
    from synthetic import make_synthetic_cohort

    features, table = make_synthetic_cohort(tmp_path / "c", n_patients=12, extra_slides=0)
    splits = tmp_path / "splits.csv"
    assert pathmil_cli("split", "--cohort", str(table), "--task", "classification", "--folds", "2",
                       "--out", str(splits)).returncode == 0  # fmt: skip
    folder = small_disk(6_000)
    done = pathmil_cli(
        "train", "--features", str(features), "--cohort", str(table), "--splits", str(splits), "--fold", "0",
        "--out", str(folder / "run"), "--no-progress", "--set", "epochs=2",
    )  # fmt: skip
    assert_disk_full_line(done, folder)
    assert not (folder / "run" / "metrics.json").exists()


# ------------------------------------------------------------------------------- names and half runs


@pytest.mark.parametrize("slide_id", ["../escaped", "a/b", "..", "tab\there", "{wild}"])
def test_slide_ids_that_are_not_plain_file_names_are_refused(tmp_path, one_slide, slide_id):
    table = tmp_path / "cohort.csv"
    table.write_text(f'slide_id,path\n"{slide_id}",{one_slide["slide"]}\n')
    out = tmp_path / "deep" / "tiles"
    done = pathmil_cli("tile", "--cohort", str(table), "--out-dir", str(out), "--preset", "bwh_biopsy")
    assert done.returncode == 1 and "is not allowed; a slide id must be a plain file name" in done.stderr
    assert not any(tmp_path.rglob("*.h5")), "something was written"
    done = pathmil_cli("tile", str(one_slide["slide"]), f"--slide-id={slide_id}", "--out", str(out / "x.h5"))
    assert done.returncode == 1 and "is not allowed" in done.stderr


def test_a_run_folder_without_metrics_is_not_a_finished_run(tmp_path):
    from pathmil.training.run import load_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"")  # what a killed first epoch can leave beside config.yaml
    (run / "config.yaml").write_text("task: classification\n")
    with pytest.raises(PathmilError, match=r"run .* is not finished \(no metrics.json\)"):
        load_run(run)
    done = pathmil_cli("evaluate", "--runs", str(run), "--out", str(tmp_path / "eval"))
    assert done.returncode == 1 and "is not finished" in done.stderr
