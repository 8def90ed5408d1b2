"""Loading a trained model from a workdir, for inference (encoding, sampling, scoring)."""
from __future__ import annotations

import json
import os

import ml_collections
from flax import nnx

from dalle_jax import tasks
from dalle_jax.sharding import logical, mesh as mesh_lib
from dalle_jax.training import checkpoint, optimizer
from dalle_jax.training import state as state_lib


def load_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {workdir!r} is not a training workdir")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def load_model(workdir: str, *, use_ema: bool = True, step: int | None = None,
               mesh_shape=(-1, 1, 1)):
    """(model, config) of the run in `workdir`, with its EMA parameters unless `use_ema=False`.

    The parameters are restored onto a mesh of this machine's devices (`mesh_shape`, data
    parallel by default), whatever mesh the run was trained on: Orbax reshards on restore.
    """
    config = load_config(workdir)
    task = tasks.get_task(config)
    tx, _ = optimizer.make_optimizer(config.optimizer, config.train.steps)
    mesh_config = ml_collections.ConfigDict(dict(config.mesh.to_dict(), shape=tuple(mesh_shape),
                                                 num_devices=0))
    mesh = mesh_lib.build_mesh(mesh_config)
    rules = logical.normalize_rules(config.sharding.rules)
    graphdef, abstract, _ = state_lib.plan_train_state(
        task, tx, mesh, rules, seed=config.seed, ema=config.optimizer.ema_decay > 0)
    state = checkpoint.restore_state_only(workdir, abstract, step)
    params = state.ema if use_ema and state.ema is not None else state.params
    return nnx.merge(graphdef, params, state.rest), config
