"""Mesh construction and the logical-axis sharding helpers on 8 fake CPU devices."""
import jax
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from dalle_jax import config_lib
from dalle_jax.sharding import logical, mesh as mesh_lib

RULES = config_lib.DEFAULT_RULES


def test_eight_fake_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("shape, expected", [
    ((-1, 1, 1), (8, 1, 1)), ((2, -1, 1), (2, 4, 1)), ((1, 2, -1), (1, 2, 4)), ((2, 2, 2), (2, 2, 2)),
])
def test_minus_one_takes_the_remaining_devices(shape, expected):
    assert mesh_lib.resolve_mesh_shape(shape, ("data", "fsdp", "tensor"), 8) == expected


@pytest.mark.parametrize("shape, message", [
    ((-1, -1, 1), "more than one -1"), ((3, -1, 1), "do not divide"), ((2, 2, 1), "needs 4 devices"),
    ((2, 0, 4), "positive"), ((8, 1), "has 2 entries"),
])
def test_bad_mesh_shapes_are_named(shape, message):
    with pytest.raises(ValueError, match=message):
        mesh_lib.resolve_mesh_shape(shape, ("data", "fsdp", "tensor"), 8)


def test_build_mesh_uses_every_device_with_auto_axes():
    mesh = mesh_lib.build_mesh(ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=(2, -1, 2))))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_rules_map_logical_names_to_mesh_axes():
    # A mesh axis shards one dimension at most: `embed` yields fsdp to `batch` in activations.
    assert logical.logical_to_spec(("batch", "length", "embed"), RULES) == jax.P(
        ("data", "fsdp"), None, None)
    assert logical.logical_to_spec(("embed", "mlp"), RULES) == jax.P("fsdp", "tensor")
    with pytest.raises(ValueError, match="'emb'"):
        logical.logical_to_spec(("emb",), RULES)


def test_rules_naming_a_missing_mesh_axis_are_rejected():
    with pytest.raises(ValueError, match="'model'"):
        logical.validate_rules(RULES + (("experts", "model"),), ("data", "fsdp", "tensor"))
    with pytest.raises(ValueError, match="'embed' twice"):
        logical.validate_rules(RULES + (("embed", None),), ("data", "fsdp", "tensor"))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_batch_lands_sharded_over_the_batch_axes(shape):
    mesh = mesh_lib.build_mesh(ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=shape)))
    ways = shape[0] * shape[1]
    assert logical.batch_axis_size(mesh, RULES) == ways
    images = np.arange(16 * 4 * 4 * 3, dtype=np.uint8).reshape(16, 4, 4, 3)
    text = np.arange(16 * 6, dtype=np.int32).reshape(16, 6)
    batch = logical.shard_batch({"image": images, "text": text}, mesh, RULES)
    for key, host in (("image", images), ("text", text)):
        array = batch[key]
        assert array.shape == host.shape
        assert array.sharding.spec == jax.P(("data", "fsdp"), *[None] * (host.ndim - 1))
        np.testing.assert_array_equal(np.asarray(array), host)
        rows = 16 // ways
        for shard in array.addressable_shards:
            # Each device holds the rows of its (data, fsdp) coordinate; tensor replicas agree.
            coords = {a: int(i) for a, i in zip(mesh.axis_names,
                                                np.argwhere(mesh.devices == shard.device)[0])}
            block = coords["data"] * shape[1] + coords["fsdp"]
            np.testing.assert_array_equal(shard.data, host[block * rows:(block + 1) * rows])


def test_state_shardings_follow_parameter_annotations():
    mesh = mesh_lib.build_mesh(ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=(2, 2, 2))))

    class MLP(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.lecun_normal()
            self.up = nnx.Linear(8, 16, rngs=rngs,
                                 kernel_init=nnx.with_partitioning(init, ("embed", "mlp")))
            self.down = nnx.Linear(16, 8, rngs=rngs,
                                   kernel_init=nnx.with_partitioning(init, ("mlp", "embed")))

    with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
        abstract = nnx.eval_shape(lambda: MLP(nnx.Rngs(0)))
    shardings = logical.state_shardings(nnx.state(abstract), mesh, RULES)
    flat = {"/".join(map(str, path)): s for path, s in jax.tree_util.tree_leaves_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))}
    up = [s for k, s in flat.items() if "up" in k and "kernel" in k][0]
    down = [s for k, s in flat.items() if "down" in k and "kernel" in k][0]
    assert up.spec == jax.P("fsdp", "tensor") and down.spec == jax.P("tensor", "fsdp")
    assert up.mesh is mesh


def test_dimensions_the_mesh_does_not_divide_are_replicated():
    mesh = mesh_lib.build_mesh(ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=(1, 4, 2))))
    assert logical.fit_spec(jax.P("fsdp", "tensor"), (8, 6), mesh) == jax.P("fsdp", "tensor")
    assert logical.fit_spec(jax.P("fsdp", "tensor"), (2, 6), mesh) == jax.P(None, "tensor")
    assert logical.fit_spec(jax.P(("fsdp", "tensor"), None), (16, 3), mesh) == jax.P(
        ("fsdp", "tensor"), None)
    assert logical.fit_spec(jax.P(("fsdp", "tensor")), (4, 3), mesh) == jax.P(None, None)
