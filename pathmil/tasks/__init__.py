"""Tasks: classification, survival and regression (targets, losses, scores and metrics).

``create_task(name, target=None, **settings)`` builds a task by name, as ``create_model`` builds an
aggregator; ``task_from_state(state)`` rebuilds a fitted one from a checkpoint's ``task.state_dict()``.
"""

from __future__ import annotations

from typing import Any

from pathmil.errors import PathmilError
from pathmil.tasks.base import Task
from pathmil.tasks.classification import ClassificationTask
from pathmil.tasks.regression import RegressionTask
from pathmil.tasks.survival import SurvivalTask

TASKS: dict[str, type[Task]] = {
    "classification": ClassificationTask,
    "survival": SurvivalTask,
    "regression": RegressionTask,
}

__all__ = [
    "TASKS",
    "ClassificationTask",
    "RegressionTask",
    "SurvivalTask",
    "Task",
    "create_task",
    "task_from_state",
]


def create_task(name: str, target: str | list[str] | None = None, **options: Any) -> Task:
    """Build task ``name``; ``options`` are its settings (``task_options``, declared in ``Task.Options``).

    Raises:
        PathmilError: an unknown task, or an option the task does not declare or a bad value of one.
    """
    if name not in TASKS:
        raise PathmilError(f"unknown task '{name}'; choose one of {', '.join(TASKS)}")
    return TASKS[name](target=target, **options)


def task_from_state(state: dict[str, Any]) -> Task:
    """A fitted task rebuilt from ``Task.state_dict()`` (kept in checkpoints)."""
    task = create_task(state["name"], target=state["label_columns"], **state["settings"])
    task.load_state_dict(state)
    return task
