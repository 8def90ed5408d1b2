"""CLIP train-step speed on this machine: achieved FLOP/s over the measured matmul FLOP/s.

    python benchmarks/clip_speed.py [--config=clip_mini] [--steps=10]

The step is the real one (`training.step.make_train_step` with the CLIP task: both towers, the
global-batch contrastive loss, AdamW, clipping, EMA) of `configs/clip_mini.py` at its batch
size, on random images and captions, on one CPU device. FLOPs are counted by formula
(`models.clip.flops_per_example`, ×3 for forward + backward), the same count the training loop
logs; the reference is an fp32 matmul measured before and after in the same run.
"""
from common import best_of, matmul_flops_per_second

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("config", "clip_mini", "A CLIP config in configs/.")
flags.DEFINE_integer("steps", 10, "Timed train steps (the best is reported).")
flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmuls of the reference.")
FLAGS = flags.FLAGS


def random_batch(config):
    rng = np.random.default_rng(0)
    b, s, t = config.data.batch_size, config.data.image_size, config.text.length
    text = np.zeros((b, t), np.int32)
    for row in range(b):
        words = int(rng.integers(3, t - 2))
        text[row, 0], text[row, 1 + words] = 2, 3
        text[row, 1:1 + words] = rng.integers(4, config.text.vocab_size, words)
    return {"image": jnp.asarray(rng.integers(0, 256, (b, s, s, 3)).astype(np.uint8)),
            "text": jnp.asarray(text), "mask": jnp.ones((b,), bool)}


def main(argv):
    del argv
    from dalle_jax import config_lib
    from dalle_jax.sharding import mesh as mesh_lib
    from dalle_jax.tasks.clip import ClipTask
    from dalle_jax.training import optimizer, state as state_lib, step as step_lib

    print(f"command: python benchmarks/clip_speed.py --config={FLAGS.config} "
          f"--steps={FLAGS.steps}")
    reference = matmul_flops_per_second(FLAGS.matmul_size)
    config = config_lib.load(FLAGS.config)
    config.mesh.update(dict(shape=(1, 1, 1), num_devices=1))
    # Random captions have no hard negatives (benchmarks/main_job_steps.py measures the
    # training's own batches): the formula then counts one caption and one image an example.
    config.data.contrast_words = ()
    config.data.missing_object_negatives = False
    task = ClipTask(config)
    tx, schedule = optimizer.make_optimizer(config.optimizer, config.train.steps)
    mesh = mesh_lib.build_mesh(config.mesh)
    graphdef, abstract, init = state_lib.plan_train_state(
        task, tx, mesh, config.sharding.rules, seed=0, ema=config.optimizer.ema_decay > 0)
    batch = random_batch(config)
    step = jax.jit(step_lib.make_train_step(task, tx, schedule, graphdef, config))
    compiled = step.lower(abstract, batch).compile()
    state = init()
    seconds = best_of({"step": lambda: compiled(state, batch)}, FLAGS.steps)["step"]
    reference_after = matmul_flops_per_second(FLAGS.matmul_size)
    matmul = (reference + reference_after) / 2
    flops = task.flops_per_example() * config.data.batch_size
    achieved = flops / seconds
    print(f"{FLAGS.config} train step, batch {config.data.batch_size}, 1 CPU device: "
          f"{seconds * 1e3:.0f} ms (best of {FLAGS.steps}), {flops / 1e9:.2f} GFLOP -> "
          f"{achieved / 1e9:.1f} GFLOP/s = {achieved / matmul:.2f} of matmul (matmul "
          f"before/after: {reference / 1e9:.1f} / {reference_after / 1e9:.1f} GFLOP/s)")


if __name__ == "__main__":
    app.run(main)
