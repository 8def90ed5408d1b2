"""The model families the training loop knows, chosen by `config.task.name`.

Each factory imports its task lazily, so choosing the dVAE does not import the transformer.
"""
from __future__ import annotations

from typing import Callable

from dalle_jax.tasks.task import Task


def _dvae(config, dvae, token_table) -> Task:
    from dalle_jax.tasks.dvae import DVAETask

    return DVAETask(config)


def _dalle(config, dvae, token_table) -> Task:
    from dalle_jax.tasks.dalle import DalleTask

    if dvae is None:
        where = config.task.get("dvae_workdir")
        raise ValueError(f"config.task.dvae_workdir={where!r}: the transformer needs a trained "
                         "dVAE to turn its images into tokens" if not where else
                         "the transformer's task needs the trained dVAE of "
                         f"config.task.dvae_workdir={where!r} (pipeline.make_task loads it)")
    return DalleTask(config, dvae, token_table)


def _clip(config, dvae, token_table) -> Task:
    from dalle_jax.tasks.clip import ClipTask

    return ClipTask(config)


TASKS: dict[str, Callable[..., Task]] = {
    "dvae": _dvae,
    "dalle": _dalle,
    "clip": _clip,
}


def get_task(config, *, dvae=None, token_table=None) -> Task:
    """The task of `config.task.name`. `dvae`: the trained dVAE (an `nnx.Module`, or its
    abstract `nnx.eval_shape` to plan without one), for the tasks that read image tokens;
    `token_table`: its tokens of every training image (`config.task.token_cache`)."""
    name = config.task.name
    if name not in TASKS:
        raise ValueError(f"config.task.name={name!r} is not one of {sorted(TASKS)}")
    return TASKS[name](config, dvae, token_table)
