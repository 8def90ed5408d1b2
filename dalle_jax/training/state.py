"""The train state, created directly sharded: a 12B model is never whole on one device."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from dalle_jax.sharding import logical


@struct.dataclass
class TrainState:
    step: jax.Array  # batches consumed, skipped ones included
    params: nnx.State
    rest: nnx.State  # the model's non-parameter variables
    opt_state: optax.OptState
    ema: nnx.State | None  # exponential moving average of `params`; None when disabled
    nonfinite_total: jax.Array  # steps skipped for a non-finite loss or gradient
    nonfinite_in_row: jax.Array


def split_model(model: nnx.Module):
    """(graphdef, params, rest): the static structure, the trained values, everything else."""
    return nnx.split(model, nnx.Param, ...)


def _initial_state(task, tx: optax.GradientTransformation, seed: int, ema: bool) -> TrainState:
    _, params, rest = split_model(task.build_model(nnx.Rngs(seed)))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, rest=rest, opt_state=tx.init(params),
                      ema=params if ema else None, nonfinite_total=zero, nonfinite_in_row=zero)


def state_shardings(abstract: TrainState, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, rules) -> TrainState:
    """Shardings for every leaf: parameters (and their optimizer moments and EMA) follow the
    parameters' logical axes; counters and everything else are replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    params = logical.state_shardings(abstract.params, mesh, rules)
    opt_state = optax.tree_utils.tree_map_params(
        tx, lambda _, sharding: sharding, abstract.opt_state, params,
        transform_non_params=lambda _: replicated)
    return TrainState(
        step=replicated, params=params,
        rest=jax.tree.map(lambda _: replicated, abstract.rest), opt_state=opt_state,
        ema=None if abstract.ema is None else params,
        nonfinite_total=replicated, nonfinite_in_row=replicated)


def abstract_arrays(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their target shardings (what a sharded restore needs)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def plan_train_state(task, tx, mesh, rules, *, seed: int, ema: bool):
    """(graphdef, abstract state with target shardings, init): nothing is allocated yet.

    `init()` creates every array on the devices that own it, for a fresh run; a resumed run
    restores into the abstract state instead, so it never holds two copies.
    """
    make = lambda: _initial_state(task, tx, seed, ema)  # noqa: E731
    # Placement is decided here, from the logical axes, for the whole state at once;
    # Flax's per-variable eager sharding would reject the dimensions `fit_spec` replicates.
    with jax.set_mesh(mesh), nnx.logical_axis_rules(logical.normalize_rules(rules)), \
            nnx.use_eager_sharding(False):
        graphdef, _, _ = split_model(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(seed))))
        abstract = jax.eval_shape(make)
        shardings = state_shardings(abstract, tx, mesh, rules)
    sharded_init = jax.jit(make, out_shardings=shardings)

    def init() -> TrainState:
        with jax.set_mesh(mesh), nnx.logical_axis_rules(logical.normalize_rules(rules)), \
                nnx.use_eager_sharding(False):
            return sharded_init()

    return graphdef, abstract_arrays(abstract, shardings), init
