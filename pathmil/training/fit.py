"""Train one MIL model on one fold: the explicit loop, in the spirit of nanoGPT's ``train.py``.

Per epoch: shuffle the training bags with a generator seeded by (seed, epoch); forward ``accumulation``
bags, one at a time (bags differ in size, and MIL models are small next to their inputs), compute the
task loss over the group (a Cox loss needs several bags), step Adam/AdamW under a warm-up + cosine schedule;
then score the validation bags and keep the checkpoint with the best value of the task's main metric.
Stop early after ``patience`` epochs without improvement (never before ``min_epochs``). Every epoch ends
with ``last.pt``, so a killed run started again resumes where it stopped and ends with the same result.

Outputs in the run folder: ``best.pt``, ``last.pt``, ``history.csv``, ``predictions.csv`` (one row per bag
and split, columns of the task), ``metrics.json`` and ``config.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from pathmil.cohort import read_labelled_table
from pathmil.data.bags import BagDataset, BagTable, make_bag_table
from pathmil.data.splits import check_patient_level, read_splits
from pathmil.device import autocast, mil_autocast_dtype, resolve_device
from pathmil.errors import PathmilError, UnsafeFileError
from pathmil.features.bagfile import feature_provenance, read_bag_attrs
from pathmil.fileio import atomic_output, write_json
from pathmil.models.checkpoint import load_checkpoint, model_checkpoints, model_files, save_checkpoint
from pathmil.tasks import Task, create_task
from pathmil.training.run import TrainConfig, build_model, check_trainable, score_bag, scoring_model, task_of
from pathmil.training.seeding import rng_state, seed_everything, set_rng_state
from pathmil.training.transfer import check_sources, describe_outputs, init_from

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
# What a finished run adds to its folder (metrics.json last): a folder without them is unfinished.
FINISHED_MARKERS = ("metrics.json", "predictions.csv", "history.csv")


@dataclass
class LoopState:
    """What the loop carries from epoch to epoch (saved in ``last.pt``)."""

    epoch: int = 0
    step: int = 0
    best_metric: float = -math.inf
    best_epoch: int = -1
    best_loss: float = math.inf  # validation loss at the best epoch (breaks ties of the metric)
    bad_epochs: int = 0
    monitor: str = ""  # the validation quantity early stopping follows
    stopped: bool = False  # early stopping ended the run (a restart must not train further)
    history: list[dict[str, Any]] = field(default_factory=list)


def cosine_with_warmup(total_steps: int, warmup_steps: int):
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


# ----------------------------------------------------------------------------------------- the data


@dataclass
class FoldData:
    """The bags of one fold, per split, with their task targets."""

    tables: dict[str, BagTable]
    datasets: dict[str, BagDataset]
    targets: dict[str, torch.Tensor]
    fingerprint: str
    feature_info: dict[str, Any]


def load_fold(
    config: TrainConfig,
    task: Task,
    features_dir: str | os.PathLike,
    cohort_path: str | os.PathLike,
    splits_path: str | os.PathLike,
    fold: int,
    parts: tuple[str, ...] = SPLITS,
) -> FoldData:
    """Read and check the cohort and splits, build bags per split and fit the task on the training bags.

    ``parts`` limits the splits read (a hyperparameter search reads train and val, never test).
    """
    cohort = read_labelled_table(cohort_path, task.label_columns, config.bag_level)
    task.check_labels(cohort)
    rows = read_splits(splits_path, fold)
    unknown = sorted(set(rows["slide_id"]) - set(cohort["slide_id"]))
    if unknown:
        raise PathmilError(
            f"splits table {splits_path} names {len(unknown)} slide(s) not in the cohort table "
            f"{cohort_path} (first: {unknown[0]}); make the splits from this cohort table"
        )
    rows = rows.drop(columns="patient_id").merge(
        cohort[["slide_id", "patient_id", *task.label_columns]], on="slide_id"
    )
    check_patient_level(rows, f"splits table {splits_path}")
    tables = {
        s: make_bag_table(rows[rows["split"] == s], features_dir, task.label_columns, config.bag_level)
        for s in parts
    }
    if tables["train"].bags.empty:
        raise PathmilError(f"fold {fold} of {splits_path} has no training slides")
    task.fit(tables["train"].bags)
    datasets = {
        s: BagDataset(t, config.max_instances if s == "train" else None, config.memory_budget_gb, config.seed)
        for s, t in tables.items()
        if not t.bags.empty
    }
    targets = {s: task.targets(t.bags) for s, t in tables.items() if not t.bags.empty}
    files = sorted({str(p) for t in tables.values() for paths in t.files for p in paths})
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    starts = start_file_stats(config)
    blob = json.dumps(
        [config.to_dict(), fold, rows.to_dict("records"), stats, starts], default=str, sort_keys=True
    )
    attrs = read_bag_attrs(files[0])
    feature_info = {"dim": datasets["train"].dim, **feature_provenance(attrs)}
    return FoldData(tables, datasets, targets, hashlib.sha256(blob.encode()).hexdigest(), feature_info)


def start_file_stats(config: TrainConfig) -> list[tuple[str, int, int]]:
    """(path, size, mtime in ns) of every model file the run starts from: MHIM-MIL's ``teacher_init``, the
    fine-tuning ``init_from``, the transfer ``sources`` (as :func:`pathmil.models.checkpoint.model_files`
    names them). They enter the resume fingerprint, so a last.pt is not resumed once a baseline or source
    it started from was trained again."""
    paths = [config.mhim.get("teacher_init"), config.init_from, *config.sources]
    files = [f for p in paths if p for f in model_files(p)]
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def patient_digests(ids: Any) -> set[str]:
    """16-hex-digit SHA-256 digests of patient ids: checkpoints (and the packages shared from them) keep
    these, not the ids."""
    return {hashlib.sha256(f"pathmil patient {i}".encode()).hexdigest()[:16] for i in map(str, ids)}


def split_patients(data: FoldData) -> dict[str, list[str]]:
    """The patients of each split of the fold, as :func:`patient_digests` (checkpoints keep them, so a model
    that starts from another can tell whether that one saw its test patients)."""
    return {s: sorted(patient_digests(t.bags["patient_id"].unique())) for s, t in data.tables.items()}


def check_teacher(config: TrainConfig, task: Task, data: FoldData) -> None:
    """Refuse an MHIM-MIL teacher (``mhim.teacher_init``) that is not this run's baseline: one trained for
    another label column or outputs of another meaning (:meth:`Task.output_meaning`; the same number of
    outputs passes the model's own check, and its attention would mask for the other label), or one
    trained on this run's test patients (another fold's baseline: its knowledge of the test patients would
    pass to the student through the masks and the consistency loss, and the test metrics would be
    optimistic with no error). Checkpoints older than the split record are not checked for patients.

    Raises:
        PathmilError: one line naming the teacher, what it was trained for or on, and the fix.
    """
    path = config.mhim.get("teacher_init")
    if not path or not Path(path).exists():
        return  # a missing file is MHIM-MIL's own error, with its own words
    file = model_files(path)[0]
    if not file.is_file() or file.suffix != ".pt":
        return
    checkpoint = load_checkpoint(file)
    teacher = task_of(checkpoint, file)
    if (teacher.label_columns, teacher.output_meaning()) != (task.label_columns, task.output_meaning()):
        raise PathmilError(
            f"mhim.teacher_init {file} was trained for {describe_outputs(teacher.output_meaning())} on column "
            f"{', '.join(teacher.label_columns)}, this run is {describe_outputs(task.output_meaning())} on "
            f"column {', '.join(task.label_columns)}; give the baseline of the same task and label"
        )
    leaked = test_patients_seen(checkpoint, data)
    if leaked:
        raise PathmilError(
            f"mhim.teacher_init {file} trained on {len(leaked)} of this fold's test patients (first: "
            f"{leaked[0]}): it is another fold's baseline; give the baseline of the same cohort, splits and fold"
        )


def test_patients_seen(checkpoint: dict[str, Any], data: FoldData) -> list[str]:
    """This fold's test patients that the checkpoint's model trained or was selected on (its ``patients``
    digests; none for checkpoints older than that record or a fold without a test part)."""
    seen = checkpoint.get("patients") or {}
    trained = set(seen.get("train", [])) | set(seen.get("val", []))
    if not trained or "test" not in data.tables:
        return []
    test = data.tables["test"].bags["patient_id"].astype(str).unique()
    return sorted(p for p in test if patient_digests([p]) <= trained)


def warn_of_sources_that_saw_the_test_patients(config: TrainConfig, data: FoldData) -> None:
    """A fine-tuning source (``init_from``) or MoE-PKT source (``sources``) that trained on patient ids of
    this fold's test part: a model of the same cohort (another fold's run, a package of the whole cohort)
    hands the run what the test patients' labels taught it, and the test metrics are optimistic. Sources
    of another cohort may share short ids by chance ("1", "2", ...), so this is a warning, naming the
    source and how many test patients it saw, not a refusal."""
    checkpoints = model_checkpoints(config.init_from)[:1] if config.init_from else []  # what init_from loads
    for path in config.sources:
        checkpoints += model_checkpoints(path)  # every fold model of a MoE-PKT source
    for file, checkpoint in checkpoints:
        seen = test_patients_seen(checkpoint, data)
        if seen:
            log.warning(
                "source model %s trained on %d of this fold's %d test patients (first: %s): if it comes from "
                "this cohort, the test metrics are optimistic; fine-tune from a model of another cohort, or "
                "this fold's own run",
                file, len(seen), data.tables["test"].bags["patient_id"].nunique(), seen[0],
            )  # fmt: skip


# ------------------------------------------------------------------------------------------ the loop


class Trainer:
    """Owns model, optimiser and schedule for one run; :meth:`fit` runs the loop."""

    def __init__(self, config: TrainConfig, task: Task, data: FoldData, out_dir: Path, progress: bool = True):
        self.config, self.task, self.data, self.out_dir, self.progress = config, task, data, out_dir, progress
        self.device = resolve_device(config.device)
        check_sources(config, data.feature_info)
        self.model = build_model(config, data.feature_info["dim"], task).to(self.device)
        optimiser = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimiser(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(len(data.datasets["train"]) / config.accumulation)
        self.total_steps = steps_per_epoch * config.epochs
        warmup = round(config.warmup_epochs * steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_with_warmup(self.total_steps, warmup)
        )
        self.state = LoopState()
        self.best: dict[str, Any] | None = None  # {"model": weights, "epoch": n} of the best epoch so far

    @property
    def trained_in_bf16(self) -> bool:
        """Whether training runs under bf16 autocast (``amp`` on a GPU); written scores use the same."""
        return mil_autocast_dtype(self.device, self.config.amp) is not None

    def autocast(self):
        return autocast(self.device, mil_autocast_dtype(self.device, self.config.amp))

    # -------------------------------------------------------------------------------- steps

    def train_epoch(self, epoch: int) -> float:
        dataset, targets = self.data.datasets["train"], self.data.targets["train"]
        dataset.set_epoch(epoch)
        self.model.train()
        order = np.random.default_rng([self.config.seed, epoch]).permutation(len(dataset))
        losses = []
        for start in range(0, len(order), self.config.accumulation):
            group = order[start : start + self.config.accumulation]
            with self.autocast():
                outputs = [
                    self.model.training_forward(dataset.features(int(i), sample=True)[None].to(self.device))
                    for i in group
                ]
            logits = torch.cat([o.logits for o in outputs]).float()
            loss = self.task.loss(logits, targets[torch.from_numpy(group)].to(self.device))
            aux = [o.aux_loss for o in outputs if o.aux_loss is not None]
            if aux:
                loss = loss + torch.stack(aux).float().mean()
            if not torch.isfinite(loss):
                raise PathmilError(self._diverged(epoch, group, f"the loss is {float(loss.detach())}"))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            if not all(torch.isfinite(p.grad).all() for p in self.model.parameters() if p.grad is not None):
                raise PathmilError(self._diverged(epoch, group, "the gradient holds NaN or inf"))
            self.optimizer.step()
            self.scheduler.step()
            self.state.step += 1
            self.model.after_step(self.state.step, self.total_steps)
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    def _diverged(self, epoch: int, group: np.ndarray, what: str) -> str:
        """The one line of a training step that went non-finite: epoch, step, its bags and what to change."""
        bags = self.data.tables["train"].bags["bag_id"].iloc[group].astype(str).tolist()
        return (
            f"training diverged at epoch {epoch + 1}, step {self.state.step + 1}: {what} on bag(s) "
            f"{', '.join(bags)}; nothing of this epoch was saved. Lower the learning rate (lr, now "
            f"{self.config.lr:g}), set grad_clip, or check those bags"
        )

    @torch.inference_mode()
    def logits(self, split: str, final: bool = False) -> torch.Tensor:
        """Logits of every bag of ``split`` (eval mode, all instances). ``final``: as the written scores are
        made (:func:`pathmil.training.run.score_bag`, float64 on the CPU) rather than the float32 pass
        validation uses to pick the best epoch."""
        self.model.eval()
        dataset = self.data.datasets[split]
        if final:
            model = scoring_model(self.model, self.device)
            out = [
                score_bag(model, dataset.features(i), self.device, self.trained_in_bf16).logits.cpu()
                for i in range(len(dataset))
            ]
        else:
            out = []
            for i in range(len(dataset)):
                with self.autocast():
                    out.append(self.model(dataset.features(i)[None].to(self.device)).logits.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.task.n_outputs)

    def predictions(self, split: str, logits: torch.Tensor, fold: int) -> pd.DataFrame:
        """The predictions table of ``split``: ids, fold, split, targets and the task's score columns."""
        bags = self.data.tables[split].bags
        table = pd.DataFrame(
            {"slide_id": bags["slide_id"], "patient_id": bags["patient_id"], "fold": fold, "split": split}
        )
        for name, values in self.task.target_columns(bags).items():
            table[name] = values
        for name, values in self.task.predict(logits).items():
            table[name] = values
        return table

    def validate(self, fold: int) -> dict[str, float]:
        """Validation loss and main metric of the current model (empty without a validation split)."""
        if "val" not in self.data.datasets:
            return {}
        logits = self.logits("val")
        loss = float(self.task.loss(logits, self.data.targets["val"]))
        metrics = self.task.metrics(self.predictions("val", logits, fold))
        return {
            "val_loss": loss,
            f"val_{self.task.main_metric}": metrics.get(self.task.main_metric, math.nan),
        }

    # -------------------------------------------------------------------------- checkpoints

    def payload(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "task": self.task.state_dict(),
            "model": self.model.state_dict(),
            "aggregator": self.config.aggregator,
            "in_dim": self.data.feature_info["dim"],
            "n_outputs": self.task.n_outputs,
            "features": self.data.feature_info,
            "inputs": self.model.checkpoint_inputs(),
            "trained_in_bf16": self.trained_in_bf16,
            "patients": split_patients(self.data),
        }

    def save_last(self) -> None:
        save_checkpoint(
            self.out_dir / "last.pt",
            {
                **self.payload(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "state": asdict(self.state),
                "rng": rng_state(),
                "fingerprint": self.data.fingerprint,
                "best": self.best,
            },
        )

    def save_best(self) -> None:
        save_checkpoint(self.out_dir / "best.pt", {**self.payload(), **self.best})

    def try_resume(self) -> bool:
        """Continue from ``last.pt`` if it belongs to this very run (same settings, splits and features)."""
        path = self.out_dir / "last.pt"
        if not path.is_file():
            return False
        try:
            checkpoint = load_checkpoint(path)
        except UnsafeFileError:
            # checkpoint format 1 kept numpy's random state as a numpy array; such a file is never loaded
            # (it may as well come from an untrusted source), and never silently replaced
            raise PathmilError(
                f"{path} cannot be loaded safely, so the run cannot resume from it: it holds objects other "
                "than tensors and plain data, as a last.pt of checkpoint format 1 (pathmil 0.1 before the "
                "format field) does, or a file of untrusted source; delete it to train this run from its "
                "first epoch"
            ) from None
        if checkpoint.get("fingerprint") != self.data.fingerprint:
            log.warning("%s belongs to a run with other settings or inputs: starting afresh", path)
            return False
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.state = LoopState(**checkpoint["state"])
        set_rng_state(checkpoint["rng"])
        self.best = checkpoint.get("best") or self._best_from_file()
        if self.best is not None and not self._best_file_is_current():
            # a killed job's best.pt may be gone (Snakemake deletes a failed job's outputs) or older
            log.info("restoring best.pt (epoch %d) from %s", self.best["epoch"], path)
            self.save_best()
        log.info("resuming from %s after epoch %d", path, self.state.epoch)
        return True

    def _best_from_file(self) -> dict[str, Any] | None:
        """The best weights of a ``last.pt`` written before it carried them, from ``best.pt``."""
        path = self.out_dir / "best.pt"
        if not path.is_file():
            return None
        checkpoint = load_checkpoint(path)
        return {"model": checkpoint["model"], "epoch": checkpoint["epoch"]}

    def _best_file_is_current(self) -> bool:
        path = self.out_dir / "best.pt"
        if not path.is_file():
            return False
        try:
            return load_checkpoint(path).get("epoch") == self.best["epoch"]
        except PathmilError:
            return False

    # ------------------------------------------------------------------------------ the loop

    def fit(self, fold: int) -> None:
        from tqdm import tqdm

        if not self.try_resume():
            if self.config.init_from:
                init_from(
                    self.model, self.config.init_from, self.data.feature_info, self.task, self.config.aggregator
                )
            self.model.prepare_training()  # after init_from: an MHIM-MIL teacher is its baseline, not the source
        if self.state.stopped:
            return
        bar = tqdm(
            range(self.state.epoch, self.config.epochs),
            desc=f"fold {fold}",
            unit="epoch",
            disable=not self.progress,
            initial=self.state.epoch,
            total=self.config.epochs,
        )
        for epoch in bar:
            start = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                **self.validate(fold),
                "lr": self.scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - start,
            }
            self.state.history.append(row)
            improved = self._track(row, epoch)
            log.info(epoch_line(row, self.config.epochs, fold, improved))
            self.state.epoch = epoch + 1
            stop = epoch + 1 >= self.config.min_epochs and self.state.bad_epochs >= self.config.patience
            self.state.stopped = stop
            self.save_last()
            bar.set_postfix(
                {k: f"{v:.4g}" for k, v in row.items() if k in ("train_loss", "val_loss")}
                | {self.state.monitor: f"{row.get(self.state.monitor, math.nan):.4g}"}
            )
            if stop:
                log.info(
                    "early stop after epoch %d (best %s %.4g at epoch %d)",
                    epoch + 1,
                    self.state.monitor,
                    self.state.best_metric,
                    self.state.best_epoch,
                )
                break

    def _track(self, row: dict[str, Any], epoch: int) -> bool:
        """Keep the best checkpoint by the main metric (or by -loss where the metric is undefined); return
        whether this epoch is the new best.

        Small validation sets often saturate the metric (an AUC of 1.0 on a few patients); a tie is then
        broken by the validation loss, so the checkpoint still follows real progress.
        """
        if not self.state.monitor:
            self.state.monitor = self._monitor(row)
        value = row.get(self.state.monitor, math.nan)
        value = -value if self.state.monitor.endswith("loss") else value
        if not math.isfinite(value):
            value = -math.inf
        loss = row.get("val_loss", row["train_loss"])
        tie_better = value == self.state.best_metric and loss < self.state.best_loss
        if value > self.state.best_metric or tie_better or self.state.best_epoch < 0:
            self.state.best_metric, self.state.best_epoch, self.state.bad_epochs = value, epoch + 1, 0
            self.state.best_loss = loss
            self._keep_best(epoch + 1)
            return True
        self.state.bad_epochs += 1
        return False

    def _monitor(self, row: dict[str, Any]) -> str:
        """What early stopping follows: the validation main metric where defined, else a loss."""
        metric = f"val_{self.task.main_metric}"
        if math.isfinite(row.get(metric, math.nan)):
            return metric
        return "val_loss" if "val_loss" in row else "train_loss"

    def _keep_best(self, epoch: int) -> None:
        """Keep this epoch's weights as the best (in memory, in best.pt, and in the next last.pt)."""
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.best = {"model": weights, "epoch": epoch}
        self.save_best()


def epoch_line(row: dict[str, Any], epochs: int, fold: int, best: bool) -> str:
    """One log line per epoch, for following a run with ``tail -f``:
    ``fold 0 epoch 3/20: train_loss 0.5123 val_loss 0.4876 val_auc 0.9120 lr 1.2e-04 3.2 s (best)``."""
    values = " ".join(
        f"{key} {value:.4g}" if key == "lr" else f"{key} {value:.4f}"
        for key, value in row.items()
        if key not in ("epoch", "seconds")
    )
    return f"fold {fold} epoch {row['epoch']}/{epochs}: {values} {row['seconds']:.1f} s" + (
        " (best)" if best else ""
    )


# ------------------------------------------------------------------------------------------- a run


def train(
    config: TrainConfig,
    features_dir: str | os.PathLike,
    cohort: str | os.PathLike,
    splits: str | os.PathLike,
    fold: int,
    out_dir: str | os.PathLike,
    progress: bool = True,
    parts: tuple[str, ...] = SPLITS,
) -> dict[str, Any]:
    """Train, pick the best epoch, and write predictions and metrics of every split; return the metrics.

    ``parts`` limits the splits used: ``("train", "val")`` for a hyperparameter search, whose trials must
    never see the fold's test bags.
    """
    check_trainable(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config.seed)
    start = time.perf_counter()
    task = create_task(config.task, target=config.target, **config.task_options)
    data = load_fold(config, task, features_dir, cohort, splits, fold, parts)
    check_teacher(config, task, data)
    warn_of_sources_that_saw_the_test_patients(config, data)
    trainer = Trainer(config, task, data, out_dir, progress)
    for name in FINISHED_MARKERS:  # a run folder holds a finished run's outputs only once it has finished
        (out_dir / name).unlink(missing_ok=True)
    with atomic_output(out_dir / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    trainer.fit(fold)

    best = trainer.best
    if best is None:
        raise PathmilError(f"run {out_dir} ended without a best epoch; delete its last.pt and train again")
    if not trainer._best_file_is_current():
        trainer.save_best()
    trainer.model.load_state_dict(best["model"])
    tables = [
        trainer.predictions(s, trainer.logits(s, final=True), fold) for s in SPLITS if s in data.datasets
    ]
    predictions = pd.concat(tables, ignore_index=True)
    train_rows = predictions[predictions["split"] == "train"]
    metrics = {
        s: task.metrics(predictions[predictions["split"] == s], train_rows)
        for s in SPLITS
        if s in data.datasets
    }
    summary = {
        "task": task.name,
        "aggregator": config.aggregator,
        "fold": fold,
        "main_metric": task.main_metric,
        "best_epoch": best["epoch"],
        "epochs_run": trainer.state.epoch,
        "monitor": trainer.state.monitor,
        "n_bags": {s: len(t.bags) for s, t in data.tables.items()},
        "device": str(trainer.device),
        "features": data.feature_info,
        "seconds": round(time.perf_counter() - start, 2),
        "metrics": metrics,
    }
    with atomic_output(out_dir / "history.csv") as tmp:
        pd.DataFrame(trainer.state.history).to_csv(tmp, index=False)
    with atomic_output(out_dir / "predictions.csv") as tmp:
        predictions.to_csv(tmp, index=False)
    write_json(out_dir / "metrics.json", summary)
    return summary
