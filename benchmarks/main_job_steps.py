"""The main job's train steps on this machine, each as a fraction of its matmul FLOP/s.

    python benchmarks/main_job_steps.py [--steps=30] [--stages=dvae,clip,grey_clip,dalle]
        [--config.dalle.task.token_cache=False ...]

Every stage of `configs/pipeline_mini.py` (with its overrides: the dVAE's schedules, CLIP's hard
negatives, the grey CLIP's views) runs its real train step (the loop's compiled step: AdamW,
clipping, EMA, the state donated) on batches from the real input pipeline, on the machine's
devices as `train.py` uses them. The transformer's dVAE is a freshly initialised one of the
pipeline's dVAE config (its weights do not change the step's work). Two timings per stage,
alternating in rounds:
- `step`: the compiled step alone, on one batch over and over;
- `fed`: the loop's way, each step taking the next batch from the prefetching input pipeline
  while the step before runs (host work on the critical path shows here).
FLOPs per step are those the training loop logs: the task's formula where it has one (CLIP
and the transformer: matmuls at every position, attention over the pairs its mask keeps; not
the transformer's dVAE encoding), else XLA's cost analysis of the compiled step (the dVAE). The
reference is an fp32 2048³ matmul, measured before every stage.
"""
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dalle_jax import host  # noqa: E402

host.use_huge_pages()  # as the commands run (dalle_jax/host.py)

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from common import matmul_flops_per_second  # noqa: E402
from dalle_jax import config_lib, pipeline, tasks  # noqa: E402
from dalle_jax.models import dvae as dvae_model  # noqa: E402
from dalle_jax.training import loop  # noqa: E402

flags.DEFINE_integer("steps", 30, "Steps timed per round and timing.")
flags.DEFINE_integer("rounds", 2, "Rounds of the two timings, taking turns.")
flags.DEFINE_list("stages", ["dvae", "clip", "grey_clip", "dalle"], "Stages to measure.")
config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "pipeline_mini.py"),
    "The pipeline config whose stages are measured; overrides as for train.py.")
FLAGS = flags.FLAGS


def stage_trainer(stage: str, config, workdir: str):
    configs = pipeline.stage_configs(config, workdir)
    stage_config = configs[stage]
    config_lib.validate(stage_config)
    dvae = None
    if stage == "dalle":
        dvae = dvae_model.from_config(configs["dvae"], nnx.Rngs(0))
    task = pipeline.make_task(stage_config, dvae=dvae) if dvae else tasks.get_task(stage_config)
    return stage_config, loop.Trainer(stage_config, os.path.join(workdir, stage), task)


def measure(stage: str, config, workdir: str, steps: int, rounds: int) -> dict:
    stage_config, trainer = stage_trainer(stage, config, workdir)
    batches = trainer.batches(stage_config.data.train_split, training=True)
    state = trainer.init_state()
    batch = next(batches)
    trainer.compile_train_step(state, batch)
    flops = trainer.flops_per_step  # as the loop logs it: the task's formula, else XLA's
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    best = {"step": float("inf"), "fed": float("inf")}
    for _ in range(rounds):
        for timing in best:
            start = time.perf_counter()
            for _ in range(steps):
                state, metrics = trainer.train_step(
                    state, batch if timing == "step" else next(batches))
            jax.block_until_ready(metrics)
            best[timing] = min(best[timing], (time.perf_counter() - start) / steps)
    batches.close()
    result = {"flops": flops, **best, "batch": stage_config.data.batch_size}
    if stage == "dalle":
        with trainer.batches(stage_config.data.eval_split, training=False) as eval_batches:
            images = next(eval_batches)["image"]  # training batches have none with a cache
        result["encode"] = encode_seconds(trainer, images, steps)
    return result


def encode_seconds(trainer, images, calls: int) -> float:
    """Seconds of the transformer step's own dVAE encoding of one batch, compiled alone."""
    task = trainer.task
    encode = jax.jit(lambda frozen, images: nnx.merge(task.dvae_graphdef,
                                                      frozen["dvae"]).encode(images))
    jax.block_until_ready(encode(trainer.frozen, images))
    start = time.perf_counter()
    for _ in range(calls):
        tokens = encode(trainer.frozen, images)
    jax.block_until_ready(tokens)
    return (time.perf_counter() - start) / calls


def main(argv):
    del argv
    config = FLAGS.config
    with tempfile.TemporaryDirectory() as workdir:
        pipeline.train_tokenizer(config, workdir)
        print(f"devices: {jax.device_count()} × {jax.devices()[0].platform}; "
              f"{FLAGS.steps} steps × {FLAGS.rounds} rounds per timing, best round")
        print("| stage | batch | GFLOP a step | step alone | fed by the input pipeline "
              "| matmul GFLOP/s | step / matmul | fed / matmul |")
        print("|---|---|---|---|---|---|---|---|")
        encodes = []
        for stage in FLAGS.stages:
            reference = matmul_flops_per_second()
            r = measure(stage, config, workdir, FLAGS.steps, FLAGS.rounds)
            print(f"| {stage} | {r['batch']} | {r['flops'] / 1e9:.2f} | "
                  f"{1e3 * r['step']:.1f} ms | {1e3 * r['fed']:.1f} ms | "
                  f"{reference / 1e9:.1f} | **{r['flops'] / r['step'] / reference:.2f}** | "
                  f"{r['flops'] / r['fed'] / reference:.2f} |", flush=True)
            if "encode" in r:
                cached = "without" if config.dalle.task.token_cache else "in"
                encodes.append(f"the transformer's dVAE encoding of a batch, compiled alone "
                               f"({cached} its step: config.task.token_cache): "
                               f"{1e3 * r['encode']:.1f} ms = {r['encode'] / r['step']:.2f} of "
                               "its step")
    for line in encodes:
        print(line)
    print("\ncommand: python benchmarks/main_job_steps.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    app.run(main)
