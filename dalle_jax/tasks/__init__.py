"""The model families the training loop knows, chosen by `config.task.name`.

Each factory imports its task lazily, so choosing the dVAE does not import the transformer.
"""
from __future__ import annotations

from typing import Callable

from dalle_jax.training.task import Task


def _dvae(config) -> Task:
    from dalle_jax.tasks.dvae import DVAETask

    return DVAETask(config)


def _dalle(config) -> Task:
    from dalle_jax.tasks.dalle import DalleTask

    return DalleTask(config)


def _clip(config) -> Task:
    from dalle_jax.tasks.clip import ClipTask

    return ClipTask(config)


TASKS: dict[str, Callable[..., Task]] = {
    "dvae": _dvae,
    "dalle": _dalle,
    "clip": _clip,
}


def get_task(config) -> Task:
    name = config.task.name
    if name not in TASKS:
        raise ValueError(f"config.task.name={name!r} is not one of {sorted(TASKS)}")
    return TASKS[name](config)
