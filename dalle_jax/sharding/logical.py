"""Logical-axis sharding: arrays name their dimensions, the config's rules map names to mesh axes.

Parameters and activations say what a dimension *is* (`batch`, `embed`, `heads`, `mlp`, `vocab`,
...); `config.sharding.rules` says where each kind goes on the mesh. Changing parallelism
(data, FSDP, tensor) is then a config change, never a model change.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
import flax.linen as nn

Rules = Sequence[tuple[str, Any]]


def validate_rules(rules: Rules, mesh_axes: Sequence[str]) -> None:
    """Fails with a one-line error on a rule that names an axis the mesh does not have."""
    seen = set()
    for rule in rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"config.sharding.rules entry {rule!r} is not (logical_name, mesh_axes)")
        name, target = rule
        if name in seen:
            raise ValueError(f"config.sharding.rules maps {name!r} twice")
        seen.add(name)
        targets = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        for axis in targets:
            if axis not in mesh_axes:
                raise ValueError(f"config.sharding.rules maps {name!r} to mesh axis {axis!r}, "
                                 f"which is not in config.mesh.axes {tuple(mesh_axes)}")


def normalize_rules(rules: Rules) -> tuple:
    """Rules as tuples all the way down (configs read back from JSON hold lists)."""
    return tuple((name, tuple(target) if isinstance(target, list) else target)
                 for name, target in rules)


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> jax.P:
    """The PartitionSpec for an array whose dimensions are called `names`.

    Unlike Flax's lookup, a name without a rule is an error rather than silently replicated:
    a typo must not quietly copy a large weight to every device.
    """
    known = {rule[0] for rule in rules}
    for name in names:
        if name is not None and name not in known:
            raise ValueError(f"logical axis {name!r} has no entry in config.sharding.rules")
    return nn.logical_to_mesh_axes(tuple(names), normalize_rules(rules))


def logical_sharding(mesh: jax.sharding.Mesh, names: Sequence[str | None],
                     rules: Rules) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(mesh, logical_to_spec(names, rules))


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules, ndim: int) -> jax.sharding.NamedSharding:
    """Leading dimension over the batch axes, the rest replicated."""
    return logical_sharding(mesh, ("batch",) + (None,) * (ndim - 1), rules)


def batch_axes(rules: Rules) -> tuple[str, ...]:
    """The mesh axes the batch is split over."""
    spec = logical_to_spec(("batch",), rules)[0]
    return () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)


def batch_axis_size(mesh: jax.sharding.Mesh, rules: Rules) -> int:
    """How many ways the global batch is split (a global batch must divide by it)."""
    return int(np.prod([mesh.shape[a] for a in batch_axes(rules)], dtype=int))


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                rules: Rules) -> dict[str, jax.Array]:
    """Assembles every process's part of a batch into global arrays sharded over `batch`.

    Each process passes only the examples it read; the global batch is their concatenation in
    process order, as `jax.make_array_from_process_local_data` defines it.
    """
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(v)), v)
            for k, v in local_batch.items()}


def fit_spec(spec: jax.P, shape: Sequence[int], mesh: jax.sharding.Mesh) -> jax.P:
    """`spec` without the mesh axes that do not divide their dimension.

    A 4-channel bottleneck cannot be split 8 ways; replicating that one dimension lets small
    models (and the narrow layers of big ones) run on any mesh.
    """
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        ways = int(np.prod([mesh.shape[a] for a in names], dtype=int))
        fitted.append(axes if dim % ways == 0 else None)
    return jax.P(*fitted)


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules):
    """NamedShardings for an NNX state (concrete or abstract) from its parameters' logical axes."""
    with nnx.logical_axis_rules(normalize_rules(rules)):
        specs = nnx.get_partition_spec(state)
    return jax.tree.map(
        lambda spec, x: jax.sharding.NamedSharding(mesh, fit_spec(spec, x.shape, mesh)),
        specs, state, is_leaf=lambda x: isinstance(x, jax.P))
