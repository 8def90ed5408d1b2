"""dVAE speed on this machine: train-step FLOP/s and 256 px encode throughput.

    python benchmarks/dvae_speed.py [--steps=20] [--encode_batch=4]

Speeds are given as ratios to this machine's fp32 matmul FLOP/s, measured in the same run
(these machines are shared and noisy): achieved FLOP/s = FLOPs of the compiled step (XLA's cost
analysis) / measured step time. Runs on one device with random data, so the figure is the
model's compute, not the input pipeline's (see benchmarks/input_pipeline.py).
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from common import matmul_flops_per_second, mean_seconds  # noqa: E402

flags.DEFINE_integer("steps", 20, "Train steps timed (after one warm-up step).")
flags.DEFINE_integer("encode_batch", 4, "Images per encode call at 256 px.")
flags.DEFINE_integer("encode_calls", 3, "Encode calls timed (after one warm-up call).")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmuls of the reference.")
FLAGS = flags.FLAGS


def flops_of(compiled) -> float:
    from dalle_jax.training.loop import flops_per_step

    return flops_per_step(compiled)


def train_step_figures(config, steps: int):
    from dalle_jax import tasks
    from dalle_jax.sharding import mesh as mesh_lib
    from dalle_jax.training import optimizer, state as state_lib, step as step_lib

    config.mesh.update(dict(shape=(1, 1, 1), num_devices=1))
    mesh = mesh_lib.build_mesh(config.mesh)
    task = tasks.get_task(config)
    tx, schedule = optimizer.make_optimizer(config.optimizer, config.train.steps)
    graphdef, abstract, init = state_lib.plan_train_state(
        task, tx, mesh, config.sharding.rules, seed=0, ema=config.optimizer.ema_decay > 0)
    state = init()
    size, batch_size = config.data.image_size, config.data.batch_size
    batch = {"image": jnp.asarray(np.random.default_rng(0).integers(
                 0, 256, (batch_size, size, size, 3), dtype=np.uint8)),
             "text": jnp.zeros((batch_size, config.text.length), jnp.int32),
             "mask": jnp.ones((batch_size,), bool)}
    step = jax.jit(step_lib.make_train_step(task, tx, schedule, graphdef, config),
                   donate_argnums=0)
    compiled = step.lower(state, batch).compile()
    state, _ = compiled(state, batch)  # warm-up
    jax.block_until_ready(state)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    return flops_of(compiled), seconds, batch_size


def encode_figures(config, batch: int, calls: int):
    from flax import nnx

    from dalle_jax.models.dvae import DVAE

    model = DVAE(config.model, rngs=nnx.Rngs(0))
    size = config.model.image_size
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, size, size, 3),
                                                           dtype=np.uint8))
    encode = nnx.jit(lambda m, x: m.encode(x))
    flops = flops_of(jax.jit(lambda x: model.encode(x)).lower(images).compile())
    return flops, mean_seconds(encode, model, images, repeats=calls), batch


def main(argv):
    del argv
    print(f"command: python benchmarks/dvae_speed.py --steps={FLAGS.steps} "
          f"--encode_batch={FLAGS.encode_batch} --encode_calls={FLAGS.encode_calls}")
    reference = matmul_flops_per_second(FLAGS.matmul_size)
    print(f"reference: fp32 matmul {FLAGS.matmul_size}^3 on 1 CPU device: "
          f"{reference / 1e9:.1f} GFLOP/s")
    from dalle_jax import config_lib

    flops, seconds, batch = train_step_figures(config_lib.load("dvae_mini"), FLAGS.steps)
    print(f"dvae_mini train step (batch {batch}, 32 px): {seconds * 1e3:.0f} ms, "
          f"{flops / 1e9:.2f} GFLOP -> {flops / seconds / 1e9:.1f} GFLOP/s = "
          f"{flops / seconds / reference:.2f} of matmul")
    reference_after = matmul_flops_per_second(FLAGS.matmul_size)
    flops, seconds, batch = encode_figures(config_lib.load("dvae"), FLAGS.encode_batch,
                                           FLAGS.encode_calls)
    print(f"dvae (paper config) encode at 256 px: {batch / seconds:.2f} images/s, "
          f"{flops / batch / 1e9:.1f} GFLOP/image -> {flops / seconds / 1e9:.1f} GFLOP/s = "
          f"{flops / seconds / reference_after:.2f} of matmul "
          f"(matmul re-measured: {reference_after / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    app.run(main)
