"""DALL·E transformer speed on this machine: train-step FLOP/s and compile time against depth.

    python benchmarks/dalle_speed.py [--steps=5] [--batch=8]

The train step is the real one (`training.step.make_train_step`: AdamW, clipping, EMA) on a
CPU-sized model (d_model 512, 8 layers, 8 heads of 64, text 64 + 16×16 image tokens) with random
tokens fed straight to the transformer. FLOPs are counted by formula
(`models.dalle.flops_per_example`: matmuls at 2 FLOPs per multiply-add, attention only over the
(query, key) pairs its mask keeps, ×3 for forward + backward), and the achieved FLOP/s is given
as a ratio to this machine's fp32 matmul FLOP/s measured in the same run.

Compile time: the same step lowered and compiled (no arrays allocated) at depth 4 and 24; with
the layers scanned, the deeper model should compile in about the same time.

Loop or no loop (`--unroll_rounds`): the train step of `configs/dalle_mini.py`'s transformer
(4 layers, batch 32, random tokens) with the layers applied by a loop (`scan_unroll=1`) and
unrolled (`scan_unroll=4`, the config's setting), timed in alternating rounds in one process.
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

from common import matmul_flops_per_second  # noqa: E402

flags.DEFINE_integer("steps", 5, "Train steps timed (after one warm-up step).")
flags.DEFINE_integer("batch", 8, "Examples per train step.")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmuls of the reference.")
flags.DEFINE_string("attention", "sparse", "sparse or dense.")
flags.DEFINE_integer("unroll_rounds", 5, "Alternating rounds of the loop/unrolled comparison "
                     "(0: skip it).")
FLAGS = flags.FLAGS


def cpu_config(depth: int = 8):
    from dalle_jax import config_lib

    config = config_lib.dalle_base_config()
    config.text.update(dict(length=64, vocab_size=1024))
    config.model.update(dict(grid_size=16, image_vocab_size=1024, d_model=512, num_heads=8,
                             head_dim=64, mlp_dim=2048, depth=depth,
                             attention=FLAGS.attention))
    config.optimizer.warmup_steps = 0
    config.mesh.update(dict(shape=(1, 1, 1), num_devices=1))
    return config


class TokenTask:
    """The dalle task's loss on tokens given in the batch (no dVAE: the transformer alone)."""
    name = "tokens"

    def __init__(self, config):
        from dalle_jax.models import dalle

        self.cfg = dalle.dalle_config(config.model, config.text, "float32")

    def build_model(self, rngs):
        from dalle_jax.models import dalle

        return dalle.DALLE(self.cfg, rngs=rngs)

    def loss(self, model, batch, rng, step):
        from dalle_jax.tasks.dalle import segment_nll_sums

        text_logits, image_logits = model(batch["text"], batch["tokens"])
        sums = segment_nll_sums(text_logits, image_logits, batch["text"], batch["tokens"],
                                batch["mask"])
        loss = (sums["text_nll"] / sums["text_count"] / 8
                + 7 * sums["image_nll"] / sums["image_count"] / 8)
        return loss, {}


def random_batch(cfg, batch: int):
    rng = np.random.default_rng(0)
    text = rng.integers(4, cfg.text_vocab_size, (batch, cfg.text_length)).astype(np.int32)
    text[:, 0] = 2
    return {"text": jnp.asarray(text),
            "tokens": jnp.asarray(rng.integers(0, cfg.image_vocab_size,
                                               (batch, cfg.image_length)).astype(np.int32)),
            "mask": jnp.ones((batch,), bool)}


def mini_config(scan_unroll: int):
    from dalle_jax import config_lib

    config = config_lib.load("dalle_mini")
    config.model.scan_unroll = scan_unroll
    config.optimizer.warmup_steps = 0
    config.mesh.update(dict(shape=(1, 1, 1), num_devices=1))
    return config


def unroll_comparison(rounds: int, steps: int):
    """Median ms/step of dalle_mini's train step with its layers looped and unrolled."""
    config = mini_config(1)
    batch = config.data.batch_size
    runs = {}
    for unroll in (1, config.model.depth):
        compiled, state, data, _, _ = compiled_step(mini_config(unroll), batch, allocate=True)
        state, metrics = compiled(state, data)  # warm-up
        runs[unroll] = [compiled, state, data, []]
    for _ in range(rounds):  # Alternating, so a noisy neighbour slows both alike.
        for run in runs.values():
            compiled, state, data, times = run
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = compiled(state, data)
            jax.block_until_ready(metrics)
            times.append((time.perf_counter() - start) / steps * 1e3)
            run[1] = state
    return {unroll: float(np.median(run[3])) for unroll, run in runs.items()}


def compiled_step(config, batch: int, allocate: bool):
    """(compiled train step, state or None, batch, task, seconds to lower and compile)."""
    from dalle_jax.sharding import mesh as mesh_lib
    from dalle_jax.training import optimizer, state as state_lib, step as step_lib

    mesh = mesh_lib.build_mesh(config.mesh)
    task = TokenTask(config)
    tx, schedule = optimizer.make_optimizer(config.optimizer, config.train.steps)
    graphdef, abstract, init = state_lib.plan_train_state(
        task, tx, mesh, config.sharding.rules, seed=0, ema=True)
    data = random_batch(task.cfg, batch)
    step = jax.jit(step_lib.make_train_step(task, tx, schedule, graphdef, config),
                   donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(abstract, data).compile()
    seconds = time.perf_counter() - start
    return compiled, (init() if allocate else None), data, task, seconds


def main(argv):
    del argv
    from dalle_jax.models import dalle

    print(f"command: python benchmarks/dalle_speed.py --steps={FLAGS.steps} "
          f"--batch={FLAGS.batch} --attention={FLAGS.attention} "
          f"--unroll_rounds={FLAGS.unroll_rounds}")
    reference = matmul_flops_per_second(FLAGS.matmul_size)
    print(f"reference: fp32 matmul {FLAGS.matmul_size}^3 on 1 CPU device: "
          f"{reference / 1e9:.1f} GFLOP/s")

    compiled, state, data, task, _ = compiled_step(cpu_config(), FLAGS.batch, allocate=True)
    state, metrics = compiled(state, data)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
        state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / FLAGS.steps
    flops = dalle.flops_per_example(task.cfg) * FLAGS.batch
    achieved = flops / seconds
    reference_after = matmul_flops_per_second(FLAGS.matmul_size)
    matmul = (reference + reference_after) / 2
    print(f"train step, d_model 512, 8 layers, text 64 + 16x16 image, batch {FLAGS.batch}: "
          f"{seconds * 1e3:.0f} ms, {flops / 1e9:.1f} GFLOP -> {achieved / 1e9:.1f} GFLOP/s = "
          f"{achieved / matmul:.2f} of matmul (matmul before/after: {reference / 1e9:.1f} / "
          f"{reference_after / 1e9:.1f} GFLOP/s)")

    times = {}
    for depth in (4, 24):
        *_, seconds = compiled_step(cpu_config(depth), FLAGS.batch, allocate=False)
        times[depth] = seconds
        print(f"compile the train step at depth {depth}: {seconds:.1f} s")
    print(f"compile time ratio depth 24 / depth 4: {times[24] / times[4]:.2f}")

    if FLAGS.unroll_rounds:
        looped, unrolled = unroll_comparison(FLAGS.unroll_rounds, 20).values()
        print(f"dalle_mini train step, batch 32, median of {FLAGS.unroll_rounds} alternating "
              f"rounds of 20 steps: layers looped {looped:.0f} ms, unrolled {unrolled:.0f} ms: "
              f"{looped / unrolled:.2f}x")


if __name__ == "__main__":
    app.run(main)
