"""Task heads (one module per model). ``TASKS`` maps model name -> TaskSpec.

A module listed in ``TASK_MODULES`` that does not exist yet is skipped, so a model
appears once its file lands (and ships in a pipeline once its weights do).
"""

from __future__ import annotations

import importlib

from models.tasks.base import Head, HeadResult, InputSpec, NetConfig, TaskSpec

TASK_MODULES = (
    "models.tasks.knee_acl",
    "models.tasks.knee_meniscus",
    "models.tasks.shoulder_cuff",
    "models.tasks.spine_stenosis",
    "models.tasks.spine_discs",
)


def _load() -> dict[str, TaskSpec]:
    tasks: dict[str, TaskSpec] = {}
    for mod_name in TASK_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name == mod_name:
                continue
            raise
        task = mod.TASK
        tasks[task.name] = task
    return tasks


TASKS: dict[str, TaskSpec] = _load()

__all__ = ["TASKS", "TASK_MODULES", "Head", "HeadResult", "InputSpec", "NetConfig", "TaskSpec"]
