"""Building blocks shared by every model: parameters and activations named by logical axes.

A parameter records its logical axis names (e.g. ("embed", "mlp")); the config's rules map the
names to mesh axes when the train state is planned, so a different parallelism is a config
change. Activations get the same treatment through `constrain`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import spmd as flax_spmd

from dalle_jax.sharding import logical


def rules_and_mesh_active() -> bool:
    return bool(flax_spmd.get_logical_axis_rules()) and not jax.sharding.get_abstract_mesh().empty


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Sharding hint by logical names under the active rules and mesh; a no-op without them.

    Flax NNX 0.12 has no `with_logical_constraint` of its own; this reads the same rules
    context as `nnx.logical_axis_rules` and, unlike Linen's helper, fails on an unknown name.
    """
    if not rules_and_mesh_active():
        return x
    spec = logical.logical_to_spec(names, flax_spmd.get_logical_axis_rules())
    return jax.lax.with_sharding_constraint(x, spec)


def param(value) -> nnx.Param:
    """A parameter annotated with logical axes.

    Flax shards annotated variables at creation ("eager sharding", on by default), which needs a
    mesh and rules; without them the annotation is only recorded, so models also build on a
    single device (tests, sampling scripts).
    """
    eager = nnx.using_eager_sharding() and rules_and_mesh_active()
    return nnx.Param(value, eager_sharding=eager)


def new_param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...]
              ) -> nnx.Param:
    """A float32 parameter drawn from `init`, carrying the logical `axes`."""
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} do not match the parameter shape {shape}")
    return param(nnx.with_partitioning(init, axes)(rngs.params(), shape, jnp.float32))


def normal(std: float):
    return nnx.initializers.normal(stddev=std)


class LayerNorm(nnx.Module):
    """Layer normalisation computed in float32 (bfloat16 variances lose too much)."""

    def __init__(self, features: int, *, rngs: nnx.Rngs, eps: float = 1e-5):
        self.scale = new_param(rngs, nnx.initializers.ones_init(), (features,), ("norm",))
        self.bias = new_param(rngs, nnx.initializers.zeros_init(), (features,), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


class Embed(nnx.Module):
    """A (num, features) table; rows are looked up by index."""

    def __init__(self, num: int, features: int, axes: tuple[str | None, str | None], *,
                 std: float, rngs: nnx.Rngs):
        self.table = new_param(rngs, normal(std), (num, features), axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.table[...], ids, axis=0)
