"""The ahead-of-time plan (`python -m dalle_jax.plan`) against a real run's compiled step."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dalle_jax import config_lib, plan as plan_lib
from dalle_jax.models import dvae as dvae_model
from dalle_jax.tasks.dalle import DalleTask
from dalle_jax.training import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def device0_bytes(tree) -> int:
    """Bytes the first device really holds of a tree of (concrete, sharded) arrays."""
    device = jax.devices()[0]
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
               for shard in leaf.addressable_shards if shard.device == device)


# The second mesh adds tensor parallelism and two minutes: a long run (`-m slow`).
@pytest.mark.parametrize("mesh_shape", [(2, 4, 1), pytest.param((1, 4, 2), marks=pytest.mark.slow)])
def test_plan_of_dalle_mini_equals_the_figures_of_a_real_runs_compiled_step(
        mini_config, tmp_path, mesh_shape):
    config = config_lib.load("dalle_mini")
    config.data.update(data_dir=mini_config().data.data_dir, shapes=mini_config().data.shapes)
    config.text.tokenizer = ""
    config.task.token_cache = False  # a plan reads no data set, so it counts no token table
    config.mesh.shape = mesh_shape
    dvae_config = config_lib.load("dvae_mini")
    plan, _ = plan_lib.make_plan(config, dvae_config)

    # The reference: the loop's own trainer, with real sharded arrays and a real batch, and a
    # freshly initialised dVAE in place of a trained one (a step's memory and FLOPs do not
    # depend on the dVAE's weights).
    untrained_dvae = dvae_model.from_config(dvae_config, nnx.Rngs(0))
    trainer = loop.Trainer(config, str(tmp_path), DalleTask(config, untrained_dvae))
    state = trainer.init_state()
    with trainer.batches("train", training=True) as batches:
        trainer.compile_train_step(state, next(batches))
    real = trainer.compiled_train_step.memory_analysis()

    assert plan.mesh == dict(zip(("data", "fsdp", "tensor"), mesh_shape))
    assert plan.argument_bytes == real.argument_size_in_bytes
    assert plan.output_bytes == real.output_size_in_bytes
    assert plan.alias_bytes == real.alias_size_in_bytes
    assert plan.temp_bytes == real.temp_size_in_bytes
    assert plan.param_bytes == device0_bytes(state.params)
    assert plan.ema_bytes == device0_bytes(state.ema)
    assert plan.optimizer_bytes == device0_bytes(state.opt_state)
    # Sharded: a device holds less than the whole model.
    assert plan.param_bytes < sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert plan.xla_flops_per_device == loop.flops_per_step(trainer.compiled_train_step)
    assert plan.model_flops_per_step == trainer.flops_per_step > 0


def test_plan_tokens_per_second_follow_from_flops_and_chip():
    plan = plan_lib.Plan(
        config_name="x", mesh={"data": 4, "fsdp": 2, "tensor": 1}, global_batch=16,
        tokens_per_example=100, param_bytes=0, ema_bytes=0, optimizer_bytes=0,
        argument_bytes=0, output_bytes=0, alias_bytes=0, temp_bytes=0,
        peak_bytes=20 * plan_lib.GiB, xla_flops_per_device=0.0, model_flops_per_step=8e15)
    # 8 chips × 197 TFLOP/s × 0.5 = 788 TFLOP/s -> 8e15 FLOPs take 10.15 s for 1600 tokens.
    assert plan.tokens_per_second("tpu_v5e", 0.5) == pytest.approx(1600 / (8e15 / 788e12))
    assert not plan.fits("tpu_v5e") and plan.fits("tpu_v4")


def test_plan_command_on_sixteen_simulated_devices(tmp_path):
    out = tmp_path / "plan.json"
    result = subprocess.run(
        [sys.executable, "-m", "dalle_jax.plan", "--config", "configs/dalle_mini.py",
         "--dvae_config", "configs/dvae_mini.py", "--devices", "16",
         "--config.mesh.shape=(2,4,2)", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on mesh {'data': 2, 'fsdp': 4, 'tensor': 2} (16 devices)" in result.stdout
    assert "tpu_v5e" in result.stdout and "peak" in result.stdout
    plan = json.loads(out.read_text())
    config = config_lib.load("dalle_mini")
    assert plan["global_batch"] == config.data.batch_size
    assert plan["tokens_per_example"] == config.text.length + config.model.grid_size ** 2
    assert 0 < plan["param_bytes"] < plan["peak_bytes"]


def test_plan_of_a_transformer_names_a_mismatched_dvae():
    config = config_lib.load("dalle_mini")
    with pytest.raises(ValueError, match="config.model.grid_size=8 does not match the dVAE"):
        plan_lib.make_plan(config, config_lib.load("dvae"))


def test_sampling_plan_of_dalle_mini_equals_its_real_arrays():
    """The plan's per-device parameter and cache bytes are those of the real model and cache
    on the same mesh; its cache reads are the positions the decode step gathers."""
    from dalle_jax.models import attention as attention_lib
    from dalle_jax.models import dalle
    from dalle_jax.sharding import logical
    from dalle_jax.sharding.mesh import build_mesh

    config = config_lib.load("dalle_mini")
    config.mesh.shape = (2, 1, 4)  # images over data, the 4 heads over tensor
    plan = plan_lib.make_sampling_plan(config, batch=8, guided=True, dtype="float32")
    assert plan.streams == 16 and plan.image_length == 64

    mesh, rules = build_mesh(config.mesh), logical.normalize_rules(config.sharding.rules)
    model = dalle.from_config(config, nnx.Rngs(jax.random.key(0, impl="rbg")))
    state = nnx.state(model)
    placed = jax.device_put(state, logical.state_shardings(state, mesh, rules))
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        cache = jax.jit(lambda: model.init_cache(16))()
    assert plan.param_bytes == device0_bytes(placed)
    assert plan.cache_bytes == device0_bytes(cache)
    # 16/2 streams, 4/4 heads, the caption's 24 and the image's 64 positions
    assert cache[0].text_keys.addressable_shards[0].data.shape == (8, 1, 24, 32)
    assert cache[0].image_keys.addressable_shards[0].data.shape == (8, 1, 64, 32)

    # Bytes read: per layer, the caption and the image positions `decode_window` slices.
    cfg, layout = model.cfg, model.cfg.layout
    entries = sum(layout.text_len + len(attention_lib.decode_window(kind, layout, 27).positions)
                  for kind in cfg.layer_kinds)
    cache_reads = 2 * entries * 8 * 1 * cfg.block.head_dim * 4  # k and v, 8 streams, 1 head
    # FSDP is 1 here: every weight is read as its device holds it.
    assert plan.read_bytes_per_step == device0_bytes(placed) + cache_reads


def test_gathered_bytes_count_a_weight_whole_along_the_batch_axes():
    mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    weight = jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=jax.sharding.NamedSharding(
        mesh, jax.P("fsdp", "tensor")))
    batch_split = jax.ShapeDtypeStruct((8, 6), jnp.float32, sharding=jax.sharding.NamedSharding(
        mesh, jax.P(("data", "fsdp"), None)))
    assert plan_lib.per_device_bytes([weight]) == 2 * 3 * 4
    assert plan_lib.gathered_bytes([weight], ("data", "fsdp")) == 8 * 3 * 4  # tensor stays split
    assert plan_lib.gathered_bytes([batch_split], ("data", "fsdp")) == 8 * 6 * 4


def test_sampling_plan_command_names_the_slices_that_fit(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dalle_jax.plan", "--config", "configs/dalle_mini.py",
         "--devices", "8", "--sample", "8", "--config.mesh.shape=(2,1,4)"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 images at once with guidance (16 streams), bfloat16" in result.stdout
    assert "key/value cache" in result.stdout and "images/s; fits in 16 GiB" in result.stdout
