"""Device tasks: what the runtime does with a model's outputs, chosen by its `rsedge.task` metadata.

A new task is one module here with a DeviceTask subclass (decode, accumulator, agreement,
load_targets, and folder_items if it can read an image folder; load_eval and evaluate when its
evaluation set is not one fixed-size tensor per sample, as segmentation's whole tiles) and one
`register_task` line below; the evaluation loop, the comparator and rsedge-bench need no change.
"""

from ..errors import RuntimeToolError
from .classification import ClassificationTask
from .detection import DetectionTask
from .segmentation import SegmentationTask

DEFAULT_TASK = "classification"
_TASKS = {}


def register_task(task):
    """Register a DeviceTask instance under task.name (a later registration of the name replaces it)."""
    if not getattr(task, "name", None) or task.name == "?":
        raise RuntimeToolError("a device task needs a name")
    _TASKS[task.name] = task
    return task


def get_task(name):
    try:
        return _TASKS[name]
    except KeyError:
        raise RuntimeToolError("unknown task {!r}: this runtime knows {} (a newer rsedge exported the model? "
                               "update the runtime on this device)".format(name, ", ".join(sorted(_TASKS)))) from None


def task_for(metadata):
    """The task a model's (normalized) metadata names; models without rsedge.task are classifiers."""
    return get_task((metadata or {}).get("task") or DEFAULT_TASK)


def known_tasks():
    return sorted(_TASKS)


register_task(ClassificationTask())
register_task(SegmentationTask())
register_task(DetectionTask())
