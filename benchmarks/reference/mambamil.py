"""Train the MambaMIL authors' own code on the bags and folds of ``mil_quality.py`` (issue 18, item 2).

This file is pathmil's glue only. The authors' code (isyangshu/MambaMIL, checked at commit 9aea39e) is
checked out outside the repository and never committed; this script puts it on ``sys.path`` and calls its
CLAM-style ``utils.core_utils.train`` unchanged, with its own ``Generic_MIL_Dataset`` loader, class-weighted
sampler, optimiser, loop and checkpoint choice, on classification problems. What the glue adapts, all in
memory (no file of theirs is changed):

- mamba-ssm's CUDA kernels, which do not build without a GPU, replaced by PyTorch code: the fused block
  by the repository's own ``mamba_inner_ref`` (with an identity output projection where SR- and Bi-Mamba
  call the variant without one), the causal convolution by ``causal_conv1d``'s reference (a depthwise
  ``conv1d`` padded on the left, then SiLU), the scan by pathmil's PyTorch scan, checked at every start
  against the repository's ``selective_scan_ref`` (outputs and gradients within 1e-4; 3.5e-7 measured), or
  by that sequential reference itself with ``--scan ref`` (about 3x slower; the same training losses to 3
  decimals over the first four epochs of order fold 0);
- the package imports: ``mamba_ssm/__init__`` also imports the language-model head, which needs
  ``transformers`` and imports ``mamba_ssm`` under a second name; the glue registers the package without
  running that file and imports the three mixers (Mamba, SRMamba, BiMamba) the MIL model uses;
- ``np.Inf`` (gone in NumPy 2), which their early stopping reads;
- width 128 for ``MambaMIL`` and their ``DAttention`` instead of the hard-coded 512 (pathmil's benchmark
  runs MambaMIL at d_model 128 for the CPU budget): the one edit of their model files, made on the source
  text as it is loaded;
- the data in their layout: ``<work>/<problem>/seed<s>/pt_files/pathmil/<bag>.pt`` (float32, the bag
  file's instances in their stored order), a dataset table (case_id, slide_id, label) and per fold a CLAM
  ``splits_<k>.csv`` with the benchmark's train, val and test bags;
- the test predictions: the probabilities their ``summary`` returns for the test bags (from the checkpoint
  their early stopping kept: the lowest validation loss), written as ``<out>/<problem>/seed<s>/runs/
  <method>/fold<k>/predictions.csv``, which ``mil_quality.py`` stores and compares (``REFERENCE_OF``).

Settings: their ``train_scripts/LUAD_LUSC_512_subtyping.sh`` (Adam, weight decay 1e-5, dropout 0,
``--weighted_sample``, ``--early_stopping`` (patience 20 after epoch 50: it never stops within 20 epochs but
keeps the lowest-validation-loss checkpoint), 2 Mamba layers, SR rate 5), 20 epochs at lr 5e-4 (theirs:
200 at 2e-4) as pathmil's benchmark runs, seed = the benchmark seed, one torch thread. Methods:
``ref_att_mil`` (their ABMIL, ``att_mil``), ``ref_mamba_sr``, ``ref_mamba_bi``, ``ref_mamba_plain``
(``mamba_mil`` with ``--mambamil_type`` SRMamba, BiMamba, Mamba). Survival (their ``main_survival.py``) is
not covered: its stored runs came from an earlier scratch harness (benchmarks/RESULTS.md).

Usage (from the repository root, with an environment holding pathmil's packages plus the authors'
imports: einops, wandb)::

    git -C <mirror> archive HEAD | tar -x -C /scratch/MambaMIL     # the authors' code, outside the repo
    python benchmarks/reference/mambamil.py --ref /scratch/MambaMIL --work /scratch/mambamil_work \\
        --out benchmarks/out/mq --problem order --method ref_mamba_bi [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

FOLDS = 5
WIDTH = 128  # their models hard-code 512
MAMBA_TYPE = {"ref_mamba_sr": "SRMamba", "ref_mamba_bi": "BiMamba", "ref_mamba_plain": "Mamba"}
METHODS = ["ref_att_mil", *MAMBA_TYPE]
BACKBONE = "pathmil"  # their loader reads <data_dir>/pt_files/<backbone>/<slide_id>.pt


def causal_conv1d_ref(x, weight, bias=None, activation=None, **_):
    """causal-conv1d's reference: depthwise convolution over (batch, dim, length), padded on the left."""
    out = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=x.shape[1])
    out = out[..., : x.shape[-1]]
    return F.silu(out) if activation in ("silu", "swish") else out


def checked_pathmil_scan(reference: Callable) -> Callable:
    """pathmil's PyTorch selective scan with mamba-ssm's ``selective_scan_fn`` signature, after checking
    its outputs and input gradients against ``reference`` (the authors' ``selective_scan_ref``) on random
    inputs of the shapes MambaMIL uses; raises ``AssertionError`` when they differ by more than 1e-4."""
    from pathmil.models.ssm import selective_scan

    def scan(
        u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
    ):
        assert not return_last_state, "not used by MambaMIL"
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend="torch")

    g = torch.Generator().manual_seed(0)
    d, n, length = 2 * WIDTH, 16, 45
    shapes = [
        (1, d, length),
        (1, d, length),
        (d, n),
        (1, n, length),
        (1, n, length),
        (d,),
        (1, d, length),
        (d,),
    ]
    inputs = [torch.randn(s, generator=g) for s in shapes]
    inputs[2] = -torch.rand(d, n, generator=g) * 4  # A < 0 as exp(A_log) makes it
    outputs = []
    for fn in (scan, reference):
        x = [t.clone().requires_grad_() for t in inputs]
        y = fn(*x, delta_softplus=True)
        (y * torch.linspace(-1, 1, length)).sum().backward()
        outputs.append([y.detach(), *(t.grad for t in x)])
    worst = max(
        float((a - b).abs().max() / b.abs().max().clamp(min=1)) for a, b in zip(*outputs, strict=True)
    )
    assert worst < 1e-4, f"pathmil's scan differs from the authors' selective_scan_ref by {worst:.2e}"
    print(f"[mambamil] pathmil's scan vs their selective_scan_ref: largest relative difference {worst:.1e}")
    return scan


def install_cpu_mamba(ref: Path, scan: str = "pathmil") -> None:
    """Make the authors' ``mamba.mamba_ssm`` importable on CPU, running their PyTorch reference paths
    (``scan``: ``"ref"`` their sequential ``selective_scan_ref``, ``"pathmil"`` pathmil's faster scan)."""
    conv = types.ModuleType("causal_conv1d")
    conv.causal_conv1d_fn, conv.causal_conv1d_update = causal_conv1d_ref, None
    sys.modules["causal_conv1d"] = conv
    for name in ("causal_conv1d_cuda", "selective_scan_cuda"):  # imported at the top, called only on CUDA
        sys.modules[name] = types.ModuleType(name)
    for name in ("mamba.mamba_ssm", "mamba_ssm"):  # the package without its __init__ (the LM head)
        package = types.ModuleType(name)
        package.__path__ = [str(ref / "mamba" / "mamba_ssm")]
        sys.modules[name] = package
    import mamba.mamba_ssm.ops.selective_scan_interface as ssi

    sys.modules["mamba_ssm.ops.selective_scan_interface"] = ssi  # mamba_simple imports it by that name
    ssi.selective_scan_fn = (
        ssi.selective_scan_ref if scan == "ref" else checked_pathmil_scan(ssi.selective_scan_ref)
    )

    def inner_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B=None, C=None,
                          D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True):  # fmt: skip
        identity = torch.eye(xz.shape[1] // 2, dtype=xz.dtype, device=xz.device)
        y = ssi.mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, identity, None,
                                A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus)  # fmt: skip
        return y.transpose(1, 2)  # (batch, d_inner, length), as the fused kernel returns it

    from mamba.mamba_ssm.modules import bimamba, mamba_simple, srmamba

    srmamba.mamba_inner_fn_no_out_proj = bimamba.mamba_inner_fn_no_out_proj = inner_no_out_proj
    mamba_simple.mamba_inner_fn = ssi.mamba_inner_ref
    package = sys.modules["mamba.mamba_ssm"]
    package.Mamba, package.SRMamba, package.BiMamba = mamba_simple.Mamba, srmamba.SRMamba, bimamba.BiMamba


def load_at_width(name: str, path: Path, width: int) -> None:
    """Import the authors' model file ``path`` as ``name`` with its hard-coded width 512 set to ``width``."""
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    exec(compile(path.read_text().replace("512", str(width)), str(path), "exec"), module.__dict__)


def prepare_data(data: Path, work: Path) -> tuple[Path, pd.DataFrame]:
    """Every bag as a ``pt_file`` and the dataset table; returns (data dir, splits joined with cohort)."""
    cohort, splits = pd.read_csv(data / "cohort.csv"), pd.read_csv(data / "splits.csv")
    target = work / "pt_files" / BACKBONE
    target.mkdir(parents=True, exist_ok=True)
    for bag in cohort["slide_id"]:
        if not (target / f"{bag}.pt").is_file():
            with h5py.File(data / "features" / f"{bag}.h5") as f:
                torch.save(torch.from_numpy(f["features"][:].astype(np.float32)), target / f"{bag}.pt")
    table = pd.DataFrame(
        {"case_id": cohort["slide_id"], "slide_id": cohort["slide_id"], "label": cohort["label"].astype(int)}
    )
    table.to_csv(work / "dataset.csv", index=False)
    return work, splits.merge(cohort, on=["slide_id", "patient_id"])


def write_splits(part: pd.DataFrame, path: Path) -> None:
    """CLAM's splits table: one column of slide ids per split, padded with empty cells."""
    columns = {
        s: part.loc[part["split"] == s, "slide_id"].reset_index(drop=True) for s in ("train", "val", "test")
    }
    pd.DataFrame(columns).to_csv(path)


def seed_everything(seed: int) -> None:
    """What their ``main.seed_torch`` does on CPU, before each fold."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    np.random.seed(seed)  # noqa: NPY002 - their samplers draw from the legacy global state
    torch.manual_seed(seed)


def train_args(method: str, results: Path, in_dim: int, seed: int) -> argparse.Namespace:
    """The arguments their ``core_utils.train`` reads, at the LUAD/LUSC script's values."""
    return argparse.Namespace(
        results_dir=str(results), log_data=False, testing=False, early_stopping=True, weighted_sample=True,
        opt="adam", lr=5e-4, reg=1e-5, max_epochs=20, drop_out=0.0, n_classes=2, in_dim=in_dim, seed=seed,
        model_type="att_mil" if method == "ref_att_mil" else "mamba_mil", mambamil_layer=2, mambamil_rate=5,
        mambamil_type=MAMBA_TYPE.get(method, "SRMamba"),
    )  # fmt: skip


def run(ref: Path, work: Path, out: Path, problem: str, method: str, seed: int, scan: str) -> None:
    """Train and score every fold of (problem, seed) not yet written; see the module docstring."""
    torch.set_num_threads(1)
    data = out / problem / f"seed{seed}" / "data"
    if "label" not in pd.read_csv(data / "cohort.csv", nrows=1):
        sys.exit(f"{problem} is not a classification problem; this glue runs their classification code only")
    root, part = prepare_data(data, work / problem / f"seed{seed}")
    with h5py.File(next((data / "features").glob("*.h5"))) as f:
        in_dim = f["features"].shape[1]
    np.Inf = np.inf  # noqa: NPY201 - their EarlyStopping reads np.Inf, which NumPy 2 removed
    sys.path[:0] = [str(ref), str(ref / "utils")]  # utils.utils imports survival_utils by its bare name
    os.chdir(ref)
    install_cpu_mamba(ref, scan)
    for name in ("ABMIL", "MambaMIL"):
        load_at_width(f"models.{name}", ref / "models" / f"{name}.py", WIDTH)
    from dataset.dataset_generic import Generic_MIL_Dataset
    from utils.core_utils import train

    results = work / problem / f"seed{seed}" / method
    results.mkdir(parents=True, exist_ok=True)
    for fold in range(FOLDS):
        target = out / problem / f"seed{seed}" / "runs" / method / f"fold{fold}" / "predictions.csv"
        if target.is_file():
            continue
        started = time.time()
        write_splits(part[part["fold"] == fold], root / f"splits_{fold}.csv")
        seed_everything(seed)
        dataset = Generic_MIL_Dataset(
            csv_path=str(root / "dataset.csv"), data_dir=str(root), shuffle=False, seed=seed, print_info=False,
            label_dict={0: 0, 1: 1}, patient_strat=False, ignore=[],
        )  # fmt: skip
        splits = dataset.return_splits(
            BACKBONE, "512", from_id=False, csv_path=str(root / f"splits_{fold}.csv")
        )
        test_results, *_ = train(splits, fold, train_args(method, results, in_dim, seed))
        test = part[(part["fold"] == fold) & (part["split"] == "test")]
        score = [float(test_results[b]["prob"][0, 1]) for b in test["slide_id"]]
        table = pd.DataFrame({
            "slide_id": test["slide_id"], "patient_id": test["patient_id"], "fold": fold, "split": "test",
            "target": test["label"].astype(int), "score": score, "prediction": (np.array(score) >= 0.5).astype(int),
        })  # fmt: skip
        target.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(target.with_suffix(".tmp"), index=False)
        os.replace(target.with_suffix(".tmp"), target)
        print(f"[mambamil] {problem} {method} fold {fold}: {time.time() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ref", type=Path, required=True, help="checkout of isyangshu/MambaMIL (outside the repo)"
    )
    parser.add_argument(
        "--work", type=Path, required=True, help="scratch folder for its data and checkpoints"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/out/mil_quality"), help="mil_quality --out"
    )
    parser.add_argument("--problem", required=True)
    parser.add_argument("--method", required=True, choices=METHODS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--scan", choices=["pathmil", "ref"], default="pathmil",
        help="the selective scan: pathmil's (checked against theirs at start) or their sequential reference",
    )  # fmt: skip
    a = parser.parse_args(argv)
    run(a.ref.resolve(), a.work.resolve(), a.out.resolve(), a.problem, a.method, a.seed, a.scan)


if __name__ == "__main__":
    main()
