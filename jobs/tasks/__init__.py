"""The task table: task name -> the module that defines it (one `Task` subclass, instance `TASK`).

Adding a task is one module in this folder plus one line here; the CLI choices, the models a
checkpoint rebuilds, avray serve's options, routes and deployments all come from this table.
Importing this package is light (no torch): `get` imports a task's module when it is first used.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    from jobs.tasks.base import Task

TASKS: dict[str, str] = {
    "localization": "jobs.tasks.localization",
    "separation": "jobs.tasks.separation",
    "captioning": "jobs.tasks.captioning",
    "retrieval": "jobs.tasks.retrieval",
    "vqa": "jobs.tasks.vqa",
    "soundnet": "jobs.tasks.soundnet",
}


def get(name: str) -> "Task":
    """The task called `name`; KeyError naming the known ones otherwise."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return importlib.import_module(TASKS[name]).TASK


class _Builders(Mapping):
    """Task name -> (config dataclass, model class), importing a task's module only when its entry
    is read: loading a retrieval checkpoint does not import separation's torchmetrics and scipy
    (2.7 s of every `avray embed` actor's start, measured)."""

    def __getitem__(self, name: str) -> tuple[type, type]:
        if name not in TASKS:
            raise KeyError(name)
        t = get(name)
        return t.config, t.model

    def __iter__(self) -> Iterator[str]:
        return iter(TASKS)

    def __len__(self) -> int:
        return len(TASKS)


def builders() -> Mapping[str, tuple[type, type]]:
    """Task name -> (config dataclass, model class): what models.checkpoint rebuilds models from
    (a read-only mapping that imports a task's module when its entry is first read)."""
    return _Builders()


def load_checkpoint(path: Any, map_location: Any = "cpu", task: str | None = None):
    """models.checkpoint.load_checkpoint with this table's builders: (model in eval mode, checkpoint
    dict). With `task`, a checkpoint of another task is a ValueError."""
    from models.checkpoint import load_checkpoint as load

    model, ckpt = load(path, builders(), map_location)
    if task is not None and ckpt["model"] != task:
        raise ValueError(f"{path} holds a {ckpt['model']} model, not {task}")
    return model, ckpt


def served_config(path: Any, task: str | None = None):
    """What preparing requests for a checkpoint needs, without building its model: (its Task, its
    model config, the ClipSettings of its training clips). ValueError for a checkpoint without
    clip settings (avray train stores them) or, with `task`, of another task."""
    from models.checkpoint import config_from_dict, read_checkpoint
    from pipelines.clipsettings import ClipSettings

    ckpt = read_checkpoint(path)
    t = get(ckpt["model"])
    if task is not None and t.name != task:
        raise ValueError(f"{path} holds a {t.name} model, not {task}")
    settings = ckpt["extra"].get("clip_settings")
    if not settings:
        raise ValueError(f"{path} carries no clip settings (avray train stores those of its clips in every "
                         "checkpoint), so uploads cannot be decoded as its training clips were")
    return t, config_from_dict(t.config, ckpt["config"]), ClipSettings.from_dict(settings)
