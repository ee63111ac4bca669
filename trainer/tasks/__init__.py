"""The registry of host tasks, keyed by the name a model's spec and its files carry (`task`)."""
from __future__ import annotations

from typing import Any

from .base import INPUT_NAME, Evaluator, Task, stack_dataset
from .classification import ClassificationTask
from .detection import DetectionTask
from .segmentation import SegmentationTask

DEFAULT_TASK = "classification"
_TASKS: dict[str, Task] = {}


def register_task(task: Task, replace: bool = False) -> Task:
    if task.name in _TASKS and not replace:
        raise ValueError(f"task {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def unregister_task(name: str) -> None:
    _TASKS.pop(name, None)


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(list_tasks())}")
    return _TASKS[name]


def task_for(meta: dict[str, Any]) -> Task:
    """The task of a model's metadata: its `task`, else its architecture's (a file written before
    the task was stored), else classification."""
    name = meta.get("task")
    if name is None:
        from ..models import REGISTRY

        spec = REGISTRY.get(meta.get("arch", ""))
        name = spec.task if spec is not None else DEFAULT_TASK
    return get_task(name)


register_task(ClassificationTask())
register_task(SegmentationTask())
register_task(DetectionTask())

__all__ = ["INPUT_NAME", "DEFAULT_TASK", "ClassificationTask", "DetectionTask", "Evaluator", "SegmentationTask",
           "Task", "get_task", "list_tasks",
           "register_task", "stack_dataset", "task_for", "unregister_task"]
